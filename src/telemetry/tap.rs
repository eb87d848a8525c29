//! The live tap (`GET /tap`, `crisp-bridge tap`): one JSON line per message decision,
//! handed to whoever is listening. Nothing here may slow a delivery: each subscriber has
//! a bounded buffer ([`BUFFER_LINES`]), a line it cannot take is dropped and counted
//! (`crisp_bridge_tap_dropped_total`), and with no subscriber a decision costs one
//! atomic load ([`Tap::active`]).

use super::metrics;
use axum::body::Bytes;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Lines one subscriber may have waiting; beyond, its lines are dropped (and counted).
pub const BUFFER_LINES: usize = 1024;

/// Most subscribers at once; one more is refused (503).
pub const MAX_SUBSCRIBERS: usize = 8;

/// Longest filter value, and most values per filter, a subscriber may give.
pub const MAX_FILTER_VALUES: usize = 64;
pub const MAX_FILTER_LEN: usize = 256;

/// The outcomes a filter may name (the `outcome` label of `crisp_bridge_messages_total`).
pub const OUTCOMES: [&str; 4] = ["delivered", "skipped", "dead_lettered", "requeued"];

/// One message's decision, as the tap shows it: never a body or a data value.
#[derive(Debug, Serialize)]
pub struct Decision<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The rule that applied, or `none`.
    pub rule: &'a str,
    pub outcome: &'static str,
    /// The reason code (dead letters' `x-crisp-bridge-reason`, or why it was skipped or
    /// requeued); `null` when delivered.
    pub reason: Option<&'static str>,
    /// Masked (`j***@example.com`); `null` when no rule produced one.
    pub people_id: Option<String>,
    /// Crisp's last answer for this message; `null` when no request was made or no
    /// answer came.
    pub crisp_status: Option<u16>,
    /// From the delivery's arrival at the pod to its settlement.
    pub latency_ms: f64,
}

impl<'a> Decision<'a> {
    pub fn new(
        rule: &'a str,
        outcome: &'static str,
        reason: Option<&'static str>,
        people_id: Option<String>,
        crisp_status: Option<u16>,
        latency: Duration,
    ) -> Self {
        Decision {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            rule,
            outcome,
            reason,
            people_id,
            crisp_status,
            // Microseconds are enough, and keep the line short.
            latency_ms: (latency.as_secs_f64() * 1e6).round() / 1e3,
        }
    }
}

/// What one subscriber wants: empty lists take everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub rules: Vec<String>,
    pub outcomes: Vec<String>,
}

impl Filter {
    fn takes(&self, rule: &str, outcome: &str) -> bool {
        (self.rules.is_empty() || self.rules.iter().any(|r| r == rule))
            && (self.outcomes.is_empty() || self.outcomes.iter().any(|o| o == outcome))
    }

    /// The filter of a query string (`rule=a&rule=b&outcome=delivered`), or why not.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut filter = Filter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8()
                .map_err(|_| format!("`{key}` is not UTF-8"))?
                .into_owned();
            if value.len() > MAX_FILTER_LEN {
                return Err(format!(
                    "a `{key}` value is longer than {MAX_FILTER_LEN} bytes"
                ));
            }
            let list = match key {
                "rule" => &mut filter.rules,
                "outcome" => {
                    if !OUTCOMES.contains(&value.as_str()) {
                        return Err(format!(
                            "outcome `{value}` is not one of {}",
                            OUTCOMES.join(", ")
                        ));
                    }
                    &mut filter.outcomes
                }
                other => {
                    return Err(format!(
                    "unknown parameter `{other}`; use rule=NAME and outcome=OUTCOME (repeatable)"
                ))
                }
            };
            if list.len() >= MAX_FILTER_VALUES {
                return Err(format!("more than {MAX_FILTER_VALUES} `{key}` values"));
            }
            list.push(value);
        }
        Ok(filter)
    }
}

struct Subscriber {
    filter: Filter,
    lines: mpsc::Sender<Bytes>,
}

/// The subscribers, shared by the pipeline (which emits) and the admin server.
#[derive(Default)]
pub struct Tap {
    /// Read on every decision without the lock: 0 means build nothing.
    count: AtomicUsize,
    subscribers: Mutex<Vec<Subscriber>>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("subscribers", &self.count.load(Ordering::Relaxed))
            .finish()
    }
}

