//! Steps 3 and 4: pick the first rule that matches a decoded message (`route`) and
//! make the Crisp event of it (`map`). Rules are compiled once at start-up; nothing
//! here parses a rule at message time, and nothing here does I/O.

mod compile;
pub mod map;

/// Limits Crisp staff published for chatbox events; whether the REST route enforces
/// them is unconfirmed (`docs/crisp-api.md`): `check` warns about a rule that can exceed
/// one, and the sandbox enforces them with `--event-limits`.
pub mod chatbox {
    pub const TEXT_CHARS: usize = 80;
    pub const DATA_KEYS: usize = 10;
    pub const KEY_CHARS: usize = 50;
    pub const VALUE_CHARS: usize = 120;
}
pub mod pattern;
pub mod pointer;
pub mod schema;
pub mod template;

pub use map::CrispEvent;

use crate::decode::Decoded;
use crate::outcome::{mask_people_id, DeadLetter, Reason};
use map::{check_people_id, clamp_text, DataBuilder, DataCounts};
use pattern::TopicPattern;
use pointer::{is_secret_looking, Pointer};
use schema::EventSchema;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use template::Template;

pub const COLORS: [&str; 10] = [
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "grey", "black",
];

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    pattern: TopicPattern,
    /// Matches the CloudEvents `type`, else the AMQP `type` property.
    event_type: Option<String>,
    schema: Option<EventSchema>,
    when: Vec<(Pointer, Value)>,
    people_id: Vec<Pointer>,
    text: Template,
    color: Option<String>,
    data: Vec<(String, Pointer)>,
}

/// The compiled, ordered rules.
#[derive(Debug)]
pub struct Router {
    rules: Vec<Rule>,
    max_data_keys: usize,
    /// Rule indices by their pattern's first word when it is a literal, and the rules whose
    /// pattern starts with `*` or `#`: a routing key is tried only against rules that can
    /// match its first word, so 1,000 rules cost a hash lookup, not 1,000 matches.
    by_first_word: HashMap<String, Vec<usize>>,
    wildcard_first: Vec<usize>,
    /// What may exceed Crisp's published chatbox event limits: said, not refused.
    warnings: Vec<crate::config::Problem>,
}

/// A message that a rule turned into a Crisp event.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub rule: Arc<str>,
    pub people_id: String,
    pub event: CrispEvent,
    /// What building `data` left out: secrets, key collisions, keys over the cap.
    pub counts: DataCounts,
}

/// What routing decided for one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    Event(Mapped),
    /// No rule's pattern and `when` matched.
    Unmatched,
    /// A rule matched but the message cannot make a valid event.
    Invalid(DeadLetter),
}

impl Router {
    /// What in the rules may exceed Crisp's published chatbox event limits.
    pub fn warnings(&self) -> &[crate::config::Problem] {
        &self.warnings
    }

    /// Sets `delivery.max_data_keys`: most `data` keys one event carries.
    pub fn with_max_data_keys(mut self, max: usize) -> Self {
        self.max_data_keys = max;
        self
    }

    /// Distinct routing key patterns, in rule order: one queue binding each.
    pub fn patterns(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        self.rules
            .iter()
            .map(|r| r.pattern.as_str())
            .filter(|p| seen.insert(*p))
            .collect()
    }

    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| &*r.name)
    }

    /// Routes and maps one decoded message: rules see its `doc`, a rule's `type` matches
    /// its `event_type`.
    pub fn route_decoded(&self, routing_key: &str, decoded: &Decoded) -> Routed {
        self.route_typed(routing_key, decoded.event_type.as_deref(), &decoded.doc)
    }

    /// Routes and maps one JSON object that has no event type.
    #[cfg(test)]
    pub fn route(&self, routing_key: &str, doc: &Value) -> Routed {
        self.route_typed(routing_key, None, doc)
    }

    fn route_typed(&self, routing_key: &str, event_type: Option<&str>, doc: &Value) -> Routed {
        let first = routing_key.split('.').next().unwrap_or_default();
        let literal = self.by_first_word.get(first).map_or(&[][..], Vec::as_slice);
        let Some(rule) = in_order(literal, &self.wildcard_first)
            .filter_map(|i| self.rules.get(i))
            .find(|r| {
                r.pattern.matches(routing_key)
                    && r.event_type
                        .as_deref()
                        .is_none_or(|t| event_type == Some(t))
                    && r.when
                        .iter()
                        .all(|(p, v)| doc.pointer(p.as_str()) == Some(v))
            })
        else {
            return Routed::Unmatched;
        };
        if let Some(schema) = &rule.schema {
            if let Err(detail) = schema.validate(doc) {
                return Routed::Invalid(DeadLetter::new(
                    Reason::SchemaViolation,
                    detail,
                    Some(&rule.name),
                ));
            }
        }
        match map_with(rule, doc, self.max_data_keys) {
            Ok(m) => Routed::Event(m),
            Err((reason, detail)) => {
                Routed::Invalid(DeadLetter::new(reason, detail, Some(&rule.name)))
            }
        }
    }
}

