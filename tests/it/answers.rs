//! Hostile or odd answers and careless publishers (issues 7 and 8): reused message ids,
//! redirects, absurd `Retry-After`s, 422s, huge messages, and an outage of any length.

use crisp_bridge::sandbox::Fault;
use crisp_bridge_testkit::{auto_profiles, eventually, header, TestApp, TRIAL};
use lapin::BasicProperties;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_message_id_with_another_body_is_still_sent() {
    let mut app = TestApp::builder("reused-id")
        .sandbox(auto_profiles())
        .start()
        .await;
    let with_id = |id: &str| BasicProperties::default().with_message_id(id.into());
    for (id, phase) in [
        ("order-events", "started"),
        ("order-events", "extended"),
        ("", "ended"),
        ("", "renewed"),
    ] {
        let body = format!(r#"{{"email":"a@b.io","phase":"{phase}"}}"#);
        app.publish_with("trial.started", body.as_bytes(), with_id(id))
            .await;
    }
    let events = app.events(4).await;
    let texts: Vec<&str> = events.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "trial:started",
            "trial:extended",
            "trial:ended",
            "trial:renewed"
        ]
    );
    // A true copy (same id, same body) is still suppressed.
    app.publish_with(
        "trial.started",
        br#"{"email":"a@b.io","phase":"extended"}"#,
        with_id("order-events"),
    )
    .await;
    // The same person's next message runs after the copy in its lane: once it arrived,
    // the copy has been settled.
    app.publish_with(
        "trial.started",
        br#"{"email":"a@b.io","phase":"final"}"#,
        with_id("z"),
    )
    .await;
    let events = app.events(5).await;
    app.stop_with_empty_queues().await;
    assert_eq!(events.len(), 5, "the copy was not posted");
    assert_eq!(events[4].text, "trial:final");
    assert_eq!(app.sandbox.state.events().len(), 5);
}

