//! Throughput benchmark: N messages preloaded in the queue, the bridge (release build,
//! child process) against the in-process Crisp sandbox; prints messages per second from
//! the bridge's start to the last event received.
//!
//!     cargo build --release && cargo run --release --example bench -- [N] [LATENCY_MS] [CONCURRENCY]

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};
use support::*;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let latency_ms: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let concurrency: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(32);
    let bin = std::env::var("CRISP_BRIDGE_BIN")
        .map(Into::into)
        .unwrap_or_else(|_| default_bin());

    let url = amqp_url();
    let names = Names::new("bench");
    let sandbox = sandbox().await;
    sandbox.state.set_latency(Duration::from_millis(latency_ms));
    let port = free_port();
    let config = write_config(
        &names,
        &url,
        &sandbox.api_url(),
        port,
        &format!("concurrency = {concurrency}\ndedup_window = \"10m\""),
    );
    let publisher = Publisher::connect(&url).await;
    publisher.declare(&config).await;
    let people = 1_000;
    let started = Instant::now();
    for seq in 0..n {
        publisher
            .publish(&names.exchange, "load.event", seq, people)
            .await;
    }
    let publish_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let bridge = Bridge::spawn(&bin, &config, port).await;
    loop {
        if sandbox.state.event_count() as u64 >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    bridge.stop().await;
    let events = sandbox.state.event_count();
    println!(
        "bench: {n} messages, {people} people, Crisp latency {latency_ms} ms, concurrency {concurrency}: {:.0} msg/s ({elapsed:.2} s incl. start-up; {events} events; preload {:.0} msg/s)",
        n as f64 / elapsed,
        n as f64 / publish_s
    );
    publisher.delete(&names).await;
    let _ = std::fs::remove_file(config);
}
