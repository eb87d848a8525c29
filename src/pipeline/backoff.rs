//! The one backoff policy: a message's retries, a hold's trials and the broker
//! reconnects all space their attempts with [`Backoff`].

use rand::Rng;
use std::time::Duration;

/// How much of each wait is random.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Anywhere between zero and the ceiling: pods retrying one failure spread out
    /// the most (message retries).
    Full,
    /// Between half the ceiling and the ceiling: the wait visibly grows with each
    /// attempt (hold trials, reconnects), and is still not in lockstep across pods.
    Equal,
}

/// Waits that double from `initial` per attempt, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    /// The longest wait before attempt number `attempt` (0-based): `initial * 2^attempt`,
    /// at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.initial
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.max)
    }

    /// The wait before attempt number `attempt`, jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let fixed = match self.jitter {
            Jitter::Full => 0,
            Jitter::Equal => nanos / 2,
        };
        Duration::from_nanos(rand::rng().random_range(fixed..=nanos))
    }

    /// The wait before retry number `attempt`, or `Retry-After` when Crisp sent one,
    /// even beyond `max` (but never below `initial`: `0` or a past date would retry at
    /// once, in a tight loop).
    pub fn retry_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(after) => after.max(self.initial),
            None => self.delay(attempt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_millis(100);
    const M: Duration = Duration::from_secs(1);

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_honours_retry_after() {
        let b = Backoff {
            initial: I,
            max: M,
            jitter: Jitter::Full,
        };
        for attempt in 0..10 {
            let d = b.delay(attempt);
            assert!(
                d <= (I * 2u32.pow(attempt)).min(M),
                "attempt {attempt}: {d:?}"
            );
        }
        assert_eq!(
            b.retry_delay(3, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(b.retry_delay(3, Some(Duration::ZERO)), I);
        assert!(b.delay(u32::MAX) <= M);
    }

    #[test]
    fn equal_jitter_grows_with_each_attempt_to_the_cap() {
        let b = Backoff {
            initial: I,
            max: M,
            jitter: Jitter::Equal,
        };
        for attempt in 0..12 {
            let c = b.ceiling(attempt);
            let d = b.delay(attempt);
            assert!(d >= c / 2 && d <= c, "attempt {attempt}: {d:?} of {c:?}");
        }
        assert_eq!(b.ceiling(30), M);
        assert!(b.delay(30) >= M / 2);
    }
}
