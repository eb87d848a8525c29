//! `crisp-bridge replay`: dead letters go back to the main exchange once the cause is fixed.

use crisp_bridge::config;
use crisp_bridge::replay::{replay, Selection};
use crisp_bridge::sandbox::{Fault, SandboxOptions};
use crisp_bridge_testkit::{eventually, header, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_selected_dead_letters_and_keeps_the_rest_in_order() {
    let mut app = TestApp::builder("replay")
        .sandbox(SandboxOptions {
            auto_create_profiles: true,
            ..Default::default()
        })
        .start()
        .await;
    // Five dead letters, one at a time so the queue's order is the publish order: three
    // without a people id (kept), two Crisp refused with 400 (replayed once it is fixed).
    let messages: [(&[u8], bool); 5] = [
        (br#"{"phase":"k1"}"#, false),
        (br#"{"email":"a@b.io","phase":"r1"}"#, true),
        (br#"{"phase":"k2"}"#, false),
        (br#"{"email":"c@d.io","phase":"r2"}"#, true),
        (br#"{"phase":"k3"}"#, false),
    ];
    for (i, (body, rejected)) in messages.iter().enumerate() {
        if *rejected {
            app.sandbox.state.push_fault(Fault {
                status: Some(400),
                ..Default::default()
            });
        }
        let props = lapin::BasicProperties::default()
            .with_message_id(format!("m-{i}").into())
            .with_headers({
                let mut h = lapin::types::FieldTable::default();
                h.insert(
                    "tenant".into(),
                    lapin::types::AMQPValue::LongString("acme".into()),
                );
                h
            });
        app.publish_with("trial.started", body, props).await;
        let want = i as u32 + 1;
        eventually("the dead letter", || async {
            (app.broker.ready(&app.names.dlq).await == want).then_some(())
        })
        .await;
    }
    assert!(app.sandbox.state.events().is_empty());

    let amqp = config::from_toml_str(&app.config.merged_toml())
        .expect("config")
        .amqp;
    let by_reason = |dry_run| Selection {
        reasons: vec!["crisp_rejected".into()],
        dry_run,
        ..Default::default()
    };

    // A dry run changes nothing.
    let report = replay(&amqp, &by_reason(true)).await.expect("dry run");
    assert_eq!((report.replayed_total(), report.kept_total()), (2, 3));
    assert_eq!(report.kept.get("people_id_missing"), Some(&3));
    eventually("the dry run's messages handed back", || async {
        (app.broker.ready(&app.names.dlq).await == 5).then_some(())
    })
    .await;

    let report = replay(&amqp, &by_reason(false)).await.expect("replay");
    assert_eq!((report.replayed_total(), report.kept_total()), (2, 3));
    // The replayed messages reach Crisp this time (no fault is queued any more).
    let events = app.events(2).await;
    let mut texts: Vec<&str> = events.iter().map(|e| e.text.as_str()).collect();
    texts.sort();
    assert_eq!(texts, ["trial:r1", "trial:r2"]);

    // The rest is still dead-lettered, in its order, untouched.
    let kept = app.broker.take(&app.names.dlq, 3).await;
    let bodies: Vec<&[u8]> = kept.iter().map(|m| m.delivery.data.as_slice()).collect();
    assert_eq!(bodies, [messages[0].0, messages[2].0, messages[4].0]);
    for m in &kept {
        assert_eq!(
            header(m, "x-crisp-bridge-reason").as_deref(),
            Some("people_id_missing")
        );
        assert_eq!(header(m, "tenant").as_deref(), Some("acme"));
    }
    app.stop_with_empty_queues().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_whose_routing_key_matches_no_binding_is_kept_not_lost() {
    let mut app = TestApp::builder("replay-unroutable").start().await;
    // Published straight to the queue (default exchange, the queue's name as key): its
    // dead letter keeps a routing key no binding of the main exchange matches.
    app.broker
        .publish(
            "",
            &app.names.queue,
            b"not json",
            lapin::BasicProperties::default(),
        )
        .await;
    eventually("the dead letter", || async {
        (app.broker.ready(&app.names.dlq).await == 1).then_some(())
    })
    .await;
    let amqp = config::from_toml_str(&app.config.merged_toml())
        .expect("config")
        .amqp;
    let selection = Selection {
        reasons: vec!["invalid_json".into()],
        ..Default::default()
    };
    let error = replay(&amqp, &selection)
        .await
        .expect_err("an unroutable replay is refused");
    assert!(error.to_string().contains("matches no binding"), "{error}");
    eventually("the dead letter still there", || async {
        (app.broker.ready(&app.names.dlq).await == 1).then_some(())
    })
    .await;
    let kept = app.broker.take(&app.names.dlq, 1).await;
    assert_eq!(kept[0].delivery.data, b"not json");
    app.stop().await;
}
