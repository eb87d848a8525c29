//! Wiring: admin server, broker session loop, pipeline, and the ordered shutdown.

use crate::admin::{self, Health};
use crate::broker;
use crate::broker::acks::Acks;
use crate::config::{Config, Validated};
use crate::crisp::CrispClient;
use crate::pipeline::{Backoff, Jitter, Pipeline, PipelineSettings};
use crate::telemetry::metrics;
use axum::serve::ListenerExt;
use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use lapin::Consumer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest wait for the broker to answer a close; the process exits regardless.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Send buffer of each admin connection (the kernel doubles it for its bookkeeping).
const ADMIN_SEND_BUFFER: usize = 64 * 1024;

/// Longest wait for admin connections to close at shutdown (a stuck tap reader).
const ADMIN_STOP_TIMEOUT: Duration = Duration::from_millis(250);

/// Longest wait between two broker connection attempts.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

pub struct App {
    config: Arc<Config>,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
    admin: TcpListener,
}

impl App {
    /// Builds everything that needs no broker: the Crisp client, the pipeline, and the
    /// bound admin listener (so a port conflict fails before any consuming starts).
    pub async fn build(validated: Validated) -> anyhow::Result<Self> {
        let Validated {
            config,
            router,
            listen,
        } = validated;
        let client = CrispClient::new(&config.crisp).map_err(anyhow::Error::msg)?;
        let admin = TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (server.listen): {e}"))?;
        let pipeline = Pipeline::new(
            router,
            client,
            PipelineSettings {
                delivery: config.delivery.clone(),
                create_missing_profiles: config.crisp.create_missing_profiles,
                dead_letter_exchange: config.amqp.dead_letter_exchange.clone(),
                max_message_bytes: config.amqp.max_message_bytes,
                hand_back_after: config.amqp.consumer_timeout / 2,
                redeclare: config.amqp.declare.then(|| Arc::new(config.amqp.clone())),
                leave_to_broker_at_shutdown: config.amqp.single_active_consumer,
                queue: config.amqp.queue.clone(),
            },
        );
        let health = Arc::new(Health::new(pipeline.flow()));
        Ok(Self {
            config: Arc::new(config),
            pipeline,
            health,
            admin,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Runs until `shutdown` is cancelled, then stops in order: stop consuming, requeue
    /// what has not started, finish in-flight deliveries within `shutdown_timeout`,
    /// close the channel and the connection.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let admin_stop = CancellationToken::new();
        let admin = {
            let handle = metrics::install();
            let rules: Vec<&str> = self.pipeline.router().rule_names().collect();
            metrics::register(&rules);
            // Histogram samples pile up in the recorder until drained: without this, memory
            // grows with every message between scrapes (or forever, when nobody scrapes).
            let upkeep = handle.clone();
            let stop = admin_stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => upkeep.run_upkeep(),
                        _ = stop.cancelled() => return,
                    }
                }
            });
            let router = admin::router(Arc::clone(&self.health), handle, self.pipeline.tap());
            let stop = admin_stop.clone();
            // A fixed send buffer per admin connection: the kernel would otherwise grow it
            // to `net.ipv4.tcp_wmem`'s maximum (4 MiB) for a `/tap` reader that stopped
            // reading.
            let listener = self.admin.tap_io(|tcp| {
                let _ = socket2::SockRef::from(&*tcp).set_send_buffer_size(ADMIN_SEND_BUFFER);
            });
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            })
        };
        let session = Session {
            config: Arc::clone(&self.config),
            pipeline: Arc::clone(&self.pipeline),
            health: Arc::clone(&self.health),
            stopping_since: OnceLock::new(),
        };
        let ended = session.run(&shutdown).await;
        // Tap streams end here; one whose reader stopped reading cannot finish sending,
        // so the admin server gets a bounded wait.
        self.pipeline.tap().close();
        admin_stop.cancel();
        let admin_abort = admin.abort_handle();
        match tokio::time::timeout(ADMIN_STOP_TIMEOUT, admin).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "admin server stopped with an error"),
            Ok(_) => {}
            Err(_) => {
                admin_abort.abort();
                tracing::info!(
                    "closed admin connections still open (a tap reader that stopped reading?)"
                );
            }
        }
        ended?;
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

struct Session {
    config: Arc<Config>,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
    /// When shutdown began (every wait after it is bounded from here).
    stopping_since: OnceLock<Instant>,
}

