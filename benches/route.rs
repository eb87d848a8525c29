//! Routing cost with many rules (issue 10: 1,000 rules add at most 2 µs per message).
//! Each message is decoded and routed; the message matches the last rule, so every rule
//! before it is tried. The added cost is `route/1000 rules` minus `route/1 rule`.
//!
//!     cargo bench --bench route

use crisp_bridge::route::{Routed, Router};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;

/// `n` rules `r0`..; rule `i` takes routing key `svc{i}.order.created` (no wildcard), or
/// `svc{i}.*.created` and a `when` for every other one, as real configurations mix them.
fn router(n: usize) -> Router {
    let mut toml = String::new();
    for i in 0..n {
        let (pattern, when) = if i % 2 == 0 {
            (format!("svc{i}.order.created"), String::new())
        } else {
            (
                format!("svc{i}.*.created"),
                "when = { \"/status\" = \"paid\" }\n".to_owned(),
            )
        };
        toml.push_str(&format!(
            "[[rules]]\nname = \"r{i}\"\nrouting_key = \"{pattern}\"\n{when}people_id = \"/email\"\ntext = \"order:{{/status}}\"\ncolor = \"blue\"\ndata = {{ id = \"/id\", total = \"/amount/total\" }}\n"
        ));
    }
    let config = crisp_bridge::config::from_toml_str(&toml).expect("config");
    Router::compile(&config.rules).expect("rules")
}

const BODY: &[u8] = br#"{"email":"jane@example.com","status":"paid","id":"o-1","amount":{"total":42.5,"currency":"EUR"}}"#;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    for n in [1usize, 1_000] {
        let router = router(n);
        let key = format!("svc{}.order.created", n - 1);
        group.bench_function(format!("{n} rules"), |b| {
            b.iter_batched(
                || BODY,
                |body| {
                    let incoming = crisp_bridge::decode::Incoming::new(body);
                    let decoded = crisp_bridge::decode::decode(&incoming).expect("json");
                    let routed = router.route_decoded(black_box(&key), &decoded);
                    assert!(matches!(routed, Routed::Event(_)));
                    routed
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
