//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`, `/tap`.

use crate::pipeline::{Flow, FlowState};
use crate::telemetry::tap::{self, Filter, Tap};
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Readiness latches: ready = broker connected AND consuming AND Crisp not refusing us.
#[derive(Debug)]
pub struct Health {
    broker_connected: AtomicBool,
    consuming: AtomicBool,
    /// Read only: the flow component owns its state.
    flow: Arc<Flow>,
}

impl Health {
    pub fn new(flow: Arc<Flow>) -> Self {
        Self {
            broker_connected: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            flow,
        }
    }

    pub fn set_broker(&self, up: bool) {
        self.broker_connected.store(up, Ordering::Release);
    }

    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::Release);
    }

    /// Why the pod is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<&'static str> {
        let flow = self.flow.state();
        if !self.broker_connected.load(Ordering::Acquire) {
            Some("not connected to RabbitMQ")
        } else if flow == FlowState::Refused {
            Some("Crisp refuses our credentials, plan or website id, or redirects us (check crisp.api_url)")
        } else if matches!(flow, FlowState::Held { .. }) {
            Some("holding: Crisp keeps rate limiting us (daily quota?); messages wait")
        } else if flow == FlowState::DeadLettersBlocked {
            Some("dead-letter copies find no queue (amqp.dead_letter_queue missing?)")
        } else if !self.consuming.load(Ordering::Acquire) {
            Some("not consuming")
        } else {
            None
        }
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
    tap: Arc<Tap>,
}

pub fn router(health: Arc<Health>, metrics: PrometheusHandle, tap: Arc<Tap>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/tap", get(stream_tap))
        .with_state(AdminState {
            health,
            metrics,
            tap,
        })
}

/// `GET /tap?rule=NAME&outcome=OUTCOME` (each repeatable): one JSON line per message
/// decision, as they happen, until the client goes or the bridge stops. A client too
/// slow for them loses lines (counted), never delays a message.
async fn stream_tap(
    State(state): State<AdminState>,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    let filter = match Filter::parse(query.as_deref().unwrap_or("")) {
        Ok(filter) => filter,
        Err(why) => {
            return (StatusCode::BAD_REQUEST, format!("bad /tap filter: {why}\n")).into_response()
        }
    };
    let Some(lines) = state.tap.subscribe(filter) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} tap subscribers listen already (the most at once); try again later\n",
                tap::MAX_SUBSCRIBERS
            ),
        )
            .into_response();
    };
    let stream = futures_util::stream::unfold(lines, |mut lines| async move {
        let line = lines.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(line), lines))
    });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.health.not_ready() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
