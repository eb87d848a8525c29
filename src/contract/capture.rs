//! Captured traffic for `map --input`: JSON lines
//! `{"routing_key": "...", "body": <JSON, or a string holding the raw body>,
//!   "properties": {"message_id", "type", "content_type", "headers": {...}}}`.

use super::{Message, Properties};
use serde::Deserialize;
use serde_json::Value;
use std::io::BufRead;

/// Why a capture cannot be read; `map --input` exits 1 on these.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot read {source_name}: {error}")]
    Read {
        source_name: String,
        error: std::io::Error,
    },
    /// The output went (a closed pipe) or failed; reading stopped there.
    #[error("cannot write the output: {0}")]
    Write(std::io::Error),
    #[error("{source_name} line {line}: {message}; each line must be {{\"routing_key\": \"...\", \"body\": <JSON or raw string>, \"properties\": {{\"message_id\", \"type\", \"content_type\", \"headers\"}}}}")]
    Line {
        source_name: String,
        line: usize,
        message: String,
    },
}

#[derive(Deserialize)]
struct Line {
    routing_key: String,
    body: Value,
    #[serde(default)]
    properties: Properties,
}

/// Parses one line (not blank) into a message.
pub fn parse_line(text: &str) -> Result<Message, String> {
    let line: Line = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(Message {
        routing_key: line.routing_key,
        body: body_bytes(line.body),
        properties: line.properties,
    })
}

/// A body given as a string is the raw body; any other JSON is serialised.
pub fn body_bytes(body: Value) -> Vec<u8> {
    match body {
        Value::String(raw) => raw.into_bytes(),
        other => serde_json::to_vec(&other).unwrap_or_default(),
    }
}

/// Reads every message of a capture, calling `each(line_number, message)`; blank lines are
/// skipped. Stops at the first line that cannot be read.
pub fn for_each(
    reader: impl BufRead,
    source_name: &str,
    mut each: impl FnMut(usize, Message),
) -> Result<usize, CaptureError> {
    try_for_each(reader, source_name, |line, message| {
        each(line, message);
        Ok(())
    })
}

/// As [`for_each`], also stopping at the first error of `each` (its output gone): a
/// command must not read on into a pipe nobody reads.
pub fn try_for_each(
    reader: impl BufRead,
    source_name: &str,
    mut each: impl FnMut(usize, Message) -> std::io::Result<()>,
) -> Result<usize, CaptureError> {
    let mut count = 0;
    for (index, line) in reader.split(b'\n').enumerate() {
        let number = index + 1;
        let bytes = line.map_err(|error| CaptureError::Read {
            source_name: source_name.to_owned(),
            error,
        })?;
        let bad = |message: String| CaptureError::Line {
            source_name: source_name.to_owned(),
            line: number,
            message,
        };
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| bad(format!("not UTF-8 ({e})")))?
            .trim();
        if text.is_empty() {
            continue;
        }
        each(number, parse_line(text).map_err(bad)?).map_err(CaptureError::Write)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_messages_and_bad_lines_are_named() {
        let input = concat!(
            "{\"routing_key\":\"a.b\",\"body\":{\"x\":1}}\n",
            "\n",
            "{\"routing_key\":\"c\",\"body\":\"{not json\",\"properties\":{\"type\":\"t\",\"headers\":{\"cloudEvents:id\":\"1\"},\"delivery_mode\":2}}\n",
            "{\"body\":{}}\n",
        );
        let mut seen = Vec::new();
        let err =
            for_each(input.as_bytes(), "capture.jsonl", |n, m| seen.push((n, m))).unwrap_err();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].1.body, br#"{"x":1}"#);
        assert_eq!(seen[1].0, 3);
        assert_eq!(seen[1].1.body, b"{not json");
        assert_eq!(seen[1].1.properties.kind.as_deref(), Some("t"));
        let text = err.to_string();
        assert!(
            text.contains("capture.jsonl line 4: missing field `routing_key`"),
            "{text}"
        );
    }
}
