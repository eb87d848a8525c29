//! A three-node RabbitMQ cluster beside the shared broker (scripts/ensure-rabbitmq-cluster.sh
//! starts it and prints the variables read here): its nodes, their URLs, the load
//! balancer's URL, and what the cluster tests do to the nodes (stop, start, SIGKILL, wait
//! for a node to be back in the cluster, find a quorum queue's leader).

use crate::{eventually_within, WAIT};
use serde_json::Value;
use std::time::Duration;

/// How long a node may take to come back (a SIGKILLed node restarts from scratch).
pub const NODE_WAIT: Duration = Duration::from_secs(90);

/// The cluster of `TEST_CLUSTER_*`.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Node names (`rabbit-c1@localhost` ...).
    pub nodes: Vec<String>,
    /// The AMQP URL of each node, in the order of `nodes`.
    pub urls: Vec<String>,
    /// haproxy in front of every node.
    pub lb_url: String,
    ctl: String,
    script: Option<String>,
}

impl Cluster {
    /// The cluster the environment names; `None` when `TEST_CLUSTER_NODES` or its URLs
    /// are not set (the script was not run).
    pub fn from_env() -> Option<Self> {
        let words = |name: &str| -> Vec<String> {
            std::env::var(name)
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        let nodes = words("TEST_CLUSTER_NODES");
        let urls = words("TEST_CLUSTER_NODE_URLS");
        let lb_url = std::env::var("TEST_CLUSTER_LB_URL").ok()?;
        if nodes.is_empty() || nodes.len() != urls.len() {
            return None;
        }
        Some(Self {
            nodes,
            urls,
            lb_url,
            ctl: std::env::var("TEST_CLUSTER_CTL").unwrap_or_else(|_| "rabbitmqctl".into()),
            script: std::env::var("TEST_CLUSTER_SCRIPT").ok(),
        })
    }

    /// `rabbitmqctl -n node args...`: its stdout, or what went wrong.
    pub async fn ctl(&self, node: &str, args: &[&str]) -> Result<String, String> {
        let output = tokio::process::Command::new(&self.ctl)
            .arg("-n")
            .arg(node)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.ctl))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "{} -n {node} {}: {}{}",
                self.ctl,
                args.join(" "),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// The URL of `node`.
    pub fn url_of(&self, node: &str) -> &str {
        let i = self
            .nodes
            .iter()
            .position(|n| n == node)
            .unwrap_or_else(|| panic!("{node} is not a cluster node"));
        &self.urls[i]
    }

    /// The node whose AMQP listener is on `port`.
    pub fn node_on_port(&self, port: u16) -> Option<&str> {
        self.urls
            .iter()
            .position(|u| u.contains(&format!(":{port}/")))
            .map(|i| self.nodes[i].as_str())
    }

