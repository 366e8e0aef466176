//! MQTT over WebSockets on the MQTT listener (issue 15, item 2): MQTT.js (node) over `wss` to
//! `/mqtt` with subprotocol `mqtt` and the device's certificate, chosen by ALPN `http/1.1` or,
//! with no ALPN offered, by the first bytes; the same identity and session as plain MQTT,
//! including a live redirect (v5 DISCONNECT 0x9D with the Server Reference). Upgrades to
//! another path or without the subprotocol are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use common::*;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console")
}

/// MQTT.js for `dev` over wss, MQTT `version` (4 or 5), offering `alpn` ("" for none).
fn mqtt_js(lobby: &TestLobby, dev: &Device, version: u8, alpn: &str) -> Child {
    assert!(
        console_dir().join("node_modules/mqtt").exists(),
        "MQTT.js is not installed: `npm ci --prefix tests/console`"
    );
    let dir = lobby.dir.path().join(format!("ws-{}", dev.name));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dev.pem"), &dev.cert_pem).unwrap();
    std::fs::write(dir.join("dev.key"), &dev.key_pem).unwrap();
    Command::new("node")
        .arg(console_dir().join("ws.mjs"))
        .env(
            "URL",
            format!("wss://localhost:{}/mqtt", lobby.mqtt_addr().port()),
        )
        .env("CA", lobby.certs_dir().join("ca.pem"))
        .env("CERT", dir.join("dev.pem"))
        .env("KEY", dir.join("dev.key"))
        .env("CLIENT_ID", &dev.name)
        .env("VERSION", version.to_string())
        .env("ALPN", alpn)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node (Node.js) must be installed")
}

/// The next event line MQTT.js printed.
async fn next_event(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("MQTT.js said nothing in time")
        .unwrap()
        .expect("MQTT.js ended");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[tokio::test]
async fn mqtt_js_over_wss_is_redirected_live() {
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    for (alpn, name) in [("http/1.1", "ws-alpn"), ("", "ws-no-alpn")] {
        let dev = lobby.device(name);
        let mut node = mqtt_js(&lobby, &dev, 5, alpn);
        let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
        let first = next_event(&mut lines).await;
        assert_eq!(first["event"], "connected", "ALPN {alpn:?}: {first}");
        // The same session as plain MQTT: the lobby sees the device by its certificate.
        let (st, body) = lobby.admin_device_json(&dev).await;
        assert_eq!(
            (st, &body["connected"]),
            (200, &Value::Bool(true)),
            "{body}"
        );
        let (st, body) = lobby.claim(&token, &dev).await;
        assert_eq!(st, 201, "{body}");
        let told = next_event(&mut lines).await;
        assert_eq!(told["event"], "disconnect", "ALPN {alpn:?}: {told}");
        assert_eq!(told["reasonCode"], 0x9D, "{told}");
        assert_eq!(told["serverReference"], "iot.acme.example:8883", "{told}");
    }
}

#[tokio::test]
async fn mqtt_js_3_1_1_over_wss_waits() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("ws-v3");
    let mut node = mqtt_js(&lobby, &dev, 4, "");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    assert_eq!(next_event(&mut lines).await["event"], "connected");
    let (_, body) = lobby.admin_device_json(&dev).await;
    assert_eq!(body["protocol"], "mqtt3.1.1", "{body}");
}

/// A raw upgrade request over TLS (ALPN `http/1.1`); the response's status line.
async fn upgrade(lobby: &TestLobby, path: &str, protocol: Option<&str>) -> String {
    let dev = lobby.device(&format!("ws-raw{}", path.replace('/', "-")));
    let mut config = (*client_tls(lobby, &dev)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(lobby.mqtt_addr()).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let proto = protocol.map_or(String::new(), |p| {
        format!("Sec-WebSocket-Protocol: {p}\r\n")
    });
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{proto}\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(WAIT, tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn upgrades_elsewhere_or_without_the_subprotocol_are_refused() {
    let lobby = TestLobby::start().await;
    assert!(upgrade(&lobby, "/mqtt", Some("mqtt"))
        .await
        .contains(" 101 "));
    assert!(upgrade(&lobby, "/other", Some("mqtt"))
        .await
        .contains(" 404 "));
    assert!(upgrade(&lobby, "/mqtt", None).await.contains(" 400 "));
    assert!(upgrade(&lobby, "/mqtt", Some("chat"))
        .await
        .contains(" 400 "));
}
