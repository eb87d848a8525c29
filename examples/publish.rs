//! Publishes sample domain events to the bridge's exchange, with publisher confirms.
//!
//!     cargo run --example publish -- [--url URL] [--exchange NAME] FILE...
//!
//! Each file's name without `.json` is its routing key: `order.created.json` is
//! published with routing key `order.created`. A `*.cloudevent.json` file is a structured
//! CloudEvent: it is published with content type `application/cloudevents+json`.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::path::Path;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut exchange = "domain-events".to_owned();
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => {
                url = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--url needs a value"))?
            }
            "--exchange" => {
                exchange = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--exchange needs a value"))?
            }
            _ => files.push(arg),
        }
    }
    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for file in files {
        let path = Path::new(&file);
        let routing_key = path.file_stem().and_then(|s| s.to_str()).ok_or_else(|| {
            anyhow::anyhow!("{file}: cannot take a routing key from the file name")
        })?;
        let body = std::fs::read(path)?;
        let content_type = if routing_key.ends_with(".cloudevent") {
            "application/cloudevents+json"
        } else {
            "application/json"
        };
        let properties = BasicProperties::default()
            .with_content_type(content_type.into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_delivery_mode(2);
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "the broker refused {file}");
        println!("published {routing_key} ({} bytes)", body.len());
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}
