//! The handshake budget (`limits.max_handshakes`): how many connections may be in their PROXY
//! header or TLS handshake at once.
//!
//! A handshake that never finishes costs a socket and a connection permit until
//! `limits.handshake_timeout`. When the budget is full, a new connection does not wait or get
//! refused: the *oldest* handshake in progress is closed to make room (counted as
//! `lobby_tls_handshake_failures_total{reason="busy"}`). A device whose handshake takes a few
//! milliseconds is then only closed if `max_handshakes` newer connections arrive within those
//! milliseconds, while sockets that stall are the oldest and go first, so a few addresses
//! holding thousands of silent sockets starve neither established devices (they hold at most
//! `max_handshakes` connection permits) nor new ones. Refusing new connections instead would
//! hand the whole budget to whoever fills it first.
//!
//! A full budget of handshakes that are *finishing* is different: they are progressing (a
//! node's devices reconnecting at once after a restart, each handshake waiting for the CPU),
//! and closing them wastes the work done and makes the storm longer. So the accept loop waits
//! ([`Handshakes::room`]) while the budget is full, handshakes keep finishing (one within
//! [`PROGRESS_WINDOW`], or the oldest is younger than that) and the oldest is younger than
//! [`STALLED_AFTER`]: until one finishes, or the oldest comes of age and the next connection
//! closes it. New connections wait in the listen backlog meanwhile. A budget of stalled sockets
//! finishes nothing, so newcomers close the oldest at once as before; only a flood of stalled
//! sockets mixed with a storm of real handshakes waits up to [`STALLED_AFTER`] per place.
//!
//! The size is read on every registration, so a reload changes it at once.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A handshake this old that has not finished is taken as stalled when the budget is full:
/// longer than a handshake takes on a saturated node (19,000 devices reconnecting at once to 2
/// vCPUs, 2,048 in flight: 0.5–1 s each), well within a device's patience.
pub const STALLED_AFTER: Duration = Duration::from_secs(2);

/// Handshakes count as finishing while one did within this long (or the oldest is younger):
/// long enough for the first of a storm's handshakes to finish (2,048 started at once on 2
/// vCPUs: ~0.3 s), and all a newcomer waits when a burst of stalled sockets fills the budget.
pub const PROGRESS_WINDOW: Duration = Duration::from_secs(1);

/// Handshakes in progress, oldest first.
#[derive(Debug, Default)]
pub struct Handshakes {
    state: Mutex<State>,
    /// A handshake ended and freed its place.
    freed: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Start order. Entries whose token is cancelled are finished or evicted, and are dropped
    /// lazily (from the front, or by compaction), so finishing costs no search.
    queue: VecDeque<(CancellationToken, Instant)>,
    /// Handshakes in progress: the entries of `queue` not cancelled.
    active: usize,
    /// When a handshake last finished ([`HandshakeSlot::finished`]).
    last_finished: Option<Instant>,
}

impl State {
    /// When the oldest handshake in progress started.
    fn oldest(&mut self) -> Option<Instant> {
        while self.queue.front().is_some_and(|(t, _)| t.is_cancelled()) {
            self.queue.pop_front();
        }
        self.queue.front().map(|(_, started)| *started)
    }
}

/// One handshake's place in the budget; dropping it (the handshake ended) frees the place.
#[derive(Debug)]
pub struct HandshakeSlot {
    owner: Arc<Handshakes>,
    token: CancellationToken,
    /// Another connection's handshake closed this one to make room.
    pub evicted: CancellationToken,
}

impl Handshakes {
    /// Waits until a new handshake would not close a young one: a place is free within
    /// `max`, or the oldest in progress has gone [`STALLED_AFTER`] without finishing.
    pub async fn room(&self, max: usize) {
        let max = max.max(1);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let recheck = {
                let mut s = self.state.lock();
                if s.active < max {
                    return;
                }
                let Some(oldest) = s.oldest() else { return };
                // Finishing: one did lately, or the oldest is too young to tell.
                let progress = s.last_finished.unwrap_or(oldest).max(oldest) + PROGRESS_WINDOW;
                let now = Instant::now();
                if now >= progress || now >= oldest + STALLED_AFTER {
                    return;
                }
                progress.min(oldest + STALLED_AFTER)
            };
            tokio::select! {
                () = &mut freed => {}
                () = tokio::time::sleep_until(recheck) => {}
            }
        }
    }

    /// Takes a place for a new handshake within `max` (at least 1), closing the oldest
    /// handshake in progress when all are taken. Returns the slot and how many were evicted.
    pub fn start(self: &Arc<Self>, max: usize) -> (HandshakeSlot, usize) {
        let max = max.max(1);
        let token = CancellationToken::new();
        let mut evicted = 0;
        let mut s = self.state.lock();
        while s.active >= max {
            let Some((oldest, _)) = s.queue.pop_front() else {
                break; // cannot happen: `active` counts entries of `queue`
            };
            if !oldest.is_cancelled() {
                oldest.cancel();
                s.active -= 1;
                evicted += 1;
            }
        }
        s.queue.push_back((token.clone(), Instant::now()));
        s.active += 1;
        // Finished handshakes behind a slow one stay queued until it goes: keep the queue
        // within a small multiple of what is live.
        if s.queue.len() > 2 * s.active + 64 {
            s.queue.retain(|(t, _)| !t.is_cancelled());
        }
        drop(s);
        let slot = HandshakeSlot {
            owner: self.clone(),
            evicted: token.clone(),
            token,
        };
        (slot, evicted)
    }

    /// Handshakes in progress now.
    pub fn active(&self) -> usize {
        self.state.lock().active
    }

    #[cfg(test)]
    fn queued(&self) -> usize {
        self.state.lock().queue.len()
    }
}

