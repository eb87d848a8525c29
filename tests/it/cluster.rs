//! The bridge (a child process) on a three-node RabbitMQ 3.x cluster
//! (scripts/ensure-rabbitmq-cluster.sh, which scripts/test.sh runs): a quorum queue with
//! a member on every node, a publisher with confirms publishing throughout, and one node
//! failing: stopped, SIGKILLed under the queue's leader, restarted in turn. Each case
//! asserts nothing confirmed is lost, nothing is dead-lettered and consuming resumes within
//! 10 s; it prints the duplicates and how long each failover took.
//! Skipped (saying so) when the TEST_CLUSTER_* variables are not set. The cases restart
//! nodes, so they run one at a time (`SERIAL`); every node is back when each ends.

use crisp_bridge::sandbox::Sandbox;
use crisp_bridge_testkit::{
    auto_profiles, delete_topology_at, eventually_within, free_port, sandbox, Bridge, BrokerClient,
    Cluster, Names, TestConfig,
};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One cluster case at a time: they stop and kill the nodes the others use.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the bridge holds unacked at most (the test config's prefetch): more events than
/// this after a failure means the broker delivered again after it.
const PREFETCH: usize = 16;

/// Consuming again within this of a live node being reachable.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

fn cluster_or_skip(test: &str) -> Option<Cluster> {
    let cluster = Cluster::from_env();
    if cluster.is_none() {
        eprintln!(
            "SKIPPED cluster::{test}: TEST_CLUSTER_NODES / TEST_CLUSTER_NODE_URLS / \
             TEST_CLUSTER_LB_URL are not set; run eval \"$(scripts/ensure-rabbitmq-cluster.sh)\" \
             (scripts/test.sh does, on RabbitMQ 3.x)"
        );
    }
    cluster
}

/// Runs `case` on the cluster, one case at a time, and brings every node back afterwards,
/// whether the case passed or not.
async fn on_cluster<F, Fut>(test: &str, case: F)
where
    F: FnOnce(Cluster) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(cluster) = cluster_or_skip(test) else {
        return;
    };
    let _serial = SERIAL.lock().await;
    cluster.ensure_all().await;
    let outcome = tokio::spawn(case(cluster.clone())).await;
    cluster.ensure_all().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Publishes `p{i}@b.io` trial events (message id `evt-{i}`) one after another, each
/// awaiting its confirm, moving to the next node when one fails (and publishing the
/// unconfirmed message again there).
struct Publisher {
    confirmed: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn start(urls: Vec<String>, exchange: String, pause: Duration) -> Self {
        let confirmed = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let confirmed = confirmed.clone();
            let stop = stop.clone();
            async move {
                let mut next: u64 = 0;
                let mut turn = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let url = &urls[turn % urls.len()];
                    turn += 1;
                    let Ok(Ok(connection)) = tokio::time::timeout(
                        Duration::from_secs(5),
                        Connection::connect(url, ConnectionProperties::default()),
                    )
                    .await
                    else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    // Every step is bounded: a node starting or stopping may take a
                    // connection and never answer on it.
                    let step = Duration::from_secs(5);
                    let Ok(Ok(channel)) =
                        tokio::time::timeout(step, connection.create_channel()).await
                    else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let confirms = channel.confirm_select(Default::default());
                    if !matches!(tokio::time::timeout(step, confirms).await, Ok(Ok(()))) {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    while !stop.load(Ordering::Relaxed) {
                        let body = serde_json::json!({"email": format!("p{next}@b.io"), "phase": "started"})
                            .to_string();
                        let props = BasicProperties::default()
                            .with_message_id(format!("evt-{next}").into());
                        let publish = async {
                            let confirm = channel
                                .basic_publish(
                                    exchange.as_str().into(),
                                    "trial.started".into(),
                                    BasicPublishOptions {
                                        mandatory: true,
                                        ..Default::default()
                                    },
                                    body.as_bytes(),
                                    props,
                                )
                                .await
                                .ok()?
                                .await
                                .ok()?;
                            (confirm.is_ack() && confirm.take_message().is_none()).then_some(())
                        };
                        match tokio::time::timeout(Duration::from_secs(10), publish).await {
                            Ok(Some(())) => {
                                confirmed.lock().expect("lock").push(next);
                                next += 1;
                                tokio::time::sleep(pause).await;
                            }
                            // Not confirmed: the same message again, on the next node.
                            _ => break,
                        }
                    }
                    let close = connection.close(200, "test publisher done".into());
                    let _ = tokio::time::timeout(step, close).await;
                }
            }
        });
        Self {
            confirmed,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.confirmed.lock().expect("lock").len()
    }

    /// Stops publishing; returns every confirmed message number.
    async fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        let confirmed = self.confirmed.lock().expect("lock").clone();
        confirmed
    }
}

