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

/// The longest binding key AMQP can carry (a short string); also bounds the matcher's state.
const MAX_PATTERN_BYTES: usize = 255;
/// Matcher states: one per pattern word plus the accepting end. A 255-byte pattern has
/// at most 128 words.
const STATE_WORDS: usize = (MAX_PATTERN_BYTES / 2 + 2).div_ceil(64);

/// A set of matcher states (pattern positions), on the stack.
#[derive(Clone, Copy, Default)]
struct States([u64; STATE_WORDS]);

impl States {
    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
}

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("is empty; use `#` to match every routing key".into());
        }
        if pattern.len() > MAX_PATTERN_BYTES {
            return Err(format!(
                "is {} bytes long; AMQP binding keys hold at most {MAX_PATTERN_BYTES} bytes, shorten it (`#` matches any number of words)",
                pattern.len()
            ));
        }
        let mut words: Vec<Word> = Vec::new();
        for w in pattern.split('.') {
            let word = match w {
                "*" => Word::One,
                "#" => Word::Any,
                "" => {
                    return Err(format!(
                        "`{pattern}` has an empty word (two dots in a row, or a dot at an end)"
                    ))
                }
                w if w.contains(['*', '#']) => {
                    return Err(format!(
                        "`{pattern}`: `*` and `#` must stand alone as a whole word (like `order.*`), not inside `{w}`"
                    ))
                }
                w => Word::Literal(w.to_owned()),
            };
            // `#.#` matches exactly what `#` matches; folding keeps the state set small.
            // The binding keeps the user's pattern (`source`): the broker treats both alike.
            if !(word == Word::Any && words.last() == Some(&Word::Any)) {
                words.push(word);
            }
        }
        Ok(Self {
            source: pattern.to_owned(),
            words,
        })
    }

    /// The first word when it is a literal: only routing keys starting with it can match.
    pub fn first_literal(&self) -> Option<&str> {
        match self.words.first() {
            Some(Word::Literal(w)) => Some(w),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Runs the pattern as an NFA over the key's words, tracking every live pattern
    /// position at once: O(pattern words × key words), no backtracking, no allocation.
    pub fn matches(&self, routing_key: &str) -> bool {
        let n = self.words.len();
        let mut current = States::default();
        current.insert(0);
        self.skip_hashes(&mut current);
        for key_word in routing_key.split('.') {
            let mut next = States::default();
            for (i, word) in self.words.iter().enumerate() {
                if !current.contains(i) {
                    continue;
                }
                match word {
                    // `#` eats this word and may eat more.
                    Word::Any => next.insert(i),
                    Word::One => next.insert(i + 1),
                    Word::Literal(w) if w == key_word => next.insert(i + 1),
                    Word::Literal(_) => {}
                }
            }
            if next.is_empty() {
                return false;
            }
            self.skip_hashes(&mut next);
            current = next;
        }
        current.contains(n)
    }

    /// `#` also matches zero words: whoever stands before one may stand after it too.
    fn skip_hashes(&self, states: &mut States) {
        for (i, word) in self.words.iter().enumerate() {
            if *word == Word::Any && states.contains(i) {
                states.insert(i + 1);
            }
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
    fn repeated_hashes_are_folded_but_the_binding_keeps_the_users_pattern() {
        let p = TopicPattern::parse("#.#.a.#.#.#").unwrap();
        assert_eq!(p.words.len(), 3);
        assert_eq!(p.as_str(), "#.#.a.#.#.#");
        assert!(p.matches("a"));
        assert!(p.matches("x.a.y.z"));
        assert!(!p.matches("x.y"));
    }

    /// Issue 8: with backtracking this took 33 s (release) of CPU per message.
    #[test]
    fn repeated_hashes_against_a_long_key_match_in_linear_time() {
        let key = vec!["a"; 128].join(".");
        assert!(!m("#.#.#.#.#.#.z", &key));
        assert!(m("#.#.#.#.#.#.a", &key));
        let other = format!("{}.z", vec!["a"; 127].join("."));
        assert!(m("#.#.#.#.#.#.z", &other));
        assert!(m("#.*.#.*.#.z", &other));
    }

    #[test]
    fn the_longest_binding_key_is_accepted_and_a_longer_one_explained() {
        let longest = vec!["*"; 128].join(".");
        assert_eq!(longest.len(), 255);
        let p = TopicPattern::parse(&longest).unwrap();
        assert!(p.matches(&vec!["k"; 128].join(".")));
        assert!(!p.matches(&vec!["k"; 127].join(".")));
        let err = TopicPattern::parse(&format!("{longest}.x")).unwrap_err();
        assert!(err.contains("255 bytes"), "{err}");
    }

    /// The former backtracking matcher, kept as the reference the new one must agree with.
    fn reference(pattern: &[Word], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((Word::Any, rest)) => (0..=key.len()).any(|skip| reference(rest, &key[skip..])),
            Some((Word::One, rest)) => !key.is_empty() && reference(rest, &key[1..]),
            Some((Word::Literal(w), rest)) => {
                key.first() == Some(&w.as_str()) && reference(rest, &key[1..])
            }
        }
    }

    #[test]
    fn agrees_with_the_backtracking_reference_on_random_patterns() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let alphabet = ["a", "b", ""];
        for _ in 0..20_000 {
            let pattern: Vec<&str> = (0..rng.random_range(1..=6))
                .map(|_| ["a", "b", "*", "#"][rng.random_range(0..4)])
                .collect();
            let pattern = pattern.join(".");
            let key: Vec<&str> = (0..rng.random_range(1..=7))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let key = key.join(".");
            let parsed = TopicPattern::parse(&pattern).unwrap();
            let unfolded: Vec<Word> = pattern
                .split('.')
                .map(|w| match w {
                    "*" => Word::One,
                    "#" => Word::Any,
                    w => Word::Literal(w.into()),
                })
                .collect();
            let words: Vec<&str> = key.split('.').collect();
            assert_eq!(
                parsed.matches(&key),
                reference(&unfolded, &words),
                "pattern `{pattern}` key `{key}`"
            );
        }
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
