//! The test harness: a real RabbitMQ (from `AMQP_URL`, else testcontainers), the
//! Crisp sandbox on a free port, and the bridge itself, in process or as a child.

use crisp_bridge::app::App;
use crisp_bridge::config::{self, validate};
use crisp_bridge::sandbox::{ReceivedEvent, Sandbox, SandboxOptions};
use futures_util::Future;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Generous bound for conditions; tests wait for conditions, never for fixed times.
pub const WAIT: Duration = Duration::from_secs(30);

static BROKER_URL: OnceCell<String> = OnceCell::const_new();

/// The broker under test: `AMQP_URL` when set, else a RabbitMQ container from
/// testcontainers (needs a Docker engine): `TEST_RABBITMQ_IMAGE`, default
/// [`DEFAULT_RABBITMQ_IMAGE`]. (No `CRISP_BRIDGE_*` name: the bridge under test would read
/// it as an unknown config key and refuse to start.)
pub async fn amqp_url() -> String {
    BROKER_URL
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("AMQP_URL") {
                return url;
            }
            start_container().await
        })
        .await
        .clone()
}

/// The RabbitMQ line users run.
pub const DEFAULT_RABBITMQ_IMAGE: &str = "rabbitmq:4.1";

async fn start_container() -> String {
    use testcontainers_modules::testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::{GenericImage, ImageExt};
    let image =
        std::env::var("TEST_RABBITMQ_IMAGE").unwrap_or_else(|_| DEFAULT_RABBITMQ_IMAGE.to_string());
    let (name, tag) = image.rsplit_once(':').unwrap_or((&image, "latest"));
    // The testcontainers module waits for 3.8's exact startup line; every version since
    // logs "Server startup complete" once its listeners are up.
    let container = GenericImage::new(name, tag)
        .with_exposed_port(5672.tcp())
        .with_wait_for(WaitFor::message_on_either_std("Server startup complete"))
        .with_startup_timeout(Duration::from_secs(180))
        .start()
        .await
        .expect("no AMQP_URL set and no Docker engine for testcontainers; set AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f");
    let port = container
        .get_host_port_ipv4(5672)
        .await
        .expect("container port");
    // The container lives as long as the test binary.
    Box::leak(Box::new(container));
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// Polls `check` until it returns `Some`, failing the test after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Unique broker names for one test.
#[derive(Clone, Debug)]
pub struct Names {
    pub exchange: String,
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
}

impl Names {
    pub fn new(test: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let base = format!("t.{test}.{}", &id[..8]);
        Self {
            exchange: format!("{base}.events"),
            queue: base.clone(),
            dlx: format!("{base}.dlx"),
            dlq: format!("{base}.dead"),
        }
    }
}

pub const WEBSITE: &str = crisp_bridge::sandbox::DEFAULT_WEBSITE_ID;

/// The rules most tests use: DESIGN's example plus a catch-all for trials.
pub const RULES: &str = r##"
[[rules]]
name = "order-created"
routing_key = "order.created"
when = { "/status" = "paid" }
people_id = ["/customer/email", "/email"]
text = "order:created"
color = "blue"
data = { order_id = "/id", total = "/amount/total", currency = "/amount/currency" }

[[rules]]
name = "trial"
routing_key = "trial.#"
people_id = "/email"
text = "trial:{/phase}"
color = "green"
data = { plan = "/plan", account = "/account" }
"##;

/// Builds the TOML config for a test.
pub fn config_toml(amqp_url: &str, names: &Names, api_url: &str, rules: &str) -> String {
    format!(
        r#"
[amqp]
url = "{amqp_url}"
exchange = "{ex}"
queue = "{q}"
queue_type = "quorum"
prefetch = 16
dead_letter_exchange = "{dlx}"
dead_letter_queue = "{dlq}"

[crisp]
website_id = "{WEBSITE}"
identifier = "{id}"
key = "{key}"
api_url = "{api_url}"
timeout = "2s"

[delivery]
initial_backoff = "20ms"
max_backoff = "200ms"
max_retry_time = "20s"
shutdown_timeout = "5s"

[server]
listen = "127.0.0.1:0"
{rules}
"#,
        ex = names.exchange,
        q = names.queue,
        dlx = names.dlx,
        dlq = names.dlq,
        id = crisp_bridge::sandbox::DEFAULT_IDENTIFIER,
        key = crisp_bridge::sandbox::DEFAULT_KEY,
    )
}

/// A test-side broker client: publish, read queues.
pub struct BrokerClient {
    _connection: Connection,
    pub channel: Channel,
}

impl BrokerClient {
    pub async fn connect() -> Self {
        let connection = Connection::connect(&amqp_url().await, ConnectionProperties::default())
            .await
            .expect("test connection to RabbitMQ");
        let channel = connection.create_channel().await.expect("test channel");
        channel
            .confirm_select(Default::default())
            .await
            .expect("confirms");
        Self {
            _connection: connection,
            channel,
        }
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("publisher confirm");
        assert!(confirm.is_ack(), "broker did not confirm the test message");
        assert!(
            confirm.take_message().is_none(),
            "message to `{routing_key}` was unroutable"
        );
    }

    /// Ready messages in a queue (not counting unacked ones).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .message_count()
    }

    /// Takes one message from a queue and acks it.
    pub async fn get(&self, queue: &str) -> Option<BasicGetMessage> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
    }

    /// Waits until `n` messages can be taken from `queue`, and takes them.
    pub async fn take(&self, queue: &str, n: usize) -> Vec<BasicGetMessage> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < n {
            match self.get(queue).await {
                Some(m) => got.push(m),
                None => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "timed out: {} of {n} messages in {queue}",
                        got.len()
                    );
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
        }
        got
    }
}

