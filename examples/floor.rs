//! The performance floor (issue 10): the twenty lines a user would write instead of the
//! bridge. Bare lapin consume -> reqwest POST -> ack; no rules, no metrics, no retries
//! beyond a requeue. Prefetch 128, at most 32 requests in flight.
//!
//!     FLOOR_QUEUE=q FLOOR_API_URL=http://127.0.0.1:PORT/v1 AMQP_URL=... floor
//!
//! `examples/perf.rs` runs it beside the bridge on the same queue and sink.

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::sync::Arc;
use tokio::sync::Semaphore;

const PREFETCH: u16 = 128;
const CONCURRENCY: usize = 32;
const WEBSITE_ID: &str = "04ed9a29-ccda-4f46-b2f3-b151d2d90fa7";

#[derive(serde::Deserialize)]
struct Message<'a> {
    email: &'a str,
    seq: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL")?;
    let queue = std::env::var("FLOOR_QUEUE")?;
    let api = std::env::var("FLOOR_API_URL")?;
    let events = Arc::new(format!("{api}/website/{WEBSITE_ID}/people/events/"));

    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "floor".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let http = reqwest::Client::new();
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let slot = Arc::clone(&slots).acquire_owned().await?;
        let http = http.clone();
        let events = Arc::clone(&events);
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(message) = serde_json::from_slice::<Message>(&delivery.data) else {
                let _ = delivery.acker.reject(BasicRejectOptions::default()).await;
                return;
            };
            let body = serde_json::json!({ "text": format!("load:{}", message.seq) });
            let sent = http
                .post(format!("{events}{}", message.email))
                .basic_auth("sandbox-identifier", Some("sandbox-key"))
                .header("X-Crisp-Tier", "plugin")
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await;
            if sent.is_ok_and(|r| r.status().is_success()) {
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            } else {
                let nack = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                let _ = delivery.acker.nack(nack).await;
            }
        });
    }
    Ok(())
}
