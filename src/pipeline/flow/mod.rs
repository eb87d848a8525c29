//! The one owner of the flow to Crisp: the backoff between a message's retries, pacing
//! (in [`super::pacing`]), the adaptive concurrency, and the holds. It publishes one
//! [`FlowState`]; `/readyz` and the pipeline read it, and only this module writes it.
//!
//! A hold (Crisp refusing us, Crisp down, a spent quota) closes the gate like a circuit
//! breaker: the pod keeps its deliveries (handing them back would count against a
//! quorum queue's delivery limit on every cycle), sends nothing, and lets one held
//! message through at a time as a trial, on the route that failed. Only a real answer
//! to a trial reopens the gate; each failed trial waits longer, up to [`TRIAL_MAX`].

use super::backoff::{Backoff, Jitter};
use super::limit::{AdaptiveLimit, Slot};
use super::pacing::Pacing;
use crate::config::DeliveryConfig;
use crate::crisp::{CrispError, Failure};
use crate::telemetry::metrics;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod dead_letters;
mod holds;
mod permit;

pub use dead_letters::DeadLetterBlock;
pub use permit::{Budget, NotNow, Permit, Retry};

/// The longest wait between two trials of a hold.
pub const TRIAL_MAX: Duration = Duration::from_secs(30);
/// The first trial's wait (at least `initial_backoff`).
const TRIAL_INITIAL: Duration = Duration::from_millis(500);

/// What the flow to Crisp allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Sending at full speed (only `max_requests_per_second` applies).
    Open,
    /// Sending, at a rate learned from Crisp's 429/420 answers.
    Throttled,
    /// Crisp kept rate limiting one message for its whole retry budget (a spent quota):
    /// nothing is sent but a trial at `until`; the pod is not ready meanwhile.
    Held { until: Instant },
    /// Crisp refuses our credentials, plan, website id or route, or redirects us:
    /// `/readyz` fails; trials until Crisp accepts again.
    Refused,
    /// Crisp keeps failing (transport errors, 5xx): trials until it answers, but the
    /// pod stays ready since a restart would not help.
    Outage,
    /// A dead-letter copy found no queue (the dead-letter queue is missing): nothing
    /// is sent until a dead-letter copy is taken again; `/readyz` fails.
    DeadLettersBlocked,
}

impl FlowState {
    /// Requests may be sent.
    pub fn is_sending(self) -> bool {
        matches!(self, FlowState::Open | FlowState::Throttled)
    }
}

/// Why the gate is closed, in order of precedence (a refusal outranks an outage, which
/// outranks a spent quota).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Hold {
    Quota,
    Outage,
    Refused,
}

/// The Crisp route a request goes to: a hold ends only on an answer from the route
/// that failed (events answering proves nothing about profile creation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrispRoute {
    Events,
    Profiles,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Open,
    Closed {
        why: Hold,
        route: CrispRoute,
        /// Tells this hold from a later one: a trial of an earlier hold answered late
        /// must not count for (or free the trial of) this one.
        generation: u64,
        /// When the next trial may start.
        trial_at: Instant,
        /// A trial request is out; no other starts until it is answered.
        trial_out: bool,
        /// Trials failed so far in this hold (and the one before it, when Crisp
        /// failed again soon after reopening): the trial wait grows with it.
        failed_trials: u32,
    },
}

/// What is published: one value, so every reader sees a consistent state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Published {
    gate: Gate,
    throttled: bool,
    dead_letters_blocked: bool,
    /// Dead letters waiting for a queue to take their copy.
    blocked_copies: usize,
}

impl Published {
    fn state(&self) -> FlowState {
        if self.dead_letters_blocked {
            return FlowState::DeadLettersBlocked;
        }
        match self.gate {
            Gate::Closed {
                why: Hold::Refused, ..
            } => FlowState::Refused,
            Gate::Closed {
                why: Hold::Outage, ..
            } => FlowState::Outage,
            Gate::Closed {
                why: Hold::Quota,
                trial_at,
                ..
            } => FlowState::Held { until: trial_at },
            Gate::Open if self.throttled => FlowState::Throttled,
            Gate::Open => FlowState::Open,
        }
    }
}

