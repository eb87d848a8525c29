//! Recently delivered messages, so a redelivery to this pod (after a lost channel ate our
//! ack) is acked without posting the event twice. An entry is the message id *and* a
//! hash of the body: a publisher reusing an id for a different message (`"order-events"`,
//! `""`) must not lose that message, so only a true copy is suppressed, and an empty id
//! never counts.

use foldhash::quality::RandomState;
use hashbrown::HashTable;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Upper bound on remembered messages, whatever the window: memory stays bounded. An
/// entry is 16 bytes in the ring plus about 5 in the index (4-byte position, control
/// byte, load factor): about 2.2 MB when full (the window at its cap).
const MAX_IDS: usize = 100_000;

/// A remembered message: both hashes must match, so a false match needs a 64-bit and a
/// 32-bit collision under a per-process random key.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Hash of the message id; also the index's hash for this slot.
    id: u64,
    /// Hash of the body (truncated).
    body: u32,
    /// When it was remembered, in whole seconds since the window started.
    at: u32,
}

/// Remembered messages in insertion order (a ring of at most `MAX_IDS` slots, oldest at
/// `start`), and an index from id hash to the newest slot for that id. A slot the index
/// does not point at (its id was remembered again since) is dead and only waits for
/// its turn to expire.
#[derive(Debug)]
struct Recent {
    /// `MAX_IDS`, smaller in tests.
    cap: usize,
    ring: Vec<Slot>,
    start: usize,
    len: usize,
    index: HashTable<u32>,
}

impl Recent {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            ring: Vec::new(),
            start: 0,
            len: 0,
            index: HashTable::new(),
        }
    }

    fn newest(&self, id: u64) -> Option<&Slot> {
        let ring = &self.ring;
        self.index
            .find(id, |&pos| ring[pos as usize].id == id)
            .map(|&pos| &ring[pos as usize])
    }

    /// Drops the oldest slot, and its index entry when the index still points at it.
    fn pop_oldest(&mut self) {
        let pos = self.start;
        let id = self.ring[pos].id;
        if let Ok(entry) = self.index.find_entry(id, |&p| p as usize == pos) {
            entry.remove();
        }
        self.start = (pos + 1) % self.cap;
        self.len -= 1;
    }

    fn push(&mut self, slot: Slot) {
        if self.len == self.cap {
            self.pop_oldest();
        }
        if self.ring.capacity() == 0 {
            // Allocated once, at the cap: pages become resident only as slots are written,
            // and the ring never moves (no copy while it grows).
            self.ring.reserve_exact(self.cap);
            self.index.reserve(self.cap, |_| 0);
        }
        let pos = (self.start + self.len) % self.cap;
        // Before the first wrap the ring grows at its end; after it, slots are reused.
        if pos == self.ring.len() {
            self.ring.push(slot);
        } else {
            self.ring[pos] = slot;
        }
        self.len += 1;
        let ring = &self.ring;
        match self.index.entry(
            slot.id,
            |&p| ring[p as usize].id == slot.id,
            |&p| ring[p as usize].id,
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = pos as u32,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(pos as u32);
            }
        }
    }
}

#[derive(Debug)]
pub struct Dedup {
    /// The window rounded up to whole seconds: an entry may live up to a second longer,
    /// which only suppresses a true copy a little later.
    window_s: u32,
    enabled: bool,
    started: Instant,
    /// foldhash (quality), seeded per process: hashing every id and body with SipHash
    /// was a visible share of the CPU per message.
    hasher: RandomState,
    inner: Mutex<Recent>,
}

impl Dedup {
    pub fn new(window: Duration) -> Self {
        Self::with_cap(window, MAX_IDS)
    }

    fn with_cap(window: Duration, cap: usize) -> Self {
        let secs = window.as_secs() + u64::from(window.subsec_nanos() > 0);
        Self {
            window_s: u32::try_from(secs).unwrap_or(u32::MAX),
            enabled: !window.is_zero(),
            started: Instant::now(),
            hasher: RandomState::default(),
            inner: Mutex::new(Recent::new(cap)),
        }
    }

    fn keys(&self, id: &str, body: &[u8]) -> Option<(u64, u32)> {
        if !self.enabled || id.is_empty() {
            return None;
        }
        // Truncation intended: 32 bits of the body hash are kept.
        Some((self.hasher.hash_one(id), self.hasher.hash_one(body) as u32))
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
        inner.newest(id).is_some_and(|slot| slot.body == body)
    }

    pub fn remember(&self, id: &str, body: &[u8]) {
        let Some((id, body)) = self.keys(id, body) else {
            return;
        };
        let now = self.now_s();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut inner, now);
        inner.push(Slot { id, body, at: now });
    }

    fn expire(&self, inner: &mut Recent, now: u32) {
        while inner.len > 0 && now.saturating_sub(inner.ring[inner.start].at) > self.window_s {
            inner.pop_oldest();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .index
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

    /// Against a plain model (every remembering with its time, newest per id wins), on a
    /// small ring so it wraps many times: reused ids, expiry and the count bound together.
    #[tokio::test(start_paused = true)]
    async fn agrees_with_a_plain_model() {
        const CAP: usize = 7;
        let d = Dedup::with_cap(Duration::from_secs(5), CAP);
        let mut model: Vec<(u64, u8, u64)> = Vec::new(); // (id, body, at), oldest first
        let mut now = 0u64;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (id, body) = (x % 11, (x >> 8) as u8 % 3);
            match (x >> 16) % 4 {
                0 => {
                    tokio::time::advance(Duration::from_secs(1)).await;
                    now += 1;
                }
                1 => {
                    d.remember(&id.to_string(), &[body]);
                    model.push((id, body, now));
                    if model.len() > CAP {
                        model.remove(0);
                    }
                }
                _ => {
                    model.retain(|&(_, _, at)| now - at <= 5);
                    let expected = model
                        .iter()
                        .rev()
                        .find(|m| m.0 == id)
                        .is_some_and(|m| m.1 == body);
                    assert_eq!(
                        d.seen(&id.to_string(), &[body]),
                        expected,
                        "id {id} body {body} at {now}"
                    );
                }
            }
        }
    }
}
