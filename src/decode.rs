//! Step 2: message bytes become a JSON object, or a dead letter saying why not.

use crate::outcome::{DeadLetter, Reason};
use serde_json::Value;

pub fn decode(body: &[u8]) -> Result<Value, DeadLetter> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        DeadLetter::new(
            Reason::InvalidJson,
            format!("body is not valid JSON ({} bytes): {e}", body.len()),
            None,
        )
    })?;
    if value.is_object() {
        Ok(value)
    } else {
        let kind = match value {
            Value::Array(_) => "an array",
            Value::String(_) => "a string",
            Value::Number(_) => "a number",
            Value::Bool(_) => "a boolean",
            _ => "null",
        };
        Err(DeadLetter::new(
            Reason::NotAnObject,
            format!("body is JSON {kind}, not an object"),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_pass_everything_else_is_explained() {
        assert!(decode(br#"{"a":1}"#).is_ok());
        assert_eq!(decode(b"\xff\xfe").unwrap_err().reason, Reason::InvalidJson);
        assert_eq!(decode(b"").unwrap_err().reason, Reason::InvalidJson);
        assert_eq!(decode(b"{\"a\":").unwrap_err().reason, Reason::InvalidJson);
        let e = decode(b"[1]").unwrap_err();
        assert_eq!(e.reason, Reason::NotAnObject);
        assert!(e.detail.contains("array"));
        assert_eq!(decode(b"null").unwrap_err().reason, Reason::NotAnObject);
    }

    #[test]
    fn any_bytes_route_to_a_decision_without_panicking() {
        use crate::route::{Routed, Router};
        use rand::{Rng, SeedableRng};
        let config = crate::config::from_toml_str(
            r##"
            [[rules]]
            name = "r"
            routing_key = "#"
            people_id = ["/a", "/b/c", "/d/0"]
            text = "x:{/t}"
            data = { k = "/k", n = "/n/m" }
        "##,
        )
        .unwrap();
        let router = Router::compile(&config.rules).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let pieces: [&[u8]; 12] = [
            b"{",
            b"}",
            b"\"a\":",
            b"\"t\":",
            b"\"b\":{\"c\":",
            b"\"x@y\"",
            b"[",
            b"]",
            b",",
            b"null",
            b"1e999",
            b"\xff",
        ];
        for _ in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..rng.random_range(0..12) {
                if rng.random_bool(0.8) {
                    body.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
                } else {
                    body.push(rng.random());
                }
            }
            match decode(&body) {
                Ok(doc) => match router.route("any.key", &doc) {
                    Routed::Event(m) => assert!(!m.event.text.trim().is_empty()),
                    Routed::Invalid(dl) => assert!(!dl.detail.is_empty()),
                    Routed::Unmatched => {}
                },
                Err(dl) => assert!(!dl.detail.is_empty()),
            }
        }
    }
}
