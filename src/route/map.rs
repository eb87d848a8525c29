//! Step 4: a matched message becomes a Crisp people event. Pure: no I/O.
//!
//! Crisp stores flat values under keys that are lower-case `a-z 0-9 _ -`, so a `data`
//! pointer that selects an object or array is flattened: levels join with `_` and array
//! items use their index (`{"items": [{"sku": "A"}]}` selected as `items` gives
//! `items_0_sku = "A"`), and every key is normalised by [`data_key`]. `null` leaves are
//! left out, and so is every secret-looking key, judged on each level and on the whole
//! key as sent. One rule yields at most `max_data_keys` keys.

use super::pointer::is_secret_looking;
use serde::Serialize;
use serde_json::{Map, Value};
use std::borrow::Cow;

/// Longest event text sent; Crisp's limit is unconfirmed and 200 characters is safe.
pub const MAX_TEXT_CHARS: usize = 200;

/// Longest `data` key sent. Flattening repeats a key's prefix in every leaf under it, so
/// without a bound a 1 MiB message could make a body of many megabytes.
pub const MAX_DATA_KEY_BYTES: usize = 128;

/// Default of `delivery.max_data_keys`: most `data` keys one event carries.
pub const DEFAULT_MAX_DATA_KEYS: usize = 50;

/// The body of `POST /website/{website_id}/people/events/{people_id}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CrispEvent {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub data: Map<String, Value>,
}

/// A key made to follow Crisp's custom-data rule: lower-cased, and every character
/// outside `a-z 0-9 _ -` replaced by `_`.
pub fn data_key(raw: &str) -> Cow<'_, str> {
    if is_data_key(raw) {
        return Cow::Borrowed(raw);
    }
    Cow::Owned(
        raw.chars()
            .flat_map(char::to_lowercase)
            .map(|c| match c {
                'a'..='z' | '0'..='9' | '_' | '-' => c,
                _ => '_',
            })
            .collect(),
    )
}

/// True when `key` already follows Crisp's custom-data key rule.
pub fn is_data_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// What building one event's `data` left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataCounts {
    /// Secret-looking keys removed (a stripped object counts once).
    pub stripped: usize,
    /// Keys that became the same as an earlier one after the key rule (the first, in
    /// rule order then key order, wins).
    pub collisions: usize,
    /// Keys beyond `max_data_keys`.
    pub dropped: usize,
}

/// Builds an event's flat `data`.
#[derive(Debug)]
pub struct DataBuilder {
    data: Map<String, Value>,
    counts: DataCounts,
    max_keys: usize,
}

impl DataBuilder {
    pub fn new(max_keys: usize) -> Self {
        Self {
            data: Map::new(),
            counts: DataCounts::default(),
            max_keys,
        }
    }

