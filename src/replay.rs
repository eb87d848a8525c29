//! `crisp-bridge replay`: moves selected dead letters back to the main exchange, after a
//! rule was fixed or an outage ended.
//!
//! Each selected dead letter is republished, with publisher confirms, to `amqp.exchange`
//! under its original routing key, body and properties, without our `x-crisp-bridge-*`
//! headers and the broker's `x-death` bookkeeping; its dead-letter copy is acked only
//! after the broker confirmed the republished message. Messages not selected are never
//! acked: they are handed back when we are done, and stay in the queue, in order.

use crate::broker::settle::{HEADER_DETAIL, HEADER_REASON, HEADER_RULE};
use crate::broker::{self, BrokerError};
use crate::config::AmqpConfig;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use std::collections::BTreeMap;
use std::time::Duration;

/// Longest wait for the broker to confirm one republished message.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers the broker adds when it dead-letters a message itself (3.x and 4.x).
const BROKER_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Reason codes (`x-crisp-bridge-reason`, or `broker:<reason>` for messages the broker
    /// dead-lettered itself, e.g. `broker:delivery_limit`); empty: any.
    pub reasons: Vec<String>,
    /// Rule names (`x-crisp-bridge-rule`); empty: any.
    pub rules: Vec<String>,
    /// Most messages to replay; `None`: all selected.
    pub limit: Option<usize>,
    pub dry_run: bool,
}

/// What a replay did (or, in a dry run, would do), by reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub replayed: BTreeMap<String, usize>,
    pub kept: BTreeMap<String, usize>,
    /// Highest `x-delivery-count` among kept dead letters: on RabbitMQ 4.x each pass
    /// that hands one back counts toward the dead-letter queue's delivery limit.
    pub kept_max_delivery_count: u64,
}

impl Report {
    pub fn replayed_total(&self) -> usize {
        self.replayed.values().sum()
    }

