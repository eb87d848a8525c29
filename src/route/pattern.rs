//! AMQP topic patterns, matched the way a RabbitMQ topic exchange matches them:
//! words separated by `.`, `*` is exactly one word, `#` is zero or more words.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Literal(String),
    One,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    source: String,
    words: Vec<Word>,
}

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("is empty; use `#` to match every routing key".into());
        }
        let words = pattern
            .split('.')
            .map(|w| match w {
                "*" => Ok(Word::One),
                "#" => Ok(Word::Any),
                "" => Err(format!(
                    "`{pattern}` has an empty word (two dots in a row, or a dot at an end)"
                )),
                w if w.contains(['*', '#']) => Err(format!(
                    "`{pattern}`: `*` and `#` must stand alone as a whole word (like `order.*`), not inside `{w}`"
                )),
                w => Ok(Word::Literal(w.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            source: pattern.to_owned(),
            words,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, routing_key: &str) -> bool {
        let key: Vec<&str> = routing_key.split('.').collect();
        match_words(&self.words, &key)
    }
}

fn match_words(pattern: &[Word], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((Word::Any, rest)) => (0..=key.len()).any(|skip| match_words(rest, &key[skip..])),
        Some((Word::One, rest)) => !key.is_empty() && match_words(rest, &key[1..]),
        Some((Word::Literal(w), rest)) => {
            key.first() == Some(&w.as_str()) && match_words(rest, &key[1..])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, k: &str) -> bool {
        TopicPattern::parse(p).unwrap().matches(k)
    }

    #[test]
    fn literal_and_star() {
        assert!(m("order.created", "order.created"));
        assert!(!m("order.created", "order.created.v2"));
        assert!(m("order.*", "order.paid"));
        assert!(!m("order.*", "order"));
        assert!(!m("order.*", "order.paid.late"));
        assert!(m("*.created", "trial.created"));
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        assert!(m("#", "anything.at.all"));
        assert!(m("#", ""));
        assert!(m("order.#", "order"));
        assert!(m("order.#", "order.created.v2"));
        assert!(m("#.created", "order.created"));
        assert!(m("#.created", "created"));
        assert!(m("a.#.z", "a.z"));
        assert!(m("a.#.z", "a.b.c.z"));
        assert!(!m("a.#.z", "a.b.c"));
        assert!(m("#.#", "x"));
    }

    #[test]
    fn bad_patterns_are_explained() {
        assert!(TopicPattern::parse("").is_err());
        assert!(TopicPattern::parse("order..created")
            .unwrap_err()
            .contains("empty word"));
        assert!(TopicPattern::parse("order.cre*")
            .unwrap_err()
            .contains("stand alone"));
    }
}
