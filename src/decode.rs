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
}