    pub fn kept_total(&self) -> usize {
        self.kept.values().sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Connect(#[from] broker::ConnectError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the broker did not confirm the replayed copy of a `{reason}` dead letter; it stays in {queue}, nothing was lost; run replay again")]
    NotConfirmed { reason: String, queue: String },
    #[error("a `{reason}` dead letter with routing key `{routing_key}` matches no binding of `{exchange}` (amqp.exchange): it would be lost, so it stays in {queue}; bind its routing key, or move it by hand; replay stopped there")]
    Unroutable {
        reason: String,
        routing_key: String,
        exchange: String,
        queue: String,
    },
    #[error("the replayed copy of a `{reason}` dead letter was confirmed but the dead letter could not be acked ({error}); it stays in {queue} and a later replay would send it twice")]
    AckFailed {
        reason: String,
        queue: String,
        error: String,
    },
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A dead letter's reason: ours, else the broker's (`broker:delivery_limit`), else
/// `unknown`.
pub fn reason_of(headers: Option<&FieldTable>) -> String {
    let get = |name: &str| headers.and_then(|h| h.inner().get(name)).and_then(text);
    if let Some(reason) = get(HEADER_REASON) {
        return reason;
    }
    if let Some(reason) = get("x-first-death-reason") {
        return format!("broker:{reason}");
    }
    // 3.x only writes `x-death`: a list of tables, the first being the latest death.
    let from_x_death = headers
        .and_then(|h| h.inner().get("x-death"))
        .and_then(|v| match v {
            AMQPValue::FieldArray(items) => items.as_slice().first().cloned(),
            _ => None,
        })
        .and_then(|first| match first {
            AMQPValue::FieldTable(t) => t.inner().get("reason").and_then(text),
            _ => None,
        });
    match from_x_death {
        Some(reason) => format!("broker:{reason}"),
        None => "unknown".into(),
    }
}

/// True when `selection` picks a dead letter with this reason and headers.
pub fn selects(selection: &Selection, reason: &str, headers: Option<&FieldTable>) -> bool {
    let rule = headers
        .and_then(|h| h.inner().get(HEADER_RULE))
        .and_then(text);
    (selection.reasons.is_empty() || selection.reasons.iter().any(|r| r == reason))
        && (selection.rules.is_empty() || rule.is_some_and(|rule| selection.rules.contains(&rule)))
}

/// The properties a replayed message is published with: the original ones without our
/// headers and the broker's dead-letter bookkeeping.
pub fn replay_properties(original: &BasicProperties) -> BasicProperties {
    let Some(headers) = original.headers() else {
        return original.clone();
    };
    let mut kept = FieldTable::default();
    for (name, value) in headers.inner() {
        let name_str = name.as_str();
        let ours = [HEADER_REASON, HEADER_DETAIL, HEADER_RULE].contains(&name_str)
            || name_str.starts_with("x-crisp-bridge-");
        if !ours && !BROKER_HEADERS.contains(&name_str) {
            kept.insert(name.clone(), value.clone());
        }
    }
    original.clone().with_headers(kept)
}

/// Runs a replay against the broker of `amqp`.
pub async fn replay(amqp: &AmqpConfig, selection: &Selection) -> Result<Report, ReplayError> {
    let broker::Connected { connection, .. } = broker::connect(amqp, 0).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| BrokerError {
            what: "opening a channel".into(),
            source,
        })?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|source| BrokerError {
            what: "enabling publisher confirms".into(),
            source,
        })?;
    let queue = amqp.dead_letter_queue.as_str();
    // Only the messages there now: what we hand back must not be read twice.
    let waiting = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| BrokerError {
            what: format!("finding the dead-letter queue `{queue}` (amqp.dead_letter_queue)"),
            source,
        })?
        .message_count();
    let mut report = Report::default();
    // Only the ackers: bodies are not held, whatever the queue's size.
    let mut kept: Vec<lapin::Acker> = Vec::new();
    let mut outcome = Ok(());
    for _ in 0..waiting {
        if selection
            .limit
            .is_some_and(|limit| report.replayed_total() >= limit)
        {
            break;
        }
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|source| BrokerError {
                what: format!("reading from `{queue}`"),
                source,
            })?;
        let Some(message) = got else { break };
        let headers = message.delivery.properties.headers().as_ref();
        let reason = reason_of(headers);
        let selected = selects(selection, &reason, headers);
        if !selected || selection.dry_run {
            let tally = if selected {
                &mut report.replayed
            } else {
                report.kept_max_delivery_count =
                    report.kept_max_delivery_count.max(delivery_count(headers));
                &mut report.kept
            };
            *tally.entry(reason).or_default() += 1;
            kept.push(message.delivery.acker.clone());
            continue;
        }
        match republish(&channel, &amqp.exchange, &message).await {
            Ok(Published::Confirmed) => {
                if let Err(e) = message.delivery.acker.ack(BasicAckOptions::default()).await {
                    outcome = Err(ReplayError::AckFailed {
                        reason,
                        queue: queue.to_owned(),
                        error: e.to_string(),
                    });
                    break;
                }
                *report.replayed.entry(reason).or_default() += 1;
            }
            Ok(Published::NotConfirmed) => {
                kept.push(message.delivery.acker.clone());
                outcome = Err(ReplayError::NotConfirmed {
                    reason,
                    queue: queue.to_owned(),
                });
                break;
            }
            Ok(Published::Unroutable) => {
                kept.push(message.delivery.acker.clone());
                outcome = Err(ReplayError::Unroutable {
                    reason,
                    routing_key: message.delivery.routing_key.to_string(),
                    exchange: amqp.exchange.clone(),
                    queue: queue.to_owned(),
                });
                break;
            }
            Err(e) => {
                kept.push(message.delivery.acker.clone());
                outcome = Err(e.into());
                break;
            }
        }
    }
    // Hand back what stays, in the order it was read, so the queue keeps its order.
    for acker in &kept {
        let _ = acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await;
    }
    let _ = channel.close(200, "replay done".into()).await;
    let _ = connection.close(200, "replay done".into()).await;
    outcome.map(|()| report)
}

