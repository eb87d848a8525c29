//! Step 5: the Crisp REST client. Auth, encoding, the request, and the answer's
//! classification; retries belong to the pipeline, which owns the message's clock.

pub mod classify;

pub use classify::{CrispError, Failure};

use crate::config::{read_secret_file, CrispConfig, Secret};
use crate::route::CrispEvent;
use crate::telemetry::{metrics, traces};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

pub const USER_AGENT: &str = concat!("crisp-bridge/", env!("CARGO_PKG_VERSION"));

/// Most bytes of an error answer we read: Crisp's envelopes are tiny, and a proxy's
/// page or a hostile server's endless body must not cost memory.
pub const MAX_ERROR_BODY: usize = 4 * 1024;

/// Characters escaped in a path segment: everything outside RFC 3986's unreserved set
/// and `@`. `+` is escaped too, so no server can read it as a space.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']')
    .add(b'+')
    .add(b'&')
    .add(b'=')
    .add(b';')
    .add(b',')
    .add(b':')
    .add(b'$')
    .add(b'!')
    .add(b'\'')
    .add(b'(')
    .add(b')')
    .add(b'*');

/// Percent-encodes a people id (email or UUID) as exactly one path segment.
pub fn encode_segment(value: &str) -> String {
    utf8_percent_encode(value, SEGMENT).to_string()
}

/// The token, and the files it came from: read again whenever Crisp refuses it, so a
/// rotated Kubernetes Secret is picked up without a restart.
struct Credentials {
    current: RwLock<(Secret, Secret)>,
    identifier_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

impl Credentials {
    fn get(&self) -> (Secret, Secret) {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the files (if any); a file that cannot be read keeps the last value.
    fn reload(&self) {
        if self.identifier_file.is_none() && self.key_file.is_none() {
            return;
        }
        let read = |file: &Option<PathBuf>, what: &str| {
            file.as_ref().and_then(|path| {
                read_secret_file(path)
                    .map_err(|e| tracing::warn!(error = %e, "cannot read crisp.{what}_file; keeping the value read before"))
                    .ok()
            })
        };
        let identifier = read(&self.identifier_file, "identifier");
        let key = read(&self.key_file, "key");
        for secret in identifier.iter().chain(&key) {
            crate::config::redact::remember(secret.expose());
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        if let Some(i) = identifier {
            changed |= i.expose() != current.0.expose();
            current.0 = i;
        }
        if let Some(k) = key {
            changed |= k.expose() != current.1.expose();
            current.1 = k;
        }
        if changed {
            tracing::info!(
                "read new Crisp credentials from crisp.identifier_file / crisp.key_file"
            );
        }
    }
}

#[derive(Clone)]
pub struct CrispClient {
    http: reqwest::Client,
    website_url: String,
    /// `{website_url}/people/events/`, parsed once: parsing the whole URL (scheme, host,
    /// IDNA) for every event was a visible part of the CPU per message.
    /// `None` when it does not parse; then each request parses, and fails, as before.
    events_url: Option<reqwest::Url>,
    credentials: Arc<Credentials>,
    /// Crisp's host, for the request spans' `server.address`.
    server: Option<Arc<str>>,
}

/// The request spans' `url.template`s: Crisp's routes, never a people id.
const EVENTS_ROUTE: &str = "/v1/website/{website_id}/people/events/{people_id}";
const PROFILE_ROUTE: &str = "/v1/website/{website_id}/people/profile";

impl CrispClient {
    /// Builds the client; fails only when the credentials cannot form a header.
    pub fn new(config: &CrispConfig) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "X-Crisp-Tier",
            HeaderValue::from_static(config.tier.as_str()),
        );
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            // Crisp never redirects; following one would turn a POST into a GET counted
            // as delivered, or carry the event and the email to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .timeout(config.timeout);
        if let Some(path) = config
            .ca_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            let pem = crate::broker::tls::read_ca_bundle("crisp.ca_file", path)
                .map_err(|e| e.to_string())?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "crisp.ca_file {}: not a PEM bundle reqwest accepts: {e}",
                    path.display()
                )
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        // Empty: reqwest reads HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY itself.
        if !config.proxy.is_blank() {
            let proxy = reqwest::Proxy::all(config.proxy.expose())
                .map_err(|_| {
                    "crisp.proxy is not a proxy URL like http://proxy:3128 (not shown: it may hold a password)".to_owned()
                })?
                .no_proxy(reqwest::NoProxy::from_env());
            builder = builder.proxy(proxy);
        }
        let http = builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let website = config.website_id.as_deref().unwrap_or_default();
        let website_url = format!(
            "{}/website/{}",
            config.api_url.trim_end_matches('/'),
            encode_segment(website)
        );
        let events_url = reqwest::Url::parse(&format!("{website_url}/people/events/")).ok();
        Ok(Self {
            http,
            server: events_url
                .as_ref()
                .and_then(|u| u.host_str())
                .map(Arc::from),
            events_url,
            website_url,
            credentials: Arc::new(Credentials {
                current: RwLock::new((
                    config.identifier.clone().unwrap_or_else(|| Secret::new("")),
                    config.key.clone().unwrap_or_else(|| Secret::new("")),
                )),
                identifier_file: config.identifier_file.clone(),
                key_file: config.key_file.clone(),
            }),
        })
    }

