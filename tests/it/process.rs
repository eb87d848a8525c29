//! The real binary as a child process: environment overrides, signals, crashes,
//! metrics after a run, and logs that never hold secrets.

use crate::harness::{
    amqp_url, amqp_url_via, broker_addr, config_toml, eventually, metric, BrokerClient, ChaosProxy,
    Names, RULES,
};
use crisp_bridge::sandbox::{Fault, Sandbox, SandboxOptions};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;

const KEY: &str = "k3y-Sup3r-S3cret-9f8e7d";

struct Bridge {
    child: tokio::process::Child,
    admin: SocketAddr,
    output: Arc<Mutex<Vec<u8>>>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

struct Setup {
    names: Names,
    sandbox: Sandbox,
    broker: BrokerClient,
    config: PathBuf,
}

impl Setup {
    async fn new(test: &str, key_in_file: &str) -> Self {
        let names = Names::new(test);
        let options = SandboxOptions {
            key: KEY.into(),
            auto_create_profiles: true,
            ..Default::default()
        };
        let sandbox = Sandbox::start("127.0.0.1:0".parse().expect("addr"), options)
            .await
            .expect("sandbox");
        let toml = config_toml(&amqp_url().await, &names, &sandbox.api_url(), RULES).replace(
            &format!("key = \"{}\"", crisp_bridge::sandbox::DEFAULT_KEY),
            &format!("key = \"{key_in_file}\""),
        );
        let config = std::env::temp_dir().join(format!("{}.toml", names.queue));
        std::fs::write(&config, toml).expect("write config");
        let broker = BrokerClient::connect().await;
        Self {
            names,
            sandbox,
            broker,
            config,
        }
    }

    /// Points the config at `url_file` (read before each connection) instead of `url`.
    fn use_url_file(&self, url_file: &std::path::Path) {
        let toml = std::fs::read_to_string(&self.config).expect("read config");
        let toml = toml
            .lines()
            .map(|line| {
                if line.starts_with("url = ") {
                    format!("url_file = \"{}\"", url_file.display())
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&self.config, toml).expect("write config");
    }

    async fn spawn(&self, envs: &[(&str, &str)]) -> Bridge {
        let port = free_port();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_crisp-bridge"));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("CRISP_BRIDGE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info,crisp_bridge=debug")
            .env_remove("CRISP_BRIDGE_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn crisp-bridge");
        let output = Arc::new(Mutex::new(Vec::new()));
        for mut stream in [
            Box::new(child.stdout.take().expect("stdout"))
                as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = output.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .expect("log lock")
                        .extend_from_slice(&buf[..n]);
                }
            });
        }
        let bridge = Bridge {
            child,
            admin: format!("127.0.0.1:{port}").parse().expect("addr"),
            output,
        };
        bridge.wait_ready().await;
        bridge
    }

    async fn publish_trials(&self, n: usize) {
        for i in 0..n {
            let body =
                json!({"email": format!("person{i}@example.com"), "phase": "started"}).to_string();
            self.broker
                .publish(
                    &self.names.exchange,
                    "trial.started",
                    body.as_bytes(),
                    Default::default(),
                )
                .await;
        }
    }

    async fn publish(&self, routing_key: &str, body: serde_json::Value) {
        let body = body.to_string();
        self.broker
            .publish(
                &self.names.exchange,
                routing_key,
                body.as_bytes(),
                Default::default(),
            )
            .await;
    }

    /// Waits until every one of the `n` people got at least one event; returns the duplicates.
    async fn all_delivered(&self, n: usize) -> usize {
        let state = self.sandbox.state.clone();
        eventually(&format!("{n} distinct events"), || {
            let events = state.events();
            async move {
                let distinct: std::collections::HashSet<_> =
                    events.iter().map(|e| e.people_id.clone()).collect();
                (distinct.len() == n).then(|| events.len() - n)
            }
        })
        .await
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
        crate::harness::delete_topology(&self.names);
    }
}

