//! The floor for the lobby's connect cost: a bare tokio-rustls server with the same TLS setup
//! (aws-lc-rs, client certificate required and verified against the CA, no resumption) that
//! reads one MQTT CONNECT, answers CONNACK 0 and then holds the connection until the client
//! leaves. No claims, no sessions, no metrics.
//!
//!   cargo run --release --example bare_tls -- ADDR SERVER.pem SERVER.key CA.pem
//!
//! `loadtest/compare.sh` runs it beside the lobby and mosquitto (server CPU per connect and RSS
//! per held connection, same harness, same run). It takes the suite the client prefers, as
//! rustls does by default; with `BARE_SUITES=lobby` it uses the lobby's order instead
//! (`lobby::edge::tls::device_provider`: the SHA-256 suites first), to compare at one suite.

use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::BytesMut;
use lobby::mqtt::codec::{self, Packet, Protocol};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, cert, key, ca] = args.as_slice() else {
        anyhow::bail!("usage: bare_tls ADDR SERVER.pem SERVER.key CA.pem");
    };
    let lobby_order = std::env::var("BARE_SUITES").is_ok_and(|v| v == "lobby");
    let provider = Arc::new(match lobby_order {
        true => lobby::edge::tls::device_provider(),
        false => rustls::crypto::aws_lc_rs::default_provider(),
    });
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).context("CA")? {
        roots.add(c?)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(key)?)?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.ignore_client_order = lobby_order;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr.as_str()).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = BytesMut::with_capacity(256);
                let protocol = loop {
                    match codec::decode(&mut buf, None, 4096) {
                        Ok(Some(Packet::Connect(c))) => break c.protocol,
                        Ok(None) => {}
                        _ => return,
                    }
                    if !matches!(tls.read_buf(&mut buf).await, Ok(n) if n > 0) {
                        return;
                    }
                };
                let connack = match protocol {
                    Protocol::V311 => &[0x20, 0x02, 0x00, 0x00][..],
                    Protocol::V5 => &[0x20, 0x03, 0x00, 0x00, 0x00][..],
                };
                if tls.write_all(connack).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                // Hold until the client leaves or sends DISCONNECT (answering nothing else: the
                // floor, not a broker).
                let mut sink = [0u8; 64];
                while let Ok(n) = tls.read(&mut sink).await {
                    if n == 0 || sink[0] == 0xE0 {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    })
}
