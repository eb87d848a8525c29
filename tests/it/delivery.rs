//! What reaches Crisp, byte for byte, and what ends in which queue.

use crisp_bridge::sandbox::Fault;
use crisp_bridge_testkit::{auto_profiles, eventually, header, TestApp, WEBSITE};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde_json::json;

/// Tests that are not about profiles let the sandbox accept any email.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_posts_the_exact_event_and_acks() {
    let mut app = TestApp::builder("happy")
        .sandbox(auto_profiles())
        .start()
        .await;
    let order = json!({
        "id": "A-1001", "status": "paid",
        "customer": {"email": "jane.doe@example.com", "password": "never-sent"},
        "amount": {"total": 42.5, "currency": "EUR"}
    });
    app.publish("order.created", order.to_string().as_bytes())
        .await;
    let events = app.events(1).await;
    let e = &events[0];
    assert_eq!(e.website_id, WEBSITE);
    assert_eq!(e.people_id, "jane.doe@example.com");
    assert_eq!(
        e.body,
        r#"{"text":"order:created","color":"blue","data":{"currency":"EUR","order_id":"A-1001","total":42.5}}"#
    );
    assert_eq!(e.content_type.as_deref(), Some("application/json"));
    assert_eq!(e.tier.as_deref(), Some("plugin"));
    assert!(
        e.user_agent
            .as_deref()
            .unwrap_or_default()
            .starts_with("crisp-bridge/"),
        "{:?}",
        e.user_agent
    );
    app.stop().await;
    assert_eq!(
        app.broker.ready(&app.names.queue).await,
        0,
        "the message was acked"
    );
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    assert_eq!(app.sandbox.state.events().len(), 1, "posted exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_pointers_templates_and_flattening() {
    let mut app = TestApp::builder("fallback")
        .sandbox(auto_profiles())
        .start()
        .await;
    // No /customer/email: the fallback /email is used.
    app.publish(
        "order.created",
        br#"{"status":"paid","email":"x@y.io","id":7,"amount":{"total":1}}"#,
    )
    .await;
    app.events(1).await;
    // A template with a placeholder, and an object selected as data is flattened
    // with its secret-looking key stripped.
    app.publish(
        "trial.started.eu",
        br#"{"email":"t@y.io","phase":"started","plan":"pro","account":{"id":9,"api_token":"zzz","owner":{"name":"Al"}}}"#,
    )
    .await;
    let events = app.events(2).await;
    assert_eq!(events[0].people_id, "x@y.io");
    assert_eq!(
        events[0].body,
        r#"{"text":"order:created","color":"blue","data":{"order_id":7,"total":1}}"#
    );
    assert_eq!(
        events[1].body,
        r#"{"text":"trial:started","color":"green","data":{"account_id":9,"account_owner_name":"Al","plan":"pro"}}"#
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_emails_arrive_exactly_as_found() {
    let mut app = TestApp::builder("emails")
        .sandbox(auto_profiles())
        .start()
        .await;
    let emails = [
        "Jane+Tag@Example.COM",
        "o'brien@x.io",
        "josé@exämple.com",
        "a/b?c#d%e@x.io",
    ];
    for email in emails {
        app.publish(
            "trial.started",
            json!({"email": email, "phase": "started"})
                .to_string()
                .as_bytes(),
        )
        .await;
    }
    let events = app.events(emails.len()).await;
    let mut got: Vec<&str> = events.iter().map(|e| e.people_id.as_str()).collect();
    got.sort();
    let mut want = emails.to_vec();
    want.sort();
    assert_eq!(
        got, want,
        "people ids must survive encoding and decoding unchanged"
    );
    let raw: Vec<&str> = events.iter().map(|e| e.raw_people_id.as_str()).collect();
    assert!(raw.contains(&"Jane%2BTag@Example.COM"), "{raw:?}");
    assert!(raw.contains(&"a%2Fb%3Fc%23d%25e@x.io"), "{raw:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_messages_are_acked_by_default() {
    let mut app = TestApp::builder("unmatched-ack")
        .sandbox(auto_profiles())
        .start()
        .await;
    // Bound by order.created but `when` does not match.
    app.publish("order.created", br#"{"status":"pending","email":"a@b.io"}"#)
        .await;
    app.publish("trial.started", br#"{"email":"a@b.io","phase":"marker"}"#)
        .await;
    app.events(1).await;
    app.stop().await;
    assert_eq!(
        app.broker.ready(&app.names.queue).await,
        0,
        "the unmatched message was acked"
    );
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
    assert_eq!(app.sandbox.state.events().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_messages_can_be_dead_lettered() {
    let mut app = TestApp::builder("unmatched-dl")
        .config("[delivery]\nunmatched = \"dead-letter\"")
        .start()
        .await;
    app.publish("order.created", br#"{"status":"pending","email":"a@b.io"}"#)
        .await;
    let dead = app.broker.take(&app.names.dlq, 1).await;
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-reason").as_deref(),
        Some("unmatched")
    );
    assert_eq!(header(&dead[0], "x-crisp-bridge-rule"), None);
    assert_eq!(dead[0].delivery.routing_key.as_str(), "order.created");
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_is_dead_lettered_with_body_and_properties_kept() {
    let mut app = TestApp::builder("invalid-json").start().await;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-tenant".into(),
        AMQPValue::LongString(LongString::from("acme")),
    );
    let properties = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    let body: &[u8] = b"{\"status\": paid \xff";
    app.publish_with("order.created", body, properties).await;
    let dead = app.broker.take(&app.names.dlq, 1).await;
    let m = &dead[0];
    assert_eq!(m.delivery.data, body, "body kept byte for byte");
    assert_eq!(
        header(m, "x-crisp-bridge-reason").as_deref(),
        Some("invalid_json")
    );
    assert!(header(m, "x-crisp-bridge-detail")
        .unwrap_or_default()
        .contains("not valid JSON"));
    assert_eq!(
        header(m, "x-tenant").as_deref(),
        Some("acme"),
        "original headers kept"
    );
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m-1")
    );
    assert_eq!(m.delivery.routing_key.as_str(), "order.created");
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    assert!(app.sandbox.state.attempts().is_empty(), "no Crisp call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_cannot_make_an_event_are_dead_lettered_with_reasons() {
    let mut app = TestApp::builder("bad-messages").start().await;
    let cases: [(&str, &[u8], &str, Option<&str>); 4] = [
        ("order.created", br#"[1,2]"#, "not_an_object", None),
        (
            "order.created",
            br#"{"status":"paid"}"#,
            "people_id_missing",
            Some("order-created"),
        ),
        (
            "order.created",
            br#"{"status":"paid","email":"jane doe@example.com"}"#,
            "invalid_people_id",
            Some("order-created"),
        ),
        (
            "trial.started",
            br#"{"email":"a@b.io"}"#,
            "template_value_missing",
            Some("trial"),
        ),
    ];
    for (key, body, _, _) in &cases {
        app.publish(key, body).await;
    }
    let dead = app.broker.take(&app.names.dlq, cases.len()).await;
    let mut got: Vec<(String, Option<String>)> = dead
        .iter()
        .map(|m| {
            (
                header(m, "x-crisp-bridge-reason").unwrap_or_default(),
                header(m, "x-crisp-bridge-rule"),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, Option<String>)> = cases
        .iter()
        .map(|(_, _, r, rule)| (r.to_string(), rule.map(str::to_owned)))
        .collect();
    want.sort();
    assert_eq!(got, want);
    for m in &dead {
        let detail = header(m, "x-crisp-bridge-detail").unwrap_or_default();
        assert!(!detail.is_empty());
        assert!(
            !detail.contains("jane doe@example.com"),
            "details mask emails: {detail}"
        );
    }
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.queue).await, 0);
    assert!(
        app.sandbox.state.attempts().is_empty(),
        "no Crisp call for any of them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_profiles_are_dead_lettered_or_created() {
    // Default: 404 people_not_found is a dead letter.
    let mut app = TestApp::builder("no-profile").start().await;
    app.publish(
        "trial.started",
        br#"{"email":"new@b.io","phase":"started"}"#,
    )
    .await;
    let dead = app.broker.take(&app.names.dlq, 1).await;
    assert_eq!(
        header(&dead[0], "x-crisp-bridge-reason").as_deref(),
        Some("people_not_found")
    );
    app.stop().await;

    // With create_missing_profiles: the profile is created, then the event is sent.
    let mut app = TestApp::builder("create-profile")
        .config("[crisp]\ncreate_missing_profiles = true")
        .start()
        .await;
    app.publish(
        "trial.started",
        br#"{"email":"new@b.io","phase":"started"}"#,
    )
    .await;
    let events = app.events(1).await;
    assert_eq!(events[0].people_id, "new@b.io");
    let paths: Vec<(String, u16)> = app
        .sandbox
        .state
        .attempts()
        .into_iter()
        .map(|a| (a.path, a.status))
        .collect();
    assert_eq!(paths.len(), 3, "{paths:?}");
    assert_eq!(paths[0].1, 404);
    assert!(paths[1].0.ends_with("/people/profile"), "{paths:?}");
    assert_eq!(paths[2].1, 200);
    app.stop().await;
    assert_eq!(app.broker.ready(&app.names.dlq).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_one_person_keep_their_order() {
    let mut app = TestApp::builder("order")
        .sandbox(auto_profiles())
        .config("[delivery]\nconcurrency = 8")
        .start()
        .await;
    app.sandbox
        .state
        .set_latency(std::time::Duration::from_millis(5));
    let n = 40;
    for i in 0..n {
        let person = if i % 2 == 0 { "even@x.io" } else { "odd@x.io" };
        app.publish(
            "trial.step",
            json!({"email": person, "phase": i.to_string()})
                .to_string()
                .as_bytes(),
        )
        .await;
    }
    let events = app.events(n).await;
    for person in ["even@x.io", "odd@x.io"] {
        let seq: Vec<u32> = events
            .iter()
            .filter(|e| e.people_id == person)
            .map(|e| e.text.trim_start_matches("trial:").parse().expect("number"))
            .collect();
        let mut sorted = seq.clone();
        sorted.sort();
        assert_eq!(seq, sorted, "events for {person} arrived out of order");
        assert_eq!(seq.len(), n / 2);
    }
    app.stop().await;
}

/// Acks go in batches (`basic.ack` with `multiple`), which may only cover a run of tags
/// below the oldest delivery still open. Acks waiting above a stuck delivery must still be
/// sent, or they fill the prefetch window and the pod stops receiving: here the first
/// message's request takes 5 s and, with a prefetch of 4, the 20 after it must all reach
/// Crisp (and be acked, or the broker would not send the later ones) before it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_behind_a_slow_delivery_do_not_fill_the_prefetch_window() {
    let mut app = TestApp::builder("acks-stuck")
        .sandbox(auto_profiles())
        .replace("prefetch = 16", "prefetch = 4")
        .replace("timeout = \"2s\"", "timeout = \"30s\"")
        .start()
        .await;
    app.sandbox.state.push_fault(Fault {
        delay_ms: 5_000,
        ..Default::default()
    });
    let slow = json!({"email": "slow@b.io", "phase": "started"}).to_string();
    app.publish("trial.started", slow.as_bytes()).await;
    let state = app.sandbox.state.clone();
    eventually("the slow request to start", || {
        let taken = state.pending_faults() == 0;
        async move { taken.then_some(()) }
    })
    .await;
    let started = std::time::Instant::now();
    app.publish_people(20).await;
    let events = app.events(20).await;
    assert!(
        events.iter().all(|e| e.people_id != "slow@b.io"),
        "the 20 arrived while the slow request was still running"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let events = app.events(21).await;
    assert_eq!(events.len(), 21, "each message posted once");
    app.stop_with_empty_queues().await;
}
