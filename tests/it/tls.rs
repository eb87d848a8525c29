//! TLS to the broker, against real AMQPS nodes: the binary as a child process, its log
//! read for the reason of each refusal. The nodes and certificates come from
//! `scripts/ensure-rabbitmq-tls.sh` (scripts/test.sh runs it); each node also has a plain
//! port, where the test publishes and counts messages.

use crisp_bridge::sandbox::{Sandbox, SandboxOptions};
use crisp_bridge_testkit::{
    delete_topology_at, eventually, free_port, Bridge, BrokerClient, Names, SilentNode, TestConfig,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What scripts/ensure-rabbitmq-tls.sh exported.
pub struct TlsEnv {
    pub dir: PathBuf,
    pub amqps: String,
    pub plain: String,
    mtls_amqps: String,
    mtls_plain: String,
}

pub fn tls_env() -> TlsEnv {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: the TLS tests need the AMQPS brokers of scripts/ensure-rabbitmq-tls.sh. \
                 Run scripts/test.sh (it starts them), or start them and export what they print: \
                 eval \"$(scripts/ensure-rabbitmq-tls.sh)\" (TEST_RABBITMQ=4 for RabbitMQ 4.x)"
            )
        })
    };
    TlsEnv {
        dir: PathBuf::from(var("TEST_TLS_DIR")),
        amqps: var("TEST_TLS_AMQPS_URL"),
        plain: var("TEST_TLS_PLAIN_URL"),
        mtls_amqps: var("TEST_MTLS_AMQPS_URL"),
        mtls_plain: var("TEST_MTLS_PLAIN_URL"),
    }
}

/// One test's queues on a TLS node, its sandbox, a folder for its TLS files and config.
pub struct Setup {
    names: Names,
    pub sandbox: Sandbox,
    plain_url: String,
    /// On the node's plain port.
    broker: BrokerClient,
    pub dir: PathBuf,
    config: PathBuf,
}

impl Setup {
    /// `tls` is the `[amqp.tls]` table's body, paths relative to the test's folder.
    async fn new(test: &str, amqps_url: &str, plain_url: &str, tls: &str) -> Self {
        let sandbox = SandboxOptions {
            auto_create_profiles: true,
            ..Default::default()
        };
        Self::with(test, amqps_url, plain_url, tls, sandbox, "").await
    }

    /// [`Self::new`] with sandbox options and `crisp` keys (TOML lines) of its own.
    pub async fn with(
        test: &str,
        amqps_url: &str,
        plain_url: &str,
        tls: &str,
        sandbox: SandboxOptions,
        crisp: &str,
    ) -> Self {
        let names = Names::new(test);
        let sandbox = Sandbox::start("127.0.0.1:0".parse().expect("addr"), sandbox)
            .await
            .expect("sandbox");
        let api_url = format!("api_url = \"{}\"\n", sandbox.api_url());
        let base = TestConfig::test(amqps_url, &names, &sandbox.api_url()).base_toml();
        assert!(
            base.contains(&api_url),
            "the test config lost its api_url line"
        );
        let toml = base.replace(&api_url, &format!("{api_url}{crisp}\n"))
            + &format!("\n[amqp.tls]\n{tls}");
        let dir = std::env::temp_dir().join(format!("crisp-bridge-{}", names.queue));
        std::fs::create_dir_all(&dir).expect("test folder");
        let config = dir.join("crisp-bridge.toml");
        std::fs::write(&config, &toml).expect("write config");

        // The bridge's own topology, declared over the plain port, so messages published
        // before it ever connects are queued, not unroutable.
        let parsed = crisp_bridge::config::from_toml_str(&toml).expect("config parses");
        // Only the rules: the TLS files are installed after this, on purpose at times.
        let router =
            crisp_bridge::route::Router::compile_in(&parsed.rules, &dir).expect("rules compile");
        let broker = BrokerClient::connect_to(plain_url).await;
        crisp_bridge::broker::declare_topology(&broker.channel, &parsed.amqp, &router.patterns())
            .await
            .expect("declare topology");
        Self {
            names,
            sandbox,
            plain_url: plain_url.to_owned(),
            broker,
            dir,
            config,
        }
    }

    /// Copies `from` (in TEST_TLS_DIR) to `to` (in the test's folder) by a rename, as a
    /// Secret update swaps files.
    pub fn install(&self, env: &TlsEnv, from: &str, to: &str) {
        let staged = self.dir.join(format!(".{to}.new"));
        std::fs::copy(env.dir.join(from), &staged).expect("copy TLS file");
        std::fs::rename(&staged, self.dir.join(to)).expect("rename TLS file");
    }

