//! Hostile input: a time-bounded fuzzer over decode → route → map (arbitrary and mutated
//! bodies, routing keys, content types, AMQP types, message ids and CloudEvents headers,
//! seeded from `examples/`), property tests for pointers, templates, flattening and secret
//! stripping, and the named hostile cases (deep nesting, huge bodies and ids, invalid
//! UTF-8, huge numbers, duplicate keys).
//!
//! `FUZZ_SECONDS` (default 3) bounds the fuzzer; `FUZZ_SEED` replays a run. It prints its
//! executions: `cargo test --lib fuzz_ -- --nocapture`.

use super::{capture, Message, Offline, Properties, Verdict};
use crate::decode::{decode, Incoming, MAX_ID_BYTES};
use crate::outcome::Reason;
use crate::route::map::{check_people_id, is_data_key, DataBuilder, MAX_TEXT_CHARS};
use crate::route::pointer::{is_secret_looking, Pointer};
use crate::route::template::Template;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn example_offline() -> Offline {
    let config = crate::config::load(Some(&root().join("examples/crisp-bridge.toml")))
        .expect("examples/crisp-bridge.toml loads");
    Offline::from_config(&config).expect("example rules compile")
}

/// Seeds: every example event, and every captured message of examples/capture.jsonl.
fn seeds() -> Vec<Message> {
    let mut seeds = Vec::new();
    let events = root().join("examples/events");
    for entry in std::fs::read_dir(events)
        .expect("examples/events")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let body = std::fs::read(entry.path()).expect("example event");
        let routing_key = name.trim_end_matches(".json").to_owned();
        let cloud = name.contains("cloudevent");
        seeds.push(Message {
            routing_key,
            body,
            properties: Properties {
                content_type: cloud.then(|| "application/cloudevents+json".into()),
                ..Properties::default()
            },
        });
    }
    let file = std::fs::File::open(root().join("examples/capture.jsonl")).expect("capture");
    capture::for_each(std::io::BufReader::new(file), "capture", |_, m| {
        seeds.push(m)
    })
    .expect("capture parses");
    seeds
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z@. +_-]{0,12}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
        Just(json!("a@b.co")),
        Just(json!("04ed9a29-ccda-4f46-b2f3-b151d2d90fa7")),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "email",
            "customer",
            "user",
            "data",
            "status",
            "id",
            "source",
            "type",
            "phase",
            "plan",
            "seats",
            "card",
            "card_number",
            "cvc",
            "password",
            "amount",
            "total",
            "specversion",
            "Api-Key",
            "First Name",
            "people_id",
            "billing",
            "number",
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Truncate(usize),
    Splice(usize, usize),
}

fn mutate(mut body: Vec<u8>, mutations: &[Mutation], other: &[u8]) -> Vec<u8> {
    for m in mutations {
        let len = body.len().max(1);
        match m {
            Mutation::Flip(at, mask) => {
                if let Some(b) = body.get_mut(at % len) {
                    *b ^= mask;
                }
            }
            Mutation::Insert(at, bytes) => {
                let at = (at % len).min(body.len());
                body.splice(at..at, bytes.iter().copied());
            }
            Mutation::Truncate(at) => body.truncate(at % len),
            Mutation::Splice(at, from) => {
                let at = (at % len).min(body.len());
                let from = from % other.len().max(1);
                body.splice(at.., other.get(from..).unwrap_or_default().iter().copied());
            }
        }
    }
    body
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, m)| Mutation::Flip(a, m)),
        (
            any::<usize>(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..8),
                prop::sample::select(vec![
                    b"{".to_vec(),
                    b"}".to_vec(),
                    b"[".to_vec(),
                    b"\"".to_vec(),
                    b"null".to_vec(),
                    b"1e999".to_vec(),
                    b"-0".to_vec(),
                    b"\\u0000".to_vec(),
                    b"\xff\xfe".to_vec(),
                    b",\"email\":\"a@b.co\"".to_vec(),
                ]),
            ]
        )
            .prop_map(|(a, b)| Mutation::Insert(a, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>()).prop_map(|(a, f)| Mutation::Splice(a, f)),
    ]
}