impl Tap {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Someone is listening: only then is a decision built.
    #[inline]
    pub fn active(&self) -> bool {
        self.count.load(Ordering::Relaxed) != 0
    }

    /// A new subscriber's lines, or `None` when [`MAX_SUBSCRIBERS`] listen already.
    pub fn subscribe(&self, filter: Filter) -> Option<mpsc::Receiver<Bytes>> {
        let mut subscribers = self.lock();
        subscribers.retain(|s| !s.lines.is_closed());
        if subscribers.len() >= MAX_SUBSCRIBERS {
            return None;
        }
        let (lines, receiver) = mpsc::channel(BUFFER_LINES);
        subscribers.push(Subscriber { filter, lines });
        self.count.store(subscribers.len(), Ordering::Relaxed);
        Some(receiver)
    }

    /// Hands the decision to every subscriber whose filter takes it; never waits.
    pub fn emit(&self, decision: &Decision<'_>) {
        let mut subscribers = self.lock();
        let mut line: Option<Bytes> = None;
        subscribers.retain(|s| {
            if !s.filter.takes(decision.rule, decision.outcome) {
                return !s.lines.is_closed();
            }
            let line = line.get_or_insert_with(|| {
                let mut text = serde_json::to_vec(decision).unwrap_or_default();
                text.push(b'\n');
                Bytes::from(text)
            });
            match s.lines.try_send(line.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    metrics::tap_dropped();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.count.store(subscribers.len(), Ordering::Relaxed);
    }

    /// Ends every subscriber's stream (the bridge stops).
    pub fn close(&self) {
        self.lock().clear();
        self.count.store(0, Ordering::Relaxed);
    }

    /// Subscribers listening now.
    pub fn subscribers(&self) -> usize {
        let mut subscribers = self.lock();
        subscribers.retain(|s| !s.lines.is_closed());
        self.count.store(subscribers.len(), Ordering::Relaxed);
        subscribers.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision<'a>(rule: &'a str, outcome: &'static str) -> Decision<'a> {
        Decision::new(
            rule,
            outcome,
            None,
            Some("j***@example.com".into()),
            Some(200),
            Duration::from_micros(1500),
        )
    }

    #[test]
    fn filters_parse_and_refuse_what_they_do_not_know() {
        assert_eq!(
            Filter::parse("rule=a&rule=b%20c&outcome=delivered").unwrap(),
            Filter {
                rules: vec!["a".into(), "b c".into()],
                outcomes: vec!["delivered".into()],
            }
        );
        assert_eq!(Filter::parse("").unwrap(), Filter::default());
        assert!(Filter::parse("outcome=lost").unwrap_err().contains("lost"));
        assert!(Filter::parse("body=1").unwrap_err().contains("body"));
    }

    #[tokio::test]
    async fn lines_go_to_matching_subscribers_and_a_full_buffer_drops() {
        let tap = Tap::new();
        assert!(!tap.active());
        let mut all = tap.subscribe(Filter::default()).unwrap();
        let mut skipped = tap
            .subscribe(Filter {
                rules: vec![],
                outcomes: vec!["skipped".into()],
            })
            .unwrap();
        assert!(tap.active());
        tap.emit(&decision("r", "delivered"));
        let line = all.recv().await.unwrap();
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["rule"], "r");
        assert_eq!(value["outcome"], "delivered");
        assert_eq!(value["crisp_status"], 200);
        assert_eq!(value["latency_ms"], 1.5);
        assert!(value["time"].as_str().unwrap().ends_with('Z'), "{value}");
        assert!(skipped.try_recv().is_err());
        for _ in 0..BUFFER_LINES + 5 {
            tap.emit(&decision("r", "skipped"));
        }
        assert_eq!(tap.subscribers(), 2);
        drop(all);
        tap.emit(&decision("r", "skipped"));
        assert_eq!(tap.subscribers(), 1);
        drop(skipped);
        assert_eq!(tap.subscribers(), 0);
        assert!(!tap.active());
    }

    #[test]
    fn no_more_than_the_bound_of_subscribers() {
        let tap = Tap::new();
        let kept: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| tap.subscribe(Filter::default()).unwrap())
            .collect();
        assert!(tap.subscribe(Filter::default()).is_none());
        drop(kept);
        assert!(tap.subscribe(Filter::default()).is_some());
    }
}
