//! The PostgreSQL store over TLS (issue 15, item 4) against a server of the test's own that
//! takes TCP connections only over TLS (`hostssl`): the store round trip and two lobby nodes
//! claiming over `verify-full`; a name the certificate does not hold refused by `verify-full`
//! with a clear message and accepted by `verify-ca`; a CA that did not sign the certificate
//! refused; `sslmode=disable` refused by the server (so the others really ran TLS).

mod common;
#[path = "common/pg_tls.rs"]
mod pg_tls;

use common::fleet::two_nodes;
use common::*;
use lobby::mqtt::codec::Protocol;
use lobby::store::{self, Store};
use pg_tls::TlsServer;

/// Opens the store at `url`; the error's text when it cannot.
async fn open(url: &str) -> Result<std::sync::Arc<dyn Store>, String> {
    store::open(url).await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn verify_full_stores_and_reads_back_over_tls() {
    let server = TlsServer::start();
    server.create_db("lobby").await;
    let url = server.verified_url("lobby");
    let store = open(&url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    store.ping().await.unwrap();
    let tenant = lobby::store::StoredTenant {
        tenant: serde_json::from_value(serde_json::json!({"id": "acme", "name": "Acme"})).unwrap(),
        token_hash: "a".repeat(64),
    };
    store.insert_tenant(&tenant).await.unwrap();
    let again = open(&url).await.unwrap();
    assert_eq!(
        again.tenants().await.unwrap().len(),
        1,
        "read back over TLS"
    );
    let ssl: bool = server
        .admin()
        .await
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = 'lobby'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "every connection of the store is TLS");
}

#[tokio::test]
async fn a_name_the_certificate_does_not_hold() {
    let server = TlsServer::start();
    server.create_db("lobby").await;
    let ca = server.ca_file.display().to_string();
    // The certificate names `localhost`, not the address 127.0.0.1.
    let full = server.url(
        "127.0.0.1",
        "lobby",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let err = open(&full)
        .await
        .err()
        .expect("verify-full by a wrong name");
    eprintln!("verify-full by a wrong name: {err}");
    assert!(
        err.contains("not valid for name") && err.contains("127.0.0.1"),
        "a clear message: {err}"
    );
    let ca_only = server.url(
        "127.0.0.1",
        "lobby",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    open(&ca_only)
        .await
        .unwrap_or_else(|e| panic!("verify-ca does not check the name: {e}"));
    let require = server.url("127.0.0.1", "lobby", "sslmode=require");
    open(&require)
        .await
        .unwrap_or_else(|e| panic!("require encrypts without checking: {e}"));
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let server = TlsServer::start();
    let other = TlsServer::start();
    server.create_db("lobby").await;
    let wrong_ca = other.ca_file.display().to_string();
    let url = server.url(
        "localhost",
        "lobby",
        &format!("sslmode=verify-ca&sslrootcert={wrong_ca}"),
    );
    // Both test CAs have the same name: the chain is found and its signature does not hold.
    let err = open(&url).await.err().expect("another CA");
    assert!(err.contains("invalid peer certificate"), "{err}");
    let plain = server.url("localhost", "lobby", "sslmode=disable");
    let err = open(&plain).await.err().expect("a hostssl-only server");
    assert!(err.contains("pg_hba.conf"), "{err}");
}

#[tokio::test]
async fn two_nodes_claim_over_verify_full() {
    let server = TlsServer::start();
    server.create_db("lobby").await;
    let (a, b) = two_nodes(&server.verified_url("lobby")).await;
    let token = a.tenant("acme", "iot.acme.example").await;
    let dev = a.device("tls-fleet-1");
    let mut c = connected(&b, &dev, Protocol::V5).await;
    let (st, body) = a.claim(&token, &dev).await;
    assert_eq!(st, 201, "{body}");
    let d = c.expect_disconnect(0x9D).await;
    assert_eq!(
        d.properties.server_reference.as_deref(),
        Some("iot.acme.example:8883")
    );
    let (st, body) = b.device_json(&token, &dev).await;
    assert_eq!((st, &body["tenant"]), (200, &"acme".into()), "{body}");
}