/// `x-delivery-count` (RabbitMQ 4.x quorum queues), 0 when absent.
fn delivery_count(headers: Option<&FieldTable>) -> u64 {
    match headers.and_then(|h| h.inner().get("x-delivery-count")) {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

enum Published {
    Confirmed,
    NotConfirmed,
    /// No binding matched: the broker returned it (mandatory) instead of dropping it.
    Unroutable,
}

async fn republish(
    channel: &lapin::Channel,
    exchange: &str,
    message: &BasicGetMessage,
) -> Result<Published, BrokerError> {
    let delivery = &message.delivery;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            delivery.routing_key.clone(),
            // Without `mandatory`, a routing key no queue is bound to would be confirmed
            // and dropped: the dead letter would be acked and lost.
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &delivery.data,
            replay_properties(&delivery.properties),
        )
        .await
        .map_err(|source| BrokerError {
            what: format!("republishing to `{exchange}` (amqp.exchange)"),
            source,
        })?;
    let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .ok()
        .and_then(Result::ok);
    Ok(match confirmation {
        Some(c) if c.is_ack() => match c.take_message() {
            Some(_) => Published::Unroutable,
            None => Published::Confirmed,
        },
        _ => Published::NotConfirmed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    #[test]
    fn reasons_come_from_our_header_else_the_brokers() {
        let ours = table(&[(HEADER_REASON, s("crisp_rejected"))]);
        assert_eq!(reason_of(Some(&ours)), "crisp_rejected");
        let broker4 = table(&[("x-first-death-reason", s("delivery_limit"))]);
        assert_eq!(reason_of(Some(&broker4)), "broker:delivery_limit");
        let death = table(&[("reason", s("rejected"))]);
        let broker3 = table(&[(
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        )]);
        assert_eq!(reason_of(Some(&broker3)), "broker:rejected");
        assert_eq!(reason_of(None), "unknown");
    }

    #[test]
    fn selection_by_reason_and_rule() {
        let headers = table(&[
            (HEADER_REASON, s("crisp_rejected")),
            (HEADER_RULE, s("orders")),
        ]);
        let h = Some(&headers);
        let by = |reasons: &[&str], rules: &[&str]| Selection {
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        };
        assert!(selects(&by(&[], &[]), "crisp_rejected", h));
        assert!(selects(
            &by(&["unmatched", "crisp_rejected"], &[]),
            "crisp_rejected",
            h
        ));
        assert!(!selects(&by(&["unmatched"], &[]), "crisp_rejected", h));
        assert!(selects(
            &by(&["crisp_rejected"], &["orders"]),
            "crisp_rejected",
            h
        ));
        assert!(!selects(
            &by(&["crisp_rejected"], &["trials"]),
            "crisp_rejected",
            h
        ));
        assert!(!selects(&by(&[], &["orders"]), "unmatched", None));
    }

    #[test]
    fn replayed_properties_drop_only_bookkeeping() {
        let headers = table(&[
            (HEADER_REASON, s("crisp_rejected")),
            (HEADER_DETAIL, s("d")),
            (HEADER_RULE, s("r")),
            ("x-death", AMQPValue::FieldArray(FieldArray::default())),
            ("x-first-death-reason", s("rejected")),
            ("x-last-death-queue", s("q")),
            ("tenant", s("acme")),
        ]);
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_headers(headers);
        let replayed = replay_properties(&original);
        assert_eq!(replayed.message_id(), original.message_id());
        assert_eq!(replayed.content_type(), original.content_type());
        let names: Vec<&str> = replayed
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(|k| k.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["tenant"]);
    }
}
