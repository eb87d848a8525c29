//! A test's world (fresh names, a sandbox, a broker client, one config) and the bridge in
//! it: in this process ([`TestApp`]) or as a child process ([`TestEnv::spawn`]).

use crate::{
    amqp_url, delete_topology, eventually, sandbox, Bridge, BrokerClient, Names, TestConfig, WAIT,
};
use crisp_bridge::app::App;
use crisp_bridge::sandbox::{ReceivedEvent, Sandbox, SandboxOptions};
use lapin::BasicProperties;
use std::net::SocketAddr;
use std::path::Path;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Fresh queues and exchanges, a sandbox, a broker client and the config that ties them
/// together; the topology (and a written config file) go when it is dropped.
pub struct TestEnv {
    pub names: Names,
    pub sandbox: Sandbox,
    pub broker: BrokerClient,
    pub config: TestConfig,
}

/// Builds a [`TestEnv`], then starts the bridge in it.
pub struct TestAppBuilder {
    test: String,
    layers: Vec<String>,
    rules: Option<String>,
    replacements: Vec<(String, String)>,
    sandbox: SandboxOptions,
    api_url: Option<String>,
}

impl TestAppBuilder {
    /// TOML merged over the standard test config, key by key.
    pub fn config(mut self, extra: &str) -> Self {
        self.layers.push(format!("{extra}\n"));
        self
    }

    /// Replaces `from` in the base config with `to`.
    pub fn replace(mut self, from: &str, to: &str) -> Self {
        self.replacements.push((from.into(), to.into()));
        self
    }

    /// Other rules than [`crate::RULES`].
    pub fn rules(mut self, rules: &str) -> Self {
        self.rules = Some(rules.into());
        self
    }

    pub fn sandbox(mut self, options: SandboxOptions) -> Self {
        self.sandbox = options;
        self
    }

    /// Another Crisp than the sandbox.
    pub fn api_url(mut self, url: &str) -> Self {
        self.api_url = Some(url.into());
        self
    }

    /// The world without a bridge, for a child process ([`TestEnv::spawn`]).
    pub async fn env(self) -> TestEnv {
        let url = amqp_url().await;
        let names = Names::new(&format!("t.{}", self.test));
        let sandbox = sandbox(self.sandbox).await;
        let api_url = self.api_url.unwrap_or_else(|| sandbox.api_url());
        let mut config = TestConfig::test(&url, &names, &api_url);
        if let Some(rules) = &self.rules {
            config = config.rules(rules);
        }
        for (from, to) in &self.replacements {
            config = config.replace(from, to);
        }
        for layer in &self.layers {
            config = config.layer(layer);
        }
        let broker = BrokerClient::connect().await;
        TestEnv {
            names,
            sandbox,
            broker,
            config,
        }
    }

    /// Starts the bridge in process and waits until it is ready.
    pub async fn start(self) -> TestApp {
        let app = self.start_without_waiting().await;
        app.wait_ready(200).await;
        app
    }

    /// Starts the bridge in process without waiting for it to be ready (its topology may
    /// not exist yet).
    pub async fn start_without_waiting(self) -> TestApp {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let env = self.env().await;
        let app = App::build(env.config.validated())
            .await
            .expect("app builds");
        let admin = app.admin_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        TestApp {
            env,
            admin,
            shutdown,
            task: Some(task),
        }
    }
}

impl TestEnv {
    pub async fn publish(&self, routing_key: &str, body: &[u8]) {
        self.publish_with(routing_key, body, BasicProperties::default())
            .await;
    }

    pub async fn publish_with(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.broker
            .publish(&self.names.exchange, routing_key, body, properties)
            .await;
    }

    /// Publishes `n` trial events, one per person `p{i}@b.io`, with message ids `evt-{i}`.
    pub async fn publish_people(&self, n: usize) {
        for i in 0..n {
            let body =
                serde_json::json!({"email": format!("p{i}@b.io"), "phase": "started"}).to_string();
            let props = BasicProperties::default().with_message_id(format!("evt-{i}").into());
            self.publish_with("trial.started", body.as_bytes(), props)
                .await;
        }
    }

    /// Publishes `n` trial events, one per person `person{i}@example.com`, without message
    /// ids: no duplicate window can hide a second delivery.
    pub async fn publish_trials(&self, n: usize) {
        for i in 0..n {
            let body =
                serde_json::json!({"email": format!("person{i}@example.com"), "phase": "started"})
                    .to_string();
            self.publish("trial.started", body.as_bytes()).await;
        }
    }

    /// Waits until each of `n` people got an event; returns every event received,
    /// duplicates included.
    pub async fn events_for_people(&self, n: usize) -> Vec<ReceivedEvent> {
        let state = self.sandbox.state.clone();
        eventually(&format!("an event for each of {n} people"), || {
            let events = state.events();
            async move {
                let people: std::collections::HashSet<_> =
                    events.iter().map(|e| e.people_id.clone()).collect();
                (people.len() == n).then_some(events)
            }
        })
        .await
    }

    /// Waits until the sandbox holds `n` events, and returns them.
    pub async fn events(&self, n: usize) -> Vec<ReceivedEvent> {
        let state = self.sandbox.state.clone();
        eventually(&format!("{n} event(s) at the sandbox"), || {
            let events = state.events();
            async move { (events.len() >= n).then_some(events) }
        })
        .await
    }

    /// Writes the config to its file (named after the queue) and starts the binary `bin`
    /// on it as a child, with debug logs kept in memory ([`Bridge::output`]) and `envs`
    /// set; waits until it is ready.
    pub async fn spawn(&self, bin: &Path, envs: &[(&str, &str)]) -> Bridge {
        let path = self.config.write_temp();
        let mut command = Bridge::command(bin, &path, crate::free_port())
            .env("RUST_LOG", "info,crisp_bridge=debug")
            .capture_output();
        for (key, value) in envs {
            command = command.env(key, value);
        }
        command.spawn().await
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.config.temp_path());
        delete_topology(&self.names);
    }
}

/// The bridge running in this process against a fresh [`TestEnv`] (its fields read
/// through this).
pub struct TestApp {
    env: TestEnv,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl std::ops::Deref for TestApp {
    type Target = TestEnv;

    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl TestApp {
    pub fn builder(test: &str) -> TestAppBuilder {
        TestAppBuilder {
            test: test.into(),
            layers: Vec::new(),
            rules: None,
            replacements: Vec::new(),
            sandbox: SandboxOptions::default(),
            api_url: None,
        }
    }

    /// Stops gracefully and asserts nothing is left: every message was acked, none
    /// dead-lettered.
    pub async fn stop_with_empty_queues(&mut self) {
        self.stop().await;
        assert_eq!(
            self.broker.ready(&self.names.queue).await,
            0,
            "messages left in the main queue"
        );
        assert_eq!(
            self.broker.ready(&self.names.dlq).await,
            0,
            "messages in the dead-letter queue"
        );
    }

    pub async fn readyz(&self) -> u16 {
        match reqwest::get(format!("http://{}/readyz", self.admin)).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    pub async fn wait_ready(&self, status: u16) {
        eventually(&format!("/readyz to answer {status}"), || async {
            (self.readyz().await == status).then_some(())
        })
        .await;
    }

    /// Graceful stop, as SIGTERM does: every held message is settled when this returns.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the app did not stop within the test's wait")
                .expect("app task panicked")
                .expect("app stopped cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