/// A test's world on the cluster: names, the sandbox, the bridge as a child consuming a
/// quorum queue replicated on every node.
struct World {
    cluster: Cluster,
    names: Names,
    sandbox: Sandbox,
    config_path: PathBuf,
    bridge: Option<Bridge>,
}

impl World {
    /// Starts the bridge with `amqp.urls = bridge_urls`; waits until it is ready and its
    /// queue has an online member on every node.
    async fn start(cluster: &Cluster, test: &str, bridge_urls: &[String]) -> Self {
        let names = Names::new(&format!("t.cluster-{test}"));
        let sandbox = sandbox(auto_profiles()).await;
        let list = bridge_urls
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = TestConfig::test(&bridge_urls[0], &names, &sandbox.api_url())
            .layer(&format!("[amqp]\nurls = [{list}]\n"));
        let config_path = config.write_temp();
        let bridge = Bridge::command(
            Path::new(env!("CARGO_BIN_EXE_crisp-bridge")),
            &config_path,
            free_port(),
        )
        .env("RUST_LOG", "info,crisp_bridge=debug")
        .capture_output()
        .spawn()
        .await;
        cluster.await_replicated(&names.queue).await;
        Self {
            cluster: cluster.clone(),
            names,
            sandbox,
            config_path,
            bridge: Some(bridge),
        }
    }

    fn bridge(&self) -> &Bridge {
        self.bridge.as_ref().expect("the bridge runs")
    }

    fn events(&self) -> usize {
        self.sandbox.state.events().len()
    }

    /// The node the bridge is connected to.
    async fn bridge_node(&self) -> String {
        eventually_within(
            Duration::from_secs(30),
            "the bridge's connection on a node",
            || async {
                let nodes = self.cluster.nodes_with_connection("crisp-bridge/").await;
                (nodes.len() == 1).then(|| nodes[0].clone())
            },
        )
        .await
    }

    /// Waits until the sandbox got `min` events; on a timeout says what the publisher
    /// and the queue were doing, and what the bridge logged.
    async fn await_events(&self, min: usize, publisher: &Publisher) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.events() < min {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {min} events at the sandbox: {} events, {} \
                     confirmed by the publisher; queue (ready, unacked): {:?}; the \
                     bridge's last log lines but debug ones:\n{}",
                    self.events(),
                    publisher.count(),
                    self.queue_depth().await,
                    self.bridge_log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the publisher has `min` messages confirmed: the messages a later
    /// [`World::await_events`] waits for exist.
    async fn await_published(&self, min: usize, publisher: &Publisher) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while publisher.count() < min {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for the publisher's {min}th confirm: {} confirmed; \
                     queue (ready, unacked): {:?}",
                    publisher.count(),
                    self.queue_depth().await,
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The last `n` lines the bridge logged, debug lines left out (one a message).
    fn bridge_log_tail(&self, n: usize) -> String {
        let output = self.bridge().output();
        let lines: Vec<&str> = output
            .lines()
            .filter(|l| !l.contains("\"DEBUG\"") && !l.contains(" DEBUG "))
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The queue's ready and unacked messages, asked of the first node that answers.
    async fn queue_depth(&self) -> Option<(String, String)> {
        for node in &self.cluster.nodes {
            let args = [
                "-q",
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ];
            // Bounded: this runs when something already hangs.
            let asked =
                tokio::time::timeout(Duration::from_secs(10), self.cluster.ctl(node, &args));
            let Ok(Ok(out)) = asked.await else {
                continue;
            };
            return out.lines().find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next()? == self.names.queue)
                    .then(|| Some((words.next()?.to_owned(), words.next()?.to_owned())))
                    .flatten()
            });
        }
        None
    }

