//! Step 6: act on a delivery's [`Disposition`] one by one: dead-letter (publish with the
//! `x-crisp-bridge-*` headers, wait for the broker's confirm, then ack), or requeue. Plain
//! acks are batched per channel (`acks`).

use crate::outcome::{mask_emails, DeadLetter, Disposition, RequeueKind};
use crate::telemetry::metrics;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::protocol::basic::gen_properties;
use lapin::types::generation::gen_field_table;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

pub const HEADER_REASON: &str = "x-crisp-bridge-reason";
pub const HEADER_DETAIL: &str = "x-crisp-bridge-detail";
pub const HEADER_RULE: &str = "x-crisp-bridge-rule";

/// At most this many bytes in each header we add (`docs/contract.md`, "Bounds"):
/// a detail may quote a Crisp answer or a message of any size.
pub const MAX_HEADER_BYTES: usize = 1024;

/// What a content header frame weighs besides the properties: type, channel and size
/// (7 bytes), class id, weight and body size (12), frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// Kept free below `frame_max`, so a miscount of a few bytes cannot cost the connection.
const FRAME_MARGIN: usize = 512;

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
    /// The broker returned the dead-letter copy: no queue is bound to the dead-letter
    /// exchange. The original is still unsettled.
    DeadLetterReturned,
}

/// What [`settle`] can do to a delivery. Acks are not among them: they go through
/// [`Acks`](super::acks::Acks), batched.
#[derive(Debug, Clone, Copy)]
pub enum Settlement<'a> {
    Requeue(RequeueKind),
    DeadLetter(&'a DeadLetter),
}

impl<'a> Settlement<'a> {
    /// The settlement a disposition asks for; `None` for an ack.
    pub fn of(disposition: &'a Disposition) -> Option<Self> {
        match disposition {
            Disposition::Ack { .. } => None,
            Disposition::Requeue(kind) => Some(Self::Requeue(*kind)),
            Disposition::DeadLetter(dl) => Some(Self::DeadLetter(dl)),
        }
    }
}

/// How often a pending settlement looks whether its channel ended meanwhile. Settling
/// normally takes well under a millisecond, so this only paces the rare wait on a
/// connection that just died.
const CHANNEL_CHECK: Duration = Duration::from_millis(50);

/// Carries out `settlement`; returns promptly, as [`Settled::Stale`], when the
/// delivery's channel ends before the broker took the decision.
pub async fn settle(
    channel: &Channel,
    dead_letter_exchange: &str,
    delivery: &Delivery,
    settlement: Settlement<'_>,
) -> Settled {
    let settling = settle_on_live_channel(channel, dead_letter_exchange, delivery, settlement);
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
    unless(|| delivery.acker.poisoned(), settling).await
}

/// Runs `settling` (a command on `channel`) unless the channel stops being connected
/// first, in which case it gives `None`.
pub(crate) async fn unless_channel_closes<T>(
    channel: &Channel,
    settling: impl Future<Output = T>,
) -> Option<T> {
    unless(|| !channel.status().connected(), settling).await
}

