//! The claim console (issue 8) end to end in a real browser: Debian's chromium, headless,
//! driven by Playwright (`tests/console/e2e.mjs`, `playwright-core` from npm; it never
//! downloads a browser). `.ci/run` installs both; without them this test fails and says
//! what is missing rather than passing.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console")
}

/// The base64 SHA-256 of the certificate's SubjectPublicKeyInfo (chromium's
/// `--ignore-certificate-errors-spki-list`).
fn spki_sha256(cert: &Path) -> String {
    use sha2::Digest;
    let der = lobby::pem::certs(cert).unwrap().remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
    let hash = sha2::Sha256::digest(parsed.tbs_certificate.subject_pki.raw);
    data_encoding::BASE64.encode(&hash)
}

/// Chromium and the npm packages, or a panic naming what to install.
fn browser_tools() -> PathBuf {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no chromium at {chromium}: `apt-get install chromium` (or set CHROMIUM)"
    );
    assert!(
        console_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: `npm ci --prefix tests/console`"
    );
    PathBuf::from(chromium)
}

/// Distinct grey levels among the screenshot's pixels (sampled): a blank page has one or two.
fn distinct_levels(png_path: &Path) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bytes = &buf[..info.buffer_size()];
    let mut levels = std::collections::BTreeSet::new();
    for px in bytes.chunks(info.color_type.samples()).step_by(7) {
        let grey = px.iter().take(3).map(|&b| u32::from(b)).sum::<u32>() / 3;
        levels.insert(grey);
    }
    levels.len()
}

/// `lobby claim-code --png`: the label a factory prints for `dev`, as the CLI draws it.
fn label_png(t: &TestLobby, dev: &Device) -> PathBuf {
    let dir = t.dir.path();
    let (cert, config, png) = (
        dir.join("label.pem"),
        dir.join("label.toml"),
        dir.join("label.png"),
    );
    std::fs::write(&cert, &dev.cert_pem).unwrap();
    std::fs::write(
        &config,
        format!(
            "[claims]\ncode_key = {:?}\n",
            t.certs_dir().join("claim.key")
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lobby"))
        .args(["claim-code", "--cert"])
        .arg(&cert)
        .arg("--config")
        .arg(&config)
        .arg("--png")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI prints the code it drew: the same one the lobby's key makes.
    assert!(String::from_utf8_lossy(&out.stdout).contains(&dev.code));
    png
}

#[tokio::test]
async fn a_person_claims_reads_a_label_filters_unclaims_and_the_operator_sees_the_lobby() {
    let chromium = browser_tools();
    // Over HTTPS with the dev PKI's API certificate: a phone's camera needs a secure origin.
    let t = TestLobby::start_with(|c| {
        c.api.tls_cert = c.tls.cert.with_file_name("api.pem");
        c.api.tls_key = c.tls.cert.with_file_name("api.key");
    })
    .await;
    assert!(t.url("").starts_with("https://"));
    let spki = spki_sha256(&t.certs_dir().join("api.pem"));
    let token = t.tenant("acme", "iot.acme.example").await;
    let (one, two, waiting) = (
        t.device("typed"),
        t.device("photographed"),
        t.device("waiting"),
    );
    let _waiting = connected(&t, &waiting, lobby::mqtt::codec::Protocol::V311).await;
    let png = label_png(&t, &two);
    let shot = t.dir.path().join("console.png");
    let script = console_dir().join("e2e.mjs");
    let envs = [
        ("LOBBY_URL", t.url("")),
        ("TOKEN", token),
        ("ADMIN", t.admin.clone()),
        ("CODE", one.code.clone()),
        ("QR_PNG", png.display().to_string()),
        ("ONE", one.hex()),
        ("TWO", two.hex()),
        ("WAITING", waiting.hex()),
        ("SCREENSHOT", shot.display().to_string()),
        ("CHROMIUM", chromium.display().to_string()),
        ("SPKI", spki),
    ];
    let node = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .envs(envs)
            .output()
            .expect("node (Node.js) must be installed")
    })
    .await
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&node.stdout),
        String::from_utf8_lossy(&node.stderr)
    );
    assert!(node.status.success(), "the browser run failed: {said}");
    // What the page did is what the lobby holds: the typed device was claimed and then
    // unclaimed, the photographed one is claimed and ready.
    let first = t.admin_device_json(&one).await.1;
    assert!(first["tenant"].is_null(), "{first}");
    let second = t.admin_device_json(&two).await.1;
    assert_eq!(
        (second["tenant"].as_str(), second["state"].as_str()),
        (Some("acme"), Some("ready")),
        "{second}"
    );
    // The operator's new tenant, edited in the page.
    let (_, beta) = t.call("GET", "/v1/tenants/beta", &t.admin, None).await;
    assert_eq!(beta["endpoint"], "iot2.beta.example", "{beta}");
    assert_eq!(beta["name"], "Beta Corp", "{beta}");
    // The screenshot shows a page, not a blank (`CONSOLE_SCREENSHOT=path` keeps a copy).
    if let Ok(keep) = std::env::var("CONSOLE_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    let levels = distinct_levels(&shot);
    assert!(
        levels > 8,
        "the screenshot looks blank ({levels} grey levels)"
    );
}
