//! The one place that turns each step's result into a [`Disposition`], and runs
//! deliveries: per-person order, bounded concurrency, retries with backoff.
//!
//! decode -> route/map -> (lane per people id) -> deliver with retries -> settle

mod dedup;
mod gate;
mod lanes;
mod limit;
mod pace;

pub use gate::{CrispGate, GateState, Hold};

use crate::broker::settle::{settle, Settled};
use crate::config::{DeliveryConfig, Unmatched};
use crate::crisp::{CrispClient, Failure};
use crate::decode::decode;
use crate::outcome::{mask_people_id, DeadLetter, Disposition, Reason, RequeueKind};
use crate::route::{Mapped, Routed, Router};
use crate::telemetry::metrics::{self, Outcome, NO_RULE};
use dedup::Dedup;
use futures_util::FutureExt;
use lanes::Lanes;
use lapin::message::Delivery;
use lapin::Channel;
use limit::AdaptiveLimit;
use pace::{backoff, Pace};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs one message's work; a panic (a bug) becomes a requeue that counts toward the
/// delivery limit, so a message that always panics ends in the dead-letter queue
/// instead of cycling, and the lane lives on for that person's later messages.
async fn contain_panic(
    work: impl std::future::Future<Output = Disposition>,
    rule: &str,
) -> Disposition {
    match AssertUnwindSafe(work).catch_unwind().await {
        Ok(disposition) => disposition,
        Err(_) => {
            metrics::lane_panic();
            tracing::error!(
                rule,
                "handling a message panicked (a bug); handing it back to the broker"
            );
            Disposition::Requeue(RequeueKind::RetriesExhausted)
        }
    }
}

/// A delivery and everything needed to settle it.
struct Job {
    /// Shared by every delivery of a session: cloning a lapin `Channel` per message was
    /// a visible part of the CPU per message (issue 10).
    channel: Arc<Channel>,
    delivery: Delivery,
    mapped: Mapped,
}

/// Settings the pipeline needs besides the delivery section.
pub struct PipelineSettings {
    pub delivery: DeliveryConfig,
    pub create_missing_profiles: bool,
    pub dead_letter_exchange: String,
    pub max_message_bytes: usize,
}

pub struct Pipeline {
    router: Router,
    client: CrispClient,
    settings: PipelineSettings,
    limit: AdaptiveLimit,
    pace: Pace,
    lanes: Lanes<Job>,
    dedup: Dedup,
    pub gate: Arc<CrispGate>,
    pub hold: Arc<Hold>,
    /// Requests Crisp accepted since start: a message whose retries ran out while this
    /// did not move saw an outage, not a problem of its own.
    accepted: AtomicU64,
    tasks: TaskTracker,
    /// Shutdown began: start nothing new, requeue what waits.
    stopping: CancellationToken,
    /// `shutdown_timeout` passed: abandon requests in flight and requeue them.
    abandon: CancellationToken,
}

