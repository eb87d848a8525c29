//! Throughput benchmark: N messages preloaded in the queue, the bridge (release build,
//! child process) against the in-process Crisp sandbox; prints messages per second from
//! the bridge's start to the last event received.
//!
//!     cargo build --release && cargo run --release --example bench -- [N] [LATENCY_MS] [CONCURRENCY]

use crisp_bridge_testkit::{
    amqp_url, auto_profiles, bin_from_env, eventually_within, free_port, sandbox, Bridge,
    BrokerClient, Names, TestConfig,
};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let latency_ms: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let concurrency: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(32);
    let bin = bin_from_env("CRISP_BRIDGE_BIN");

    let url = amqp_url().await;
    let names = Names::new("bench");
    let sandbox = sandbox(auto_profiles()).await;
    sandbox.state.set_latency(Duration::from_millis(latency_ms));
    let config = TestConfig::load(&url, &names, &sandbox.api_url(), 256)
        .layer(&format!(
            "[delivery]\nconcurrency = {concurrency}\ndedup_window = \"10m\""
        ))
        .write_temp();
    let publisher = BrokerClient::connect_to(&url).await;
    publisher.declare(&config).await;
    let people = 1_000;
    let started = Instant::now();
    for seq in 0..n {
        publisher
            .publish_load(&names.exchange, "load.event", seq, people)
            .await;
    }
    let publish_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let bridge = Bridge::command(&bin, &config, free_port()).spawn().await;
    eventually_within(Duration::from_secs(3600), "every event", || async {
        (sandbox.state.event_count() as u64 >= n).then_some(())
    })
    .await;
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