    /// Stops the rabbit application of `node` (its clients are disconnected, its AMQP
    /// port closes; the Erlang node stays).
    pub async fn stop_app(&self, node: &str) {
        self.ctl(node, &["stop_app"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the rabbit application of `node` again and waits until it is running in
    /// the cluster.
    pub async fn start_app(&self, node: &str) {
        self.ctl(node, &["start_app"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        self.await_running(node).await;
    }

    /// The OS pid of `node`'s Erlang VM.
    pub async fn beam_pid(&self, node: &str) -> u32 {
        let out = self
            .ctl(node, &["eval", "os:getpid()."])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        out.trim()
            .trim_matches('"')
            .parse()
            .unwrap_or_else(|_| panic!("os:getpid() of {node} answered {out:?}"))
    }

    /// SIGKILLs `node`'s Erlang VM (no goodbye to anyone), and waits until it is gone.
    pub async fn kill(&self, node: &str) {
        let pid = self.beam_pid(node).await;
        let status = std::process::Command::new("kill")
            .args(["-s", "KILL", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s KILL {pid} ({node})");
        eventually_within(WAIT, &format!("{node} (pid {pid}) to be gone"), || async {
            let gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
            gone.then_some(())
        })
        .await;
    }

    /// Starts every node that is not running (scripts/ensure-rabbitmq-cluster.sh, which
    /// reuses running ones), then waits until all are running in the cluster.
    pub async fn ensure_all(&self) {
        let mut down = Vec::new();
        for node in &self.nodes {
            if self
                .ctl(node, &["await_startup", "--timeout", "2"])
                .await
                .is_err()
            {
                down.push(node.clone());
            }
        }
        if !down.is_empty() {
            let script = self
                .script
                .as_deref()
                .expect("TEST_CLUSTER_SCRIPT names the script that starts the nodes");
            let output = tokio::process::Command::new(script)
                .kill_on_drop(true)
                .output()
                .await
                .expect("run the cluster script");
            assert!(
                output.status.success(),
                "{script} failed (bringing back {down:?}): {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        for node in &self.nodes {
            self.await_running(node).await;
        }
    }

    /// Nodes running in the cluster, as `node` sees it.
    pub async fn running_nodes(&self, node: &str) -> Vec<String> {
        let Ok(out) = self
            .ctl(node, &["-q", "cluster_status", "--formatter", "json"])
            .await
        else {
            return Vec::new();
        };
        serde_json::from_str::<Value>(&out)
            .ok()
            .and_then(|v| v.get("running_nodes").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }

    /// Waits until `node` runs its application and the other nodes see it.
    pub async fn await_running(&self, node: &str) {
        eventually_within(
            NODE_WAIT,
            &format!("{node} running in the cluster"),
            || async {
                if self
                    .ctl(node, &["await_startup", "--timeout", "5"])
                    .await
                    .is_err()
                {
                    return None;
                }
                for other in &self.nodes {
                    if other != node && self.ctl(other, &["status"]).await.is_ok() {
                        let running = self.running_nodes(other).await;
                        if !running.iter().any(|n| n == node) {
                            return None;
                        }
                    }
                }
                Some(())
            },
        )
        .await;
    }

    /// `list_queues name leader members online` of the queue `name`, asked of the first
    /// node that answers: (leader, members, online members).
    pub async fn quorum_status(&self, name: &str) -> Option<(String, Vec<String>, Vec<String>)> {
        for node in &self.nodes {
            let Ok(out) = self
                .ctl(
                    node,
                    &[
                        "-q",
                        "list_queues",
                        "name",
                        "leader",
                        "members",
                        "online",
                        "--formatter",
                        "json",
                    ],
                )
                .await
            else {
                continue;
            };
            let Ok(Value::Array(queues)) = serde_json::from_str::<Value>(&out) else {
                continue;
            };
            let queue = queues.iter().find(|q| q["name"] == name)?;
            let list = |key: &str| -> Vec<String> {
                serde_json::from_value(queue[key].clone()).unwrap_or_default()
            };
            let leader = queue["leader"].as_str().unwrap_or_default().to_owned();
            return Some((leader, list("members"), list("online")));
        }
        None
    }

    /// The node holding the leader of quorum queue `name`.
    pub async fn leader(&self, name: &str) -> String {
        eventually_within(WAIT, &format!("the leader of {name}"), || async {
            let (leader, _, _) = self.quorum_status(name).await?;
            self.nodes.contains(&leader).then_some(leader)
        })
        .await
    }

    /// Waits until quorum queue `name` has a member on every node, each online.
    pub async fn await_replicated(&self, name: &str) {
        eventually_within(
            NODE_WAIT,
            &format!("{name} online on every node"),
            || async {
                let (_, members, online) = self.quorum_status(name).await?;
                let all = |l: &[String]| self.nodes.iter().all(|n| l.contains(n));
                (all(&members) && all(&online)).then_some(())
            },
        )
        .await;
    }

    /// The nodes holding a client connection whose `connection_name` client property
    /// starts with `prefix` (the bridge names its connections `crisp-bridge/<version>`),
    /// found by the server port each connection came in on.
    pub async fn nodes_with_connection(&self, prefix: &str) -> Vec<String> {
        for node in &self.nodes {
            let Ok(out) = self
                .ctl(
                    node,
                    &[
                        "-q",
                        "list_connections",
                        "port",
                        "client_properties",
                        "--formatter",
                        "json",
                    ],
                )
                .await
            else {
                continue;
            };
            let Ok(Value::Array(connections)) = serde_json::from_str::<Value>(&out) else {
                continue;
            };
            return connections
                .iter()
                .filter(|c| {
                    c["client_properties"].to_string().contains(prefix)
                        || c["client_properties"]
                            .as_array()
                            .is_some_and(|p| p.iter().any(|x| x.to_string().contains(prefix)))
                })
                .filter_map(|c| c["port"].as_u64())
                .filter_map(|port| self.node_on_port(port as u16).map(str::to_owned))
                .collect();
        }
        Vec::new()
    }
}
