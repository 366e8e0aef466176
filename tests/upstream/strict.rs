//! A tenant broker that treats a forbidden topic the way AWS IoT Core does: it closes the
//! connection on a PUBLISH there, without an acknowledgement (mosquitto's ACLs drop it
//! quietly instead, so they cannot show the lobby's poison-message handling).
//!
//! A small MQTT 3.1.1 server on the lobby's own codec, over mutual TLS with its own PKI
//! (`lobby::pki::init`), on a free 127.0.0.1 port: CONNACK 0 to anyone with a certificate of
//! that PKI, SUBACK, PINGRESP, and PUBACK for every QoS 1 publish it keeps.

use std::sync::Arc;

use parking_lot::Mutex;

use bytes::BytesMut;
use lobby::mqtt::codec::{self, Packet, Protocol, QoS};
use lobby::mqtt::topic::filter_matches;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::Msg;

/// What the broker saw.
#[derive(Default)]
struct Seen {
    /// Publishes it accepted (and acknowledged at QoS 1), in order.
    accepted: Vec<Msg>,
    /// Connections it closed for a publish on the forbidden topic.
    kicked: u64,
}

/// The broker; dropping it stops it.
pub struct Strict {
    dir: tempfile::TempDir,
    port: u16,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for Strict {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Strict {
    /// A broker that closes the connection on any publish matching the filter `forbidden`.
    pub async fn start(forbidden: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        lobby::pki::init(&lobby::pki::InitOptions {
            dir: pki.clone(),
            devices: 1,
        })
        .unwrap();
        let acceptor = TlsAcceptor::from(server_tls(&pki));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (forbidden, st) = (forbidden.to_owned(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, forbidden, st) = (acceptor.clone(), forbidden.clone(), st.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(tls) => serve(tls, &forbidden, &st).await,
                        Err(e) => eprintln!("strict: TLS accept: {e}"),
                    }
                });
            }
        });
        Self {
            dir,
            port,
            seen,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The tenant's `bridge` settings (SPEC §5) for this broker.
    pub fn bridge(&self, topics: &[&str], pool_size: u16) -> Value {
        let pki = self.dir.path().join("pki");
        json!({
            "ca": pki.join("ca.pem").display().to_string(),
            "cert": pki.join("devices/device-0001.pem").display().to_string(),
            "key": pki.join("devices/device-0001.key").display().to_string(),
            "topics": topics,
            "pool_size": pool_size,
        })
    }

    /// The publishes it accepted so far.
    pub fn accepted(&self) -> Vec<Msg> {
        self.seen.lock().accepted.clone()
    }

    /// How many connections it closed for a forbidden publish.
    pub fn kicked(&self) -> u64 {
        self.seen.lock().kicked
    }
}

fn server_tls(pki: &std::path::Path) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .unwrap();
    let chain = CertificateDer::pem_file_iter(pki.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(config)
}

/// One client connection, until it leaves or publishes on the forbidden topic.
async fn serve<S>(mut io: S, forbidden: &str, seen: &Mutex<Seen>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    // CONNECT is read before the protocol is known, like the lobby's own sessions do.
    let mut protocol = None;
    loop {
        let packet = loop {
            match codec::decode(&mut buf, protocol, 1 << 20) {
                Ok(Some(p)) => break p,
                Ok(None) => {}
                Err(e) => {
                    eprintln!("strict: decode: {e:?}");
                    return;
                }
            }
            match io.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let answer = match packet {
            Packet::Connect(_) if protocol.is_none() => {
                protocol = Some(Protocol::V311);
                Packet::ConnAck(codec::ConnAck {
                    session_present: false,
                    code: 0,
                    properties: Default::default(),
                })
            }
            Packet::Publish(p) if filter_matches(forbidden, &p.topic) => {
                // AWS IoT: a publish the policy does not allow ends the connection.
                seen.lock().kicked += 1;
                return;
            }
            Packet::Publish(p) => {
                seen.lock().accepted.push(Msg {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    qos: p.qos as u8,
                });
                if p.qos != QoS::AtLeastOnce {
                    continue;
                }
                Packet::PubAck(codec::PubAck {
                    pkid: p.pkid,
                    ..Default::default()
                })
            }
            Packet::Subscribe(s) => Packet::SubAck(codec::SubAck {
                pkid: s.pkid,
                codes: vec![1; s.filters.len()],
                properties: Default::default(),
            }),
            Packet::Unsubscribe(u) => Packet::UnsubAck(codec::UnsubAck {
                pkid: u.pkid,
                codes: Vec::new(),
                properties: Default::default(),
            }),
            Packet::PingReq => Packet::PingResp,
            Packet::Disconnect(_) => return,
            other => {
                eprintln!("strict: unexpected {other:?}");
                return;
            }
        };
        let mut out = BytesMut::new();
        codec::encode(&answer, Protocol::V311, &mut out).unwrap();
        if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
            return;
        }
    }
}
