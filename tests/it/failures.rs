//! Crisp failing in every way DESIGN lists, and the broker going away.

use crisp_bridge::sandbox::{Fault, Sandbox};
use crisp_bridge_testkit::{
    amqp_url_via, auto_profiles, broker_addr, eventually, header, Proxy, SilentNode, TestApp, TRIAL,
};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn fault(status: u16, times: u32) -> Fault {
    Fault {
        status: Some(status),
        times,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crisp_400_is_a_dead_letter() {
    let mut app = TestApp::builder("crisp-400")
        .sandbox(auto_profiles())
        .start()
        .await;
    app.sandbox.state.push_fault(fault(400, 1));
    app.publish("trial.started", TRIAL).await;
    let dead = app.broker.take(&app.names.dlq, 1).await;
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-reason").as_deref(),
        Some("crisp_rejected")
    );
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-rule").as_deref(),
        Some("trial")
    );
    assert!(header(&dead[0], "x-crisp-bridge-detail")
        .unwrap_or_default()
        .contains("invalid_data"));
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    assert_eq!(
        app.sandbox.state.attempts().len(),
        1,
        "a 400 is not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_crisp_accepts() {
    let mut app = TestApp::builder("crisp-5xx")
        .sandbox(auto_profiles())
        .start()
        .await;
    app.sandbox.state.push_fault(fault(503, 2));
    app.sandbox.state.push_fault(Fault {
        status: Some(502),
        body: Some("<html>Bad gateway</html>".into()),
        ..Default::default()
    });
    app.publish("trial.started", TRIAL).await;
    let events = app.events(1).await;
    assert_eq!(events[0].text, "trial:started");
    let statuses: Vec<u16> = app
        .sandbox
        .state
        .attempts()
        .iter()
        .map(|a| a.status)
        .collect();
    assert_eq!(statuses, vec![503, 503, 502, 200]);
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_honour_retry_after_beyond_max_backoff() {
    // max_backoff is 200ms in tests; Retry-After: 3 must still be waited out. 3 s, because
    // a rate limit's cut alone spaces requests by up to 2 s (the paced rate's floor).
    let mut app = TestApp::builder("crisp-429")
        .sandbox(auto_profiles())
        .start()
        .await;
    app.sandbox.state.push_fault(Fault {
        status: Some(429),
        retry_after: Some("3".into()),
        ..Default::default()
    });
    app.sandbox.state.push_fault(Fault {
        status: Some(420),
        retry_after: Some("3".into()),
        ..Default::default()
    });
    app.publish("trial.started", TRIAL).await;
    app.events(1).await;
    let attempts = app.sandbox.state.attempts();
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![429, 420, 200]);
    // Each wait measured between two arrivals (ms truncation costs at most 1).
    let gaps: Vec<u64> = attempts
        .windows(2)
        .map(|w| w[1].at_ms.saturating_sub(w[0].at_ms))
        .collect();
    assert!(
        gaps.iter().all(|&g| g >= 2999),
        "two Retry-After: 3 waits, gaps {gaps:?} ms"
    );
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crisp_unreachable_then_back() {
    // A port that refuses connections: bind, note it, release it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let api = format!("http://127.0.0.1:{port}/v1");
    let mut app = TestApp::builder("unreachable").api_url(&api).start().await;
    app.publish("trial.started", TRIAL).await;
    // The message is being retried: it is neither in the queue nor dead-lettered.
    eventually("the message to be taken", || async {
        (app.broker.ready(&app.names.queue).await == 0).then_some(())
    })
    .await;
    let sandbox = Sandbox::start(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        auto_profiles(),
    )
    .await
    .expect("sandbox on the refused port");
    let state = sandbox.state.clone();
    let events = eventually("the event once Crisp is back", || {
        let events = state.events();
        async move { (!events.is_empty()).then_some(events) }
    })
    .await;
    assert_eq!(events.len(), 1);
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_pause_everything_and_dead_letter_nothing() {
    let mut app = TestApp::builder("refused")
        .sandbox(auto_profiles())
        .start()
        .await;
    app.sandbox.state.set_refuse(true);
    for i in 0..5 {
        app.publish(
            "trial.started",
            json!({"email": format!("p{i}@b.io"), "phase": "started"})
                .to_string()
                .as_bytes(),
        )
        .await;
    }
    app.wait_ready(503).await;
    // The pod keeps every message (handing them back would count against their
    // delivery limit on each cycle), sends one trial at a time, dead-letters nothing.
    let trials = crate::holds::trials_after_hold(&app, 2).await;
    assert!(trials.iter().all(|t| t.status == 401), "{trials:?}");
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    // The key is fixed: the bridge notices by itself and delivers everything.
    app.sandbox.state.set_refuse(false);
    app.wait_ready(200).await;
    let events = app.events(5).await;
    assert_eq!(events.len(), 5);
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_in_flight_and_requeues_the_rest() {
    let mut app = TestApp::builder("shutdown")
        .sandbox(auto_profiles())
        .config("[delivery]\nconcurrency = 2")
        .start()
        .await;
    app.sandbox.state.set_latency(Duration::from_millis(200));
    let n = 20;
    app.publish_people(n).await;
    app.events(1).await;
    app.stop().await;
    let delivered = app.sandbox.state.events().len();
    let back = app.broker.ready(&app.names.queue).await as usize;
    assert_eq!(
        delivered + back,
        n,
        "every message is delivered or back in the queue ({delivered} + {back})"
    );
    assert!(
        back > 0,
        "a 200ms Crisp cannot have taken all {n} in the test's time"
    );
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_cut_mid_stream_loses_nothing() {
    let proxy = Proxy::start(broker_addr().await).await;
    let url = amqp_url_via(proxy.addr).await;
    let mut app = TestApp::builder("cut")
        .sandbox(auto_profiles())
        .config(&format!("[amqp]\nurl = \"{url}\""))
        .start()
        .await;
    app.sandbox.state.set_latency(Duration::from_millis(20));
    let n = 30;
    app.publish_people(n).await;
    app.events(5).await;
    assert!(
        proxy.cut() > 0,
        "the bridge was connected through the proxy"
    );
    app.wait_ready(200).await;
    let events = app.events_for_people(n).await;
    let duplicates = events.len() - n;
    eprintln!("connection cut: {n} published, {n} delivered, {duplicates} duplicate(s)");
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    // Redeliveries of messages whose ack died with the connection may still wait in
    // the queue when we stop; they are copies of delivered messages, not lost ones.
    only_copies_left(&app, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crisp_down_for_a_while_then_everything_arrives() {
    let mut app = TestApp::builder("crisp-down")
        .sandbox(auto_profiles())
        .start()
        .await;
    app.sandbox.state.push_fault(fault(503, 40));
    let n = 10;
    app.publish_people(n).await;
    // Pods stay ready while Crisp fails: restarting would not help.
    assert_eq!(app.readyz().await, 200);
    let events = app.events(n).await;
    assert_eq!(events.len(), n, "each message posted once");
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_slows_down_but_loses_and_duplicates_nothing() {
    let mut app = TestApp::builder("storm")
        .sandbox(auto_profiles())
        .start()
        .await;
    app.sandbox.state.push_fault(fault(429, 30));
    app.sandbox.state.push_fault(fault(420, 10));
    let n = 20;
    app.publish_people(n).await;
    let published_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let events = app.events_for_people(n).await;
    let distinct: std::collections::HashSet<_> = events.iter().map(|e| &e.people_id).collect();
    assert_eq!(
        (events.len(), distinct.len()),
        (n, n),
        "every message exactly once"
    );
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);

    // The storm was served whole: the first 40 event POSTs got its 40 answers.
    assert_eq!(
        app.sandbox.state.pending_faults(),
        0,
        "faults left unserved"
    );
    let mut posts: Vec<_> = app
        .sandbox
        .state
        .attempts()
        .into_iter()
        .filter(|a| a.method == "POST" && a.path.contains("/people/events/"))
        .collect();
    posts.sort_by_key(|a| a.at_ms);
    let served = |status| posts.iter().filter(|a| a.status == status).count();
    assert_eq!((served(429), served(420)), (30, 10), "{posts:?}");
    assert_eq!(
        posts.len(),
        40 + n,
        "each message accepted once, after the storm"
    );
    // And the pod slowed down: the storm begins with the first request, and from then on
    // the paced rate (cut to its floor of one request every 2 s, then growing back)
    // spaces what the backoff alone would send at once: in the second after the last
    // publish, with every other person's message waiting, at most two requests went.
    let start = posts[0].at_ms.max(published_ms);
    let in_that_second = posts
        .iter()
        .filter(|a| a.at_ms > start && a.at_ms <= start + 1000)
        .count();
    assert!(
        in_that_second <= 2,
        "{in_that_second} requests in the second after {start} (first 429 at {}): {:?}",
        posts[0].at_ms,
        posts.iter().map(|a| a.at_ms).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_never_gets_through_ends_in_the_dead_letter_queue() {
    // Quorum queue delivery limit 2: after its third failed delivery the broker
    // dead-letters the message to the same dead-letter queue. It fails alone, while
    // other people's events get through (when nothing does, it is an outage: a hold).
    let mut app = TestApp::builder("poison")
        .sandbox(auto_profiles())
        .config("[amqp]\ndelivery_limit = 2\n[delivery]\nmax_retry_time = \"150ms\"\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"")
        .start()
        .await;
    app.sandbox.state.push_fault(Fault {
        people_id: Some("a@b.io".into()),
        ..fault(500, 10_000)
    });
    app.publish("trial.started", TRIAL).await;
    let others = tokio::spawn({
        let broker = crisp_bridge_testkit::BrokerClient::connect().await;
        let exchange = app.names.exchange.clone();
        async move {
            for i in 0.. {
                let body = json!({"email": format!("ok{i}@b.io"), "phase": "started"});
                broker
                    .publish(
                        &exchange,
                        "trial.started",
                        body.to_string().as_bytes(),
                        Default::default(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let dead = app.broker.take(&app.names.dlq, 1).await;
    assert_eq!(dead[0].delivery.data, TRIAL);
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-reason"),
        None,
        "dead-lettered by the broker, not by us"
    );
    let deaths = dead[0]
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned());
    assert!(deaths.is_some(), "the broker's x-death header is there");
    others.abort();
    app.stop().await;
    assert!(app
        .sandbox
        .state
        .events()
        .iter()
        .all(|e| e.people_id != "a@b.io"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_id_is_not_posted_twice() {
    let mut app = TestApp::builder("dedup")
        .sandbox(auto_profiles())
        .start()
        .await;
    let props = || lapin::BasicProperties::default().with_message_id("evt-42".into());
    app.publish_with("trial.started", TRIAL, props()).await;
    app.events(1).await;
    app.publish_with("trial.started", TRIAL, props()).await;
    // A different id for the same person is a new event.
    app.publish_with(
        "trial.started",
        br#"{"email":"a@b.io","phase":"ended"}"#,
        lapin::BasicProperties::default().with_message_id("evt-43".into()),
    )
    .await;
    let events = app.events(2).await;
    app.stop().await;
    assert_eq!(app.sandbox.state.events().len(), 2, "{events:?}");
    assert_eq!(
        app.broker.ready(&app.names.queue).await,
        0,
        "the duplicate was acked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_node_is_tried_when_one_is_down() {
    // Three nodes: the first refuses connections, the other two (proxies to the broker)
    // work. The bridge starts on the second; when that node dies it moves to the third.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let second = Proxy::start(broker_addr().await).await;
    let third = Proxy::start(broker_addr().await).await;
    let urls = [
        amqp_url_via(dead).await,
        amqp_url_via(second.addr).await,
        amqp_url_via(third.addr).await,
    ];
    let mut app = TestApp::builder("three-nodes")
        .sandbox(auto_profiles())
        .config(&format!(
            "[amqp]\nurls = [\"{}\", \"{}\", \"{}\"]",
            urls[0], urls[1], urls[2]
        ))
        .start()
        .await;
    app.publish("trial.started", TRIAL).await;
    app.events(1).await;
    let died = Instant::now();
    drop(second);
    app.publish(
        "trial.started",
        br#"{"email":"after@b.io","phase":"started"}"#,
    )
    .await;
    let state = app.sandbox.state.clone();
    eventually("the event published after the node died", || {
        let events = state.events();
        async move {
            events
                .iter()
                .any(|e| e.people_id == "after@b.io")
                .then_some(())
        }
    })
    .await;
    assert!(
        died.elapsed() < Duration::from_secs(10),
        "consuming again {:?} after its node died",
        died.elapsed()
    );
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_noticed_by_heartbeats_and_the_next_node_is_used() {
    // The first node goes silent (the proxy freezes: nothing passes, nothing closes), as
    // a frozen VM or a network dropping packets looks. With 1 s heartbeats the bridge
    // gives that connection up after two missed ones and consumes through the second.
    let silent = Proxy::start(broker_addr().await).await;
    let second = Proxy::start(broker_addr().await).await;
    let urls = [
        amqp_url_via(silent.addr).await,
        amqp_url_via(second.addr).await,
    ];
    let mut app = TestApp::builder("silent-node")
        .sandbox(auto_profiles())
        .config(&format!(
            "[amqp]\nheartbeat = \"1s\"\nurls = [\"{}\", \"{}\"]",
            urls[0], urls[1]
        ))
        .start()
        .await;
    let n = 20;
    app.publish_people(n / 2).await;
    app.events(n / 2).await;
    assert_eq!(
        (silent.accepted(), second.accepted()),
        (1, 0),
        "the bridge consumes through the first node"
    );
    silent.freeze();
    let froze = Instant::now();
    // Published while the first node is silent: nobody can take them until the bridge
    // is on the second.
    for i in n / 2..n {
        let body = json!({"email": format!("p{i}@b.io"), "phase": "started"}).to_string();
        let props = lapin::BasicProperties::default().with_message_id(format!("evt-{i}").into());
        app.publish_with("trial.started", body.as_bytes(), props)
            .await;
    }
    let state = app.sandbox.state.clone();
    eventually("an event through the second node", || {
        let events = state.events();
        async move {
            events
                .iter()
                .any(|e| e.people_id == format!("p{}@b.io", n / 2))
                .then_some(())
        }
    })
    .await;
    let took = froze.elapsed();
    eprintln!("silent node: consuming through the next node {took:.2?} after the freeze");
    assert!(
        second.accepted() >= 1,
        "the bridge moved to the second node"
    );
    // Two missed 1 s heartbeats, then the reconnect, with slack for a loaded machine.
    assert!(
        took < Duration::from_secs(5),
        "the silent node was noticed only after {took:?}"
    );
    let events = app.events_for_people(n).await;
    eprintln!(
        "silent node: {n} published, {n} delivered, {} duplicate(s)",
        events.len() - n
    );
    app.stop().await;
    silent.thaw();
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    // What the silent connection held unacked went back to the queue when the broker
    // gave up on it; if that was after the stop, those are copies of delivered messages.
    only_copies_left(&app, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_silent_from_the_first_byte_is_given_up_and_the_next_node_is_used() {
    // The first node takes the TCP connection and never answers nor closes (not even
    // after RabbitMQ's 10 s handshake timeout, as a frozen proxy in front of a broker
    // would): the AMQP handshake would wait forever, as heartbeats start only after it.
    // The bridge (a child, so its threads can be counted) gives the attempt up after two
    // heartbeats (at least 5 s), closes that socket and consumes through the second node.
    let silent = SilentNode::start().await;
    let second = Proxy::start(broker_addr().await).await;
    let urls = [
        format!("amqp://guest:guest@{}/%2f", silent.addr),
        amqp_url_via(second.addr).await,
    ];
    let env = TestApp::builder("silent-from-start")
        .sandbox(auto_profiles())
        .config(&format!(
            "[amqp]\nheartbeat = \"1s\"\nurls = [\"{}\", \"{}\"]",
            urls[0], urls[1]
        ))
        .env()
        .await;
    let began = Instant::now();
    let bridge = env
        .spawn(Path::new(env!("CARGO_BIN_EXE_crisp-bridge")), &[])
        .await;
    env.publish_people(5).await;
    env.events_for_people(5).await;
    let took = began.elapsed();
    eprintln!("silent from the first byte: consuming through the next node after {took:.2?}");
    assert_eq!(silent.accepted(), 1, "the silent node was tried first");
    assert!(
        second.accepted() >= 1,
        "the bridge moved to the second node"
    );
    // The 5 s floor of the setup bound, start-up and 5 events, with slack.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    // The abandoned attempt's I/O thread ended with its socket: one connection, one
    // thread (lapin runs each connection's I/O on a thread of its own).
    eventually("one lapin I/O thread left in the bridge", || async {
        (bridge.io_loop_threads() == 1).then_some(())
    })
    .await;
    assert_eq!(silent.accepted(), 1, "the silent node was not tried again");
    bridge.stop().await;
}

/// What is left in the queue after the stop is only copies of the `n` published messages
/// (`evt-0` … `evt-{n-1}`): redeliveries of delivered ones, never others.
async fn only_copies_left(app: &TestApp, n: usize) {
    while let Some(left) = app.broker.get(&app.names.queue).await {
        let id = left
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let i: usize = id
            .trim_start_matches("evt-")
            .parse()
            .expect("a test message id");
        assert!(i < n, "unexpected message {id}");
    }
}
