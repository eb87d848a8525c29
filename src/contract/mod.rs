//! Contracts: what the bridge would do with a message, offline — the
//! same decode → route → map as `run`, without broker or network. `map` (one message or a
//! capture of JSON lines, [`capture`]) and `test` (TOML test files, [`test_file`]) use it.

pub mod capture;
#[cfg(test)]
mod fuzz;
pub mod test_file;

use crate::config::{Config, Problem, Unmatched};
use crate::crisp::encode_segment;
use crate::decode::Incoming;
use crate::outcome::{DeadLetter, Disposition};
use crate::pipeline::{fate, triage, unmatched_detail, FateSettings, Happened, Triaged};
use crate::route::{Mapped, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// One message as captured or written in a test: routing key, raw body, properties.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: Properties,
}

/// The AMQP properties decoding reads; other captured properties are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Properties {
    pub message_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub content_type: Option<String>,
    pub headers: Map<String, Value>,
}

/// What the bridge would do with one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Deliver(Mapped),
    /// Acked without a Crisp call (no rule matched and `delivery.unmatched = "ack"`).
    Skip(String),
    DeadLetter(DeadLetter),
}

impl Verdict {
    pub fn code(&self) -> &'static str {
        match self {
            Verdict::Deliver(_) => "deliver",
            Verdict::Skip(_) => "skip",
            Verdict::DeadLetter(_) => "dead_letter",
        }
    }
}

/// The rules and settings an offline evaluation needs.
#[derive(Debug)]
pub struct Offline {
    router: Router,
    unmatched: Unmatched,
    max_message_bytes: usize,
    api_url: String,
    website_id: String,
}

impl Offline {
    /// Only the rules must be valid: trying rules needs no credentials.
    pub fn from_config(config: &Config) -> Result<Self, Vec<Problem>> {
        let router = Router::compile_in(&config.rules, &config.base_dir)?
            .with_max_data_keys(config.delivery.max_data_keys);
        Ok(Self {
            router,
            unmatched: config.delivery.unmatched,
            max_message_bytes: config.amqp.max_message_bytes,
            api_url: config.crisp.api_url.trim_end_matches('/').to_owned(),
            website_id: config
                .crisp
                .website_id
                .clone()
                .unwrap_or_else(|| "{website_id}".into()),
        })
    }

    /// decode → route → map, and the fate of what does not reach Crisp: the very path
    /// `run` takes before delivering.
    pub fn evaluate(&self, message: &Message) -> Verdict {
        let p = &message.properties;
        let mut incoming = Incoming::new(&message.body);
        incoming.content_type = p.content_type.as_deref();
        incoming.message_id = p.message_id.as_deref();
        incoming.amqp_type = p.kind.as_deref();
        for (name, value) in &p.headers {
            incoming.add_header(name, value.clone());
        }
        let happened = match triage(
            &self.router,
            self.max_message_bytes,
            &message.routing_key,
            &incoming,
        ) {
            Triaged::Event { mapped, .. } => return Verdict::Deliver(mapped),
            Triaged::Done(happened) => happened,
        };
        let why = match &happened {
            Happened::Unmatched {
                routing_key,
                event_type,
            } => unmatched_detail(routing_key, event_type.as_deref()),
            _ => String::new(),
        };
        let settings = FateSettings {
            unmatched: self.unmatched,
        };
        match fate(happened, settings) {
            Disposition::DeadLetter(dl) => Verdict::DeadLetter(dl),
            Disposition::Ack { .. } => {
                Verdict::Skip(format!("{why} (delivery.unmatched = \"ack\")"))
            }
            // Nothing before a Crisp call is requeued.
            Disposition::Requeue(_) => Verdict::Skip(format!("{why} (requeued)")),
        }
    }

    /// The URL the event would be POSTed to.
    pub fn url(&self, mapped: &Mapped) -> String {
        format!(
            "{}/website/{}/people/events/{}",
            self.api_url,
            encode_segment(&self.website_id),
            encode_segment(&mapped.people_id)
        )
    }

