//! `GET /tap` and `crisp-bridge tap`: each message's decision, live, as a JSON line,
//! without bodies or full emails; filters; a reader that stops reading never slows
//! delivery, and what it could not take is counted.

use crisp_bridge::sandbox::Fault;
use crisp_bridge_testkit::{
    auto_profiles, eventually, eventually_within, free_port, metric, TestApp, LOAD_RULES,
};
use serde_json::{json, Value};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const DROPPED: &str = "crisp_bridge_tap_dropped_total";

/// Lines a reader got so far, shared with the task reading them.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn parsed(&self) -> Vec<Value> {
        self.all()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Waits for a line with these fields, and returns it.
    async fn wait_for(&self, fields: Value) -> Value {
        let wanted = fields.as_object().unwrap().clone();
        eventually(&format!("a tap line with {fields}"), || {
            let found = self.parsed().into_iter().find(|line| {
                wanted
                    .iter()
                    .all(|(key, value)| line.get(key) == Some(value))
            });
            async move { found }
        })
        .await
    }
}

/// `crisp-bridge tap` with `args`, its stdout lines collected.
fn tap_cli(args: &[&str]) -> (Child, Lines) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crisp-bridge"))
        .arg("tap")
        .args(args)
        .env_remove("CRISP_BRIDGE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn crisp-bridge tap");
    let lines = Lines::default();
    let stdout = child.stdout.take().expect("stdout");
    let collected = lines.clone();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            collected.push(line);
        }
    });
    (child, lines)
}

/// A plain HTTP reader of `/tap?{query}`, its lines collected.
async fn tap_http(app: &TestApp, query: &str) -> Lines {
    let mut response = reqwest::get(format!("http://{}/tap?{query}", app.admin))
        .await
        .expect("GET /tap");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let lines = Lines::default();
    let collected = lines.clone();
    tokio::spawn(async move {
        let mut partial = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            partial.extend_from_slice(&chunk);
            while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=end).collect();
                collected.push(String::from_utf8_lossy(&line).trim_end().to_owned());
            }
        }
    });
    lines
}

