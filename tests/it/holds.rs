//! Holds that keep their promises: a hold ends only on a real answer to a trial on the
//! route that failed, its trials wait longer each time, no number of hold cycles burns a
//! delivery limit, other 4xx hold instead of dead-lettering, a dead-letter copy no queue
//! takes is never counted as delivered, and shutdown bounds every wait.

use crisp_bridge::sandbox::{Attempt, Fault, Route, RouteStatus};
use crisp_bridge_testkit::{auto_profiles, eventually, header, TestApp, WAIT};
use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use std::time::{Duration, Instant};

/// Quorum delivery limit 3 and a 200 ms retry budget: before holds kept their
/// deliveries, every hold cycle handed the prefetch window back, which counted, and the
/// broker dead-lettered the messages within a few seconds.
const TIGHT: &str = "[amqp]\ndelivery_limit = 3\n[delivery]\nmax_retry_time = \"200ms\"\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"";

fn event_posts(attempts: &[Attempt]) -> Vec<Attempt> {
    attempts
        .iter()
        .filter(|a| a.method == "POST" && a.path.contains("/people/events/"))
        .cloned()
        .collect()
}

/// Event POSTs sorted by arrival.
fn by_arrival(attempts: &[Attempt]) -> Vec<Attempt> {
    let mut posts = event_posts(attempts);
    posts.sort_by_key(|p| p.at_ms);
    posts
}

/// Waits for `trials` event POSTs of a hold's trials, and returns them. A trial is
/// told from a retry by the wait before it: retries wait at most `max_backoff` (50 ms
/// here), the first trial at least 250 ms. (Metrics are shared by every test of the
/// process, so they cannot say when this test's hold began.)
pub async fn trials_after_hold(app: &TestApp, trials: usize) -> Vec<Attempt> {
    let state = app.sandbox.state.clone();
    eventually(&format!("{trials} trial requests"), || {
        let posts = by_arrival(&state.attempts());
        async move {
            let first = posts
                .windows(2)
                .position(|w| w[1].at_ms.saturating_sub(w[0].at_ms) >= 240)?
                + 1;
            (posts.len() >= first + trials).then(|| posts[first..].to_vec())
        }
    })
    .await
}

/// The gaps between consecutive attempts, in ms.
fn gaps(attempts: &[Attempt]) -> Vec<u64> {
    attempts
        .windows(2)
        .map(|w| w[1].at_ms.saturating_sub(w[0].at_ms))
        .collect()
}

