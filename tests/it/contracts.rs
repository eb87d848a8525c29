//! Contracts end to end: CloudEvents in both modes through one rule, a plain message
//! matched by its AMQP `type`, a schema violation dead-lettered with its path.

use crisp_bridge::sandbox::SandboxOptions;
use crisp_bridge_testkit::{header, TestApp};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde_json::json;

fn rules() -> String {
    let schema = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/events/user.signed_up.cloudevent.json"
    );
    format!(
        r#"
[delivery]
unmatched = "dead-letter"

[[rules]]
name = "signed-up"
type = "com.example.user.signed_up"
schema = "{schema}"
people_id = "/data/email"
text = "user:signed_up"
color = "green"
data = {{ plan = "/data/plan", source = "/source" }}

[[rules]]
name = "legacy-signup"
type = "legacy.signup"
people_id = "/email"
text = "user:signed_up"
color = "green"
data = {{ plan = "/plan", source = "/origin" }}
"#
    )
}

fn binary_properties(id: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in [
        ("cloudEvents:specversion", "1.0"),
        ("cloudEvents:id", id),
        ("cloudEvents:source", "/accounts"),
        ("cloudEvents:type", "com.example.user.signed_up"),
        ("cloudEvents:subject", "u-42"),
    ] {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_events_in_both_modes_and_amqp_types_reach_crisp_through_their_rules() {
    let mut app = TestApp::builder("contracts")
        .config(&rules())
        .sandbox(SandboxOptions {
            auto_create_profiles: true,
            ..Default::default()
        })
        .start()
        .await;
    let data = json!({"email": "lee@example.net", "plan": "team"});
    let structured = json!({
        "specversion": "1.0", "id": "evt-1", "source": "/accounts",
        "type": "com.example.user.signed_up", "subject": "u-42",
        "datacontenttype": "application/json", "data": data,
    });
    // 1. Structured mode: the whole event in the body.
    app.publish_with(
        "accounts.events",
        structured.to_string().as_bytes(),
        BasicProperties::default().with_content_type("application/cloudevents+json".into()),
    )
    .await;
    // 2. The same event in binary mode: attributes in headers, the data as the body.
    let data_bytes = data.to_string().into_bytes();
    app.publish_with("accounts.events", &data_bytes, binary_properties("evt-1"))
        .await;
    // 3. That binary message again (same source + id, same body): the duplicate window
    //    acks it without a post.
    app.publish_with("other.key", &data_bytes, binary_properties("evt-1"))
        .await;
    // 4. A CloudEvent whose data breaks the rule's schema (no `plan`).
    app.publish_with(
        "accounts.events",
        br#"{"email":"lee@example.net"}"#,
        binary_properties("evt-2"),
    )
    .await;
    // 5. Plain JSON, matched by its AMQP `type` property alone; 6. the same without it.
    let plain = br#"{"email":"lee@example.net","plan":"solo","origin":"/legacy"}"#;
    app.publish_with(
        "legacy",
        plain,
        BasicProperties::default().with_type("legacy.signup".into()),
    )
    .await;
    app.publish("legacy", plain).await;

    let events = app.events(3).await;
    let expected =
        r#"{"text":"user:signed_up","color":"green","data":{"plan":"team","source":"/accounts"}}"#;
    assert_eq!(events[0].body, expected, "structured mode");
    assert_eq!(events[1].body, expected, "binary mode: the same Crisp body");
    assert_eq!(
        events[2].body,
        r#"{"text":"user:signed_up","color":"green","data":{"plan":"solo","source":"/legacy"}}"#,
        "plain JSON matched by its AMQP type; the duplicate (same lane, before it) was not posted"
    );
    assert!(events.iter().all(|e| e.people_id == "lee@example.net"));

    let dead = app.broker.take(&app.names.dlq, 2).await;
    let reason = |i: usize| header(&dead[i], "x-crisp-bridge-reason").unwrap_or_default();
    let (schema, unmatched) = if reason(0) == "schema_violation" {
        (&dead[0], &dead[1])
    } else {
        (&dead[1], &dead[0])
    };
    assert_eq!(
        header(schema, "x-crisp-bridge-reason").as_deref(),
        Some("schema_violation")
    );
    assert_eq!(
        header(schema, "x-crisp-bridge-rule").as_deref(),
        Some("signed-up")
    );
    let detail = header(schema, "x-crisp-bridge-detail").unwrap_or_default();
    assert!(detail.contains("at /data:"), "{detail}");
    assert!(detail.contains("plan"), "{detail}");
    assert_eq!(
        header(unmatched, "x-crisp-bridge-reason").as_deref(),
        Some("unmatched"),
        "without its type the plain message matches no rule"
    );
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    assert_eq!(
        app.sandbox.state.events().len(),
        3,
        "the duplicate was not posted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_can_enforce_crisps_chatbox_event_limits() {
    use crisp_bridge_testkit::{auto_profiles, header, TestApp};
    // A rule that can exceed them: `check` says so and still passes.
    let rules = r#"
[[rules]]
name = "wide"
routing_key = "wide.#"
people_id = "/email"
text = "wide:event"
data = { k01 = "/a", k02 = "/a", k03 = "/a", k04 = "/a", k05 = "/a", k06 = "/a", k07 = "/a", k08 = "/a", k09 = "/a", k10 = "/a", k11 = "/a" }

[[rules]]
name = "long-value"
routing_key = "long.#"
people_id = "/email"
text = "long:value"
data = { note = "/note" }
"#;
    let config = crisp_bridge::config::from_toml_str(&format!(
        "[crisp]\nwebsite_id = \"{}\"\nidentifier = \"i\"\nkey = \"k\"\n{rules}",
        crisp_bridge::sandbox::DEFAULT_WEBSITE_ID
    ))
    .expect("config");
    let validated = crisp_bridge::config::validate(config).expect("valid");
    let warnings: Vec<String> = validated
        .router
        .warnings()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("rule `wide` data") && warnings[0].contains("over 10"),
        "{warnings:?}"
    );
    let mut options = auto_profiles();
    options.event_limits = true;
    let mut app = TestApp::builder("event-limits")
        .sandbox(options)
        .rules(rules)
        .start()
        .await;
    app.publish("wide.x", br#"{"email":"a@b.io","a":"x"}"#)
        .await;
    let long = "x".repeat(121);
    app.publish(
        "long.x",
        format!(r#"{{"email":"b@b.io","note":"{long}"}}"#).as_bytes(),
    )
    .await;
    app.publish("long.x", br#"{"email":"c@b.io","note":"short"}"#)
        .await;
    let dead = app.broker.take(&app.names.dlq, 2).await;
    for d in &dead {
        assert_eq!(
            header(d, "x-crisp-bridge-reason").as_deref(),
            Some("crisp_rejected")
        );
        assert!(header(d, "x-crisp-bridge-detail")
            .unwrap_or_default()
            .contains("invalid_data"));
    }
    let events = app.events(1).await;
    assert_eq!(events[0].people_id, "c@b.io");
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
}
