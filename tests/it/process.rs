//! The real binary as a child process: environment overrides, signals, crashes,
//! metrics after a run, and logs that never hold secrets.

use crisp_bridge::sandbox::{Fault, SandboxOptions, DEFAULT_KEY};
use crisp_bridge_testkit::{
    amqp_url, amqp_url_via, broker_addr, eventually, metric, Bridge, Proxy, TestApp, TestEnv,
};
use serde_json::json;
use std::path::Path;

const KEY: &str = "k3y-Sup3r-S3cret-9f8e7d";

/// Queues, a sandbox that takes `KEY`, and the standard config with `key_in_file`.
async fn child_env(test: &str, key_in_file: &str) -> TestEnv {
    TestApp::builder(test)
        .sandbox(SandboxOptions {
            key: KEY.into(),
            auto_create_profiles: true,
            ..Default::default()
        })
        .replace(
            &format!("key = \"{DEFAULT_KEY}\""),
            &format!("key = \"{key_in_file}\""),
        )
        .env()
        .await
}

/// This build's binary on the test's config.
async fn spawn(env: &TestEnv, envs: &[(&str, &str)]) -> Bridge {
    env.spawn(Path::new(env!("CARGO_BIN_EXE_crisp-bridge")), envs)
        .await
}

async fn publish(env: &TestEnv, routing_key: &str, body: serde_json::Value) {
    env.publish(routing_key, body.to_string().as_bytes()).await;
}

