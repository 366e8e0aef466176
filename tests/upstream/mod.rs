//! A real MQTT broker as a bridge-mode tenant's endpoint (SPEC §5): mosquitto with a mutual-TLS
//! listener on a free 127.0.0.1 port and its own PKI (not the lobby's), which a test can stop
//! and start again on the same port; and an [`Observer`], a plain rumqttc v4 client of that
//! broker that records every message and mosquitto's `$SYS` subscription and client counts.
//!
//! The broker keeps its state on disk (`persistence true`) and is stopped with SIGTERM, so a
//! restart restores the observer's persistent session: messages the broker acknowledged while
//! the observer was reconnecting are queued for it, never missed. An outage test can then tell
//! "the lobby lost an acknowledged message" from "the observer was not back in time".

#![allow(dead_code)]

pub mod device;
pub mod strict;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

use crate::common::{client_tls_with, WAIT};

/// The broker binary (Debian package `mosquitto`).
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// How long a test waits for what needs the lobby to reconnect to a restarted broker (its
/// backoff, with jitter, may be several seconds).
pub const LONG: Duration = Duration::from_secs(30);

/// mosquitto's `$SYS` publishing interval, in seconds.
const SYS_INTERVAL: u64 = 1;

/// `$SYS` topic: the number of subscriptions on the broker (persistent sessions included).
pub const SYS_SUBSCRIPTIONS: &str = "$SYS/broker/subscriptions/count";
/// `$SYS` topic: the number of connected clients.
pub const SYS_CLIENTS: &str = "$SYS/broker/clients/connected";

/// What the observer subscribes to (at QoS 1), on every connection.
const OBSERVED: [&str; 3] = ["#", SYS_SUBSCRIPTIONS, SYS_CLIENTS];

/// A mosquitto with a TLS listener that requires a client certificate.
pub struct Upstream {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Upstream {
    /// A new PKI (`pki::init` in a temp dir) and a broker running on a free port.
    pub async fn start() -> Self {
        assert!(
            Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} is required (apt-get install mosquitto)"
        );
        let dir = tempfile::tempdir().unwrap();
        lobby::pki::init(&lobby::pki::InitOptions {
            dir: dir.path().join("pki"),
            devices: 1,
        })
        .unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let mut up = Self {
            dir,
            port: 0,
            child: None,
        };
        // A free port can be taken between probing and mosquitto's bind: try a few.
        for _ in 0..5 {
            up.port = free_port();
            up.write_config();
            if up.spawn().await {
                return up;
            }
        }
        panic!("mosquitto did not start: {}", up.log());
    }

    /// The TLS port on 127.0.0.1 (the server certificate names `localhost`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the broker process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The CA that signed the broker's server certificate (and the client certificate).
    pub fn ca_path(&self) -> PathBuf {
        self.pki().join("ca.pem")
    }

    /// A client certificate the broker accepts: the lobby's bridge certificate.
    pub fn client_cert_path(&self) -> PathBuf {
        self.pki().join("devices/device-0001.pem")
    }

    pub fn client_key_path(&self) -> PathBuf {
        self.pki().join("devices/device-0001.key")
    }

    /// The tenant's `bridge` settings (SPEC §5) for this broker.
    pub fn bridge(&self, topics: &[&str], pool_size: u16) -> Value {
        json!({
            "ca": self.ca_path().display().to_string(),
            "cert": self.client_cert_path().display().to_string(),
            "key": self.client_key_path().display().to_string(),
            "topics": topics,
            "pool_size": pool_size,
        })
    }

