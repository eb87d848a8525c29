//! CloudEvents 1.0 over AMQP (the CloudEvents AMQP protocol binding): structured mode
//! (content type `application/cloudevents+json`, the body is the whole event) and binary
//! mode (`cloudEvents:*` application properties, the body is the data). Both become the
//! same structured envelope, so pointers like `/data/customer/email` or `/type` read the
//! same in either mode.

use super::{bounded_id, parse_json, parse_object, Decoded, Incoming};
use crate::outcome::{DeadLetter, Reason};
use base64::Engine;
use serde_json::{Map, Value};

/// Structured mode's content type.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How the CloudEvent arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Structured,
    Binary,
}

/// The attribute a header carries, when it is a CloudEvents header: `cloudEvents:type`
/// (the AMQP binding's prefix) or `cloudEvents_type` (the JMS-compatible one) -> `type`.
pub fn attribute_name(header: &str) -> Option<String> {
    let prefix = header.get(..12)?;
    let rest = &header[12..];
    let is_prefix =
        prefix.eq_ignore_ascii_case("cloudevents:") || prefix.eq_ignore_ascii_case("cloudevents_");
    (is_prefix && !rest.is_empty()).then(|| rest.to_ascii_lowercase())
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// True for a content type whose body is JSON (absent counts as JSON).
fn is_json(content_type: Option<&str>) -> bool {
    content_type.map(media_type).is_none_or(|m| {
        m == "application/json" || m == "text/json" || m.ends_with("+json") || m.is_empty()
    })
}

/// The CloudEvent in this message, or `None` when it is not one.
pub(super) fn decode(incoming: &Incoming<'_>) -> Result<Option<Decoded>, DeadLetter> {
    let structured = incoming
        .content_type
        .is_some_and(|ct| media_type(ct) == STRUCTURED_CONTENT_TYPE);
    let binary = incoming
        .ce_attributes
        .iter()
        .any(|(name, _)| name == "specversion");
    let (envelope, mode) = if structured {
        let Value::Object(envelope) = parse_object(incoming.body)? else {
            return unreachable_object();
        };
        (envelope, Mode::Structured)
    } else if binary {
        (binary_envelope(incoming)?, Mode::Binary)
    } else {
        return Ok(None);
    };
    let text = |name: &str| {
        match envelope.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        found => Err(DeadLetter::new(
            Reason::SchemaViolation,
            format!(
                "not a valid CloudEvent ({} mode): attribute `{name}` at /{name} is {}; a CloudEvent needs non-empty string attributes specversion, id, source and type",
                match mode {
                    Mode::Structured => "structured",
                    Mode::Binary => "binary",
                },
                match found {
                    None => "missing",
                    Some(Value::String(_)) => "empty",
                    Some(v) => super::json_kind(v),
                }
            ),
            None,
        )),
    }
    };
    let specversion = text("specversion")?;
    let id = text("id")?;
    let source = text("source")?;
    let event_type = text("type")?;
    if !specversion.starts_with("1.") {
        return Err(DeadLetter::new(
            Reason::SchemaViolation,
            format!(
                "CloudEvents specversion at /specversion is `{}`; only 1.x is understood",
                truncate(&specversion)
            ),
            None,
        ));
    }
    Ok(Some(Decoded {
        doc: Value::Object(envelope),
        id: Some(bounded_id(&dedup_id(&source, &id))),
        event_type: Some(event_type),
        cloud_event: Some(mode),
    }))
}

/// `source` and `id` together identify an event (CloudEvents: unique per source). The
/// length prefix keeps `("a/b", "c")` and `("a", "b/c")` apart.
pub fn dedup_id(source: &str, id: &str) -> String {
    format!("ce:{}:{source}{id}", source.len())
}

