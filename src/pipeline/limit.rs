//! Adaptive concurrency (AIMD): the number of Crisp requests in flight grows by about one
//! per round of successful answers and halves when Crisp signals overload (429/420,
//! 5xx, timeouts). Pods sharing one Crisp quota each back off on their own and settle
//! around what Crisp accepts, without coordinating.

use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Two halvings are at least this far apart, so one burst of errors from requests
/// that were all in flight together counts as one signal.
const DECREASE_SPACING: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    last_decrease: Option<Instant>,
}

#[derive(Debug)]
pub struct AdaptiveLimit {
    max: usize,
    state: Mutex<State>,
    freed: Notify,
}

/// A slot for one request; dropping it frees the slot.
pub struct Slot<'a> {
    owner: &'a AdaptiveLimit,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.owner.lock().in_flight -= 1;
        self.owner.freed.notify_one();
    }
}

impl AdaptiveLimit {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        crate::telemetry::metrics::concurrency_limit(max as f64);
        Self {
            max,
            state: Mutex::new(State {
                limit: max as f64,
                in_flight: 0,
                last_decrease: None,
            }),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot if one is free now (the common case: no waiter registered).
    pub fn try_acquire(&self) -> Option<Slot<'_>> {
        let mut state = self.lock();
        (state.in_flight < state.limit.floor() as usize).then(|| {
            state.in_flight += 1;
            Slot { owner: self }
        })
    }

    pub async fn acquire(&self) -> Slot<'_> {
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            // Register before checking, so a slot freed in between is not missed.
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.in_flight < state.limit.floor() as usize {
                    state.in_flight += 1;
                    return Slot { owner: self };
                }
            }
            notified.await;
        }
    }

    /// Crisp answered well: grow by 1/limit, about +1 per full round of requests.
    pub fn on_success(&self) {
        let grew = {
            let mut state = self.lock();
            let before = state.limit.floor();
            state.limit = (state.limit + 1.0 / state.limit).min(self.max as f64);
            crate::telemetry::metrics::concurrency_limit(state.limit.floor());
            state.limit.floor() > before
        };
        if grew {
            self.freed.notify_one();
        }
    }

    /// Crisp signalled overload: halve, at most once per [`DECREASE_SPACING`].
    pub fn on_overload(&self) {
        let mut state = self.lock();
        let now = Instant::now();
        if state
            .last_decrease
            .is_some_and(|at| now.duration_since(at) < DECREASE_SPACING)
        {
            return;
        }
        state.last_decrease = Some(now);
        state.limit = (state.limit / 2.0).max(1.0);
        crate::telemetry::metrics::concurrency_limit(state.limit.floor());
    }

    #[cfg(test)]
    fn current(&self) -> usize {
        self.lock().limit.floor() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn halves_on_overload_and_grows_back() {
        let l = AdaptiveLimit::new(16);
        assert_eq!(l.current(), 16);
        l.on_overload();
        assert_eq!(l.current(), 8);
        l.on_overload(); // same burst: ignored
        assert_eq!(l.current(), 8);
        tokio::time::advance(DECREASE_SPACING).await;
        l.on_overload();
        assert_eq!(l.current(), 4);
        // About one more slot per round of `limit` successes.
        for _ in 0..5 {
            l.on_success();
        }
        assert_eq!(l.current(), 5);
        for _ in 0..1000 {
            l.on_success();
        }
        assert_eq!(l.current(), 16, "never above the configured concurrency");
        for _ in 0..20 {
            tokio::time::advance(DECREASE_SPACING).await;
            l.on_overload();
        }
        assert_eq!(l.current(), 1, "never below one");
    }

    #[tokio::test(start_paused = true)]
    async fn slots_wait_for_the_limit() {
        let l = std::sync::Arc::new(AdaptiveLimit::new(2));
        let a = l.acquire().await;
        let _b = l.acquire().await;
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move {
                let _c = l.acquire().await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
    }
}
