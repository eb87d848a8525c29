//! Runs deliveries: decode -> route/map -> (lane per people id) -> deliver through the
//! [`Flow`] -> the message's [`fate`] -> settle, all settlements through one path.

mod backoff;
mod dedup;
mod deliver;
mod fate;
mod flow;
mod lanes;
mod limit;
mod pacing;
mod triage;

pub use backoff::{Backoff, Jitter};
pub use fate::{fate, unmatched_detail, FateSettings, Happened};
pub use flow::{CrispRoute, Flow, FlowState};
pub use triage::{triage, triage_seeing, Triaged};

use crate::broker::acks::Acks;
use crate::broker::settle::{settle, Settled, Settlement};
use crate::config::{AmqpConfig, DeliveryConfig};
use crate::crisp::CrispClient;
use crate::decode::Incoming;
use crate::outcome::{mask_people_id, Disposition};
use crate::route::{Mapped, Router};
use crate::telemetry::metrics::{self, MessageOutcome, NO_RULE};
use crate::telemetry::tap::{Decision, Tap};
use crate::telemetry::traces::{self, Trace};
use dedup::Dedup;
use futures_util::FutureExt;
use lanes::Lanes;
use lapin::message::Delivery;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
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
    /// Handed back by then at the latest, waiting or not: well before the broker's
    /// consumer timeout closes the channel holding it.
    hand_back_at: Instant,
    /// When it reached the pod (the tap's latency).
    received: Instant,
    /// Crisp's last answer for it, 0 for none (the tap's `crisp_status`).
    crisp_status: AtomicU16,
    /// Its `crisp_bridge.message` span; none when traces are off.
    trace: Trace,
}

impl Job {
    fn seen(&self) -> Seen<'_> {
        Seen {
            trace: &self.trace,
            people_id: Some(&self.mapped.people_id),
            crisp_status: self.crisp_status.load(Ordering::Relaxed),
            received: self.received,
        }
    }

    /// Crisp answered: its status (0 when no status came, e.g. a timeout).
    fn answered(&self, answer: &Result<u16, crate::crisp::CrispError>) {
        let status = answer
            .as_ref()
            .map_or_else(|e| e.status.unwrap_or(0), |s| *s);
        self.crisp_status.store(status, Ordering::Relaxed);
    }
}

/// What the tap (and the trace) shows of a delivery besides its fate.
struct Seen<'a> {
    /// Its `crisp_bridge.message` span (none when traces are off).
    trace: &'a Trace,
    /// Unmasked: masked only when a line is built.
    people_id: Option<&'a str>,
    /// 0: no answer from Crisp.
    crisp_status: u16,
    received: Instant,
}

impl<'a> Seen<'a> {
    fn nothing(received: Instant, trace: &'a Trace) -> Self {
        Seen {
            trace,
            people_id: None,
            crisp_status: 0,
            received,
        }
    }
}

/// Settings the pipeline needs besides the delivery section.
pub struct PipelineSettings {
    pub delivery: DeliveryConfig,
    pub create_missing_profiles: bool,
    pub dead_letter_exchange: String,
    pub max_message_bytes: usize,
    /// How long a delivery may stay with the pod: half the broker's consumer timeout, so
    /// a request started just before still settles in time.
    pub hand_back_after: Duration,
    /// The dead-letter topology to declare again when a dead-letter copy finds no
    /// queue (`amqp.declare = true`); `None`: never declared by us.
    pub redeclare: Option<Arc<AmqpConfig>>,
    /// With a single active consumer: what goes back once shutdown began is left
    /// unsettled, for the broker to take back when the channel closes (see
    /// [`Pipeline::finish`]).
    pub leave_to_broker_at_shutdown: bool,
    /// The queue consumed (`messaging.destination.name` of the traces).
    pub queue: String,
}

pub struct Pipeline {
    router: Router,
    client: CrispClient,
    settings: PipelineSettings,
    lanes: Lanes<Job>,
    dedup: Dedup,
    /// Everything about when and how fast requests go to Crisp.
    flow: Arc<Flow>,
    tasks: TaskTracker,
    /// Shutdown began: start nothing new, requeue what waits.
    stopping: CancellationToken,
    /// Whoever listens to the decisions (`GET /tap`).
    tap: Arc<Tap>,
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
            tap: Tap::new(),
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Cancelled when the pipeline stops taking work.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    /// The decisions' subscribers, for the admin server's `/tap`.
    pub fn tap(&self) -> Arc<Tap> {
        Arc::clone(&self.tap)
    }

