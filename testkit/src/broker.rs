//! The broker: where it is, a client to publish and read queues, cleanup.

use crate::{Names, WAIT};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::sync::OnceCell;

static BROKER_URL: OnceCell<String> = OnceCell::const_new();

/// The RabbitMQ line users run.
pub const DEFAULT_RABBITMQ_IMAGE: &str = "rabbitmq:4.1";

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
    // The container lives as long as the process.
    Box::leak(Box::new(container));
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
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

/// The AMQP URL with its host and port replaced by `addr` (a proxy's).
pub async fn amqp_url_via(addr: SocketAddr) -> String {
    let url = amqp_url().await;
    let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP URL parses");
    let vhost = uri.vhost.replace('%', "%25").replace('/', "%2f");
    format!(
        "amqp://{}:{}@{addr}/{vhost}",
        uri.authority.userinfo.username, uri.authority.userinfo.password
    )
}

/// A client of the broker under test, with publisher confirms: publish, read queues,
/// declare and delete a topology.
pub struct BrokerClient {
    connection: Connection,
    pub channel: Channel,
}

impl BrokerClient {
    /// Connects to [`amqp_url`].
    pub async fn connect() -> Self {
        Self::connect_to(&amqp_url().await).await
    }

    pub async fn connect_to(url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("test connection to RabbitMQ");
        let channel = connection.create_channel().await.expect("test channel");
        channel
            .confirm_select(Default::default())
            .await
            .expect("confirms");
        Self {
            connection,
            channel,
        }
    }

    /// Publishes, mandatory, and asserts the broker confirmed and routed the message.
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

    /// Publishes load message `seq` (see [`load_message`]) and waits for its confirm.
    pub async fn publish_load(&self, exchange: &str, routing_key: &str, seq: u64, people: u64) {
        self.publish_load_many(exchange, routing_key, seq..seq + 1, people)
            .await;
    }

    /// Publishes the load messages `seqs` with up to 1,000 confirms awaited at once:
    /// loading a 100,000-message backlog one confirm at a time takes minutes.
    pub async fn publish_load_many(
        &self,
        exchange: &str,
        routing_key: &str,
        seqs: std::ops::Range<u64>,
        people: u64,
    ) {
        let mut pending = Vec::with_capacity(1_000);
        for seq in seqs {
            let (body, props) = load_message(seq, people);
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .expect("publish");
            pending.push(confirm);
            if pending.len() == 1_000 {
                for confirm in pending.drain(..) {
                    assert!(confirm.await.expect("confirm").is_ack());
                }
            }
        }
        for confirm in pending {
            assert!(confirm.await.expect("confirm").is_ack());
        }
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

    /// Whether `queue` exists, asked on a channel of its own: a passive declare of a
    /// missing queue closes the channel it was sent on.
    pub async fn exists(&self, queue: &str) -> bool {
        let Ok(channel) = self.connection.create_channel().await else {
            return false;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .is_ok();
        if found {
            let _ = channel.close(200, "probe done".into()).await;
        }
        found
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

    /// Declares the bridge's topology for the config at `path`, so messages can be
    /// published before it starts.
    pub async fn declare(&self, path: &Path) {
        let config = crisp_bridge::config::load(Some(path)).expect("config");
        let router = crisp_bridge::route::Router::compile_in(&config.rules, &config.base_dir)
            .expect("rules");
        crisp_bridge::broker::declare_topology(&self.channel, &config.amqp, &router.patterns())
            .await
            .expect("declare");
    }

    /// Deletes the queues and exchanges of `names`.
    pub async fn delete(&self, names: &Names) {
        for queue in [&names.queue, &names.dlq] {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        for exchange in [&names.exchange, &names.dlx] {
            let _ = self
                .channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }
}

/// Deletes a test's queues and exchanges, so test runs do not pile up quorum queues on
/// the broker. Runs on its own thread and connection: it serves `Drop`, which cannot
/// await.
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

/// Load message `seq`: one of `people` persons, with `seq` as its message id, persistent.
pub fn load_message(seq: u64, people: u64) -> (String, BasicProperties) {
    let body = serde_json::json!({
        "email": format!("person{}@example.com", seq % people),
        "seq": seq,
        "plan": "pro",
    })
    .to_string();
    let props = BasicProperties::default()
        .with_message_id(seq.to_string().into())
        .with_delivery_mode(2);
    (body, props)
}