/// Reads a string header of a message.
pub fn header(message: &BasicGetMessage, name: &str) -> Option<String> {
    let headers = message.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        lapin::types::AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// The bridge running in this process against a fresh sandbox and fresh queues.
pub struct TestApp {
    pub names: Names,
    pub sandbox: Sandbox,
    pub admin: SocketAddr,
    pub broker: BrokerClient,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub struct TestAppBuilder {
    test: String,
    extra: String,
    rules: String,
    /// Edits of the base config, for keys that cannot be unset by a later layer.
    replacements: Vec<(String, String)>,
    sandbox: SandboxOptions,
    api_url: Option<String>,
}

impl TestApp {
    pub fn builder(test: &str) -> TestAppBuilder {
        TestAppBuilder {
            test: test.into(),
            extra: String::new(),
            rules: RULES.into(),
            sandbox: SandboxOptions::default(),
            api_url: None,
            replacements: Vec::new(),
        }
    }

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

    /// Waits until each of the `n` people of [`Self::publish_people`] got an event; returns
    /// every event received, duplicates included.
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
        delete_topology(&self.names);
    }
}

/// Deletes a test's queues and exchanges, so test runs do not pile up quorum queues
/// on the broker. Runs on its own thread: `Drop` cannot await.
pub fn delete_topology(names: &Names) {
    if let Some(url) = BROKER_URL.get() {
        delete_topology_at(url, names);
    }
}

/// [`delete_topology`] on the broker at `url`.
pub fn delete_topology_at(url: &str, names: &Names) {
    let names = names.clone();
    let url = url.to_owned();
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            let Ok(connection) = Connection::connect(&url, ConnectionProperties::default()).await
            else {
                return;
            };
            if let Ok(channel) = connection.create_channel().await {
                for queue in [&names.queue, &names.dlq] {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), Default::default())
                        .await;
                }
                for exchange in [&names.exchange, &names.dlx] {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), Default::default())
                        .await;
                }
            }
            let _ = connection.close(200, "test cleanup".into()).await;
        });
    });
    let _ = cleanup.join();
}

impl TestAppBuilder {
    /// TOML merged over the standard test config, key by key.
    pub fn config(mut self, extra: &str) -> Self {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }

