//! Shared by the soak and the benchmark: a Crisp sandbox in this process, a fresh set of
//! queues, the bridge binary as a child process, and a publisher.

#![allow(dead_code)]

use crisp_bridge::sandbox::{Sandbox, SandboxOptions};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn default_bin() -> PathBuf {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    PathBuf::from(format!("target/{profile}/crisp-bridge"))
}

pub struct Names {
    pub exchange: String,
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let base = format!("{prefix}.{}", &id[..8]);
        Self {
            exchange: format!("{base}.events"),
            queue: base.clone(),
            dlx: format!("{base}.dlx"),
            dlq: format!("{base}.dead"),
        }
    }
}

pub fn write_config(
    names: &Names,
    amqp_url: &str,
    api_url: &str,
    admin_port: u16,
    delivery: &str,
) -> PathBuf {
    write_config_with_prefetch(names, amqp_url, api_url, admin_port, delivery, 256)
}

pub fn write_config_with_prefetch(
    names: &Names,
    amqp_url: &str,
    api_url: &str,
    admin_port: u16,
    delivery: &str,
    prefetch: u16,
) -> PathBuf {
    let toml = format!(
        r##"
[amqp]
url = "{amqp_url}"
exchange = "{ex}"
queue = "{q}"
queue_type = "quorum"
prefetch = {prefetch}
dead_letter_exchange = "{dlx}"
dead_letter_queue = "{dlq}"
delivery_limit = 1000

[crisp]
website_id = "{website}"
identifier = "{id}"
key = "{key}"
api_url = "{api_url}"
timeout = "5s"

[delivery]
{delivery}

[server]
listen = "127.0.0.1:{admin_port}"

[log]
format = "json"
level = "warn"

[[rules]]
name = "load"
routing_key = "load.#"
people_id = "/email"
text = "load:{{/seq}}"
color = "blue"
data = {{ seq = "/seq", plan = "/plan" }}
"##,
        ex = names.exchange,
        q = names.queue,
        dlx = names.dlx,
        dlq = names.dlq,
        website = crisp_bridge::sandbox::DEFAULT_WEBSITE_ID,
        id = crisp_bridge::sandbox::DEFAULT_IDENTIFIER,
        key = crisp_bridge::sandbox::DEFAULT_KEY,
    );
    let path = std::env::temp_dir().join(format!("{}.toml", names.queue));
    std::fs::write(&path, toml).expect("write config");
    path
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub async fn sandbox() -> Sandbox {
    let options = SandboxOptions {
        auto_create_profiles: true,
        ..Default::default()
    };
    Sandbox::start("127.0.0.1:0".parse().expect("addr"), options)
        .await
        .expect("sandbox")
}

pub struct Bridge {
    pub child: tokio::process::Child,
    pub admin_port: u16,
}

impl Bridge {
    pub async fn spawn(bin: &Path, config: &Path, admin_port: u16) -> Self {
        let child = tokio::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (build it first)", bin.display()));
        let bridge = Self { child, admin_port };
        bridge.wait_ready().await;
        bridge
    }

    pub async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        for _ in 0..600 {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the bridge did not become ready");
    }

    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-s", sig, &pid.to_string()])
                .status();
        }
    }

    pub async fn stop(mut self) {
        self.signal("TERM");
        let _ = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
    }
}

pub struct Publisher {
    _connection: Connection,
    channel: Channel,
}

impl Publisher {
    pub async fn connect(url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        Self {
            _connection: connection,
            channel,
        }
    }

    pub async fn publish(&self, exchange: &str, routing_key: &str, seq: u64, people: u64) {
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
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }

    /// Publishes `seqs` as [`Self::publish`] does, with up to 1,000 confirms awaited at
    /// once: loading a 100,000-message backlog one confirm at a time takes minutes.
    pub async fn publish_many(
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
            .map(|q| q.message_count())
            .unwrap_or(0)
    }

    /// Deletes the queues and exchanges of a run.
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

    /// Declares the bridge's topology so messages can be published before it starts.
    pub async fn declare(&self, config: &Path) {
        let config = crisp_bridge::config::load(Some(config)).expect("config");
        let router = crisp_bridge::route::Router::compile_in(&config.rules, &config.base_dir)
            .expect("rules");
        crisp_bridge::broker::declare_topology(&self.channel, &config.amqp, &router.patterns())
            .await
            .expect("declare");
    }
}

/// Sequence numbers of the events the sandbox received (from the `seq` data field).
pub fn delivered_seqs(sandbox: &Sandbox) -> Vec<u64> {
    sandbox
        .state
        .events()
        .iter()
        .filter_map(|e| e.data.get("seq").and_then(|v| v.as_u64()))
        .collect()
}

/// Message `seq` of a load: one of `people` persons, with `seq` as its message id.
fn load_message(seq: u64, people: u64) -> (String, BasicProperties) {
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
