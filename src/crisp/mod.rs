//! Step 5: the Crisp REST client. Auth, encoding, the request, and the answer's
//! classification; retries belong to the pipeline, which owns the message's clock.

pub mod classify;

pub use classify::{CrispError, Failure};

use crate::config::{CrispConfig, Secret};
use crate::route::CrispEvent;
use crate::telemetry::metrics;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use std::time::{Instant, SystemTime};

pub const USER_AGENT: &str = concat!("crisp-bridge/", env!("CARGO_PKG_VERSION"));

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

#[derive(Clone)]
pub struct CrispClient {
    http: reqwest::Client,
    website_url: String,
    identifier: Secret,
    key: Secret,
}

impl CrispClient {
    /// Builds the client; fails only when the credentials cannot form a header.
    pub fn new(config: &CrispConfig) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "X-Crisp-Tier",
            HeaderValue::from_static(config.tier.as_str()),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(USER_AGENT)
            .timeout(config.timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let website = config.website_id.as_deref().unwrap_or_default();
        Ok(Self {
            http,
            website_url: format!(
                "{}/website/{}",
                config.api_url.trim_end_matches('/'),
                encode_segment(website)
            ),
            identifier: config.identifier.clone().unwrap_or_else(|| Secret::new("")),
            key: config.key.clone().unwrap_or_else(|| Secret::new("")),
        })
    }

    /// `POST /website/{website_id}/people/events/{people_id}`.
    pub async fn add_event(&self, people_id: &str, event: &CrispEvent) -> Result<(), CrispError> {
        let url = format!(
            "{}/people/events/{}",
            self.website_url,
            encode_segment(people_id)
        );
        self.send(self.http.post(url).json(event)).await
    }

    /// `POST /website/{website_id}/people/profile`; an existing profile counts as success.
    pub async fn create_profile(&self, email: &str) -> Result<(), CrispError> {
        let nickname = email.split('@').next().unwrap_or(email);
        let body = serde_json::json!({ "email": email, "person": { "nickname": nickname } });
        let url = format!("{}/people/profile", self.website_url);
        match self.send(self.http.post(url).json(&body)).await {
            Err(e) if e.reason.as_deref() == Some("people_exists") => Ok(()),
            other => other,
        }
    }

    /// A read that proves whether Crisp accepts our credentials for this website:
    /// `people_not_found` for a random id means yes.
    pub async fn probe(&self) -> Result<(), CrispError> {
        let url = format!("{}/people/profile/{}", self.website_url, uuid::Uuid::nil());
        match self.send(self.http.get(url)).await {
            Err(e) if e.failure == Failure::PeopleNotFound => Ok(()),
            other => other,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<(), CrispError> {
        let request = request
            .basic_auth(self.identifier.expose(), Some(self.key.expose()))
            .header(CONTENT_TYPE, "application/json");
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
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| classify::parse_retry_after(v, SystemTime::now()));
        // Bodies of errors are small envelopes; a broken one is still classified by status.
        let body = response.bytes().await.unwrap_or_default();
        Err(classify::classify(status.as_u16(), &body, retry_after))
    }
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