/// Asserts the trials' waits grow: each at least the one before (equal jitter keeps
/// trial n in [c/2, c] with c doubling), the last over a second.
fn assert_growing(trials: &[Attempt]) {
    let gaps = gaps(trials);
    for pair in gaps.windows(2) {
        assert!(pair[1] + 50 >= pair[0], "trial waits shrank: {gaps:?} ms");
    }
    assert!(
        gaps.last().is_some_and(|g| *g >= 1000),
        "trial waits did not grow past a second: {gaps:?} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_posts_failing_while_reads_work_burn_no_delivery_limit() {
    let mut app = TestApp::builder("hold-partial")
        .sandbox(auto_profiles())
        .config(TIGHT)
        .start()
        .await;
    // Crisp answers 503 to event POSTs only: its reads (a GET probe) would succeed.
    app.sandbox.state.set_route_status(
        Route::AddEvent,
        Some(RouteStatus {
            status: 503,
            reason: None,
        }),
    );
    let n = 10;
    app.publish_people(n).await;
    let trials = trials_after_hold(&app, 4).await;
    assert!(
        trials.iter().all(|t| t.status == 503),
        "only event POSTs are tried: {trials:?}"
    );
    assert_growing(&trials);
    assert_eq!(app.readyz().await, 200, "an outage keeps the pod ready");
    // Held by the pod, not handed back on each cycle; nothing dead-lettered.
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    app.sandbox.state.set_route_status(Route::AddEvent, None);
    let events = app.events_for_people(n).await;
    assert_eq!(events.len(), n, "each event once");
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_refused_with_403_holds_with_a_growing_backoff() {
    let mut app = TestApp::builder("hold-403")
        .sandbox(auto_profiles())
        .config(TIGHT)
        .start()
        .await;
    app.sandbox.state.set_route_status(
        Route::AddEvent,
        Some(RouteStatus {
            status: 403,
            reason: Some("restricted_route_tier".into()),
        }),
    );
    let n = 5;
    app.publish_people(n).await;
    app.wait_ready(503).await;
    let trials = trials_after_hold(&app, 4).await;
    assert!(trials.iter().all(|t| t.status == 403), "{trials:?}");
    assert_growing(&trials);
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    app.sandbox.state.set_route_status(Route::AddEvent, None);
    app.wait_ready(200).await;
    let events = app.events_for_people(n).await;
    assert_eq!(events.len(), n);
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_4xx_hold_instead_of_dead_lettering() {
    for status in [405, 410, 407, 415] {
        let mut app = TestApp::builder(&format!("hold-{status}"))
            .sandbox(auto_profiles())
            .config(TIGHT)
            .start()
            .await;
        app.sandbox.state.set_route_status(
            Route::AddEvent,
            Some(RouteStatus {
                status,
                reason: None,
            }),
        );
        app.publish_people(3).await;
        app.wait_ready(503).await;
        let trials = trials_after_hold(&app, 1).await;
        assert_eq!(trials[0].status, status);
        assert_eq!(app.broker.ready(&app.names.dlq).await, 0, "{status}");
        app.sandbox.state.set_route_status(Route::AddEvent, None);
        app.events_for_people(3).await;
        app.stop_with_empty_queues().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_quota_holds_with_one_trial_at_a_time() {
    // Retry-After beyond the retry budget: a quota hold; the message stays with the pod.
    let mut app = TestApp::builder("quota")
        .sandbox(auto_profiles())
        .config("[amqp]\ndelivery_limit = 3\n[delivery]\nmax_retry_time = \"1s\"\nmax_backoff = \"100ms\"")
        .start()
        .await;
    app.sandbox.state.push_fault(Fault {
        status: Some(429),
        retry_after: Some("3".into()),
        ..Default::default()
    });
    app.publish_people(3).await;
    app.wait_ready(503).await;
    let why = reqwest::get(format!("http://{}/readyz", app.admin))
        .await
        .expect("readyz")
        .text()
        .await
        .expect("body");
    assert!(why.contains("holding"), "{why}");
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    // After the pause one trial goes, gets through, and the rest follow.
    app.wait_ready(200).await;
    app.events_for_people(3).await;
    let posts = event_posts(&app.sandbox.state.attempts());
    let limited = posts.iter().find(|p| p.status == 429).expect("the 429");
    let again: Vec<&Attempt> = posts.iter().filter(|p| p.path == limited.path).collect();
    assert_eq!(
        again.len(),
        2,
        "one trial, no spinning while held: {posts:?}"
    );
    assert!(
        again[1].at_ms - limited.at_ms >= 3000,
        "the trial waited out Retry-After: {posts:?}"
    );
    assert_eq!(posts.len(), 4, "each of the others once: {posts:?}");
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_dead_letter_queue_is_declared_again_and_the_copy_kept() {
    let mut app = TestApp::builder("dlq-deleted")
        .sandbox(auto_profiles())
        .start()
        .await;
    // Someone deletes the dead-letter queue; its exchange stays.
    app.broker
        .channel
        .queue_delete(app.names.dlq.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the dead-letter queue");
    app.publish("trial.started", b"not json").await;
    // Reading a queue that does not exist would close the test's channel: wait for the
    // bridge to declare it again first. (Not for the dead-letter metric: every app of
    // this process counts into the same one.)
    eventually("the dead-letter queue declared again", || async {
        app.broker.exists(&app.names.dlq).await.then_some(())
    })
    .await;
    // A quorum queue declared a moment ago may not serve a basic.get yet (RabbitMQ 4
    // answers with a connection error): each try on a connection of its own.
    let dead = eventually("the dead letter in the declared-again queue", || async {
        let probe = crisp_bridge_testkit::BrokerClient::connect().await;
        probe
            .channel
            .basic_get(
                app.names.dlq.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(dead.delivery.data, b"not json");
    let reason = dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-crisp-bridge-reason").cloned());
    assert_eq!(
        reason,
        Some(lapin::types::AMQPValue::LongString("invalid_json".into()))
    );
    app.stop_with_empty_queues().await;
}

/// The test's topology as the bridge would declare it, but without a dead-letter queue.
async fn declare_without_dead_letter_queue(app: &TestApp) {
    let names = &app.names;
    let channel = &app.broker.channel;
    let durable = |kind| {
        (
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
        )
    };
    for (exchange, (kind, options)) in [
        (&names.exchange, durable(ExchangeKind::Topic)),
        (&names.dlx, durable(ExchangeKind::Fanout)),
    ] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                options,
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
    }
    let amqp = crisp_bridge::config::AmqpConfig {
        dead_letter_exchange: names.dlx.clone(),
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            names.queue.as_str().into(),
            durable_queue,
            crisp_bridge::broker::main_queue_args(&amqp),
        )
        .await
        .expect("declare queue");
    channel
        .queue_bind(
            names.queue.as_str().into(),
            names.exchange.as_str().into(),
            "trial.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

/// Declares the dead-letter queue and binds it, as an operator fixing the topology would.
async fn add_dead_letter_queue(app: &TestApp) {
    let channel = &app.broker.channel;
    channel
        .queue_declare(
            app.names.dlq.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare dlq");
    channel
        .queue_bind(
            app.names.dlq.as_str().into(),
            app.names.dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind dlq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_nobody_takes_holds_until_a_queue_does() {
    // The bridge declares nothing here; the test's topology has no dead-letter queue.
    let mut app = TestApp::builder("dlq-missing")
        .sandbox(auto_profiles())
        .config("[amqp]\ndeclare = false")
        .start_without_waiting()
        .await;
    let names = app.names.clone();
    declare_without_dead_letter_queue(&app).await;
    app.wait_ready(200).await;
    app.publish("trial.started", b"not json").await;
    app.wait_ready(503).await;
    let why = reqwest::get(format!("http://{}/readyz", app.admin))
        .await
        .expect("readyz")
        .text()
        .await
        .expect("body");
    assert!(why.contains("dead-letter"), "{why}");
    // Not acked, not back in the queue: the pod keeps it while no queue takes copies.
    assert_eq!(app.broker.ready(&names.queue).await, 0);
    // Nothing is sent while dead letters are blocked.
    app.publish("trial.started", crisp_bridge_testkit::TRIAL)
        .await;
    eventually("the event taken by the pod", || async {
        (app.broker.ready(&names.queue).await == 0).then_some(())
    })
    .await;
    assert!(app.sandbox.state.attempts().is_empty());
    // The operator adds the queue: the copy goes there, the hold ends.
    add_dead_letter_queue(&app).await;
    let dead = app.broker.take(&names.dlq, 1).await;
    assert_eq!(dead[0].delivery.data, b"not json");
    app.wait_ready(200).await;
    app.events(1).await;
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refusal_hold_exits_within_shutdown_timeout() {
    let mut app = TestApp::builder("hold-shutdown")
        .sandbox(auto_profiles())
        .replace("timeout = \"2s\"", "timeout = \"30s\"")
        .config("[delivery]\nshutdown_timeout = \"2s\"")
        .start()
        .await;
    let refused = Fault {
        status: Some(403),
        ..Default::default()
    };
    // A refusal, then the hold's trial takes 20 s to be answered, then more refusals.
    app.sandbox.state.push_fault(refused.clone());
    app.sandbox.state.push_fault(Fault {
        delay_ms: 20_000,
        ..refused.clone()
    });
    app.sandbox.state.push_fault(Fault {
        times: 1000,
        ..refused
    });
    app.publish("trial.started", crisp_bridge_testkit::TRIAL)
        .await;
    eventually("the trial in flight", || async {
        (app.sandbox.state.pending_faults() == 1).then_some(())
    })
    .await;
    let started = Instant::now();
    app.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "shutdown took {took:?}; shutdown_timeout is 2 s (plus a second)"
    );
    eventually("the message back in the queue", || async {
        (app.broker.ready(&app.names.queue).await == 1).then_some(())
    })
    .await;
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    assert!(took < WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_block_ends_with_the_last_blocked_copy() {
    // Hand-back after 2.5 s. Crisp rejects this person's events (400); the copy finds no
    // queue. Once the blocked message goes back, nothing else could lift the block: it
    // ends with it, so the redelivery reaches Crisp and tries its dead letter again.
    let mut app = TestApp::builder("dlq-last")
        .sandbox(auto_profiles())
        .config("[amqp]\ndeclare = false\nconsumer_timeout = \"5s\"")
        .start_without_waiting()
        .await;
    declare_without_dead_letter_queue(&app).await;
    app.wait_ready(200).await;
    app.sandbox.state.push_fault(Fault {
        status: Some(400),
        times: 1000,
        people_id: Some("a@b.io".into()),
        ..Default::default()
    });
    app.publish("trial.started", crisp_bridge_testkit::TRIAL)
        .await;
    app.wait_ready(503).await;
    let state = app.sandbox.state.clone();
    eventually("the redelivery posted to Crisp again", || {
        let posts = event_posts(&state.attempts()).len();
        async move { (posts >= 2).then_some(()) }
    })
    .await;
    add_dead_letter_queue(&app).await;
    let dead = app.broker.take(&app.names.dlq, 1).await;
    assert_eq!(dead[0].delivery.data, crisp_bridge_testkit::TRIAL);
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-reason").as_deref(),
        Some("crisp_rejected")
    );
    app.wait_ready(200).await;
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_profile_route_is_tried_with_profile_creations() {
    // Event POSTs work; creating profiles is refused. The hold's trials create the
    // profile; an event POST answering 404 proves nothing about that route.
    let mut app = TestApp::builder("hold-profiles")
        .config("[crisp]\ncreate_missing_profiles = true")
        .start()
        .await;
    app.sandbox.state.set_route_status(
        Route::CreateProfile,
        Some(RouteStatus {
            status: 403,
            reason: Some("restricted_route_tier".into()),
        }),
    );
    app.publish(
        "trial.started",
        br#"{"email":"new@b.io","phase":"started"}"#,
    )
    .await;
    app.wait_ready(503).await;
    let state = app.sandbox.state.clone();
    let creations = eventually("four refused profile creations", || {
        let creations: Vec<Attempt> = state
            .attempts()
            .into_iter()
            .filter(|a| a.method == "POST" && a.path.ends_with("/people/profile"))
            .collect();
        async move { (creations.len() >= 4).then_some(creations) }
    })
    .await;
    assert!(creations.iter().all(|c| c.status == 403), "{creations:?}");
    assert_growing(&creations[1..]);
    assert_eq!(
        event_posts(&app.sandbox.state.attempts()).len(),
        1,
        "trials go to the route that failed"
    );
    assert_eq!(app.readyz().await, 503, "the hold never ended meanwhile");
    app.sandbox
        .state
        .set_route_status(Route::CreateProfile, None);
    let events = app.events(1).await;
    assert_eq!(events[0].people_id, "new@b.io");
    app.wait_ready(200).await;
    app.stop_with_empty_queues().await;
}