fn ce_headers() -> impl Strategy<Value = Map<String, Value>> {
    let name = prop_oneof![
        prop::sample::select(vec![
            "cloudEvents:specversion",
            "cloudEvents:id",
            "cloudEvents:source",
            "cloudEvents:type",
            "cloudEvents:subject",
            "cloudEvents:data",
            "cloudEvents_time",
            "cloudevents:ID",
            "x-other",
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ];
    let value = prop_oneof![
        Just(json!("1.0")),
        Just(json!("com.example.user.signed_up")),
        Just(json!("legacy.signup")),
        "[ -~]{0,300}".prop_map(Value::String),
        json_value(),
    ];
    prop::collection::vec((name, value), 0..7).prop_map(|kv| kv.into_iter().collect())
}

/// Any message: a seed as it is or mutated, random bytes, or random JSON; with any
/// routing key, content type, AMQP type, message id and CloudEvents headers.
fn message(seeds: Vec<Message>) -> impl Strategy<Value = Message> {
    let n = seeds.len();
    // A body, and the seed it came from (whose routing key and properties it may keep).
    let body = prop_oneof![
        3 => (0..n, prop::collection::vec(mutation(), 0..4), 0..n).prop_map({
            let seeds = seeds.clone();
            move |(i, ms, j)| (mutate(seeds[i].body.clone(), &ms, &seeds[j].body), Some(i))
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| (b, None)),
        2 => json_value().prop_map(|v| (serde_json::to_vec(&v).unwrap_or_default(), None)),
    ];
    let routing_key = prop_oneof![
        prop::sample::select(
            seeds
                .iter()
                .map(|s| s.routing_key.clone())
                .collect::<Vec<_>>()
        ),
        "[a-z*#.]{0,24}",
        any::<String>(),
    ];
    let content_type = prop::option::of(prop_oneof![
        Just("application/cloudevents+json".to_owned()),
        Just("Application/CloudEvents+JSON; charset=utf-8".to_owned()),
        Just("application/json".to_owned()),
        Just("text/plain".to_owned()),
        Just("application/octet-stream".to_owned()),
        any::<String>(),
    ]);
    let kind = prop::option::of(prop_oneof![
        Just("com.example.user.signed_up".to_owned()),
        Just("legacy.signup".to_owned()),
        any::<String>(),
    ]);
    let message_id = prop::option::of(prop_oneof![
        20 => "[a-z0-9-]{0,40}",
        1 => (1usize..4).prop_map(|k| "m".repeat(k * 100_000)),
    ]);
    (
        body,
        routing_key,
        content_type,
        kind,
        message_id,
        ce_headers(),
        any::<bool>(),
    )
        .prop_map(
            move |((body, seed), routing_key, content_type, kind, message_id, headers, keep)| {
                match seed.filter(|_| keep) {
                    // The seed's own routing key and properties, with only the id varied.
                    Some(i) => Message {
                        routing_key: seeds[i].routing_key.clone(),
                        body,
                        properties: Properties {
                            message_id,
                            ..seeds[i].properties.clone()
                        },
                    },
                    None => Message {
                        routing_key,
                        body,
                        properties: Properties {
                            content_type,
                            kind,
                            message_id,
                            headers,
                        },
                    },
                }
            },
        )
}

/// What must hold for every message: an outcome that explains itself, never a panic,
/// and every delivered event within Crisp's rules and our hygiene.
fn check_one(offline: &Offline, message: &Message) {
    let mut incoming = Incoming::new(&message.body);
    incoming.content_type = message.properties.content_type.as_deref();
    incoming.message_id = message.properties.message_id.as_deref();
    incoming.amqp_type = message.properties.kind.as_deref();
    for (k, v) in &message.properties.headers {
        incoming.add_header(k, v.clone());
    }
    if let Ok(decoded) = decode(&incoming) {
        assert!(decoded.doc.is_object());
        if let Some(id) = &decoded.id {
            assert!(id.len() <= MAX_ID_BYTES, "id of {} bytes kept", id.len());
            assert!(!id.is_empty());
        }
    }
    match offline.evaluate(message) {
        Verdict::Deliver(m) => {
            assert!(!m.event.text.trim().is_empty());
            assert!(m.event.text.chars().count() <= MAX_TEXT_CHARS);
            assert_eq!(check_people_id(&m.people_id), Ok(()));
            for (k, v) in &m.event.data {
                assert!(is_data_key(k), "data key {k:?}");
                assert!(!is_secret_looking(k), "secret-looking key {k:?} sent");
                assert!(!v.is_object() && !v.is_array() && !v.is_null(), "{k}: {v}");
            }
            let _ = offline.json_line(1, &Verdict::Deliver(m));
        }
        Verdict::Skip(detail) => assert!(!detail.is_empty()),
        Verdict::DeadLetter(dl) => {
            assert!(!dl.detail.is_empty());
            assert!(
                dl.detail.len() < 4096,
                "detail of {} bytes",
                dl.detail.len()
            );
        }
    }
}

/// The fuzzer: as many generated messages as fit in `FUZZ_SECONDS` (default 3).
#[test]
fn fuzz_decode_route_map() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let offline = example_offline();
    let seeds = seeds();
    for s in &seeds {
        check_one(&offline, s);
    }
    let strategy = message(seeds);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut executions = 0u64;
    let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
    while Instant::now() < deadline {
        let message = strategy
            .new_tree(&mut runner)
            .expect("the strategy generates")
            .current();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_one(&offline, &message);
            offline.evaluate(&message)
        }));
        match result {
            Ok(outcome) => {
                let code = match &outcome {
                    Verdict::DeadLetter(dl) => format!("dead_letter:{}", dl.reason.code()),
                    other => other.code().to_owned(),
                };
                *outcomes.entry(code).or_default() += 1;
            }
            Err(_) => panic!(
                "fuzz: failing input after {executions} executions (replay with FUZZ_SEED={seed}): {message:?}"
            ),
        }
        executions += 1;
    }
    eprintln!(
        "fuzz: {executions} executions in {:.1} s (FUZZ_SEED={seed}), no crash; outcomes {outcomes:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(executions > 0);
    assert!(
        outcomes.contains_key("deliver"),
        "the seeds reach Crisp events: {outcomes:?}"
    );
}

