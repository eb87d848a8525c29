//! Every metric name and label in one place; each notable event records its metric here.
//! Labels stay bounded: rule names, outcome, reason code, HTTP status — never ids.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub const MESSAGES: &str = "crisp_bridge_messages_total";
pub const DEAD_LETTERS: &str = "crisp_bridge_dead_letters_total";
pub const CRISP_REQUESTS: &str = "crisp_bridge_crisp_requests_total";
pub const CRISP_REQUEST_DURATION: &str = "crisp_bridge_crisp_request_duration_seconds";
pub const CRISP_REQUESTS_TODAY: &str = "crisp_bridge_crisp_requests_today";
pub const IN_FLIGHT: &str = "crisp_bridge_in_flight";
pub const RETRIES: &str = "crisp_bridge_retries_total";
pub const FIELDS_STRIPPED: &str = "crisp_bridge_fields_stripped_total";
pub const DATA_KEY_COLLISIONS: &str = "crisp_bridge_data_key_collisions_total";
pub const DATA_KEYS_DROPPED: &str = "crisp_bridge_data_keys_dropped_total";
pub const STALE_ACKS: &str = "crisp_bridge_stale_settlements_total";
pub const DUPLICATES: &str = "crisp_bridge_duplicates_suppressed_total";
pub const BROKER_CONNECTS: &str = "crisp_bridge_broker_connections_total";
pub const CRISP_REFUSED: &str = "crisp_bridge_crisp_refused";
pub const CRISP_OUTAGE: &str = "crisp_bridge_crisp_outage_hold";
pub const LANE_PANICS: &str = "crisp_bridge_lane_panics_total";
pub const CONCURRENCY_LIMIT: &str = "crisp_bridge_concurrency_limit";
pub const HOLDING: &str = "crisp_bridge_rate_limit_hold";
pub const DEAD_LETTERS_BLOCKED: &str = "crisp_bridge_dead_letters_blocked";
pub const BUILD_INFO: &str = "crisp_bridge_build_info";
pub const MESSAGE_AGE: &str = "crisp_bridge_message_age_seconds";
pub const TAP_DROPPED: &str = "crisp_bridge_tap_dropped_total";

/// The git revision this binary was built from (`build.rs`).
pub const REVISION: &str = env!("BRIDGE_GIT_REVISION");
pub const REQUEST_RATE_LIMIT: &str = "crisp_bridge_request_rate_limit";

/// Rule label for messages no rule applied to.
pub const NO_RULE: &str = "none";

/// Final outcome of a message (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageOutcome {
    Delivered,
    Skipped,
    DeadLettered,
    Requeued,
}

impl MessageOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageOutcome::Delivered => "delivered",
            MessageOutcome::Skipped => "skipped",
            MessageOutcome::DeadLettered => "dead_lettered",
            MessageOutcome::Requeued => "requeued",
        }
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; later calls return the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(CRISP_REQUEST_DURATION.into()),
                    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(MESSAGE_AGE.into()),
                        &[
                            0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
                        ],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (by an embedding program); then
            // this handle renders nothing, which is better than failing to start.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(MESSAGES, "Messages settled, by rule and outcome.");
    describe_counter!(
        DEAD_LETTERS,
        "Messages dead-lettered, by rule and reason code."
    );
    describe_counter!(
        CRISP_REQUESTS,
        "Crisp requests by HTTP status, or transport_error."
    );
    describe_histogram!(
        CRISP_REQUEST_DURATION,
        Unit::Seconds,
        "Crisp request duration."
    );
    describe_gauge!(
        CRISP_REQUESTS_TODAY,
        "Crisp requests made since 00:00 UTC (the daily quota counts these)."
    );
    describe_gauge!(IN_FLIGHT, "Messages being delivered to Crisp right now.");
    describe_counter!(
        RETRIES,
        "Crisp requests retried after a transient failure or rate limit."
    );
    describe_counter!(
        FIELDS_STRIPPED,
        "Secret-looking keys removed from event data."
    );
    describe_counter!(
        DATA_KEY_COLLISIONS,
        "Event data keys that became the same as an earlier key after Crisp's key rule (the first value is kept)."
    );
    describe_counter!(
        DATA_KEYS_DROPPED,
        "Event data keys left out because one event would have carried more than delivery.max_data_keys."
    );
    describe_counter!(
        STALE_ACKS,
        "Acks, nacks or rejects for a delivery whose channel had died (the broker redelivers it)."
    );
    describe_counter!(
        DUPLICATES,
        "Redelivered messages whose message_id was already delivered, acked without a second post."
    );
    describe_counter!(BROKER_CONNECTS, "Broker connection attempts, by result.");
    describe_gauge!(
        HOLDING,
        "1 while Crisp keeps rate limiting us (a spent daily quota?): nothing is sent but one trial request at a time; messages wait with the pod."
    );
    describe_gauge!(
        DEAD_LETTERS_BLOCKED,
        "1 while dead-letter copies find no queue (the dead-letter queue is missing): nothing is sent, /readyz fails."
    );
    describe_gauge!(
        CONCURRENCY_LIMIT,
        "Crisp requests allowed in flight right now (the adaptive limit, at most delivery.concurrency)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels name the version and git revision of this binary."
    );
    describe_histogram!(
        MESSAGE_AGE,
        Unit::Seconds,
        "Time from a message's AMQP timestamp property to its settlement (messages without the property are not counted)."
    );
    describe_gauge!(
        CRISP_OUTAGE,
        "1 while Crisp keeps failing: nothing is sent but one trial request at a time (messages wait with the pod)."
    );
    describe_counter!(
        LANE_PANICS,
        "Messages whose processing panicked (a bug); each was handed back to the broker."
    );
    describe_gauge!(
        REQUEST_RATE_LIMIT,
        "Requests per second this pod allows itself, learned from Crisp's 429/420 answers (0: none learned)."
    );
    describe_counter!(
        TAP_DROPPED,
        "Tap lines (GET /tap) dropped because a subscriber's buffer was full (a slow reader); delivery never waits for one."
    );
    describe_gauge!(
        CRISP_REFUSED,
        "1 while Crisp refuses our credentials, plan or website id."
    );
}

