//! Before any Crisp call: a message's bytes become its event, or what happened to it
//! (too large, not decodable, invalid, unmatched). One path for `run` and for the
//! offline commands (`map`, `test`), so they say exactly what `run` would do.

use super::fate::Happened;
use crate::decode::{decode, Decoded, Incoming};
use crate::outcome::{DeadLetter, Reason};
use crate::route::{Mapped, Routed, Router};

/// A message after decoding and routing.
#[derive(Debug)]
pub enum Triaged {
    /// A rule matched: the event to send, and the duplicate window's id.
    Event { mapped: Mapped, id: Option<String> },
    /// It is settled without a Crisp call; its fate says how.
    Done(Happened),
}

/// Size check, decode, route: the first steps of every message.
pub fn triage(
    router: &Router,
    max_message_bytes: usize,
    routing_key: &str,
    incoming: &Incoming<'_>,
) -> Triaged {
    triage_seeing(router, max_message_bytes, routing_key, incoming, |_| {})
}

/// [`triage`], showing `saw` the decoded message (the traces read a CloudEvent's
/// `traceparent` there).
pub fn triage_seeing(
    router: &Router,
    max_message_bytes: usize,
    routing_key: &str,
    incoming: &Incoming<'_>,
    saw: impl FnOnce(&Decoded),
) -> Triaged {
    let size = incoming.body.len();
    if size > max_message_bytes {
        return Triaged::Done(Happened::Invalid(DeadLetter::new(
            Reason::TooLarge,
            format!(
                "body is {size} bytes, over amqp.max_message_bytes ({max_message_bytes}); not parsed"
            ),
            None,
        )));
    }
    let decoded = match decode(incoming) {
        Ok(decoded) => decoded,
        Err(dl) => return Triaged::Done(Happened::Invalid(dl)),
    };
    saw(&decoded);
    match router.route_decoded(routing_key, &decoded) {
        Routed::Event(mapped) => Triaged::Event {
            mapped,
            id: decoded.id,
        },
        Routed::Invalid(dl) => Triaged::Done(Happened::Invalid(dl)),
        Routed::Unmatched => Triaged::Done(Happened::Unmatched {
            routing_key: routing_key.to_owned(),
            event_type: decoded.event_type,
        }),
    }
}
