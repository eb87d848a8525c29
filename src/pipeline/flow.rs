//! The one owner of the flow to Crisp: backoff between retries, pacing (the adaptive
//! request rate under `max_requests_per_second`, and the pod-wide pause Crisp asks for
//! with `Retry-After`), the adaptive concurrency, the refusal/outage gate and the
//! rate-limit hold. It publishes one [`FlowState`]; the consume loop, `/readyz` and the
//! probe read it, and only this module writes it.

use super::limit::{AdaptiveLimit, Slot};
use crate::config::DeliveryConfig;
use crate::crisp::{CrispError, Failure};
use crate::telemetry::metrics;
use rand::Rng;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the flow to Crisp allows now, in order of precedence (a refusal outranks an
/// outage, which outranks a hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Sending at full speed (only `max_requests_per_second` applies).
    Open,
    /// Sending, at a rate learned from Crisp's 429/420 answers.
    Throttled,
    /// Crisp kept rate limiting one message for its whole retry budget (a spent quota):
    /// consumption pauses until `until`; the pod is not ready meanwhile.
    Held { until: Instant },
    /// Crisp refuses our credentials, plan or website id, or redirects us: `/readyz` fails.
    Refused,
    /// Crisp keeps failing (transport errors, 5xx): consumption pauses and a probe runs,
    /// but the pod stays ready since a restart would not help.
    Outage,
}

impl FlowState {
    /// Requests may be sent.
    pub fn is_sending(self) -> bool {
        matches!(self, FlowState::Open | FlowState::Throttled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    Refused,
    Outage,
}

/// What is published; [`FlowState`] is derived from it, since a hold ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Published {
    gate: Gate,
    hold: Option<Instant>,
    throttled: bool,
}

impl Published {
    fn state(&self, now: Instant) -> FlowState {
        match (self.gate, self.hold) {
            (Gate::Refused, _) => FlowState::Refused,
            (Gate::Outage, _) => FlowState::Outage,
            (Gate::Open, Some(until)) if until > now => FlowState::Held { until },
            _ if self.throttled => FlowState::Throttled,
            _ => FlowState::Open,
        }
    }
}

/// Fraction of the accepted rate kept after a 429/420: the accepted rate already is the
/// share Crisp gives us, so a small cut suffices and keeps the average near the limit.
const BETA: f64 = 0.95;
/// Two cuts are at least this far apart.
const CUT_SPACING: Duration = Duration::from_millis(1000);
/// Growth near the last limit, as a fraction of it per second of saturated sending:
/// slow, since with N pods each cut removes only its own share of the excess.
const NEAR_GROWTH: f64 = 0.015;
/// Far below the last limit the rate doubles per second of saturated sending, and
/// beyond it triples, so a lifted limit is found again within seconds.
const FAR_BELOW: f64 = 0.8;
const FAR_ABOVE: f64 = 1.03;
const BELOW_GROWTH: f64 = 2.0;
const ABOVE_GROWTH: f64 = 3.0;
/// Beyond this multiple of the last limit the learned rate is forgotten.
const FORGET_ABOVE: f64 = 64.0;
/// Never slower than this (a rate of zero would stop the pod for good).
const MIN_RATE: f64 = 0.5;
/// The longest stretch of time one claim counts as growth (after an idle spell the
/// first request must not jump the rate).
const MAX_GROWTH_STEP: Duration = Duration::from_millis(250);
/// The window the sent and accepted rates are measured over.
const WINDOW: Duration = Duration::from_secs(1);

/// Events of the last [`WINDOW`], to measure a rate.
#[derive(Debug, Default)]
struct Window(VecDeque<Instant>);

impl Window {
    fn push(&mut self, now: Instant) {
        self.trim(now);
        self.0.push_back(now);
    }

    fn trim(&mut self, now: Instant) {
        while self
            .0
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.0.pop_front();
        }
    }

    fn per_second(&mut self, now: Instant) -> f64 {
        self.trim(now);
        self.0.len() as f64 / WINDOW.as_secs_f64()
    }
}

