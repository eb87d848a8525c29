//! `/_sandbox/*`: read back what the sandbox received, and rehearse failures.

use super::{Fault, SandboxState};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

pub(super) fn routes() -> Router<SandboxState> {
    Router::new()
        .route("/", get(summary))
        .route("/_sandbox/events", get(events).delete(clear))
        .route("/_sandbox/attempts", get(attempts))
        .route("/_sandbox/faults", post(faults))
        .route("/_sandbox/settings", post(settings))
        .route("/_sandbox/profiles", post(add_profile))
}

async fn summary(State(state): State<SandboxState>) -> String {
    let inner = state.lock();
    let mut out = format!(
        "crisp-bridge sandbox: {} event(s) received, {} request(s), {} profile(s)\n\
         read them as JSON: GET /_sandbox/events; inject faults: POST /_sandbox/faults\n\n",
        inner.events.len(),
        inner.attempts.len(),
        inner.profiles.len()
    );
    for e in &inner.events {
        out.push_str(&format!("{}  {}  {}\n", e.people_id, e.text, e.body));
    }
    out
}

async fn events(State(state): State<SandboxState>) -> impl IntoResponse {
    Json(state.events())
}

async fn attempts(State(state): State<SandboxState>) -> impl IntoResponse {
    Json(state.attempts())
}

async fn clear(State(state): State<SandboxState>) -> StatusCode {
    let mut inner = state.lock();
    inner.events.clear();
    inner.attempts.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Fault),
    Many(Vec<Fault>),
}

/// Queues faults for the next event POSTs: `{"status": 503, "times": 2}`,
/// `{"status": 429, "retry_after": "1"}`, `{"delay_ms": 500}`, `{"status": 502, "body": "<html>"}`.
async fn faults(State(state): State<SandboxState>, Json(body): Json<OneOrMany>) -> StatusCode {
    let list = match body {
        OneOrMany::One(f) => vec![f],
        OneOrMany::Many(v) => v,
    };
    for fault in list {
        state.push_fault(fault);
    }
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Answer 401 to everything, as if the key had been revoked.
    refuse: Option<bool>,
    identifier: Option<String>,
    key: Option<String>,
    auto_create_profiles: Option<bool>,
    /// Enforce Crisp's published chatbox event limits (400 `invalid_data` beyond).
    event_limits: Option<bool>,
    /// 200 or 201 for accepted events (Crisp's choice is unconfirmed).
    success_status: Option<u16>,
    latency_ms: Option<u64>,
    clear_faults: Option<bool>,
    /// Crisp is down: every Crisp route answers this status (e.g. 503) until set to 0.
    down_status: Option<u16>,
    /// Event POSTs allowed in any 1 s window, shared by every client; 429 beyond (0: off).
    rate_limit: Option<u32>,
    /// Send `Retry-After` (seconds until a request fits) with rate-limit answers
    /// (default off).
    rate_limit_retry_after: Option<bool>,
    /// How the limit is counted: `sliding_window` (default), `token_bucket`,
    /// `fixed_window` (each second), `fixed_window_minute` (each minute, 60 × the rate).
    rate_limit_shape: Option<super::LimiterShape>,
    /// Routes failing on their own: `{"add_event": {"status": 503}}`, `{"add_event":
    /// {"status": 403, "reason": "restricted_route_tier"}}`; `null` restores a route.
    route_status: Option<std::collections::HashMap<super::Route, Option<super::RouteStatus>>>,
}

async fn settings(State(state): State<SandboxState>, Json(s): Json<Settings>) -> impl IntoResponse {
    let mut inner = state.lock();
    if let Some(v) = s.refuse {
        inner.refuse = v;
    }
    if let Some(v) = s.identifier {
        inner.options.identifier = v;
    }
    if let Some(v) = s.key {
        inner.options.key = v;
    }
    if let Some(v) = s.auto_create_profiles {
        inner.options.auto_create_profiles = v;
    }
    if let Some(v) = s.event_limits {
        inner.options.event_limits = v;
    }
    if let Some(v) = s.success_status {
        if !(200..300).contains(&v) {
            return (StatusCode::BAD_REQUEST, "success_status must be 2xx").into_response();
        }
        inner.success_status = v;
    }
    if let Some(v) = s.latency_ms {
        inner.latency = Duration::from_millis(v);
    }
    if let Some(v) = s.down_status {
        inner.down_status = (v != 0).then_some(v);
    }
    if s.rate_limit.is_some() || s.rate_limit_shape.is_some() {
        let current = inner.rate_limit.as_ref();
        let per_second = s.rate_limit.or(current.map(|l| l.per_second()));
        let retry_after = s
            .rate_limit_retry_after
            .or(current.map(|l| l.retry_after))
            .unwrap_or(false);
        let shape = s
            .rate_limit_shape
            .or(current.map(|l| l.shape()))
            .unwrap_or_default();
        // Set anew, even to the same numbers: a limit that changes mid-run starts
        // counting from the change.
        inner.rate_limit = per_second
            .filter(|r| *r > 0)
            .map(|r| super::RateLimit::new(r, retry_after, shape));
    }
    for (route, status) in s.route_status.unwrap_or_default() {
        match status {
            Some(st) => inner.route_status.insert(route, st),
            None => inner.route_status.remove(&route),
        };
    }
    if s.clear_faults == Some(true) {
        inner.faults.clear();
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct NewProfile {
    email: String,
}

async fn add_profile(
    State(state): State<SandboxState>,
    Json(p): Json<NewProfile>,
) -> impl IntoResponse {
    Json(json!({ "people_id": state.add_profile(&p.email) }))
}
