//! Step 6, acks: the acknowledgements of one channel, sent in batches.
//!
//! Each lapin ack travels through lapin's internal RPC task, a task spawned per ack and
//! a wake of the IO thread, and each is one settle command for the broker (a Raft
//! command on a quorum queue): per message, that was a visible share of the bridge's CPU.
//! Here a delivery whose fate is an ack is only marked *ready*; one flusher
//! task per channel sends `basic.ack` with `multiple` for the longest run of ready tags
//! below the oldest delivery still open. While one batch is being written, the next
//! gathers, so batches grow with load and cost nothing when idle (group commit).
//!
//! `multiple` acks every unsettled tag up to the one named, so a tag may only be covered
//! when everything below it is ready or already settled one by one. A tag settled one by
//! one (requeue, reject, dead letter) stays *open* until its own frame has been handed to
//! lapin, so a later batch cannot overtake it. A ready tag stuck above an open one (a
//! person's lane waiting behind a slow request) is acked alone after [`STRAGGLER_WAIT`],
//! or at once when too many wait, so the prefetch window is never filled by acks we sit on.
//!
//! Acks still ready when the channel dies are lost like any unsent ack: the broker
//! redelivers those messages and the duplicate window acks them without posting again.

use crate::broker::settle::unless_channel_closes;
use lapin::options::BasicAckOptions;
use lapin::types::DeliveryTag;
use lapin::Channel;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a ready ack may wait for the deliveries below it before it is sent alone.
pub const STRAGGLER_WAIT: Duration = Duration::from_millis(10);

/// What the flusher sends next.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `basic.ack` with `multiple` for this tag: every ready tag up to it.
    pub up_to: Option<DeliveryTag>,
    /// How many ready tags that batch covers.
    pub covered: usize,
    /// Tags acked one by one (stragglers).
    pub alone: Vec<DeliveryTag>,
    /// When to look again for stragglers, if some ready tags wait.
    pub next_check: Option<Instant>,
}

/// The tags of one channel that are still ours to settle.
#[derive(Debug, Default)]
struct Tags {
    /// Received and not yet settled (including a one-by-one settlement in progress).
    open: BTreeSet<DeliveryTag>,
    /// To be acked, with when each became ready.
    ready: BTreeMap<DeliveryTag, Instant>,
}

impl Tags {
    /// Takes what can be sent now out of `ready` (the pure decision, tested below).
    fn plan(&mut self, now: Instant, max_waiting: usize) -> Plan {
        let mut plan = Plan::default();
        let oldest_open = self.open.first().copied().unwrap_or(DeliveryTag::MAX);
        let waiting = self.ready.split_off(&oldest_open);
        plan.up_to = self.ready.last_key_value().map(|(&tag, _)| tag);
        plan.covered = self.ready.len();
        self.ready = waiting;
        let crowded = self.ready.len() > max_waiting;
        self.ready.retain(|&tag, &mut since| {
            let late = crowded || now.saturating_duration_since(since) >= STRAGGLER_WAIT;
            if late {
                plan.alone.push(tag);
            }
            !late
        });
        plan.next_check = self
            .ready
            .values()
            .min()
            .map(|&since| since + STRAGGLER_WAIT);
        plan
    }
}

/// The acknowledgements of one channel: tags are registered as deliveries arrive, and
/// leave as ready acks (batched by [`Acks::run`]) or one-by-one settlements.
#[derive(Debug)]
pub struct Acks {
    channel: Channel,
    tags: Mutex<Tags>,
    wake: Notify,
    /// The session is over: the flusher ends.
    closed: CancellationToken,
    /// Deliveries of this session stop waiting (the pipeline stops, or the session
    /// ended and the broker redelivers them elsewhere).
    give_up: CancellationToken,
    /// More ready acks than this waiting above an open tag are sent alone at once.
    max_waiting: usize,
    /// Held from taking a plan until its frames are with lapin, so [`Acks::close`]
    /// cannot return (and the channel be closed) while the flusher still sends.
    sending: tokio::sync::Mutex<()>,
}

