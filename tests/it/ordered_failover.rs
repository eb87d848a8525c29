//! Ordered failover: with `amqp.single_active_consumer` one bridge consumes, the others
//! stand by, and when the active one is killed (SIGKILL, mid-drain, many messages
//! unacked) a standby takes over with no person's event arriving before one published
//! earlier, duplicates aside. Also: what the bridge hands back itself keeps its order,
//! and a queue declared the other way is refused at start (exit 78).

use crisp_bridge::sandbox::{Fault, ReceivedEvent};
use crisp_bridge_testkit::{
    auto_profiles, eventually, eventually_within, metric, Bridge, BrokerClient, Proxy, TestApp,
    TestEnv, LOAD_RULES,
};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_crisp-bridge"))
}

const SAC: &str = "[amqp]\nsingle_active_consumer = true\n";

/// Per person, the seqs in the order they first arrived (a duplicate of a seq that
/// already arrived is left out), and how many events were duplicates.
fn first_arrivals(events: &[ReceivedEvent]) -> (BTreeMap<String, Vec<u64>>, usize) {
    let mut seen = HashSet::new();
    let mut per_person: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut duplicates = 0;
    for e in events {
        let seq = e.data.get("seq").and_then(|v| v.as_u64()).expect("a seq");
        if seen.insert(seq) {
            per_person.entry(e.people_id.clone()).or_default().push(seq);
        } else {
            duplicates += 1;
        }
    }
    (per_person, duplicates)
}

/// Asserts every person's first arrivals are in publish order.
fn assert_in_order(per_person: &BTreeMap<String, Vec<u64>>) {
    for (person, seqs) in per_person {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{person}: an event arrived before one published earlier (first arrivals {seqs:?})"
        );
    }
}

/// When the first event POST went through `proxy` after `since`, if one did.
fn first_post_after(proxy: &Proxy, since: Instant) -> Option<Instant> {
    proxy
        .chunks()
        .iter()
        .filter(|c| c.from_client && c.at >= since && c.bytes.starts_with(b"POST "))
        .map(|c| c.at)
        .min()
}

fn posts(proxy: &Proxy) -> usize {
    proxy
        .chunks()
        .iter()
        .filter(|c| c.from_client && c.bytes.starts_with(b"POST "))
        .count()
}

/// Starts `n` child bridges on one config, each talking to the sandbox through a proxy
/// of its own (so the test can tell which one posts). They start one after the other:
/// with a single active consumer the first is the active one.
async fn bridges(env: &TestEnv, n: usize) -> Vec<(Bridge, Proxy)> {
    let mut started = Vec::new();
    for _ in 0..n {
        let proxy = Proxy::tapped(env.sandbox.addr).await;
        let api_url = format!("http://{}/v1", proxy.addr);
        let bridge = env
            .spawn(bin(), &[("CRISP_BRIDGE_CRISP__API_URL", api_url.as_str())])
            .await;
        started.push((bridge, proxy));
    }
    started
}

/// Publishes `n` load events for `people` people (person `seq % people`), in seq order,
/// with publisher confirms.
async fn publish_load(env: &TestEnv, n: u64, people: u64) {
    env.broker
        .publish_load_many(&env.names.exchange, "load.event", 0..n, people)
        .await;
}

struct Failover {
    failover: Duration,
}

