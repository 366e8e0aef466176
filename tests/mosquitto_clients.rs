//! SPEC §4 with mosquitto's own clients (`mosquitto_sub`, `mosquitto_pub`), v3.1.1 and v5, over
//! mutual TLS with files on disk: an unclaimed device waits and sees its status, a claim sends
//! it the ready status and the redirect; publishing outside the prefix is refused.
//!
//! Skipped (with a note) only when the binaries are missing outside CI; `.ci/run` installs them
//! and sets `CI`, where a missing binary fails the test.
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::flows;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

const SUB: &str = "/usr/bin/mosquitto_sub";
const PUB: &str = "/usr/bin/mosquitto_pub";

/// The binary at `path` (or on PATH), or `None` to skip outside CI.
fn tool(path: &str) -> Option<PathBuf> {
    let name = Path::new(path).file_name().unwrap();
    let found = if Path::new(path).exists() {
        Some(PathBuf::from(path))
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.exists())
        })
    };
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is required in CI (.ci/run installs mosquitto-clients)",
            name.to_string_lossy()
        );
        eprintln!(
            "note: skipping, {} not installed (apt-get install mosquitto-clients)",
            name.to_string_lossy()
        );
    }
    found
}

/// Writes the device's cert and key next to the lobby's CA; returns (ca, cert, key).
fn write_files(lobby: &TestLobby, dev: &Device) -> (PathBuf, PathBuf, PathBuf) {
    let dir = lobby.dir.path().join(format!("mosq-{}", dev.name));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = dir.join("dev.pem");
    let key = dir.join("dev.key");
    std::fs::write(&cert, &dev.cert_pem).unwrap();
    std::fs::write(&key, &dev.key_pem).unwrap();
    (lobby.certs_dir().join("ca.pem"), cert, key)
}

fn tls_args(lobby: &TestLobby, dev: &Device) -> Vec<String> {
    let (ca, cert, key) = write_files(lobby, dev);
    vec![
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        lobby.mqtt_addr().port().to_string(),
        "--cafile".into(),
        ca.display().to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ]
}

/// One `-v` output line: `topic payload`.
fn split_line(line: &str) -> (&str, Value) {
    let (topic, payload) = line.split_once(' ').expect("`topic payload`");
    let v = serde_json::from_str(payload).unwrap_or_else(|e| panic!("{payload:?}: {e}"));
    (topic, v)
}

async fn sub_sees_claim_and_redirect(version: &str) {
    let Some(sub) = tool(SUB) else { return };
    let lobby = TestLobby::start().await;
    let token = lobby.tenant("acme", "iot.acme.example").await;
    let dev = lobby.device(&format!("mosq-sub-{version}"));
    let mut child = Command::new(sub)
        .args(tls_args(&lobby, &dev))
        .args(["-V", version, "-q", "1", "-v", "-C", "3", "-W", "20"])
        .arg("-t")
        .arg(dev.topic("#"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // Connected, then subscribed: its first message is the unclaimed status.
    eventually(|| async {
        let (st, d) = lobby.device_json(&lobby.admin, &dev).await;
        (st == 200 && d["connected"] == true).then_some(())
    })
    .await;
    let first = timeout(WAIT, lines.next_line())
        .await
        .expect("no status from mosquitto_sub")
        .unwrap()
        .expect("mosquitto_sub ended before the status");
    let (topic, v) = split_line(&first);
    assert_eq!(topic, dev.topic("status"));
    assert_eq!(v, flows::status(&dev, "unclaimed", None));

    let (st, body) = lobby.claim(&token, &dev).await;
    assert_eq!(st, 201, "{body}");

    let mut rest = Vec::new();
    while rest.len() < 2 {
        match timeout(WAIT, lines.next_line())
            .await
            .expect("mosquitto_sub went quiet")
        {
            Ok(Some(l)) => rest.push(l),
            _ => break,
        }
    }
    let status = timeout(WAIT, child.wait())
        .await
        .expect("mosquitto_sub did not exit")
        .unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut err).await;
    }
    assert_eq!(rest.len(), 2, "{version}: got {rest:?}; stderr: {err}");
    let (topic, v) = split_line(&rest[0]);
    assert_eq!(topic, dev.topic("status"));
    assert_eq!(v, flows::status(&dev, "ready", Some("acme")));
    let (topic, v) = split_line(&rest[1]);
    assert_eq!(topic, dev.topic("redirect"));
    assert_eq!(v["v"], 1, "{v}");
    assert_eq!(v["device_id"], dev.hex(), "{v}");
    assert_eq!(v["tenant"], "acme", "{v}");
    assert_eq!(v["endpoint"], "iot.acme.example", "{v}");
    assert_eq!(v["port"], 8883, "{v}");
    assert_eq!(v["region"], "eu-west-1", "{v}");
    assert_eq!(v["thing_name"], dev.name.as_str(), "{v}");
    assert!(
        v["redirect_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{v}"
    );
    assert!(v["issued_at"].is_string(), "{v}");
    assert!(
        status.success(),
        "{version}: mosquitto_sub {status}; stderr: {err}"
    );
}

#[tokio::test]
async fn mosquitto_sub_v311_sees_unclaimed_ready_and_redirect() {
    sub_sees_claim_and_redirect("mqttv311").await;
}

#[tokio::test]
async fn mosquitto_sub_v5_sees_unclaimed_ready_and_redirect() {
    sub_sees_claim_and_redirect("mqttv5").await;
}

async fn run_pub(lobby: &TestLobby, dev: &Device, version: &str, topic: &str) -> (bool, String) {
    let publ = tool(PUB).unwrap();
    let out = timeout(
        WAIT,
        Command::new(publ)
            .args(tls_args(lobby, dev))
            .args(["-V", version, "-q", "1", "-t", topic, "-m", "{}"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_pub hung")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn mosquitto_pub_own_ack_succeeds_forbidden_is_refused() {
    if tool(PUB).is_none() {
        return;
    }
    let lobby = TestLobby::start().await;
    let dev = lobby.device("mosq-pub");
    let other = lobby.device("mosq-victim");
    for version in ["mqttv311", "mqttv5"] {
        let (ok, text) = run_pub(&lobby, &dev, version, &dev.topic("ack")).await;
        assert!(ok, "{version}: publishing to its own …/ack failed: {text}");
    }
    // v5: PUBACK 0x87 (Not authorized), which mosquitto_pub reports.
    let (ok, text) = run_pub(&lobby, &dev, "mqttv5", &other.topic("ack")).await;
    assert!(
        !ok || text.to_lowercase().contains("not authorized"),
        "v5 forbidden publish looked successful: {text}"
    );
    // v3.1.1: the lobby closes the connection, so the QoS 1 publish never completes.
    let (ok, text) = run_pub(&lobby, &dev, "mqttv311", "some/other/topic").await;
    assert!(!ok, "v3.1.1 forbidden publish looked successful: {text}");
}