/// The pacing state: when the next request may start.
#[derive(Debug)]
struct Pacing {
    /// `max_requests_per_second`: a hard ceiling.
    ceiling: Option<f64>,
    /// The rate learned from 429/420; `None` until Crisp first limits us.
    learned: Option<f64>,
    /// The accepted rate when Crisp last limited us: the limit's estimate.
    last_limit: f64,
    last_cut: Option<Instant>,
    last_claim: Instant,
    next_slot: Instant,
    /// Crisp's `Retry-After`, for every request of the pod.
    paused_until: Instant,
    sent: Window,
    accepted: Window,
}

impl Pacing {
    fn new(max_requests_per_second: f64) -> Self {
        let now = Instant::now();
        Self {
            ceiling: (max_requests_per_second > 0.0).then_some(max_requests_per_second),
            learned: None,
            last_limit: 0.0,
            last_cut: None,
            last_claim: now,
            next_slot: now,
            paused_until: now,
            sent: Window::default(),
            accepted: Window::default(),
        }
    }

    fn rate(&self) -> Option<f64> {
        match (self.ceiling, self.learned) {
            (Some(c), Some(l)) => Some(c.min(l)),
            (c, l) => c.or(l),
        }
    }

    /// Takes the turn if it has come; else says when to look again.
    fn claim(&mut self, now: Instant, waited: bool) -> Result<Instant, Instant> {
        let learned = self.learned.is_some();
        let claimed = self.claim_turn(now, waited);
        if learned && self.learned.is_none() {
            metrics::request_rate_limit(0.0);
        }
        claimed
    }

    fn claim_turn(&mut self, now: Instant, waited: bool) -> Result<Instant, Instant> {
        let turn = self.next_slot.max(self.paused_until);
        if turn > now {
            return Err(turn);
        }
        if waited {
            // Only time spent sending as fast as allowed says the rate could be higher.
            // At a low rate one claim stands for a long stretch of saturated sending.
            let longest = self.rate().map_or(MAX_GROWTH_STEP, |r| {
                MAX_GROWTH_STEP.max(Duration::from_secs_f64(2.0 / r))
            });
            let step = now.duration_since(self.last_claim).min(longest);
            self.grow(step.as_secs_f64());
        }
        self.last_claim = now;
        self.next_slot = match self.rate() {
            Some(rate) => {
                let interval = Duration::from_secs_f64(1.0 / rate);
                // Spaced from the turn, not from the (late) wake-up, so timer slack does
                // not eat the rate; after an idle spell no credit is banked.
                let from = if now.duration_since(turn) < interval {
                    turn
                } else {
                    now
                };
                from + interval
            }
            None => now,
        };
        self.sent.push(now);
        Ok(now)
    }

    fn grow(&mut self, secs: f64) {
        let Some(rate) = self.learned else { return };
        let limit = self.last_limit;
        let grown = if rate < FAR_BELOW * limit {
            rate * BELOW_GROWTH.powf(secs)
        } else if rate > FAR_ABOVE * limit {
            rate * ABOVE_GROWTH.powf(secs)
        } else {
            rate + NEAR_GROWTH * limit * secs
        };
        self.learned = if grown > FORGET_ABOVE * limit {
            None
        } else {
            // Above the ceiling growth means nothing: stay at it, ready to be cut from it.
            Some(self.ceiling.map_or(grown, |c| grown.min(c)))
        };
    }