/// A server that answers every request with `status` and a `Location` elsewhere, and
/// counts the requests.
async fn redirecting_server(
    status: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = stream.read(&mut buf).await;
                let answer = format!("HTTP/1.1 {status}\r\nLocation: http://{addr}/v1/moved\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/v1"), count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_misconfiguration_never_a_success() {
    for status in ["302 Found", "308 Permanent Redirect"] {
        let (api, requests) = redirecting_server(status).await;
        let mut app = TestApp::builder("redirect").api_url(&api).start().await;
        app.publish("trial.started", TRIAL).await;
        app.wait_ready(503).await;
        let why = reqwest::get(format!("http://{}/readyz", app.admin))
            .await
            .expect("readyz")
            .text()
            .await
            .expect("body");
        assert!(why.contains("redirects"), "{why}");
        app.stop().await;
        // Never acked, never dead-lettered: back in the queue for when the config is fixed.
        eventually("the message back in the queue", || async {
            (app.broker.ready(&app.names.queue).await == 1).then_some(())
        })
        .await;
        assert_eq!(app.broker.ready(&app.names.dlq).await, 0, "{status}");
        // One POST and perhaps probes; a followed redirect would add a request per hop.
        assert!(requests.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_retry_after_values_neither_panic_nor_spin() {
    // `1e300` and `-5` are ignored (the backoff applies), `0` is raised to
    // initial_backoff: four attempts in all, none panicking.
    let mut app = TestApp::builder("retry-after")
        .sandbox(auto_profiles())
        .config("[delivery]\ninitial_backoff = \"100ms\"")
        .start()
        .await;
    for value in ["1e300", "0", "-5"] {
        app.sandbox.state.push_fault(Fault {
            status: Some(429),
            retry_after: Some(value.into()),
            ..Default::default()
        });
    }
    app.publish("trial.started", TRIAL).await;
    app.events(1).await;
    assert_eq!(app.sandbox.state.attempts().len(), 4);
    app.stop_with_empty_queues().await;

    // Whether `0` retries at once shows only where nothing else spaces the attempts: after
    // a 429 the pod's paced rate does (a second or more), so here it answers a 503. Its
    // wait is initial_backoff exactly (a Retry-After is not jittered), measured between
    // the two arrivals (ms truncation costs at most 1); honoured as zero it would be a
    // few ms.
    let mut app = TestApp::builder("retry-after-zero")
        .sandbox(auto_profiles())
        .config("[delivery]\ninitial_backoff = \"300ms\"\nmax_backoff = \"1s\"")
        .start()
        .await;
    app.sandbox.state.push_fault(Fault {
        status: Some(503),
        retry_after: Some("0".into()),
        ..Default::default()
    });
    app.publish("trial.started", TRIAL).await;
    app.events(1).await;
    let attempts = app.sandbox.state.attempts();
    assert_eq!(attempts.len(), 2);
    let after_zero = attempts[1].at_ms.saturating_sub(attempts[0].at_ms);
    assert!(
        after_zero >= 299,
        "retried {after_zero} ms after `Retry-After: 0`; initial_backoff is 300 ms"
    );
    app.stop_with_empty_queues().await;

    // A Retry-After too large for any clock used to panic the lane, leaving the pod
    // ready with that person's messages stuck. Now it is clamped (1 hour): the pod
    // holds, and the message waits in the broker.
    let mut app = TestApp::builder("retry-after-huge")
        .sandbox(auto_profiles())
        .config("[delivery]\nmax_retry_time = \"1s\"")
        .start()
        .await;
    app.sandbox.state.push_fault(Fault {
        status: Some(429),
        retry_after: Some("18446744073709551615".into()),
        ..Default::default()
    });
    app.publish("trial.started", TRIAL).await;
    app.wait_ready(503).await;
    app.stop().await;
    eventually("the message back in the queue", || async {
        (app.broker.ready(&app.names.queue).await == 1).then_some(())
    })
    .await;
    assert_eq!(app.sandbox.state.attempts().len(), 1, "held, not spinning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_422_is_rescheduled_unless_its_reason_is_invalid_input() {
    let mut app = TestApp::builder("unprocessable")
        .sandbox(auto_profiles())
        .start()
        .await;
    // Any other reason: retried like a 429, then delivered.
    app.sandbox.state.push_fault(Fault {
        status: Some(422),
        body: Some(r#"{"error":true,"reason":"route_busy","data":{}}"#.into()),
        times: 2,
        ..Default::default()
    });
    app.publish("trial.started", TRIAL).await;
    app.events(1).await;
    assert_eq!(app.sandbox.state.attempts().len(), 3);
    // `invalid_data`: dead-lettered at once.
    app.sandbox.state.push_fault(Fault {
        status: Some(422),
        body: Some(r#"{"error":true,"reason":"invalid_data","data":{}}"#.into()),
        ..Default::default()
    });
    app.publish("trial.started", br#"{"email":"a@b.io","phase":"ended"}"#)
        .await;
    let dead = app.broker.take(&app.names.dlq, 1).await;
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-reason").as_deref(),
        Some("crisp_rejected")
    );
    app.stop().await;
    assert_eq!(app.sandbox.state.attempts().len(), 4);
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_bytes_is_dead_lettered_unparsed() {
    let mut app = TestApp::builder("too-large")
        .sandbox(auto_profiles())
        .config("[amqp]\nmax_message_bytes = 1000")
        .start()
        .await;
    let big = format!(
        r#"{{"email":"a@b.io","phase":"started","pad":"{}"}}"#,
        "x".repeat(2000)
    );
    app.publish("trial.started", big.as_bytes()).await;
    app.publish("trial.started", TRIAL).await;
    let dead = app.broker.take(&app.names.dlq, 1).await;
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-reason").as_deref(),
        Some("too_large")
    );
    assert_eq!(dead[0].delivery.data, big.as_bytes(), "the body is kept");
    assert!(header(&dead[0], "x-crisp-bridge-detail")
        .unwrap_or_default()
        .contains("max_message_bytes"));
    app.events(1).await;
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_any_length_dead_letters_nothing() {
    // Delivery limit 2 and a retry budget of 200 ms: before the outage hold, each
    // message was requeued every 200 ms and dead-lettered by the broker on its third
    // delivery. Now the pod keeps its deliveries and sends one trial at a time until
    // Crisp is back.
    let mut app = TestApp::builder("outage")
        .sandbox(auto_profiles())
        .config("[amqp]\ndelivery_limit = 2\n[delivery]\nmax_retry_time = \"200ms\"\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"")
        .start()
        .await;
    app.sandbox.state.set_down(Some(503));
    for phase in ["a", "b", "c"] {
        let body = format!(r#"{{"email":"{phase}@b.io","phase":"{phase}"}}"#);
        app.publish("trial.started", body.as_bytes()).await;
    }
    // Well past the three deliveries the limit allows, had the messages kept cycling:
    // several trials must have failed.
    let trials = crate::holds::trials_after_hold(&app, 3).await;
    assert!(trials.iter().all(|t| t.status == 503), "{trials:?}");
    assert_eq!(
        app.broker.ready(&app.names.queue).await,
        0,
        "kept by the pod"
    );
    assert_eq!(app.readyz().await, 200, "an outage keeps the pod ready");
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    app.sandbox.state.set_down(None);
    app.events(3).await;
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_file_is_picked_up_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("crisp-bridge-rotate-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key_file = dir.join("crisp-key");
    // The Secret still holds the revoked key when the bridge starts.
    std::fs::write(&key_file, "revoked-key\n").expect("write key");
    let mut app = TestApp::builder("rotate")
        .sandbox(auto_profiles())
        .replace(
            &format!("key = \"{}\"", crisp_bridge::sandbox::DEFAULT_KEY),
            &format!("key_file = \"{}\"", key_file.display()),
        )
        .start()
        .await;
    app.publish("trial.started", TRIAL).await;
    app.wait_ready(503).await;
    assert!(app.sandbox.state.events().is_empty());
    // Kubernetes updates the mounted Secret: the next probe reads it.
    std::fs::write(
        &key_file,
        format!("{}\n", crisp_bridge::sandbox::DEFAULT_KEY),
    )
    .expect("rotate key");
    app.events(1).await;
    app.wait_ready(200).await;
    app.stop_with_empty_queues().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_all_exported_from_start_with_help() {
    // A child process: in this one every in-process app shares one recorder, so samples
    // other tests caused would pass for samples exported from start.
    let env = TestApp::builder("metrics-start").env().await;
    let mut bridge = env
        .spawn(
            std::path::Path::new(env!("CARGO_BIN_EXE_crisp-bridge")),
            &[],
        )
        .await;
    let body = bridge.metrics().await;
    for name in [
        "crisp_bridge_messages_total",
        "crisp_bridge_dead_letters_total",
        "crisp_bridge_crisp_requests_total",
        "crisp_bridge_crisp_request_duration_seconds",
        "crisp_bridge_in_flight",
        "crisp_bridge_retries_total",
        "crisp_bridge_fields_stripped_total",
        "crisp_bridge_data_key_collisions_total",
        "crisp_bridge_build_info",
        "crisp_bridge_message_age_seconds",
        "crisp_bridge_crisp_refused",
        "crisp_bridge_crisp_outage_hold",
        "crisp_bridge_rate_limit_hold",
        "crisp_bridge_lane_panics_total",
        "crisp_bridge_tap_dropped_total",
    ] {
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "{name} has no HELP line:\n{body}"
        );
        assert!(
            body.lines()
                .any(|l| l.starts_with(name) && !l.starts_with('#')),
            "{name} has no sample:\n{body}"
        );
    }
    assert!(body.contains(r#"crisp_bridge_messages_total{rule="trial",outcome="delivered"}"#));
    assert!(body.contains(&format!(
        r#"crisp_bridge_build_info{{version="{}",revision="#,
        env!("CARGO_PKG_VERSION")
    )));
    bridge.signal("TERM");
    assert!(bridge.wait_exit().await.success());
}
