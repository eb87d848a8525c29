//! The sandbox's rate limiters: Crisp documents 429/420 but not its limiter, so tests
//! and benchmarks can pick any common shape, shared by every client of the sandbox.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a limit of `per_second` event POSTs is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimiterShape {
    /// At most `per_second` in any 1 s window.
    #[default]
    SlidingWindow,
    /// A bucket of `per_second` tokens (the burst), refilled at `per_second` a second.
    TokenBucket,
    /// At most `per_second` in each whole second since the limit was set.
    FixedWindow,
    /// At most `60 * per_second` in each whole minute since the limit was set: a full
    /// minute's worth may come at once, then nothing until the minute ends.
    FixedWindowMinute,
}

impl LimiterShape {
    pub const ALL: [LimiterShape; 4] = [
        LimiterShape::TokenBucket,
        LimiterShape::SlidingWindow,
        LimiterShape::FixedWindow,
        LimiterShape::FixedWindowMinute,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LimiterShape::SlidingWindow => "sliding_window",
            LimiterShape::TokenBucket => "token_bucket",
            LimiterShape::FixedWindow => "fixed_window",
            LimiterShape::FixedWindowMinute => "fixed_window_minute",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A limit on event POSTs; the rest get 429.
#[derive(Debug)]
pub(crate) struct RateLimit {
    per_second: u32,
    shape: LimiterShape,
    /// Send `Retry-After` (the seconds until a request would fit) with the 429.
    pub(crate) retry_after: bool,
    since: Instant,
    /// Sliding window: when each request let through in the last second arrived.
    recent: VecDeque<Instant>,
    /// Token bucket: tokens left, as of `refilled`.
    tokens: f64,
    refilled: Instant,
    /// Fixed windows: which window `count` counts.
    window: u64,
    count: u64,
}

impl RateLimit {
    pub(crate) fn new(per_second: u32, retry_after: bool, shape: LimiterShape) -> Self {
        let now = Instant::now();
        Self {
            per_second,
            shape,
            retry_after,
            since: now,
            recent: VecDeque::new(),
            tokens: f64::from(per_second),
            refilled: now,
            window: 0,
            count: 0,
        }
    }

    /// Windows counted from `at` instead of from its creation (a model on a paused clock
    /// starts its windows with its run, so each run meets the same phase).
    #[cfg(test)]
    pub(crate) fn starting_at(mut self, at: Instant) -> Self {
        self.since = at;
        self.refilled = at;
        self
    }

    pub(crate) fn shape(&self) -> LimiterShape {
        self.shape
    }

    pub(crate) fn per_second(&self) -> u32 {
        self.per_second
    }

    /// `Ok` when one more request fits now (and counts it), else how long until one
    /// would.
    pub(crate) fn admit(&mut self, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(self.per_second);
        match self.shape {
            LimiterShape::SlidingWindow => {
                while self
                    .recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
                {
                    self.recent.pop_front();
                }
                if self.recent.len() < self.per_second as usize {
                    self.recent.push_back(now);
                    return Ok(());
                }
                let oldest = self.recent.front().copied().unwrap_or(now);
                Err((oldest + Duration::from_secs(1)).saturating_duration_since(now))
            }
            LimiterShape::TokenBucket => {
                let elapsed = now.duration_since(self.refilled).as_secs_f64();
                self.tokens = (self.tokens + elapsed * rate).min(rate);
                self.refilled = now;
                if self.tokens >= 1.0 {
                    self.tokens -= 1.0;
                    return Ok(());
                }
                Err(Duration::from_secs_f64(
                    (1.0 - self.tokens) / rate.max(1e-9),
                ))
            }
            LimiterShape::FixedWindow | LimiterShape::FixedWindowMinute => {
                let (length, allowed) = match self.shape {
                    LimiterShape::FixedWindow => {
                        (Duration::from_secs(1), u64::from(self.per_second))
                    }
                    _ => (Duration::from_secs(60), 60 * u64::from(self.per_second)),
                };
                let elapsed = now.duration_since(self.since);
                let window = (elapsed.as_nanos() / length.as_nanos()) as u64;
                if window != self.window {
                    self.window = window;
                    self.count = 0;
                }
                if self.count < allowed {
                    self.count += 1;
                    return Ok(());
                }
                let ends = self.since + length * u32::try_from(window + 1).unwrap_or(u32::MAX);
                Err(ends.saturating_duration_since(now))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests let through when one is tried every `step` for `secs`.
    fn admitted(shape: LimiterShape, per_second: u32, step: Duration, secs: u64) -> usize {
        let mut limit = RateLimit::new(per_second, false, shape);
        let start = limit.since;
        let mut at = start;
        let mut ok = 0;
        while at < start + Duration::from_secs(secs) {
            ok += usize::from(limit.admit(at).is_ok());
            at += step;
        }
        ok
    }

    #[test]
    fn every_shape_lets_the_limit_through_and_no_more() {
        let step = Duration::from_millis(1);
        for shape in [
            LimiterShape::SlidingWindow,
            LimiterShape::TokenBucket,
            LimiterShape::FixedWindow,
        ] {
            let ok = admitted(shape, 50, step, 10);
            // The token bucket's full burst comes on top of the rate.
            assert!((500..=551).contains(&ok), "{shape:?}: {ok}");
        }
        let ok = admitted(LimiterShape::FixedWindowMinute, 50, step, 120);
        assert_eq!(ok, 6000, "two minutes of 3,000");
    }

    #[test]
    fn a_minute_window_lets_a_minute_through_at_once_then_says_how_long_to_wait() {
        let mut limit = RateLimit::new(2, true, LimiterShape::FixedWindowMinute);
        let t = limit.since;
        for _ in 0..120 {
            assert!(limit.admit(t).is_ok());
        }
        let wait = limit.admit(t + Duration::from_secs(1)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(59));
        assert!(limit.admit(t + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn a_token_bucket_bursts_its_rate_then_refills() {
        let mut limit = RateLimit::new(10, false, LimiterShape::TokenBucket);
        let t = limit.since;
        for _ in 0..10 {
            assert!(limit.admit(t).is_ok());
        }
        assert!(limit.admit(t).is_err());
        assert!(limit.admit(t + Duration::from_millis(100)).is_ok());
        assert!(limit.admit(t + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn shapes_have_names() {
        for shape in LimiterShape::ALL {
            assert_eq!(LimiterShape::parse(shape.name()), Some(shape));
        }
        assert_eq!(LimiterShape::parse("leaky"), None);
    }
}
