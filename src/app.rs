//! Wiring: admin server, broker session loop, pipeline, and the ordered shutdown.

use crate::admin::{self, Health};
use crate::broker;
use crate::broker::acks::Acks;
use crate::config::{redact_url, Config, Validated};
use crate::crisp::CrispClient;
use crate::pipeline::{FlowState, Pipeline, PipelineSettings};
use crate::telemetry::metrics;
use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;
use lapin::{Connection, Consumer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Longest wait for the broker to answer a close; the process exits regardless.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait between two broker connection attempts.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

/// Why a consuming session ended.
enum SessionEnd {
    Shutdown,
    /// Crisp refuses us, or a rate-limit hold began.
    Paused,
    BrokerLost(String),
}

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
            },
        );
        let health = Arc::new(Health::new(Arc::clone(&pipeline.flow)));
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

    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
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
            let router = admin::router(Arc::clone(&self.health), handle);
            let stop = admin_stop.clone();
            let listener = self.admin;
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
        };
        session.run(&shutdown).await;
        admin_stop.cancel();
        if let Ok(Err(e)) = admin.await {
            tracing::warn!(error = %e, "admin server stopped with an error");
        }
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

struct Session {
    config: Arc<Config>,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
}

impl Session {
    async fn run(&self, shutdown: &CancellationToken) {
        let amqp = &self.config.amqp;
        let mut attempt: u32 = 0;
        while !shutdown.is_cancelled() {
            let connected = tokio::select! {
                c = self.connect() => c,
                _ = shutdown.cancelled() => break,
            };
            let connection = match connected {
                Ok(connection) => connection,
                Err(e) => {
                    metrics::broker_connect(false);
                    self.health.set_broker(false);
                    let wait =
                        Duration::from_secs(1u64 << attempt.min(5)).min(MAX_RECONNECT_BACKOFF);
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, retry_in_s = wait.as_secs(), url = %redact_url(amqp.url.expose()), "cannot connect to RabbitMQ; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            metrics::broker_connect(true);
            attempt = 0;
            self.health.set_broker(true);
            let lost = self.consume_until_lost(&connection, shutdown).await;
            self.health.set_broker(false);
            match lost {
                None => {
                    let closing = connection.close(200, "crisp-bridge stopping".into());
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
                    return;
                }
                Some(why) => {
                    tracing::warn!(error = %why, "lost the broker connection; reconnecting (unacked messages return to the queue)")
                }
            }
        }
        self.pipeline
            .shutdown(self.config.delivery.shutdown_timeout)
            .await;
    }

    async fn connect(&self) -> Result<Connection, broker::ConnectError> {
        let amqp = &self.config.amqp;
        let connection = broker::connect(amqp).await?;
        if amqp.declare {
            let channel =
                connection
                    .create_channel()
                    .await
                    .map_err(|source| broker::BrokerError {
                        what: "opening a channel to declare the topology".into(),
                        source,
                    })?;
            broker::declare_topology(&channel, amqp, &self.pipeline.router().patterns()).await?;
            let _ = channel.close(200, "topology declared".into()).await;
        }
        Ok(connection)
    }

    /// Consumes on `connection`, pausing while Crisp refuses us or a rate-limit hold lasts.
    /// Returns `None` after a graceful shutdown, or why the connection was lost.
    async fn consume_until_lost(
        &self,
        connection: &Connection,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let amqp = &self.config.amqp;
        loop {
            let flow = &self.pipeline.flow;
            if matches!(flow.state(), FlowState::Refused | FlowState::Outage) {
                self.pipeline.wait_until_crisp_accepts(shutdown).await;
            }
            if let FlowState::Held { until } = flow.state() {
                tracing::info!(
                    resume_in_s = until
                        .saturating_duration_since(tokio::time::Instant::now())
                        .as_secs(),
                    "holding: consumption paused for Crisp's rate limit"
                );
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            // Also clears a hold that expired before we got here, which would otherwise
            // end every consuming session at once.
            flow.clear_hold();
            if shutdown.is_cancelled() {
                self.pipeline
                    .shutdown(self.config.delivery.shutdown_timeout)
                    .await;
                return None;
            }
            let tag = format!("crisp-bridge-{}", uuid::Uuid::new_v4());
            let (channel, consumer) = match broker::consume(connection, amqp, &tag).await {
                Ok(c) => c,
                Err(e) => return Some(e.to_string()),
            };
            self.health.set_consuming(true);
            tracing::info!(queue = %amqp.queue, prefetch = amqp.prefetch, "consuming");
            let acks = Arc::new(Acks::new(channel.clone(), amqp.prefetch));
            tokio::spawn(Arc::clone(&acks).run());
            let end = self.pump(&acks, consumer, shutdown).await;
            self.health.set_consuming(false);
            match end {
                SessionEnd::Shutdown => {
                    self.pipeline
                        .shutdown(self.config.delivery.shutdown_timeout)
                        .await;
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, acks.close()).await;
                    let _ = channel.close(200, "crisp-bridge stopping".into()).await;
                    return None;
                }
                SessionEnd::Paused => {
                    // Held deliveries requeue at once; then let go of the channel so
                    // nothing stays reserved for this pod while it waits.
                    self.pipeline.wait_idle().await;
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, acks.close()).await;
                    let closing = channel.close(200, "crisp-bridge pausing".into());
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
                }
                SessionEnd::BrokerLost(why) => {
                    // The broker requeues whatever we had not acked; stop the flusher.
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, acks.close()).await;
                    return Some(why);
                }
            }
        }
    }

    async fn pump(
        &self,
        acks: &Arc<Acks>,
        mut consumer: Consumer,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let channel = acks.channel();
        // Made once per session, not once per delivery: registering and dropping these
        // waiters for every message was a visible share of the CPU (issue 10).
        let stopping = shutdown.cancelled();
        let closed = self.pipeline.flow.closed();
        tokio::pin!(stopping, closed);
        let end = loop {
            tokio::select! {
                biased;
                _ = &mut stopping => break SessionEnd::Shutdown,
                _ = &mut closed => break SessionEnd::Paused,
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => self.pipeline.handle(Arc::clone(acks), delivery),
                    Some(Err(e)) => return SessionEnd::BrokerLost(e.to_string()),
                    None => return SessionEnd::BrokerLost("the broker cancelled our consumer".into()),
                },
            }
        };
        // Stop the flow, then hand back what was prefetched but not started.
        let tag = consumer.tag();
        if let Err(e) = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
        {
            tracing::warn!(error = %e, "cancelling the consumer failed; closing the channel will requeue instead");
        }
        let mut requeued = 0u32;
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        {
            self.pipeline.hand_back(acks, &delivery).await;
            requeued += 1;
        }
        if requeued > 0 {
            tracing::info!(
                requeued,
                "requeued prefetched messages that had not started"
            );
        }
        end
    }
}
