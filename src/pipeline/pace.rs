//! When the next Crisp request may start: exponential backoff with full jitter, a
//! client-side rate limit, and a shared pause when Crisp signals a rate limit.

use rand::Rng;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Delay before retry number `attempt` (0-based): a random duration up to
/// `initial * 2^attempt` capped at `max` (full jitter), or `Retry-After` when Crisp sent
/// one, even beyond `max` (but never below `initial`).
pub fn backoff(
    attempt: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    if let Some(after) = retry_after {
        // `0` or a past date would retry at once, in a tight loop: never below `initial`.
        return after.max(initial);
    }
    let ceiling = initial
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// Shared pacing for every request of this process.
#[derive(Debug)]
pub struct Pace {
    interval: Option<Duration>,
    next_slot: Mutex<Instant>,
    paused_until: Mutex<Instant>,
}

impl Pace {
    pub fn new(max_requests_per_second: f64) -> Self {
        let interval = (max_requests_per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / max_requests_per_second));
        let now = Instant::now();
        Self {
            interval,
            next_slot: Mutex::new(now),
            paused_until: Mutex::new(now),
        }
    }

    /// Every request waits out a pause Crisp asked for (`Retry-After` on 429/420), so one
    /// rate-limit answer slows the whole pod instead of each message finding out alone.
    pub fn pause_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if until > *paused {
            *paused = until;
        }
    }

    /// How long the pause Crisp asked for still lasts.
    pub fn paused_for(&self) -> Duration {
        let paused = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        paused.saturating_duration_since(Instant::now())
    }

    /// Waits until this request may start.
    pub async fn wait_turn(&self) {
        let paused = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        tokio::time::sleep_until(paused).await;
        if let Some(interval) = self.interval {
            let slot = {
                let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
                let slot = (*next).max(Instant::now());
                *next = slot + interval;
                slot
            };
            tokio::time::sleep_until(slot).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_capped_and_honours_retry_after() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..10 {
            let d = backoff(attempt, i, m, None);
            assert!(
                d <= (i * 2u32.pow(attempt)).min(m),
                "attempt {attempt}: {d:?}"
            );
        }
        assert_eq!(
            backoff(3, i, m, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        // Huge attempt counts do not overflow.
        assert!(backoff(u32::MAX, i, m, None) <= m);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_requests() {
        let pace = Pace::new(10.0);
        let start = Instant::now();
        for _ in 0..5 {
            pace.wait_turn().await;
        }
        assert_eq!(start.elapsed(), Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request() {
        let pace = Pace::new(0.0);
        pace.pause_for(Duration::from_secs(3));
        let start = Instant::now();
        pace.wait_turn().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }
}
