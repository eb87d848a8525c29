//! Every Crisp answer, sorted into what the pipeline must do about it
//! (`docs/contract.md`, "What happens to a message").

use std::time::{Duration, SystemTime};

/// What kind of failure a Crisp answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Try again later: network error, timeout, 408, 5xx.
    Transient,
    /// Crisp asks us to slow down: 429, 420, or 422 without an invalid-input reason.
    RateLimited,
    /// The message can never succeed: 400, 413, 422 `invalid_data`.
    Rejected,
    /// 404 `people_not_found`.
    PeopleNotFound,
    /// Not the message's fault: 401, 402, 403, 404 for the website, any other 4xx (a
    /// moved or retired route, a proxy asking for credentials), or a redirect (a
    /// misconfigured `api_url`; redirects are never followed).
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

/// 422 reasons Crisp documents as invalid input: those dead-letter; any other 422 is
/// re-scheduled like a 429, as a Crisp maintainer advises (crisp-im/ruby-crisp-api#18).
pub const INVALID_INPUT_REASONS: [&str; 1] = ["invalid_data"];

/// Longest `Retry-After` honoured; longer asks are clamped to it (a hostile or broken
/// answer must not hold the pod for years).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Longest envelope `reason` kept; Crisp's codes are short `snake_case` words.
const MAX_REASON_CHARS: usize = 64;

/// The envelope's `reason`, read defensively: bodies may be empty, HTML from a proxy, or
/// JSON without the field. Only a short code of `a-z 0-9 _ - .` is kept verbatim, so
/// nothing long, multi-line or personal (an email) is quoted in logs or headers.
pub fn envelope_reason(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let reason = value.get("reason")?.as_str()?;
    let is_code = !reason.is_empty()
        && reason.len() <= MAX_REASON_CHARS
        && reason
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    Some(if is_code {
        reason.to_owned()
    } else {
        format!("(not a reason code: {} bytes)", reason.len())
    })
}

/// `Retry-After` as delay-seconds (digits only) or an HTTP date, at most
/// [`MAX_RETRY_AFTER`]; any other form (`1e300`, `-5`, `inf`, `0.5`) is ignored and the
/// backoff applies. The caller raises it to at least `initial_backoff`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for u64 is still "a very long time": clamp, don't ignore.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// The message for a 3xx: names where Crisp (or something in front of it) pointed us.
pub fn redirect_message(status: u16, location: Option<&str>) -> String {
    let location = match location {
        Some(l) => format!(" to `{}`", show_location(l)),
        None => " without a Location".into(),
    };
    format!("Crisp answered HTTP {status}, a redirect{location}; redirects are never followed: check crisp.api_url (it should be https://api.crisp.chat/v1)")
}

/// A `Location` fit for a log line: no user info or query, path segments holding an
/// email masked, at most 200 characters.
fn show_location(location: &str) -> String {
    let shown = match reqwest::Url::parse(location) {
        Ok(url) => {
            let path: Vec<String> = url
                .path()
                .split('/')
                .map(|seg| {
                    let decoded = percent_encoding::percent_decode_str(seg).decode_utf8_lossy();
                    if decoded.contains('@') {
                        crate::outcome::mask_people_id(&decoded)
                    } else {
                        seg.to_owned()
                    }
                })
                .collect();
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://{}{port}{}",
                url.scheme(),
                url.host_str().unwrap_or_default(),
                path.join("/")
            )
        }
        Err(_) => format!("(not a URL: {} bytes)", location.len()),
    };
    shown
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

