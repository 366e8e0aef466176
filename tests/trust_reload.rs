//! SPEC §2: trust changes apply without a restart and to live connections. A CA removed from
//! `tls.client_cas` is no longer trusted after a reload, and its devices are disconnected;
//! devices of the remaining CAs stay.
mod common;

use common::*;
use lobby::mqtt::codec::Protocol;
use lobby::pki;

#[tokio::test]
async fn removing_a_ca_disconnects_its_devices_and_keeps_the_others() {
    let factory_b = pki::throwaway_ca("Factory B CA").unwrap();
    let ca_b_path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_b_path.path(), factory_b.cert_pem()).unwrap();
    let ca_b = ca_b_path.path().to_owned();
    let t = TestLobby::start_with(|c| c.tls.client_cas.push(ca_b.clone())).await;

    let from_a = t.device("from-a");
    let issued = factory_b.issue_device("from-b").unwrap();
    let from_b = t.device_from("from-b", issued.cert_der, issued.cert_pem, issued.key_pem);
    let mut a = connected(&t, &from_a, Protocol::V5).await;
    let mut b = connected(&t, &from_b, Protocol::V5).await;

    // Factory B's CA leaves the configuration; a reload (what SIGHUP does) applies it.
    let mut config = t.config.clone();
    config.tls.client_cas.retain(|p| p != &ca_b);
    t.lobby.as_ref().unwrap().reload_tls(&config).unwrap();

    b.expect_disconnect(0x87).await;
    a.ping_ok().await;
    // And B's devices no longer get in at all.
    assert!(
        tls_connect(&t, &from_b).await.is_err() || {
            let mut again = RawClient::connect(&t, &from_b, Protocol::V5).await;
            again.try_send_connect("from-b").await.is_err() || again.recv().await.is_none()
        }
    );
    let _ = connected(&t, &t.device("from-a-2"), Protocol::V311).await;
}

#[tokio::test]
async fn a_bad_reload_keeps_the_running_trust() {
    let t = TestLobby::start().await;
    let dev = t.device("steady");
    let mut c = connected(&t, &dev, Protocol::V311).await;
    let mut config = t.config.clone();
    config.tls.client_cas = vec!["/nonexistent/ca.pem".into()];
    let err = t.lobby.as_ref().unwrap().reload_tls(&config).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    c.ping_ok().await;
    let _ = connected(&t, &t.device("steady-2"), Protocol::V5).await;
}

#[tokio::test]
async fn a_new_crl_disconnects_the_device_it_revokes() {
    let crls = tempfile::tempdir().unwrap();
    let crl_dir = crls.path().to_owned();
    let t = TestLobby::start_with(|c| c.tls.crl_dir = crl_dir.clone()).await;
    let revoked = t.ca.issue_device("on-the-crl").unwrap();
    let der = revoked.cert_der.clone();
    let gone = t.device_from(
        "on-the-crl",
        revoked.cert_der,
        revoked.cert_pem,
        revoked.key_pem,
    );
    let kept = t.device("not-on-the-crl");
    let mut g = connected(&t, &gone, Protocol::V5).await;
    let mut k = connected(&t, &kept, Protocol::V5).await;

    std::fs::write(
        crl_dir.join("factory.crl.pem"),
        t.ca.crl_pem(&[&der]).unwrap(),
    )
    .unwrap();
    t.lobby.as_ref().unwrap().reload_tls(&t.config).unwrap();

    g.expect_disconnect(0x87).await;
    k.ping_ok().await;
    // Refused: the handshake fails, or (TLS 1.3) the connection closes before CONNACK.
    let refused = tls_connect(&t, &gone).await.is_err() || {
        let mut again = RawClient::connect(&t, &gone, Protocol::V5).await;
        again.try_send_connect("again").await.is_err() || again.recv().await.is_none()
    };
    assert!(refused, "a device on the CRL got back in");
}