fn unreachable_object<T>() -> Result<T, DeadLetter> {
    Err(DeadLetter::new(
        Reason::NotAnObject,
        "body is not a JSON object",
        None,
    ))
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Binary mode: the attributes from the headers, the data from the body, decoded by the
/// AMQP `content_type` (`datacontenttype`): JSON when it says JSON or is absent, a string
/// when it is UTF-8 text, `data_base64` otherwise.
fn binary_envelope(incoming: &Incoming<'_>) -> Result<Map<String, Value>, DeadLetter> {
    let mut envelope = Map::new();
    for (name, value) in &incoming.ce_attributes {
        if name != "data" && name != "data_base64" {
            envelope.insert(name.clone(), value.clone());
        }
    }
    if let Some(ct) = incoming.content_type {
        envelope.insert("datacontenttype".into(), Value::String(ct.to_owned()));
    }
    if incoming.body.is_empty() {
        return Ok(envelope);
    }
    if is_json(incoming.content_type) {
        let data = parse_json(incoming.body, "CloudEvent data (binary mode body)")?;
        envelope.insert("data".into(), data);
    } else if let Ok(text) = std::str::from_utf8(incoming.body) {
        envelope.insert("data".into(), Value::String(text.to_owned()));
    } else {
        let encoded = base64::engine::general_purpose::STANDARD.encode(incoming.body);
        envelope.insert("data_base64".into(), Value::String(encoded));
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::super::decode as decode_message;
    use super::*;
    use serde_json::json;

    fn binary<'a>(body: &'a [u8], content_type: Option<&'a str>) -> Incoming<'a> {
        let mut m = Incoming::new(body);
        m.content_type = content_type;
        for (k, v) in [
            ("cloudEvents:specversion", "1.0"),
            ("cloudEvents:id", "evt-1"),
            ("cloudEvents:source", "/shop"),
            ("cloudEvents:type", "com.example.order.created"),
            ("cloudEvents:subject", "A-1001"),
            ("x-other", "ignored"),
        ] {
            m.add_header(k, json!(v));
        }
        m
    }

    #[test]
    fn structured_and_binary_give_the_same_envelope() {
        let data = json!({"customer": {"email": "a@b.c"}});
        let structured_body = serde_json::to_vec(&json!({
            "specversion": "1.0", "id": "evt-1", "source": "/shop",
            "type": "com.example.order.created", "subject": "A-1001",
            "datacontenttype": "application/json", "data": data,
        }))
        .unwrap();
        let mut s = Incoming::new(&structured_body);
        s.content_type = Some("application/cloudevents+json; charset=utf-8");
        let s = decode_message(&s).unwrap();
        let body = serde_json::to_vec(&data).unwrap();
        let mut with_amqp_type = binary(&body, Some("application/json"));
        with_amqp_type.amqp_type = Some("ignored.when.a.cloud.event");
        let b = decode_message(&with_amqp_type).unwrap();
        assert_eq!(b.event_type.as_deref(), Some("com.example.order.created"));
        assert_eq!(s.doc, b.doc);
        assert_eq!(s.id, b.id);
        assert_eq!(s.id.as_deref(), Some(dedup_id("/shop", "evt-1").as_str()));
        assert_eq!(s.event_type.as_deref(), Some("com.example.order.created"));
        assert_eq!(s.cloud_event, Some(Mode::Structured));
        assert_eq!(b.cloud_event, Some(Mode::Binary));
        assert_eq!(b.doc.pointer("/data/customer/email"), Some(&json!("a@b.c")));
    }

    #[test]
    fn binary_data_that_is_not_json_is_kept_as_text_or_base64() {
        let t = decode_message(&binary(b"hello", Some("text/plain"))).unwrap();
        assert_eq!(t.doc["data"], json!("hello"));
        let b = decode_message(&binary(b"\xff\x00", Some("application/octet-stream"))).unwrap();
        assert_eq!(b.doc["data_base64"], json!("/wA="));
        let bad = decode_message(&binary(b"{", None)).unwrap_err();
        assert_eq!(bad.reason, Reason::InvalidJson);
        assert!(bad.detail.contains("binary mode body"), "{}", bad.detail);
    }

    #[test]
    fn a_cloud_event_without_its_required_attributes_is_a_schema_violation() {
        let mut m = Incoming::new(br#"{"specversion":"1.0","source":"/s","type":"t"}"#);
        m.content_type = Some(STRUCTURED_CONTENT_TYPE);
        let e = decode_message(&m).unwrap_err();
        assert_eq!(e.reason, Reason::SchemaViolation);
        assert!(e.detail.contains("/id is missing"), "{}", e.detail);
        let mut m = Incoming::new(br#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#);
        m.content_type = Some(STRUCTURED_CONTENT_TYPE);
        assert!(decode_message(&m)
            .unwrap_err()
            .detail
            .contains("/specversion"));
    }

    #[test]
    fn plain_messages_use_the_amqp_type_and_message_id() {
        let mut m = Incoming::new(br#"{"a":1}"#);
        m.amqp_type = Some("com.example.plain");
        m.message_id = Some("m-1");
        m.add_header("cloudEvents:type", json!("not binary without specversion"));
        let d = decode_message(&m).unwrap();
        assert_eq!(d.event_type.as_deref(), Some("com.example.plain"));
        assert_eq!(d.id.as_deref(), Some("m-1"));
        assert_eq!(d.cloud_event, None);
        m.message_id = Some("");
        assert_eq!(decode_message(&m).unwrap().id, None);
    }

    #[test]
    fn header_prefixes() {
        assert_eq!(attribute_name("cloudEvents:type").as_deref(), Some("type"));
        assert_eq!(attribute_name("cloudEvents_ID").as_deref(), Some("id"));
        assert_eq!(attribute_name("cloudEvents:"), None);
        assert_eq!(attribute_name("x-ce-type"), None);
        assert_eq!(attribute_name("é"), None);
    }

    #[test]
    fn a_huge_id_is_bounded() {
        let id = "x".repeat(100_000);
        let bounded = bounded_id(&dedup_id("/s", &id));
        assert!(bounded.len() < 64, "{bounded}");
        assert_ne!(bounded, bounded_id(&dedup_id("/s", &id[1..])));
    }
}
