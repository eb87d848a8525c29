//! Recently delivered `message_id`s, so a redelivery to this pod (after a lost channel
//! ate our ack) is acked without posting the event twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Upper bound on remembered ids, whatever the window: memory stays bounded.
const MAX_IDS: usize = 100_000;

#[derive(Debug, Default)]
struct Recent {
    at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

#[derive(Debug)]
pub struct Dedup {
    window: Duration,
    inner: Mutex<Recent>,
}

impl Dedup {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            inner: Mutex::new(Recent::default()),
        }
    }

    pub fn seen(&self, id: &str) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::expire(&mut inner, self.window);
        inner.at.contains_key(id)
    }

    pub fn remember(&self, id: &str) {
        if self.window.is_zero() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::expire(&mut inner, self.window);
        let now = Instant::now();
        inner.at.insert(id.to_owned(), now);
        inner.order.push_back((now, id.to_owned()));
        while inner.order.len() > MAX_IDS {
            if let Some((_, old)) = inner.order.pop_front() {
                inner.at.remove(&old);
            }
        }
    }

    fn expire(inner: &mut Recent, window: Duration) {
        let now = Instant::now();
        while let Some((at, _)) = inner.order.front() {
            if now.duration_since(*at) < window {
                break;
            }
            if let Some((at, id)) = inner.order.pop_front() {
                // Only forget the id if it was not remembered again since.
                if inner.at.get(&id) == Some(&at) {
                    inner.at.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn remembers_for_the_window_only() {
        let d = Dedup::new(Duration::from_secs(10));
        assert!(!d.seen("a"));
        d.remember("a");
        assert!(d.seen("a"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!d.seen("a"));
        assert!(!Dedup::new(Duration::ZERO).seen("a"));
    }
}
