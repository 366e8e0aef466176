//! Several MQTT listeners in one lobby, with ALPN (issue 15, item 1): `[[listener.mqtt]]`
//! entries each with their own address and PROXY setting; the AWS IoT Device SDK v2 (Python,
//! its MQTT 3.1.1 and MQTT 5 clients, default ALPN `x-amzn-mqtt-ca` on port 443) and
//! mosquitto on the other listener at the same time; ALPN selected as the SDKs and MQTT
//! clients offer it, clients without ALPN served, others refused.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use lobby::config::MqttListener;
use lobby::mqtt::codec::Protocol;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// `dev`'s certificate and key as files, with the lobby's CA; (ca, cert, key).
fn files(lobby: &TestLobby, dev: &Device) -> (PathBuf, PathBuf, PathBuf) {
    let dir = lobby.dir.path().join(format!("files-{}", dev.name));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("dev.pem"), dir.join("dev.key"));
    std::fs::write(&cert, &dev.cert_pem).unwrap();
    std::fs::write(&key, &dev.key_pem).unwrap();
    (lobby.certs_dir().join("ca.pem"), cert, key)
}

/// A TLS handshake with `alpn` offered; the protocol selected, or the handshake's error.
async fn handshake(
    lobby: &TestLobby,
    dev: &Device,
    addr: std::net::SocketAddr,
    alpn: &[&[u8]],
) -> Result<Option<Vec<u8>>, String> {
    let mut config = (*client_tls(lobby, dev)).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
}

#[tokio::test]
async fn alpn_selects_mqtt_serves_clients_without_it_and_refuses_others() {
    let lobby = TestLobby::start().await;
    let dev = lobby.device("alpn");
    let addr = lobby.mqtt_addr();
    let aws = handshake(&lobby, &dev, addr, &[b"x-amzn-mqtt-ca"]).await;
    assert_eq!(aws.unwrap().as_deref(), Some(&b"x-amzn-mqtt-ca"[..]));
    let mqtt = handshake(&lobby, &dev, addr, &[b"h2", b"mqtt"]).await;
    assert_eq!(mqtt.unwrap().as_deref(), Some(&b"mqtt"[..]));
    assert_eq!(handshake(&lobby, &dev, addr, &[]).await.unwrap(), None);
    let other = handshake(&lobby, &dev, addr, &[b"h2"]).await;
    assert!(
        other.is_err(),
        "a client offering only h2 is refused: {other:?}"
    );
}

#[tokio::test]
async fn each_listener_has_its_own_proxy_setting() {
    let lobby = TestLobby::start_with(|c| {
        let any = "127.0.0.1:0".parse().unwrap();
        c.listener.mqtt = vec![
            MqttListener::at(any),
            MqttListener {
                address: any,
                proxy_protocol: Some(true),
            },
        ];
    })
    .await;
    let addrs = lobby.running().mqtt_addrs().to_vec();
    assert_eq!(addrs.len(), 2);
    let dev = lobby.device("two-listeners");
    let plain = handshake(&lobby, &dev, addrs[0], &[b"mqtt"]).await;
    assert!(plain.is_ok(), "TLS at once on the first: {plain:?}");
    let behind = handshake(&lobby, &dev, addrs[1], &[b"mqtt"]).await;
    assert!(behind.is_err(), "the second wants a PROXY header first");
    // Both are one lobby: a device connected on either is served.
    let mut c = connected(&lobby, &dev, Protocol::V5).await;
    c.ping_ok().await;
}

/// The SDK's script, run with python3: its JSON answer.
async fn aws_sdk(args: &[String]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/awssdk/connect.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "the AWS SDK script printed nothing (`pip install awsiotsdk`): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// 8883 and 443 served by one lobby at once: mosquitto_sub waits on one listener while the
/// AWS IoT Device SDK's MQTT 3.1.1 and MQTT 5 clients connect to 443 with their default ALPN.
#[tokio::test]
async fn mosquitto_on_one_listener_and_the_aws_sdk_on_443() {
    let lobby = TestLobby::start_with(|c| {
        c.listener.mqtt = vec![
            MqttListener::at("127.0.0.1:0".parse().unwrap()),
            MqttListener::at("127.0.0.1:443".parse().unwrap()),
        ];
    })
    .await;
    let addrs = lobby.running().mqtt_addrs().to_vec();
    assert_eq!(addrs[1].port(), 443);
    let waiting = lobby.device("mosq-8883");
    let (ca, cert, key) = files(&lobby, &waiting);
    let sub = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &addrs[0].port().to_string()])
        .arg("--cafile")
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["-V", "5", "-q", "1", "-C", "2", "-W", "30", "-t"])
        .arg(waiting.topic("#"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    for (version, name) in [("3", "aws-sdk-v3"), ("5", "aws-sdk-v5")] {
        let dev = lobby.device(name);
        let (ca, cert, key) = files(&lobby, &dev);
        let args: Vec<String> = [
            "localhost".to_owned(),
            "443".to_owned(),
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string(),
            name.to_owned(),
            version.to_owned(),
        ]
        .into();
        let answer = aws_sdk(&args).await;
        assert_eq!(answer["connected"], true, "MQTT {version}: {answer}");
    }
    // mosquitto_sub stayed on the other listener all along: claimed now, it hears of it
    // (its status at subscribe, then the claim), and exits 0 after those two.
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let (st, body) = lobby.claim(&token, &waiting).await;
    assert_eq!(st, 201, "{body}");
    let out = tokio::time::timeout(WAIT, sub.wait_with_output())
        .await
        .expect("mosquitto_sub heard its status and the claim")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains(r#""tenant":"acme""#), "{text}");
}