    /// mosquitto's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker gracefully (SIGTERM: it closes its connections and saves its state),
    /// and waits until the process is gone and the port refuses connections.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if timeout(WAIT, child.wait()).await.is_err() {
            child.kill().await.unwrap();
        }
        crate::common::eventually(|| async {
            TcpStream::connect(self.addr()).await.is_err().then_some(())
        })
        .await;
    }

    /// Starts the broker again on the same port, with the state it saved when stopped.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        for _ in 0..20 {
            if self.spawn().await {
                return;
            }
            sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "mosquitto did not start again on port {}: {}",
            self.port,
            self.log()
        );
    }

    /// A new observer connected to this broker (see [`Observer`]).
    pub async fn observer(&self) -> Observer {
        Observer::start(self, "lobby-test-observer").await
    }

    /// Another plain client like the observer, with its own client id.
    pub async fn client(&self, client_id: &str) -> Observer {
        Observer::start(self, client_id).await
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn write_config(&self) {
        let pki = self.pki();
        let conf = format!(
            "listener {port} 127.0.0.1\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {data}/\n\
             user root\n\
             sys_interval {SYS_INTERVAL}\n\
             log_dest file {log}\n\
             log_type all\n",
            port = self.port,
            ca = pki.join("ca.pem").display(),
            cert = pki.join("server.pem").display(),
            key = pki.join("server.key").display(),
            data = self.dir.path().join("data").display(),
            log = self.dir.path().join("mosquitto.log").display(),
        );
        std::fs::write(self.config_path(), conf).unwrap();
    }

    /// Spawns mosquitto; true once its port accepts TCP, false if it exited first.
    async fn spawn(&mut self) -> bool {
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if TcpStream::connect(self.addr()).await.is_ok() {
                self.child = Some(child);
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {} in {WAIT:?}: {}",
                self.port,
                self.log()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A message the observer received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The QoS it was delivered at (the observer subscribes at QoS 1, so this is the QoS it
    /// was published at).
    pub qos: u8,
}

#[derive(Default)]
struct State {
    messages: Vec<Msg>,
    /// `$SYS` topic → (value, when it last changed).
    sys: HashMap<String, (u64, Instant)>,
    connections: u64,
    subacks: u64,
}

/// A plain client of the upstream broker (client id `lobby-test-observer`, persistent session,
/// the lobby's bridge certificate) subscribed at QoS 1 to `#` and to the `$SYS` counts. It
/// reconnects by itself after a broker restart. Dropping it ends its event loop.
pub struct Observer {
    client: AsyncClient,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Observer {
    async fn start(up: &Upstream, client_id: &str) -> Self {
        let cert = std::fs::read_to_string(up.client_cert_path()).unwrap();
        let key = std::fs::read_to_string(up.client_key_path()).unwrap();
        let tls = client_tls_with(&up.ca_path(), &cert, &key);
        let mut o = MqttOptions::new(client_id, "localhost", up.port());
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut el) = AsyncClient::new(o, 256);
        let state = Arc::new(Mutex::new(State::default()));
        let (st, cl) = (state.clone(), client.clone());
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        st.lock().connections += 1;
                        for f in OBSERVED {
                            cl.try_subscribe(f, QoS::AtLeastOnce).unwrap();
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => st.lock().subacks += 1,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let mut s = st.lock();
                        if p.topic.starts_with("$SYS/") {
                            let v: u64 = String::from_utf8_lossy(&p.payload)
                                .trim()
                                .parse()
                                .unwrap_or(0);
                            let changed = s.sys.get(&p.topic).is_none_or(|(old, _)| *old != v);
                            if changed {
                                s.sys.insert(p.topic.clone(), (v, Instant::now()));
                            }
                        } else {
                            s.messages.push(Msg {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                qos: p.qos as u8,
                            });
                        }
                    }
                    Ok(_) => {}
                    // The broker is down (or restarting): rumqttc reconnects on the next poll.
                    Err(_) => sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let obs = Self {
            client,
            state,
            task,
        };
        crate::common::eventually(|| async {
            (obs.state.lock().subacks >= OBSERVED.len() as u64).then_some(())
        })
        .await;
        obs
    }

    /// Publishes on the upstream broker (queued; sent by the event loop, and after a reconnect
    /// when the broker is down).
    pub async fn publish(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, false, payload.into())
            .await
            .unwrap();
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> Vec<Msg> {
        self.state.lock().messages.clone()
    }

    /// The messages received on `topic` so far.
    pub fn on(&self, topic: &str) -> Vec<Msg> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Waits (up to `within`) for a message on `topic` with `payload`; returns it.
    pub async fn wait_for(&self, topic: &str, payload: &[u8], within: Duration) -> Msg {
        eventually_within(within, &format!("{topic} {:?}", lossy(payload)), || async {
            self.messages()
                .into_iter()
                .find(|m| m.topic == topic && m.payload == payload)
        })
        .await
    }

    /// How many times it connected (1 + reconnects).
    pub fn connections(&self) -> u64 {
        self.state.lock().connections
    }

    /// The last value of a `$SYS` counter, if one came.
    pub fn sys(&self, topic: &str) -> Option<u64> {
        self.state.lock().sys.get(topic).map(|(v, _)| *v)
    }

    /// Waits until the `$SYS` counter `topic` is `want`; panics with the last value otherwise.
    pub async fn wait_sys(&self, topic: &str, want: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.sys(topic);
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{topic} = {want} not reached in {WAIT:?}: last {got:?}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `$SYS` counter `topic` once it held still for three `$SYS` intervals (mosquitto
    /// publishes these counters only when they change, once per interval): the broker's
    /// current value when nothing is changing it.
    pub async fn settled_sys(&self, topic: &str) -> u64 {
        let quiet = Duration::from_millis(3 * SYS_INTERVAL * 1000 + 200);
        eventually_within(WAIT + quiet, topic, || async {
            let s = self.state.lock();
            s.sys
                .get(topic)
                .and_then(|(v, at)| (at.elapsed() >= quiet).then_some(*v))
        })
        .await
    }
}

/// Polls `f` until it returns `Some`, for up to `within`; `what` names it in the panic.
pub async fn eventually_within<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {within:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// `payload` as text, for messages.
pub fn lossy(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}
