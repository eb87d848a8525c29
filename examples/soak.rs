//! Soak: the bridge (child process) under a steady stream for a bounded time while
//! faults are injected at random, then a tally. Exits 1 if anything was lost.
//!
//!     cargo run --release --example soak -- [--seconds 180] [--rate 40] [--seed N]
//!
//! Faults: Crisp 5xx bursts, 429/420 with Retry-After, latency spikes, refused
//! credentials for a few seconds, broker connections cut (a TCP proxy between the
//! bridge and RabbitMQ), SIGKILL then restart, SIGTERM then restart.

use crisp_bridge::sandbox::Fault;
use crisp_bridge_testkit::{
    amqp_url, amqp_url_via, arg, auto_profiles, bin_from_env, broker_addr, delivered_seqs,
    free_port, sandbox, Bridge, BrokerClient, Names, Proxy, TestConfig,
};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds", 180);
    let rate = arg(&args, "--rate", 40).max(1);
    let seed = arg(&args, "--seed", rand::random::<u32>() as u64);
    let bin = bin_from_env("CRISP_BRIDGE_BIN");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let url = amqp_url().await;
    let proxy = Proxy::start(broker_addr().await).await;
    let via_proxy = amqp_url_via(proxy.addr).await;

    let names = Names::new("soak");
    let sandbox = sandbox(auto_profiles()).await;
    let port = free_port();
    let config = TestConfig::load(&via_proxy, &names, &sandbox.api_url(), 256)
        .layer("[delivery]\nconcurrency = 16\ninitial_backoff = \"50ms\"\nmax_backoff = \"2s\"\nmax_retry_time = \"20s\"\nshutdown_timeout = \"5s\"")
        .write_temp();
    let publisher = Arc::new(BrokerClient::connect_to(&url).await);
    publisher.declare(&config).await;
    let mut bridge = Some(Bridge::command(&bin, &config, port).spawn().await);
    println!(
        "soak: {seconds} s at {rate} msg/s, seed {seed}, queue {}",
        names.queue
    );

    let published = Arc::new(AtomicU64::new(0));
    let stop_publishing = Arc::new(tokio::sync::Notify::new());
    let publishing = {
        let (publisher, published, stop) = (
            publisher.clone(),
            published.clone(),
            stop_publishing.clone(),
        );
        let exchange = names.exchange.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.notified() => return,
                }
                let seq = published.load(Ordering::SeqCst);
                publisher
                    .publish_load(&exchange, "load.event", seq, 50)
                    .await;
                published.store(seq + 1, Ordering::SeqCst);
            }
        })
    };

    let mut faults: BTreeMap<&str, u32> = BTreeMap::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(rng.random_range(3_000..9_000))).await;
        if Instant::now() >= end {
            break;
        }
        let state = &sandbox.state;
        let kind = match rng.random_range(0..7) {
            0 => {
                state.push_fault(Fault {
                    status: Some([500, 502, 503][rng.random_range(0..3)]),
                    times: rng.random_range(10..60),
                    ..Default::default()
                });
                "crisp_5xx_burst"
            }
            1 => {
                state.push_fault(Fault {
                    status: Some(if rng.random_bool(0.5) { 429 } else { 420 }),
                    times: rng.random_range(3..15),
                    retry_after: Some("1".into()),
                    ..Default::default()
                });
                "rate_limit"
            }
            2 => {
                state.set_latency(Duration::from_millis(rng.random_range(200..800)));
                tokio::time::sleep(Duration::from_secs(3)).await;
                state.set_latency(Duration::ZERO);
                "latency_spike"
            }
            3 => {
                state.set_refuse(true);
                tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..6_000))).await;
                state.set_refuse(false);
                "refused_credentials"
            }
            4 => {
                proxy.cut();
                "broker_connection_cut"
            }
            5 => {
                if let Some(b) = bridge.take() {
                    b.signal("KILL");
                    let mut b = b;
                    let _ = b.child.wait().await;
                }
                bridge = Some(Bridge::command(&bin, &config, port).spawn().await);
                "sigkill_restart"
            }
            _ => {
                if let Some(b) = bridge.take() {
                    b.stop().await;
                }
                bridge = Some(Bridge::command(&bin, &config, port).spawn().await);
                "sigterm_restart"
            }
        };
        *faults.entry(kind).or_default() += 1;
    }
    stop_publishing.notify_one();
    let _ = publishing.await;
    let total = published.load(Ordering::SeqCst);
    sandbox.state.set_refuse(false);
    sandbox.state.set_latency(Duration::ZERO);

    // Drain: wait until every published message is delivered or dead-lettered.
    let deadline = Instant::now() + Duration::from_secs(180);
    let (delivered, dead) = loop {
        let seqs: HashSet<u64> = delivered_seqs(&sandbox).into_iter().collect();
        let dead = publisher.ready(&names.dlq).await as u64;
        if seqs.len() as u64 + dead >= total || Instant::now() > deadline {
            break (seqs, dead);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(b) = bridge.take() {
        b.stop().await;
    }
    let events = delivered_seqs(&sandbox).len() as u64;
    let lost = total.saturating_sub(delivered.len() as u64 + dead);
    let duplicated = events - delivered.len() as u64;
    let faults: Vec<String> = faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("faults: {}", faults.join(" "));
    println!(
        "published {total} delivered {} dead-lettered {dead} lost {lost} duplicated {duplicated}",
        delivered.len()
    );
    publisher.delete(&names).await;
    let _ = std::fs::remove_file(config);
    if lost > 0 {
        std::process::exit(1);
    }
}