impl Acks {
    /// `prefetch`: the channel's window, half of which ready acks may hold; `stopping`:
    /// the pipeline's, which makes this session's deliveries give up too.
    pub fn new(channel: Channel, prefetch: u16, stopping: &CancellationToken) -> Self {
        Self {
            channel,
            tags: Mutex::new(Tags::default()),
            wake: Notify::new(),
            closed: CancellationToken::new(),
            give_up: stopping.child_token(),
            max_waiting: usize::from(prefetch / 2).max(1),
            sending: tokio::sync::Mutex::new(()),
        }
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Cancelled when this session's deliveries must stop waiting.
    pub fn give_up(&self) -> &CancellationToken {
        &self.give_up
    }

    /// The session ended (the connection or channel was lost): its deliveries waiting
    /// at a hold or in a backoff give up now; the broker redelivers them.
    pub fn session_lost(&self) {
        self.give_up.cancel();
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, Tags> {
        self.tags.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery arrived: its tag is ours to settle. Called in arrival (tag) order.
    pub fn received(&self, tag: DeliveryTag) {
        self.tags().open.insert(tag);
    }

    /// The delivery's fate is an ack: the flusher sends it, usually with others.
    pub fn ack(&self, tag: DeliveryTag) {
        {
            let mut tags = self.tags();
            tags.open.remove(&tag);
            tags.ready.insert(tag, Instant::now());
        }
        self.wake.notify_one();
    }

    /// The delivery was settled one by one (its frame is with lapin): batches may now
    /// cover the tags above it.
    pub fn settled(&self, tag: DeliveryTag) {
        let was_oldest = {
            let mut tags = self.tags();
            let oldest = tags.open.first() == Some(&tag);
            tags.open.remove(&tag);
            oldest && !tags.ready.is_empty()
        };
        if was_oldest {
            self.wake.notify_one();
        }
    }

    /// The flusher: runs until [`Acks::close`] or the channel's end.
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut next_check: Option<Instant> = None;
        loop {
            // A timer only while stragglers wait: most wakes need none.
            let straggler_check = async {
                match next_check {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.closed.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = straggler_check => {}
            }
            let _sending = self.sending.lock().await;
            if self.closed.is_cancelled() || !self.channel.status().connected() {
                return;
            }
            let plan = self.tags().plan(Instant::now(), self.max_waiting);
            next_check = plan.next_check;
            self.send(&plan).await;
        }
    }

    /// Sends every ready ack now and ends the flusher (before a channel we stop
    /// consuming on is closed, once nothing runs on it any more).
    pub async fn close(&self) {
        self.closed.cancel();
        // A batch the flusher took before the cancel is sent before ours and before the
        // channel's close: otherwise lapin refuses it on a closing channel and the broker
        // redelivers a message Crisp already has.
        let _sending = self.sending.lock().await;
        let plan = self.tags().plan(Instant::now(), 0);
        self.send(&plan).await;
    }

    async fn send(&self, plan: &Plan) {
        if let Some(tag) = plan.up_to {
            self.basic_ack(tag, true, plan.covered).await;
        }
        for &tag in &plan.alone {
            self.basic_ack(tag, false, 1).await;
        }
    }

    async fn basic_ack(&self, tag: DeliveryTag, multiple: bool, messages: usize) {
        let ack = self.channel.basic_ack(tag, BasicAckOptions { multiple });
        match unless_channel_closes(&self.channel, ack).await {
            Some(Ok(())) => {}
            // The broker redelivers whatever was unacked on a dead channel.
            _ => (0..messages).for_each(|_| crate::broker::settle::note_stale()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(open: &[u64], ready: &[(u64, u64)], start: Instant) -> Tags {
        Tags {
            open: open.iter().copied().collect(),
            ready: ready
                .iter()
                .map(|&(t, ms)| (t, start + Duration::from_millis(ms)))
                .collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_covers_the_ready_run_below_the_oldest_open_tag() {
        let start = Instant::now();
        let mut t = tags(&[5, 9], &[(1, 0), (2, 0), (4, 0), (6, 0), (7, 0)], start);
        let plan = t.plan(start, 32);
        assert_eq!(plan.up_to, Some(4), "1, 2 and 4 (3 was settled alone)");
        assert!(plan.alone.is_empty());
        assert_eq!(plan.next_check, Some(start + STRAGGLER_WAIT));
        assert_eq!(t.ready.keys().copied().collect::<Vec<_>>(), [6, 7]);
        // Nothing open: everything ready goes in one batch.
        let mut t = tags(&[], &[(6, 0), (7, 0)], start);
        assert_eq!(t.plan(start, 32).up_to, Some(7));
        assert!(t.ready.is_empty());
        // Nothing ready below the oldest open tag: no batch.
        let mut t = tags(&[1], &[(2, 0)], start);
        assert_eq!(t.plan(start, 32).up_to, None);
    }

    #[tokio::test(start_paused = true)]
    async fn stragglers_go_alone_when_late_or_crowded() {
        let start = Instant::now();
        let mut t = tags(&[1], &[(2, 0), (3, 1)], start);
        let plan = t.plan(start + STRAGGLER_WAIT, 32);
        assert_eq!(plan.up_to, None);
        assert_eq!(plan.alone, [2], "2 waited STRAGGLER_WAIT; 3 not yet");
        assert_eq!(
            plan.next_check,
            Some(start + Duration::from_millis(1) + STRAGGLER_WAIT)
        );
        let mut t = tags(&[1], &[(2, 0), (3, 0), (4, 0)], start);
        let plan = t.plan(start, 2);
        assert_eq!(plan.alone, [2, 3, 4], "more than max_waiting wait: all go");
        assert_eq!(plan.next_check, None);
    }
}