impl HandshakeSlot {
    /// The handshake succeeded: frees the place, and counts as progress (see
    /// [`Handshakes::room`]).
    pub fn finished(self) {
        self.owner.state.lock().last_finished = Some(Instant::now());
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut s = self.owner.state.lock();
        // Cancelled already: evicted, and the evicting call counted it out.
        if !self.token.is_cancelled() {
            self.token.cancel();
            s.active -= 1;
            drop(s);
            self.owner.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_budget_closes_the_oldest_handshake() {
        let h = Arc::new(Handshakes::default());
        let (first, e1) = h.start(2);
        let (second, e2) = h.start(2);
        assert_eq!((e1, e2, h.active()), (0, 0, 2));
        let (third, e3) = h.start(2);
        assert_eq!(e3, 1);
        assert!(first.evicted.is_cancelled(), "the oldest goes");
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        assert_eq!(h.active(), 2);
        drop(first); // evicted: already counted out
        assert_eq!(h.active(), 2);
        drop(second);
        assert_eq!(h.active(), 1);
        let (_fourth, e4) = h.start(2);
        assert_eq!(e4, 0, "a finished handshake freed its place");
        drop(third);
        assert_eq!(h.active(), 1);
    }

    #[test]
    fn finished_handshakes_behind_a_stalled_one_do_not_pile_up() {
        let h = Arc::new(Handshakes::default());
        let (stalled, _) = h.start(10);
        for _ in 0..10_000 {
            let (quick, evicted) = h.start(10);
            assert_eq!(evicted, 0);
            drop(quick);
        }
        assert!(h.queued() <= 2 * h.active() + 65, "{} queued", h.queued());
        assert!(!stalled.evicted.is_cancelled());
        assert_eq!(h.active(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_of_young_handshakes_is_waited_for_not_closed() {
        let h = Arc::new(Handshakes::default());
        h.room(2).await; // room: returns at once
        let (first, _) = h.start(2);
        let (_second, _) = h.start(2);
        let waiting = tokio::spawn({
            let h = h.clone();
            async move { h.room(2).await }
        });
        tokio::time::sleep(PROGRESS_WINDOW / 2).await;
        assert!(!waiting.is_finished(), "both are young: wait");
        let (third, _) = h.start(3);
        third.finished(); // progress: the wait goes on past the window
        tokio::time::sleep(PROGRESS_WINDOW * 3 / 4).await;
        assert!(!waiting.is_finished(), "handshakes are finishing: wait");
        first.finished();
        tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .expect("a freed place lets the next one in")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_that_finishes_nothing_makes_room_at_once() {
        let h = Arc::new(Handshakes::default());
        let (oldest, _) = h.start(1);
        let started = Instant::now();
        h.room(1).await;
        assert!(
            started.elapsed() <= PROGRESS_WINDOW,
            "no wait past the window"
        );
        let (_next, evicted) = h.start(1);
        assert_eq!(evicted, 1);
        assert!(oldest.evicted.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_gone_stalled_makes_room_while_others_finish() {
        let h = Arc::new(Handshakes::default());
        let (_stalled, _) = h.start(2);
        let started = Instant::now();
        // Others keep finishing beside it.
        let busy = tokio::spawn({
            let h = h.clone();
            async move {
                loop {
                    let (s, _) = h.start(2);
                    tokio::time::sleep(PROGRESS_WINDOW / 4).await;
                    s.finished();
                }
            }
        });
        tokio::time::sleep(PROGRESS_WINDOW).await;
        h.room(2).await;
        assert!(
            started.elapsed() >= STALLED_AFTER,
            "waited for it to come of age"
        );
        busy.abort();
    }

    #[test]
    fn a_smaller_budget_applies_to_the_next_start() {
        let h = Arc::new(Handshakes::default());
        let slots: Vec<_> = (0..5).map(|_| h.start(5).0).collect();
        let (_new, evicted) = h.start(2); // a reload shrank the budget
        assert_eq!(evicted, 4);
        assert_eq!(slots.iter().filter(|s| s.evicted.is_cancelled()).count(), 4);
        assert_eq!(h.active(), 2);
    }
}
