//! Event schemas (`docs/contract.md`): a rule may name a JSON Schema (draft 2020-12) that
//! what its pointers see must satisfy. Compiled once at start-up; `check` also refuses a
//! rule pointer the schema rules out.

use super::pointer::Pointer;
use serde_json::Value;
use std::fmt;
use std::path::Path;

/// Longest schema error message quoted in a dead letter's detail.
const MAX_MESSAGE_CHARS: usize = 200;

/// A compiled event schema.
pub struct EventSchema {
    /// As written in the rule (for messages).
    name: String,
    schema: Value,
    validator: jsonschema::Validator,
}

impl fmt::Debug for EventSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSchema")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl EventSchema {
    /// Reads and compiles `name` (relative to `base_dir`, the config file's directory).
    pub fn load(name: &str, base_dir: &Path) -> Result<Self, String> {
        let path = base_dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read schema file {} ({e}); schema paths are relative to the config file",
                path.display()
            )
        })?;
        let schema: Value = serde_json::from_str(&text)
            .map_err(|e| format!("schema file {} is not valid JSON: {e}", path.display()))?;
        Self::compile(name, schema)
    }

    pub fn compile(name: &str, schema: Value) -> Result<Self, String> {
        let validator = jsonschema::draft202012::new(&schema).map_err(|e| {
            format!(
                "schema {name} is not a valid JSON Schema (draft 2020-12): {} (at {})",
                clip(&e.to_string()),
                or_root(e.instance_path().as_str())
            )
        })?;
        Ok(Self {
            name: name.to_owned(),
            schema,
            validator,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `Err(detail)` naming the first failing instance path when `doc` fails the schema.
    pub fn validate(&self, doc: &Value) -> Result<(), String> {
        let mut errors = self.validator.iter_errors(doc);
        let Some(first) = errors.next() else {
            return Ok(());
        };
        let more = errors.take(100).count();
        let more = match more {
            0 => String::new(),
            100 => " (and 100+ more problems)".into(),
            n => format!(" (and {n} more problem(s))"),
        };
        Err(format!(
            "fails schema {} at {}: {}{more}",
            self.name,
            or_root(first.instance_path().as_str()),
            clip(&first.to_string())
        ))
    }

    /// Why the schema rules out anything at `pointer`, if it does: a property it forbids
    /// (`false`), one it never declares while it sets `additionalProperties: false`, or a
    /// step into a value the schema types as a scalar.
    pub fn rules_out(&self, pointer: &Pointer) -> Option<String> {
        let tokens: Vec<String> = pointer.tokens().collect();
        walk(&self.schema, &self.schema, &tokens, "", 0)
    }
}

fn or_root(path: &str) -> &str {
    if path.is_empty() {
        "/ (the root)"
    } else {
        path
    }
}

fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_MESSAGE_CHARS {
        s.to_owned()
    } else {
        let mut c: String = s.chars().take(MAX_MESSAGE_CHARS).collect();
        c.push('…');
        c
    }
}

fn walk(schema: &Value, root: &Value, tokens: &[String], at: &str, depth: u32) -> Option<String> {
    if depth > 64 {
        return None;
    }
    let here = if at.is_empty() { "/" } else { at };
    let object = match schema {
        Value::Bool(false) => return Some(format!("the schema allows nothing at {here}")),
        Value::Object(o) => o,
        _ => return None,
    };
    if let Some(Value::String(r)) = object.get("$ref") {
        if let Some(target) = r.strip_prefix('#').and_then(|p| root.pointer(p)) {
            if let Some(why) = walk(target, root, tokens, at, depth + 1) {
                return Some(why);
            }
        }
    }
    if let Some(Value::Array(all)) = object.get("allOf") {
        if let Some(why) = all
            .iter()
            .find_map(|s| walk(s, root, tokens, at, depth + 1))
        {
            return Some(why);
        }
    }
    let (token, rest) = tokens.split_first()?;
    let next = format!("{at}/{}", token.replace('~', "~0").replace('/', "~1"));
    if let Some(types) = object.get("type") {
        let names: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !names.is_empty() && !names.iter().any(|t| *t == "object" || *t == "array") {
            return Some(format!(
                "the schema makes {here} {}, which has no `{token}`",
                names.join(" or ")
            ));
        }
    }
    if let Some(sub) = object.get("properties").and_then(|p| p.get(token.as_str())) {
        return walk(sub, root, rest, &next, depth + 1);
    }
    if let Ok(index) = token.parse::<usize>() {
        if let Some(sub) = object.get("prefixItems").and_then(|p| p.get(index)) {
            return walk(sub, root, rest, &next, depth + 1);
        }
        if let Some(sub) = object.get("items") {
            return walk(sub, root, rest, &next, depth + 1);
        }
    }
    if object.contains_key("patternProperties") {
        return None;
    }
    match object.get("additionalProperties") {
        Some(Value::Bool(false)) => Some(format!(
            "`{token}` is not a property the schema declares at {here}, and it sets additionalProperties: false"
        )),
        Some(sub @ Value::Object(_)) => walk(sub, root, rest, &next, depth + 1),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> EventSchema {
        EventSchema::compile(
            "s.json",
            json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "required": ["customer"],
                "properties": {
                    "customer": {"$ref": "#/$defs/customer"},
                    "secret": false,
                    "id": {"type": "string"},
                    "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}, "additionalProperties": false}}
                },
                "$defs": {"customer": {"type": "object", "properties": {"email": {"type": "string"}}, "additionalProperties": false}}
            }),
        )
        .unwrap()
    }

    #[test]
    fn validation_names_the_failing_instance_path() {
        let s = schema();
        assert!(s.validate(&json!({"customer": {"email": "a@b.c"}})).is_ok());
        let e = s.validate(&json!({"customer": {"email": 5}})).unwrap_err();
        assert!(e.contains("at /customer/email"), "{e}");
        let e = s.validate(&json!({})).unwrap_err();
        assert!(e.contains("at / (the root)"), "{e}");
    }

    #[test]
    fn pointers_the_schema_rules_out() {
        let s = schema();
        let out = |p: &str| s.rules_out(&Pointer::parse(p).unwrap());
        assert_eq!(out("/customer/email"), None);
        assert_eq!(out("/anything"), None, "root is open");
        assert!(out("/customer/mail")
            .unwrap()
            .contains("additionalProperties"));
        assert!(out("/secret").unwrap().contains("allows nothing"));
        assert!(out("/id/x").unwrap().contains("string"));
        assert_eq!(out("/items/0/sku"), None);
        assert!(out("/items/3/price").is_some());
    }

    #[test]
    fn a_broken_schema_is_refused_with_its_name() {
        let e = EventSchema::compile("bad.json", json!({"type": 5})).unwrap_err();
        assert!(e.contains("bad.json"), "{e}");
        let e = EventSchema::load("nope.json", Path::new("/nonexistent")).unwrap_err();
        assert!(e.contains("/nonexistent/nope.json"), "{e}");
    }

    #[test]
    fn check_refuses_pointers_the_schema_rules_out_and_rules_without_key_or_type() {
        let config = crate::config::from_toml_str(
            r#"
            [[rules]]
            name = "t"
            schema = "trial.json"
            routing_key = "trial.*"
            people_id = "/user/email"
            text = "trial:{/stage}"
            data = { plan = "/plan", x = "/user/extra" }

            [[rules]]
            name = "neither"
            people_id = "/e"
            text = "x"
            "#,
        )
        .unwrap();
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/events");
        let problems = crate::route::Router::compile_in(&config.rules, &base).unwrap_err();
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:#?}");
        assert!(
            text[0].contains(
                "rule `t` text: `/stage` can never find anything under schema trial.json"
            ),
            "{text:#?}"
        );
        assert!(
            text[1].contains("rule `neither` routing_key: is missing"),
            "{text:#?}"
        );
    }
}