impl Bridge {
    async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.admin);
        eventually("the child bridge to be ready", || {
            let url = url.clone();
            async move {
                reqwest::get(&url)
                    .await
                    .ok()
                    .filter(|r| r.status() == 200)
                    .map(|_| ())
            }
        })
        .await;
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body")
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", name, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(crate::harness::WAIT, self.child.wait())
            .await
            .expect("exit in time")
            .expect("wait")
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("log lock")).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_overrides_the_key_from_the_file() {
    let setup = Setup::new("env-key", "wrong-key-in-file").await;
    let mut bridge = setup.spawn(&[("CRISP_BRIDGE_CRISP__KEY", KEY)]).await;
    setup.publish_trials(1).await;
    assert_eq!(setup.all_delivered(1).await, 0);
    bridge.signal("TERM");
    assert!(bridge.wait_exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_logs_hold_no_secrets() {
    let setup = Setup::new("metrics", KEY).await;
    let mut bridge = setup.spawn(&[]).await;
    setup.sandbox.state.push_fault(Fault {
        status: Some(503),
        ..Default::default()
    });
    setup.publish_trials(3).await;
    setup.all_delivered(3).await;
    setup.sandbox.state.push_fault(Fault {
        status: Some(400),
        ..Default::default()
    });
    setup
        .publish(
            "trial.started",
            json!({"email": "rejected.person@example.com", "phase": "x"}),
        )
        .await;
    setup
        .publish(
            "order.created",
            json!({"status": "paid", "email": "bad person@example.com"}),
        )
        .await;
    setup
        .publish(
            "order.created",
            json!({"status": "open", "email": "skipped.person@example.com"}),
        )
        .await;
    setup.publish("trial.started", json!({"email": "stripped.person@example.com", "phase": "y", "account": {"id": 1, "password": "hunter2"}})).await;
    setup.all_delivered(4).await;
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
    let setup = Setup::new("sigterm", KEY).await;
    setup
        .sandbox
        .state
        .set_latency(std::time::Duration::from_millis(50));
    let mut bridge = setup.spawn(&[]).await;
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
    let mut again = setup.spawn(&[]).await;
    let duplicates = setup.all_delivered(n).await;
    eprintln!("SIGTERM mid-stream: published {n}, delivered {n}, lost 0, duplicates {duplicates}");
    assert_eq!(duplicates, 0);
    again.signal("TERM");
    assert!(again.wait_exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    let setup = Setup::new("sigkill", KEY).await;
    setup
        .sandbox
        .state
        .set_latency(std::time::Duration::from_millis(20));
    let mut bridge = setup.spawn(&[]).await;
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
    let mut again = setup.spawn(&[]).await;
    let duplicates = setup.all_delivered(n).await;
    eprintln!("SIGKILL mid-stream: published {n}, delivered {n}, lost 0, duplicates {duplicates}");
    again.signal("TERM");
    assert!(again.wait_exit().await.success());
    assert_eq!(setup.broker.ready(&setup.names.queue).await, 0);
    assert_eq!(setup.broker.ready(&setup.names.dlq).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_the_broker_keeps_the_message() {
    let setup = Setup::new("second-signal", KEY).await;
    // Crisp answers after 20 s: the first SIGTERM would wait shutdown_timeout (5 s).
    setup
        .sandbox
        .state
        .set_latency(std::time::Duration::from_secs(20));
    let mut bridge = setup.spawn(&[]).await;
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
    let setup = Setup::new("url-file", KEY).await;
    let proxy = ChaosProxy::start(broker_addr().await).await;
    let good = amqp_url_via(proxy.addr).await;
    let url_file = setup.config.with_extension("url");
    write_atomically(&url_file, &good);
    setup.use_url_file(&url_file);
    let mut bridge = setup.spawn(&[]).await;
    setup.publish_trials(1).await;
    setup.all_delivered(1).await;

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
    setup
        .publish(
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
    setup.all_delivered(2).await;
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
