//! The real binary: `lobby serve` on a fresh directory creates its development PKI, serves a
//! device, and on SIGTERM tells the v5 device DISCONNECT 0x8B, drains and exits 0.
mod common;

use std::net::TcpListener as StdListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use lobby::mqtt::codec::{self, Packet, Protocol};
use lobby::pki::Ca;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory whose `lobby.toml` runs a development lobby on free loopback ports
/// (`dev.auto_init`), with `extra` appended; the directory and the MQTT and API ports.
fn config_dir(extra: &str) -> (tempfile::TempDir, u16, u16) {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, api) = (free_port(), free_port());
    std::fs::write(
        dir.path().join("lobby.toml"),
        format!(
            "[listener]\nmqtt = \"127.0.0.1:{mqtt}\"\napi = \"127.0.0.1:{api}\"\n\
             [dev]\nauto_init = true\n[log]\nlevel = \"warn\"\n{extra}\n"
        ),
    )
    .unwrap();
    (dir, mqtt, api)
}

/// Reads packets until one decodes, or the stream ends (`None`).
async fn next_packet<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Option<Packet> {
    loop {
        if let Some(p) = codec::decode(buf, Some(Protocol::V5), 1 << 20).unwrap() {
            return Some(p);
        }
        if io.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// `lobby serve` in `dir`, killed when the value goes.
struct Serving(std::process::Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `lobby serve` in `dir` and waits for `/readyz` on `api`.
async fn serve(dir: &std::path::Path, api: u16) -> Serving {
    let child = Command::new(env!("CARGO_BIN_EXE_lobby"))
        .args(["serve", "--config", "lobby.toml"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let serving = Serving(child);
    assert!(
        ready(&format!("http://127.0.0.1:{api}/readyz")).await,
        "lobby serve comes up"
    );
    serving
}

/// Whether `url` answers 200 within 30 s.
async fn ready(url: &str) -> bool {
    let http = common::http();
    let up = async {
        while !http.get(url).send().await.is_ok_and(|r| r.status() == 200) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    timeout(Duration::from_secs(30), up).await.is_ok()
}

/// The first scrape of a fresh lobby holds every SPEC §9 series whose labels are known, at 0
/// (histograms with a 0 count), and `lobby_build_info{version}`; the bridge's series are
/// labelled by tenant and appear with the first bridged tenant, the store's by operation.
#[tokio::test]
async fn every_series_is_there_from_the_first_scrape() {
    let (dir, _mqtt, api) = config_dir("");
    let _lobby = serve(dir.path(), api).await;
    let text = common::http()
        .get(format!("http://127.0.0.1:{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let has = |line: &str| text.lines().any(|l| l == line);
    for line in [
        r#"lobby_connections_active{protocol="mqtt5"} 0"#,
        r#"lobby_connections_active{protocol="mqtt3.1.1"} 0"#,
        r#"lobby_connections_total{outcome="redirected"} 0"#,
        r#"lobby_connections_total{outcome="closed"} 0"#,
        r#"lobby_tls_handshake_failures_total{reason="bad_certificate"} 0"#,
        r#"lobby_tls_handshake_failures_total{reason="timeout"} 0"#,
        "lobby_tls_handshake_duration_seconds_count 0",
        "lobby_connect_duration_seconds_count 0",
        r#"lobby_redirects_total{kind="connack"} 0"#,
        r#"lobby_redirects_total{kind="disconnect"} 0"#,
        r#"lobby_redirects_total{kind="publish"} 0"#,
        r#"lobby_claims{state="ready"} 0"#,
        r#"lobby_claims{state="registering"} 0"#,
        "lobby_claim_to_redirect_seconds_count 0",
        r#"lobby_registrations_total{backend="aws-iot",outcome="ready"} 0"#,
        r#"lobby_registrations_total{backend="aws-iot",outcome="failed"} 0"#,
        r#"lobby_registration_duration_seconds_count{backend="aws-iot"} 0"#,
        &format!(
            r#"lobby_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        ),
    ] {
        assert!(has(line), "missing `{line}` in:\n{text}");
    }
    assert!(
        text.contains("lobby_store_operation_duration_seconds"),
        "{text}"
    );
}

#[tokio::test]
async fn lobby_serve_drains_on_sigterm_and_exits_0() {
    let (dir, mqtt, api) = config_dir("[shutdown]\ngrace = \"20s\"");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lobby"))
        .args(["serve", "--config", "lobby.toml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if !ready(&format!("http://127.0.0.1:{api}/readyz")).await {
        let _ = child.kill();
        panic!("lobby serve did not come up");
    }

    // A device of the PKI the lobby made on its first start.
    let certs = dir.path().join("certs/dev");
    let ca = Ca::load(&certs.join("ca.pem"), &certs.join("ca.key")).unwrap();
    let dev = ca.issue_device("sigterm").unwrap();
    let tls = common::client_tls_with(&certs.join("ca.pem"), &dev.cert_pem, &dev.key_pem);
    let tcp = TcpStream::connect(("127.0.0.1", mqtt)).await.unwrap();
    let mut io = TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut out = BytesMut::new();
    let connect = codec::Connect {
        protocol: Protocol::V5,
        client_id: "sigterm".into(),
        keep_alive: 30,
        clean_start: true,
        ..Default::default()
    };
    codec::encode(&Packet::Connect(connect), Protocol::V5, &mut out).unwrap();
    io.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    match next_packet(&mut io, &mut buf).await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, 0),
        other => panic!("expected CONNACK, got {other:?}"),
    }

    let sent = std::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    match timeout(Duration::from_secs(10), next_packet(&mut io, &mut buf)).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.reason, 0x8B),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    let status = timeout(Duration::from_secs(30), async {
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("lobby serve exits within its grace");
    assert!(status.success(), "{status:?}");
    // Nothing was left running: the lobby ended well before its 20 s grace ran out.
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{:?}",
        sent.elapsed()
    );
}

/// Config values that would overflow a semaphore or a clock, or lock every device out, stop
/// `lobby serve` at start with a message naming the key: never a panic, never a lobby that
/// runs and refuses everyone.
#[tokio::test]
async fn lobby_serve_refuses_values_that_overflow_or_lock_out() {
    for (key, section, line) in [
        (
            "limits.max_connections",
            "[limits]",
            "max_connections = 9223372036854775807",
        ),
        ("limits.reconnect_burst", "[limits]", "reconnect_burst = 0"),
        (
            "limits.redirect_grace",
            "[limits]",
            "redirect_grace = \"100000000000y\"",
        ),
    ] {
        let (dir, _, _) = config_dir(&format!("{section}\n{line}"));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lobby"))
            .args(["serve", "--config", "lobby.toml"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{key}: lobby serve started instead of refusing"))
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: {:?}", out.status);
        assert!(!err.contains("panicked"), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// `lobby` run in `dir` with `args`: exit status and stderr.
fn run_in(dir: &std::path::Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lobby"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Without a config file and without a development PKI, `lobby serve` says what is missing
/// and what to give, and exits 1 without creating anything.
#[test]
fn serve_without_a_config_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (status, err) = run_in(dir.path(), &["serve"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("config/lobby.toml does not exist")
            && err.contains("--config FILE")
            && err.contains("--dev"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}

/// `lobby serve --dev` in an empty directory runs on the built-in defaults (API on
/// 127.0.0.1:8080), creating the development PKI first.
#[tokio::test]
async fn serve_dev_runs_on_the_built_in_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_lobby"))
        .args(["serve", "--dev"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _lobby = Serving(child);
    assert!(
        ready("http://127.0.0.1:8080/readyz").await,
        "lobby serve --dev answers /readyz on 127.0.0.1:8080 (is another lobby there?)"
    );
    assert!(dir.path().join("certs/dev/ca.pem").exists());
}

/// `lobby check-config` validates without starting: exit 1 naming the key or the file that
/// is wrong, 0 and `ok` for a good one.
#[test]
fn check_config_names_what_is_wrong() {
    let (dir, _, _) = config_dir("");
    let (status, err) = run_in(dir.path(), &["certs", "init"]);
    assert!(status.success(), "{err}");
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("zero.toml", "[limits]\nmax_connections = 0\n");
    let (status, err) = run_in(dir.path(), &["check-config", "--config", "zero.toml"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("`limits.max_connections`"), "{err}");
    write("missing.toml", "[tls]\ncert = \"nope.pem\"\n");
    let (status, err) = run_in(dir.path(), &["check-config", "--config", "missing.toml"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("nope.pem"), "{err}");
    write("typo.toml", "[limits]\nmax_conections = 5\n");
    let (status, err) = run_in(dir.path(), &["check-config", "--config", "typo.toml"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("max_conections"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_lobby"))
        .args(["check-config", "--config", "lobby.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "lobby.toml: ok"
    );
}
