//! The Crisp routes crisp-bridge uses, answered the way `docs/crisp-api.md` says Crisp
//! answers them.

use super::raw::{raw_lines, RAW_LINES_HEADER, SINGLETON_HEADERS, VIOLATION_HEADER};
use super::{Attempt, Fault, Inner, ReceivedEvent, Route, SandboxState};
use crate::outcome::mask_people_id;
use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

const COLORS: [&str; 10] = [
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "grey", "black",
];

pub(super) fn routes(state: SandboxState) -> Router<SandboxState> {
    // Requests a test or a user makes to read back are not Crisp attempts.
    let read_back = Router::new()
        .route(
            "/v1/website/{website_id}/people/events/{people_id}/list/{page}",
            get(list_events),
        )
        .route_layer(middleware::from_fn(strict));
    Router::new()
        .route(
            "/v1/website/{website_id}/people/events/{people_id}",
            post(add_event),
        )
        .route(
            "/v1/website/{website_id}/people/profile",
            post(create_profile),
        )
        .route(
            "/v1/website/{website_id}/people/profile/{people_id}",
            get(get_profile),
        )
        .route_layer(middleware::from_fn(strict))
        // Outermost, so refused requests are recorded too.
        .route_layer(middleware::from_fn_with_state(state, record))
        .merge(read_back)
}

/// Refuses what a strict HTTP front end refuses, before any Crisp logic: a repeated
/// singleton header, or a POST whose body is not declared `application/json`.
async fn strict(request: Request, next: Next) -> Response {
    match refusal(request.method(), request.headers()) {
        Some(response) => response,
        None => next.run(request).await,
    }
}

fn refusal(method: &Method, headers: &HeaderMap) -> Option<Response> {
    // Seen on the raw bytes, before hyper merged identical repeats.
    if let Some(repeated) = headers.get(VIOLATION_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(bad_request(
            "duplicate_header",
            format!("repeated singleton header(s) {repeated} (name=count); each may appear once (RFC 9110)"),
        ));
    }
    for name in SINGLETON_HEADERS {
        let count = headers.get_all(name).iter().count();
        if count > 1 {
            return Some(bad_request(
                "duplicate_header",
                format!("header `{name}` appears {count} times; it may appear once (RFC 9110)"),
            ));
        }
    }
    if method == Method::POST {
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
        let is_json = content_type.is_some_and(|c| {
            let media = c.split(';').next().unwrap_or_default().trim();
            media.eq_ignore_ascii_case("application/json")
        });
        if !is_json {
            return Some(bad_request(
                "invalid_content_type",
                format!(
                    "a POST must declare `Content-Type: application/json`, got {}",
                    content_type.map_or("none".to_owned(), |c| format!("`{c}`"))
                ),
            ));
        }
    }
    None
}

fn bad_request(reason: &str, message: String) -> Response {
    envelope(
        StatusCode::BAD_REQUEST,
        true,
        reason,
        json!({ "message": message }),
    )
}

/// Keeps each Crisp request (status and raw header lines) for `/_sandbox/attempts`.
async fn record(State(state): State<SandboxState>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let at_ms = now_ms();
    let header_lines = match request
        .headers()
        .get(RAW_LINES_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(raw) => redact(raw_lines(raw)),
        None => redact(header_lines(request.headers())),
    };
    let response = next.run(request).await;
    state.lock().attempts.push(Attempt {
        method,
        path,
        status: response.status().as_u16(),
        at_ms,
        header_lines,
    });
    response
}

fn header_lines(headers: &HeaderMap) -> Vec<String> {
    headers
        .iter()
        .filter(|(name, _)| *name != RAW_LINES_HEADER && *name != VIOLATION_HEADER)
        .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
        .collect()
}

/// Header lines fit to show: the credential of `Authorization` replaced by its length.
fn redact(lines: Vec<String>) -> Vec<String> {
    lines
        .into_iter()
        .map(|line| match line.split_once(':') {
            Some((name, value)) if name.trim().eq_ignore_ascii_case("authorization") => {
                match value.trim().split_once(' ') {
                    Some((scheme, credential)) => {
                        format!("{name}: {scheme} <redacted, {} bytes>", credential.len())
                    }
                    None => format!("{name}: <redacted>"),
                }
            }
            _ => line,
        })
        .collect()
}

fn envelope(status: StatusCode, error: bool, reason: &str, data: Value) -> Response {
    (
        status,
        axum::Json(json!({ "error": error, "reason": reason, "data": data })),
    )
        .into_response()
}

fn error(status: u16, reason: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    envelope(status, true, reason, json!({}))
}