    /// Crisp said "too many" to a request sent at `sent_at`; true when the rate changed.
    fn cut(&mut self, sent_at: Instant, now: Instant) -> bool {
        if self
            .last_cut
            .is_some_and(|cut| sent_at < cut || now.duration_since(cut) < CUT_SPACING)
        {
            // Sent before the last cut, or too soon after it: a limiter counting the
            // last second still remembers the excess that cut answered.
            return false;
        }
        let accepted = self.accepted.per_second(now);
        if accepted == 0.0 && self.learned.is_some() {
            // Nothing gets through at any rate (a spent quota): slowing down further
            // finds no share; each message's backoff and the hold deal with it.
            return false;
        }
        let sending = self.sent.per_second(now).max(MIN_RATE);
        let current = self.rate().map_or(sending, |r| r.min(sending));
        // What Crisp let through is the share it gives us. Near the last limit a stall
        // (a slow second on our side) must not pass for a smaller share: cut at most
        // by a tenth there; far above it, at most by half.
        let floor = if current <= FAR_ABOVE * self.last_limit {
            current * 0.9
        } else {
            current / 2.0
        };
        let base = accepted.max(floor).min(current);
        // With nothing accepted the answer says nothing about the limit (everything is
        // refused): keep the old estimate, so recovery ramps fast up to it.
        if accepted > 0.0 || self.last_limit < MIN_RATE {
            self.last_limit = base.max(MIN_RATE);
        }
        self.learned = Some((base * BETA).max(MIN_RATE));
        self.last_cut = Some(now);
        // The lower rate applies to the very next request.
        if let Some(rate) = self.rate() {
            self.next_slot = self
                .next_slot
                .max(now + Duration::from_secs_f64(1.0 / rate));
        }
        true
    }
}

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

/// One message's retry budget.
#[derive(Debug)]
pub struct Budget {
    started: Instant,
    attempt: u32,
    /// Requests accepted pod-wide when this message started: when its budget runs out
    /// with this unchanged, nothing got through for anyone (an outage).
    accepted_before: u64,
}

impl Budget {
    /// Retries so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// Permission to send one request: a concurrency slot and a pacing turn.
pub struct Permit<'a> {
    _slot: Slot<'a>,
    sent_at: Instant,
}

/// Why nothing may be sent for a message now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotNow;

/// What to do after a transient failure or a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again after this long.
    After(Duration),
    /// The budget ran out while Crisp kept rate limiting, or for everyone (an outage):
    /// a hold began; the message waits in the broker, not its fault.
    Held,
    /// The budget ran out while other messages got through: the message's own problem.
    Exhausted,
}

#[derive(Debug, Clone)]
struct Settings {
    initial_backoff: Duration,
    max_backoff: Duration,
    max_retry_time: Duration,
}

#[derive(Debug)]
pub struct Flow {
    settings: Settings,
    published: watch::Sender<Published>,
    limit: AdaptiveLimit,
    pacing: Mutex<Pacing>,
    accepted: AtomicU64,
}