/// Exports every metric from start, with a zero series for each label value known up
/// front (rules, outcomes, reasons), so dashboards and alerts see them before the first
/// event rather than "no data".
pub fn register(rules: &[&str]) {
    use crate::outcome::Reason;
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "revision" => REVISION).set(1.0);
    // Reasons decided before any rule applies, and those a rule's message can get.
    let without_rule = [
        Reason::InvalidJson,
        Reason::NotAnObject,
        Reason::Unmatched,
        Reason::TooLarge,
    ];
    let with_rule = [
        Reason::PeopleIdMissing,
        Reason::InvalidPeopleId,
        Reason::TemplateValueMissing,
        Reason::EmptyText,
        Reason::CrispRejected,
        Reason::PeopleNotFound,
        Reason::SchemaViolation,
    ];
    for rule in rules.iter().copied().chain([NO_RULE]) {
        for outcome in [
            MessageOutcome::Delivered,
            MessageOutcome::Skipped,
            MessageOutcome::DeadLettered,
            MessageOutcome::Requeued,
        ] {
            counter!(MESSAGES, "rule" => rule.to_owned(), "outcome" => outcome.as_str())
                .increment(0);
        }
        let reasons: &[Reason] = if rule == NO_RULE {
            &without_rule
        } else {
            &with_rule
        };
        for reason in reasons {
            counter!(DEAD_LETTERS, "rule" => rule.to_owned(), "reason" => reason.code())
                .increment(0);
        }
        if rule != NO_RULE {
            for name in [FIELDS_STRIPPED, DATA_KEY_COLLISIONS, DATA_KEYS_DROPPED] {
                counter!(name, "rule" => rule.to_owned()).increment(0);
            }
        }
    }
    counter!(CRISP_REQUESTS, "status" => "transport_error").increment(0);
    let _ = histogram!(CRISP_REQUEST_DURATION);
    let _ = histogram!(MESSAGE_AGE);
    for name in [RETRIES, STALE_ACKS, DUPLICATES, LANE_PANICS, TAP_DROPPED] {
        counter!(name).increment(0);
    }
    for result in ["ok", "error"] {
        counter!(BROKER_CONNECTS, "result" => result).increment(0);
    }
    for name in [
        IN_FLIGHT,
        CRISP_REFUSED,
        CRISP_OUTAGE,
        HOLDING,
        DEAD_LETTERS_BLOCKED,
        CRISP_REQUESTS_TODAY,
    ] {
        gauge!(name).increment(0.0);
    }
}

/// Age of a settled message: from its AMQP `timestamp` (seconds since the epoch).
pub fn message_age(timestamp: Option<u64>) {
    use std::time::{SystemTime, UNIX_EPOCH};
    let (Some(sent), Ok(now)) = (timestamp, SystemTime::now().duration_since(UNIX_EPOCH)) else {
        return;
    };
    // A publisher's clock ahead of ours gives 0, not a negative age.
    static KEPT: OnceLock<Histogram> = OnceLock::new();
    cached(&KEPT, || histogram!(MESSAGE_AGE))
        .record(now.as_secs_f64() - (sent as f64).min(now.as_secs_f64()));
}

/// Per-message metrics use handles kept here once the recorder is installed: going through
/// the recorder each time allocates the label strings and hashes the whole key, a sizeable
/// part of the bridge's own CPU per message. Before `install` (unit tests, an
/// embedding program) handles are not kept, so a later recorder still sees every update.
fn cached<T: Clone>(cell: &'static OnceLock<T>, make: impl FnOnce() -> T) -> T {
    if HANDLE.get().is_some() {
        cell.get_or_init(make).clone()
    } else {
        make()
    }
}

