//! Keeping secrets out of error texts and logs. Libraries quote what they were given: a
//! URL that does not parse comes back whole in their error, password included. So each
//! secret the bridge loads is remembered here, in the forms a library may print it, and
//! [`scrub`] replaces those, and the password of anything URL-like, before a text is shown.

use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use std::borrow::Cow;
use std::ops::Range;
use std::sync::{PoisonError, RwLock};

/// What stands in for a secret.
pub const MASK: &str = "***";

/// Shorter secrets are not replaced by value (every such substring of a log would go); a
/// URL's password of any length still is, by its place in the URL.
pub const MIN_SCRUBBED_LEN: usize = 4;

/// Most forms remembered: each rotation adds some; the oldest are forgotten first.
const MAX_REMEMBERED: usize = 64;

/// Remembered forms, oldest first, and the same longest first (so a longer form is
/// replaced before a shorter one inside it).
struct Remembered {
    by_age: Vec<String>,
    longest_first: Vec<String>,
}

static REMEMBERED: RwLock<Remembered> = RwLock::new(Remembered {
    by_age: Vec::new(),
    longest_first: Vec::new(),
});

/// Remembers a secret (the Crisp key, ...) so [`scrub`] removes it from any text.
pub fn remember(secret: &str) {
    if secret.chars().count() < MIN_SCRUBBED_LEN {
        return;
    }
    let decoded = percent_decode_str(secret)
        .decode_utf8()
        .map(Cow::into_owned)
        .ok();
    let mut forms = vec![secret.to_owned()];
    if let Some(decoded) = decoded {
        // lapin prints a parsed URL with every non-alphanumeric character encoded.
        forms.push(utf8_percent_encode(&decoded, NON_ALPHANUMERIC).to_string());
        forms.push(decoded);
    }
    // As JSON logs and `Debug` print it (`"` and `\` escaped), and a JSON log a `Debug`
    // field: escaped twice.
    for _ in 0..2 {
        for form in forms.clone() {
            forms.push(unquote(serde_json::to_string(&form).unwrap_or_default()));
            forms.push(unquote(format!("{form:?}")));
        }
        forms.sort();
        forms.dedup();
    }
    let mut remembered = REMEMBERED.write().unwrap_or_else(PoisonError::into_inner);
    let by_age = &mut remembered.by_age;
    for form in forms {
        if form.chars().count() < MIN_SCRUBBED_LEN || by_age.contains(&form) {
            continue;
        }
        if by_age.len() >= MAX_REMEMBERED {
            by_age.remove(0);
        }
        by_age.push(form);
    }
    let mut longest_first = by_age.clone();
    longest_first.sort_by_key(|form| std::cmp::Reverse(form.len()));
    remembered.longest_first = longest_first;
}

/// Remembers the password of an AMQP URL, found even when the URL does not parse.
pub fn remember_url(url: &str) {
    if let Some(password) = url_password(url) {
        remember(password);
    }
}

fn unquote(quoted: String) -> String {
    quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .map(str::to_owned)
        .unwrap_or(quoted)
}

/// `text` without any remembered secret and without the password of any URL-like word
/// (`amqp://user:***@host`, also `amqp:user:***@host`, which does not parse).
pub fn scrub(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    {
        let remembered = REMEMBERED.read().unwrap_or_else(PoisonError::into_inner);
        for secret in &remembered.longest_first {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), MASK));
            }
        }
    }
    if let Some(redacted) = redact_urls(&out) {
        return Cow::Owned(redacted);
    }
    out
}

/// The password of a URL, even one that does not parse: between the user and the last
/// `@`, the user starting after `://`, or after the scheme's `:` when the slashes are
/// missing (`amqp:user:pass@host`). Without `://`, a user info without `:`
/// (`amqp:pass@host`) counts as the password.
pub fn url_password(url: &str) -> Option<&str> {
    password_range(url).map(|r| &url[r])
}

/// The URL for a log line, its password masked; a string that is neither a URL nor holds
/// an `@` is not shown at all (it may be a password pasted in the wrong place).
pub fn redact_url(url: &str) -> String {
    match password_range(url) {
        Some(r) => format!("{}{MASK}{}", &url[..r.start], &url[r.end..]),
        None if url.contains("://") || url.contains('@') => url.to_owned(),
        None => "[not a URL]".to_owned(),
    }
}

fn password_range(text: &str) -> Option<Range<usize>> {
    let at = text.rfind('@')?;
    let head = &text[..at];
    let (user_start, hierarchical) = match head.find("://") {
        Some(i) => (i + 3, true),
        None => {
            let after = head.find(':')? + 1;
            let slashes = head[after..].len() - head[after..].trim_start_matches('/').len();
            (after + slashes, false)
        }
    };
    let range = match head[user_start..].find(':') {
        Some(colon) => user_start + colon + 1..at,
        None if !hierarchical => user_start..at,
        // `amqp://user@host`: a user without a password.
        None => return None,
    };
    (!range.is_empty()).then_some(range)
}

