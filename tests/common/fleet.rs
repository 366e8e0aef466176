//! Two lobby nodes of one fleet in the test process, sharing one store.

use std::path::Path;

use super::TestLobby;

/// Node A on `url` (`store.url`), and node B sharing A's PKI, claim key, admin token and
/// store.
pub async fn two_nodes(url: &str) -> (TestLobby, TestLobby) {
    let a = TestLobby::start_with(|c| {
        c.store.url = url.to_owned();
        c.cluster.node_name = "node-a".into();
    })
    .await;
    let from = a.certs_dir();
    let b = TestLobby::start_with(|c| {
        c.store.url = url.to_owned();
        c.cluster.node_name = "node-b".into();
        // B made its own dev PKI; give it A's, so devices, codes and tokens are the fleet's.
        copy_dir(&from, c.tls.cert.parent().unwrap());
    })
    .await;
    assert_eq!(a.admin, b.admin);
    (a, b)
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}
