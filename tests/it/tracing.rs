//! OTLP traces: a message published with a W3C `traceparent` gives a
//! `crisp_bridge.message` span in that trace (child of the publisher's span) with a child
//! span per Crisp request, exported over OTLP/HTTP protobuf to a receiver in this test;
//! no trace header goes to Crisp; log lines inside carry the ids; the last spans leave at
//! shutdown. With the collector down or never answering, every message is still delivered.

use crisp_bridge_testkit::otlp::{attribute, receiver, string_attribute};
use crisp_bridge_testkit::{auto_profiles, eventually, free_port, metric, TestApp, TestEnv};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use std::time::{Duration, Instant};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

fn traced(id: &str, parent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(format!("00-{id}-{parent}-01"))),
    );
    headers.insert(
        "tracestate".into(),
        AMQPValue::LongString(LongString::from("vendor=1")),
    );
    BasicProperties::default()
        .with_message_id("evt-traced".into())
        .with_headers(headers)
}

async fn spawn(env: &TestEnv, endpoint: &str) -> crisp_bridge_testkit::Bridge {
    spawn_with_delay(env, endpoint, "100").await
}

async fn spawn_with_delay(
    env: &TestEnv,
    endpoint: &str,
    delay_ms: &str,
) -> crisp_bridge_testkit::Bridge {
    env.spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_crisp-bridge")),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", delay_ms),
            ("OTEL_SERVICE_NAME", "bridge-under-test"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_continues_its_trace_with_a_crisp_request_span_and_no_header_to_crisp() {
    let (endpoint, received) = receiver().await;
    let env = TestApp::builder("otel-trace")
        .sandbox(auto_profiles())
        .env()
        .await;
    let bridge = spawn(&env, &endpoint).await;
    let body = serde_json::json!({"email": "jane.doe@example.com", "phase": "started"});
    env.publish_with(
        "trial.started",
        body.to_string().as_bytes(),
        traced(TRACE_ID, PARENT_ID),
    )
    .await;
    // A second one, dead-lettered (not JSON): its warning is logged inside its span.
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    env.publish_with("trial.started", b"not json", traced(other_trace, PARENT_ID))
        .await;
    // A structured CloudEvent carries its trace context in its body (no headers).
    let ce_trace = "11f067aa0ba902b700f067aa0ba902b7";
    let event = serde_json::json!({
        "specversion": "1.0", "id": "ce-1", "source": "/tests", "type": "trial.started",
        "traceparent": format!("00-{ce_trace}-{PARENT_ID}-01"),
        "email": "ce@b.io", "phase": "started",
    });
    env.publish_with(
        "trial.started",
        event.to_string().as_bytes(),
        BasicProperties::default().with_content_type("application/cloudevents+json".into()),
    )
    .await;
    let spans = eventually("the message span and its Crisp request span", || {
        let spans = received.spans();
        async move {
            let message = spans
                .iter()
                .any(|(_, s)| s.name == "crisp_bridge.message" && hex(&s.trace_id) == TRACE_ID);
            let request = spans
                .iter()
                .any(|(_, s)| s.kind == 3 && hex(&s.trace_id) == TRACE_ID);
            (message && request).then_some(spans)
        }
    })
    .await;
    let (service, message) = spans
        .iter()
        .find(|(_, s)| s.name == "crisp_bridge.message" && hex(&s.trace_id) == TRACE_ID)
        .unwrap();
    assert_eq!(service, "bridge-under-test");
    assert_eq!(hex(&message.parent_span_id), PARENT_ID);
    assert_eq!(message.kind, 5, "SPAN_KIND_CONSUMER");
    let a = &message.attributes;
    for (key, value) in [
        ("rule", "trial"),
        ("outcome", "delivered"),
        ("messaging.system", "rabbitmq"),
        ("messaging.destination.name", env.names.queue.as_str()),
        ("messaging.operation", "process"),
        ("messaging.message.id", "evt-traced"),
        (
            "messaging.rabbitmq.destination.routing_key",
            "trial.started",
        ),
    ] {
        assert_eq!(
            string_attribute(a, key).as_deref(),
            Some(value),
            "{key} in {a:?}"
        );
    }
    let (_, request) = spans
        .iter()
        .find(|(_, s)| s.kind == 3 && hex(&s.trace_id) == TRACE_ID)
        .unwrap();
    assert_eq!(
        request.name,
        "POST /v1/website/{website_id}/people/events/{people_id}"
    );
    assert_eq!(hex(&request.trace_id), TRACE_ID);
    assert_eq!(request.parent_span_id, message.span_id);
    assert_eq!(request.kind, 3, "SPAN_KIND_CLIENT");
    let r = &request.attributes;
    assert_eq!(
        string_attribute(r, "http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(
        string_attribute(r, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        attribute(r, "http.response.status_code"),
        Some(&AnyValue::IntValue(200)),
        "{r:?}"
    );
    for (_, span) in &spans {
        let text = format!("{span:?}");
        assert!(!text.contains("jane"), "a people id in a span: {text}");
    }
    // Crisp saw no trace header.
    let attempts = env.sandbox.state.attempts();
    assert!(!attempts.is_empty());
    for attempt in &attempts {
        for line in &attempt.header_lines {
            let name = line
                .split(':')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            assert!(
                !["traceparent", "tracestate", "baggage"].contains(&name.as_str()),
                "{line} sent to Crisp"
            );
        }
    }
    let ce = eventually("the CloudEvent's span", || {
        let spans = received.spans();
        async move {
            spans
                .into_iter()
                .find(|(_, s)| s.name == "crisp_bridge.message" && hex(&s.trace_id) == ce_trace)
                .map(|(_, s)| s)
        }
    })
    .await;
    assert_eq!(hex(&ce.parent_span_id), PARENT_ID);
    assert_eq!(
        string_attribute(&ce.attributes, "outcome").as_deref(),
        Some("delivered")
    );
    // The dead-lettered one: its span says why, and its log line carries its ids.
    let dead = eventually("the dead-lettered message's span", || {
        let spans = received.spans();
        async move {
            spans
                .into_iter()
                .find(|(_, s)| hex(&s.trace_id) == other_trace)
                .map(|(_, s)| s)
        }
    })
    .await;
    assert_eq!(
        string_attribute(&dead.attributes, "outcome").as_deref(),
        Some("dead_lettered")
    );
    assert!(string_attribute(&dead.attributes, "reason").is_some());
    let line = eventually("the dead letter's log line", || {
        let output = bridge.output();
        async move {
            output
                .lines()
                .find(|l| l.contains("dead-lettered a message"))
                .map(str::to_owned)
        }
    })
    .await;
    let line: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(line["trace_id"], other_trace, "{line}");
    assert_eq!(line["span_id"], hex(&dead.span_id), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_every_message_is_still_delivered_promptly() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    delivered_despite("otel-down", &closed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_collector_that_never_answers_every_message_is_still_delivered_promptly() {
    // Takes connections and never reads or answers them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    delivered_despite("otel-hang", &hanging).await;
    held.abort();
}

/// Twenty traced messages reach Crisp and are acked within seconds, whatever the exporter
/// does with their spans.
async fn delivered_despite(test: &str, endpoint: &str) {
    let env = TestApp::builder(test).sandbox(auto_profiles()).env().await;
    let bridge = spawn(&env, endpoint).await;
    let started = Instant::now();
    for i in 0..20 {
        let body = serde_json::json!({"email": format!("p{i}@b.io"), "phase": "started"});
        env.publish_with(
            "trial.started",
            body.to_string().as_bytes(),
            traced(TRACE_ID, PARENT_ID).with_message_id(format!("evt-{i}").into()),
        )
        .await;
    }
    let events = env.events_for_people(20).await;
    assert_eq!(events.len(), 20, "each once");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "delivery waited on the exporter: {:?}",
        started.elapsed()
    );
    settled(&bridge, 20).await;
    assert_eq!(env.broker.ready(&env.names.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_spans_are_sent_at_shutdown() {
    let (endpoint, received) = receiver().await;
    let env = TestApp::builder("otel-shutdown")
        .sandbox(auto_profiles())
        .env()
        .await;
    // Batches every minute: only the shutdown's flush can send this one in time.
    let mut bridge = spawn_with_delay(&env, &endpoint, "60000").await;
    let body = serde_json::json!({"email": "p1@b.io", "phase": "started"});
    env.publish_with(
        "trial.started",
        body.to_string().as_bytes(),
        traced(TRACE_ID, PARENT_ID),
    )
    .await;
    env.events(1).await;
    settled(&bridge, 1).await;
    assert!(received.spans().is_empty(), "exported before the shutdown");
    bridge.signal("TERM");
    assert!(bridge.wait_exit().await.success());
    let spans = received.spans();
    assert!(
        spans
            .iter()
            .any(|(_, s)| s.name == "crisp_bridge.message" && hex(&s.trace_id) == TRACE_ID),
        "{spans:?}"
    );
}

/// Waits until the child counted `n` messages delivered (and so acked).
async fn settled(bridge: &crisp_bridge_testkit::Bridge, n: u32) {
    eventually(&format!("{n} message(s) delivered and acked"), || async {
        let body = bridge.metrics().await;
        let delivered = metric(
            &body,
            "crisp_bridge_messages_total",
            r#"rule="trial",outcome="delivered""#,
        );
        (delivered == Some(f64::from(n))).then_some(())
    })
    .await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