/// Runs `settling` unless `ended` turns true first (looked at every [`CHANNEL_CHECK`]).
async fn unless<T>(ended: impl Fn() -> bool, settling: impl Future<Output = T>) -> Option<T> {
    let ended = async {
        loop {
            tokio::time::sleep(CHANNEL_CHECK).await;
            if ended() {
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
    settlement: Settlement<'_>,
) -> Settled {
    let result = match settlement {
        Settlement::Requeue(RequeueKind::RetriesExhausted) => {
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: true })
                .await
        }
        Settlement::Requeue(RequeueKind::NotNow) => requeue_not_now(delivery).await,
        Settlement::DeadLetter(dl) => {
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
    note_stale();
    Settled::Stale
}

/// Counts and logs a settlement the channel's end made moot.
pub(crate) fn note_stale() {
    metrics::stale_settlement();
    tracing::warn!("delivery's channel is gone; the broker will redeliver the message");
}

/// The dead-letter copy's properties: the original ones, its headers plus ours, each of
/// ours at most [`MAX_HEADER_BYTES`]. When the original's headers leave no room for ours
/// within `frame_max` (the broker would kill the connection), they are dropped and the
/// detail says so: the message is still dead-lettered with our reason. Also returns how
/// many bytes of original headers were dropped, if any.
pub fn dead_letter_properties(
    original: &BasicProperties,
    dl: &DeadLetter,
    frame_max: u32,
) -> (BasicProperties, Option<usize>) {
    let limit = (frame_max as usize).saturating_sub(FRAME_MARGIN);
    let mut headers = original.headers().clone().unwrap_or_default();
    for (key, value) in our_headers(dl, None) {
        headers.insert(key.into(), value);
    }
    let full = original.clone().with_headers(headers);
    if header_frame_size(&full) <= limit {
        return (full, None);
    }
    let dropped = original
        .headers()
        .as_ref()
        .map_or(0, |h| encoded_len(gen_field_table::<Vec<u8>>(h)));
    let note = format!(
        "original headers ({dropped} bytes) dropped: too large for the broker's frame size ({frame_max} bytes)"
    );
    let mut ours = FieldTable::default();
    for (key, value) in our_headers(dl, Some(&note)) {
        ours.insert(key.into(), value);
    }
    (original.clone().with_headers(ours), Some(dropped))
}

/// Our three headers, bounded and masked; `note` is appended to the detail whole.
fn our_headers(dl: &DeadLetter, note: Option<&str>) -> Vec<(&'static str, AMQPValue)> {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let detail = mask_emails(&dl.detail);
    let detail = match note {
        None => cap(&detail, MAX_HEADER_BYTES).into_owned(),
        Some(note) => {
            let room = MAX_HEADER_BYTES.saturating_sub(note.len() + 2);
            format!("{}; {note}", cap(&detail, room))
        }
    };
    let mut headers = vec![
        (
            HEADER_REASON,
            text(cap(dl.reason.code(), MAX_HEADER_BYTES).as_ref()),
        ),
        (HEADER_DETAIL, text(&detail)),
    ];
    if let Some(rule) = &dl.rule {
        headers.push((HEADER_RULE, text(&cap(rule, MAX_HEADER_BYTES))));
    }
    headers
}

/// `text` cut to at most `max` bytes on a character boundary, ending with `…` when cut.
pub fn cap(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let budget = max.saturating_sub('…'.len_utf8());
    let end = (0..=budget)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    Cow::Owned(format!("{}…", &text[..end]))
}

/// The encoded size of the content header frame these properties make.
fn header_frame_size(properties: &BasicProperties) -> usize {
    encoded_len(gen_properties::<Vec<u8>>(properties)).saturating_add(HEADER_FRAME_OVERHEAD)
}

/// How many bytes an amq-protocol serializer writes (`usize::MAX` if it fails, which
/// counts as too large).
fn encoded_len(generate: impl lapin::types::generation::SerializeFn<Vec<u8>>) -> usize {
    generate(Vec::new().into())
        .map(|written| written.position as usize)
        .unwrap_or(usize::MAX)
}

async fn dead_letter(
    channel: &Channel,
    exchange: &str,
    delivery: &Delivery,
    dl: &DeadLetter,
) -> Settled {
    let frame_max = super::frame_max();
    let (properties, dropped) = dead_letter_properties(&delivery.properties, dl, frame_max);
    if let Some(bytes) = dropped {
        tracing::warn!(
            reason = dl.reason.code(),
            header_bytes = bytes,
            frame_max,
            "a dead-letter copy's original headers were dropped: with ours they exceed the broker's frame size"
        );
    }
    // Mandatory: a copy no queue takes comes back (basic.return) instead of being
    // confirmed and dropped, which would lose the message.
    let published = channel
        .basic_publish(
            exchange.into(),
            delivery.routing_key.clone(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &delivery.data,
            properties,
        )
        .await;
    // A confirm that never comes (a half-dead connection) must not hold the message.
    let confirmed = match published {
        Ok(confirm) => match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Ok(Ok(confirmation)) if confirmation.is_ack() => match confirmation.take_message() {
                None => Some(true),
                Some(_) => None,
            },
            _ => Some(false),
        },
        Err(_) => Some(false),
    };
    match confirmed {
        Some(true) => outcome(delivery.acker.ack(BasicAckOptions::default()).await),
        None => {
            tracing::error!(
                reason = dl.reason.code(),
                exchange,
                "the broker returned the dead-letter copy: no queue is bound to the dead-letter exchange; the original is kept"
            );
            Settled::DeadLetterReturned
        }
        Some(false) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Reason;

    fn get<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        p.headers().as_ref()?.inner().get(name)
    }

    fn text(p: &BasicProperties, name: &str) -> Option<String> {
        match get(p, name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into()),
            other => panic!("{name} is {other:?}"),
        }
    }

    fn padded(bytes: usize) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("app".into(), AMQPValue::LongString("kept".into()));
        headers.insert(
            "padding".into(),
            AMQPValue::LongString(LongString::from("p".repeat(bytes))),
        );
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(headers)
    }

    #[test]
    fn cap_cuts_on_a_character_boundary_with_an_ellipsis() {
        assert_eq!(cap("short", 1024), "short");
        let long = "é".repeat(1000);
        let cut = cap(&long, 1024);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert!(cut.ends_with("é…"), "{cut}");
        assert_eq!(cap("abcdef", 4), "a…");
        assert_eq!(cap("abcdef", 1), "…");
    }

    #[test]
    fn a_200_kb_crisp_reason_is_cut_to_1_kib_and_masked() {
        let reason = format!(
            "Crisp answered 400 invalid_data: jane.doe@example.com {}",
            "x".repeat(200_000)
        );
        let dl = DeadLetter {
            reason: Reason::CrispRejected,
            // Built directly, bypassing DeadLetter::new: the headers still mask.
            detail: reason,
            rule: Some("r".repeat(5000)),
        };
        let (p, dropped) = dead_letter_properties(&BasicProperties::default(), &dl, 131_072);
        assert_eq!(dropped, None);
        let detail = text(&p, HEADER_DETAIL).unwrap();
        assert!(detail.len() <= MAX_HEADER_BYTES, "{} bytes", detail.len());
        assert!(detail.ends_with('…'));
        assert!(detail.contains("j***@example.com") && !detail.contains("jane"));
        assert!(text(&p, HEADER_RULE).unwrap().len() <= MAX_HEADER_BYTES);
        assert_eq!(text(&p, HEADER_REASON).as_deref(), Some("crisp_rejected"));
    }

    #[test]
    fn the_header_frame_size_is_exact() {
        let mut headers = FieldTable::default();
        headers.insert(
            "padding".into(),
            AMQPValue::LongString(LongString::from("p".repeat(130_900))),
        );
        // 20 frame bytes, 2 property flags, then the table: 4 for its length and
        // 1 + 7 (key) + 1 (type) + 4 (length) + 130900 for its one entry.
        let p = BasicProperties::default().with_headers(headers);
        assert_eq!(header_frame_size(&p), 130_939);
    }

    #[test]
    fn original_headers_are_kept_when_they_fit() {
        let dl = DeadLetter::new(Reason::InvalidJson, "not JSON", None);
        let (p, dropped) = dead_letter_properties(&padded(1000), &dl, 131_072);
        assert_eq!(dropped, None);
        assert!(get(&p, "padding").is_some());
        assert_eq!(text(&p, "app").as_deref(), Some("kept"));
        assert_eq!(text(&p, HEADER_REASON).as_deref(), Some("invalid_json"));
        assert_eq!(text(&p, HEADER_RULE), None);
    }

    #[test]
    fn original_headers_that_leave_no_room_are_dropped_and_named() {
        let dl = DeadLetter::new(Reason::InvalidJson, "x".repeat(5000), Some("rule-a"));
        let original = padded(130_900);
        let (p, dropped) = dead_letter_properties(&original, &dl, 131_072);
        let dropped = dropped.expect("headers dropped");
        assert!(dropped > 130_900, "{dropped}");
        assert!(header_frame_size(&p) <= 131_072 - FRAME_MARGIN);
        assert_eq!(get(&p, "padding"), None);
        assert_eq!(get(&p, "app"), None);
        assert_eq!(
            p.message_id(),
            original.message_id(),
            "other properties kept"
        );
        assert_eq!(text(&p, HEADER_REASON).as_deref(), Some("invalid_json"));
        assert_eq!(text(&p, HEADER_RULE).as_deref(), Some("rule-a"));
        let detail = text(&p, HEADER_DETAIL).unwrap();
        assert!(detail.len() <= MAX_HEADER_BYTES, "{} bytes", detail.len());
        assert!(
            detail.ends_with(&format!(
                "original headers ({dropped} bytes) dropped: too large for the broker's frame size (131072 bytes)"
            )),
            "{detail}"
        );
    }

    #[test]
    fn a_large_x_death_counts_too() {
        let death = |i: i64| {
            let mut t = FieldTable::default();
            t.insert(
                "queue".into(),
                AMQPValue::LongString(format!("q-{i}").into()),
            );
            t.insert("count".into(), AMQPValue::LongLongInt(i));
            AMQPValue::FieldTable(t)
        };
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray((0..200).map(death).collect::<Vec<_>>().into()),
        );
        let original = BasicProperties::default().with_headers(headers);
        let dl = DeadLetter::new(Reason::Unmatched, "no rule matched", None);
        // A broker with the smallest frame AMQP allows.
        let (p, dropped) = dead_letter_properties(&original, &dl, 4096);
        assert!(dropped.is_some());
        assert!(header_frame_size(&p) <= 4096);
        let (p, dropped) = dead_letter_properties(&original, &dl, 131_072);
        assert_eq!(dropped, None);
        assert!(get(&p, "x-death").is_some());
    }
}