    /// The flow's state, for readiness (only the flow writes it).
    pub fn flow(&self) -> Arc<Flow> {
        Arc::clone(&self.flow)
    }

    /// Takes one delivery from the consumer. Never blocks on Crisp: deliveries run on
    /// their person's lane.
    pub fn handle(self: &Arc<Self>, acks: Arc<Acks>, delivery: Delivery) {
        acks.received(delivery.delivery_tag);
        let received = Instant::now();
        let hand_back_at = received + self.settings.hand_back_after;
        // With traces off, this one atomic load is all they cost.
        let mut span =
            traces::enabled().then(|| traces::MessageSpan::begin(&delivery, &self.settings.queue));
        let triaged = triage_seeing(
            &self.router,
            self.settings.max_message_bytes,
            delivery.routing_key.as_str(),
            &Incoming::from_delivery(&delivery),
            |decoded| {
                if let Some(span) = span.as_mut() {
                    span.cloud_event_parent(decoded);
                }
            },
        );
        let trace = span.map(traces::MessageSpan::start).unwrap_or_default();
        let (mapped, id) = match triaged {
            Triaged::Event { mapped, id } => (mapped, id),
            Triaged::Done(happened) => {
                let rule = match &happened {
                    Happened::Invalid(dl) => dl.rule.clone(),
                    _ => None,
                }
                .unwrap_or_else(|| NO_RULE.into());
                return self.settle_in_background(acks, delivery, rule, happened, received, trace);
            }
        };
        metrics::data_counts(&mapped.rule, &mapped.counts);
        let key = self.lanes.key(&mapped.people_id);
        let job = Job {
            acks,
            delivery,
            mapped,
            id,
            hand_back_at,
            received,
            crisp_status: AtomicU16::new(0),
            trace,
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
        received: Instant,
        trace: Trace,
    ) {
        let this = Arc::clone(self);
        let hand_back_at = received + self.settings.hand_back_after;
        let inside = trace.clone();
        self.tasks.spawn(trace.wrap(async move {
            let seen = Seen::nothing(received, &inside);
            this.finish(&acks, &delivery, &rule, happened, hand_back_at, seen)
                .await
        }));
    }

    /// Runs `job`, then the lane's next ones. When one is handed back to the broker, the
    /// lane's later ones go back with it, in order, so none of that person's later
    /// events overtakes it. (Futures here are kept small: every prefetched message may
    /// hold a lane task, and its state is moved and allocated.)
    async fn run_lane(self: Arc<Self>, key: u64, mut job: Job) {
        loop {
            // A panic (a bug) must not take the lane with it: that person's later
            // messages would wait forever while the pod looks ready.
            let happened = job
                .trace
                .wrap(contain_panic(self.run_job(&job), &job.mapped.rule))
                .await;
            // Taken off the lane before the message goes back: its redelivery may arrive
            // at once and must not queue behind the later ones.
            // (A message of that person delivered after this point is not held by us
            // and may overtake it; a single active consumer keeps even that in order.)
            let mut later = self.goes_back(&happened).then(|| self.lanes.close(key));
            let requeued = job
                .trace
                .wrap(self.finish(
                    &job.acks,
                    &job.delivery,
                    &job.mapped.rule,
                    happened,
                    job.hand_back_at,
                    job.seen(),
                ))
                .await;
            if requeued && later.is_none() {
                // A dead letter that could not be published went back after all.
                later = Some(self.lanes.close(key));
            }
            if let Some(later) = later {
                for job in later {
                    job.trace
                        .wrap(self.finish(
                            &job.acks,
                            &job.delivery,
                            &job.mapped.rule,
                            Happened::NotStarted,
                            job.hand_back_at,
                            job.seen(),
                        ))
                        .await;
                }
                return;
            }
            match self.lanes.next(key) {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    /// The message's fate is to go back to the queue.
    fn goes_back(&self, happened: &Happened) -> bool {
        let settings = FateSettings {
            unmatched: self.settings.delivery.unmatched,
        };
        matches!(fate(happened.clone(), settings), Disposition::Requeue(_))
    }

    async fn run_job(&self, job: &Job) -> Happened {
        let message_id = job.id.as_deref();
        let body = job.delivery.data.as_slice();
        let happened = if !job.delivery.acker.usable() || !job.acks.channel().status().connected() {
            // The channel died while this waited: the broker redelivers the message
            // on the new channel, so posting it now would only make a duplicate.
            Happened::ChannelGone
        } else if self.stopping.is_cancelled() || Instant::now() >= job.hand_back_at {
            // Stopping, or it waited behind its person's earlier messages until its
            // hand-back time.
            Happened::NotStarted
        } else if message_id.is_some_and(|id| self.dedup.seen(id, body)) {
            // Checked here, not on arrival: a redelivery queued behind its own
            // original in this lane sees the original's result.
            metrics::duplicate_suppressed();
            tracing::info!(rule = %job.mapped.rule, "this message (same message_id, same body) was already delivered by this pod; acking the redelivery without posting it again");
            Happened::Duplicate
        } else {
            self.deliver(job).await
        };
        if let (Happened::Delivered, Some(id)) = (&happened, message_id) {
            self.dedup.remember(id, body);
        }
        happened
    }

    /// Requeues a delivery that was prefetched but never started (the consumer stopped).
    pub async fn hand_back(&self, acks: &Acks, delivery: &Delivery) {
        acks.received(delivery.delivery_tag);
        let now = Instant::now();
        self.finish(
            acks,
            delivery,
            NO_RULE,
            Happened::NotStarted,
            now,
            Seen::nothing(now, &Trace::default()),
        )
        .await;
    }

    /// The one path every delivery is settled through: its fate, then the broker, then
    /// its metrics and its tap line. True when the delivery went back to the queue.
    async fn finish(
        &self,
        acks: &Acks,
        delivery: &Delivery,
        rule: &str,
        happened: Happened,
        hand_back_at: Instant,
        seen: Seen<'_>,
    ) -> bool {
        let trace = seen.trace;
        let settings = FateSettings {
            unmatched: self.settings.delivery.unmatched,
        };
        // A `&'static str` picked by a match: kept for the tap, whether anyone listens.
        let mut reason = happened.reason();
        let mut disposition = fate(happened, settings);
        if self.settings.leave_to_broker_at_shutdown
            && self.stopping.is_cancelled()
            && matches!(disposition, Disposition::Requeue(_))
        {
            // This pod stays the active consumer until its channel closes (it does not
            // cancel: a cancel would make a standby active at once, ahead of what this
            // pod holds), so a requeue would only come back here, counting toward the
            // delivery limit each time. Left open (no `multiple` ack covers it), it goes
            // back when the channel closes: the broker puts everything this pod held at
            // the head of the queue, in delivery order, then hands the queue over.
            metrics::message(rule, MessageOutcome::Requeued);
            trace.settled(rule, MessageOutcome::Requeued.as_str(), reason);
            return true;
        }
        match Settlement::of(&disposition) {
            // Sent by the session's flusher, usually with others (`multiple`).
            None => acks.ack(delivery.delivery_tag),
            Some(settlement) => {
                // Boxed: the rare path's future (a dead letter's publish and confirm)
                // would otherwise size every lane's task.
                let replaced =
                    Box::pin(self.settle_rare(acks, delivery, settlement, hand_back_at)).await;
                // Only now may a batch cover the tags above this one.
                acks.settled(delivery.delivery_tag);
                if let Some(instead) = replaced {
                    reason = instead.reason();
                    disposition = fate(instead, settings);
                }
            }
        }
        let outcome = match &disposition {
            Disposition::Ack { delivered: true } => MessageOutcome::Delivered,
            Disposition::Ack { delivered: false } => MessageOutcome::Skipped,
            Disposition::DeadLetter(dl) => {
                metrics::dead_letter(rule, dl.reason.code());
                tracing::warn!(reason = dl.reason.code(), rule, detail = %dl.detail, "dead-lettered a message");
                MessageOutcome::DeadLettered
            }
            Disposition::Requeue(_) => MessageOutcome::Requeued,
        };
        metrics::message(rule, outcome);
        trace.settled(rule, outcome.as_str(), reason);
        if outcome != MessageOutcome::Requeued {
            metrics::message_age(delivery.properties.timestamp().as_ref().copied());
        }
        // With nobody listening, the tap costs this one atomic load.
        if self.tap.active() {
            self.tap.emit(&Decision::new(
                rule,
                outcome.as_str(),
                reason,
                seen.people_id.map(mask_people_id),
                (seen.crisp_status != 0).then_some(seen.crisp_status),
                seen.received.elapsed(),
            ));
        }
        outcome == MessageOutcome::Requeued
    }

    /// Settles a dead letter or a requeue; returns what happened instead (a requeue), if
    /// it came to that.
    async fn settle_rare(
        &self,
        acks: &Acks,
        delivery: &Delivery,
        settlement: Settlement<'_>,
        hand_back_at: Instant,
    ) -> Option<Happened> {
        let channel = acks.channel();
        let exchange = &self.settings.dead_letter_exchange;
        let settings = FateSettings {
            unmatched: self.settings.delivery.unmatched,
        };
        let mut redeclared = false;
        let mut blocked: Option<flow::DeadLetterBlock<'_>> = None;
        let mut blocked_attempt = 0u32;
        loop {
            match settle(channel, exchange, delivery, settlement).await {
                Settled::Done => {
                    if matches!(settlement, Settlement::DeadLetter(_))
                        && self.flow.unblock_dead_letters()
                    {
                        tracing::info!(exchange = %exchange, "a queue takes dead-letter copies again; resuming");
                    }
                    return None;
                }
                Settled::Stale => return None,
                Settled::DeadLetterFailed => {
                    let requeue = fate(Happened::DeadLetterUnconfirmed, settings);
                    if let Some(settlement) = Settlement::of(&requeue) {
                        settle(channel, exchange, delivery, settlement).await;
                    }
                    return Some(Happened::DeadLetterUnconfirmed);
                }
                Settled::DeadLetterReturned => {}
            }
            // No queue took the copy: the original stays unacked (it is not lost, and
            // it does not go back to the queue, where the broker's own dead-lettering
            // would find no queue either).
            if let (Some(amqp), false) = (&self.settings.redeclare, redeclared) {
                redeclared = true;
                match crate::broker::declare_dead_letter_topology(channel, amqp).await {
                    Ok(()) => {
                        tracing::warn!(exchange = %exchange, queue = %amqp.dead_letter_queue, "a dead-letter copy found no queue; declared the dead-letter queue again and sending the copy again");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(exchange = %exchange, error = %e, "a dead-letter copy found no queue, and declaring the dead-letter topology again failed")
                    }
                }
            }
            if blocked.is_none() {
                let block = self.flow.block_dead_letters();
                if block.began() {
                    tracing::error!(exchange = %exchange, "a dead-letter copy found no queue bound to the dead-letter exchange; holding (nothing is sent, /readyz fails) until one is: bind amqp.dead_letter_queue to it, or set amqp.declare = true");
                }
                blocked = Some(block);
            }
            let wait = self.flow.trial_backoff().delay(blocked_attempt);
            blocked_attempt = blocked_attempt.saturating_add(1);
            let until = (Instant::now() + wait).min(hand_back_at);
            let waited = tokio::select! {
                _ = tokio::time::sleep_until(until) => Instant::now() < hand_back_at,
                _ = acks.give_up().cancelled() => false,
            };
            if !waited || !channel.status().connected() {
                // Stopping, the session gone, or held as long as the consumer timeout
                // allows: back to the queue, uncounted. When no blocked copy is left
                // waiting, the block ends with it (the next returned copy blocks again),
                // so the redelivery can reach Crisp and try its dead letter anew.
                let requeue = fate(Happened::NotStarted, settings);
                if let Some(settlement) = Settlement::of(&requeue) {
                    settle(channel, exchange, delivery, settlement).await;
                }
                return Some(Happened::NotStarted);
            }
        }
    }

    /// Stops taking work: deliveries waiting (in lanes, at the gate, in a backoff) are
    /// requeued at once, in-flight ones get until `deadline` to finish, then they are
    /// abandoned and requeued; settling those gets until `give_up_at`.
    pub async fn shutdown(&self, deadline: Instant, give_up_at: Instant) {
        self.stopping.cancel();
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight deliveries did not finish in shutdown_timeout; requeueing them"
            );
            self.abandon.cancel();
            if tokio::time::timeout_at(give_up_at, self.tasks.wait())
                .await
                .is_err()
            {
                tracing::warn!("some deliveries could not be settled in time; the broker requeues them when the connection closes");
            }
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
