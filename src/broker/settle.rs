//! Step 6: act on a delivery's [`Disposition`]: ack, dead-letter (publish with the
//! `x-crisp-bridge-*` headers, wait for the broker's confirm, then ack), or requeue.

use crate::outcome::{DeadLetter, Disposition, RequeueKind};
use crate::telemetry::metrics;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Channel;

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
    /// The dead-letter copy was not confirmed, so the original was requeued instead.
    DeadLetterFailed,
}

pub async fn settle(
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
pub async fn requeue_not_now(delivery: &Delivery) -> lapin::Result<bool> {
    delivery
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
}

fn outcome(result: lapin::Result<bool>) -> Settled {
    match result {
        Ok(true) => Settled::Done,
        Ok(false) | Err(_) => {
            metrics::stale_settlement();
            tracing::warn!("delivery's channel is gone; the broker will redeliver the message");
            Settled::Stale
        }
    }
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
                "the broker did not confirm the dead-letter copy; requeueing the original"
            );
            let _ = requeue_not_now(delivery).await;
            Settled::DeadLetterFailed
        }
    }
}