    /// How long after `failed` (when the sandbox held `before` events) more events than
    /// the bridge can have held unacked at that moment reached the sandbox: an upper
    /// bound of the time until the broker delivered to the bridge again.
    async fn failover(&self, what: &str, failed: Instant, before: usize) -> Duration {
        let state = self.sandbox.state.clone();
        let bound = FAILOVER_BOUND + Duration::from_secs(20);
        eventually_within(bound, &format!("events flowing again after {what}"), || {
            let n = state.events().len();
            async move { (n > before + PREFETCH).then_some(()) }
        })
        .await;
        let took = failed.elapsed();
        eprintln!("cluster failover: {what}: events flowing again after {took:.2?}");
        took
    }

    /// Stops the publisher, waits until every confirmed message reached the sandbox,
    /// checks the dead-letter queue is empty; prints and returns the duplicates.
    async fn settle(&mut self, test: &str, publisher: Publisher, failovers: &[Duration]) {
        let confirmed = publisher.finish().await;
        let state = self.sandbox.state.clone();
        let want: HashSet<String> = confirmed.iter().map(|i| format!("p{i}@b.io")).collect();
        let delivered = eventually_within(
            Duration::from_secs(120),
            &format!("all {} confirmed messages at the sandbox", want.len()),
            || {
                let events = state.events();
                let want = &want;
                async move {
                    let people: HashSet<String> =
                        events.iter().map(|e| e.people_id.clone()).collect();
                    want.is_subset(&people).then_some(events)
                }
            },
        )
        .await;
        let distinct: HashSet<&str> = delivered.iter().map(|e| e.people_id.as_str()).collect();
        let duplicates = delivered.len() - distinct.len();
        let live = self.live_url().await;
        let broker = BrokerClient::connect_to(&live).await;
        assert_eq!(
            broker.ready(&self.names.dlq).await,
            0,
            "nothing is dead-lettered"
        );
        let secs: Vec<String> = failovers
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect();
        eprintln!(
            "cluster result: {test}: {} confirmed, 0 lost, {duplicates} duplicate(s), failover(s) [{}] s",
            confirmed.len(),
            secs.join(", ")
        );
        for took in failovers {
            assert!(
                *took < FAILOVER_BOUND,
                "consuming again took {took:?} (bound {FAILOVER_BOUND:?})\n{}",
                self.bridge().output()
            );
        }
    }

    /// The URL of a node that answers.
    async fn live_url(&self) -> String {
        for (node, url) in self.cluster.nodes.iter().zip(&self.cluster.urls) {
            if self
                .cluster
                .ctl(node, &["await_startup", "--timeout", "2"])
                .await
                .is_ok()
            {
                return url.clone();
            }
        }
        panic!("no cluster node answers");
    }
}

impl Drop for World {
    fn drop(&mut self) {
        drop(self.bridge.take());
        let _ = std::fs::remove_file(&self.config_path);
        for url in &self.cluster.urls {
            delete_topology_at(url, &self.names);
        }
    }
}