/// Classifies a non-2xx answer.
pub fn classify(status: u16, body: &[u8], retry_after: Option<Duration>) -> CrispError {
    let reason = envelope_reason(body);
    let failure = match status {
        300..=399 => Failure::Refused,
        401..=403 => Failure::Refused,
        404 if reason.as_deref() == Some("people_not_found") => Failure::PeopleNotFound,
        // `not_subscribed`, an unknown website, or a 404 without an envelope: the
        // website route itself is wrong, which no message can fix.
        404 => Failure::Refused,
        408 => Failure::Transient,
        420 | 429 => Failure::RateLimited,
        422 if reason
            .as_deref()
            .is_some_and(|r| INVALID_INPUT_REASONS.contains(&r)) =>
        {
            Failure::Rejected
        }
        422 => Failure::RateLimited,
        // Only these say the message itself is wrong; any other 4xx (405, 407, 410,
        // 415, 451...) would dead-letter every message although none is at fault.
        400 | 413 => Failure::Rejected,
        400..=499 => Failure::Refused,
        _ => Failure::Transient,
    };
    let what = match failure {
        Failure::Transient => "Crisp failed temporarily; retrying",
        Failure::RateLimited => "Crisp is rate limiting us; backing off",
        Failure::Rejected => "Crisp rejected the event",
        Failure::PeopleNotFound => "Crisp has no profile for this people id",
        Failure::Refused if matches!(status, 401..=404) => "Crisp refuses our credentials, plan or website id; check crisp.identifier, crisp.key, crisp.tier and crisp.website_id",
        Failure::Refused if status == 407 => "a proxy between us and Crisp asks for credentials; check the proxy settings",
        Failure::Refused => "Crisp (or something in front of it) refuses the route, not the message; check crisp.api_url and any proxy",
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
        // 422: only a documented invalid-input reason dead-letters; others are re-scheduled.
        assert_eq!(
            kind(422, r#"{"error":true,"reason":"invalid_data"}"#),
            Failure::Rejected
        );
        assert_eq!(kind(422, "<html>"), Failure::RateLimited);
        assert_eq!(
            kind(422, r#"{"error":true,"reason":"route_limited"}"#),
            Failure::RateLimited
        );
        for s in [301, 302, 307, 308] {
            assert_eq!(kind(s, ""), Failure::Refused);
        }
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
        // Other 4xx are not the message's fault: a hold, never a dead letter.
        for s in [405, 407, 409, 410, 411, 414, 415, 418, 431, 451, 499] {
            assert_eq!(kind(s, ""), Failure::Refused, "{s}");
        }
        assert!(classify(410, b"", None).message.contains("route"));
        assert!(classify(407, b"", None).message.contains("proxy"));
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
        // Long, multi-line or personal reasons are never quoted.
        let long = format!(r#"{{"reason":"{}"}}"#, "x".repeat(200_000));
        assert_eq!(
            envelope_reason(long.as_bytes()).as_deref(),
            Some("(not a reason code: 200000 bytes)")
        );
        assert_eq!(
            envelope_reason(br#"{"reason":"jane@example.com\nforged"}"#).as_deref(),
            Some("(not a reason code: 23 bytes)")
        );
        let e = classify(400, br#"{"error":true,"reason":"invalid_data"}"#, None);
        assert!(e.message.contains("invalid_data") && e.message.contains("400"));
    }

    #[test]
    fn redirects_name_their_location_without_secrets_or_emails() {
        let m = redirect_message(
            302,
            Some(
                "https://u:p@evil.example:8443/v1/website/w/people/events/jane%2Bx@example.com?k=v",
            ),
        );
        assert!(
            m.contains("`https://evil.example:8443/v1/website/w/people/events/j***@example.com`"),
            "{m}"
        );
        assert!(
            !m.contains("u:p") && !m.contains("jane") && !m.contains("k=v"),
            "{m}"
        );
        assert!(redirect_message(301, None).contains("without a Location"));
        assert!(redirect_message(301, Some("\u{1b}[31m")).contains("not a URL"));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(10));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(10)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(10));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        // Huge asks are clamped, never trusted (they used to panic or hold for years).
        for huge in [
            "999999999",
            "18446744073709551615",
            "99999999999999999999999999",
        ] {
            assert_eq!(
                parse_retry_after(huge, now),
                Some(MAX_RETRY_AFTER),
                "{huge}"
            );
        }
        let far = httpdate::fmt_http_date(now + Duration::from_secs(10 * 365 * 86_400));
        assert_eq!(parse_retry_after(&far, now), Some(MAX_RETRY_AFTER));
        // Any other form is ignored: the backoff applies.
        for bad in [
            "soon", "-1", "-5", "0.5", "1e300", "inf", "NaN", "", "+3", "3 s",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }
}
