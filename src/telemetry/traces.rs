//! OTLP traces (README "Tracing"): one `crisp_bridge.message` span per message, continuing
//! the W3C trace context of its AMQP headers, with a child span per Crisp request.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set:
//! then no exporter exists and a message costs one atomic load here ([`enabled`]).
//! When on, spans go through the SDK's batch processor: a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048 spans; a full queue drops spans, never waits)
//! drained by its own thread, which posts OTLP/HTTP protobuf through the project's reqwest
//! client on the runtime. An export that fails or hangs delays no message.
//!
//! Only spans of [`TARGET`] reach the exporter, never log events: those may hold what logs
//! mask (emails), and span attributes hold no people id.

use async_trait::async_trait;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;

/// The `tracing` target of every span exported; nothing else is.
pub const TARGET: &str = "crisp_bridge::traces";

/// How long one export request may take (`OTEL_EXPORTER_OTLP_TIMEOUT` bounds the whole
/// export with its retries; this bounds each request).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for the last spans to leave.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The most of a collector's answer read (an `ExportTraceServiceResponse` is a few bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What the exporter takes: the spans of [`TARGET`] (only spans are made there).
pub fn spans() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO)
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Tracing is on: the exporter is installed. One relaxed load.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the environment asks for traces: an OTLP endpoint is set, and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says otherwise.
pub fn requested() -> bool {
    let set = |name| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is =
        |name, value: &str| std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// The installed exporter; [`Traces::shutdown`] sends what is left.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Builds the exporter from the `OTEL_*` variables (endpoint, headers, timeout,
    /// sampler, batch processor, resource). Must run inside the Tokio runtime: requests
    /// are sent on it.
    pub fn from_env() -> Result<Self, String> {
        let http = OtlpHttp::new()?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(http)
            .build()
            .map_err(|e| {
                format!("cannot set up the OTLP trace exporter: {e}; check OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), e.g. http://otel-collector:4318")
            })?;
        let mut resource = Resource::builder();
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name"));
        if !named {
            resource = resource.with_service_name(env!("CARGO_PKG_NAME"));
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        Ok(Self { provider })
    }

    /// The layer that turns [`TARGET`] spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        use tracing_subscriber::Layer;
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(env!("CARGO_PKG_NAME")))
            .with_location(false)
            .with_threads(false)
            .with_level(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            // Only our spans: never log events (they may hold what logs mask).
            .with_filter(spans())
    }

    /// Marks tracing on; from now on messages get spans.
    pub fn activate(&self) {
        ENABLED.store(true, Ordering::Relaxed);
    }

    /// Stops making spans and sends what the queue holds (waits at most a few seconds).
    pub async fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_WAIT));
        match tokio::time::timeout(SHUTDOWN_WAIT + Duration::from_secs(1), flushed).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "could not send the last trace spans (OTEL_EXPORTER_OTLP_ENDPOINT)")
            }
            _ => tracing::warn!("sending the last trace spans took too long; dropped them"),
        }
    }
}

/// The OTLP exporter's HTTP client: the project's reqwest, each request spawned on the
/// runtime (the batch processor's thread has no runtime of its own).
#[derive(Debug)]
struct OtlpHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl OtlpHttp {
    fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the trace exporter needs the Tokio runtime".to_owned())?;
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the OTLP HTTP client: {e}"))?;
        Ok(Self { client, runtime })
    }
}

#[async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let response = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let headers = response.headers().clone();
            let mut body = Vec::new();
            let mut response = response;
            // A collector's answer is small; more than this is not read.
            while let Some(chunk) = response.chunk().await? {
                let room = MAX_ANSWER_BYTES.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if room <= chunk.len() {
                    break;
                }
            }
            let mut answer = Response::builder().status(status);
            if let Some(h) = answer.headers_mut() {
                *h = headers;
            }
            Ok::<_, HttpError>(answer.body(Bytes::from(body))?)
        });
        sent.await?
    }
}

/// AMQP headers as a W3C trace context carrier: `traceparent`/`tracestate`, else a binary
/// CloudEvent's `cloudEvents:traceparent`/`cloudEvents:tracestate` (or `cloudEvents_`).
struct AmqpHeaders<'a>(&'a lapin::types::FieldTable);

impl AmqpHeaders<'_> {
    fn value(&self, name: &str) -> Option<&str> {
        use lapin::types::AMQPValue;
        let value = self.0.inner().iter().find_map(|(k, v)| {
            let k = k.as_str();
            let ce = k.len() > 12 && (k.as_bytes()[11] == b':' || k.as_bytes()[11] == b'_');
            let attribute = if ce && k[..11].eq_ignore_ascii_case("cloudevents") {
                &k[12..]
            } else {
                k
            };
            attribute.eq_ignore_ascii_case(name).then_some(v)
        })?;
        match value {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }
}

