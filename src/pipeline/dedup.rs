//! Recently delivered messages, so a redelivery to this pod (after a lost channel ate our
//! ack) is acked without posting the event twice. An entry is the message id *and* a
//! hash of the body: a publisher reusing an id for a different message (`"order-events"`,
//! `""`) must not lose that message, so only a true copy is suppressed, and an empty id
//! never counts.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Upper bound on remembered messages, whatever the window: memory stays bounded
/// (an entry is 40 bytes: 24 in the map, 16 in the expiry order; about 5.5 MB when full).
const MAX_IDS: usize = 100_000;

/// A remembered message: the hash of its body (the map's key is the hash of its id) and
/// the number of the remembering, so an old expiry slot does not forget a newer one.
/// Both hashes must match, so a false match needs two 64-bit collisions under a
/// per-process random key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    body: u64,
    seq: u32,
}

/// When an id was remembered, in whole seconds since the window started (16 bytes
/// instead of the 24 an `Instant` would make: this is most of the window's memory).
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: u32,
    seq: u32,
    id: u64,
}

#[derive(Debug, Default)]
struct Recent {
    by_id: HashMap<u64, Entry>,
    /// Insertion order, for expiry and the count bound.
    order: VecDeque<Slot>,
    /// Numbers rememberings; wrapping is harmless: at most `MAX_IDS` slots are alive.
    seq: u32,
}

#[derive(Debug)]
pub struct Dedup {
    /// The window rounded up to whole seconds: an entry may live up to a second longer,
    /// which only suppresses a true copy a little later.
    window_s: u32,
    enabled: bool,
    started: Instant,
    hasher: RandomState,
    inner: Mutex<Recent>,
}

impl Dedup {
    pub fn new(window: Duration) -> Self {
        let secs = window.as_secs() + u64::from(window.subsec_nanos() > 0);
        Self {
            window_s: u32::try_from(secs).unwrap_or(u32::MAX),
            enabled: !window.is_zero(),
            started: Instant::now(),
            hasher: RandomState::new(),
            inner: Mutex::new(Recent::default()),
        }
    }

    fn keys(&self, id: &str, body: &[u8]) -> Option<(u64, u64)> {
        if !self.enabled || id.is_empty() {
            return None;
        }
        Some((self.hasher.hash_one(id), self.hasher.hash_one(body)))
    }

    /// Seconds since the window started (saturating: 136 years).
    fn now_s(&self) -> u32 {
        u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// True when this pod delivered a message with this id and this body within the window.
    pub fn seen(&self, id: &str, body: &[u8]) -> bool {
        let Some((id, body)) = self.keys(id, body) else {
            return false;
        };
        let now = self.now_s();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut inner, now);
        inner.by_id.get(&id).is_some_and(|e| e.body == body)
    }

    pub fn remember(&self, id: &str, body: &[u8]) {
        let Some((id, body)) = self.keys(id, body) else {
            return;
        };
        let now = self.now_s();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut inner, now);
        let seq = inner.seq.wrapping_add(1);
        inner.seq = seq;
        inner.by_id.insert(id, Entry { body, seq });
        inner.order.push_back(Slot { at: now, seq, id });
        while inner.order.len() > MAX_IDS {
            if let Some(slot) = inner.order.pop_front() {
                Self::forget(&mut inner, slot);
            }
        }
    }

    fn expire(&self, inner: &mut Recent, now: u32) {
        while let Some(&slot) = inner.order.front() {
            if now.saturating_sub(slot.at) <= self.window_s {
                break;
            }
            inner.order.pop_front();
            Self::forget(inner, slot);
        }
    }

    /// Forgets the slot's id unless it was remembered again since.
    fn forget(inner: &mut Recent, slot: Slot) {
        if inner.by_id.get(&slot.id).is_some_and(|e| e.seq == slot.seq) {
            inner.by_id.remove(&slot.id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn remembers_for_the_window_only() {
        let d = Dedup::new(Duration::from_secs(10));
        assert!(!d.seen("a", b"x"));
        d.remember("a", b"x");
        assert!(d.seen("a", b"x"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!d.seen("a", b"x"));
        assert!(!Dedup::new(Duration::ZERO).seen("a", b"x"));
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_true_copy_counts() {
        let d = Dedup::new(Duration::from_secs(10));
        d.remember("order-events", br#"{"id":1}"#);
        assert!(d.seen("order-events", br#"{"id":1}"#));
        assert!(
            !d.seen("order-events", br#"{"id":2}"#),
            "a reused id with another body is another message"
        );
        d.remember("", b"x");
        assert!(!d.seen("", b"x"), "an empty id never counts");
        // The latest body under a reused id is the one remembered.
        d.remember("order-events", br#"{"id":2}"#);
        assert!(d.seen("order-events", br#"{"id":2}"#));
        assert!(!d.seen("order-events", br#"{"id":1}"#));
    }

    #[tokio::test(start_paused = true)]
    async fn re_remembering_survives_the_first_entrys_expiry() {
        let d = Dedup::new(Duration::from_secs(10));
        d.remember("a", b"x");
        tokio::time::advance(Duration::from_secs(6)).await;
        d.remember("a", b"x");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(d.seen("a", b"x"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_is_bounded() {
        let d = Dedup::new(Duration::from_secs(600));
        for i in 0..MAX_IDS + 10 {
            d.remember(&i.to_string(), b"x");
        }
        assert_eq!(d.len(), MAX_IDS);
        assert!(!d.seen("0", b"x"), "the oldest went first");
        assert!(d.seen(&(MAX_IDS + 9).to_string(), b"x"));
    }
}