impl Pipeline {
    pub fn new(router: Router, client: CrispClient, settings: PipelineSettings) -> Arc<Self> {
        Arc::new(Self {
            limit: AdaptiveLimit::new(settings.delivery.concurrency),
            pace: Pace::new(settings.delivery.max_requests_per_second),
            dedup: Dedup::new(settings.delivery.dedup_window),
            router,
            client,
            settings,
            lanes: Lanes::default(),
            gate: Arc::new(CrispGate::default()),
            hold: Arc::new(Hold::default()),
            accepted: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
            abandon: CancellationToken::new(),
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Takes one delivery from the consumer. Never blocks on Crisp: deliveries run on
    /// their person's lane.
    pub fn handle(self: &Arc<Self>, channel: Arc<Channel>, delivery: Delivery) {
        let max = self.settings.max_message_bytes;
        let decision = if delivery.data.len() > max {
            Routed::Invalid(DeadLetter::new(
                Reason::TooLarge,
                format!(
                    "body is {} bytes, over amqp.max_message_bytes ({max}); not parsed",
                    delivery.data.len()
                ),
                None,
            ))
        } else {
            decode(&delivery.data)
                .map(|doc| self.router.route(delivery.routing_key.as_str(), &doc))
                .unwrap_or_else(Routed::Invalid)
        };
        let mapped = match decision {
            Routed::Event(mapped) => mapped,
            Routed::Unmatched => {
                let disposition = match self.settings.delivery.unmatched {
                    Unmatched::Ack => Disposition::Ack { delivered: false },
                    Unmatched::DeadLetter => Disposition::DeadLetter(DeadLetter::new(
                        Reason::Unmatched,
                        format!("no rule matches routing key `{}`", delivery.routing_key),
                        None,
                    )),
                };
                return self.settle_in_background(channel, delivery, NO_RULE.into(), disposition);
            }
            Routed::Invalid(dl) => {
                let rule = dl.rule.clone().unwrap_or_else(|| NO_RULE.into());
                return self.settle_in_background(
                    channel,
                    delivery,
                    rule,
                    Disposition::DeadLetter(dl),
                );
            }
        };
        metrics::data_counts(&mapped.rule, &mapped.counts);
        let key = self.lanes.key(&mapped.people_id);
        let job = Job {
            channel,
            delivery,
            mapped,
        };
        if let Some(first) = self.lanes.push(key, job) {
            let this = Arc::clone(self);
            self.tasks
                .spawn(async move { this.run_lane(key, first).await });
        }
    }

    fn settle_in_background(
        self: &Arc<Self>,
        channel: Arc<Channel>,
        delivery: Delivery,
        rule: String,
        disposition: Disposition,
    ) {
        let this = Arc::clone(self);
        self.tasks
            .spawn(async move { this.finish(&channel, &delivery, &rule, disposition).await });
    }

    async fn run_lane(self: Arc<Self>, key: u64, first: Job) {
        let mut job = first;
        loop {
            // A panic (a bug) must not take the lane with it: that person's later
            // messages would wait forever while the pod looks ready.
            let disposition = contain_panic(self.run_job(&job), &job.mapped.rule).await;
            self.finish(&job.channel, &job.delivery, &job.mapped.rule, disposition)
                .await;
            match self.lanes.next(key) {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    async fn run_job(&self, job: &Job) -> Disposition {
        let message_id = job
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str());
        let body = job.delivery.data.as_slice();
        let disposition = if !job.delivery.acker.usable() || !job.channel.status().connected() {
            // The channel died while this waited: the broker redelivers the message
            // on the new channel, so posting it now would only make a duplicate.
            Disposition::Requeue(RequeueKind::NotNow)
        } else if self.not_now() {
            Disposition::Requeue(RequeueKind::NotNow)
        } else if message_id.is_some_and(|id| self.dedup.seen(id, body)) {
            // Checked here, not on arrival: a redelivery queued behind its own
            // original in this lane sees the original's result.
            metrics::duplicate_suppressed();
            tracing::info!(rule = %job.mapped.rule, "this message (same message_id, same body) was already delivered by this pod; acking the redelivery without posting it again");
            Disposition::Ack { delivered: false }
        } else {
            self.deliver(&job.mapped).await
        };
        if let (Disposition::Ack { delivered: true }, Some(id)) = (&disposition, message_id) {
            self.dedup.remember(id, body);
        }
        disposition
    }

    /// Sends one event, retrying transient failures until `max_retry_time`.
    async fn deliver(&self, mapped: &Mapped) -> Disposition {
        let d = &self.settings.delivery;
        let started = Instant::now();
        let accepted_before = self.accepted.load(Ordering::Relaxed);
        let mut attempt = 0u32;
        let mut created_profile = false;
        loop {
            let paused = self.pace.paused_for();
            if started.elapsed() + paused > d.max_retry_time {
                // Waiting out Crisp's pause would overrun this message's budget (and
                // could near the broker's consumer timeout): hand it back and hold.
                self.hold.hold_until(Instant::now() + paused);
                return Disposition::Requeue(RequeueKind::NotNow);
            }
            let result = {
                let Some(_slot) = self.acquire().await else {
                    return Disposition::Requeue(RequeueKind::NotNow);
                };
                self.pace.wait_turn().await;
                if self.not_now() {
                    return Disposition::Requeue(RequeueKind::NotNow);
                }
                metrics::in_flight(1.0);
                let result = tokio::select! {
                    r = self.client.add_event(&mapped.people_id, &mapped.event) => Some(r),
                    _ = self.abandon.cancelled() => None,
                };
                metrics::in_flight(-1.0);
                match result {
                    Some(r) => r,
                    None => return Disposition::Requeue(RequeueKind::NotNow),
                }
            };
            let error = match result {
                Ok(()) => {
                    self.limit.on_success();
                    self.accepted.fetch_add(1, Ordering::Relaxed);
                    return Disposition::Ack { delivered: true };
                }
                Err(e) => e,
            };
            let who = mask_people_id(&mapped.people_id);
            match error.failure {
                Failure::Rejected => {
                    return Disposition::DeadLetter(DeadLetter::new(
                        Reason::CrispRejected,
                        error.message,
                        Some(&mapped.rule),
                    ))
                }
                Failure::PeopleNotFound
                    if self.settings.create_missing_profiles
                        && !created_profile
                        && mapped.people_id.contains('@') =>
                {
                    created_profile = true;
                    match self.client.create_profile(&mapped.people_id).await {
                        Ok(()) => {
                            tracing::info!(rule = %mapped.rule, people_id = %who, "created the missing Crisp profile; sending the event once more");
                            continue;
                        }
                        Err(e) if e.failure == Failure::Refused => return self.refused(&e.message),
                        Err(e) => {
                            tracing::warn!(rule = %mapped.rule, people_id = %who, error = %e, "could not create the missing Crisp profile");
                            return Disposition::DeadLetter(DeadLetter::new(
                                Reason::PeopleNotFound,
                                format!("no Crisp profile for {who}, and creating it failed: {e}"),
                                Some(&mapped.rule),
                            ));
                        }
                    }
                }
                Failure::PeopleNotFound => {
                    let hint = if self.settings.create_missing_profiles {
                        "and it cannot be created (only emails can)"
                    } else {
                        "set crisp.create_missing_profiles = true to create it"
                    };
                    return Disposition::DeadLetter(DeadLetter::new(
                        Reason::PeopleNotFound,
                        format!("Crisp has no profile for {who}; {hint}"),
                        Some(&mapped.rule),
                    ));
                }
                Failure::Refused => return self.refused(&error.message),
                Failure::Transient | Failure::RateLimited => {
                    self.limit.on_overload();
                    let wait =
                        backoff(attempt, d.initial_backoff, d.max_backoff, error.retry_after);
                    let rate_limited = error.failure == Failure::RateLimited;
                    if rate_limited {
                        self.pace.pause_for(wait);
                    }
                    if started.elapsed() + wait > d.max_retry_time {
                        if rate_limited {
                            // Crisp keeps saying "not now" (a spent quota): pause consuming
                            // so the messages wait in the broker instead of cycling.
                            let hold = wait.max(d.max_backoff);
                            if self.hold.hold_until(Instant::now() + hold) {
                                tracing::warn!(rule = %mapped.rule, hold_s = hold.as_secs(), error = %error, "Crisp keeps rate limiting us; pausing consumption");
                            }
                            return Disposition::Requeue(RequeueKind::NotNow);
                        }
                        if self.accepted.load(Ordering::Relaxed) == accepted_before {
                            // Nothing got through for anyone all this time: Crisp is down.
                            // Stop taking deliveries and probe, so no message burns its
                            // delivery limit cycling through the queue.
                            if self.gate.outage() {
                                tracing::warn!(rule = %mapped.rule, error = %error, "Crisp keeps failing; pausing consumption until a probe gets through (messages wait in the broker, nothing is dead-lettered)");
                            }
                            return Disposition::Requeue(RequeueKind::NotNow);
                        }
                        tracing::warn!(rule = %mapped.rule, people_id = %who, attempts = attempt + 1, error = %error, "giving up for now after max_retry_time; requeueing");
                        // Counts toward the queue's delivery limit: a message that never
                        // gets through ends in the dead-letter queue.
                        return Disposition::Requeue(RequeueKind::RetriesExhausted);
                    }
                    tracing::debug!(rule = %mapped.rule, people_id = %who, attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying");
                    metrics::retry();
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stopping.cancelled() => return Disposition::Requeue(RequeueKind::NotNow),
                        // Paused for a refusal or an outage: hand it back now, not after
                        // the backoff, so the pause does not wait on sleeping retries.
                        _ = self.gate.closed() => return Disposition::Requeue(RequeueKind::NotNow),
                    }
                }
            }
        }
    }

    async fn acquire(&self) -> Option<limit::Slot<'_>> {
        tokio::select! {
            slot = self.limit.acquire() => Some(slot),
            _ = self.stopping.cancelled() => None,
        }
    }

    /// Nothing may be sent now: shutting down, refused, or holding for a rate limit.
    fn not_now(&self) -> bool {
        self.stopping.is_cancelled() || !self.gate.is_open() || self.hold.is_holding()
    }

    fn refused(&self, message: &str) -> Disposition {
        if self.gate.refuse() {
            tracing::error!(error = message, "Crisp refuses our requests; pausing consumption until it accepts again (nothing is dead-lettered)");
        }
        Disposition::Requeue(RequeueKind::NotNow)
    }

    async fn finish(
        &self,
        channel: &Channel,
        delivery: &Delivery,
        rule: &str,
        disposition: Disposition,
    ) {
        let settled = settle(
            channel,
            &self.settings.dead_letter_exchange,
            delivery,
            &disposition,
        )
        .await;
        let outcome = match (&disposition, settled) {
            (_, Settled::DeadLetterFailed) => Outcome::Requeued,
            (Disposition::Ack { delivered: true }, _) => Outcome::Delivered,
            (Disposition::Ack { delivered: false }, _) => Outcome::Skipped,
            (Disposition::DeadLetter(dl), _) => {
                metrics::dead_letter(rule, dl.reason.code());
                tracing::warn!(reason = dl.reason.code(), rule, detail = %dl.detail, "dead-lettered a message");
                Outcome::DeadLettered
            }
            (Disposition::Requeue(_), _) => Outcome::Requeued,
        };
        metrics::message(rule, outcome);
        if outcome != Outcome::Requeued {
            metrics::message_age(delivery.properties.timestamp().as_ref().copied());
        }
    }

    /// Probes Crisp with backoff (capped at 30 s) until it answers and accepts our
    /// credentials again (after a refusal, a redirect or an outage).
    pub async fn wait_until_crisp_accepts(&self, stop: &CancellationToken) {
        let mut delay = Duration::from_millis(500);
        while !self.gate.is_open() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
            match self.client.probe().await {
                Ok(()) => {
                    tracing::info!("Crisp accepts our requests again; resuming consumption");
                    self.gate.accept();
                }
                Err(e) if e.failure == Failure::Refused => {
                    if self.gate.refuse() {
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

    /// Waits until nothing is running (used before closing a channel we stop consuming on).
    pub async fn wait_idle(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
    }

    /// Stops taking work: deliveries waiting in lanes are requeued, in-flight ones get
    /// `timeout` to finish, then they are abandoned and requeued.
    pub async fn shutdown(&self, timeout: Duration) {
        self.stopping.cancel();
        self.tasks.close();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout_s = timeout.as_secs_f64(),
                "in-flight deliveries did not finish in shutdown_timeout; requeueing them"
            );
            self.abandon.cancel();
            self.tasks.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_hands_the_message_back_and_is_counted() {
        // Stands for any bug, like the `Instant + Duration::MAX` a huge Retry-After caused.
        let panicking = async {
            let far = std::hint::black_box(Duration::MAX);
            let _ = Instant::now() + far;
            Disposition::Ack { delivered: true }
        };
        assert_eq!(
            contain_panic(panicking, "r").await,
            Disposition::Requeue(RequeueKind::RetriesExhausted)
        );
        let fine = async { Disposition::Ack { delivered: true } };
        assert_eq!(
            contain_panic(fine, "r").await,
            Disposition::Ack { delivered: true }
        );
    }
}
