//! Runs deliveries: decode -> route/map -> (lane per people id) -> deliver through the
//! [`Flow`] -> the message's [`fate`] -> settle, all settlements through one path.

mod dedup;
mod fate;
mod flow;
mod lanes;
mod limit;

pub use fate::{fate, FateSettings, Happened};
pub use flow::{Flow, FlowState};

use crate::broker::acks::Acks;
use crate::broker::settle::{settle, Settled};
use crate::config::DeliveryConfig;
use crate::crisp::{CrispClient, Failure};
use crate::decode::{decode, Incoming};
use crate::outcome::{mask_people_id, DeadLetter, Disposition, Reason};
use crate::route::{Mapped, Routed, Router};
use crate::telemetry::metrics::{self, Outcome, NO_RULE};
use dedup::Dedup;
use flow::Retry;
use futures_util::FutureExt;
use lanes::Lanes;
use lapin::message::Delivery;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs one message's work; a panic (a bug) becomes a requeue that counts toward the
/// delivery limit, so a message that always panics ends in the dead-letter queue
/// instead of cycling, and the lane lives on for that person's later messages.
/// (Not an `async fn`: that would hold `work` twice in its state, as the argument and
/// inside `catch_unwind`.)
fn contain_panic<'a>(
    work: impl std::future::Future<Output = Happened> + 'a,
    rule: &'a str,
) -> impl std::future::Future<Output = Happened> + 'a {
    AssertUnwindSafe(work)
        .catch_unwind()
        .map(move |result| match result {
            Ok(happened) => happened,
            Err(_) => {
                metrics::lane_panic();
                tracing::error!(
                    rule,
                    "handling a message panicked (a bug); handing it back to the broker"
                );
                Happened::Panicked
            }
        })
}

/// A delivery and everything needed to settle it.
struct Job {
    /// The session's channel and its acks, shared by every delivery of the session:
    /// cloning a lapin `Channel` per message was a visible part of the CPU per message.
    acks: Arc<Acks>,
    delivery: Delivery,
    mapped: Mapped,
    /// The duplicate window's id: CloudEvents `source` + `id`, else the AMQP `message_id`.
    id: Option<String>,
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
    lanes: Lanes<Job>,
    dedup: Dedup,
    /// Everything about when and how fast requests go to Crisp.
    pub flow: Arc<Flow>,
    tasks: TaskTracker,
    /// Shutdown began: start nothing new, requeue what waits.
    stopping: CancellationToken,
    /// `shutdown_timeout` passed: abandon requests in flight and requeue them.
    abandon: CancellationToken,
}