/// Basic auth, then tier, then website: the order Crisp's gateway checks them in; then
/// a failing route's own answer.
fn authorize(
    inner: &Inner,
    headers: &HeaderMap,
    website_id: &str,
    route: Route,
) -> Result<(), Box<Response>> {
    if let Some(status) = inner.down_status {
        return Err(Box::new(error(status, "internal_error")));
    }
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let expected = format!("{}:{}", inner.options.identifier, inner.options.key);
    if inner.refuse || given.as_deref() != Some(expected.as_str()) {
        return Err(Box::new(error(401, "invalid_session")));
    }
    let tier = headers.get("x-crisp-tier").and_then(|v| v.to_str().ok());
    if tier != Some(inner.options.tier.as_str()) {
        return Err(Box::new(error(403, "restricted_route_tier")));
    }
    if !inner.options.website_ids.iter().any(|w| w == website_id) {
        return Err(Box::new(error(404, "not_subscribed")));
    }
    if let Some(failing) = inner.route_status.get(&route) {
        let reason = failing
            .reason
            .clone()
            .unwrap_or_else(|| default_reason(failing.status).to_owned());
        return Err(Box::new(error(failing.status, &reason)));
    }
    Ok(())
}

/// The limits Crisp published for chatbox events.
fn within_chatbox_limits(text: &str, data: &serde_json::Map<String, Value>) -> bool {
    use crate::route::chatbox;
    text.chars().count() <= chatbox::TEXT_CHARS
        && data.len() <= chatbox::DATA_KEYS
        && data.iter().all(|(key, value)| {
            (1..=chatbox::KEY_CHARS).contains(&key.chars().count())
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                && value
                    .as_str()
                    .is_none_or(|v| v.chars().count() <= chatbox::VALUE_CHARS)
        })
}

fn is_email(id: &str) -> bool {
    matches!(id.split_once('@'), Some((l, d)) if !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !id.chars().any(char::is_whitespace)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Takes the next fault for an event to `people_id`, if any, counting down its `times`.
fn next_fault(inner: &mut Inner, people_id: &str) -> Option<Fault> {
    let at = inner
        .faults
        .iter()
        .position(|f| f.people_id.as_deref().is_none_or(|p| p == people_id))?;
    let entry = &mut inner.faults[at];
    let fault = entry.clone();
    entry.times = entry.times.saturating_sub(1);
    if entry.times == 0 {
        inner.faults.remove(at);
    }
    Some(fault)
}

fn fault_response(fault: &Fault, status: u16) -> Response {
    let mut response = match &fault.body {
        Some(raw) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            raw.clone(),
        )
            .into_response(),
        None => error(status, default_reason(status)),
    };
    if let Some(v) = fault.retry_after.as_deref().and_then(|v| v.parse().ok()) {
        response.headers_mut().insert("retry-after", v);
    }
    response
}

/// The envelope reason Crisp gives with a status, as far as documented.
fn default_reason(status: u16) -> &'static str {
    match status {
        420 | 429 => "rate_limited",
        400 => "invalid_data",
        401 => "invalid_session",
        402 => "plan_required",
        403 => "restricted_route_tier",
        404 => "not_found",
        500..=599 => "internal_error",
        _ => "error",
    }
}

