//! The test kit itself: what a child bridge reads is what the in-process one reads.

use crisp_bridge_testkit::{Names, TestConfig};

#[test]
fn layers_merge_table_by_table_into_one_file() {
    let names = Names::new("t.merge");
    let config = TestConfig::test("amqp://h/%2f", &names, "http://s/v1")
        .layer("[amqp]\nprefetch = 4\n[delivery]\nconcurrency = 2");
    let merged: toml::Table = config.merged_toml().parse().unwrap();
    assert_eq!(merged["amqp"]["prefetch"].as_integer(), Some(4));
    assert_eq!(merged["amqp"]["queue"].as_str(), Some(names.queue.as_str()));
    assert_eq!(merged["delivery"]["concurrency"].as_integer(), Some(2));
    assert_eq!(merged["delivery"]["initial_backoff"].as_str(), Some("20ms"));
    assert_eq!(merged["rules"].as_array().map(Vec::len), Some(2));
    // The child's one file and the in-process layers make the same config.
    let layers = config.layers();
    let layers: Vec<&str> = layers.iter().map(String::as_str).collect();
    let in_process = crisp_bridge::config::from_toml_layers(&layers).expect("layers");
    let child = crisp_bridge::config::from_toml_str(&config.merged_toml()).expect("file");
    assert_eq!(format!("{child:?}"), format!("{in_process:?}"));
}