impl Flow {
    pub fn new(d: &DeliveryConfig) -> Self {
        Self {
            settings: Settings {
                initial_backoff: d.initial_backoff,
                max_backoff: d.max_backoff,
                max_retry_time: d.max_retry_time,
            },
            published: watch::Sender::new(Published {
                gate: Gate::Open,
                hold: None,
                throttled: false,
            }),
            limit: AdaptiveLimit::new(d.concurrency),
            pacing: Mutex::new(Pacing::new(d.max_requests_per_second)),
            accepted: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> FlowState {
        self.published.borrow().state(Instant::now())
    }

    /// Resolves once nothing may be sent (refused, outage, or a hold began).
    pub async fn closed(&self) {
        let mut rx = self.published.subscribe();
        // The sender lives as long as self, so this cannot fail while we wait.
        let _ = rx.wait_for(|p| !p.state(Instant::now()).is_sending()).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pacing> {
        self.pacing.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn budget(&self) -> Budget {
        Budget {
            started: Instant::now(),
            attempt: 0,
            accepted_before: self.accepted.load(Ordering::Relaxed),
        }
    }

    /// Waits for a concurrency slot and this request's turn. `NotNow` when stopping,
    /// when the flow closed, or when Crisp's pause would overrun the message's budget (a
    /// hold begins then, so the messages wait in the broker instead of near its consumer
    /// timeout).
    pub async fn permit(
        &self,
        budget: &Budget,
        stopping: &CancellationToken,
    ) -> Result<Permit<'_>, NotNow> {
        if !self.state().is_sending() {
            return Err(NotNow);
        }
        let paused = {
            let pacing = self.lock();
            pacing
                .paused_until
                .saturating_duration_since(Instant::now())
        };
        // Only a real pause turns into a hold: a zero-length one would still pause the
        // consumer (and hand back every prefetched message) for nothing. Without a pause
        // the attempt goes ahead, and `failed` says when the budget is spent.
        if !paused.is_zero() && budget.started.elapsed() + paused > self.settings.max_retry_time {
            self.hold_until(Instant::now() + paused);
            return Err(NotNow);
        }
        // A free slot is taken without registering three waiters (and dropping them):
        // that was a visible part of the CPU per message (issue 10).
        let slot = match self.limit.try_acquire() {
            Some(slot) => slot,
            None => tokio::select! {
                slot = self.limit.acquire() => slot,
                _ = stopping.cancelled() => return Err(NotNow),
                // Refused or an outage began while this waited: hand it back now.
                _ = self.closed() => return Err(NotNow),
            },
        };
        let mut waited = false;
        let sent_at = loop {
            let claimed = self.lock().claim(Instant::now(), waited);
            match claimed {
                Ok(at) => break at,
                Err(turn) => {
                    waited = true;
                    tokio::select! {
                        _ = tokio::time::sleep_until(turn) => {}
                        _ = stopping.cancelled() => return Err(NotNow),
                        _ = self.closed() => return Err(NotNow),
                    }
                }
            }
        };
        if stopping.is_cancelled() || !self.state().is_sending() {
            return Err(NotNow);
        }
        let throttled = self.lock().learned.is_some();
        // Read first: the write lock is only needed when it changes, which is rare.
        if self.published.borrow().throttled != throttled {
            self.published.send_if_modified(|p| {
                let changed = p.throttled != throttled;
                p.throttled = throttled;
                changed
            });
        }
        Ok(Permit {
            _slot: slot,
            sent_at,
        })
    }

    /// Crisp accepted a request.
    pub fn succeeded(&self, permit: Permit<'_>) {
        self.limit.on_success();
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.lock().accepted.push(Instant::now());
        drop(permit);
    }

    /// Crisp refuses us (or redirects): closes the flow until a probe gets through; true
    /// when this call closed it (so only one log line is written).
    pub fn refuse(&self) -> bool {
        self.set_gate(|g| g != Gate::Refused, Gate::Refused)
    }

    /// A transient failure or a rate limit: what to do next with this message.
    pub fn failed(&self, permit: Permit<'_>, budget: &mut Budget, error: &CrispError) -> Retry {
        let s = &self.settings;
        let wait = backoff(
            budget.attempt,
            s.initial_backoff,
            s.max_backoff,
            error.retry_after,
        );
        let rate_limited = error.failure == Failure::RateLimited;
        if rate_limited {
            let now = Instant::now();
            let mut pacing = self.lock();
            if pacing.cut(permit.sent_at, now) {
                let rate = pacing.rate();
                drop(pacing);
                if let Some(rate) = rate {
                    metrics::request_rate_limit(rate);
                }
                self.published.send_if_modified(|p| {
                    let changed = !p.throttled;
                    p.throttled = true;
                    changed
                });
            } else {
                drop(pacing);
            }
            if error.retry_after.is_some() {
                // Crisp said how long: the whole pod waits, not just this message.
                let mut pacing = self.lock();
                pacing.paused_until = pacing.paused_until.max(now + wait);
            }
        } else {
            // Slow or failing answers: fewer requests in flight.
            self.limit.on_overload();
        }
        drop(permit);
        if budget.started.elapsed() + wait <= s.max_retry_time {
            budget.attempt += 1;
            return Retry::After(wait);
        }
        if rate_limited {
            // Crisp keeps saying "not now" (a spent quota): pause consuming so the
            // messages wait in the broker instead of cycling.
            let hold = wait.max(s.max_backoff);
            if self.hold_until(Instant::now() + hold) {
                tracing::warn!(hold_s = hold.as_secs(), error = %error, "Crisp keeps rate limiting us; pausing consumption");
            }
            return Retry::Held;
        }
        if self.accepted.load(Ordering::Relaxed) == budget.accepted_before {
            // Nothing got through for anyone all this time: Crisp is down. Stop taking
            // deliveries and probe, so no message burns its delivery limit cycling.
            if self.set_gate(|g| g == Gate::Open, Gate::Outage) {
                tracing::warn!(error = %error, "Crisp keeps failing; pausing consumption until a probe gets through (messages wait in the broker, nothing is dead-lettered)");
            }
            return Retry::Held;
        }
        Retry::Exhausted
    }

    /// Holds consumption until `until` (extending a shorter hold); true when a hold
    /// started now.
    fn hold_until(&self, until: Instant) -> bool {
        let now = Instant::now();
        let mut started = false;
        self.published.send_if_modified(|p| match p.hold {
            Some(t) if t >= until => false,
            current => {
                started = current.is_none_or(|t| t <= now);
                p.hold = Some(until);
                true
            }
        });
        if started {
            metrics::holding(true);
        }
        started
    }

    /// Ends a hold (including one that expired unnoticed).
    pub fn clear_hold(&self) {
        let mut ended = false;
        self.published.send_if_modified(|p| {
            ended = p.hold.take().is_some();
            ended
        });
        if ended {
            metrics::holding(false);
        }
    }

    fn set_gate(&self, when: impl Fn(Gate) -> bool, to: Gate) -> bool {
        let changed = self.published.send_if_modified(|p| {
            let change = when(p.gate);
            if change {
                p.gate = to;
            }
            change
        });
        if changed {
            metrics::crisp_refused(to == Gate::Refused);
            metrics::crisp_outage(to == Gate::Outage);
        }
        changed
    }

    /// While refused or in an outage: probes Crisp with backoff (capped at 30 s) until it
    /// answers and accepts our credentials again, then reopens.
    pub async fn probe_until_open<F, Fut>(&self, probe: F, stop: &CancellationToken)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), CrispError>>,
    {
        let mut delay = Duration::from_millis(500);
        while matches!(self.state(), FlowState::Refused | FlowState::Outage) {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
            match probe().await {
                Ok(()) => {
                    tracing::info!("Crisp accepts our requests again; resuming consumption");
                    self.set_gate(|g| g != Gate::Open, Gate::Open);
                }
                Err(e) if e.failure == Failure::Refused => {
                    if self.refuse() {
                        tracing::error!(error = %e, "Crisp refuses our requests; pausing consumption until it accepts again (nothing is dead-lettered)");
                    } else {
                        tracing::warn!(error = %e, next_probe_s = delay.as_secs(), "Crisp still refuses us");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, next_probe_s = delay.as_secs(), "Crisp is still failing");
                }
            }
        }
    }

    #[cfg(test)]
    fn rate(&self) -> Option<f64> {
        self.lock().rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_rps: f64) -> DeliveryConfig {
        DeliveryConfig {
            concurrency: 8,
            max_requests_per_second: max_rps,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_retry_time: Duration::from_secs(10),
            ..DeliveryConfig::default()
        }
    }

    fn error(failure: Failure, retry_after: Option<Duration>) -> CrispError {
        CrispError {
            failure,
            status: Some(429),
            reason: None,
            retry_after,
            message: "test".into(),
        }
    }

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
        assert!(backoff(u32::MAX, i, m, None) <= m);
    }

    #[tokio::test(start_paused = true)]
    async fn the_ceiling_spaces_requests() {
        let flow = Flow::new(&config(10.0));
        let stop = CancellationToken::new();
        let start = Instant::now();
        for _ in 0..5 {
            let p = flow.permit(&flow.budget(), &stop).await.unwrap();
            flow.succeeded(p);
        }
        assert_eq!(start.elapsed(), Duration::from_millis(400));
        assert_eq!(flow.state(), FlowState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_pauses_every_request() {
        let flow = Flow::new(&config(0.0));
        let stop = CancellationToken::new();
        let mut budget = flow.budget();
        let p = flow.permit(&budget, &stop).await.unwrap();
        let e = error(Failure::RateLimited, Some(Duration::from_secs(3)));
        assert_eq!(
            flow.failed(p, &mut budget, &e),
            Retry::After(Duration::from_secs(3))
        );
        let start = Instant::now();
        let p = flow.permit(&flow.budget(), &stop).await.unwrap();
        flow.succeeded(p);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    /// Sends as fast as the flow allows for `secs`, against a limit of `limit` requests
    /// in any 1 s window (None: no limit); returns (accepted, refused).
    async fn run(flow: &Flow, limit: Option<usize>, secs: u64) -> (usize, usize) {
        let stop = CancellationToken::new();
        let end = Instant::now() + Duration::from_secs(secs);
        let mut window: VecDeque<Instant> = VecDeque::new();
        let (mut ok, mut refused) = (0, 0);
        while Instant::now() < end {
            let mut budget = flow.budget();
            let p = flow.permit(&budget, &stop).await.unwrap();
            let now = Instant::now();
            while window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= WINDOW)
            {
                window.pop_front();
            }
            if limit.is_some_and(|l| window.len() >= l) {
                refused += 1;
                let _ = flow.failed(p, &mut budget, &error(Failure::RateLimited, None));
            } else {
                window.push_back(now);
                ok += 1;
                flow.succeeded(p);
            }
            // Crisp answers in 1 ms.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (ok, refused)
    }

    #[tokio::test(start_paused = true)]
    async fn converges_on_a_limit_and_finds_a_lifted_one() {
        let flow = Flow::new(&config(0.0));
        let _ = run(&flow, Some(50), 10).await;
        assert_eq!(flow.state(), FlowState::Throttled);
        let (ok, refused) = run(&flow, Some(50), 30).await;
        let achieved = ok as f64 / 30.0;
        assert!(achieved >= 0.95 * 50.0, "achieved {achieved}/s");
        assert!(
            (refused as f64) <= 0.03 * (ok + refused) as f64,
            "{refused} refused of {}",
            ok + refused
        );
        // The limit is lifted: within 10 s the rate is above ten times the old one.
        let _ = run(&flow, None, 10).await;
        assert!(
            flow.rate().is_none_or(|r| r > 500.0),
            "rate {:?}",
            flow.rate()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ceiling_bounds_the_learned_rate() {
        let flow = Flow::new(&config(20.0));
        let (ok, _) = run(&flow, None, 10).await;
        assert!(ok <= 201, "{ok}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_quota_holds_and_nothing_getting_through_is_an_outage() {
        let flow = Flow::new(&config(0.0));
        let stop = CancellationToken::new();
        let mut budget = flow.budget();
        let outcome = loop {
            let p = flow.permit(&budget, &stop).await.unwrap();
            match flow.failed(p, &mut budget, &error(Failure::RateLimited, None)) {
                Retry::After(d) => tokio::time::sleep(d).await,
                other => break other,
            }
        };
        assert_eq!(outcome, Retry::Held);
        assert!(matches!(flow.state(), FlowState::Held { .. }));
        assert!(flow.permit(&flow.budget(), &stop).await.is_err());
        flow.clear_hold();
        assert_eq!(flow.state(), FlowState::Throttled);

        let mut budget = flow.budget();
        let outcome = loop {
            let p = flow.permit(&budget, &stop).await.unwrap();
            match flow.failed(p, &mut budget, &error(Failure::Transient, None)) {
                Retry::After(d) => tokio::time::sleep(d).await,
                other => break other,
            }
        };
        assert_eq!(outcome, Retry::Held);
        assert_eq!(flow.state(), FlowState::Outage);
        assert!(flow.refuse(), "a refusal outranks an outage");
        assert_eq!(flow.state(), FlowState::Refused);
        flow.probe_until_open(|| async { Ok(()) }, &stop).await;
        assert!(flow.state().is_sending());
    }

    #[tokio::test(start_paused = true)]
    async fn failing_alone_while_others_get_through_is_exhausted() {
        let flow = Flow::new(&config(0.0));
        let stop = CancellationToken::new();
        let mut budget = flow.budget();
        let outcome = loop {
            let p = flow.permit(&budget, &stop).await.unwrap();
            match flow.failed(p, &mut budget, &error(Failure::Transient, None)) {
                Retry::After(d) => {
                    let other = flow.permit(&flow.budget(), &stop).await.unwrap();
                    flow.succeeded(other);
                    tokio::time::sleep(d).await
                }
                other => break other,
            }
        };
        assert_eq!(outcome, Retry::Exhausted);
        assert!(flow.state().is_sending());
    }
}
