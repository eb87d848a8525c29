//! Step 6: act on a delivery's [`Disposition`]: ack, dead-letter (publish with the
//! `x-crisp-bridge-*` headers, wait for the broker's confirm, then ack), or requeue.

use crate::outcome::{DeadLetter, Disposition, RequeueKind};
use crate::telemetry::metrics;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Channel;
use std::future::Future;
use std::time::Duration;

pub const HEADER_REASON: &str = "x-crisp-bridge-reason";
pub const HEADER_DETAIL: &str = "x-crisp-bridge-detail";
pub const HEADER_RULE: &str = "x-crisp-bridge-rule";

/// Longest wait for the broker to confirm a dead-letter copy.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How a settlement went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The broker took our decision.
    Done,
    /// The delivery's channel had died: the broker will redeliver the message.
    Stale,
    /// The dead-letter copy was not confirmed; the original is still unsettled.
    DeadLetterFailed,
}

/// How often a pending settlement looks whether its channel ended meanwhile. Settling
/// normally takes well under a millisecond, so this only paces the rare wait on a
/// connection that just died.
const CHANNEL_CHECK: Duration = Duration::from_millis(50);

/// Carries out `disposition`; returns promptly, as [`Settled::Stale`], when the
/// delivery's channel ends before the broker took the decision.
pub async fn settle(
    channel: &Channel,
    dead_letter_exchange: &str,
    delivery: &Delivery,
    disposition: &Disposition,
) -> Settled {
    let settling = settle_on_live_channel(channel, dead_letter_exchange, delivery, disposition);
    match unless_channel_ended(delivery, settling).await {
        Some(settled) => settled,
        None => stale(),
    }
}

/// Runs `settling` (an ack, nack, reject or dead-letter of `delivery`) unless the
/// delivery's channel ends first, in which case it gives `None`.
///
/// lapin 4 can leave an ack, nack or reject pending forever when the connection dies
/// just as it is issued: the acker queues it to lapin's internal RPC task behind the
/// stop marker the IO loop queued on its way out, the task stops at that marker without
/// reading further, and the queue outlives it (the acker itself holds a sender), so the
/// promise is neither resolved nor rejected. Awaiting it plainly hung the lane, and with
/// it the shutdown's wait for in-flight deliveries. lapin has no notification for a
/// channel ending, but it poisons the channel's ackers before its RPC task can stop, so
/// that flag is looked at. Once it is set the broker requeues whatever was unacked on the
/// channel, whether or not our command reached it: the settlement is stale either way.
async fn unless_channel_ended<T>(
    delivery: &Delivery,
    settling: impl Future<Output = T>,
) -> Option<T> {
    let ended = async {
        loop {
            tokio::time::sleep(CHANNEL_CHECK).await;
            if delivery.acker.poisoned() {
                return;
            }
        }
    };
    tokio::select! {
        biased;
        settled = settling => Some(settled),
        _ = ended => None,
    }
}

async fn settle_on_live_channel(
    channel: &Channel,
    dead_letter_exchange: &str,
    delivery: &Delivery,
    disposition: &Disposition,
) -> Settled {
    let result = match disposition {
        Disposition::Ack { .. } => delivery.acker.ack(BasicAckOptions::default()).await,
        Disposition::Requeue(RequeueKind::RetriesExhausted) => {
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await
        }
        Disposition::Requeue(RequeueKind::NotNow) => requeue_not_now(delivery).await,
        Disposition::DeadLetter(dl) => {
            return dead_letter(channel, dead_letter_exchange, delivery, dl).await
        }
    };
    outcome(result)
}

/// Gives a delivery back without counting it against the delivery limit (RabbitMQ 4.3+).
/// `Ok(false)`, as lapin answers for a poisoned acker, when the channel ended first.
pub async fn requeue_not_now(delivery: &Delivery) -> lapin::Result<bool> {
    let nack = delivery.acker.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    });
    unless_channel_ended(delivery, nack)
        .await
        .unwrap_or(Ok(false))
}

fn outcome(result: lapin::Result<bool>) -> Settled {
    match result {
        Ok(true) => Settled::Done,
        Ok(false) | Err(_) => stale(),
    }
}

fn stale() -> Settled {
    metrics::stale_settlement();
    tracing::warn!("delivery's channel is gone; the broker will redeliver the message");
    Settled::Stale
}

/// The dead-letter copy's headers: the original ones plus ours.
pub fn dead_letter_headers(original: Option<&FieldTable>, dl: &DeadLetter) -> FieldTable {
    let mut headers = original.cloned().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert(HEADER_REASON.into(), text(dl.reason.code()));
    headers.insert(HEADER_DETAIL.into(), text(&dl.detail));
    if let Some(rule) = &dl.rule {
        headers.insert(HEADER_RULE.into(), text(rule));
    }
    headers
}

async fn dead_letter(
    channel: &Channel,
    exchange: &str,
    delivery: &Delivery,
    dl: &DeadLetter,
) -> Settled {
    let properties = delivery
        .properties
        .clone()
        .with_headers(dead_letter_headers(
            delivery.properties.headers().as_ref(),
            dl,
        ));
    let published = channel
        .basic_publish(
            exchange.into(),
            delivery.routing_key.clone(),
            BasicPublishOptions::default(),
            &delivery.data,
            properties,
        )
        .await;
    // A confirm that never comes (a half-dead connection) must not hold the message.
    let confirmed = match published {
        Ok(confirm) => tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map(|c| c.map(|c| c.is_ack()).unwrap_or(false))
            .unwrap_or(false),
        Err(_) => false,
    };
    match confirmed {
        true => outcome(delivery.acker.ack(BasicAckOptions::default()).await),
        false => {
            tracing::error!(
                reason = dl.reason.code(),
                exchange,
                "the broker did not confirm the dead-letter copy; the original goes back to the queue"
            );
            // The caller decides the original's fate (it is requeued).
            Settled::DeadLetterFailed
        }
    }
}
