//! What crisp-bridge's integration tests, examples and benchmarks share: a real RabbitMQ
//! ([`amqp_url`]: `AMQP_URL`, else testcontainers), unique [`Names`], one config builder
//! ([`TestConfig`]), the Crisp sandbox, the bridge in process ([`TestApp`]) or as a child
//! process ([`Bridge`]) on that same config, a broker client, one TCP [`Proxy`] that cuts,
//! half-closes, freezes and taps, a three-node [`Cluster`] to fail node by node, a strict OTLP
//! trace receiver ([`otlp`]), and [`eventually`] for waiting on conditions.

mod app;
mod broker;
mod child;
mod cluster;
mod config;
pub mod otlp;
mod proxy;
mod silent;

pub use app::{TestApp, TestAppBuilder, TestEnv};
pub use broker::{
    amqp_url, amqp_url_via, broker_addr, delete_topology, delete_topology_at, header, load_message,
    BrokerClient, DEFAULT_RABBITMQ_IMAGE,
};
pub use child::{arg, bin_from_env, default_bin, free_port, Bridge, BridgeCommand};
pub use cluster::{Cluster, NODE_WAIT};
pub use config::{Names, TestConfig, LOAD_RULES, RULES};
pub use proxy::{frames, Chunk, Frame, Proxy};
pub use silent::SilentNode;

use crisp_bridge::sandbox::{Sandbox, SandboxOptions};
use std::future::Future;
use std::time::Duration;

/// Generous bound for conditions; tests wait for conditions, never for fixed times.
pub const WAIT: Duration = Duration::from_secs(30);

pub const WEBSITE: &str = crisp_bridge::sandbox::DEFAULT_WEBSITE_ID;

/// A trial event for `a@b.io`, matched by the standard rules' `trial` rule.
pub const TRIAL: &[u8] = br#"{"email":"a@b.io","phase":"started"}"#;

/// Polls `check` until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(WAIT, what, check).await
}

/// [`eventually`] with another bound (a long benchmark drain).
pub async fn eventually_within<T, F, Fut>(bound: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + bound;
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

/// A sandbox that accepts events for unknown emails (creating the profile), so tests
/// need not seed profiles.
pub fn auto_profiles() -> SandboxOptions {
    SandboxOptions {
        auto_create_profiles: true,
        ..Default::default()
    }
}

/// The Crisp sandbox in this process, on a free port.
pub async fn sandbox(options: SandboxOptions) -> Sandbox {
    Sandbox::start("127.0.0.1:0".parse().expect("addr"), options)
        .await
        .expect("sandbox")
}

/// Sequence numbers of the load events the sandbox received (their `seq` data field).
pub fn delivered_seqs(sandbox: &Sandbox) -> Vec<u64> {
    sandbox
        .state
        .events()
        .iter()
        .filter_map(|e| e.data.get("seq").and_then(|v| v.as_u64()))
        .collect()
}