proptest! {
    #![proptest_config(Config { cases: 256, ..Config::default() })]

    /// A pointer built from any keys finds exactly what walking the keys finds.
    #[test]
    fn prop_pointers_find_what_their_tokens_name(doc in json_value(), keys in prop::collection::vec(key(), 1..4)) {
        let escaped: String = keys
            .iter()
            .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
            .collect();
        let pointer = Pointer::parse(&escaped).expect("an escaped pointer parses");
        prop_assert_eq!(pointer.tokens().collect::<Vec<_>>(), keys.clone());
        let mut walked = Some(&doc);
        for k in &keys {
            walked = walked.and_then(|v| match v {
                Value::Object(m) => m.get(k),
                Value::Array(a) => k.parse::<usize>().ok().filter(|_| !k.starts_with('+') && (k == "0" || !k.starts_with('0'))).and_then(|i| a.get(i)),
                _ => None,
            });
        }
        prop_assert_eq!(pointer.find(&doc), walked.filter(|v| !v.is_null()));
    }

    /// Parsing any text as a pointer or a template never panics.
    #[test]
    fn prop_any_text_parses_or_explains(text in any::<String>(), doc in json_value()) {
        let _ = Pointer::parse(&text);
        if let Ok(t) = Template::parse(&text) {
            let _ = t.render(&doc);
        }
    }

    /// Literal text renders as itself (braces doubled to escape them); a placeholder
    /// inserts a string exactly and a number as its JSON text.
    #[test]
    fn prop_templates_render_literals_and_values(literal in "[^{}]{0,30}", s in any::<String>(), n in any::<i64>()) {
        let t = Template::parse(&format!("{{{{{literal}}}}}:{{/s}}:{{/n}}")).expect("parses");
        let rendered = t.render(&json!({"s": s, "n": n})).expect("renders");
        prop_assert_eq!(rendered, format!("{{{literal}}}:{s}:{n}"));
    }

    /// Flattening yields only flat, non-null values under keys that follow Crisp's rule,
    /// never more than the cap, and never a secret-looking key.
    #[test]
    fn prop_flattening_is_flat_capped_and_clean(value in json_value(), max in 0usize..60) {
        let mut b = DataBuilder::new(max);
        b.insert("x", &value);
        let (data, _) = b.finish();
        prop_assert!(data.len() <= max);
        for (k, v) in &data {
            prop_assert!(is_data_key(k), "{}", k);
            prop_assert!(!is_secret_looking(k), "{}", k);
            prop_assert!(!v.is_object() && !v.is_array() && !v.is_null());
        }
    }

    /// A secret-looking key at any depth, in any spelling, is never sent, and counted.
    #[test]
    fn prop_secrets_are_stripped_at_any_depth(
        path in prop::collection::vec("[a-h]{1,6}", 0..4),
        secret in prop::sample::select(vec!["password", "Pass_Word", "API-KEY", "cardNumber", "client_secret", "user_ssn", "CVV", "iban", "authorization", "privateKey"]),
        value in "[a-z0-9]{1,10}",
    ) {
        let mut leaf = Map::new();
        leaf.insert(secret.to_owned(), json!(value.clone()));
        leaf.insert("kept".into(), json!(1));
        let mut doc = Value::Object(leaf);
        for p in path.iter().rev() {
            let mut m = Map::new();
            m.insert(p.clone(), doc);
            doc = Value::Object(m);
        }
        let mut b = DataBuilder::new(50);
        b.insert("d", &doc);
        let (data, counts) = b.finish();
        prop_assert_eq!(counts.stripped, 1);
        prop_assert!(data.values().all(|v| v != &json!(value)), "{:?}", data);
        prop_assert_eq!(data.len(), 1);
    }
}