/// A labelled handle, kept per label value (rule names and HTTP statuses: bounded sets).
fn cached_by<T: Clone>(
    cell: &'static OnceLock<Mutex<HashMap<String, T>>>,
    label: &str,
    make: impl FnOnce() -> T,
) -> T {
    if HANDLE.get().is_none() {
        return make();
    }
    let mut map = cell
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = map.get(label) {
        return handle.clone();
    }
    let handle = make();
    map.insert(label.to_owned(), handle.clone());
    handle
}

pub fn message(rule: &str, outcome: MessageOutcome) {
    static BY_RULE: OnceLock<Mutex<HashMap<String, [Counter; 4]>>> = OnceLock::new();
    let counters = cached_by(&BY_RULE, rule, || {
        [
            MessageOutcome::Delivered,
            MessageOutcome::Skipped,
            MessageOutcome::DeadLettered,
            MessageOutcome::Requeued,
        ]
        .map(|o| counter!(MESSAGES, "rule" => rule.to_owned(), "outcome" => o.as_str()))
    });
    let index = match outcome {
        MessageOutcome::Delivered => 0,
        MessageOutcome::Skipped => 1,
        MessageOutcome::DeadLettered => 2,
        MessageOutcome::Requeued => 3,
    };
    counters[index].increment(1);
}

pub fn dead_letter(rule: &str, reason: &'static str) {
    counter!(DEAD_LETTERS, "rule" => rule.to_owned(), "reason" => reason).increment(1);
}

pub fn crisp_request(status: &str) {
    static BY_STATUS: OnceLock<Mutex<HashMap<String, Counter>>> = OnceLock::new();
    cached_by(
        &BY_STATUS,
        status,
        || counter!(CRISP_REQUESTS, "status" => status.to_owned()),
    )
    .increment(1);
    requests_today();
}

pub fn crisp_request_duration(elapsed: Duration) {
    static KEPT: OnceLock<Histogram> = OnceLock::new();
    cached(&KEPT, || histogram!(CRISP_REQUEST_DURATION)).record(elapsed.as_secs_f64());
}

pub fn in_flight(delta: f64) {
    static KEPT: OnceLock<Gauge> = OnceLock::new();
    cached(&KEPT, || gauge!(IN_FLIGHT)).increment(delta);
}

pub fn retry() {
    counter!(RETRIES).increment(1);
}

/// What mapping one event left out of its `data`.
pub fn data_counts(rule: &str, counts: &crate::route::map::DataCounts) {
    for (name, count) in [
        (FIELDS_STRIPPED, counts.stripped),
        (DATA_KEY_COLLISIONS, counts.collisions),
        (DATA_KEYS_DROPPED, counts.dropped),
    ] {
        if count > 0 {
            counter!(name, "rule" => rule.to_owned()).increment(count as u64);
        }
    }
}

pub fn stale_settlement() {
    counter!(STALE_ACKS).increment(1);
}

pub fn duplicate_suppressed() {
    counter!(DUPLICATES).increment(1);
}

pub fn broker_connect(ok: bool) {
    counter!(BROKER_CONNECTS, "result" => if ok { "ok" } else { "error" }).increment(1);
}

pub fn crisp_refused(refused: bool) {
    gauge!(CRISP_REFUSED).set(if refused { 1.0 } else { 0.0 });
}

pub fn crisp_outage(holding: bool) {
    gauge!(CRISP_OUTAGE).set(if holding { 1.0 } else { 0.0 });
}

pub fn tap_dropped() {
    static KEPT: OnceLock<Counter> = OnceLock::new();
    cached(&KEPT, || counter!(TAP_DROPPED)).increment(1);
}

pub fn lane_panic() {
    counter!(LANE_PANICS).increment(1);
}

/// Requests per UTC day, for the daily quota (5,000 for a plugin token).
fn requests_today() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static DAY: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let day = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0);
    if DAY.swap(day, Ordering::AcqRel) != day {
        COUNT.store(0, Ordering::Release);
    }
    let n = COUNT.fetch_add(1, Ordering::AcqRel) + 1;
    static KEPT: OnceLock<Gauge> = OnceLock::new();
    cached(&KEPT, || gauge!(CRISP_REQUESTS_TODAY)).set(n as f64);
}

pub fn concurrency_limit(limit: f64) {
    gauge!(CONCURRENCY_LIMIT).set(limit);
}

pub fn request_rate_limit(per_second: f64) {
    gauge!(REQUEST_RATE_LIMIT).set(per_second);
}

pub fn dead_letters_blocked(on: bool) {
    gauge!(DEAD_LETTERS_BLOCKED).set(if on { 1.0 } else { 0.0 });
}

pub fn holding(on: bool) {
    gauge!(HOLDING).set(if on { 1.0 } else { 0.0 });
}