/// Three bridges on one queue, 50 people with 20 events each, Crisp answering in 150 ms;
/// the bridge that posts gets `signal` after a third of the events arrived.
async fn stop_the_active_one(single_active_consumer: bool, signal: &str) -> Failover {
    let mut builder = TestApp::builder("failover")
        .sandbox(auto_profiles())
        .rules(LOAD_RULES)
        .config("[amqp]\nprefetch = 64");
    if single_active_consumer {
        builder = builder.config(SAC);
    }
    let env = builder.env().await;
    env.sandbox.state.set_latency(Duration::from_millis(150));
    let (people, n) = (50u64, 1000u64);
    let mut bridges = bridges(&env, 3).await;
    publish_load(&env, n, people).await;
    let state = env.sandbox.state.clone();
    eventually("a third of the events at the sandbox", || {
        let count = state.event_count();
        async move { (count as u64 >= n / 3).then_some(()) }
    })
    .await;
    let posting: Vec<usize> = (0..bridges.len())
        .filter(|&i| posts(&bridges[i].1) > 0)
        .collect();
    let active = if single_active_consumer {
        assert_eq!(
            posting.len(),
            1,
            "with a single active consumer only one bridge posts; bridges {posting:?} did"
        );
        posting[0]
    } else {
        assert!(!posting.is_empty());
        posting[0]
    };
    let delivered = state.event_count();
    let killed_at = Instant::now();
    bridges[active].0.signal(signal);
    let status = bridges[active].0.wait_exit().await;
    assert_eq!(status.success(), signal == "TERM", "{signal}: {status}");
    let events = eventually_within(
        Duration::from_secs(120),
        "every event at the sandbox",
        || {
            let events = state.events();
            async move {
                let distinct: HashSet<u64> = events
                    .iter()
                    .filter_map(|e| e.data.get("seq").and_then(|v| v.as_u64()))
                    .collect();
                (distinct.len() as u64 == n).then_some(events)
            }
        },
    )
    .await;
    let failover = bridges
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != active)
        .filter_map(|(_, (_, proxy))| first_post_after(proxy, killed_at))
        .min()
        .expect("a standby posted")
        .duration_since(killed_at);
    let (per_person, duplicates) = first_arrivals(&events);
    assert_eq!(per_person.len() as u64, people);
    if single_active_consumer {
        assert_in_order(&per_person);
        let posting_after: Vec<usize> = (0..bridges.len())
            .filter(|&i| i != active && posts(&bridges[i].1) > 0)
            .collect();
        assert_eq!(
            posting_after.len(),
            1,
            "one standby took over; bridges {posting_after:?} posted"
        );
    }
    // Nothing left behind, nothing dead-lettered.
    let broker = &env.broker;
    eventually("the main queue empty", || async {
        (broker.ready(&env.names.queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(broker.ready(&env.names.dlq).await, 0, "dead letters");
    for (bridge, _) in bridges.drain(..) {
        bridge.stop().await;
    }
    eprintln!(
        "single_active_consumer={single_active_consumer}, SIG{signal}: {} events for {n} messages \
         ({duplicates} duplicates), {delivered} delivered when the active bridge got the signal, \
         failover (signal to the standby's first event POST) {failover:?}",
        events.len()
    );
    Failover { failover }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_in_order_when_the_active_bridge_is_killed() {
    let run = stop_the_active_one(true, "KILL").await;
    assert!(
        run.failover < Duration::from_secs(10),
        "the standby took {:?} to post",
        run.failover
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_bridges_still_deliver_everything_when_one_is_killed() {
    stop_the_active_one(false, "KILL").await;
}

/// A rolling update: SIGTERM. The stopping bridge finishes what is in flight, and the
/// broker hands the queue over only when its channel closes, taking back what it held
/// in delivery order (a consumer cancel would hand it over at once, with earlier
/// messages still held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_in_order_when_the_active_bridge_stops() {
    stop_the_active_one(true, "TERM").await;
}

/// Waits for `bridge` to exit and returns its code and what it wrote.
async fn exit_of(mut bridge: Bridge) -> (Option<i32>, String) {
    let status = bridge.wait_exit().await;
    (status.code(), bridge.output())
}

async fn refused_when_declared_otherwise(declared_with: bool) {
    let mut builder = TestApp::builder("sac-mismatch").sandbox(auto_profiles());
    if declared_with {
        builder = builder.config(SAC);
    }
    let env = builder.env().await;
    // The queue as someone declared it before.
    env.broker.declare(&env.config.write_temp()).await;
    let config = if declared_with {
        env.config
            .clone()
            .layer("[amqp]\nsingle_active_consumer = false\n")
    } else {
        env.config.clone().layer(SAC)
    };
    let path = config.write_temp();
    let bridge = Bridge::command(bin(), &path, crisp_bridge_testkit::free_port())
        .capture_output()
        .start();
    let (code, output) = exit_of(bridge).await;
    assert_eq!(code, Some(78), "{output}");
    for needed in [
        format!("queue `{}`", env.names.queue),
        "x-single-active-consumer".to_owned(),
        "amqp.single_active_consumer".to_owned(),
        "delete".to_owned(),
    ] {
        assert!(output.contains(&needed), "no `{needed}` in: {output}");
    }
    // The queue is as it was: nothing deleted, nothing consumed.
    assert!(env.broker.exists(&env.names.queue).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_without_single_active_consumer_is_refused_with_exit_78() {
    refused_when_declared_otherwise(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_with_single_active_consumer_is_refused_without_it() {
    refused_when_declared_otherwise(true).await;
}

/// When one message of a person runs out of `max_retry_time` and goes back to the queue,
/// that person's later messages the bridge holds go back with it, in order: none
/// overtakes it (any mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_messages_go_back_with_one_that_ran_out_of_retry_time() {
    let env = TestApp::builder("retry-order")
        .sandbox(auto_profiles())
        .config("[delivery]\nmax_retry_time = \"150ms\"\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"")
        .env()
        .await;
    let mut bridge = env.spawn(bin(), &[]).await;
    // Enough failures for two hand-backs of a's first message, while others get through
    // (when nothing gets through, it is an outage, a hold that keeps the messages).
    env.sandbox.state.push_fault(Fault {
        status: Some(500),
        times: 12,
        people_id: Some("a@b.io".into()),
        ..Default::default()
    });
    for i in 0..5 {
        let body = format!(r#"{{"email":"a@b.io","phase":"p{i}"}}"#);
        env.publish("trial.started", body.as_bytes()).await;
    }
    let others = tokio::spawn({
        let broker = BrokerClient::connect().await;
        let exchange = env.names.exchange.clone();
        async move {
            for i in 0.. {
                let body = format!(r#"{{"email":"ok{i}@b.io","phase":"started"}}"#);
                broker
                    .publish(
                        &exchange,
                        "trial.started",
                        body.as_bytes(),
                        Default::default(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let state = env.sandbox.state.clone();
    let texts = eventually("a@b.io's five events", || {
        let texts: Vec<String> = state
            .events()
            .into_iter()
            .filter(|e| e.people_id == "a@b.io")
            .map(|e| e.text)
            .collect();
        async move { (texts.len() >= 5).then_some(texts) }
    })
    .await;
    others.abort();
    let expected: Vec<String> = (0..5).map(|i| format!("trial:p{i}")).collect();
    assert_eq!(texts, expected, "a@b.io's events once each, in order");
    assert_eq!(state.pending_faults(), 0, "every failure was served");
    // The first went back at least twice, each time with the four behind it.
    let metrics = bridge.metrics().await;
    let requeued = metric(
        &metrics,
        "crisp_bridge_messages_total",
        "outcome=\"requeued\",rule=\"trial\"",
    )
    .or_else(|| {
        metric(
            &metrics,
            "crisp_bridge_messages_total",
            "rule=\"trial\",outcome=\"requeued\"",
        )
    })
    .unwrap_or(0.0);
    assert!(
        requeued >= 10.0,
        "expected two hand-backs of five messages, {requeued} requeued:\n{metrics}"
    );
    bridge.signal("TERM");
    bridge.wait_exit().await;
}