#[derive(Debug, Clone)]
struct Settings {
    retries: Backoff,
    trials: Backoff,
    max_backoff: Duration,
    max_retry_time: Duration,
}

/// When the gate last reopened, and after how many failed trials: a hold that comes
/// back soon after goes on from there instead of starting again at the first wait.
#[derive(Debug, Clone, Copy)]
struct Reopened {
    at: Instant,
    failed_trials: u32,
}

#[derive(Debug)]
pub struct Flow {
    settings: Settings,
    published: watch::Sender<Published>,
    reopened: Mutex<Option<Reopened>>,
    /// Holds so far: each gets the next number.
    generation: AtomicU64,
    limit: AdaptiveLimit,
    pacing: Mutex<Pacing>,
    accepted: AtomicU64,
}

impl Flow {
    pub fn new(d: &DeliveryConfig) -> Self {
        Self {
            settings: Settings {
                retries: Backoff {
                    initial: d.initial_backoff,
                    max: d.max_backoff,
                    jitter: Jitter::Full,
                },
                trials: Backoff {
                    initial: d.initial_backoff.clamp(TRIAL_INITIAL, TRIAL_MAX),
                    max: TRIAL_MAX,
                    jitter: Jitter::Equal,
                },
                max_backoff: d.max_backoff,
                max_retry_time: d.max_retry_time,
            },
            published: watch::Sender::new(Published {
                gate: Gate::Open,
                throttled: false,
                dead_letters_blocked: false,
                blocked_copies: 0,
            }),
            reopened: Mutex::new(None),
            generation: AtomicU64::new(0),
            limit: AdaptiveLimit::new(d.concurrency),
            pacing: Mutex::new(Pacing::new(d.max_requests_per_second, d.max_backoff)),
            accepted: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> FlowState {
        self.published.borrow().state()
    }

    /// Resolves once nothing may be sent (a hold began, or dead letters are blocked).
    pub async fn closed(&self) {
        let mut rx = self.published.subscribe();
        // The sender lives as long as self, so this cannot fail while we wait.
        let _ = rx.wait_for(|p| !p.state().is_sending()).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pacing> {
        self.pacing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh retry budget for a message that must be handed back by `hand_back_at`.
    pub fn budget(&self, hand_back_at: Instant) -> Budget {
        Budget {
            started: Instant::now(),
            attempt: 0,
            accepted_before: self.accepted.load(Ordering::Relaxed),
            hand_back_at,
        }
    }

    /// Waits for a concurrency slot and this request's turn, or, while a hold lasts,
    /// for the gate to reopen or this message's turn to be the trial. `NotNow` when
    /// stopping or when the message's hand-back time comes first.
    pub async fn permit(
        &self,
        budget: &Budget,
        stopping: &CancellationToken,
    ) -> Result<Permit<'_>, NotNow> {
        let deadline = budget.hand_back_at;
        loop {
            let trial = self.gate(deadline, stopping).await?;
            if trial.is_none() {
                let paused = {
                    let pacing = self.lock();
                    pacing
                        .paused_until
                        .saturating_duration_since(Instant::now())
                };
                // Crisp's pause would overrun the message's budget: a quota hold, so
                // the trial after it goes alone instead of every waiting message.
                if !paused.is_zero()
                    && budget.started.elapsed() + paused > self.settings.max_retry_time
                {
                    self.close(
                        Hold::Quota,
                        CrispRoute::Events,
                        Some(Instant::now() + paused),
                    );
                    continue;
                }
            }
            // A free slot is taken without registering waiters (and dropping them):
            // that was a visible part of the CPU per message.
            let slot = match self.limit.try_acquire() {
                Some(slot) => slot,
                None => tokio::select! {
                    slot = self.limit.acquire() => slot,
                    _ = stopping.cancelled() => return self.give_up(trial),
                    _ = tokio::time::sleep_until(deadline) => return self.give_up(trial),
                    // A hold began while this waited: wait at the gate instead.
                    _ = self.closed(), if trial.is_none() => continue,
                },
            };
            let sent_at = if trial.is_some() {
                // A trial skips pacing, but not Crisp's own pause.
                let paused_until = self.lock().paused_until;
                if paused_until > Instant::now() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(paused_until) => {}
                        _ = stopping.cancelled() => return self.give_up(trial),
                        _ = tokio::time::sleep_until(deadline) => return self.give_up(trial),
                    }
                }
                Instant::now()
            } else {
                let mut waited = false;
                let claimed = loop {
                    let claimed = self.lock().claim(Instant::now(), waited);
                    match claimed {
                        Ok(at) => break Some(at),
                        Err(turn) => {
                            waited = true;
                            tokio::select! {
                                _ = tokio::time::sleep_until(turn) => {}
                                _ = stopping.cancelled() => return Err(NotNow),
                                _ = tokio::time::sleep_until(deadline) => return Err(NotNow),
                                _ = self.closed() => break None,
                            }
                        }
                    }
                };
                match claimed {
                    Some(at) if self.state().is_sending() => at,
                    _ => continue,
                }
            };
            if stopping.is_cancelled() {
                return self.give_up(trial);
            }
            let permit = Permit {
                flow: self,
                _slot: slot,
                sent_at,
                trial,
                route: CrispRoute::Events,
                answered: false,
            };
            let throttled = self.lock().throttled();
            // Read first: the write lock is only needed when it changes, which is rare.
            if self.published.borrow().throttled != throttled {
                self.published.send_if_modified(|p| {
                    let changed = p.throttled != throttled;
                    p.throttled = throttled;
                    changed
                });
            }
            return Ok(permit);
        }
    }

    /// Waits until requests may be sent (`None`) or this caller holds the trial of the
    /// hold of that generation.
    async fn gate(
        &self,
        deadline: Instant,
        stopping: &CancellationToken,
    ) -> Result<Option<u64>, NotNow> {
        if self.state().is_sending() {
            return Ok(None);
        }
        let mut rx = self.published.subscribe();
        loop {
            let published = *rx.borrow_and_update();
            let now = Instant::now();
            if now >= deadline || stopping.is_cancelled() {
                return Err(NotNow);
            }
            let trial_at = match published.gate {
                _ if published.dead_letters_blocked => None,
                Gate::Open => return Ok(None),
                Gate::Closed {
                    trial_out: true, ..
                } => None,
                Gate::Closed {
                    trial_at,
                    generation,
                    ..
                } if trial_at <= now => {
                    if self.take_trial(now, generation) {
                        return Ok(Some(generation));
                    }
                    continue;
                }
                Gate::Closed { trial_at, .. } => Some(trial_at),
            };
            let trial_due = async {
                match trial_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = rx.changed() => {}
                _ = trial_due => {}
                _ = stopping.cancelled() => return Err(NotNow),
                _ = tokio::time::sleep_until(deadline) => return Err(NotNow),
            }
        }
    }

    /// Crisp answered `permit`'s request: a hold on that route ends (this was its
    /// trial, or a request sent before it began got through). A trial answered on
    /// another route proves nothing: its turn goes to the next waiting message at once.
    fn answered_on(&self, permit: &mut Permit<'_>) {
        permit.answered = true;
        let gate = self.published.borrow().gate;
        let Gate::Closed {
            route, generation, ..
        } = gate
        else {
            return;
        };
        if route != permit.route {
            if permit.trial == Some(generation) {
                self.release_trial(generation);
            }
            return;
        }
        let mut reopened = None;
        self.published.send_if_modified(|p| match p.gate {
            Gate::Closed {
                why,
                failed_trials,
                route,
                ..
            } if route == permit.route => {
                p.gate = Gate::Open;
                reopened = Some((why, failed_trials));
                true
            }
            _ => false,
        });
        if let Some((why, failed_trials)) = reopened {
            *self.reopened.lock().unwrap_or_else(|p| p.into_inner()) = Some(Reopened {
                at: Instant::now(),
                failed_trials,
            });
            self.export_hold();
            let was = match why {
                Hold::Refused => "refused us",
                Hold::Outage => "kept failing",
                Hold::Quota => "kept rate limiting us",
            };
            tracing::info!(
                failed_trials,
                "Crisp accepts our requests again (it {was}); resuming"
            );
        }
    }

    /// Crisp accepted a request.
    pub fn succeeded(&self, mut permit: Permit<'_>) {
        self.limit.on_success();
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.lock().accepted(permit.sent_at, Instant::now());
        self.answered_on(&mut permit);
    }

    /// Crisp answered with the message's own fault (400, `people_not_found`): it is up
    /// and takes our credentials on that route, so a hold there ends.
    pub fn answered(&self, mut permit: Permit<'_>) {
        self.answered_on(&mut permit);
    }

    /// Crisp refuses us (a 401/403, another 4xx that is not the message's fault, a
    /// redirect) on `permit`'s route: closes the gate until a trial gets through; true
    /// when this call closed it or made it a refusal (so only one log line is written).
    pub fn refused(&self, permit: Permit<'_>) -> bool {
        let closed = self.close(Hold::Refused, permit.route, None);
        drop(permit);
        closed
    }

    /// A transient failure or a rate limit: what to do next with this message.
    pub fn failed(&self, permit: Permit<'_>, budget: &mut Budget, error: &CrispError) -> Retry {
        let s = &self.settings;
        let wait = s.retries.retry_delay(budget.attempt, error.retry_after);
        let rate_limited = error.failure == Failure::RateLimited;
        let now = Instant::now();
        if rate_limited {
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
        let trial = permit.is_trial();
        let route = permit.route;
        // A failed trial reschedules the next one.
        drop(permit);
        if trial {
            if rate_limited && error.retry_after.is_some() {
                self.close(Hold::Quota, route, Some(now + wait));
            }
            return Retry::Hold;
        }
        if now + wait >= budget.hand_back_at {
            return Retry::HandBack;
        }
        if budget.started.elapsed() + wait <= s.max_retry_time {
            budget.attempt += 1;
            return Retry::After(wait);
        }
        if rate_limited {
            // Crisp keeps saying "not now" (a spent quota): hold, so one trial at a
            // time asks instead of every message cycling.
            let hold = wait.max(s.max_backoff);
            if self.close(Hold::Quota, route, Some(now + hold)) {
                tracing::warn!(hold_s = hold.as_secs(), error = %error, "Crisp keeps rate limiting us; holding (messages wait with the pod, one trial at a time)");
            }
            return Retry::Hold;
        }
        if self.accepted.load(Ordering::Relaxed) == budget.accepted_before {
            // Nothing got through for anyone all this time: Crisp is down.
            if self.close(Hold::Outage, route, None) {
                tracing::warn!(error = %error, "Crisp keeps failing; holding until a trial request gets through (messages wait with the pod, nothing is dead-lettered)");
            }
            return Retry::Hold;
        }
        Retry::Exhausted
    }

    /// The backoff a blocked dead letter waits with between its attempts.
    pub fn trial_backoff(&self) -> Backoff {
        self.settings.trials
    }

    #[cfg(test)]
    fn rate(&self) -> Option<f64> {
        self.lock().rate()
    }

    /// Opens the gate as an answer to a request sent before the hold would.
    #[cfg(test)]
    fn reopen_for_test(&self) {
        let p = Permit {
            flow: self,
            _slot: self.limit.try_acquire().expect("a free slot"),
            sent_at: Instant::now(),
            trial: None,
            route: CrispRoute::Events,
            answered: false,
        };
        self.answered(p);
    }

    /// Closes the gate as a refused event POST would.
    #[cfg(test)]
    fn refuse_events(&self) -> bool {
        self.close(Hold::Refused, CrispRoute::Events, None)
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