/// Stops the node the bridge is connected to, and starts it again.
async fn stop_the_bridges_node(cluster: Cluster, test: &str, bridge_urls: Vec<String>) {
    let mut world = World::start(&cluster, test, &bridge_urls).await;
    let publisher = Publisher::start(
        cluster.urls.clone(),
        world.names.exchange.clone(),
        Duration::from_millis(5),
    );
    world.await_events(100, &publisher).await;
    let node = world.bridge_node().await;
    let before = world.events();
    let failed = Instant::now();
    cluster.stop_app(&node).await;
    let took = world
        .failover(&format!("{test}: stop_app {node}"), failed, before)
        .await;
    let other = world.bridge_node().await;
    assert_ne!(other, node, "the bridge is on another node now");
    cluster.start_app(&node).await;
    cluster.await_replicated(&world.names.queue).await;
    // 50 more messages, published after the node is back, reach Crisp.
    let target = publisher.count() + 50;
    world.await_published(target, &publisher).await;
    world.await_events(target, &publisher).await;
    world.settle(test, publisher, &[took]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridges_node_stopped_with_every_url_given() {
    on_cluster(
        "the_bridges_node_stopped_with_every_url_given",
        |c| async move {
            let urls = c.urls.clone();
            stop_the_bridges_node(c, "stop-urls", urls).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridges_node_stopped_behind_a_load_balancer() {
    // One address, as a Kubernetes Service gives: haproxy's health check takes the
    // stopped node out, the bridge's reconnect lands on a live one.
    on_cluster(
        "the_bridges_node_stopped_behind_a_load_balancer",
        |c| async move {
            let urls = vec![c.lb_url.clone()];
            stop_the_bridges_node(c, "stop-lb", urls).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quorum_leaders_node_killed_mid_drain() {
    on_cluster(
        "the_quorum_leaders_node_killed_mid_drain",
        |cluster| async move {
            let test = "leader-killed";
            let mut world = World::start(&cluster, test, &cluster.urls).await;
            // A backlog, so the bridge is draining when the leader dies.
            let seed = BrokerClient::connect_to(&cluster.urls[0]).await;
            for i in 0..300 {
                let body =
                    serde_json::json!({"email": format!("seed{i}@b.io"), "phase": "started"});
                seed.publish(
                    &world.names.exchange,
                    "trial.started",
                    body.to_string().as_bytes(),
                    BasicProperties::default().with_message_id(format!("seed-{i}").into()),
                )
                .await;
            }
            drop(seed);
            let publisher = Publisher::start(
                cluster.urls.clone(),
                world.names.exchange.clone(),
                Duration::from_millis(5),
            );
            world.await_events(50, &publisher).await;
            let leader = cluster.leader(&world.names.queue).await;
            let on = world.bridge_node().await;
            let before = world.events();
            let failed = Instant::now();
            cluster.kill(&leader).await;
            let took = world
                .failover(
                    &format!("{test}: SIGKILL {leader} (leader; bridge on {on})"),
                    failed,
                    before,
                )
                .await;
            let queue = world.names.queue.clone();
            eventually_within(
                Duration::from_secs(30),
                "another member to lead",
                || async {
                    let now = cluster.leader(&queue).await;
                    (now != leader).then_some(())
                },
            )
            .await;
            cluster.ensure_all().await;
            cluster.await_replicated(&world.names.queue).await;
            let target = publisher.count() + 50;
            world.await_published(target, &publisher).await;
            world.await_events(300 + target, &publisher).await;
            world.settle(test, publisher, &[took]).await;
            let seeds: HashSet<String> = world
                .sandbox
                .state
                .events()
                .iter()
                .filter(|e| e.people_id.starts_with("seed"))
                .map(|e| e.people_id.clone())
                .collect();
            assert_eq!(seeds.len(), 300, "every message of the backlog arrived");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node() {
    on_cluster("a_rolling_restart_of_every_node", |cluster| async move {
        let test = "rolling";
        let mut world = World::start(&cluster, test, &cluster.urls).await;
        let publisher = Publisher::start(
            cluster.urls.clone(),
            world.names.exchange.clone(),
            Duration::from_millis(5),
        );
        world.await_events(100, &publisher).await;
        let mut failovers = Vec::new();
        for node in cluster.nodes.clone() {
            let on = world.bridge_node().await;
            let before = world.events();
            let failed = Instant::now();
            cluster.stop_app(&node).await;
            let took = world
                .failover(
                    &format!("{test}: stop_app {node} (bridge on {on})"),
                    failed,
                    before,
                )
                .await;
            failovers.push(took);
            cluster.start_app(&node).await;
            cluster.await_replicated(&world.names.queue).await;
        }
        let target = publisher.count() + 50;
        world.await_published(target, &publisher).await;
        world.await_events(target, &publisher).await;
        world.settle(test, publisher, &failovers).await;
    })
    .await;
}