impl Pipeline {
    pub fn new(router: Router, client: CrispClient, settings: PipelineSettings) -> Arc<Self> {
        Arc::new(Self {
            flow: Arc::new(Flow::new(&settings.delivery)),
            dedup: Dedup::new(settings.delivery.dedup_window),
            router,
            client,
            settings,
            lanes: Lanes::default(),
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
    pub fn handle(self: &Arc<Self>, acks: Arc<Acks>, delivery: Delivery) {
        acks.received(delivery.delivery_tag);
        let max = self.settings.max_message_bytes;
        let mut id = None;
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
            match decode(&Incoming::from_delivery(&delivery)) {
                Ok(decoded) => {
                    id.clone_from(&decoded.id);
                    self.router
                        .route_decoded(delivery.routing_key.as_str(), &decoded)
                }
                Err(dl) => Routed::Invalid(dl),
            }
        };
        let mapped = match decision {
            Routed::Event(mapped) => mapped,
            Routed::Unmatched => {
                let happened = Happened::Unmatched {
                    routing_key: delivery.routing_key.to_string(),
                };
                return self.settle_in_background(acks, delivery, NO_RULE.into(), happened);
            }
            Routed::Invalid(dl) => {
                let rule = dl.rule.clone().unwrap_or_else(|| NO_RULE.into());
                return self.settle_in_background(acks, delivery, rule, Happened::Invalid(dl));
            }
        };
        metrics::data_counts(&mapped.rule, &mapped.counts);
        let key = self.lanes.key(&mapped.people_id);
        let job = Job {
            acks,
            delivery,
            mapped,
            id,
        };
        if let Some(first) = self.lanes.push(key, job) {
            self.tasks.spawn(Arc::clone(self).run_lane(key, first));
        }
    }

    fn settle_in_background(
        self: &Arc<Self>,
        acks: Arc<Acks>,
        delivery: Delivery,
        rule: String,
        happened: Happened,
    ) {
        let this = Arc::clone(self);
        self.tasks
            .spawn(async move { this.finish(&acks, &delivery, &rule, happened).await });
    }

    /// Runs `job`, then the lane's next ones. (Futures here are kept small: every
    /// prefetched message may hold a lane task, and its state is moved and allocated.)
    async fn run_lane(self: Arc<Self>, key: u64, mut job: Job) {
        loop {
            // A panic (a bug) must not take the lane with it: that person's later
            // messages would wait forever while the pod looks ready.
            let happened = contain_panic(self.run_job(&job), &job.mapped.rule).await;
            self.finish(&job.acks, &job.delivery, &job.mapped.rule, happened)
                .await;
            match self.lanes.next(key) {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    async fn run_job(&self, job: &Job) -> Happened {
        let message_id = job.id.as_deref();
        let body = job.delivery.data.as_slice();
        let happened = if !job.delivery.acker.usable() || !job.acks.channel().status().connected() {
            // The channel died while this waited: the broker redelivers the message
            // on the new channel, so posting it now would only make a duplicate.
            Happened::ChannelGone
        } else if self.not_now() {
            Happened::NotStarted
        } else if message_id.is_some_and(|id| self.dedup.seen(id, body)) {
            // Checked here, not on arrival: a redelivery queued behind its own
            // original in this lane sees the original's result.
            metrics::duplicate_suppressed();
            tracing::info!(rule = %job.mapped.rule, "this message (same message_id, same body) was already delivered by this pod; acking the redelivery without posting it again");
            Happened::Duplicate
        } else {
            self.deliver(&job.mapped).await
        };
        if let (Happened::Delivered, Some(id)) = (&happened, message_id) {
            self.dedup.remember(id, body);
        }
        happened
    }

    /// Sends one event through the flow, retrying as the flow says.
    async fn deliver(&self, mapped: &Mapped) -> Happened {
        let mut budget = self.flow.budget();
        let mut created_profile = false;
        loop {
            let Ok(permit) = self.flow.permit(&budget, &self.stopping).await else {
                return Happened::NotStarted;
            };
            metrics::in_flight(1.0);
            let result = tokio::select! {
                r = self.client.add_event(&mapped.people_id, &mapped.event) => Some(r),
                _ = self.abandon.cancelled() => None,
            };
            metrics::in_flight(-1.0);
            let error = match result {
                None => return Happened::NotStarted,
                Some(Ok(())) => {
                    self.flow.succeeded(permit);
                    return Happened::Delivered;
                }
                Some(Err(e)) => e,
            };
            let who = mask_people_id(&mapped.people_id);
            let rule = mapped.rule.to_string();
            match error.failure {
                Failure::Rejected => {
                    return Happened::CrispRejected {
                        detail: error.message,
                        rule,
                    }
                }
                Failure::PeopleNotFound
                    if self.settings.create_missing_profiles
                        && !created_profile
                        && mapped.people_id.contains('@') =>
                {
                    drop(permit);
                    created_profile = true;
                    match Box::pin(self.client.create_profile(&mapped.people_id)).await {
                        Ok(()) => {
                            tracing::info!(rule = %mapped.rule, people_id = %who, "created the missing Crisp profile; sending the event once more");
                            continue;
                        }
                        Err(e) if e.failure == Failure::Refused => return self.refused(&e.message),
                        Err(e) => {
                            tracing::warn!(rule = %mapped.rule, people_id = %who, error = %e, "could not create the missing Crisp profile");
                            return Happened::PeopleNotFound {
                                detail: format!(
                                    "no Crisp profile for {who}, and creating it failed: {e}"
                                ),
                                rule,
                            };
                        }
                    }
                }
                Failure::PeopleNotFound => {
                    let hint = if self.settings.create_missing_profiles {
                        "and it cannot be created (only emails can)"
                    } else {
                        "set crisp.create_missing_profiles = true to create it"
                    };
                    return Happened::PeopleNotFound {
                        detail: format!("Crisp has no profile for {who}; {hint}"),
                        rule,
                    };
                }
                Failure::Refused => return self.refused(&error.message),
                Failure::Transient | Failure::RateLimited => {
                    let attempts = budget.attempts() + 1;
                    match self.flow.failed(permit, &mut budget, &error) {
                        Retry::Held => return Happened::Held,
                        Retry::Exhausted => {
                            tracing::warn!(rule = %mapped.rule, people_id = %who, attempts, error = %error, "giving up for now after max_retry_time; requeueing");
                            return Happened::RetriesExhausted;
                        }
                        Retry::After(wait) => {
                            tracing::debug!(rule = %mapped.rule, people_id = %who, wait_ms = wait.as_millis() as u64, error = %error, "retrying");
                            metrics::retry();
                            let waited = Box::pin(async {
                                tokio::select! {
                                    _ = tokio::time::sleep(wait) => true,
                                    _ = self.stopping.cancelled() => false,
                                    // Paused for a refusal, an outage or a hold: hand it
                                    // back now, not after the backoff.
                                    _ = self.flow.closed() => false,
                                }
                            });
                            if !waited.await {
                                return Happened::NotStarted;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Nothing may be sent now: shutting down, refused, in an outage, or holding.
    fn not_now(&self) -> bool {
        self.stopping.is_cancelled() || !self.flow.state().is_sending()
    }

    fn refused(&self, message: &str) -> Happened {
        if self.flow.refuse() {
            tracing::error!(error = message, "Crisp refuses our requests; pausing consumption until it accepts again (nothing is dead-lettered)");
        }
        Happened::Refused
    }

    /// Requeues a delivery that was prefetched but never started (the consumer stopped).
    pub async fn hand_back(&self, acks: &Acks, delivery: &Delivery) {
        acks.received(delivery.delivery_tag);
        self.finish(acks, delivery, NO_RULE, Happened::NotStarted)
            .await;
    }

    /// The one path every delivery is settled through: its fate, then the broker.
    async fn finish(&self, acks: &Acks, delivery: &Delivery, rule: &str, happened: Happened) {
        let settings = FateSettings {
            unmatched: self.settings.delivery.unmatched,
        };
        let mut disposition = fate(happened, settings);
        if let Disposition::Ack { .. } = disposition {
            // Sent by the session's flusher, usually with others (`multiple`).
            acks.ack(delivery.delivery_tag);
        } else {
            let channel = acks.channel();
            let dead_letter_exchange = &self.settings.dead_letter_exchange;
            // Boxed: the rare path's future (a dead letter's publish and confirm) would
            // otherwise size every lane's task (issue 10).
            let settled = Box::pin(settle(
                channel,
                dead_letter_exchange,
                delivery,
                &disposition,
            ))
            .await;
            if settled == Settled::DeadLetterFailed {
                disposition = fate(Happened::DeadLetterUnconfirmed, settings);
                Box::pin(settle(
                    channel,
                    dead_letter_exchange,
                    delivery,
                    &disposition,
                ))
                .await;
            }
            // Only now may a batch cover the tags above this one.
            acks.settled(delivery.delivery_tag);
        }
        let outcome = match &disposition {
            Disposition::Ack { delivered: true } => Outcome::Delivered,
            Disposition::Ack { delivered: false } => Outcome::Skipped,
            Disposition::DeadLetter(dl) => {
                metrics::dead_letter(rule, dl.reason.code());
                tracing::warn!(reason = dl.reason.code(), rule, detail = %dl.detail, "dead-lettered a message");
                Outcome::DeadLettered
            }
            Disposition::Requeue(_) => Outcome::Requeued,
        };
        metrics::message(rule, outcome);
        if outcome != Outcome::Requeued {
            metrics::message_age(delivery.properties.timestamp().as_ref().copied());
        }
    }

    /// Probes Crisp with backoff (capped at 30 s) until it answers and accepts our
    /// credentials again (after a refusal, a redirect or an outage).
    pub async fn wait_until_crisp_accepts(&self, stop: &CancellationToken) {
        self.flow
            .probe_until_open(|| self.client.probe(), stop)
            .await;
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
            let _ = std::time::Instant::now() + far;
            Happened::Delivered
        };
        assert_eq!(contain_panic(panicking, "r").await, Happened::Panicked);
        let fine = async { Happened::Delivered };
        assert_eq!(contain_panic(fine, "r").await, Happened::Delivered);
    }
}
