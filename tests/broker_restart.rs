//! A RabbitMQ restart mid-stream (`rabbitmqctl stop_app` / `start_app`). Its own test
//! binary, because the restart cuts every connection of the process: cargo runs test
//! binaries one after another, so no other test sees it.

use crisp_bridge_testkit::{amqp_url, auto_profiles, BrokerClient, TestApp};
use std::process::Command;

/// The command that drives the broker under test: `TEST_RABBITMQCTL`
/// (split on whitespace, e.g. `scripts/rabbitmqctl4` for the 4.x node of
/// `scripts/ensure-rabbitmq4.sh`), else `rabbitmqctl`. Not `CRISP_BRIDGE_*`: the bridge
/// reads every such variable as a config key and refuses unknown ones.
fn ctl_command() -> Vec<String> {
    std::env::var("TEST_RABBITMQCTL")
        .ok()
        .map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| vec!["rabbitmqctl".to_string()])
}

fn rabbitmqctl_output(args: &[&str]) -> Option<String> {
    let ctl = ctl_command();
    let out = Command::new(&ctl[0])
        .args(&ctl[1..])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rabbitmqctl(args: &[&str]) -> bool {
    rabbitmqctl_output(args).is_some()
}

/// The port of an `amqp://user:pass@host:port/vhost` URL.
fn amqp_port(url: &str) -> u16 {
    let authority = url.split("://").nth(1).unwrap_or(url);
    let authority = authority.split('/').next().unwrap_or(authority);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(if url.starts_with("amqps") { 5671 } else { 5672 })
}

#[test]
fn amqp_port_parses_urls() {
    assert_eq!(amqp_port("amqp://guest:guest@127.0.0.1:5673/%2f"), 5673);
    assert_eq!(amqp_port("amqp://guest:guest@localhost/%2f"), 5672);
    assert_eq!(amqp_port("amqp://127.0.0.1:5674"), 5674);
}

/// Whether the ctl drives the node that serves `url`: it has an AMQP listener on the
/// URL's port. Guards against restarting some other broker on this machine.
fn ctl_drives(url: &str) -> bool {
    let port = amqp_port(url);
    // `status` lists "Interface: [::], port: 5672, protocol: amqp, ..." (3.x and 4.x).
    rabbitmqctl_output(&["status"]).is_some_and(|status| {
        status
            .lines()
            .any(|l| l.contains(&format!("port: {port}, protocol: amqp,")))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_nothing() {
    let url = amqp_url().await;
    if !ctl_drives(&url) {
        // An explicit ctl that misses the broker is a setup error; without one the broker
        // is not local (a container or a remote AMQP_URL): nothing to restart.
        assert!(
            std::env::var_os("TEST_RABBITMQCTL").is_none(),
            "TEST_RABBITMQCTL {:?} does not drive the broker of {url}",
            ctl_command()
        );
        eprintln!(
            "SKIPPED broker_restart_mid_stream_loses_nothing: rabbitmqctl does not drive the broker of {url}"
        );
        return;
    }
    let version = rabbitmqctl_output(&["version"]).unwrap_or_default();
    eprintln!("broker restart: RabbitMQ {}", version.trim());
    let mut app = TestApp::builder("restart")
        .sandbox(auto_profiles())
        .start()
        .await;
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