    /// Adds `value` under `key` (already a valid data key), flattened.
    pub fn insert(&mut self, key: &str, value: &Value) {
        if key.len() > MAX_DATA_KEY_BYTES || self.data.len() >= self.max_keys {
            // Nothing under here can be sent: count it without building keys, so a
            // hostile body costs linear time, not leaves × key length.
            self.counts.dropped += leaves(value);
            return;
        }
        match value {
            Value::Null => {}
            Value::Object(map) => {
                for (k, v) in map {
                    let k = data_key(k);
                    if is_secret_looking(&k) {
                        // A stripped object counts once; its contents are never looked at.
                        self.counts.stripped += 1;
                    } else {
                        self.insert(&format!("{key}_{k}"), v);
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    self.insert(&format!("{key}_{i}"), v);
                }
            }
            scalar => {
                if is_secret_looking(key) {
                    // `credit_card` + `number`: harmless alone, a card number together.
                    self.counts.stripped += 1;
                } else if self.data.contains_key(key) {
                    self.counts.collisions += 1;
                } else if self.data.len() >= self.max_keys {
                    self.counts.dropped += 1;
                } else {
                    self.data.insert(key.to_owned(), scalar.clone());
                }
            }
        }
    }

    pub fn finish(self) -> (Map<String, Value>, DataCounts) {
        (self.data, self.counts)
    }
}

/// Scalars (not `null`) in `value`: the keys it would flatten into. Depth is bounded by
/// the JSON parser's recursion limit.
fn leaves(value: &Value) -> usize {
    match value {
        Value::Null => 0,
        Value::Object(map) => map.values().map(leaves).sum(),
        Value::Array(items) => items.iter().map(leaves).sum(),
        _ => 1,
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
    if id.chars().any(is_format_char) {
        // U+202E, U+200B, U+FEFF...: invisible, they make lookalike profiles.
        return Err("contains an invisible Unicode format character (such as U+200B or U+202E)");
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

/// Unicode format characters (general category Cf): invisible or direction-changing.
fn is_format_char(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
        | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat(v: Value) -> (Value, usize) {
        let mut b = DataBuilder::new(DEFAULT_MAX_DATA_KEYS);
        b.insert("k", &v);
        let (data, counts) = b.finish();
        (Value::Object(data), counts.stripped)
    }

    #[test]
    fn scalars_and_null() {
        assert_eq!(flat(json!(1.5)), (json!({"k": 1.5}), 0));
        assert_eq!(flat(json!("s")), (json!({"k": "s"}), 0));
        assert_eq!(flat(json!(null)), (json!({}), 0));
    }

    #[test]
    fn objects_and_arrays_flatten_with_underscores_and_indexes() {
        let (out, n) = flat(json!({"a": {"b": 1, "c": null}, "list": [true, {"sku": "X"}]}));
        assert_eq!(
            out,
            json!({"k_a_b": 1, "k_list_0": true, "k_list_1_sku": "X"})
        );
        assert_eq!(n, 0);
    }

    #[test]
    fn keys_follow_crisps_rule() {
        assert_eq!(data_key("order_id"), "order_id");
        assert_eq!(data_key("Order ID"), "order_id");
        assert_eq!(data_key("card.Brand"), "card_brand");
        assert_eq!(data_key("Prénom"), "pr_nom");
        assert_eq!(data_key("a-b"), "a-b");
        assert!(is_data_key("items_0_sku") && !is_data_key("Total") && !is_data_key(""));
        let (out, _) = flat(json!({"First Name": "Jo", "Card": {"Brand": "visa"}}));
        assert_eq!(out, json!({"k_first_name": "Jo", "k_card_brand": "visa"}));
    }

    #[test]
    fn colliding_keys_keep_the_first_value_and_are_counted() {
        let mut b = DataBuilder::new(DEFAULT_MAX_DATA_KEYS);
        // Objects are read in key order (`A_B` < `a` < `a_b`), so the outcome does not
        // depend on how the publisher ordered its JSON.
        b.insert("k", &json!({"a_b": 1, "a": {"b": 2}, "A_B": 3}));
        let (data, counts) = b.finish();
        assert_eq!(Value::Object(data), json!({"k_a_b": 3}));
        assert_eq!(counts.collisions, 2);
    }

    #[test]
    fn long_keys_are_dropped_and_hostile_bodies_cost_linear_time() {
        // 400 KB of key over 20,000 leaves: leaves × key length would be 8 GB of keys.
        let long = "k".repeat(400_000);
        let leaves: Map<String, Value> = (0..20_000).map(|i| (format!("a{i}"), json!(i))).collect();
        let doc = json!({ long.clone(): Value::Object(leaves), "ok": 1 });
        let mut b = DataBuilder::new(DEFAULT_MAX_DATA_KEYS);
        b.insert("card", &doc);
        let (data, counts) = b.finish();
        assert_eq!(Value::Object(data), json!({"card_ok": 1}));
        assert_eq!(counts.dropped, 20_000);
        let mut b = DataBuilder::new(2);
        b.insert("k", &json!({"a": 1, "b": 2, "c": {"d": [1, 2, null]}}));
        assert_eq!(b.finish().1.dropped, 2);
    }

    #[test]
    fn at_most_max_keys_are_kept_and_the_rest_counted() {
        let mut b = DataBuilder::new(3);
        b.insert("k", &json!([1, 2, 3, 4, 5]));
        let (data, counts) = b.finish();
        assert_eq!(Value::Object(data), json!({"k_0": 1, "k_1": 2, "k_2": 3}));
        assert_eq!(counts.dropped, 2);
    }

    #[test]
    fn secret_looking_keys_are_stripped_at_any_depth() {
        let (out, n) = flat(json!({
            "name": "Jo", "password": "x", "card": {"card_number": "4111", "brand": "visa"},
            "items": [{"api_key": "k", "sku": "A"}], "vault": {"token": {"deep": 1}}
        }));
        assert_eq!(
            out,
            json!({"k_name": "Jo", "k_card_brand": "visa", "k_items_0_sku": "A"})
        );
        assert_eq!(n, 4);
    }

    #[test]
    fn secrets_split_across_levels_are_judged_on_the_whole_key() {
        let mut b = DataBuilder::new(DEFAULT_MAX_DATA_KEYS);
        let doc = json!({"credit_card": {"number": "4111111111111111", "brand": "visa"}, "api": {"key": "k", "name": "n"}, "private": {"key": "p"}});
        b.insert("credit_card", &doc["credit_card"]);
        b.insert("api", &doc["api"]);
        b.insert("private", &doc["private"]);
        let (data, counts) = b.finish();
        assert_eq!(
            Value::Object(data),
            json!({"credit_card_brand": "visa", "api_name": "n"})
        );
        assert_eq!(counts.stripped, 3);
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
            "jane\u{202E}moc.elpmaxe@x",
            "ja\u{200B}ne@example.com",
            "\u{FEFF}jane@example.com",
            "jane@exa\u{2060}mple.com",
        ] {
            assert!(check_people_id(bad).is_err(), "{bad:?}");
        }
    }
}
