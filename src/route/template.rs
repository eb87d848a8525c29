//! Event text templates: literal text with `{/pointer}` placeholders, parsed once at
//! start-up. `{{` and `}}` stand for literal braces.

use super::pointer::Pointer;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Placeholder(Pointer),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// A placeholder found nothing (or `null`, or an object/array that has no text form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingValue {
    pub pointer: String,
    pub found_structure: bool,
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let end = rest.find('}').ok_or_else(|| {
                        format!("`{text}` opens a placeholder at byte {i} that is never closed with `}}` (write `{{{{` for a literal brace)")
                    })?;
                    let pointer = Pointer::parse(&rest[..end])
                        .map_err(|e| format!("placeholder in `{text}`: {e}"))?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Placeholder(pointer));
                    // Skip the pointer and the closing brace.
                    for _ in 0..rest[..=end].chars().count() {
                        chars.next();
                    }
                }
                '}' => {
                    return Err(format!(
                        "`{text}` has a `}}` at byte {i} that closes nothing (write `}}}}` for a literal brace)"
                    ))
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { parts })
    }

    pub fn pointers(&self) -> impl Iterator<Item = &Pointer> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(p) => Some(p),
            Part::Literal(_) => None,
        })
    }

    /// The literal text when there are no placeholders.
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.chars().count(),
                Part::Placeholder(_) => 0,
            })
            .sum()
    }

    pub fn render(&self, doc: &Value) -> Result<String, MissingValue> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Placeholder(p) => match p.find(doc) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => out.push_str(&v.to_string()),
                    other => {
                        return Err(MissingValue {
                            pointer: p.as_str().to_owned(),
                            found_structure: other.is_some(),
                        })
                    }
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_literals_and_values() {
        let t = Template::parse("order:{/status} ({/n}, {/ok}) {{x}}").unwrap();
        let doc = json!({"status": "paid", "n": 42.5, "ok": true});
        assert_eq!(t.render(&doc).unwrap(), "order:paid (42.5, true) {x}");
        assert_eq!(
            Template::parse("plain").unwrap().render(&doc).unwrap(),
            "plain"
        );
    }

    #[test]
    fn unicode_around_placeholders() {
        let t = Template::parse("é{/a}ü").unwrap();
        assert_eq!(t.render(&json!({"a": "ß"})).unwrap(), "éßü");
    }

    #[test]
    fn missing_values_are_reported() {
        let t = Template::parse("x:{/missing}").unwrap();
        let err = t.render(&json!({})).unwrap_err();
        assert_eq!(err.pointer, "/missing");
        assert!(!err.found_structure);
        let err = Template::parse("{/o}")
            .unwrap()
            .render(&json!({"o": {}}))
            .unwrap_err();
        assert!(err.found_structure);
        assert!(Template::parse("{/n}")
            .unwrap()
            .render(&json!({"n": null}))
            .is_err());
    }

    #[test]
    fn bad_templates_are_explained() {
        assert!(Template::parse("order:{/status")
            .unwrap_err()
            .contains("never closed"));
        assert!(Template::parse("order:{status}")
            .unwrap_err()
            .contains("start with `/`"));
        assert!(Template::parse("a}b")
            .unwrap_err()
            .contains("closes nothing"));
    }
}