    pub async fn publish_trials(&self, n: usize) {
        for i in 0..n {
            let body =
                serde_json::json!({"email": format!("tls{i}@example.com"), "phase": "started"})
                    .to_string();
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

    async fn ready(&self) -> u32 {
        self.broker.ready(&self.names.queue).await
    }

    pub async fn all_delivered(&self, n: usize) {
        let state = self.sandbox.state.clone();
        eventually(&format!("{n} people's events at the sandbox"), || {
            let events = state.events();
            async move {
                let people: std::collections::HashSet<_> =
                    events.iter().map(|e| e.people_id.clone()).collect();
                (people.len() == n).then_some(())
            }
        })
        .await;
    }

    fn spawn(&self) -> Bridge {
        self.spawn_with(&[], &[])
    }

    /// [`Self::spawn`] with environment variables set and removed; the log as text.
    pub fn spawn_with(&self, set: &[(&str, &str)], remove: &[&str]) -> Bridge {
        let path = Path::new(env!("CARGO_BIN_EXE_crisp-bridge"));
        let mut command = Bridge::command(path, &self.config, free_port())
            .env("CRISP_BRIDGE_LOG__FORMAT", "text")
            .env("RUST_LOG", "info")
            .capture_output();
        for name in remove {
            command = command.env_remove(name);
        }
        for (name, value) in set {
            command = command.env(name, value);
        }
        command.start()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        delete_topology_at(&self.plain_url, &self.names);
    }
}

/// Reading a child's log for why it refused the broker.
trait RefusalLog {
    async fn wait_log(&self, parts: &[&str]) -> String;
    async fn assert_refused_and_retrying(&mut self, parts: &[&str]) -> String;
}

impl RefusalLog for Bridge {
    /// Waits for a log line holding every one of `parts`, and returns it.
    async fn wait_log(&self, parts: &[&str]) -> String {
        let line = eventually(&format!("a log line with {parts:?}"), || async {
            self.output()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_owned)
        })
        .await;
        eprintln!("log: {line}");
        line
    }

    /// The bridge refused the broker and kept running, not ready, retrying.
    async fn assert_refused_and_retrying(&mut self, parts: &[&str]) -> String {
        let line = self
            .wait_log(&[&["cannot connect to RabbitMQ; retrying"], parts].concat())
            .await;
        assert!(
            self.child.try_wait().expect("child state").is_none(),
            "the bridge exited: {}",
            self.output()
        );
        eventually("/readyz to answer 503 (the admin server is up)", || async {
            (self.readyz().await == 503).then_some(())
        })
        .await;
        assert!(!line.contains("guest:guest"), "password in the log: {line}");
        line
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_ca_delivers() {
    let env = tls_env();
    let setup = Setup::new("tls-ok", &env.amqps, &env.plain, "ca_file = \"ca.crt\"\n").await;
    setup.install(&env, "ca.crt", "ca.crt");
    setup.publish_trials(3).await;
    let bridge = setup.spawn();
    bridge.wait_ready().await;
    setup.all_delivered(3).await;
    eventually("the queue to drain", || async {
        (setup.ready().await == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_silent_in_the_tls_handshake_is_given_up_and_the_next_node_is_used() {
    // The first URL's node takes the TCP connection and never answers the ClientHello:
    // the bridge gives the attempt up after two heartbeats (at least 5 s), its socket and
    // I/O thread end, and it consumes through the next URL, a real AMQPS node.
    let env = tls_env();
    let setup = Setup::new(
        "tls-silent",
        &env.amqps,
        &env.plain,
        "ca_file = \"ca.crt\"\n",
    )
    .await;
    setup.install(&env, "ca.crt", "ca.crt");
    let silent = SilentNode::start().await;
    // The silent node first in `amqp.urls` (which the config's `amqp.url` gives way to).
    let silent_url = format!("amqps://guest:guest@{}/%2f", silent.addr);
    let toml = std::fs::read_to_string(&setup.config).expect("read config");
    assert!(
        toml.contains("\n[amqp]\n"),
        "the test config has an [amqp] table"
    );
    let urls = format!("\n[amqp]\nurls = [\"{silent_url}\", \"{}\"]\n", env.amqps);
    std::fs::write(&setup.config, toml.replacen("\n[amqp]\n", &urls, 1)).expect("write");
    setup.publish_trials(3).await;
    let began = std::time::Instant::now();
    let bridge = setup.spawn_with(&[("CRISP_BRIDGE_AMQP__HEARTBEAT", "1s")], &[]);
    let delivered = tokio::time::timeout(Duration::from_secs(25), setup.all_delivered(3)).await;
    assert!(
        delivered.is_ok(),
        "not delivered through the next node:\n{}",
        bridge.output()
    );
    eprintln!(
        "silent in the TLS handshake: delivered through the next node after {:.2?}",
        began.elapsed()
    );
    assert_eq!(silent.accepted(), 1, "the silent node was tried first");
    eventually("one lapin I/O thread left in the bridge", || async {
        (bridge.io_loop_threads() == 1).then_some(())
    })
    .await;
    assert!(
        bridge
            .output()
            .contains("did not finish the connection handshake within 5s"),
        "the log says why the node was left:\n{}",
        bridge.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelated_ca_is_refused_with_its_reason_and_nothing_is_lost() {
    let env = tls_env();
    let setup = Setup::new(
        "tls-other-ca",
        &env.amqps,
        &env.plain,
        "ca_file = \"ca.crt\"\n",
    )
    .await;
    setup.install(&env, "other-ca.crt", "ca.crt");
    setup.publish_trials(3).await;
    let mut bridge = setup.spawn();
    bridge
        .assert_refused_and_retrying(&["unknown issuer", "amqp.tls.ca_file"])
        .await;
    // A second attempt, logged again: the bridge keeps retrying.
    eventually("a second refused attempt", || async {
        (bridge.output().matches("unknown issuer").count() >= 2).then_some(())
    })
    .await;
    assert_eq!(setup.ready().await, 3, "messages left the queue");
    assert!(setup.sandbox.state.events().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_certificate_does_not_list_is_a_name_mismatch() {
    let env = tls_env();
    // The server certificate lists 127.0.0.1, not localhost (which still reaches it).
    let url = env.amqps.replace("@127.0.0.1:", "@localhost:");
    let setup = Setup::new("tls-name", &url, &env.plain, "ca_file = \"ca.crt\"\n").await;
    setup.install(&env, "ca.crt", "ca.crt");
    let mut bridge = setup.spawn();
    bridge
        .assert_refused_and_retrying(&["name mismatch", "localhost"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_delivers_with_the_client_certificate() {
    let env = tls_env();
    let tls = "ca_file = \"ca.crt\"\ncert_file = \"tls.crt\"\nkey_file = \"tls.key\"\n";
    let setup = Setup::new("mtls-ok", &env.mtls_amqps, &env.mtls_plain, tls).await;
    setup.install(&env, "ca.crt", "ca.crt");
    setup.install(&env, "client.crt", "tls.crt");
    setup.install(&env, "client.key", "tls.key");
    setup.publish_trials(3).await;
    let bridge = setup.spawn();
    bridge.wait_ready().await;
    setup.all_delivered(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_without_a_client_certificate_is_refused_with_its_reason() {
    let env = tls_env();
    let setup = Setup::new(
        "mtls-none",
        &env.mtls_amqps,
        &env.mtls_plain,
        "ca_file = \"ca.crt\"\n",
    )
    .await;
    setup.install(&env, "ca.crt", "ca.crt");
    setup.publish_trials(2).await;
    let mut bridge = setup.spawn();
    // TLS 1.3: our handshake completes, the broker's alert (certificate required) arrives
    // on the first read; when the broker's close overtakes it, the log says what it means.
    let line = bridge
        .assert_refused_and_retrying(&["set amqp.tls.cert_file and amqp.tls.key_file"])
        .await;
    assert!(
        line.contains("certificate required") || line.contains("requires a client certificate"),
        "{line}"
    );
    assert_eq!(setup.ready().await, 2, "messages left the queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_files_are_used_by_the_next_connection() {
    let env = tls_env();
    let tls = "ca_file = \"ca.crt\"\ncert_file = \"tls.crt\"\nkey_file = \"tls.key\"\n";
    let setup = Setup::new("mtls-rotate", &env.mtls_amqps, &env.mtls_plain, tls).await;
    setup.install(&env, "ca.crt", "ca.crt");
    // First a client certificate from a CA the broker does not trust.
    setup.install(&env, "other-client.crt", "tls.crt");
    setup.install(&env, "other-client.key", "tls.key");
    setup.publish_trials(3).await;
    let mut bridge = setup.spawn();
    bridge
        .assert_refused_and_retrying(&["client certificate", "amqp.tls.cert_file"])
        .await;
    assert_eq!(setup.ready().await, 3);
    // cert-manager renews the Secret: both files change, one after the other.
    setup.install(&env, "client.key", "tls.key");
    setup.install(&env, "client.crt", "tls.crt");
    bridge.wait_ready().await;
    setup.all_delivered(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_missing_at_a_connection_attempt_is_retried_not_a_crash() {
    let env = tls_env();
    let setup = Setup::new(
        "tls-missing",
        &env.amqps,
        &env.plain,
        "ca_file = \"ca.crt\"\n",
    )
    .await;
    setup.publish_trials(2).await;
    let mut bridge = setup.spawn();
    let expected = setup.dir.join("ca.crt");
    bridge
        .assert_refused_and_retrying(&[
            "cannot read amqp.tls.ca_file",
            &expected.display().to_string(),
        ])
        .await;
    // The mounted Secret appears.
    setup.install(&env, "ca.crt", "ca.crt");
    bridge.wait_ready().await;
    setup.all_delivered(2).await;
    assert!(Path::new(&expected).exists());
}
