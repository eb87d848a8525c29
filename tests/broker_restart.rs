//! A RabbitMQ restart mid-stream (`rabbitmqctl stop_app` / `start_app`). Its own test
//! binary, because the restart cuts every connection of the process: cargo runs test
//! binaries one after another, so no other test sees it.

#[allow(dead_code)]
#[path = "it/harness.rs"]
mod harness;

use harness::{BrokerClient, TestApp};
use std::process::Command;

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    if !rabbitmqctl(&["status"]) {
        // The broker is not local (a container or a remote AMQP_URL): nothing to restart.
        eprintln!(
            "SKIPPED broker_restart_mid_stream_loses_nothing: rabbitmqctl cannot reach the broker"
        );
        return;
    }
    let options = crisp_bridge::sandbox::SandboxOptions {
        auto_create_profiles: true,
        ..Default::default()
    };
    let mut app = TestApp::builder("restart").sandbox(options).start().await;
    app.sandbox
        .state
        .set_latency(std::time::Duration::from_millis(20));
    let n = 40;
    app.publish_people(n).await;
    app.events(5).await;
    assert!(rabbitmqctl(&["stop_app"]), "rabbitmqctl stop_app");
    app.wait_ready(503).await;
    assert!(rabbitmqctl(&["start_app"]), "rabbitmqctl start_app");
    assert!(rabbitmqctl(&["await_startup"]));
    app.wait_ready(200).await;
    let events = app.events_for_people(n).await;
    eprintln!(
        "broker restart: published {n}, delivered {n}, lost 0, duplicates {}",
        events.len() - n
    );
    app.stop().await;
    // The test's own connection died with the restart.
    let broker = BrokerClient::connect().await;
    assert_eq!(broker.ready(&app.names.queue).await, 0);
    assert_eq!(broker.ready(&app.names.dlq).await, 0);
}
