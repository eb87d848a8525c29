//! The vocabulary every step shares: why a message is dead-lettered, and what
//! finally happens to it. Steps produce these; only `pipeline` and `broker::settle`
//! act on them.

use std::fmt;

/// Stable reason codes written to `x-crisp-bridge-reason` (the contract in DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidJson,
    NotAnObject,
    PeopleIdMissing,
    InvalidPeopleId,
    TemplateValueMissing,
    EmptyText,
    Unmatched,
    CrispRejected,
    PeopleNotFound,
    SchemaViolation,
    TooLarge,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::NotAnObject => "not_an_object",
            Reason::PeopleIdMissing => "people_id_missing",
            Reason::InvalidPeopleId => "invalid_people_id",
            Reason::TemplateValueMissing => "template_value_missing",
            Reason::EmptyText => "empty_text",
            Reason::Unmatched => "unmatched",
            Reason::CrispRejected => "crisp_rejected",
            Reason::PeopleNotFound => "people_not_found",
            Reason::SchemaViolation => "schema_violation",
            Reason::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A message that can never succeed: it goes to the dead-letter queue with these headers.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub reason: Reason,
    /// A readable sentence (`x-crisp-bridge-detail`); never contains a full email.
    pub detail: String,
    /// The rule that applied (`x-crisp-bridge-rule`), if any.
    pub rule: Option<String>,
}

impl DeadLetter {
    pub fn new(reason: Reason, detail: impl Into<String>, rule: Option<&str>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            rule: rule.map(str::to_owned),
        }
    }
}

/// Why a message goes back to the queue. The broker counts `basic.reject` toward a
/// quorum queue's delivery limit (RabbitMQ 4.3+), but not `basic.nack`: genuine
/// failures are rejected so a poison message ends in the dead-letter queue, while
/// "not now" is nacked so it can wait as long as it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueKind {
    /// Crisp kept failing for `max_retry_time`: counts toward the delivery limit.
    RetriesExhausted,
    /// Shutdown, refused credentials, rate limit, lost broker: not the message's fault.
    NotNow,
}

/// The final decision for one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Crisp accepted the event, or the message is deliberately skipped.
    Ack {
        delivered: bool,
    },
    DeadLetter(DeadLetter),
    Requeue(RequeueKind),
}

/// Masks an email for logs and dead-letter details: `jane@example.com` -> `j***@example.com`.
/// Anything that is not an email is shortened so ids stay recognisable but not complete.
pub fn mask_people_id(id: &str) -> String {
    match id.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => {
            let head: String = id.chars().take(8).collect();
            if id.chars().count() > 8 {
                format!("{head}…")
            } else {
                head
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_emails_and_long_ids() {
        assert_eq!(mask_people_id("jane.doe@example.com"), "j***@example.com");
        assert_eq!(mask_people_id("@x"), "***@x");
        assert_eq!(
            mask_people_id("04ed9a29-ccda-4f46-b2f3-b151d2d90fa7"),
            "04ed9a29…"
        );
    }
}
