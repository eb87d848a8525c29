//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`.

use crate::pipeline::{Flow, FlowState};
use axum::extract::State;
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
}

pub fn router(health: Arc<Health>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { health, metrics })
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