    /// Replaces `from` in the base config with `to`.
    pub fn replace(mut self, from: &str, to: &str) -> Self {
        self.replacements.push((from.into(), to.into()));
        self
    }

    /// Replaces the standard rules.
    pub fn rules(mut self, rules: &str) -> Self {
        self.rules = rules.into();
        self
    }

    pub fn sandbox(mut self, options: SandboxOptions) -> Self {
        self.sandbox = options;
        self
    }

    pub fn api_url(mut self, url: &str) -> Self {
        self.api_url = Some(url.into());
        self
    }

    /// Starts the bridge and waits until it is ready.
    pub async fn start(self) -> TestApp {
        let app = self.start_without_waiting().await;
        app.wait_ready(200).await;
        app
    }

    /// Starts the bridge without waiting for it to be ready (its topology may not exist
    /// yet).
    pub async fn start_without_waiting(self) -> TestApp {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let url = amqp_url().await;
        let names = Names::new(&self.test);
        let sandbox = Sandbox::start("127.0.0.1:0".parse().expect("addr"), self.sandbox)
            .await
            .expect("sandbox");
        let api_url = self.api_url.unwrap_or_else(|| sandbox.api_url());
        let mut toml = config_toml(&url, &names, &api_url, &self.rules);
        for (from, to) in &self.replacements {
            assert!(
                toml.contains(from.as_str()),
                "`{from}` is not in the base config"
            );
            toml = toml.replace(from.as_str(), to);
        }
        let config = config::from_toml_layers(&[&toml, &self.extra])
            .unwrap_or_else(|e| panic!("test config: {e}\n{toml}\n{}", self.extra));
        let validated = validate(config).unwrap_or_else(|p| panic!("test config invalid: {p:?}"));
        let app = App::build(validated).await.expect("app builds");
        let admin = app.admin_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        let broker = BrokerClient::connect().await;
        TestApp {
            names,
            sandbox,
            admin,
            broker,
            shutdown,
            task: Some(task),
        }
    }
}

/// Reads one sample from Prometheus text: `name{labels}` where `labels` is the exact
/// label text between braces (empty for none).
pub fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    body.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == wanted).then(|| value.parse().ok()).flatten()
    })
}

/// A TCP proxy in front of the broker that can cut every open connection, to test
/// reconnection without Docker.
pub struct ChaosProxy {
    pub addr: SocketAddr,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl ChaosProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().expect("proxy lock").push(task.abort_handle());
            }
        });
        Self {
            addr,
            connections,
            accept,
        }
    }

    /// Drops every connection open through the proxy, as a network failure would.
    pub fn cut(&self) -> usize {
        let mut held = self.connections.lock().expect("proxy lock");
        let n = held.len();
        for c in held.drain(..) {
            c.abort();
        }
        n
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The broker's host:port, from its URL.
pub async fn broker_addr() -> SocketAddr {
    let url = amqp_url().await;
    let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP URL parses");
    let target = format!("{}:{}", uri.authority.host, uri.authority.port);
    let mut addrs = tokio::net::lookup_host(target)
        .await
        .expect("resolve broker");
    addrs.next().expect("broker address")
}

/// The AMQP URL with its host and port replaced by `addr`.
pub async fn amqp_url_via(addr: SocketAddr) -> String {
    let url = amqp_url().await;
    let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP URL parses");
    let vhost = percent_encode_vhost(&uri.vhost);
    format!(
        "amqp://{}:{}@{addr}/{vhost}",
        uri.authority.userinfo.username, uri.authority.userinfo.password
    )
}

fn percent_encode_vhost(vhost: &str) -> String {
    vhost.replace('%', "%25").replace('/', "%2f")
}

/// A sandbox that accepts events for unknown emails (creating the profile), so tests
/// need not seed profiles.
pub fn auto_profiles() -> SandboxOptions {
    SandboxOptions {
        auto_create_profiles: true,
        ..Default::default()
    }
}

/// A trial event for `a@b.io`, matched by the standard rules' `trial` rule.
pub const TRIAL: &[u8] = br#"{"email":"a@b.io","phase":"started"}"#;
