//! Step 2: a message (body, content type, headers) becomes the JSON object rules see,
//! or a dead letter saying why not.
//!
//! A plain message is its JSON body. A CloudEvent, structured (`application/cloudevents+json`)
//! or binary (`cloudEvents:*` headers, the body being the data), becomes the same structured
//! envelope `{"specversion", "id", "source", "type", ..., "data": <payload>}` in both modes,
//! so one rule serves both; see [`cloudevents`].

pub mod cloudevents;

use crate::outcome::{DeadLetter, Reason};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use serde_json::Value;
use std::hash::{Hash, Hasher};

/// Longest message id kept as it is for the duplicate window; a longer one (a CloudEvents
/// `source` + `id` may be up to `amqp.max_message_bytes`) is replaced by a 128-bit hash of it,
/// so the window's memory stays bounded.
pub const MAX_ID_BYTES: usize = 256;

/// What decoding reads of one message.
#[derive(Debug, Clone, Default)]
pub struct Incoming<'a> {
    pub body: &'a [u8],
    /// The AMQP `content_type` property.
    pub content_type: Option<&'a str>,
    /// The AMQP `message_id` property.
    pub message_id: Option<&'a str>,
    /// The AMQP `type` property.
    pub amqp_type: Option<&'a str>,
    /// `cloudEvents:*` headers: attribute name (prefix removed, lower-cased) and value.
    pub ce_attributes: Vec<(String, Value)>,
}

impl<'a> Incoming<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Self {
            body,
            ..Self::default()
        }
    }

    /// Reads what decoding needs from a delivery: only `cloudEvents:*` headers are copied.
    pub fn from_delivery(delivery: &'a Delivery) -> Self {
        let p = &delivery.properties;
        let mut incoming = Self {
            body: &delivery.data,
            content_type: p.content_type().as_ref().map(|s| s.as_str()),
            message_id: p.message_id().as_ref().map(|s| s.as_str()),
            amqp_type: p.kind().as_ref().map(|s| s.as_str()),
            ce_attributes: Vec::new(),
        };
        if let Some(headers) = p.headers() {
            for (name, value) in headers {
                if cloudevents::attribute_name(name.as_str()).is_some() {
                    incoming.add_header(name.as_str(), amqp_to_json(value));
                }
            }
        }
        incoming
    }

    /// Adds one header; anything but a `cloudEvents:*` header is ignored.
    pub fn add_header(&mut self, name: &str, value: Value) {
        if let Some(attribute) = cloudevents::attribute_name(name) {
            self.ce_attributes.push((attribute, value));
        }
    }
}

/// A decoded message: what rules see, and what identifies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// What pointers, `when`, templates and schemas see: the body, or the CloudEvents envelope.
    pub doc: Value,
    /// The id for the duplicate window: CloudEvents `source` + `id`, else the AMQP
    /// `message_id`; `None` when empty.
    pub id: Option<String>,
    /// What a rule's `type` matches: the CloudEvents `type`, else the AMQP `type` property.
    pub event_type: Option<String>,
    /// Which CloudEvents mode the message used, if any.
    pub cloud_event: Option<cloudevents::Mode>,
}

/// Decodes one message.
pub fn decode(incoming: &Incoming<'_>) -> Result<Decoded, DeadLetter> {
    if let Some(decoded) = cloudevents::decode(incoming)? {
        return Ok(decoded);
    }
    let doc = parse_object(incoming.body)?;
    Ok(Decoded {
        doc,
        id: incoming
            .message_id
            .filter(|id| !id.is_empty())
            .map(bounded_id),
        event_type: incoming.amqp_type.map(str::to_owned),
        cloud_event: None,
    })
}

/// An id as the duplicate window keeps it: itself when short, else a 128-bit hash of it.
pub(crate) fn bounded_id(id: &str) -> String {
    if id.len() <= MAX_ID_BYTES {
        return id.to_owned();
    }
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    };
    format!("#hash:{:016x}{:016x}:{}", half(1), half(2), id.len())
}

fn amqp_to_json(value: &AMQPValue) -> Value {
    use AMQPValue as A;
    match value {
        A::Boolean(b) => Value::Bool(*b),
        A::ShortShortInt(n) => (*n).into(),
        A::ShortShortUInt(n) => (*n).into(),
        A::ShortInt(n) => (*n).into(),
        A::ShortUInt(n) => (*n).into(),
        A::LongInt(n) => (*n).into(),
        A::LongUInt(n) => (*n).into(),
        A::LongLongInt(n) => (*n).into(),
        A::Timestamp(n) => (*n).into(),
        A::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        A::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        A::ShortString(s) => Value::String(s.as_str().to_owned()),
        A::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        A::ByteArray(b) => Value::String(String::from_utf8_lossy(b.as_slice()).into_owned()),
        _ => Value::Null,
    }
}

/// Bytes to a JSON object, or the dead letter saying why not.
pub fn parse_object(body: &[u8]) -> Result<Value, DeadLetter> {
    let value = parse_json(body, "body")?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(DeadLetter::new(
            Reason::NotAnObject,
            format!("body is JSON {}, not an object", json_kind(&value)),
            None,
        ))
    }
}

/// Bytes to any JSON value (`what` names them in the detail). serde_json stops at 128
/// levels of nesting, so a deeply nested body is `invalid_json`, never a stack overflow.
pub fn parse_json(body: &[u8], what: &str) -> Result<Value, DeadLetter> {
    serde_json::from_slice(body).map_err(|e| {
        DeadLetter::new(
            Reason::InvalidJson,
            format!("{what} is not valid JSON ({} bytes): {e}", body.len()),
            None,
        )
    })
}

pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Object(_) => "an object",
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_pass_everything_else_is_explained() {
        assert!(parse_object(br#"{"a":1}"#).is_ok());
        assert_eq!(
            parse_object(b"\xff\xfe").unwrap_err().reason,
            Reason::InvalidJson
        );
        assert_eq!(parse_object(b"").unwrap_err().reason, Reason::InvalidJson);
        assert_eq!(
            parse_object(b"{\"a\":").unwrap_err().reason,
            Reason::InvalidJson
        );
        let e = parse_object(b"[1]").unwrap_err();
        assert_eq!(e.reason, Reason::NotAnObject);
        assert!(e.detail.contains("array"));
        assert_eq!(
            parse_object(b"null").unwrap_err().reason,
            Reason::NotAnObject
        );
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
            match parse_object(&body) {
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
