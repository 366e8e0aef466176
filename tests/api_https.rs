//! The API and console over HTTPS (issue 15, item 3): `api.tls_cert`/`api.tls_key` with the dev
//! PKI's API certificate, reloaded like `[tls]`; the security headers a console needs on every
//! answer; the console's script not inline.

mod common;

use std::sync::Arc;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn https_lobby() -> TestLobby {
    TestLobby::start_with(|c| {
        c.api.tls_cert = c.tls.cert.with_file_name("api.pem");
        c.api.tls_key = c.tls.cert.with_file_name("api.key");
    })
    .await
}

/// The certificate the API presents to a new connection.
async fn presented(t: &TestLobby) -> CertificateDer<'static> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(lobby::pem::certs(&t.certs_dir().join("ca.pem")).unwrap());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(t.running().api_addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

#[tokio::test]
async fn the_api_serves_https_with_the_dev_certificate() {
    let t = https_lobby().await;
    assert!(t.url("/readyz").starts_with("https://localhost:"));
    let ready = t.http.get(t.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // The whole API works over it: a tenant made and read back.
    let token = t.tenant("acme", "iot.acme.example").await;
    assert!(!token.is_empty());
    // Plain HTTP to the HTTPS port gets no answer.
    let mut tcp = TcpStream::connect(t.running().api_addr()).await.unwrap();
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("200 OK"),
        "plain HTTP is not served on the HTTPS port"
    );
}

#[tokio::test]
async fn a_reload_swaps_the_api_certificate_and_keeps_the_scheme() {
    let t = https_lobby().await;
    let before = presented(&t).await;
    // A new API certificate from the same CA, in new files.
    let pair = t.ca.issue_server().unwrap();
    let dir = t.dir.path().join("api-next");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("api.pem"), &pair.cert_pem).unwrap();
    std::fs::write(dir.join("api.key"), &pair.key_pem).unwrap();
    let mut next = t.config.clone();
    next.api.tls_cert = dir.join("api.pem");
    next.api.tls_key = dir.join("api.key");
    t.running().reload(&next).unwrap();
    let after = presented(&t).await;
    assert_ne!(
        before, after,
        "new connections get the reloaded certificate"
    );
    assert_eq!(
        t.http.get(t.url("/readyz")).send().await.unwrap().status(),
        200
    );

    let mut plain = t.config.clone();
    plain.api.tls_cert = Default::default();
    plain.api.tls_key = Default::default();
    let err = t.running().reload(&plain).unwrap_err().to_string();
    assert!(err.contains("needs a restart"), "{err}");
    let mut missing = next.clone();
    missing.api.tls_key = dir.join("nope.key");
    let err = t.running().reload(&missing).unwrap_err().to_string();
    assert!(err.contains("nope.key"), "{err}");
    assert_eq!(
        presented(&t).await,
        after,
        "a failed reload changes nothing"
    );
}

/// Every answer carries what a console needs: a CSP without inline script, no sniffing,
/// never framed; and the console page itself holds no inline script.
#[tokio::test]
async fn the_console_is_served_with_its_security_headers() {
    let t = TestLobby::start().await;
    for path in ["/console/", "/console/console.js", "/v1/devices", "/readyz"] {
        let res = t.http.get(t.url(path)).send().await.unwrap();
        let h = res.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        let script = csp
            .split(';')
            .find(|d| d.trim().starts_with("script-src"))
            .unwrap_or_else(|| panic!("{path}: no script-src in {csp}"));
        assert!(!script.contains("unsafe-inline"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
    }
    let page = t
        .http
        .get(t.url("/console/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for tag in page.match_indices("<script").map(|(i, _)| &page[i..]) {
        let open = &tag[..tag.find('>').unwrap()];
        assert!(open.contains("src="), "an inline script: {open}");
    }
}