async fn scrape(app: &TestApp) -> String {
    reqwest::get(format!("http://{}/metrics", app.admin))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_each_decision_without_bodies_and_filters() {
    let mut app = TestApp::builder("tap-lines")
        .sandbox(auto_profiles())
        .start()
        .await;
    let admin = format!("http://{}", app.admin);
    let (mut all_cli, all) = tap_cli(&["--admin", &admin]);
    let dead_trials = tap_http(&app, "rule=trial&outcome=dead_lettered").await;
    let (mut filtered_cli, delivered_orders) = tap_cli(&[
        "--admin",
        &admin,
        "--rule",
        "order-created",
        "--rule",
        "trial",
        "--outcome",
        "delivered",
    ]);
    // Subscribing takes a moment: messages without a people id (dead-lettered, rule
    // `trial`, no Crisp request) until every reader has seen one.
    eventually("every tap reader to be subscribed", || {
        let ready = !all.all().is_empty() && !dead_trials.all().is_empty();
        let app = &app;
        async move {
            if !ready {
                app.publish("trial.started", br#"{"phase":"warm-up"}"#)
                    .await;
            }
            ready.then_some(())
        }
    })
    .await;
    let warm_up = dead_trials.wait_for(json!({"rule": "trial"})).await;
    assert_eq!(warm_up["outcome"], "dead_lettered");
    assert_eq!(warm_up["reason"], "people_id_missing");
    assert_eq!(warm_up["crisp_status"], Value::Null);
    assert_eq!(warm_up["people_id"], Value::Null);
    // The filtered CLI reader is subscribed once it takes a delivered line.
    eventually("the filtered tap to be subscribed", || {
        let ready = !delivered_orders.all().is_empty();
        let app = &app;
        async move {
            if !ready {
                app.publish(
                    "trial.started",
                    br#"{"email":"warm@b.io","phase":"warm-up"}"#,
                )
                .await;
            }
            ready.then_some(())
        }
    })
    .await;

    // Delivered: Crisp's 200, the masked email, nothing of the body.
    app.publish(
        "order.created",
        br#"{"id":"SECRET-ORDER-7","status":"paid","customer":{"email":"jane.doe@example.com"},"amount":{"total":4242.5,"currency":"EUR"}}"#,
    )
    .await;
    let delivered = all.wait_for(json!({"rule": "order-created"})).await;
    assert_eq!(delivered["outcome"], "delivered");
    assert_eq!(delivered["reason"], Value::Null);
    assert_eq!(delivered["people_id"], "j***@example.com");
    assert_eq!(delivered["crisp_status"], 200);
    assert!(delivered["latency_ms"].as_f64().unwrap() >= 0.0);
    let time = delivered["time"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(time).is_ok() && time.ends_with('Z'),
        "{time}"
    );
    delivered_orders
        .wait_for(json!({"rule": "order-created", "outcome": "delivered"}))
        .await;

    // Dead-lettered by Crisp: its 400, and the rule.
    app.sandbox.state.push_fault(Fault {
        status: Some(400),
        times: 1,
        people_id: Some("carol.secret@example.com".into()),
        ..Default::default()
    });
    app.publish(
        "trial.started",
        br#"{"email":"carol.secret@example.com","phase":"started","plan":"SECRET-PLAN"}"#,
    )
    .await;
    let rejected = all.wait_for(json!({"reason": "crisp_rejected"})).await;
    assert_eq!(rejected["rule"], "trial");
    assert_eq!(rejected["outcome"], "dead_lettered");
    assert_eq!(rejected["crisp_status"], 400);
    assert_eq!(rejected["people_id"], "c***@example.com");
    dead_trials
        .wait_for(json!({"reason": "crisp_rejected", "crisp_status": 400}))
        .await;

    // Skipped: no rule takes an unpaid order (unmatched = ack), no Crisp request.
    app.publish(
        "order.created",
        br#"{"id":"SECRET-ORDER-8","status":"pending","customer":{"email":"bob@example.com"}}"#,
    )
    .await;
    let skipped = all.wait_for(json!({"outcome": "skipped"})).await;
    assert_eq!(skipped["rule"], "none");
    assert_eq!(skipped["reason"], "unmatched");
    assert_eq!(skipped["crisp_status"], Value::Null);
    assert_eq!(skipped["people_id"], Value::Null);

    // Not a body value nor a full email in any line; each filter took only its own.
    for line in all.all() {
        for leak in [
            "SECRET",
            "jane.doe",
            "carol.secret",
            "bob@",
            "4242",
            "EUR",
            "warm-up",
        ] {
            assert!(!line.contains(leak), "{leak} in {line}");
        }
    }
    let dead = dead_trials.parsed();
    assert!(dead
        .iter()
        .all(|l| l["rule"] == "trial" && l["outcome"] == "dead_lettered"));
    let orders = delivered_orders.parsed();
    assert!(orders.iter().all(|l| l["outcome"] == "delivered"
        && ["trial", "order-created"].contains(&l["rule"].as_str().unwrap())));
    assert!(all.parsed().iter().any(|l| l["outcome"] == "skipped"));

    // The bridge stopping ends the streams: the CLI exits 0.
    app.stop().await;
    for cli in [&mut all_cli, &mut filtered_cli] {
        let status = tokio::time::timeout(Duration::from_secs(10), cli.wait()).await;
        let mut stderr = String::new();
        if let Some(mut err) = cli.stderr.take() {
            if status.is_ok() {
                let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut stderr).await;
            }
        }
        let status = status
            .unwrap_or_else(|_| panic!("tap did not exit when the bridge stopped"))
            .expect("wait");
        assert!(status.success(), "{status}: {stderr}");
        assert!(stderr.contains("the bridge closed the stream"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_never_slows_delivery() {
    let mut app = TestApp::builder("tap-stuck")
        .rules(LOAD_RULES)
        .sandbox(auto_profiles())
        .config("[amqp]\nprefetch = 200\n")
        .start()
        .await;
    // Asks for every line, then reads nothing: a small receive window fills at once.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stuck = socket.connect(app.admin).await.expect("connect");
    stuck
        .write_all(b"GET /tap HTTP/1.1\r\nHost: bridge\r\n\r\n")
        .await
        .expect("request");
    let before = metric(&scrape(&app).await, DROPPED, "").expect("dropped counter exported");
    // Batches until lines are dropped: the stuck reader's buffers (its bounded queue,
    // HTTP and TCP buffers) are full and it still holds everything up.
    let mut published = 0u64;
    let mut dropped = before;
    while dropped <= before {
        assert!(
            published < 30_000,
            "{published} messages and no tap line dropped"
        );
        app.broker
            .publish_load_many(
                &app.names.exchange,
                "load.event",
                published..published + 2_000,
                500,
            )
            .await;
        published += 2_000;
        let want = published as usize;
        let state = app.sandbox.state.clone();
        eventually_within(
            Duration::from_secs(60),
            &format!("all {want} messages at the sandbox while a tap reader is stuck"),
            || {
                let n = state.event_count();
                async move { (n >= want).then_some(()) }
            },
        )
        .await;
        dropped = metric(&scrape(&app).await, DROPPED, "").unwrap();
    }
    eprintln!(
        "{published} messages delivered with a stuck tap reader; {} tap lines dropped",
        dropped - before
    );
    assert_eq!(app.sandbox.state.event_count(), published as usize);
    // Stopping does not wait for the stuck reader either.
    tokio::time::timeout(Duration::from_secs(10), app.stop_with_empty_queues())
        .await
        .expect("the bridge stops with a stuck tap reader");
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_exits_quietly_when_its_reader_goes() {
    let app = TestApp::builder("tap-pipe")
        .sandbox(auto_profiles())
        .start()
        .await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_crisp-bridge"))
        .args(["tap", "--admin", &format!("http://{}", app.admin)])
        .env_remove("CRISP_BRIDGE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tap");
    // Its reader goes at once; the next line it writes finds the pipe closed.
    drop(child.stdout.take());
    let status = eventually("tap to exit after its reader went", || {
        let exited = child.try_wait().expect("try_wait");
        let app = &app;
        async move {
            if exited.is_none() {
                app.publish("trial.started", br#"{"email":"p@b.io","phase":"x"}"#)
                    .await;
            }
            exited
        }
    })
    .await;
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    assert_eq!(status.code(), Some(141), "{status}; stderr: {stderr}");
    assert!(stderr.trim().is_empty(), "not quiet: {stderr}");
}

#[tokio::test]
async fn tap_says_when_the_admin_port_is_unreachable() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(env!("CARGO_BIN_EXE_crisp-bridge"))
            .args(["tap", "--admin", &url, "--outcome", "delivered"])
            .env_remove("CRISP_BRIDGE_CONFIG")
            .output(),
    )
    .await
    .expect("tap gives up at once")
    .expect("run tap");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach the bridge's admin server at")
            && stderr.contains(&url)
            && stderr.contains("--admin"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    let bad = Command::new(env!("CARGO_BIN_EXE_crisp-bridge"))
        .args(["tap", "--admin", &url, "--outcome", "lost"])
        .env_remove("CRISP_BRIDGE_CONFIG")
        .output()
        .await
        .expect("run tap");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "clap refuses an unknown outcome"
    );
}
