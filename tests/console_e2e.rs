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

#[tokio::test]
async fn a_tenant_signs_in_pastes_a_code_and_sees_the_device_ready() {
    let chromium = browser_tools();
    let t = TestLobby::start().await;
    let token = t.tenant("acme", "iot.acme.example").await;
    let dev = t.device("console-1");
    let _waiting = connected(&t, &dev, lobby::mqtt::codec::Protocol::V311).await;
    let shot = t.dir.path().join("console.png");
    let script = console_dir().join("e2e.mjs");
    let node = tokio::task::spawn_blocking({
        let (url, shot, code) = (t.url(""), shot.clone(), dev.code.clone());
        let url = url.trim_end_matches('/').to_owned();
        move || {
            Command::new("node")
                .arg(script)
                .env("LOBBY_URL", url)
                .env("TOKEN", token)
                .env("CODE", code)
                .env("SCREENSHOT", shot)
                .env("CHROMIUM", chromium)
                .output()
                .expect("node (Node.js) must be installed")
        }
    })
    .await
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&node.stdout),
        String::from_utf8_lossy(&node.stderr)
    );
    assert!(node.status.success(), "the browser run failed: {said}");
    // What the page did is what the lobby holds.
    let d = t.admin_device_json(&dev).await.1;
    assert_eq!(
        (d["tenant"].as_str(), d["state"].as_str()),
        (Some("acme"), Some("ready")),
        "{d}"
    );
    // The screenshot shows a page, not a blank.
    let levels = distinct_levels(&shot);
    assert!(
        levels > 8,
        "the screenshot looks blank ({levels} grey levels)"
    );
}
