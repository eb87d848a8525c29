//! `crisp-bridge sandbox`: a local stand-in for the Crisp REST API routes crisp-bridge
//! uses, in memory. Same auth (Basic + `X-Crisp-Tier`), envelope and error codes as
//! `docs/crisp-api.md`; it percent-decodes people ids like a real server, and keeps
//! what it received so users and tests can read it back (`GET /_sandbox/events`) and
//! inject faults (`POST /_sandbox/faults`).

mod control;
mod crisp_routes;
pub(crate) mod limiter;
mod raw;
mod tls;

pub use limiter::LimiterShape;
pub use tls::SandboxTls;

use limiter::RateLimit;

use axum::Router;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_WEBSITE_ID: &str = "04ed9a29-ccda-4f46-b2f3-b151d2d90fa7";
pub const DEFAULT_IDENTIFIER: &str = "sandbox-identifier";
pub const DEFAULT_KEY: &str = "sandbox-key";

/// How the sandbox starts; everything can be changed later through `/_sandbox/settings`.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub identifier: String,
    pub key: String,
    pub tier: String,
    pub website_ids: Vec<String>,
    /// Accept events for emails without a profile (creating it), instead of Crisp's
    /// conservative 404 `people_not_found`.
    pub auto_create_profiles: bool,
    /// Enforce the limits Crisp published for chatbox events (text 80 characters, 10
    /// data keys, keys of 1–50 characters `[A-Za-z0-9_-]`, values up to 120 characters),
    /// answering 400 `invalid_data` beyond them; whether Crisp's REST route does is
    /// unconfirmed.
    pub event_limits: bool,
    /// Serve HTTPS with this certificate and key instead of HTTP.
    pub tls: Option<SandboxTls>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            identifier: DEFAULT_IDENTIFIER.into(),
            key: DEFAULT_KEY.into(),
            tier: "plugin".into(),
            website_ids: vec![DEFAULT_WEBSITE_ID.into()],
            auto_create_profiles: false,
            event_limits: false,
            tls: None,
        }
    }
}

/// An event the sandbox accepted, as it arrived.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReceivedEvent {
    pub website_id: String,
    /// The people id after percent-decoding the path segment.
    pub people_id: String,
    /// The raw path segment as sent.
    pub raw_people_id: String,
    /// The request body, byte for byte.
    pub body: String,
    pub text: String,
    pub color: Option<String>,
    pub data: serde_json::Map<String, serde_json::Value>,
    pub content_type: Option<String>,
    pub user_agent: Option<String>,
    pub tier: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
}

/// One request to a Crisp route and the status it got.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Attempt {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// When the request arrived, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub at_ms: u64,
    /// Every header line exactly as received, in order (the credential in
    /// `Authorization` redacted).
    #[serde(default)]
    pub header_lines: Vec<String>,
}

/// A fault served instead of (or before) the normal answer to the next event POSTs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Status to answer; absent means "answer normally after the delay".
    #[serde(default)]
    pub status: Option<u16>,
    /// How many requests this fault applies to (default 1).
    #[serde(default = "one")]
    pub times: u32,
    /// `Retry-After` header value to send.
    #[serde(default)]
    pub retry_after: Option<String>,
    /// Raw body instead of the JSON envelope (e.g. an HTML page from a proxy).
    #[serde(default)]
    pub body: Option<String>,
    /// Delay before answering, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Only for events to this people id (as decoded from the path); absent: any.
    #[serde(default)]
    pub people_id: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Profile {
    people_id: String,
    email: String,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) options: SandboxOptions,
    /// While true every Crisp route answers 401, as if the key had been revoked.
    pub(crate) refuse: bool,
    /// While set, every Crisp route answers this status, as in an outage.
    pub(crate) down_status: Option<u16>,
    pub(crate) success_status: u16,
    pub(crate) latency: Duration,
    pub(crate) events: Vec<ReceivedEvent>,
    pub(crate) attempts: Vec<Attempt>,
    pub(crate) profiles: Vec<Profile>,
    /// Lowercased email -> index in `profiles`: a benchmark over 100,000 people made the
    /// linear search the bottleneck of the sink.
    pub(crate) by_email: HashMap<String, usize>,
    pub(crate) faults: VecDeque<Fault>,
    /// A shared rate limit on event POSTs, like Crisp's per-token limit.
    pub(crate) rate_limit: Option<RateLimit>,
    /// Routes answering a fixed status (and envelope reason) behind the auth checks,
    /// while the others work: a partial outage, a route retired or not in our tier.
    pub(crate) route_status: HashMap<Route, RouteStatus>,
}

/// The Crisp routes the sandbox serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// `POST .../people/events/{people_id}`
    AddEvent,
    /// `POST .../people/profile`
    CreateProfile,
    /// `GET .../people/profile/{people_id}`
    GetProfile,
}

/// What a route answers while it is failing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct RouteStatus {
    pub status: u16,
    /// The envelope's `reason` (default: one fitting the status).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Shared sandbox state; cloning shares it.
#[derive(Clone, Debug)]
pub struct SandboxState(Arc<Mutex<Inner>>);

