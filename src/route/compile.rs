//! Rules are compiled once, at start-up, with every problem collected by rule and key
//! (`check` lists them all instead of stopping at the first).

use super::map::{self, data_key, is_data_key, DEFAULT_MAX_DATA_KEYS, MAX_TEXT_CHARS};
use super::pattern::TopicPattern;
use super::pointer::{is_secret_looking, Pointer};
use super::schema::EventSchema;
use super::template::Template;
use super::{secret_token, Router, Rule, COLORS};
use crate::config::{Problem, RuleConfig};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

impl Router {
    /// Compiles every rule, collecting all problems instead of stopping at the first.
    /// Schema paths are relative to the working directory; see [`Router::compile_in`].
    pub fn compile(rules: &[RuleConfig]) -> Result<Self, Vec<Problem>> {
        Self::compile_in(rules, Path::new(""))
    }

    /// Compiles every rule; schema paths are relative to `base_dir` (the config file's).
    pub fn compile_in(rules: &[RuleConfig], base_dir: &Path) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut names = HashSet::new();
        if rules.is_empty() {
            problems.push(Problem::global(
                "rules",
                "no [[rules]] are configured: every message would be unmatched; add at least one rule",
            ));
        }
        let mut compiled = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            let mut at = |key: &str, message: String| {
                problems.push(Problem::rule(index, &rule.name, key, message))
            };
            if let Some(r) = compile_rule(rule, base_dir, &mut names, &mut at) {
                compiled.push(r);
            }
        }
        if problems.is_empty() {
            let mut router = index(compiled);
            router.warnings = rules
                .iter()
                .enumerate()
                .flat_map(|(index, rule)| chatbox_limit_warnings(index, rule))
                .collect();
            Ok(router)
        } else {
            Err(problems)
        }
    }
}

use super::chatbox::{
    DATA_KEYS as CHATBOX_DATA_KEYS, KEY_CHARS as CHATBOX_KEY_CHARS,
    TEXT_CHARS as CHATBOX_TEXT_CHARS,
};

/// What in a rule can exceed Crisp's chatbox event limits.
fn chatbox_limit_warnings(index: usize, rule: &RuleConfig) -> Vec<Problem> {
    let mut warnings = Vec::new();
    let mut warn = |key: &str, message: String| {
        warnings.push(Problem::rule(
            index,
            &rule.name,
            key,
            format!("{message} (a limit Crisp published for chatbox events; whether its REST API enforces it is unconfirmed)"),
        ))
    };
    if let Ok(text) = Template::parse(&rule.text) {
        let literal = text.literal_len();
        if literal > CHATBOX_TEXT_CHARS {
            warn(
                "text",
                format!(
                    "is {literal} characters without its placeholders, over {CHATBOX_TEXT_CHARS}"
                ),
            );
        }
    }
    if rule.data.len() > CHATBOX_DATA_KEYS {
        warn(
            "data",
            format!(
                "selects {} keys, over {CHATBOX_DATA_KEYS} (an object selected whole can add more)",
                rule.data.len()
            ),
        );
    }
    for key in rule.data.keys() {
        let chars = key.chars().count();
        if chars > CHATBOX_KEY_CHARS {
            warn(
                &format!("data.{key}"),
                format!("is {chars} characters, over {CHATBOX_KEY_CHARS}"),
            );
        }
    }
    warnings
}

/// Indexes the rules by their pattern's first literal word (see `Router`).
fn index(compiled: Vec<Rule>) -> Router {
    let mut by_first_word: HashMap<String, Vec<usize>> = HashMap::new();
    let mut wildcard_first = Vec::new();
    for (index, rule) in compiled.iter().enumerate() {
        match rule.pattern.first_literal() {
            Some(word) => by_first_word
                .entry(word.to_owned())
                .or_default()
                .push(index),
            None => wildcard_first.push(index),
        }
    }
    Router {
        rules: compiled,
        max_data_keys: DEFAULT_MAX_DATA_KEYS,
        by_first_word,
        wildcard_first,
        warnings: Vec::new(),
    }
}

