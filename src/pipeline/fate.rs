//! A message's fate, decided in one place from what happened to it: the rows of the
//! "What happens to a message" table of `docs/contract.md`, as one pure function.

use crate::config::Unmatched;
use crate::outcome::{DeadLetter, Disposition, Reason, RequeueKind};

/// What happened to a message, from decoding to Crisp's last answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Happened {
    /// Crisp answered 2xx.
    Delivered,
    /// Already delivered by this pod (same id, same body): acked without a post.
    Duplicate,
    /// Not JSON, not an object, too large, no people id, invalid email, empty text,
    /// a missing template value, a schema violation: it can never succeed.
    Invalid(DeadLetter),
    /// No rule matches the routing key (and event type, when the message has one).
    Unmatched {
        routing_key: String,
        event_type: Option<String>,
    },
    /// Crisp 400/413, or 422 with an invalid-input reason.
    CrispRejected { detail: String, rule: String },
    /// Crisp 404 `people_not_found`, and no profile could be created.
    PeopleNotFound { detail: String, rule: String },
    /// Transient failures or rate limits for the whole retry budget while other
    /// messages got through: the message's own problem, so it counts toward the
    /// queue's delivery limit.
    RetriesExhausted,
    /// Shutdown, its hand-back time (the consumer timeout), or a later message of a
    /// person whose earlier one went back: it was not (fully) tried. Holds (Crisp
    /// refusing us, down, or out of quota) keep the message with the pod instead.
    NotStarted,
    /// The delivery's channel died while it waited: the broker redelivers it.
    ChannelGone,
    /// Handling it panicked (a bug).
    Panicked,
    /// Its dead-letter copy was not confirmed by the broker.
    DeadLetterUnconfirmed,
}

impl Happened {
    /// Its reason code, as the tap shows it: a dead letter's `x-crisp-bridge-reason`, or
    /// why it was skipped or requeued; `None` when delivered.
    pub fn reason(&self) -> Option<&'static str> {
        Some(match self {
            Happened::Delivered => return None,
            Happened::Duplicate => "duplicate",
            Happened::Invalid(dl) => dl.reason.code(),
            Happened::Unmatched { .. } => Reason::Unmatched.code(),
            Happened::CrispRejected { .. } => Reason::CrispRejected.code(),
            Happened::PeopleNotFound { .. } => Reason::PeopleNotFound.code(),
            Happened::RetriesExhausted => "retries_exhausted",
            Happened::NotStarted => "not_started",
            Happened::ChannelGone => "channel_gone",
            Happened::Panicked => "panicked",
            Happened::DeadLetterUnconfirmed => "dead_letter_unconfirmed",
        })
    }
}

/// Settings that change a fate.
#[derive(Debug, Clone, Copy)]
pub struct FateSettings {
    pub unmatched: Unmatched,
}

pub fn fate(happened: Happened, settings: FateSettings) -> Disposition {
    match happened {
        Happened::Delivered => Disposition::Ack { delivered: true },
        Happened::Duplicate => Disposition::Ack { delivered: false },
        Happened::Invalid(dl) => Disposition::DeadLetter(dl),
        Happened::Unmatched {
            routing_key,
            event_type,
        } => match settings.unmatched {
            Unmatched::Ack => Disposition::Ack { delivered: false },
            Unmatched::DeadLetter => Disposition::DeadLetter(DeadLetter::new(
                Reason::Unmatched,
                unmatched_detail(&routing_key, event_type.as_deref()),
                None,
            )),
        },
        Happened::CrispRejected { detail, rule } => {
            Disposition::DeadLetter(DeadLetter::new(Reason::CrispRejected, detail, Some(&rule)))
        }
        Happened::PeopleNotFound { detail, rule } => {
            Disposition::DeadLetter(DeadLetter::new(Reason::PeopleNotFound, detail, Some(&rule)))
        }
        // Counts toward the delivery limit: a message that never gets through, or always
        // panics, ends in the dead-letter queue instead of cycling.
        Happened::RetriesExhausted | Happened::Panicked => {
            Disposition::Requeue(RequeueKind::RetriesExhausted)
        }
        // Not the message's fault: it may wait as long as it needs.
        Happened::NotStarted | Happened::ChannelGone => Disposition::Requeue(RequeueKind::NotNow),
        // A broker that keeps refusing the copy (a full dead-letter queue with
        // `reject-publish`, say) would otherwise bounce the message back at once, forever:
        // counting it bounds the loop by the queue's delivery limit.
        Happened::DeadLetterUnconfirmed => Disposition::Requeue(RequeueKind::RetriesExhausted),
    }
}