fn plain(body: Vec<u8>) -> Message {
    Message {
        routing_key: "order.created".into(),
        body,
        properties: Properties::default(),
    }
}

fn reason(outcome: &Verdict) -> Option<Reason> {
    match outcome {
        Verdict::DeadLetter(dl) => Some(dl.reason),
        _ => None,
    }
}

#[test]
fn deep_nesting_is_invalid_json_not_a_stack_overflow() {
    let offline = example_offline();
    for depth in [129usize, 100_000] {
        let mut body = vec![b'['; depth];
        body.extend(std::iter::repeat_n(b']', depth));
        let outcome = offline.evaluate(&plain(body.clone()));
        assert_eq!(reason(&outcome), Some(Reason::InvalidJson), "{outcome:?}");
        if let Verdict::DeadLetter(dl) = outcome {
            assert!(dl.detail.contains("recursion limit"), "{}", dl.detail);
        }
        let mut deep_object = b"{\"a\":".repeat(depth);
        deep_object.extend(b"1");
        deep_object.extend(b"}".repeat(depth));
        assert_eq!(
            reason(&offline.evaluate(&plain(deep_object))),
            Some(Reason::InvalidJson)
        );
    }
    // 100 levels are fine: an object, routed (no people id at the rule's pointers).
    let mut ok = b"{\"a\":".repeat(100);
    ok.extend(b"1");
    ok.extend(b"}".repeat(100));
    assert!(matches!(offline.evaluate(&plain(ok)), Verdict::Skip(_)));
}

#[test]
fn large_bodies_huge_numbers_bad_utf8_duplicate_keys_and_huge_ids() {
    let offline = example_offline();
    // Over amqp.max_message_bytes: too_large, not parsed.
    let huge = vec![b' '; 1024 * 1024 + 1];
    assert_eq!(
        reason(&offline.evaluate(&plain(huge))),
        Some(Reason::TooLarge)
    );
    // Just under it: a big array of items is parsed and mapped; data stays capped.
    let items: Vec<Value> = (0..40_000).map(|_| json!({"sku": "s", "qty": 1})).collect();
    let big = json!({"id": "A", "status": "paid", "email": "a@b.co",
        "amount": {"total": 1, "currency": "EUR"}, "items": items});
    let body = serde_json::to_vec(&big).unwrap();
    assert!(body.len() < 1024 * 1024);
    assert!(matches!(
        offline.evaluate(&plain(body)),
        Verdict::Deliver(_)
    ));
    // Invalid UTF-8 in a string.
    let bad = b"{\"id\":\"A\xff\",\"status\":\"paid\"}".to_vec();
    assert_eq!(
        reason(&offline.evaluate(&plain(bad))),
        Some(Reason::InvalidJson)
    );
    // A number beyond f64: invalid_json; a huge integer becomes a float: schema decides.
    assert_eq!(
        reason(&offline.evaluate(&plain(b"{\"amount\":{\"total\":1e999}}".to_vec()))),
        Some(Reason::InvalidJson)
    );
    let big_int = format!(
        r#"{{"id":"A","status":"paid","email":"a@b.co","amount":{{"total":{},"currency":"EUR"}}}}"#,
        "9".repeat(300)
    );
    match offline.evaluate(&plain(big_int.into_bytes())) {
        Verdict::Deliver(m) => assert!(m.event.data["total"].is_f64()),
        other => panic!("{other:?}"),
    }
    // Duplicate keys: the last one wins (serde_json), as a schema validator would see it.
    let dup = br#"{"id":"A","status":"pending","status":"paid","email":"a@b.co","amount":{"total":1,"currency":"EUR"}}"#;
    assert!(matches!(
        offline.evaluate(&plain(dup.to_vec())),
        Verdict::Deliver(_)
    ));
    // A huge message id and a huge CloudEvents id: bounded in the duplicate window.
    let long = "i".repeat(500_000);
    let mut incoming = Incoming::new(br#"{"a":1}"#);
    incoming.message_id = Some(&long);
    let id = decode(&incoming).unwrap().id.unwrap();
    assert!(id.len() <= MAX_ID_BYTES);
    let ce =
        serde_json::to_vec(&json!({"specversion": "1.0", "id": long, "source": "/s", "type": "t"}))
            .unwrap();
    let mut incoming = Incoming::new(&ce);
    incoming.content_type = Some("application/cloudevents+json");
    let id = decode(&incoming).unwrap().id.unwrap();
    assert!(id.len() <= MAX_ID_BYTES);
}