/// One rule, its problems reported through `at(key, message)`; `None` when it cannot
/// be compiled.
fn compile_rule<'r>(
    rule: &'r RuleConfig,
    base_dir: &Path,
    names: &mut HashSet<&'r str>,
    at: &mut dyn FnMut(&str, String),
) -> Option<Rule> {
    if rule.name.trim().is_empty() {
        at("name", "is empty; give every rule a unique name".into());
    } else if !names.insert(rule.name.as_str()) {
        at(
            "name",
            format!(
                "`{}` is used by an earlier rule; names must be unique",
                rule.name
            ),
        );
    }
    let routing_key = match (&rule.routing_key, &rule.event_type) {
        (Some(key), _) => Some(key.as_str()),
        (None, Some(_)) => Some("#"),
        (None, None) => {
            at(
                "routing_key",
                "is missing; give a topic pattern like `order.created`, or a `type` to match (then the routing key may be anything)".into(),
            );
            None
        }
    };
    let pattern = routing_key.and_then(|key| {
        TopicPattern::parse(key)
            .map_err(|e| at("routing_key", e))
            .ok()
    });
    if let Some(t) = &rule.event_type {
        if t.trim().is_empty() {
            at(
                "type",
                "is empty; name the event type, like `com.example.order.created`".into(),
            );
        }
    }
    let schema = rule.schema.as_deref().and_then(|name| {
        EventSchema::load(name, base_dir)
            .map_err(|e| at("schema", e))
            .ok()
    });
    let when: Vec<_> = rule
        .when
        .iter()
        .filter_map(|(p, v)| {
            Pointer::parse(p)
                .map_err(|e| at(&format!("when.\"{p}\""), e))
                .ok()
                .map(|p| (p, v.clone()))
        })
        .collect();
    let pointers = rule.people_id.as_slice();
    if pointers.is_empty() {
        at(
            "people_id",
            "is an empty list; name at least one JSON pointer".into(),
        );
    }
    let people_id: Vec<_> = pointers
        .iter()
        .filter_map(|p| Pointer::parse(p).map_err(|e| at("people_id", e)).ok())
        .collect();
    for p in &people_id {
        if let Some(t) = secret_token(p) {
            at(
                "people_id",
                format!("`{}` reads `{t}`, which looks like a secret; point at the email or people id instead", p.as_str()),
            );
        }
    }
    let text = Template::parse(&rule.text).map_err(|e| at("text", e)).ok();
    if let Some(t) = &text {
        for p in t.pointers() {
            if let Some(token) = secret_token(p) {
                at(
                    "text",
                    format!("placeholder {{{}}} reads `{token}`, which looks like a secret; secrets are never sent to Crisp", p.as_str()),
                );
            }
        }
        if t.pointers().next().is_none() && rule.text.trim().is_empty() {
            at(
                "text",
                "is empty; Crisp needs a short text like `order:created`".into(),
            );
        }
        if t.literal_len() > MAX_TEXT_CHARS {
            at(
                "text",
                format!("is longer than {MAX_TEXT_CHARS} characters; keep event texts short"),
            );
        }
    }
    if let Some(color) = &rule.color {
        if !COLORS.contains(&color.as_str()) {
            at(
                "color",
                format!(
                    "`{color}` is not a Crisp color; use one of {}",
                    COLORS.join(", ")
                ),
            );
        }
    }
    let data = compile_data(rule, at);
    if let Some(schema) = &schema {
        check_reads(schema, &when, &people_id, text.as_ref(), &data, at);
    }
    match (pattern, text) {
        (Some(pattern), Some(text)) => Some(Rule {
            name: Arc::from(rule.name.as_str()),
            pattern,
            event_type: rule.event_type.clone(),
            schema,
            when,
            people_id,
            text,
            color: rule.color.clone(),
            data,
        }),
        _ => None,
    }
}

/// The rule's `data` keys and pointers; a key that breaks Crisp's rule, looks like a
/// secret or reads one is reported and left out.
fn compile_data(rule: &RuleConfig, at: &mut dyn FnMut(&str, String)) -> Vec<(String, Pointer)> {
    let mut data = Vec::new();
    for (key, p) in &rule.data {
        if key.trim().is_empty() {
            at("data", "has an empty key".into());
            continue;
        }
        if key.len() > map::MAX_DATA_KEY_BYTES {
            at(
                &format!("data.{key}"),
                format!(
                    "is longer than {} bytes; use a short key",
                    map::MAX_DATA_KEY_BYTES
                ),
            );
            continue;
        }
        if !is_data_key(key) {
            at(
                &format!("data.{key}"),
                format!(
                    "breaks Crisp's rule for custom data keys (lower-case `a-z`, `0-9`, `_` and `-` only); rename it `{}`",
                    data_key(key)
                ),
            );
            continue;
        }
        if is_secret_looking(key) {
            at(
                &format!("data.{key}"),
                "looks like a secret; secrets are never sent to Crisp, remove this key".into(),
            );
            continue;
        }
        match Pointer::parse(p) {
            Err(e) => at(&format!("data.{key}"), e),
            Ok(ptr) => match secret_token(&ptr) {
                Some(t) => at(
                    &format!("data.{key}"),
                    format!("`{p}` selects `{t}`, which looks like a secret; secrets are never sent to Crisp"),
                ),
                None => data.push((key.clone(), ptr)),
            },
        }
    }
    data
}

/// Reports every pointer of the rule that its schema rules out (it could never find
/// anything).
fn check_reads(
    schema: &EventSchema,
    when: &[(Pointer, serde_json::Value)],
    people_id: &[Pointer],
    text: Option<&Template>,
    data: &[(String, Pointer)],
    at: &mut dyn FnMut(&str, String),
) {
    let mut read: Vec<(String, &Pointer)> = Vec::new();
    read.extend(
        when.iter()
            .map(|(p, _)| (format!("when.\"{}\"", p.as_str()), p)),
    );
    read.extend(people_id.iter().map(|p| ("people_id".to_owned(), p)));
    if let Some(t) = &text {
        read.extend(t.pointers().map(|p| ("text".to_owned(), p)));
    }
    read.extend(data.iter().map(|(k, p)| (format!("data.{k}"), p)));
    for (key, pointer) in read {
        if let Some(why) = schema.rules_out(pointer) {
            at(
                &key,
                format!(
                    "`{}` can never find anything under schema {}: {why}; fix the pointer or the schema",
                    pointer.as_str(),
                    schema.name()
                ),
            );
        }
    }
}