impl Extractor for AmqpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.value(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// The `crisp_bridge.message` span of one delivery (call only when [`enabled`]): child of
/// the trace context its headers carry, if any (then true). Until [`started`] a
/// structured CloudEvent's `traceparent` may still become its parent
/// ([`cloud_event_parent`]). `rule`, `outcome` and `reason` are recorded when it is
/// settled ([`settled`]).
pub fn message_span(delivery: &lapin::message::Delivery, queue: &str) -> (Span, bool) {
    let p = &delivery.properties;
    let span = tracing::info_span!(
        target: TARGET,
        "crisp_bridge.message",
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.destination.name = queue,
        messaging.operation = "process",
        messaging.message.id = p.message_id().as_ref().map(|s| s.as_str()),
        messaging.rabbitmq.destination.routing_key = delivery.routing_key.as_str(),
        rule = tracing::field::Empty,
        outcome = tracing::field::Empty,
        reason = tracing::field::Empty,
    );
    let mut parented = false;
    if let Some(headers) = p.headers() {
        let parent = TraceContextPropagator::new().extract(&AmqpHeaders(headers));
        if parent.span().span_context().is_valid() {
            // Cannot fail: the span is new and the layer is installed.
            parented = span.set_parent(parent).is_ok();
        }
    }
    (span, parented)
}

/// A CloudEvent's `traceparent` / `tracestate` attributes (distributed tracing extension)
/// as the span's parent: a structured CloudEvent carries them in its body.
pub fn cloud_event_parent(span: &Span, decoded: &crate::decode::Decoded) {
    if decoded.cloud_event.is_none() {
        return;
    }
    let attribute = |name| decoded.doc.get(name).and_then(|v| v.as_str());
    let Some(traceparent) = attribute("traceparent") else {
        return;
    };
    let mut carrier = std::collections::HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(tracestate) = attribute("tracestate") {
        carrier.insert("tracestate".to_owned(), tracestate.to_owned());
    }
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Starts the span: from now on its parent is fixed and log lines inside carry its ids.
pub fn started(span: &Span) {
    remember_ids(span);
}

/// Records the message's fate on its span.
pub fn settled(span: &Span, rule: &str, outcome: &str, reason: Option<&str>) {
    span.record("rule", rule);
    span.record("outcome", outcome);
    if let Some(reason) = reason {
        span.record("reason", reason);
    }
}

/// The client span of one Crisp request (call only when [`enabled`]); `route` is the
/// path template (no people id in it), the status is recorded by [`answered`].
pub fn request_span(method: &str, route: &str, server: Option<&str>) -> Span {
    tracing::info_span!(
        target: TARGET,
        "crisp_request",
        otel.name = format!("{method} {route}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        url.template = route,
        server.address = server,
        http.response.status_code = tracing::field::Empty,
        error.r#type = tracing::field::Empty,
    )
}

/// Records Crisp's answer (or its absence) on a request span.
pub fn answered(span: &Span, status: Option<u16>) {
    match status {
        Some(status) => {
            span.record("http.response.status_code", i64::from(status));
            if status >= 400 {
                span.record("error.type", status.to_string());
                span.record("otel.status_code", "ERROR");
            }
        }
        None => {
            span.record("error.type", "transport");
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// The trace and span ids of a message span, kept with it so every log line inside
/// carries them ([`super::WithTraceIds`]).
#[derive(Debug, Clone)]
pub struct TraceIds {
    pub trace_id: String,
    pub span_id: String,
}

fn remember_ids(span: &Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return;
    }
    let ids = TraceIds {
        trace_id: sc.trace_id().to_string(),
        span_id: sc.span_id().to_string(),
    };
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>() {
            if let Some(span) = registry.span(id) {
                span.extensions_mut().insert(ids);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn extracted(headers: &[(&str, AMQPValue)]) -> opentelemetry::trace::SpanContext {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert((*name).into(), value.clone());
        }
        let cx = TraceContextPropagator::new().extract(&AmqpHeaders(&table));
        cx.span().span_context().clone()
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    #[test]
    fn the_trace_context_comes_from_amqp_or_binary_cloudevents_headers() {
        for name in [
            "traceparent",
            "cloudEvents:traceparent",
            "cloudEvents_traceparent",
        ] {
            let sc = extracted(&[(name, long(PARENT)), ("tracestate", long("k=v"))]);
            assert!(sc.is_valid(), "{name}");
            assert_eq!(
                sc.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
            assert!(sc.is_remote() && sc.is_sampled());
            assert_eq!(sc.trace_state().get("k"), Some("v"), "{name}");
        }
        let short = AMQPValue::ShortString(ShortString::from(PARENT));
        assert!(extracted(&[("traceparent", short)]).is_valid());
        for bad in [
            vec![],
            vec![("traceparent", long("00-zz-00f067aa0ba902b7-01"))],
            vec![("traceparent", AMQPValue::LongInt(7))],
            vec![("other", long(PARENT))],
        ] {
            assert!(!extracted(&bad).is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn off_without_an_endpoint() {
        // The test process sets none of these.
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            assert!(!requested());
        }
        assert!(!enabled());
    }
}