    /// The result line of `map --format json`.
    pub fn json_line(&self, line: usize, outcome: &Verdict) -> Value {
        let (rule, request, reason, detail) = match outcome {
            Verdict::Deliver(m) => (
                Some(m.rule.to_string()),
                Some(json!({"method": "POST", "url": self.url(m), "body": m.event})),
                None,
                None,
            ),
            Verdict::Skip(detail) => (None, None, None, Some(detail.clone())),
            Verdict::DeadLetter(dl) => (
                dl.rule.clone(),
                None,
                Some(dl.reason.code()),
                Some(dl.detail.clone()),
            ),
        };
        json!({
            "line": line,
            "outcome": outcome.code(),
            "rule": rule,
            "request": request,
            "reason": reason,
            "detail": detail,
        })
    }

    /// One readable line for `map --input --format text`.
    pub fn text_line(&self, line: usize, outcome: &Verdict) -> String {
        match outcome {
            Verdict::Deliver(m) => format!(
                "line {line}: deliver (rule {}) POST {} {}",
                m.rule,
                self.url(m),
                serde_json::to_string(&m.event).unwrap_or_default()
            ),
            Verdict::Skip(detail) => format!("line {line}: skip: {detail}"),
            Verdict::DeadLetter(dl) => format!(
                "line {line}: dead_letter {}: {}{}",
                dl.reason.code(),
                dl.detail,
                dl.rule
                    .as_deref()
                    .map(|r| format!(" (rule `{r}`)"))
                    .unwrap_or_default()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::schema::EventSchema;
    use std::path::Path;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn the_example_rule_tests_pass() {
        let config = crate::config::load(Some(&root().join("examples/crisp-bridge.toml"))).unwrap();
        let offline = Offline::from_config(&config).unwrap();
        let results =
            test_file::run_file(&offline, &root().join("examples/crisp-bridge.test.toml")).unwrap();
        assert!(results.len() >= 10);
        for r in results {
            assert_eq!(r.failure, None, "case `{}`", r.name);
        }
    }

    /// Every example event satisfies the schema its rule names.
    #[test]
    fn the_example_events_match_their_schemas() {
        for (event, schema) in [
            ("order.created.json", "order.created.json"),
            ("trial.started.json", "trial.json"),
            ("trial.ended.json", "trial.json"),
            ("invoice.paid.json", "invoice.paid.json"),
            (
                "user.signed_up.cloudevent.json",
                "user.signed_up.cloudevent.json",
            ),
        ] {
            let schema = EventSchema::load(schema, &root().join("schemas/events")).unwrap();
            let text = std::fs::read_to_string(root().join("examples/events").join(event)).unwrap();
            let doc: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(schema.validate(&doc), Ok(()), "{event}");
        }
        let listed = std::fs::read_dir(root().join("examples/events"))
            .unwrap()
            .count();
        assert_eq!(
            listed, 5,
            "a new example event needs its schema listed here"
        );
    }

    #[test]
    fn the_example_capture_maps_line_by_line() {
        let config = crate::config::load(Some(&root().join("examples/crisp-bridge.toml"))).unwrap();
        let offline = Offline::from_config(&config).unwrap();
        let file = std::fs::File::open(root().join("examples/capture.jsonl")).unwrap();
        let mut outcomes = Vec::new();
        capture::for_each(std::io::BufReader::new(file), "capture", |n, m| {
            outcomes.push(offline.json_line(n, &offline.evaluate(&m)))
        })
        .unwrap();
        let codes: Vec<_> = outcomes
            .iter()
            .map(|o| o["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(codes, ["deliver", "dead_letter", "deliver", "skip"]);
        assert_eq!(outcomes[1]["reason"], "invalid_people_id");
        assert_eq!(outcomes[2]["rule"], "user-signed-up");
    }
}