/// Why no rule took a message, in a sentence.
pub fn unmatched_detail(routing_key: &str, event_type: Option<&str>) -> String {
    format!(
        "no rule matches routing key `{routing_key}`{}",
        event_type
            .map(|t| format!(" and type `{}`", t.chars().take(100).collect::<String>()))
            .unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: FateSettings = FateSettings {
        unmatched: Unmatched::Ack,
    };
    const DEAD: FateSettings = FateSettings {
        unmatched: Unmatched::DeadLetter,
    };

    fn reason(d: &Disposition) -> Option<Reason> {
        match d {
            Disposition::DeadLetter(dl) => Some(dl.reason),
            _ => None,
        }
    }

    #[test]
    fn every_row_of_the_outcome_table() {
        let invalid = |r| Happened::Invalid(DeadLetter::new(r, "x", None));
        let not_now = Disposition::Requeue(RequeueKind::NotNow);
        let rows: Vec<(&str, Happened, FateSettings, Disposition)> = vec![
            (
                "Crisp answered 2xx",
                Happened::Delivered,
                ACK,
                Disposition::Ack { delivered: true },
            ),
            (
                "duplicate within the window",
                Happened::Duplicate,
                ACK,
                Disposition::Ack { delivered: false },
            ),
            (
                "no rule matches, unmatched = ack",
                Happened::Unmatched {
                    routing_key: "a.b".into(),
                    event_type: None,
                },
                ACK,
                Disposition::Ack { delivered: false },
            ),
            (
                "SIGTERM: prefetched or abandoned; handed back before the consumer timeout",
                Happened::NotStarted,
                ACK,
                not_now.clone(),
            ),
            (
                "broker connection lost",
                Happened::ChannelGone,
                ACK,
                not_now.clone(),
            ),
            (
                "dead-letter copy unconfirmed (counted: a broker refusing it would loop)",
                Happened::DeadLetterUnconfirmed,
                ACK,
                Disposition::Requeue(RequeueKind::RetriesExhausted),
            ),
            (
                "transient for max_retry_time",
                Happened::RetriesExhausted,
                ACK,
                Disposition::Requeue(RequeueKind::RetriesExhausted),
            ),
            (
                "a bug",
                Happened::Panicked,
                ACK,
                Disposition::Requeue(RequeueKind::RetriesExhausted),
            ),
        ];
        for (row, happened, settings, expected) in rows {
            assert_eq!(fate(happened, settings), expected, "{row}");
        }
        for r in [
            Reason::InvalidJson,
            Reason::NotAnObject,
            Reason::PeopleIdMissing,
            Reason::InvalidPeopleId,
            Reason::EmptyText,
            Reason::TemplateValueMissing,
            Reason::SchemaViolation,
            Reason::TooLarge,
        ] {
            assert_eq!(reason(&fate(invalid(r), ACK)), Some(r), "{r}");
        }
        let unmatched = fate(
            Happened::Unmatched {
                routing_key: "a.b".into(),
                event_type: Some("com.example.x".into()),
            },
            DEAD,
        );
        assert_eq!(reason(&unmatched), Some(Reason::Unmatched));
        match unmatched {
            Disposition::DeadLetter(dl) => assert_eq!(
                dl.detail,
                "no rule matches routing key `a.b` and type `com.example.x`"
            ),
            other => panic!("{other:?}"),
        }
        let rejected = fate(
            Happened::CrispRejected {
                detail: "400".into(),
                rule: "r".into(),
            },
            ACK,
        );
        assert_eq!(reason(&rejected), Some(Reason::CrispRejected));
        let missing = fate(
            Happened::PeopleNotFound {
                detail: "404".into(),
                rule: "r".into(),
            },
            ACK,
        );
        assert_eq!(reason(&missing), Some(Reason::PeopleNotFound));
        match missing {
            Disposition::DeadLetter(dl) => assert_eq!(dl.rule.as_deref(), Some("r")),
            other => panic!("{other:?}"),
        }
    }
}
