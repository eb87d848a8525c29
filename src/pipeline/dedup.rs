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
/// (an entry is a few dozen bytes: two 64-bit hashes and an instant, twice).
const MAX_IDS: usize = 100_000;

/// A remembered message: hashes of its id and of its body. Both must match, so a false
/// match needs two 64-bit collisions under a per-process random key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    body: u64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Recent {
    by_id: HashMap<u64, Entry>,
    /// Insertion order, for expiry and the count bound.
    order: VecDeque<(Instant, u64)>,
}

#[derive(Debug)]
pub struct Dedup {
    window: Duration,
    hasher: RandomState,
    inner: Mutex<Recent>,
}

impl Dedup {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            hasher: RandomState::new(),
            inner: Mutex::new(Recent::default()),
        }
    }

    fn keys(&self, id: &str, body: &[u8]) -> Option<(u64, u64)> {
        if self.window.is_zero() || id.is_empty() {
            return None;
        }
        Some((self.hasher.hash_one(id), self.hasher.hash_one(body)))
    }

    /// True when this pod delivered a message with this id and this body within the window.
    pub fn seen(&self, id: &str, body: &[u8]) -> bool {
        let Some((id, body)) = self.keys(id, body) else {
            return false;
        };
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::expire(&mut inner, self.window);
        inner.by_id.get(&id).is_some_and(|e| e.body == body)
    }

    pub fn remember(&self, id: &str, body: &[u8]) {
        let Some((id, body)) = self.keys(id, body) else {
            return;
        };
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::expire(&mut inner, self.window);
        let at = Instant::now();
        inner.by_id.insert(id, Entry { body, at });
        inner.order.push_back((at, id));
        while inner.order.len() > MAX_IDS {
            if let Some((at, old)) = inner.order.pop_front() {
                Self::forget(&mut inner, old, at);
            }
        }
    }

    fn expire(inner: &mut Recent, window: Duration) {
        let now = Instant::now();
        while let Some(&(at, id)) = inner.order.front() {
            if now.duration_since(at) < window {
                break;
            }
            inner.order.pop_front();
            Self::forget(inner, id, at);
        }
    }

    /// Forgets `id` unless it was remembered again since `at`.
    fn forget(inner: &mut Recent, id: u64, at: Instant) {
        if inner.by_id.get(&id).is_some_and(|e| e.at == at) {
            inner.by_id.remove(&id);
        }
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
}