/// Characters that end a URL-like word in free text, JSON and logs (never part of a URL
/// as a library quotes it).
fn ends_url(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '"' | '\''
                | '`'
                | '<'
                | '>'
                | '('
                | ')'
                | '['
                | ']'
                | '{'
                | '}'
                | ','
                | ';'
                | '|'
                | '\\'
        )
}

/// `text` with the password of each URL-like word masked, or `None` when there is none.
fn redact_urls(text: &str) -> Option<String> {
    if !text.contains('@') {
        return None;
    }
    let base = text.as_ptr() as usize;
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for word in text.split(ends_url).filter(|w| w.contains('@')) {
        let Some(range) = password_range(word) else {
            continue;
        };
        let start = word.as_ptr() as usize - base;
        out.push_str(&text[copied..start + range.start]);
        out.push_str(MASK);
        copied = start + range.end;
    }
    (copied > 0).then(|| {
        out.push_str(&text[copied..]);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_in_urls_that_do_not_parse() {
        for (url, password) in [
            ("amqp://guest:pa55@127.0.0.1:5672/%2f", Some("pa55")),
            ("amqp:guest:pa55@127.0.0.1:5672/%2f", Some("pa55")),
            ("amqp:/guest:pa55@host", Some("pa55")),
            ("amqps:///guest:pa55@host", Some("pa55")),
            ("amqp://guest:p@ss:w/rd@host/%2f", Some("p@ss:w/rd")),
            ("amqp://guest:p%40ss@host", Some("p%40ss")),
            ("amqp:pa55@host", Some("pa55")),
            ("guest:pa55@host", Some("pa55")),
            ("amqp://guest@host", None),
            ("amqp://guest:@host", None),
            ("amqp://host/%2f", None),
            ("jane@example.com", None),
        ] {
            assert_eq!(url_password(url), password, "{url}");
        }
    }

    #[test]
    fn urls_lose_their_password_even_when_they_do_not_parse() {
        assert_eq!(
            redact_url("amqp://guest:pa55@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqp:guest:Kq42=Zzbf@127.0.0.1:44391/%2f"),
            "amqp:guest:***@127.0.0.1:44391/%2f"
        );
        assert_eq!(redact_url("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact_url("hunter2-pasted-here"), "[not a URL]");
    }

    #[test]
    fn url_like_words_lose_their_password_anywhere_in_a_text() {
        for (text, expected) in [
            (
                "Invalid URL: 'amqp:guest:Kq42=Zzbf/x@127.0.0.1:44391/%2f'",
                "Invalid URL: 'amqp:guest:***@127.0.0.1:44391/%2f'",
            ),
            (
                r#"{"error":"at amqp://u:p@ss@h:1/%2f, then amqps://v:q@i"}"#,
                r#"{"error":"at amqp://u:***@h:1/%2f, then amqps://v:***@i"}"#,
            ),
            ("url=amqp:u:secret@[::1]:5672", "url=amqp:u:***@[::1]:5672"),
            (
                "paid by jane@example.com at 12:30",
                "paid by jane@example.com at 12:30",
            ),
            ("amqp://guest@host", "amqp://guest@host"),
        ] {
            assert_eq!(scrub(text), expected, "{text}");
        }
        assert!(matches!(scrub("no url here: a:b"), Cow::Borrowed(_)));
    }

    #[test]
    fn remembered_secrets_go_in_every_form_a_library_prints() {
        remember_url("amqp:guest:Unit-Te5t\"s3cr3t%21@host");
        let raw = "Unit-Te5t\"s3cr3t%21";
        for text in [
            format!("echo {raw} here"),
            "decoded Unit-Te5t\"s3cr3t! here".to_owned(),
            "encoded Unit%2DTe5t%22s3cr3t%21 here".to_owned(),
            format!("json {}", serde_json::to_string(raw).unwrap()),
            format!("debug {:?}", "Unit-Te5t\"s3cr3t!"),
            "userinfo: AMQPUserInfo { username: \"guest\", password: \"Unit-Te5t\\\"s3cr3t!\" }"
                .to_owned(),
        ] {
            let out = scrub(&text);
            assert!(
                !out.contains("s3cr3t") && out.contains(MASK),
                "{text} -> {out}"
            );
        }
        remember("abc");
        assert_eq!(scrub("abc abc"), "abc abc", "too short to replace by value");
    }
}