/// The indices of two ascending lists, merged in ascending order (rule order).
fn in_order<'a>(a: &'a [usize], b: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (_, Some(&y)) => {
                j += 1;
                y
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, None) => return None,
        };
        Some(next)
    })
}

fn map_with(rule: &Rule, doc: &Value, max_data_keys: usize) -> Result<Mapped, (Reason, String)> {
    let tried = || {
        rule.people_id
            .iter()
            .map(Pointer::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let found = rule
        .people_id
        .iter()
        .find_map(|p| p.find(doc).map(|v| (p, v)))
        .ok_or_else(|| {
            (
                Reason::PeopleIdMissing,
                format!("no people id at {}", tried()),
            )
        })?;
    let people_id = match found.1 {
        Value::String(s) => s.clone(),
        other => {
            return Err((
                Reason::InvalidPeopleId,
                format!(
                    "people id at {} is a {} , not a string",
                    found.0.as_str(),
                    json_type(other)
                ),
            ))
        }
    };
    check_people_id(&people_id).map_err(|why| {
        (
            Reason::InvalidPeopleId,
            format!(
                "people id `{}` at {} {why}",
                mask_people_id(&people_id),
                found.0.as_str()
            ),
        )
    })?;
    let text = rule.text.render(doc).map_err(|m| {
        let what = if m.found_structure {
            "an object or array"
        } else {
            "nothing"
        };
        (
            Reason::TemplateValueMissing,
            format!("text placeholder {{{}}} found {what}", m.pointer),
        )
    })?;
    if text.trim().is_empty() {
        return Err((Reason::EmptyText, "text is empty after templating".into()));
    }
    let mut data = DataBuilder::new(max_data_keys);
    for (key, pointer) in &rule.data {
        if let Some(v) = pointer.find(doc) {
            data.insert(key, v);
        }
    }
    let (data, counts) = data.finish();
    Ok(Mapped {
        rule: rule.name.clone(),
        people_id,
        event: CrispEvent {
            text: clamp_text(text),
            color: rule.color.clone(),
            data,
        },
        counts,
    })
}

fn secret_token(pointer: &Pointer) -> Option<String> {
    pointer.tokens().find(|t| is_secret_looking(t))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_toml_str;
    use serde_json::json;

    fn router(toml: &str) -> Router {
        Router::compile(&from_toml_str(toml).unwrap().rules).unwrap()
    }

    const RULES: &str = r##"
        [[rules]]
        name = "paid"
        routing_key = "order.*"
        when = { "/status" = "paid" }
        people_id = ["/customer/email", "/email"]
        text = "order:{/status}"
        color = "blue"
        data = { order_id = "/id", total = "/amount/total", missing = "/nope" }

        [[rules]]
        name = "any-order"
        routing_key = "order.#"
        people_id = "/email"
        text = "order:other"
    "##;

    #[test]
    fn first_matching_rule_wins_and_maps() {
        let r = router(RULES);
        let doc = json!({"status": "paid", "customer": {"email": "Jo+x@Ex.com"}, "id": "A-1", "amount": {"total": 42.5}});
        let Routed::Event(m) = r.route("order.created", &doc) else {
            panic!()
        };
        assert_eq!(&*m.rule, "paid");
        assert_eq!(m.people_id, "Jo+x@Ex.com");
        assert_eq!(
            serde_json::to_value(&m.event).unwrap(),
            json!({"text": "order:paid", "color": "blue", "data": {"order_id": "A-1", "total": 42.5}})
        );
    }

    #[test]
    fn the_first_word_index_keeps_rule_order() {
        let r = router(
            r##"
            [[rules]]
            name = "a"
            routing_key = "order.*"
            when = { "/k" = 1 }
            people_id = "/email"
            text = "a"
            [[rules]]
            name = "b"
            routing_key = "#"
            when = { "/k" = 2 }
            people_id = "/email"
            text = "b"
            [[rules]]
            name = "c"
            routing_key = "order.created"
            people_id = "/email"
            text = "c"
            [[rules]]
            name = "d"
            routing_key = "*.created"
            people_id = "/email"
            text = "d"
        "##,
        );
        let rule = |key: &str, k: i64| match r.route(key, &json!({"k": k, "email": "a@b.c"})) {
            Routed::Event(m) => m.rule.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(rule("order.created", 1), "a");
        assert_eq!(rule("order.created", 2), "b");
        assert_eq!(rule("order.created", 3), "c");
        assert_eq!(rule("trial.created", 3), "d");
        assert_eq!(rule("trial.created", 2), "b");
        assert_eq!(rule("order", 3), "Unmatched");
    }

    #[test]
    fn when_is_exact_and_fallback_pointers_apply() {
        let r = router(RULES);
        let doc = json!({"status": "pending", "email": "a@b.c"});
        let Routed::Event(m) = r.route("order.created.v2", &doc) else {
            panic!()
        };
        assert_eq!(&*m.rule, "any-order");
        assert_eq!(
            serde_json::to_value(&m.event).unwrap(),
            json!({"text": "order:other"})
        );
        // "1" is not 1, and a missing field never matches.
        let r = router(
            r##"[[rules]]
            name = "n"
            routing_key = "#"
            when = { "/n" = 1 }
            people_id = "/e"
            text = "t""##,
        );
        assert_eq!(
            r.route("x", &json!({"n": "1", "e": "a@b"})),
            Routed::Unmatched
        );
        assert_eq!(r.route("x", &json!({"e": "a@b"})), Routed::Unmatched);
        assert!(matches!(
            r.route("x", &json!({"n": 1, "e": "a@b"})),
            Routed::Event(_)
        ));
        // The fallback pointer is used when the first finds nothing.
        let doc = json!({"status": "paid", "email": "x@y.z"});
        let Routed::Event(m) = router(RULES).route("order.paid", &doc) else {
            panic!()
        };
        assert_eq!(m.people_id, "x@y.z");
    }

    #[test]
    fn invalid_messages_get_reasons() {
        let r = router(RULES);
        let reason = |doc: Value| match r.route("order.x", &doc) {
            Routed::Invalid(d) => d.reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(json!({"status": "paid"})), Reason::PeopleIdMissing);
        assert_eq!(
            reason(json!({"status": "paid", "email": "nobody"})),
            Reason::InvalidPeopleId
        );
        assert_eq!(
            reason(json!({"status": "paid", "email": 7})),
            Reason::InvalidPeopleId
        );
        let r = router(
            r##"[[rules]]
            name = "t"
            routing_key = "#"
            people_id = "/e"
            text = "{/t}""##,
        );
        let dl = |doc: Value| match r.route("k", &doc) {
            Routed::Invalid(d) => d,
            other => panic!("{other:?}"),
        };
        assert_eq!(dl(json!({"e": "a@b"})).reason, Reason::TemplateValueMissing);
        assert_eq!(dl(json!({"e": "a@b", "t": "  "})).reason, Reason::EmptyText);
        let d = dl(json!({"e": "jane doe@example.com"}));
        assert!(
            !d.detail.contains("jane doe@"),
            "detail must mask the email: {}",
            d.detail
        );
    }

    #[test]
    fn compile_collects_every_problem_with_rule_and_key() {
        let cfg = from_toml_str(
            r##"
            [[rules]]
            name = "bad"
            routing_key = "order..x"
            people_id = ["email"]
            text = "x:{/a"
            color = "bleu"
            data = { api_key = "/k", ok = "/user/password", p = "nope" }
            [[rules]]
            name = "bad"
            routing_key = "#"
            people_id = []
            text = "t"
            when = { "x" = 1 }
        "##,
        )
        .unwrap();
        let problems = Router::compile(&cfg.rules).unwrap_err();
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        let joined = text.join("\n");
        for key in [
            "routing_key",
            "people_id",
            "text",
            "color",
            "data.api_key",
            "data.ok",
            "data.p",
            "name",
            "when.\"x\"",
        ] {
            assert!(
                joined.contains(&format!("{key}:")),
                "missing {key} in\n{joined}"
            );
        }
        assert!(joined.matches("rule `bad`").count() >= 2, "{joined}");
    }

    #[test]
    fn check_refuses_bad_data_keys_and_secret_reads() {
        let cfg = from_toml_str(
            r##"
            [[rules]]
            name = "keys"
            routing_key = "#"
            people_id = ["/email", "/auth/token"]
            text = "order:{/user/password}"
            data = { "Order ID" = "/id", "card.brand" = "/b", ok_key-1 = "/c" }
        "##,
        )
        .unwrap();
        let joined = Router::compile(&cfg.rules)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        for needle in [
            "data.Order ID: breaks Crisp's rule for custom data keys",
            "rename it `order_id`",
            "data.card.brand:",
            "rename it `card_brand`",
            "people_id: `/auth/token` reads `token`",
            "text: placeholder {/user/password} reads `password`",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in\n{joined}");
        }
        assert!(!joined.contains("ok_key-1"), "{joined}");
    }

    #[test]
    fn mapped_events_match_the_published_event_schema() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("schemas/crisp-event.schema.json");
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let r = router(RULES);
        let doc = json!({
            "status": "paid", "email": "a@b.c", "id": {"x": [1, {"api-Key": "k", "ok": true}], "Pass_Word": "p"},
            "amount": {"total": {"cents": 4250, "user_ssn": "1"}}
        });
        let Routed::Event(m) = r.route("order.created", &doc) else {
            panic!()
        };
        let body = serde_json::to_value(&m.event).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{body}: {errors:?}");
        assert_eq!(m.counts.stripped, 3);
        // The schema itself refuses what the mapper must never produce.
        for bad in [
            json!({"text": ""}),
            json!({"text": "t", "data": {"a": {"b": 1}}}),
            json!({"text": "t", "data": {"apiToken": "x"}}),
        ] {
            assert!(!validator.is_valid(&bad), "{bad}");
        }
    }

    #[test]
    fn a_rule_type_matches_the_event_type_and_needs_its_routing_key_when_given() {
        use crate::decode::Decoded;
        use crate::route::Routed;
        let config = crate::config::from_toml_str(
            r#"
            [[rules]]
            name = "both"
            routing_key = "order.*"
            type = "order.v2"
            people_id = "/e"
            text = "both"

            [[rules]]
            name = "type-only"
            type = "order.v1"
            people_id = "/e"
            text = "type-only"

            [[rules]]
            name = "key-only"
            routing_key = "order.created"
            people_id = "/e"
            text = "key-only"
            "#,
        )
        .unwrap();
        let router = crate::route::Router::compile(&config.rules).unwrap();
        assert_eq!(router.patterns(), ["order.*", "#", "order.created"]);
        let route = |key: &str, t: Option<&str>| {
            let decoded = Decoded {
                doc: serde_json::json!({"e": "a@b.co"}),
                id: None,
                event_type: t.map(str::to_owned),
                cloud_event: None,
            };
            match router.route_decoded(key, &decoded) {
                Routed::Event(m) => m.rule.to_string(),
                other => format!("{other:?}"),
            }
        };
        assert_eq!(route("order.created", Some("order.v2")), "both");
        assert_eq!(route("user.x", Some("order.v2")), "Unmatched");
        assert_eq!(route("anything", Some("order.v1")), "type-only");
        assert_eq!(route("order.created", Some("order.v3")), "key-only");
        assert_eq!(route("order.created", None), "key-only");
    }
}
