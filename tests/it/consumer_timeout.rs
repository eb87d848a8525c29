//! RabbitMQ closes a channel whose delivery stays unacked past its consumer timeout.
//! Read off the wire: no delivery stays unsettled longer than half of
//! `amqp.consumer_timeout` plus one Crisp request, however long its person's earlier
//! messages take, and what goes back keeps its order.

use crate::harness::{amqp_url_via, auto_profiles, broker_addr, TestApp};
use crate::wire::{frames, TapProxy};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// For each delivery (channel, tag): when the broker delivered it and when the bridge
/// settled it (ack, nack or reject; `multiple` covers every open tag up to its own).
fn unsettled_spans(proxy: &TapProxy) -> Vec<(u16, u64, Duration)> {
    let chunks = proxy.chunks();
    let mut delivered: BTreeMap<(u16, u64), Instant> = BTreeMap::new();
    for f in frames(&chunks, false) {
        if f.method() == Some((60, 60)) {
            // basic.deliver: consumer tag (short string), then the delivery tag.
            let tag_len = f.payload[4] as usize;
            let at = 5 + tag_len;
            let tag = u64::from_be_bytes(f.payload[at..at + 8].try_into().expect("8 bytes"));
            delivered.insert((f.channel, tag), f.at);
        }
    }
    let mut settled: BTreeMap<(u16, u64), Instant> = BTreeMap::new();
    for f in frames(&chunks, true) {
        let multiple = match f.method() {
            Some((60, 80)) | Some((60, 120)) => f.payload[12] & 1 == 1,
            Some((60, 90)) => false,
            _ => continue,
        };
        let tag = u64::from_be_bytes(f.payload[4..12].try_into().expect("8 bytes"));
        let covered: Vec<(u16, u64)> = if multiple {
            delivered
                .range((f.channel, 0)..=(f.channel, tag))
                .map(|(k, _)| *k)
                .filter(|k| !settled.contains_key(k))
                .collect()
        } else {
            vec![(f.channel, tag)]
        };
        for k in covered {
            settled.entry(k).or_insert(f.at);
        }
    }
    delivered
        .iter()
        .map(|(&(channel, tag), at)| {
            let end = settled
                .get(&(channel, tag))
                .unwrap_or_else(|| panic!("delivery {tag} on channel {channel} never settled"));
            (channel, tag, end.duration_since(*at))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_delivery_waits_past_half_the_consumer_timeout() {
    let proxy = TapProxy::start(broker_addr().await).await;
    let url = amqp_url_via(proxy.addr).await;
    // A broker consumer timeout of 4 s: hand back after 2 s, a request lasts at most 1 s.
    let mut app = TestApp::builder("consumer-timeout")
        .sandbox(auto_profiles())
        .replace("timeout = \"2s\"", "timeout = \"1s\"")
        .config(&format!(
            "[amqp]\nurl = \"{url}\"\nprefetch = 64\nconsumer_timeout = \"4s\""
        ))
        .start()
        .await;
    // 40 events of one person, each taking Crisp 250 ms: 10 s in all, in one lane.
    app.sandbox.state.set_latency(Duration::from_millis(250));
    let n = 40;
    for i in 0..n {
        let body = format!(r#"{{"email":"one@b.io","phase":"p{i:02}"}}"#);
        app.publish("trial.started", body.as_bytes()).await;
    }
    let events = app.events(n).await;
    app.stop_with_empty_queues().await;
    let texts: Vec<String> = events.iter().map(|e| e.text.clone()).collect();
    let expected: Vec<String> = (0..n).map(|i| format!("trial:p{i:02}")).collect();
    assert_eq!(texts, expected, "every event once, in order");
    let spans = unsettled_spans(&proxy);
    let longest = spans.iter().map(|s| s.2).max().expect("deliveries");
    assert!(
        longest <= Duration::from_millis(3300),
        "a delivery stayed unsettled {longest:?}; the bound is 2 s + one 1 s request"
    );
    let redelivered = spans.len() - n;
    assert!(
        redelivered > 0,
        "10 s of work in a 2 s bound: some must have been handed back"
    );
    eprintln!(
        "{} deliveries for {n} messages, longest unsettled {longest:?}",
        spans.len()
    );
}
