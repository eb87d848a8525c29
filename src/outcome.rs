//! The vocabulary every step shares: why a message is dead-lettered, and what
//! finally happens to it. Steps produce these; only `pipeline` and `broker::settle`
//! act on them.

use std::fmt;

/// Stable reason codes written to `x-crisp-bridge-reason` (`docs/contract.md`).
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
    /// The detail is masked here, once for every step: it is both logged and sent as a
    /// header, and may quote a message or a Crisp answer holding any email.
    pub fn new(reason: Reason, detail: impl Into<String>, rule: Option<&str>) -> Self {
        Self {
            reason,
            detail: mask_emails(&detail.into()),
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
    if id.contains('@') {
        return mask_email(id);
    }
    let head: String = id.chars().take(8).collect();
    if id.chars().count() > 8 {
        format!("{head}…")
    } else {
        head
    }
}

/// One email-like word: its first character and the domain after its *last* `@`, so
/// nothing of a second local part (`x@jane.doe@example.com`) leaks.
fn mask_email(word: &str) -> String {
    // Already masked (a URL's password in a log line): `****@host` would read as a typo.
    if word
        .rsplit_once('@')
        .is_some_and(|(local, _)| !local.is_empty() && local.bytes().all(|b| b == b'*'))
    {
        return word.to_owned();
    }
    let first = word.chars().next().filter(|c| *c != '@');
    let domain = word.rsplit_once('@').map_or("", |(_, d)| d);
    let mut masked = String::with_capacity(domain.len() + 8);
    masked.extend(first);
    masked.push_str("***@");
    masked.push_str(domain);
    masked
}

/// Characters that end an email-like word in free text: spaces, controls, and the
/// punctuation that quotes or separates values in sentences, JSON and logs.
fn ends_word(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '"' | '<'
                | '>'
                | '('
                | ')'
                | '['
                | ']'
                | '{'
                | '}'
                | ','
                | ';'
                | ':'
                | '\\'
                | '`'
                | '='
                | '/'
                | '|'
        )
}

/// Masks every email-like word (anything holding an `@`) in free text, as
/// [`mask_people_id`] masks an id: `paid by jane.doe@example.com` -> `paid by j***@example.com`.
pub fn mask_emails(text: &str) -> String {
    if !text.contains('@') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest.find(|c| !ends_word(c)).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(ends_word).unwrap_or(rest.len());
        let word = &rest[..end];
        if word.contains('@') {
            out.push_str(&mask_email(word));
        } else {
            out.push_str(word);
        }
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_emails_and_long_ids() {
        assert_eq!(mask_people_id("jane.doe@example.com"), "j***@example.com");
        assert_eq!(mask_people_id("@x"), "***@x");
        assert_eq!(mask_people_id("x@jane.doe@example.com"), "x***@example.com");
        assert_eq!(
            mask_people_id("04ed9a29-ccda-4f46-b2f3-b151d2d90fa7"),
            "04ed9a29…"
        );
    }

    #[test]
    fn masks_every_email_in_free_text() {
        assert_eq!(
            mask_emails("paid by jane.doe@example.com, not bob@x.io."),
            "paid by j***@example.com, not b***@x.io."
        );
        assert_eq!(mask_emails("x@jane.doe@example.com"), "x***@example.com");
        assert_eq!(
            mask_emails(r#"{"email":"jane@example.com","to":"<a.b+c@d.org>"}"#),
            r#"{"email":"j***@example.com","to":"<a***@d.org>"}"#
        );
        assert_eq!(
            mask_emails("people id `o'brien@x.com` is invalid"),
            "people id `o***@x.com` is invalid"
        );
        assert_eq!(mask_emails(r"mailto:jane@x.com\n"), r"mailto:j***@x.com\n");
        assert_eq!(mask_emails("no address here"), "no address here");
        assert_eq!(mask_emails("ünï@exämple.com"), "ü***@exämple.com");
        assert_eq!(mask_emails("@"), "***@");
        assert_eq!(mask_emails("amqp://u:***@host"), "amqp://u:***@host");
        assert_eq!(mask_emails("***@jane@x.io"), "****@x.io");
        // Masking is idempotent: details are masked when built and again in headers.
        let once = mask_emails("a x@jane.doe@example.com b");
        assert_eq!(mask_emails(&once), once);
        assert!(!once.contains("jane"), "{once}");
    }

    #[test]
    fn dead_letter_details_are_masked_when_built() {
        let dl = DeadLetter::new(
            Reason::CrispRejected,
            "Crisp refused: people jane.doe@example.com is invalid",
            None,
        );
        assert_eq!(
            dl.detail,
            "Crisp refused: people j***@example.com is invalid"
        );
    }
}