    /// `POST /website/{website_id}/people/events/{people_id}`; the success's status.
    pub async fn add_event(&self, people_id: &str, event: &CrispEvent) -> Result<u16, CrispError> {
        let segment = encode_segment(people_id);
        let request = match &self.events_url {
            // The segment holds only unreserved characters, `@` and escapes, so setting
            // the path takes it as it is.
            Some(base) => {
                let mut url = base.clone();
                url.set_path(&format!("{}{segment}", base.path()));
                self.http.post(url)
            }
            None => self
                .http
                .post(format!("{}/people/events/{segment}", self.website_url)),
        };
        self.send(EVENTS_ROUTE, request, Some(json_body(event)?))
            .await
    }

    /// `POST /website/{website_id}/people/profile`; an existing profile counts as success
    /// (with the status of that answer).
    pub async fn create_profile(&self, email: &str) -> Result<u16, CrispError> {
        let nickname = email.split('@').next().unwrap_or(email);
        let body = serde_json::json!({ "email": email, "person": { "nickname": nickname } });
        let url = format!("{}/people/profile", self.website_url);
        match self
            .send(PROFILE_ROUTE, self.http.post(url), Some(json_body(&body)?))
            .await
        {
            Err(e) if e.reason.as_deref() == Some("people_exists") => Ok(e.status.unwrap_or(409)),
            other => other,
        }
    }

    /// Reads the credential files again (a hold's trial: the key may have been rotated
    /// while Crisp refused it).
    pub fn reload_credentials(&self) {
        self.credentials.reload();
    }

    /// Sends one request. Every header is set exactly once here or by the client's
    /// defaults (`X-Crisp-Tier`, `User-Agent`); `Content-Type` only with a body. A
    /// success gives its status. With traces on, in a client span (no trace header goes
    /// to Crisp: nothing here injects one).
    async fn send(
        &self,
        route: &'static str,
        request: reqwest::RequestBuilder,
        body: Option<Vec<u8>>,
    ) -> Result<u16, CrispError> {
        if !traces::enabled() {
            return self.send_once(request, body).await;
        }
        let span = traces::RequestSpan::start("POST", route, self.server.as_deref());
        // Boxed: only traced requests carry the span.
        let result = Box::pin(self.send_once(request, body)).await;
        span.answered(match &result {
            Ok(status) => Some(*status),
            Err(e) => e.status,
        });
        result
    }

    async fn send_once(
        &self,
        request: reqwest::RequestBuilder,
        body: Option<Vec<u8>>,
    ) -> Result<u16, CrispError> {
        let (identifier, key) = self.credentials.get();
        let mut request = request.basic_auth(identifier.expose(), Some(key.expose()));
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let started = Instant::now();
        let result = request.send().await;
        metrics::crisp_request_duration(started.elapsed());
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                metrics::crisp_request("transport_error");
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                return Err(CrispError::transport(format!(
                    "request to Crisp {what}: {}",
                    error_chain(e)
                )));
            }
        };
        let status = response.status();
        metrics::crisp_request(status.as_str());
        if status.is_success() {
            return Ok(status.as_u16());
        }
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let retry_after =
            header(RETRY_AFTER).and_then(|v| classify::parse_retry_after(v, SystemTime::now()));
        let location = header(LOCATION).map(str::to_owned);
        // A broken or cut body is still classified by its status.
        if matches!(status.as_u16(), 401..=403) {
            // Refused: the next request (or probe) uses what the files hold now.
            self.credentials.reload();
        }
        // Boxed: only failures read a body, and this future would size every request's.
        let body = Box::pin(read_bounded(response, MAX_ERROR_BODY)).await;
        let mut error = classify::classify(status.as_u16(), &body, retry_after);
        if status.is_redirection() {
            error.message = classify::redirect_message(status.as_u16(), location.as_deref());
        }
        Err(error)
    }
}

/// The JSON body of a request; our own types always serialize.
fn json_body<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CrispError> {
    serde_json::to_vec(value)
        .map_err(|e| CrispError::transport(format!("cannot encode the request body: {e}")))
}

/// At most `limit` bytes of an answer's body; the rest is never read.
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// The error and its causes, without the URL (it holds the people id).
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_ids_become_one_segment() {
        assert_eq!(
            encode_segment("jane+tag@example.com"),
            "jane%2Btag@example.com"
        );
        assert_eq!(encode_segment("a/b?c#d%e f@x"), "a%2Fb%3Fc%23d%25e%20f@x");
        assert_eq!(
            encode_segment("José@exämple.com"),
            "Jos%C3%A9@ex%C3%A4mple.com"
        );
        assert_eq!(
            encode_segment("04ed9a29-ccda-4f46-b2f3-b151d2d90fa7"),
            "04ed9a29-ccda-4f46-b2f3-b151d2d90fa7"
        );
        assert_eq!(encode_segment("o'brien~x_y.z@q"), "o%27brien~x_y.z@q");
    }
}
