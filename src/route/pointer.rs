//! JSON pointers (RFC 6901) as written in rules, checked once at start-up, and the
//! "secret-looking key" test applied to what they select.

use serde_json::Value;

/// A pointer validated at start-up. Lookup uses `serde_json`'s own implementation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer(String);

impl Pointer {
    pub fn parse(pointer: &str) -> Result<Self, String> {
        if !pointer.starts_with('/') {
            return Err(format!(
                "`{pointer}` is not a JSON pointer: it must start with `/`, like `/customer/email`"
            ));
        }
        let mut chars = pointer.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(format!(
                    "`{pointer}` has a `~` not followed by 0 or 1 (write `~0` for `~` and `~1` for `/`)"
                ));
            }
        }
        Ok(Self(pointer.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value found, treating `null` as absent.
    pub fn find<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        doc.pointer(&self.0).filter(|v| !v.is_null())
    }

    /// The unescaped reference tokens (`/a~1b/c` -> `a/b`, `c`).
    pub fn tokens(&self) -> impl Iterator<Item = String> + '_ {
        self.0[1..]
            .split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
    }
}

const SECRET_PARTS: [&str; 8] = [
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "authorization",
    "cardnumber",
    "privatekey",
];
const SECRET_SUFFIXES: [&str; 4] = ["ssn", "cvv", "cvc", "iban"];

/// True when a key looks like it holds a secret (`docs/contract.md`, "Data hygiene"):
/// lower-cased and without `_` and `-`, it contains one of the secret words, or ends
/// with `ssn`, `cvv`, `cvc` or `iban`.
pub fn is_secret_looking(key: &str) -> bool {
    let k: String = key
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect();
    SECRET_PARTS.iter().any(|p| k.contains(p)) || SECRET_SUFFIXES.iter().any(|s| k.ends_with(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_finds() {
        let p = Pointer::parse("/a~1b/0").unwrap();
        assert_eq!(p.find(&json!({"a/b": ["x"]})), Some(&json!("x")));
        assert_eq!(p.tokens().collect::<Vec<_>>(), vec!["a/b", "0"]);
        assert_eq!(
            Pointer::parse("/n").unwrap().find(&json!({"n": null})),
            None
        );
    }

    #[test]
    fn refuses_bad_pointers() {
        assert!(Pointer::parse("customer/email")
            .unwrap_err()
            .contains("start with `/`"));
        assert!(Pointer::parse("/a~2").unwrap_err().contains("~0"));
        assert!(Pointer::parse("/a~").is_err());
    }

    #[test]
    fn secret_looking_keys() {
        for k in [
            "password",
            "user_password",
            "Pass-Word",
            "api_key",
            "apiKey",
            "AccessToken",
            "client_secret",
            "Authorization",
            "card_number",
            "private-key",
            "ssn",
            "user_ssn",
            "CVV",
            "cvc",
            "iban",
            "passwd",
        ] {
            assert!(is_secret_looking(k), "{k} should be secret-looking");
        }
        for k in [
            "email",
            "order_id",
            "total",
            "lesson",
            "ssn_last_digits_count",
            "tokens_used_x",
        ] {
            // `tokens_used_x` contains "token": secret-looking by the rule.
            let expected = k.contains("token");
            assert_eq!(is_secret_looking(k), expected, "{k}");
        }
    }
}