async fn add_event(
    State(state): State<SandboxState>,
    Path((website_id, people_id)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (fault, latency, limited) = {
        let mut inner = state.lock();
        let fault = next_fault(&mut inner, &people_id);
        // Judged on arrival, like a real limiter in front of the API.
        let limited = match inner.rate_limit.as_mut() {
            Some(limit) if fault.as_ref().and_then(|f| f.status).is_none() => limit
                .admit(std::time::Instant::now())
                .err()
                .map(|wait| limit.retry_after.then_some(wait)),
            _ => None,
        };
        (fault, inner.latency, limited)
    };
    let delay =
        latency + std::time::Duration::from_millis(fault.as_ref().map_or(0, |f| f.delay_ms));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(fault) = &fault {
        if let Some(status) = fault.status {
            return fault_response(fault, status);
        }
    }
    if let Some(retry_after) = limited {
        // Whole seconds, rounded up: when a request would fit again.
        let fault = Fault {
            retry_after: retry_after
                .map(|w| w.as_secs() + u64::from(w.subsec_nanos() > 0))
                .map(|secs| secs.max(1).to_string()),
            ..Fault::default()
        };
        return fault_response(&fault, 429);
    }
    accept_event(&state, website_id, people_id, &uri, &headers, &body)
}

fn accept_event(
    state: &SandboxState,
    website_id: String,
    people_id: String,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let mut inner = state.lock();
    if let Err(r) = authorize(&inner, headers, &website_id, Route::AddEvent) {
        return *r;
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(Value::Object(event)) = serde_json::from_slice::<Value>(body) else {
        return error(400, "invalid_data");
    };
    let text = match event.get("text") {
        Some(Value::String(t)) if !t.trim().is_empty() => t.clone(),
        _ => return error(400, "invalid_data"),
    };
    let color = match event.get("color") {
        None => None,
        Some(Value::String(c)) if COLORS.contains(&c.as_str()) => Some(c.clone()),
        Some(_) => return error(400, "invalid_data"),
    };
    let data = match event.get("data") {
        None => serde_json::Map::new(),
        Some(Value::Object(d))
            if d.values()
                .all(|v| v.is_string() || v.is_number() || v.is_boolean()) =>
        {
            d.clone()
        }
        Some(_) => return error(400, "invalid_data"),
    };
    if event
        .keys()
        .any(|k| !matches!(k.as_str(), "text" | "color" | "data"))
    {
        return error(400, "invalid_data");
    }
    if inner.options.event_limits && !within_chatbox_limits(&text, &data) {
        return error(400, "invalid_data");
    }
    let known = if is_email(&people_id) {
        inner.profile_for(&people_id).is_some() || {
            let create = inner.options.auto_create_profiles;
            if create {
                inner.create_profile(&people_id);
            }
            create
        }
    } else if uuid::Uuid::try_parse(&people_id).is_ok() {
        inner.profiles.iter().any(|p| p.people_id == people_id)
    } else {
        return error(400, "invalid_data");
    };
    if !known {
        return error(404, "people_not_found");
    }
    let raw_people_id = uri.path().rsplit('/').next().unwrap_or_default().to_owned();
    tracing::info!(
        website_id = %website_id,
        people_id = %mask_people_id(&people_id),
        text = %text,
        "sandbox received an event"
    );
    inner.events.push(ReceivedEvent {
        website_id,
        people_id,
        raw_people_id,
        body: String::from_utf8_lossy(body).into_owned(),
        text,
        color,
        data,
        content_type,
        user_agent: headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        tier: headers
            .get("x-crisp-tier")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        timestamp: now_ms(),
    });
    let status = StatusCode::from_u16(inner.success_status).unwrap_or(StatusCode::OK);
    envelope(status, false, "added", json!({}))
}

async fn list_events(
    State(state): State<SandboxState>,
    Path((website_id, people_id, page)): Path<(String, String, u32)>,
    headers: HeaderMap,
) -> Response {
    let inner = state.lock();
    if let Err(r) = authorize(&inner, &headers, &website_id, Route::GetProfile) {
        return *r;
    }
    let ids: Vec<String> = match inner
        .profiles
        .iter()
        .find(|p| p.people_id == people_id || p.email.eq_ignore_ascii_case(&people_id))
    {
        Some(p) => vec![p.people_id.clone(), p.email.clone()],
        None => return error(404, "people_not_found"),
    };
    let per_page = 20;
    let events: Vec<Value> = inner
        .events
        .iter()
        .rev()
        .filter(|e| e.website_id == website_id && ids.iter().any(|id| id.eq_ignore_ascii_case(&e.people_id)))
        .skip(per_page * page.saturating_sub(1) as usize)
        .take(per_page)
        .map(|e| json!({ "text": e.text, "data": e.data, "color": e.color, "timestamp": e.timestamp }))
        .collect();
    envelope(StatusCode::OK, false, "listed", Value::Array(events))
}

async fn create_profile(
    State(state): State<SandboxState>,
    Path(website_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response = {
        let mut inner = state.lock();
        match authorize(&inner, &headers, &website_id, Route::CreateProfile) {
            Err(r) => *r,
            Ok(()) => match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(o)) => match o.get("email").and_then(Value::as_str) {
                    Some(email) if is_email(email) => {
                        if inner.profile_for(email).is_some() {
                            error(409, "people_exists")
                        } else {
                            let id = inner.create_profile(email);
                            envelope(StatusCode::OK, false, "added", json!({ "people_id": id }))
                        }
                    }
                    _ => error(400, "invalid_data"),
                },
                _ => error(400, "invalid_data"),
            },
        }
    };
    response
}

async fn get_profile(
    State(state): State<SandboxState>,
    Path((website_id, people_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let response = {
        let inner = state.lock();
        match authorize(&inner, &headers, &website_id, Route::GetProfile) {
            Err(r) => *r,
            Ok(()) => match inner
                .profiles
                .iter()
                .find(|p| p.people_id == people_id || p.email.eq_ignore_ascii_case(&people_id))
            {
                Some(p) => envelope(
                    StatusCode::OK,
                    false,
                    "resolved",
                    json!({ "people_id": p.people_id, "email": p.email }),
                ),
                None => error(404, "people_not_found"),
            },
        }
    };
    response
}
