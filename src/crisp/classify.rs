//! Every Crisp answer, sorted into what the pipeline must do about it
//! (the DESIGN "What happens to a message" table).

use std::time::{Duration, SystemTime};

/// What kind of failure a Crisp answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Try again later: network error, timeout, 408, 5xx.
    Transient,
    /// Crisp asks us to slow down: 429 or 420.
    RateLimited,
    /// The message can never succeed: 400, 413, 422 and other client errors.
    Rejected,
    /// 404 `people_not_found`.
    PeopleNotFound,
    /// Not the message's fault: 401, 402, 403, or 404 for the website.
    Refused,
}

/// A Crisp request that did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CrispError {
    pub failure: Failure,
    /// HTTP status, `None` for transport errors.
    pub status: Option<u16>,
    /// The envelope's `reason`, when the body had one.
    pub reason: Option<String>,
    pub retry_after: Option<Duration>,
    pub message: String,
}

impl CrispError {
    pub fn transport(message: String) -> Self {
        Self {
            failure: Failure::Transient,
            status: None,
            reason: None,
            retry_after: None,
            message,
        }
    }
}

/// The envelope's `reason`, read defensively: bodies may be empty, HTML from a proxy, or
/// JSON without the field.
pub fn envelope_reason(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("reason")?.as_str().map(str::to_owned)
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Classifies a non-2xx answer.
pub fn classify(status: u16, body: &[u8], retry_after: Option<Duration>) -> CrispError {
    let reason = envelope_reason(body);
    let failure = match status {
        401..=403 => Failure::Refused,
        404 if reason.as_deref() == Some("people_not_found") => Failure::PeopleNotFound,
        // `not_subscribed`, an unknown website, or a 404 without an envelope: the
        // website route itself is wrong, which no message can fix.
        404 => Failure::Refused,
        408 => Failure::Transient,
        420 | 429 => Failure::RateLimited,
        400..=499 => Failure::Rejected,
        _ => Failure::Transient,
    };
    let what = match failure {
        Failure::Transient => "Crisp failed temporarily; retrying",
        Failure::RateLimited => "Crisp is rate limiting us; backing off",
        Failure::Rejected => "Crisp rejected the event",
        Failure::PeopleNotFound => "Crisp has no profile for this people id",
        Failure::Refused => "Crisp refuses our credentials, plan or website id; check crisp.identifier, crisp.key, crisp.tier and crisp.website_id",
    };
    CrispError {
        failure,
        status: Some(status),
        message: format!(
            "{what} (HTTP {status}{})",
            reason
                .as_deref()
                .map(|r| format!(", reason `{r}`"))
                .unwrap_or_default()
        ),
        reason,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(status: u16, body: &str) -> Failure {
        classify(status, body.as_bytes(), None).failure
    }

    #[test]
    fn statuses_follow_the_design_table() {
        assert_eq!(
            kind(400, r#"{"error":true,"reason":"invalid_data","data":{}}"#),
            Failure::Rejected
        );
        assert_eq!(kind(413, ""), Failure::Rejected);
        assert_eq!(kind(422, "<html>"), Failure::Rejected);
        assert_eq!(
            kind(404, r#"{"error":true,"reason":"people_not_found"}"#),
            Failure::PeopleNotFound
        );
        assert_eq!(
            kind(404, r#"{"error":true,"reason":"not_subscribed"}"#),
            Failure::Refused
        );
        assert_eq!(kind(404, ""), Failure::Refused);
        for s in [401, 402, 403] {
            assert_eq!(kind(s, "{}"), Failure::Refused);
        }
        assert_eq!(kind(408, ""), Failure::Transient);
        assert_eq!(kind(420, ""), Failure::RateLimited);
        assert_eq!(kind(429, "not json"), Failure::RateLimited);
        for s in [500, 502, 503, 504] {
            assert_eq!(kind(s, "<html>bad gateway</html>"), Failure::Transient);
        }
    }

    #[test]
    fn envelope_is_read_defensively() {
        assert_eq!(envelope_reason(b""), None);
        assert_eq!(envelope_reason(b"<html>"), None);
        assert_eq!(envelope_reason(b"[1]"), None);
        assert_eq!(envelope_reason(br#"{"reason": 3}"#), None);
        assert_eq!(
            envelope_reason(br#"{"reason":"added"}"#).as_deref(),
            Some("added")
        );
        let e = classify(400, br#"{"error":true,"reason":"invalid_data"}"#, None);
        assert!(e.message.contains("invalid_data") && e.message.contains("400"));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("0.5", now),
            Some(Duration::from_millis(500))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(10));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
