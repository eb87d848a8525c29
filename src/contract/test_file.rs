//! `crisp-bridge test`: TOML files of `[[case]]` tables, each a message in and the outcome
//! expected out, run against the config without network.
//!
//! ```toml
//! [[case]]
//! name = "a paid order"
//! routing_key = "order.created"
//! body_file = "events/order.created.json"     # or body = { ... }, or body = "raw text"
//! properties = { type = "com.example.order.created", headers = { "cloudEvents:id" = "1" } }
//! expect = { outcome = "deliver", rule = "order-created", people_id = "jane@example.com",
//!            event = { text = "order:created", color = "blue", data = { order_id = "A-1" } } }
//! ```

use super::{capture::body_bytes, Message, Offline, Properties, Verdict};
use crate::route::Mapped;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Why a test file cannot be run (as opposed to a case that fails).
#[derive(Debug, thiserror::Error)]
pub enum TestFileError {
    #[error("cannot read test file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("test file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default, rename = "case")]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    routing_key: String,
    body: Option<Value>,
    body_file: Option<String>,
    #[serde(default)]
    properties: Properties,
    expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Expected {
    Deliver,
    Skip,
    DeadLetter,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    outcome: Expected,
    rule: Option<String>,
    people_id: Option<String>,
    event: Option<ExpectedEvent>,
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedEvent {
    text: String,
    color: Option<String>,
    #[serde(default)]
    data: Map<String, Value>,
}

/// One case's result: its name, and the diff when it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    pub name: String,
    pub failure: Option<String>,
}

/// Reads and runs every case of one test file.
pub fn run_file(offline: &Offline, path: &Path) -> Result<Vec<CaseResult>, TestFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| TestFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    let invalid = |message: String| TestFileError::Invalid {
        path: path.to_owned(),
        message,
    };
    let file: TestFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if file.cases.is_empty() {
        return Err(invalid(
            "has no [[case]] tables; add at least one case".into(),
        ));
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut results = Vec::new();
    for (index, case) in file.cases.into_iter().enumerate() {
        let body = match (case.body, &case.body_file) {
            (Some(body), None) => body_bytes(body),
            (None, Some(file)) => {
                let at = dir.join(file);
                std::fs::read(&at).map_err(|e| {
                    invalid(format!(
                        "case {} `{}`: cannot read body_file {} ({e}); body_file is relative to the test file",
                        index + 1,
                        case.name,
                        at.display()
                    ))
                })?
            }
            _ => {
                return Err(invalid(format!(
                    "case {} `{}`: give exactly one of `body` and `body_file`",
                    index + 1,
                    case.name
                )))
            }
        };
        let message = Message {
            routing_key: case.routing_key,
            body,
            properties: case.properties,
        };
        let outcome = offline.evaluate(&message);
        results.push(CaseResult {
            failure: compare(&case.expect, &outcome),
            name: case.name,
        });
    }
    Ok(results)
}

fn describe(outcome: &Verdict) -> String {
    match outcome {
        Verdict::Deliver(m) => format!(
            "deliver (rule `{}`, event {})",
            m.rule,
            serde_json::to_string(&m.event).unwrap_or_default()
        ),
        Verdict::Skip(detail) => format!("skip ({detail})"),
        Verdict::DeadLetter(dl) => format!(
            "dead_letter {} ({}){}",
            dl.reason.code(),
            dl.detail,
            dl.rule
                .as_deref()
                .map(|r| format!(" by rule `{r}`"))
                .unwrap_or_default()
        ),
    }
}

/// `None` when the outcome is what the case expects, else a readable diff.
fn compare(expect: &Expect, outcome: &Verdict) -> Option<String> {
    let mut diff = String::new();
    let mut line = |what: &str, expected: &dyn std::fmt::Display, got: &dyn std::fmt::Display| {
        let _ = writeln!(diff, "    {what}: expected {expected}, got {got}");
    };
    let wanted = match expect.outcome {
        Expected::Deliver => "deliver",
        Expected::Skip => "skip",
        Expected::DeadLetter => "dead_letter",
    };
    if wanted != outcome.code() {
        line("outcome", &wanted, &describe(outcome));
        return Some(diff);
    }
    match outcome {
        Verdict::Deliver(m) => compare_delivery(expect, m, &mut line),
        Verdict::DeadLetter(dl) => {
            if let Some(reason) = &expect.reason {
                if reason != dl.reason.code() {
                    line(
                        "reason",
                        reason,
                        &format!("{} ({})", dl.reason.code(), dl.detail),
                    );
                }
            }
            if let Some(rule) = &expect.rule {
                if Some(rule.as_str()) != dl.rule.as_deref() {
                    line("rule", rule, &dl.rule.as_deref().unwrap_or("(none)"));
                }
            }
        }
        Verdict::Skip(_) => {}
    }
    (!diff.is_empty()).then_some(diff)
}

type Line<'a> = dyn FnMut(&str, &dyn std::fmt::Display, &dyn std::fmt::Display) + 'a;

fn compare_delivery(expect: &Expect, m: &Mapped, line: &mut Line<'_>) {
    if let Some(rule) = &expect.rule {
        if rule.as_str() != &*m.rule {
            line("rule", rule, &m.rule);
        }
    }
    if let Some(id) = &expect.people_id {
        if id != &m.people_id {
            line("people_id", id, &m.people_id);
        }
    }
    let Some(event) = &expect.event else { return };
    if event.text != m.event.text {
        line("event.text", &json(&event.text), &json(&m.event.text));
    }
    if event.color != m.event.color {
        line(
            "event.color",
            &event.color.as_deref().unwrap_or("(none)"),
            &m.event.color.as_deref().unwrap_or("(none)"),
        );
    }
    for (key, want) in &event.data {
        match m.event.data.get(key) {
            None => line(&format!("event.data.{key}"), want, &"nothing (key absent)"),
            Some(got) if got != want => line(&format!("event.data.{key}"), want, got),
            Some(_) => {}
        }
    }
    for (key, got) in &m.event.data {
        if !event.data.contains_key(key) {
            line(&format!("event.data.{key}"), &"nothing (key absent)", got);
        }
    }
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_toml_str;

    fn offline() -> Offline {
        let config = from_toml_str(
            r#"
            [[rules]]
            name = "o"
            routing_key = "order.*"
            people_id = "/email"
            text = "order:{/status}"
            color = "blue"
            data = { id = "/id" }
            "#,
        )
        .unwrap();
        Offline::from_config(&config).unwrap()
    }

    fn run(toml_text: &str) -> Vec<CaseResult> {
        let dir = std::env::temp_dir().join(format!("crisp-bridge-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.test.toml");
        std::fs::write(&path, toml_text).unwrap();
        let results = run_file(&offline(), &path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        results
    }

    #[test]
    fn passing_and_failing_cases_with_a_diff() {
        let results = run(r#"
            [[case]]
            name = "good"
            routing_key = "order.created"
            body = { email = "a@b.c", status = "paid", id = "A-1" }
            expect = { outcome = "deliver", rule = "o", people_id = "a@b.c", event = { text = "order:paid", color = "blue", data = { id = "A-1" } } }

            [[case]]
            name = "wrong data"
            routing_key = "order.created"
            body = { email = "a@b.c", status = "paid", id = "A-2", extra = 1 }
            expect = { outcome = "deliver", event = { text = "order:new", color = "blue", data = { id = "A-1", total = 3 } } }

            [[case]]
            name = "bad json"
            routing_key = "order.created"
            body = "{"
            expect = { outcome = "dead_letter", reason = "invalid_json" }

            [[case]]
            name = "unmatched"
            routing_key = "user.created"
            body = {}
            expect = { outcome = "dead_letter", reason = "unmatched" }
        "#);
        assert_eq!(results[0].failure, None);
        let diff = results[1].failure.as_deref().unwrap();
        assert!(
            diff.contains(r#"event.text: expected "order:new", got "order:paid""#),
            "{diff}"
        );
        assert!(
            diff.contains(r#"event.data.id: expected "A-1", got "A-2""#),
            "{diff}"
        );
        assert!(
            diff.contains("event.data.total: expected 3, got nothing"),
            "{diff}"
        );
        assert_eq!(results[2].failure, None);
        let diff = results[3].failure.as_deref().unwrap();
        assert!(
            diff.contains("outcome: expected dead_letter, got skip"),
            "{diff}"
        );
    }
}