impl SandboxState {
    pub fn new(options: SandboxOptions) -> Self {
        Self(Arc::new(Mutex::new(Inner {
            options,
            refuse: false,
            down_status: None,
            success_status: 200,
            latency: Duration::ZERO,
            events: Vec::new(),
            attempts: Vec::new(),
            profiles: Vec::new(),
            by_email: HashMap::new(),
            faults: VecDeque::new(),
            rate_limit: None,
            route_status: HashMap::new(),
        })))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn events(&self) -> Vec<ReceivedEvent> {
        self.lock().events.clone()
    }

    /// How many events were received, without copying them (benchmarks poll this).
    pub fn event_count(&self) -> usize {
        self.lock().events.len()
    }

    /// Forgets the events and attempts received so far (a benchmark's runs would
    /// otherwise keep hundreds of thousands of them).
    pub fn clear_received(&self) {
        let mut inner = self.lock();
        inner.events = Vec::new();
        inner.attempts = Vec::new();
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.lock().attempts.clone()
    }

    pub fn push_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Faults queued and not yet taken by a request.
    pub fn pending_faults(&self) -> usize {
        self.lock().faults.len()
    }

    /// Crisp is down: every Crisp route answers `status` (None: back up).
    pub fn set_down(&self, status: Option<u16>) {
        self.lock().down_status = status;
    }

    /// `route` answers `status` (behind the auth checks) while the others work; `None`
    /// restores it.
    pub fn set_route_status(&self, route: Route, status: Option<RouteStatus>) {
        let mut inner = self.lock();
        match status {
            Some(s) => inner.route_status.insert(route, s),
            None => inner.route_status.remove(&route),
        };
    }

    pub fn set_refuse(&self, refuse: bool) {
        self.lock().refuse = refuse;
    }

    pub fn set_auto_create_profiles(&self, on: bool) {
        self.lock().options.auto_create_profiles = on;
    }

    /// Limits event POSTs to `per_second` in any 1 s window (429 beyond, with
    /// `Retry-After: 1` when `retry_after`); `None` lifts the limit.
    pub fn set_rate_limit(&self, per_second: Option<u32>, retry_after: bool) {
        let shape = self
            .lock()
            .rate_limit
            .as_ref()
            .map(RateLimit::shape)
            .unwrap_or_default();
        self.set_rate_limiter(per_second, retry_after, shape);
    }

    /// Limits event POSTs to `per_second`, counted the way `shape` says; `None` lifts it.
    pub fn set_rate_limiter(
        &self,
        per_second: Option<u32>,
        retry_after: bool,
        shape: LimiterShape,
    ) {
        self.lock().rate_limit = per_second
            .filter(|r| *r > 0)
            .map(|r| RateLimit::new(r, retry_after, shape));
    }

    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Creates a profile and returns its people id (an existing email keeps its id).
    pub fn add_profile(&self, email: &str) -> String {
        let mut inner = self.lock();
        inner
            .profile_for(email)
            .unwrap_or_else(|| inner.create_profile(email))
    }
}

impl Inner {
    fn profile_for(&self, email: &str) -> Option<String> {
        let index = *self.by_email.get(&email.to_ascii_lowercase())?;
        self.profiles.get(index).map(|p| p.people_id.clone())
    }

    fn create_profile(&mut self, email: &str) -> String {
        let people_id = uuid::Uuid::new_v4().to_string();
        self.by_email
            .entry(email.to_ascii_lowercase())
            .or_insert(self.profiles.len());
        self.profiles.push(Profile {
            people_id: people_id.clone(),
            email: email.to_owned(),
        });
        people_id
    }
}

/// The sandbox's HTTP routes.
pub fn router(state: SandboxState) -> Router {
    crisp_routes::routes(state.clone())
        .merge(control::routes())
        .with_state(state)
}

/// A running sandbox.
pub struct Sandbox {
    pub addr: SocketAddr,
    pub state: SandboxState,
    stop: CancellationToken,
    https: bool,
}

impl Sandbox {
    /// Binds `listen` (port 0 picks a free port) and serves in the background.
    pub async fn start(listen: SocketAddr, options: SandboxOptions) -> std::io::Result<Self> {
        let acceptor = options.tls.as_ref().map(SandboxTls::acceptor).transpose()?;
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = SandboxState::new(options);
        let stop = CancellationToken::new();
        let app = router(state.clone());
        let stopped = stop.clone();
        let https = acceptor.is_some();
        tokio::spawn(async move {
            let stopping = async move { stopped.cancelled().await };
            let served = match acceptor {
                None => {
                    axum::serve(raw::RawHeadListener(listener), app)
                        .with_graceful_shutdown(stopping)
                        .await
                }
                Some(acceptor) => {
                    let listener = tls::TlsRawHeadListener {
                        tcp: listener,
                        acceptor,
                    };
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopping)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "sandbox server stopped");
            }
        });
        Ok(Self {
            addr,
            state,
            stop,
            https,
        })
    }

    /// The `crisp.api_url` that points at this sandbox.
    pub fn api_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/v1", self.addr)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
