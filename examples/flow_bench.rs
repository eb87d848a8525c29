//! Flow-control benchmark: N bridge processes (release build, children) on one queue
//! against the in-process Crisp sandbox limited to R event POSTs a second, counted the
//! way `--shape` says (token_bucket, sliding_window, fixed_window, fixed_window_minute;
//! 429 beyond, shared by every pod). The pods start cold on a backlog, together or one
//! every `--join-every` seconds, and the whole run counts, from the first pod's start:
//! what reached Crisp against the limit, and the share of requests answered 429. Then it
//! lifts the limit and measures how long the pods take to send above 10 R per second,
//! drains the queue and tallies losses, duplicates and dead letters.
//!
//!     cargo run --release --example flow_bench -- [--pods 3] [--limit 50] [--latency-ms 100]
//!         [--shape sliding_window] [--join-every 0] [--seconds 30] [--retry-after 0|1]
//!
//! `--limit 0` runs without a limit (throughput only). `FLOW_BENCH_BIN` picks the
//! binary (e.g. an older build, for a same-run baseline; a `CRISP_BRIDGE_` name would be
//! read as a config override by the bridge).

use crisp_bridge_testkit::{
    amqp_url, arg, auto_profiles, bin_from_env, delivered_seqs, free_port, sandbox, Bridge,
    BrokerClient, Names, TestConfig,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn is_event_post(a: &crisp_bridge::sandbox::Attempt) -> bool {
    a.method == "POST" && a.path.contains("/people/events/")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pods = arg(&args, "--pods", 3) as usize;
    let limit = arg(&args, "--limit", 50);
    let latency_ms = arg(&args, "--latency-ms", 100);
    let join_every = arg(&args, "--join-every", 0);
    // Long enough for the last pod to join and run 20 s more.
    let seconds = arg(&args, "--seconds", 20 + join_every * (pods as u64 - 1)).max(1);
    let shape_name = args
        .iter()
        .position(|a| a == "--shape")
        .and_then(|i| args.get(i + 1))
        .map_or("sliding_window", String::as_str);
    let Some(shape) = crisp_bridge::sandbox::LimiterShape::parse(shape_name) else {
        eprintln!("flow_bench: unknown --shape {shape_name}");
        std::process::exit(2);
    };
    let retry_after = arg(&args, "--retry-after", 0) == 1;
    let bin = bin_from_env("FLOW_BENCH_BIN");

    let url = amqp_url().await;
    let names = Names::new("flowbench");
    let sandbox = sandbox(auto_profiles()).await;
    sandbox.state.set_latency(Duration::from_millis(latency_ms));
    sandbox
        .state
        .set_rate_limiter((limit > 0).then_some(limit as u32), retry_after, shape);
    let publisher = BrokerClient::connect_to(&url).await;
    // Enough for the measured stretch at the limit, and for the ramp once it is lifted.
    let n = if limit > 0 {
        limit * seconds * 13 / 10 + limit * 60
    } else {
        20_000
    };
    let people = 1_000;
    // Every pod reads the same file; each has its own admin port, taken just before it
    // starts (one reserved earlier could be handed to another pod's outgoing connection).
    let config = TestConfig::load(&url, &names, &sandbox.api_url(), 256)
        .layer("[delivery]\nconcurrency = 32\ndedup_window = \"10m\"\nmax_retry_time = \"5m\"")
        .write_temp();
    publisher.declare(&config).await;
    for seq in 0..n {
        publisher
            .publish_load(&names.exchange, "load.event", seq, people)
            .await;
    }
    // The limiter starts counting now, as the first pod starts cold on the backlog.
    sandbox
        .state
        .set_rate_limiter((limit > 0).then_some(limit as u32), retry_after, shape);
    let started = Instant::now();
    let started_ms = now_ms();
    let mut bridges = Vec::new();
    for k in 0..pods {
        let joins = started + Duration::from_secs(join_every * k as u64);
        tokio::time::sleep_until(joins.into()).await;
        bridges.push(Bridge::command(&bin, &config, free_port()).spawn().await);
    }

    let (achieved, refused_pct, ramp) = if limit > 0 {
        tokio::time::sleep_until((started + Duration::from_secs(seconds)).into()).await;
        let end_ms = started_ms + seconds * 1000;
        let attempts = sandbox.state.attempts();
        let window: Vec<_> = attempts
            .iter()
            .filter(|a| is_event_post(a) && a.at_ms >= started_ms && a.at_ms < end_ms)
            .collect();
        let accepted = window.iter().filter(|a| a.status / 100 == 2).count();
        let refused = window.iter().filter(|a| a.status == 429).count();
        let achieved = accepted as f64 / seconds as f64 / limit as f64;
        let refused_pct = 100.0 * refused as f64 / window.len().max(1) as f64;

        // Lift the limit: how long until the pods send above 10x the old limit?
        sandbox.state.set_rate_limit(None, false);
        let lifted = Instant::now();
        let target = (10 * limit) as usize;
        let mut ramp = None;
        let mut last = (lifted, sandbox.state.events().len());
        while lifted.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = (Instant::now(), sandbox.state.events().len());
            let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64();
            if rate >= target as f64 {
                ramp = Some(lifted.elapsed().as_secs_f64());
                break;
            }
            if sandbox.state.events().len() as u64 >= n {
                break;
            }
            last = now;
        }
        (Some(achieved), Some(refused_pct), ramp)
    } else {
        (None, None, None)
    };

    // Drain, then tally.
    let drain_deadline = Instant::now() + Duration::from_secs(300);
    while (delivered_seqs(&sandbox).len() as u64) < n && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total_s = started.elapsed().as_secs_f64();
    for b in bridges {
        b.stop().await;
    }
    let seqs = delivered_seqs(&sandbox);
    let mut counts: HashMap<u64, u32> = HashMap::new();
    for s in &seqs {
        *counts.entry(*s).or_default() += 1;
    }
    let duplicates: u32 = counts.values().map(|c| c - 1).sum();
    let lost = n - counts.len() as u64;
    let dead = publisher.ready(&names.dlq).await;
    let all = sandbox.state.attempts();
    let posts = all.iter().filter(|a| is_event_post(a)).count();
    let total_refused = all
        .iter()
        .filter(|a| is_event_post(a) && a.status == 429)
        .count();

    let fmt = |v: Option<f64>, unit: &str| v.map_or("-".into(), |v| format!("{v:.3}{unit}"));
    println!(
        "flow_bench: pods={pods} join_every={join_every}s shape={shape_name} limit={limit}/s latency={latency_ms}ms retry_after={retry_after} \
         messages={n} seconds={seconds}: achieved/limit={} 429={} ramp_to_10x={} | whole run: {:.0} msg/s, \
         {posts} posts, {total_refused} x 429, lost={lost} duplicated={duplicates} dead_lettered={dead}",
        fmt(achieved, ""),
        fmt(refused_pct, "%"),
        fmt(ramp, "s"),
        n as f64 / total_s,
    );
    publisher.delete(&names).await;
    let _ = std::fs::remove_file(config);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