/// How a consuming session ended.
enum SessionEnd {
    /// Shutdown began; this is when `shutdown_timeout` runs out.
    Shutdown,
    BrokerLost(String),
}

impl Session {
    /// Connects, consumes and reconnects until shutdown; only a queue that exists with
    /// other arguments (no retry can change it) ends it early.
    async fn run(&self, shutdown: &CancellationToken) -> Result<(), broker::QueueMismatch> {
        let reconnects = Backoff {
            initial: Duration::from_secs(1),
            max: MAX_RECONNECT_BACKOFF,
            jitter: Jitter::Equal,
        };
        // Full rounds of every URL without a connection: the backoff grows with them.
        let mut rounds: u32 = 0;
        // Which URL is next, counting round and round; a failed or lost connection moves
        // on to the next node.
        let mut turn: usize = 0;
        let mut failed_in_round: usize = 0;
        while !shutdown.is_cancelled() {
            let connected = tokio::select! {
                c = self.connect(turn) => c,
                _ = shutdown.cancelled() => break,
            };
            let connected = match connected {
                Ok(connected) => connected,
                Err(broker::ConnectError::QueueArguments(mismatch)) => {
                    self.health.set_broker(false);
                    self.pipeline
                        .shutdown(Instant::now(), Instant::now() + Duration::from_secs(1))
                        .await;
                    return Err(mismatch);
                }
                Err(e) => {
                    metrics::broker_connect(false);
                    self.health.set_broker(false);
                    turn = turn.wrapping_add(1);
                    failed_in_round += 1;
                    let nodes = self.config.amqp.current_urls().len().max(1);
                    if failed_in_round < nodes {
                        // The error names the node (its password masked) and the key.
                        tracing::warn!(error = %e, "cannot connect to RabbitMQ; trying the next node");
                        continue;
                    }
                    failed_in_round = 0;
                    let wait = reconnects.delay(rounds);
                    rounds = rounds.saturating_add(1);
                    tracing::warn!(error = %e, attempt = rounds, nodes, retry_in_ms = wait.as_millis() as u64, "cannot connect to RabbitMQ; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            metrics::broker_connect(true);
            rounds = 0;
            failed_in_round = 0;
            let node = &connected.node;
            tracing::info!(node = %node, "connected to RabbitMQ");
            self.health.set_broker(true);
            let end = self.consume(&connected, shutdown).await;
            self.health.set_broker(false);
            match end {
                SessionEnd::Shutdown => {
                    // Whatever is left of the second after shutdown_timeout.
                    let closing = connected
                        .connection
                        .close(200, "crisp-bridge stopping".into());
                    let _ = tokio::time::timeout_at(self.give_up_at(), closing).await;
                    return Ok(());
                }
                SessionEnd::BrokerLost(why) => {
                    // The next node first: this one may be the one going away.
                    turn = turn.wrapping_add(1);
                    tracing::warn!(node = %node, error = %why, "lost the broker connection; reconnecting (unacked messages return to the queue)")
                }
            }
        }
        // Stopped while not connected: deliveries of the lost connection went back to
        // the queue already; lanes still running give up at once.
        let now = Instant::now();
        self.pipeline
            .shutdown(now, now + Duration::from_secs(1))
            .await;
        Ok(())
    }

    /// When shutdown must be over: `shutdown_timeout` after the signal, plus a second
    /// for the goodbyes to the broker.
    fn give_up_at(&self) -> Instant {
        self.stopping_since() + self.config.delivery.shutdown_timeout + Duration::from_secs(1)
    }

    fn stopping_since(&self) -> Instant {
        *self.stopping_since.get_or_init(Instant::now)
    }

    async fn connect(&self, turn: usize) -> Result<broker::Connected, broker::ConnectError> {
        let amqp = &self.config.amqp;
        let connected = broker::connect(amqp, turn).await?;
        if amqp.declare {
            let connection = &connected.connection;
            let declaring =
                async {
                    let channel = connection.create_channel().await.map_err(|source| {
                        broker::BrokerError {
                            what: "opening a channel to declare the topology".into(),
                            source,
                        }
                    })?;
                    broker::declare_topology(&channel, amqp, &self.pipeline.router().patterns())
                        .await?;
                    let _ = channel.close(200, "topology declared".into()).await;
                    Ok::<_, broker::ConnectError>(())
                };
            let after = broker::SETUP_STEP_TIMEOUT;
            match tokio::time::timeout(after, declaring).await {
                Ok(declared) => declared?,
                Err(_) => {
                    connected.give_up();
                    return Err(broker::ConnectError::Silent {
                        node: connected.node.clone(),
                        step: "declaring the topology",
                        after,
                    });
                }
            }
        }
        Ok(connected)
    }

    /// Consumes on `connection` until shutdown or until the connection is lost. Holds
    /// (Crisp refusing us, down, out of quota) do not end it: the deliveries stay with
    /// the pod, so no hold cycle counts against their delivery limit.
    async fn consume(
        &self,
        connected: &broker::Connected,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let amqp = &self.config.amqp;
        let connection = &connected.connection;
        let tag = format!("crisp-bridge-{}", uuid::Uuid::new_v4());
        // Dropping a lapin consumer cancels it: it lives until the channel is closed.
        let starting = broker::consume(connection, amqp, &tag);
        let (channel, mut consumer) =
            match tokio::time::timeout(broker::SETUP_STEP_TIMEOUT, starting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return SessionEnd::BrokerLost(e.to_string()),
                Err(_) => {
                    connected.give_up();
                    return SessionEnd::BrokerLost(format!(
                        "starting the consumer took over {}s",
                        broker::SETUP_STEP_TIMEOUT.as_secs()
                    ));
                }
            };
        self.health.set_consuming(true);
        tracing::info!(queue = %amqp.queue, prefetch = amqp.prefetch, "consuming");
        let acks = Arc::new(Acks::new(
            channel.clone(),
            amqp.prefetch,
            self.pipeline.stopping(),
        ));
        tokio::spawn(Arc::clone(&acks).run());
        let end = self.pump(&acks, &mut consumer, shutdown).await;
        self.health.set_consuming(false);
        match end {
            SessionEnd::Shutdown => {
                let deadline = self.stopping_since() + self.config.delivery.shutdown_timeout;
                self.pipeline.shutdown(deadline, self.give_up_at()).await;
                let _ = tokio::time::timeout_at(self.give_up_at(), acks.close()).await;
                let closing = channel.close(200, "crisp-bridge stopping".into());
                let _ = tokio::time::timeout_at(self.give_up_at(), closing).await;
                drop(consumer);
            }
            SessionEnd::BrokerLost(_) => {
                acks.session_lost();
                // The broker requeues whatever we had not acked; stop the flusher.
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, acks.close()).await;
            }
        }
        end
    }

    async fn pump(
        &self,
        acks: &Arc<Acks>,
        consumer: &mut Consumer,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let channel = acks.channel();
        // Made once per session, not once per delivery: registering and dropping this
        // waiter for every message was a visible share of the CPU.
        let stopping = shutdown.cancelled();
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopping => break,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => self.pipeline.handle(Arc::clone(acks), delivery),
                    Some(Err(e)) => return SessionEnd::BrokerLost(e.to_string()),
                    None => return SessionEnd::BrokerLost("the broker cancelled our consumer".into()),
                },
            }
        }
        self.stopping_since();
        if self.config.amqp.single_active_consumer {
            // No cancel: RabbitMQ would make a standby active at once, while this pod
            // still holds earlier messages. The consumer ends with the channel, and what
            // it was sent and did not start goes back with it, in order.
            return SessionEnd::Shutdown;
        }
        // Stop the flow, then hand back what was prefetched but not started; a broker
        // that does not answer must not hold the shutdown past its bound.
        let tag = consumer.tag();
        let cancel = channel.basic_cancel(tag, BasicCancelOptions::default());
        match tokio::time::timeout_at(self.give_up_at(), cancel).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cancelling the consumer failed; closing the channel will requeue instead")
            }
            Err(_) => tracing::warn!("the broker did not answer our consumer's cancel in time"),
        }
        let mut requeued = 0u32;
        let handing_back = async {
            while let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
            {
                self.pipeline.hand_back(acks, &delivery).await;
                requeued += 1;
            }
        };
        let _ = tokio::time::timeout_at(self.give_up_at(), handing_back).await;
        if requeued > 0 {
            tracing::info!(
                requeued,
                "requeued prefetched messages that had not started"
            );
        }
        SessionEnd::Shutdown
    }
}
