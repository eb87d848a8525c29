//! OTLP traces (README "Tracing"): one `crisp_bridge.message` span per message, continuing
//! the W3C trace context of its AMQP headers, with a child span per Crisp request.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set:
//! then no exporter exists and a message costs one atomic load here ([`enabled`]).
//! When on, spans are made with the OpenTelemetry SDK directly (not through `tracing`:
//! its layer cost about 30 µs of CPU a message) and go through the SDK's batch
//! processor: a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048 spans; a full
//! queue drops spans, never waits) drained by its own thread, which posts OTLP/HTTP
//! protobuf through the project's reqwest client on the runtime. An export that fails or
//! hangs delays no message.
//!
//! A message's work runs with its span's context current ([`Trace::wrap`]): Crisp
//! requests become its children and log lines carry its `trace_id` and `span_id`
//! ([`current_ids`]). Span attributes hold no people id.

use async_trait::async_trait;
use futures_util::future::Either;
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// How long one export request may take (`OTEL_EXPORTER_OTLP_TIMEOUT` bounds the whole
/// export with its retries; this bounds each request).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for the last spans to leave.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The most of a collector's answer read (an `ExportTraceServiceResponse` is a few bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The tracer spans are made with, set once by [`Traces::activate`].
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Tracing is on: the exporter is installed. One relaxed load.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn tracer() -> Option<&'static SdkTracer> {
    if enabled() {
        TRACER.get()
    } else {
        None
    }
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

    /// Marks tracing on; from now on messages get spans.
    pub fn activate(&self) {
        // Set once per process: `run` installs one exporter.
        let _ = TRACER.set(self.provider.tracer(env!("CARGO_PKG_NAME")));
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

/// The `crisp_bridge.message` span of one delivery before it starts (make it only when
/// [`enabled`]): its attributes and the trace context its headers carry, if any. Until
/// [`MessageSpan::start`] a structured CloudEvent's `traceparent` may still become its
/// parent ([`MessageSpan::cloud_event_parent`]).
pub struct MessageSpan {
    builder: SpanBuilder,
    parent: Option<Context>,
}

impl MessageSpan {
    pub fn begin(delivery: &lapin::message::Delivery, queue: &str) -> Self {
        let p = &delivery.properties;
        let mut attributes = Vec::with_capacity(9);
        attributes.extend([
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.destination.name", queue.to_owned()),
            KeyValue::new("messaging.operation", "process"),
            KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                delivery.routing_key.as_str().to_owned(),
            ),
        ]);
        if let Some(id) = p.message_id() {
            attributes.push(KeyValue::new(
                "messaging.message.id",
                id.as_str().to_owned(),
            ));
        }
        let builder = SpanBuilder::from_name("crisp_bridge.message")
            .with_kind(SpanKind::Consumer)
            .with_start_time(SystemTime::now())
            .with_attributes(attributes);
        let parent = p
            .headers()
            .as_ref()
            .map(|headers| TraceContextPropagator::new().extract(&AmqpHeaders(headers)))
            .filter(|cx| cx.span().span_context().is_valid());
        Self { builder, parent }
    }

    /// A CloudEvent's `traceparent` / `tracestate` attributes (distributed tracing
    /// extension) as the span's parent, unless its headers gave one: a structured
    /// CloudEvent carries them in its body.
    pub fn cloud_event_parent(&mut self, decoded: &crate::decode::Decoded) {
        if self.parent.is_some() || decoded.cloud_event.is_none() {
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
            self.parent = Some(parent);
        }
    }

    /// Starts the span (its parent fixed from now on; the sampler decides here whether
    /// it is recorded).
    pub fn start(self) -> Trace {
        let Some(tracer) = tracer() else {
            return Trace::default();
        };
        let parent = self.parent.unwrap_or_default();
        let span = tracer.build_with_context(self.builder, &parent);
        Trace(Some(parent.with_span(span)))
    }
}

/// A message's trace: the context holding its started `crisp_bridge.message` span, or
/// nothing (traces off).
#[derive(Clone, Default)]
pub struct Trace(Option<Context>);

impl Trace {
    /// `work` with this trace's context current while it is polled (none when off).
    pub fn wrap<F: Future>(&self, work: F) -> Either<WithContext<F>, F> {
        match &self.0 {
            Some(cx) => Either::Left(work.with_context(cx.clone())),
            None => Either::Right(work),
        }
    }

    /// Records the message's fate and ends its span.
    pub fn settled(&self, rule: &str, outcome: &'static str, reason: Option<&'static str>) {
        let Some(cx) = &self.0 else {
            return;
        };
        let span = cx.span();
        if !span.is_recording() {
            return;
        }
        span.set_attribute(KeyValue::new("rule", rule.to_owned()));
        span.set_attribute(KeyValue::new("outcome", outcome));
        if let Some(reason) = reason {
            span.set_attribute(KeyValue::new("reason", reason));
        }
        span.end();
    }
}

/// The client span of one Crisp request: a child of the current message's span, none
/// outside one (or with traces off). `route` is the path template (no people id in it).
pub struct RequestSpan(Option<opentelemetry_sdk::trace::Span>);

impl RequestSpan {
    pub fn start(method: &'static str, route: &'static str, server: Option<&str>) -> Self {
        let Some(tracer) = tracer() else {
            return Self(None);
        };
        Context::map_current(|cx| {
            if !cx.has_active_span() {
                return Self(None);
            }
            let mut attributes = Vec::with_capacity(5);
            attributes.extend([
                KeyValue::new("http.request.method", method),
                KeyValue::new("url.template", route),
            ]);
            if let Some(server) = server {
                attributes.push(KeyValue::new("server.address", server.to_owned()));
            }
            let builder = SpanBuilder::from_name(format!("{method} {route}"))
                .with_kind(SpanKind::Client)
                .with_attributes(attributes);
            Self(Some(tracer.build_with_context(builder, cx)))
        })
    }

    /// Records Crisp's answer (or its absence) and ends the span.
    pub fn answered(self, status: Option<u16>) {
        let Some(mut span) = self.0 else {
            return;
        };
        match status {
            Some(status) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 400 {
                    span.set_attribute(KeyValue::new("error.type", status.to_string()));
                    span.set_status(Status::error(""));
                }
            }
            None => {
                span.set_attribute(KeyValue::new("error.type", "transport"));
                span.set_status(Status::error(""));
            }
        }
        span.end();
    }
}

/// The trace and span ids of the message whose work is running on this thread, for its
/// log lines (`None` outside a traced message).
pub fn current_ids() -> Option<(TraceId, opentelemetry::trace::SpanId)> {
    if !enabled() {
        return None;
    }
    Context::map_current(|cx| {
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
    })
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
