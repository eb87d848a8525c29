//! Hostile input: messages built to break the bridge or the broker connection.

use crisp_bridge::sandbox::SandboxOptions;
use crisp_bridge_testkit::{header, TestApp, WAIT};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

/// A message whose own headers nearly fill RabbitMQ's default frame (131072 bytes):
/// adding ours to its dead-letter copy used to overflow the frame, and the broker
/// killed the connection (FRAME_ERROR) on every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_with_huge_headers_still_fits_the_frame() {
    let mut app = TestApp::builder("huge-headers")
        .sandbox(SandboxOptions {
            auto_create_profiles: true,
            ..Default::default()
        })
        // Without the fix the broker gives up after a few killed connections.
        .config("[amqp]\ndelivery_limit = 3")
        .start()
        .await;
    let mut headers = FieldTable::default();
    headers.insert(
        "padding".into(),
        AMQPValue::LongString(LongString::from("p".repeat(130_900))),
    );
    app.publish_with(
        "trial.started",
        b"not json",
        BasicProperties::default()
            .with_message_id("poison".into())
            .with_headers(headers),
    )
    .await;
    let n = 20;
    app.publish_people(n).await;

    // A copy too big for the frame kills the reading connection too: bound the wait.
    let dead = tokio::time::timeout(WAIT, app.broker.take(&app.names.dlq, 1))
        .await
        .expect("the dead-letter copy could not be read (too large for the frame?)");
    assert_eq!(dead[0].delivery.data, b"not json");
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-reason").as_deref(),
        Some("invalid_json"),
        "dead-lettered by us, with our reason"
    );
    let detail = header(&dead[0], "x-crisp-bridge-detail").unwrap_or_default();
    assert!(
        detail.contains("original headers") && detail.contains("dropped"),
        "the detail names what was dropped: {detail}"
    );
    assert!(detail.len() <= 1024, "{} bytes", detail.len());
    assert_eq!(header(&dead[0], "padding"), None);
    assert_eq!(
        dead[0]
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("poison"),
        "the other properties are kept"
    );

    app.events_for_people(n).await;
    app.stop().await;
    let events = app.sandbox.state.events();
    assert_eq!(events.len(), n, "every innocent message posted once");
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    assert_eq!(
        app.broker.ready(&app.names.dlq).await,
        0,
        "nothing else was dead-lettered"
    );
}
