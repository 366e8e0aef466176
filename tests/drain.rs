//! Drain, not drop (issue 15, item 6): a node that stops answers `/readyz` 503 and takes no
//! new device at once, then tells its devices to leave one after another over
//! `shutdown.drain`, every one of them with DISCONNECT 0x8B, and ends within `shutdown.grace`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use lobby::mqtt::codec::Protocol;

const DEVICES: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_spreads_its_disconnects_over_the_drain() {
    let drain = Duration::from_secs(4);
    let grace = Duration::from_secs(20);
    let mut lobby = TestLobby::start_with(|c| {
        c.shutdown.drain = drain;
        c.shutdown.grace = grace;
    })
    .await;
    let devices: Vec<Device> = (0..DEVICES)
        .map(|i| lobby.device(&format!("drain-{i}")))
        .collect();
    let clients: Vec<RawClient> = futures_util::stream::iter(devices.iter())
        .map(|dev| connected(&lobby, dev, Protocol::V5))
        .buffer_unordered(64)
        .collect()
        .await;
    assert_eq!(clients.len(), DEVICES);

    let started = Instant::now();
    let told: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                c.expect_disconnect(0x8B).await;
                started.elapsed()
            })
        })
        .collect();
    let (api, mqtt) = (lobby.url("/readyz"), lobby.mqtt_addr());
    let node = lobby.lobby.take().expect("running");
    let stop = tokio::spawn(async move {
        node.stop().await;
        started.elapsed()
    });

    // At once: not ready, and no new device taken.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = lobby.http.get(&api).send().await.unwrap().status();
    assert_eq!(ready, 503, "/readyz while draining");
    let late = tokio::net::TcpStream::connect(mqtt).await;
    assert!(late.is_err(), "the listener is closed while draining");

    let mut at = Vec::with_capacity(DEVICES);
    for t in told {
        at.push(t.await.expect("every device is told: DISCONNECT 0x8B"));
    }
    let stopped_after = stop.await.unwrap();
    at.sort();
    let (first, last) = (at[0], at[DEVICES - 1]);
    eprintln!(
        "{DEVICES} devices told over {:?} (first {first:?}, last {last:?}); stop took {stopped_after:?}",
        last - first
    );
    assert!(
        first < Duration::from_secs(1),
        "the drain starts at once: {first:?}"
    );
    assert!(
        last >= drain.mul_f64(0.8),
        "spread over the drain window, not all at once: last at {last:?}"
    );
    // No tenth of the window takes much more than its share.
    let tenth = drain / 10;
    for k in 0..10 {
        let (from, to) = (tenth * k, tenth * (k + 1));
        let n = at.iter().filter(|t| **t >= from && **t < to).count();
        assert!(
            n <= DEVICES / 10 * 2,
            "{n} of {DEVICES} devices told between {from:?} and {to:?}"
        );
    }
    assert!(
        stopped_after < grace,
        "stopped within the grace: {stopped_after:?}"
    );
}
