//! Step 4: a matched message becomes a Crisp people event. Pure: no I/O.
//!
//! Crisp stores flat values, so a `data` pointer that selects an object or array is
//! flattened: nested keys join with `.` and array items use their index
//! (`{"items": [{"sku": "A"}]}` selected as `items` gives `items.0.sku = "A"`).
//! `null` leaves are left out, and so is every secret-looking key, at any depth.

use super::pointer::is_secret_looking;
use serde::Serialize;
use serde_json::{Map, Value};

/// Longest event text sent; Crisp's limit is unconfirmed and 200 characters is safe.
pub const MAX_TEXT_CHARS: usize = 200;

/// The body of `POST /website/{website_id}/people/events/{people_id}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CrispEvent {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub data: Map<String, Value>,
}

/// Adds `value` under `key` to `out`, flattened; returns how many secret-looking keys
/// were stripped.
pub fn insert_flat(out: &mut Map<String, Value>, key: &str, value: &Value) -> usize {
    match value {
        Value::Null => 0,
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if is_secret_looking(k) {
                    // A stripped object counts once; its contents are never looked at.
                    1
                } else {
                    insert_flat(out, &format!("{key}.{k}"), v)
                }
            })
            .sum(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| insert_flat(out, &format!("{key}.{i}"), v))
            .sum(),
        scalar => {
            out.insert(key.to_owned(), scalar.clone());
            0
        }
    }
}

/// Cuts text to [`MAX_TEXT_CHARS`] characters (never inside a character).
pub fn clamp_text(text: String) -> String {
    match text.char_indices().nth(MAX_TEXT_CHARS) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text,
    }
}

/// `people_id` must be an email (one `@`, something on both sides, no spaces) or a
/// hyphenated UUID.
pub fn check_people_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("is empty");
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains a space or control character");
    }
    if id.len() == 36 && uuid::Uuid::try_parse(id).is_ok() {
        return Ok(());
    }
    match id.split_once('@') {
        None => Err("is neither an email nor a people UUID"),
        Some((local, domain)) if local.is_empty() || domain.is_empty() => {
            Err("is not an email: it needs something on both sides of `@`")
        }
        Some((_, domain)) if domain.contains('@') => {
            Err("is not an email: it has more than one `@`")
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat(v: Value) -> (Value, usize) {
        let mut out = Map::new();
        let n = insert_flat(&mut out, "k", &v);
        (Value::Object(out), n)
    }

    #[test]
    fn scalars_and_null() {
        assert_eq!(flat(json!(1.5)), (json!({"k": 1.5}), 0));
        assert_eq!(flat(json!("s")), (json!({"k": "s"}), 0));
        assert_eq!(flat(json!(null)), (json!({}), 0));
    }

    #[test]
    fn objects_and_arrays_flatten_with_dots_and_indexes() {
        let (out, n) = flat(json!({"a": {"b": 1, "c": null}, "list": [true, {"sku": "X"}]}));
        assert_eq!(
            out,
            json!({"k.a.b": 1, "k.list.0": true, "k.list.1.sku": "X"})
        );
        assert_eq!(n, 0);
    }

    #[test]
    fn secret_looking_keys_are_stripped_at_any_depth() {
        let (out, n) = flat(json!({
            "name": "Jo", "password": "x", "card": {"card_number": "4111", "brand": "visa"},
            "items": [{"api_key": "k", "sku": "A"}], "vault": {"token": {"deep": 1}}
        }));
        assert_eq!(
            out,
            json!({"k.name": "Jo", "k.card.brand": "visa", "k.items.0.sku": "A"})
        );
        assert_eq!(n, 4);
    }

    #[test]
    fn text_is_clamped_on_char_boundaries() {
        let long = "é".repeat(250);
        assert_eq!(clamp_text(long).chars().count(), MAX_TEXT_CHARS);
        assert_eq!(clamp_text("short".into()), "short");
    }

    #[test]
    fn people_ids() {
        for ok in [
            "jane@example.com",
            "Jane.Doe+tag@Example.COM",
            "a@b",
            "o'brien@x.io",
            "04ed9a29-ccda-4f46-b2f3-b151d2d90fa7",
        ] {
            assert!(check_people_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "jane",
            "@example.com",
            "jane@",
            "a@b@c",
            "jane doe@example.com",
            "jane@example.com\n",
            "04ed9a29ccda4f46b2f3b151d2d90fa7",
        ] {
            assert!(check_people_id(bad).is_err(), "{bad:?}");
        }
    }
}
