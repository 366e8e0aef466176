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
//! The size is read on every registration, so a reload changes it at once.

use parking_lot::Mutex;
use std::collections::VecDeque;

use tokio_util::sync::CancellationToken;

/// Handshakes in progress, oldest first.
#[derive(Debug, Default)]
pub struct Handshakes {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Start order. Entries whose token is cancelled are finished or evicted, and are dropped
    /// lazily (from the front, or by compaction), so finishing costs no search.
    queue: VecDeque<CancellationToken>,
    /// Handshakes in progress: the entries of `queue` not cancelled.
    active: usize,
}

/// One handshake's place in the budget; dropping it (the handshake ended) frees the place.
#[derive(Debug)]
pub struct HandshakeSlot<'a> {
    owner: &'a Handshakes,
    token: CancellationToken,
    /// Another connection's handshake closed this one to make room.
    pub evicted: CancellationToken,
}

impl Handshakes {
    /// Takes a place for a new handshake within `max` (at least 1), closing the oldest
    /// handshake in progress when all are taken. Returns the slot and how many were evicted.
    pub fn start(&self, max: usize) -> (HandshakeSlot<'_>, usize) {
        let max = max.max(1);
        let token = CancellationToken::new();
        let mut evicted = 0;
        let mut s = self.state.lock();
        while s.active >= max {
            let Some(oldest) = s.queue.pop_front() else {
                break; // cannot happen: `active` counts entries of `queue`
            };
            if !oldest.is_cancelled() {
                oldest.cancel();
                s.active -= 1;
                evicted += 1;
            }
        }
        s.queue.push_back(token.clone());
        s.active += 1;
        // Finished handshakes behind a slow one stay queued until it goes: keep the queue
        // within a small multiple of what is live.
        if s.queue.len() > 2 * s.active + 64 {
            s.queue.retain(|t| !t.is_cancelled());
        }
        drop(s);
        let slot = HandshakeSlot {
            owner: self,
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

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        let mut s = self.owner.state.lock();
        // Cancelled already: evicted, and the evicting call counted it out.
        if !self.token.is_cancelled() {
            self.token.cancel();
            s.active -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_budget_closes_the_oldest_handshake() {
        let h = Handshakes::default();
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
        let h = Handshakes::default();
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

    #[test]
    fn a_smaller_budget_applies_to_the_next_start() {
        let h = Handshakes::default();
        let slots: Vec<_> = (0..5).map(|_| h.start(5).0).collect();
        let (_new, evicted) = h.start(2); // a reload shrank the budget
        assert_eq!(evicted, 4);
        assert_eq!(slots.iter().filter(|s| s.evicted.is_cancelled()).count(), 4);
        assert_eq!(h.active(), 2);
    }
}