/// Waits until every one of the `n` people got at least one event; returns the duplicates.
async fn all_delivered(env: &TestEnv, n: usize) -> usize {
    env.events_for_people(n).await.len() - n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_overrides_the_key_from_the_file() {
    let setup = child_env("env-key", "wrong-key-in-file").await;
    let mut bridge = spawn(&setup, &[("CRISP_BRIDGE_CRISP__KEY", KEY)]).await;
    setup.publish_trials(1).await;
    assert_eq!(all_delivered(&setup, 1).await, 0);
    bridge.signal("TERM");
    assert!(bridge.wait_exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_logs_hold_no_secrets() {
    let setup = child_env("metrics", KEY).await;
    let mut bridge = spawn(&setup, &[]).await;
    setup.sandbox.state.push_fault(Fault {
        status: Some(503),
        ..Default::default()
    });
    setup.publish_trials(3).await;
    all_delivered(&setup, 3).await;
    setup.sandbox.state.push_fault(Fault {
        status: Some(400),
        ..Default::default()
    });
    publish(
        &setup,
        "trial.started",
        json!({"email": "rejected.person@example.com", "phase": "x"}),
    )
    .await;
    publish(
        &setup,
        "order.created",
        json!({"status": "paid", "email": "bad person@example.com"}),
    )
    .await;
    publish(
        &setup,
        "order.created",
        json!({"status": "open", "email": "skipped.person@example.com"}),
    )
    .await;
    publish(&setup, "trial.started", json!({"email": "stripped.person@example.com", "phase": "y", "account": {"id": 1, "password": "hunter2"}})).await;
    all_delivered(&setup, 4).await;
    setup.broker.take(&setup.names.dlq, 2).await;
    let body = eventually("the metrics to settle", || async {
        let body = bridge.metrics().await;
        (metric(
            &body,
            "crisp_bridge_messages_total",
            r#"rule="none",outcome="skipped""#,
        ) == Some(1.0))
        .then_some(body)
    })
    .await;
    let count = |name: &str, labels: &str| metric(&body, name, labels).unwrap_or(0.0);
    assert_eq!(
        count(
            "crisp_bridge_messages_total",
            r#"rule="trial",outcome="delivered""#
        ),
        4.0,
        "{body}"
    );
    assert_eq!(
        count(
            "crisp_bridge_messages_total",
            r#"rule="trial",outcome="dead_lettered""#
        ),
        1.0
    );
    assert_eq!(
        count(
            "crisp_bridge_messages_total",
            r#"rule="order-created",outcome="dead_lettered""#
        ),
        1.0
    );
    assert_eq!(
        count(
            "crisp_bridge_dead_letters_total",
            r#"rule="trial",reason="crisp_rejected""#
        ),
        1.0
    );
    assert_eq!(
        count(
            "crisp_bridge_dead_letters_total",
            r#"rule="order-created",reason="invalid_people_id""#
        ),
        1.0
    );
    assert_eq!(
        count("crisp_bridge_crisp_requests_total", r#"status="200""#),
        4.0
    );
    assert_eq!(
        count("crisp_bridge_crisp_requests_total", r#"status="503""#),
        1.0
    );
    assert_eq!(
        count("crisp_bridge_crisp_requests_total", r#"status="400""#),
        1.0
    );
    assert_eq!(count("crisp_bridge_crisp_requests_today", ""), 6.0);
    assert_eq!(count("crisp_bridge_retries_total", ""), 1.0);
    assert_eq!(
        count("crisp_bridge_fields_stripped_total", r#"rule="trial""#),
        1.0
    );
    assert_eq!(count("crisp_bridge_in_flight", ""), 0.0);
    assert_eq!(
        count("crisp_bridge_crisp_request_duration_seconds_count", ""),
        6.0
    );
    bridge.signal("TERM");
    assert!(bridge.wait_exit().await.success());

    let logs = bridge.output();
    assert!(
        logs.contains("dead-lettered a message"),
        "one line per dead letter:\n{logs}"
    );
    assert!(!logs.contains(KEY), "the Crisp key leaked into the logs");
    assert!(
        !logs.contains("guest:guest"),
        "the AMQP password leaked into the logs"
    );
    for email in [
        "person0@example.com",
        "rejected.person@example.com",
        "bad person@example.com",
        "stripped.person@example.com",
    ] {
        assert!(
            !logs.contains(email),
            "full email {email} in the logs:\n{logs}"
        );
    }
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON log line: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_nothing_and_duplicates_nothing() {
    let setup = child_env("sigterm", KEY).await;
    setup
        .sandbox
        .state
        .set_latency(std::time::Duration::from_millis(50));
    let mut bridge = spawn(&setup, &[]).await;
    let n = 60;
    setup.publish_trials(n).await;
    let state = setup.sandbox.state.clone();
    eventually("a few events", || {
        let len = state.events().len();
        async move { (len >= 3).then_some(()) }
    })
    .await;
    bridge.signal("TERM");
    assert!(bridge.wait_exit().await.success(), "exit 0 on SIGTERM");
    let delivered = setup.sandbox.state.events().len();
    let back = setup.broker.ready(&setup.names.queue).await as usize;
    assert_eq!(
        delivered + back,
        n,
        "delivered {delivered} + back in queue {back}"
    );
    let mut again = spawn(&setup, &[]).await;
    let duplicates = all_delivered(&setup, n).await;
    eprintln!("SIGTERM mid-stream: published {n}, delivered {n}, lost 0, duplicates {duplicates}");
    assert_eq!(duplicates, 0);
    again.signal("TERM");
    assert!(again.wait_exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let setup = child_env("sigkill", KEY).await;
    setup
        .sandbox
        .state
        .set_latency(std::time::Duration::from_millis(20));
    let mut bridge = spawn(&setup, &[]).await;
    let n = 60;
    setup.publish_trials(n).await;
    let state = setup.sandbox.state.clone();
    eventually("a few events", || {
        let len = state.events().len();
        async move { (len >= 5).then_some(()) }
    })
    .await;
    bridge.signal("KILL");
    bridge.wait_exit().await;
    let mut again = spawn(&setup, &[]).await;
    let duplicates = all_delivered(&setup, n).await;
    eprintln!("SIGKILL mid-stream: published {n}, delivered {n}, lost 0, duplicates {duplicates}");
    again.signal("TERM");
    assert!(again.wait_exit().await.success());
    assert_eq!(setup.broker.ready(&setup.names.queue).await, 0);
    assert_eq!(setup.broker.ready(&setup.names.dlq).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_the_broker_keeps_the_message() {
    let setup = child_env("second-signal", KEY).await;
    // Crisp answers after 20 s: the first SIGTERM would wait shutdown_timeout (5 s).
    setup
        .sandbox
        .state
        .set_latency(std::time::Duration::from_secs(20));
    let mut bridge = spawn(&setup, &[]).await;
    setup.publish_trials(1).await;
    // Its request in flight (not merely prefetched, which a graceful stop hands back at
    // once with exit 0).
    eventually("the request in flight", || async {
        let metrics = bridge.metrics().await;
        metrics
            .lines()
            .any(|l| l == "crisp_bridge_in_flight 1")
            .then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    bridge.signal("TERM");
    // Signals sent before the first is taken coalesce into one (the kernel's pending set,
    // and tokio's stream): the second goes once the bridge says it took the first.
    eventually("the first signal taken", || async {
        bridge.output().contains("shutdown requested").then_some(())
    })
    .await;
    bridge.signal("TERM");
    let status = bridge.wait_exit().await;
    assert_eq!(
        status.code(),
        Some(130),
        "exit at once on the second signal"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    // The unacked message went back to the queue with the connection.
    eventually("the message back in the queue", || async {
        (setup.broker.ready(&setup.names.queue).await == 1).then_some(())
    })
    .await;
    assert!(setup.sandbox.state.events().is_empty());
}

/// Replaces a file as a Kubernetes Secret volume does: never half written.
fn write_atomically(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_url_file_that_does_not_parse_never_shows_its_password() {
    let mut setup = child_env("url-file", KEY).await;
    let proxy = Proxy::start(broker_addr().await).await;
    let good = amqp_url_via(proxy.addr).await;
    let url_file = setup.config.temp_path().with_extension("url");
    write_atomically(&url_file, &good);
    // Read before each connection, so the rotation below reaches the next reconnect.
    setup.config = setup.config.clone().replace(
        &format!("url = \"{}\"", amqp_url().await),
        &format!("url_file = \"{}\"", url_file.display()),
    );
    let mut bridge = spawn(&setup, &[]).await;
    setup.publish_trials(1).await;
    all_delivered(&setup, 1).await;

    // The rotation goes wrong: no `//` after the scheme (lapin's parser then quotes the
    // URL whole), and a password with the `=` and `/` that cut an email-like word short.
    const PASSWORD: &str = "Kq42-canary=Zzbf/7x";
    const PIECES: [&str; 3] = ["Kq42", "canary", "Zzbf"];
    write_atomically(
        &url_file,
        &format!("amqp:guest:{PASSWORD}@{}/%2f", proxy.addr),
    );
    assert!(
        proxy.cut() > 0,
        "the bridge was connected through the proxy"
    );
    eventually("a failed reconnect in the log", || {
        let logs = bridge.output();
        async move {
            logs.contains("cannot connect to RabbitMQ; retrying")
                .then_some(())
        }
    })
    .await;
    publish(
        &setup,
        "trial.started",
        json!({"email": "person1@example.com", "phase": "started"}),
    )
    .await;
    let logs = bridge.output();
    for piece in PIECES {
        assert!(
            !logs.contains(piece),
            "`{piece}` of the password in the log:\n{logs}"
        );
    }
    let line = logs
        .lines()
        .find(|l| l.contains("cannot connect to RabbitMQ; retrying"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("amqp.url_file ({})", url_file.display()))
            && line.contains("does not parse")
            && line.contains("@host:5672/vhost"),
        "the line says what failed, where, and what to do: {line}"
    );

    // Fixed again: the bridge reconnects and delivers what waited, nothing lost (the
    // first message may come twice: its ack may have died with the connection).
    write_atomically(&url_file, &good);
    all_delivered(&setup, 2).await;
    bridge.wait_ready().await;
    eventually("the queue drained", || async {
        (setup.broker.ready(&setup.names.queue).await == 0).then_some(())
    })
    .await;
    bridge.signal("TERM");
    assert!(bridge.wait_exit().await.success());
    assert_eq!(setup.broker.ready(&setup.names.dlq).await, 0);
    let logs = bridge.output();
    for piece in PIECES {
        assert!(
            !logs.contains(piece),
            "`{piece}` of the password in the log:\n{logs}"
        );
    }
    let _ = std::fs::remove_file(&url_file);
}
