//! Typed configuration: built-in defaults, then the TOML file, then `CRISP_BRIDGE_*`
//! environment variables (`__` between levels). Unknown keys are refused.
//! [`validate`] checks everything that can be checked before touching the network.

pub mod redact;
mod secret;
mod validate;

pub use redact::redact_url;
pub use secret::{read_secret_file, Secret};
pub use validate::{tls_file_problems, validate, Problem, Validated};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use schemars::JsonSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file read when neither `--config` nor `$CRISP_BRIDGE_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = "crisp-bridge.toml";
pub const ENV_PREFIX: &str = "CRISP_BRIDGE_";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("config file {0} does not exist; pass --config with an existing file or unset CRISP_BRIDGE_CONFIG")]
    Missing(PathBuf),
    #[error("config is invalid:\n  - {0}")]
    Invalid(String),
}

/// Loads the config: `explicit` (from `--config`), else `$CRISP_BRIDGE_CONFIG`, else
/// `crisp-bridge.toml` if present, then environment overrides.
pub fn load(explicit: Option<&Path>) -> Result<Config, LoadError> {
    let from_env = std::env::var_os("CRISP_BRIDGE_CONFIG").map(PathBuf::from);
    let named = explicit.map(Path::to_path_buf).or(from_env);
    let mut figment = Figment::new();
    match &named {
        Some(path) if !path.is_file() => return Err(LoadError::Missing(path.clone())),
        Some(path) => figment = figment.merge(Toml::file_exact(path.clone())),
        // Without a named file, the default file is optional: defaults and env may suffice.
        None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
            figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
        }
        None => {}
    }
    figment = figment.merge(
        Env::prefixed(ENV_PREFIX)
            .split("__")
            // CRISP_BRIDGE_CONFIG names the file; it is not a key.
            .ignore(&["config"]),
    );
    let base = named
        .as_deref()
        .or_else(|| {
            Path::new(DEFAULT_CONFIG_FILE)
                .is_file()
                .then(|| Path::new(DEFAULT_CONFIG_FILE))
        })
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let mut config = extract(&figment)?;
    if let Some(base) = &base {
        config.resolve_relative_paths(base);
    }
    config.base_dir = base.unwrap_or_default();
    Ok(config)
}

impl Config {
    /// Makes relative file paths in the config relative to `base`, the config file's
    /// directory, so the config means the same whatever the working directory.
    pub fn resolve_relative_paths(&mut self, base: &Path) {
        for path in [
            &mut self.amqp.url_file,
            &mut self.crisp.identifier_file,
            &mut self.crisp.key_file,
            &mut self.crisp.ca_file,
        ]
        .into_iter()
        .chain(
            self.amqp
                .tls
                .iter_mut()
                .flat_map(|t| [&mut t.ca_file, &mut t.cert_file, &mut t.key_file]),
        )
        .flatten()
        {
            if path.is_relative() && !path.as_os_str().is_empty() {
                *path = base.join(&*path);
            }
        }
    }
}

impl AmqpConfig {
    /// The URL to connect with now: the first of [`AmqpConfig::current_urls`].
    pub fn current_url(&self) -> Secret {
        let mut urls = self.current_urls();
        if urls.is_empty() {
            return self.url.clone();
        }
        urls.swap_remove(0)
    }

    /// The URLs to connect with now, in the order to try them: read again from
    /// `url_file` when set (a rotated Secret; one URL per line, blank lines and `#`
    /// comments skipped), else `urls`, else `url`. A file that cannot be read now keeps
    /// the URL read before.
    pub fn current_urls(&self) -> Vec<Secret> {
        let urls = match &self.url_file {
            Some(path) => match read_secret_file(path) {
                Ok(text) => split_urls(text.expose()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read amqp.url_file; using the URL read before");
                    vec![self.url.clone()]
                }
            },
            None if !self.urls.is_empty() => self.urls.clone(),
            None => vec![self.url.clone()],
        };
        // Before anything can fail on them: an error quoting one must not show its password.
        for url in &urls {
            redact::remember_url(url.expose());
        }
        urls
    }

    /// The config key the URL comes from, for errors: `amqp.url_file (PATH)` or `amqp.url`.
    pub fn url_key(&self) -> String {
        match &self.url_file {
            Some(path) => format!("amqp.url_file ({})", path.display()),
            None if !self.urls.is_empty() => "amqp.urls".to_owned(),
            None => "amqp.url (or CRISP_BRIDGE_AMQP__URL)".to_owned(),
        }
    }
}

/// The URLs of a `url_file`: one per line; blank lines and `#` comments skipped.
pub fn split_urls(text: &str) -> Vec<Secret> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(Secret::new)
        .collect()
}

/// What an AMQP URL must look like, for errors.
pub const AMQP_URL_FORM: &str = "amqp://user:password@host:5672/vhost (amqps:// for TLS; reserved characters in the user or password percent-encoded, such as %40 and %3A)";

/// Parses an AMQP URL; the error says why without quoting the URL (the parser's own error
/// may quote it whole, password included).
pub fn parse_amqp_url(url: &str) -> Result<lapin::uri::AMQPUri, String> {
    url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
        if e.starts_with("Invalid URL") || e.contains(url) {
            "it is not of the form scheme://host (is `//` missing after `amqp:`?)".to_owned()
        } else {
            let e = match redact::url_password(url) {
                Some(password) => e.replace(password, redact::MASK),
                None => e,
            };
            redact::scrub(&e).into_owned()
        }
    })
}

/// Loads from a TOML string plus the environment.
pub fn from_toml_str(toml: &str) -> Result<Config, LoadError> {
    from_toml_layers(&[toml])
}

/// Loads from TOML layers, later ones overriding earlier ones key by key, then the
/// environment.
pub fn from_toml_layers(layers: &[&str]) -> Result<Config, LoadError> {
    let figment = layers
        .iter()
        .fold(Figment::new(), |f, layer| f.merge(Toml::string(layer)))
        .merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]));
    extract(&figment)
}

/// The config, or every type error in it: serde stops at the first error of a struct,
/// so after a failure each section, and each rule, is read on its own (a bad `prefetch`
/// must not hide a bad `color`), and rules are named by their `name`.
fn extract(figment: &Figment) -> Result<Config, LoadError> {
    let whole = match figment.extract::<Config>() {
        Ok(config) => return Ok(config),
        Err(e) => e,
    };
    let mut problems = Vec::new();
    const SECTIONS: [&str; 6] = ["amqp", "crisp", "delivery", "server", "log", "rules"];
    if let Ok(top) = figment.extract::<std::collections::BTreeMap<String, figment::value::Value>>()
    {
        for key in top.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
            problems.push(format!(
                "key `{key}`: unknown section; expected one of {}",
                SECTIONS.join(", ")
            ));
        }
    }
    let mut section = |name: &str, result: Result<(), figment::Error>| match result {
        // An absent section takes its defaults.
        Err(e) if !e.missing() => problems.extend(describe_figment_error(e, name)),
        _ => {}
    };
    section(
        "amqp",
        figment.extract_inner::<AmqpConfig>("amqp").map(drop),
    );
    section(
        "crisp",
        figment.extract_inner::<CrispConfig>("crisp").map(drop),
    );
    section(
        "delivery",
        figment
            .extract_inner::<DeliveryConfig>("delivery")
            .map(drop),
    );
    section(
        "server",
        figment.extract_inner::<ServerConfig>("server").map(drop),
    );
    section("log", figment.extract_inner::<LogConfig>("log").map(drop));
    match figment.extract_inner::<Vec<figment::value::Value>>("rules") {
        Ok(rules) => {
            for (index, rule) in rules.iter().enumerate() {
                if let Err(e) = rule.deserialize::<RuleConfig>() {
                    let name = rule
                        .find_ref("name")
                        .and_then(|n| n.as_str())
                        .filter(|n| !n.trim().is_empty())
                        .map_or_else(
                            || format!("rule #{} (unnamed)", index + 1),
                            |n| format!("rule `{n}`"),
                        );
                    problems.extend(describe_figment_error(e, &name));
                }
            }
        }
        Err(e) if !e.missing() => problems.extend(describe_figment_error(e, "rules")),
        Err(_) => {}
    }
    if problems.is_empty() {
        // Not within a section (an unknown top-level key, say): what the whole said.
        problems = describe_figment_error(whole, "");
    }
    Err(LoadError::Invalid(problems.join("\n  - ")))
}

/// One line per error, each naming its key under `within` (a section, or a rule).
fn describe_figment_error(error: figment::Error, within: &str) -> Vec<String> {
    error
        .into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            // A section read alone names itself somewhere in the path.
            path.retain(|p| p != within);
            let key = path.join(".");
            let source = e
                .metadata
                .as_ref()
                .and_then(|m| m.source.as_ref())
                .map(|s| format!(" (from {s})"))
                .unwrap_or_default();
            let at = match (within.is_empty(), key.is_empty()) {
                (true, true) => String::new(),
                (true, false) => format!("key `{key}`: "),
                (false, true) => format!("{within}: "),
                (false, false) if within.starts_with("rule") => format!("{within} key `{key}`: "),
                (false, false) => format!("key `{within}.{key}`: "),
            };
            format!("{at}{}{source}", e.kind)
        })
        .collect()
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub amqp: AmqpConfig,
    pub crisp: CrispConfig,
    pub delivery: DeliveryConfig,
    pub server: ServerConfig,
    pub log: LogConfig,
    /// Routing rules, tried in order; the first whose routing key pattern and `when` match wins.
    pub rules: Vec<RuleConfig>,
    /// The directory of the config file: relative paths in the config (schemas) start here.
    #[serde(skip)]
    #[schemars(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

/// The RabbitMQ side.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// AMQP URL, password included; usually from `CRISP_BRIDGE_AMQP__URL`. Never logged.
    pub url: Secret,
    /// The nodes of one cluster, tried in turn after a failed or lost connection; when
    /// not empty it is used instead of `url`. Never logged.
    pub urls: Vec<Secret>,
    /// File holding the AMQP URL, or one URL per line (a mounted Secret), read at start and
    /// before each reconnect; excludes `url` and `urls`. Relative to the config file.
    pub url_file: Option<PathBuf>,
    /// Topic exchange the rules' routing keys bind to.
    pub exchange: String,
    /// Durable queue this consumer reads (shared by every pod).
    pub queue: String,
    /// `quorum` (recommended) or `classic`.
    pub queue_type: QueueType,
    /// Messages the broker hands to one pod before it acks any.
    pub prefetch: u16,
    /// Declare the queue with `x-single-active-consumer`: one pod consumes at a time, the
    /// others stand by and take over when it goes, so one person's events reach Crisp in
    /// order across pods and failovers. An existing queue must have been declared the
    /// same way (RabbitMQ cannot change it): otherwise `run` exits 78.
    pub single_active_consumer: bool,
    /// Declare exchange, queue, bindings and dead-letter topology at start.
    pub declare: bool,
    /// Durable fanout exchange dead letters are published to.
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Quorum queues: deliveries after which the broker dead-letters a message that keeps
    /// coming back (a crash or hang while handling it). 0 leaves the broker's default.
    pub delivery_limit: u32,
    /// The broker's `consumer_timeout` (RabbitMQ's default is 30 minutes): a delivery held
    /// longer closes the channel, so `delivery.max_retry_time` must stay well below it.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub consumer_timeout: Duration,
    /// AMQP heartbeat asked of the broker: a node that goes silent (rather than closing
    /// the connection) is noticed within two of them. `0s` turns heartbeats off.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub heartbeat: Duration,
    /// Largest message body handled; a larger one is dead-lettered `too_large` without
    /// being parsed (memory stays bounded whatever publishers send).
    pub max_message_bytes: usize,
    /// TLS files for `amqps://` URLs (a private CA, mutual TLS); read again before each
    /// connection. Without this table, `amqps://` trusts the system's CA certificates.
    pub tls: Option<AmqpTlsConfig>,
}

/// `[amqp.tls]`: PEM files, relative to the config file. An empty path counts as unset.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpTlsConfig {
    /// CA certificates (PEM bundle) trusted for the broker, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for brokers that require one; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM, unencrypted); needs `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl AmqpTlsConfig {
    pub fn ca(&self) -> Option<&Path> {
        given(&self.ca_file)
    }
    pub fn cert(&self) -> Option<&Path> {
        given(&self.cert_file)
    }
    pub fn key(&self) -> Option<&Path> {
        given(&self.key_file)
    }
}

fn given(path: &Option<PathBuf>) -> Option<&Path> {
    path.as_deref().filter(|p| !p.as_os_str().is_empty())
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            urls: Vec::new(),
            url_file: None,
            exchange: "domain-events".into(),
            queue: "crisp-bridge".into(),
            queue_type: QueueType::Quorum,
            prefetch: 64,
            single_active_consumer: false,
            declare: true,
            dead_letter_exchange: "crisp-bridge.dlx".into(),
            dead_letter_queue: "crisp-bridge.dead".into(),
            delivery_limit: 20,
            consumer_timeout: Duration::from_secs(30 * 60),
            heartbeat: Duration::from_secs(10),
            max_message_bytes: 1024 * 1024,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Plugin,
    Website,
    User,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Plugin => "plugin",
            Tier::Website => "website",
            Tier::User => "user",
        }
    }
}

/// The Crisp side.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CrispConfig {
    /// The Crisp website (UUID) the events are added to.
    pub website_id: Option<String>,
    /// Token identifier; usually from `CRISP_BRIDGE_CRISP__IDENTIFIER`.
    pub identifier: Option<Secret>,
    /// Token key; usually from `CRISP_BRIDGE_CRISP__KEY`. Never logged.
    pub key: Option<Secret>,
    /// File holding the token identifier, read at start and again whenever Crisp refuses
    /// the credentials (a rotated Secret is picked up without a restart); excludes
    /// `identifier`. Relative to the config file.
    pub identifier_file: Option<PathBuf>,
    /// File holding the token key, read like `identifier_file`; excludes `key`.
    pub key_file: Option<PathBuf>,
    /// Base URL of the REST API, up to and including `/v1`.
    pub api_url: String,
    /// PEM bundle of CA certificates trusted for `api_url` besides the system's (a
    /// TLS-inspecting egress proxy). Relative to the config file; read at start.
    pub ca_file: Option<PathBuf>,
    /// Proxy for Crisp requests, like `http://proxy:3128` (HTTPS goes through CONNECT).
    /// Empty: `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and `NO_PROXY` from the environment.
    pub proxy: Secret,
    /// Token tier sent as `X-Crisp-Tier`.
    pub tier: Tier,
    /// Timeout of one Crisp request.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// On 404 `people_not_found` for an email: create the profile, then send the event once more.
    pub create_missing_profiles: bool,
}

impl Default for CrispConfig {
    fn default() -> Self {
        Self {
            website_id: None,
            identifier: None,
            key: None,
            identifier_file: None,
            key_file: None,
            api_url: "https://api.crisp.chat/v1".into(),
            ca_file: None,
            proxy: Secret::new(""),
            tier: Tier::Plugin,
            timeout: Duration::from_secs(10),
            create_missing_profiles: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Unmatched {
    Ack,
    DeadLetter,
}

/// How events are delivered to Crisp.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Crisp requests in flight at most.
    pub concurrency: usize,
    /// Client-side request rate limit; 0 means none.
    pub max_requests_per_second: f64,
    /// First retry delay; doubles each attempt (full jitter).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub initial_backoff: Duration,
    /// Cap of one retry delay (a longer `Retry-After` is still honoured).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
    /// Retry budget of one message; then it is requeued, never dropped.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_retry_time: Duration,
    /// Messages no rule matches: `ack` or `dead-letter`.
    pub unmatched: Unmatched,
    /// Time in-flight messages get to finish on SIGTERM before they are requeued.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub shutdown_timeout: Duration,
    /// How long the `message_id` of a delivered message is remembered, so a redelivery
    /// to this pod is acked without posting it twice. "0s" turns this off.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub dedup_window: Duration,
    /// Most `data` keys one event carries after flattening; the rest are left out and
    /// counted (`crisp_bridge_data_keys_dropped_total`).
    pub max_data_keys: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: 32,
            max_requests_per_second: 0.0,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            max_retry_time: Duration::from_secs(300),
            unmatched: Unmatched::Ack,
            shutdown_timeout: Duration::from_secs(25),
            dedup_window: Duration::from_secs(600),
            max_data_keys: crate::route::map::DEFAULT_MAX_DATA_KEYS,
        }
    }
}

/// The admin HTTP server: `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the admin server listens on.
    pub listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, readable text otherwise.
    Auto,
    Json,
    Text,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Level or `tracing` filter (`info`, `crisp_bridge=debug`); `RUST_LOG` wins when set.
    pub level: String,
    /// `auto`, `json` or `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// One JSON pointer, or pointers tried in order.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Pointers {
    One(String),
    Many(Vec<String>),
}

impl Pointers {
    pub fn as_slice(&self) -> &[String] {
        match self {
            Pointers::One(p) => std::slice::from_ref(p),
            Pointers::Many(v) => v,
        }
    }
}

/// A routing rule: which messages it takes and the Crisp event it makes of them.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name, used in logs, metrics and the `x-crisp-bridge-rule` header.
    pub name: String,
    /// AMQP topic pattern: `*` one word, `#` zero or more. Optional when `type` is given
    /// (then `#`).
    #[serde(default)]
    pub routing_key: Option<String>,
    /// The event type this rule takes: the CloudEvents `type`, else the AMQP `type` property
    /// (exact match).
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    /// A JSON Schema (draft 2020-12) file, relative to the config file, that messages this
    /// rule takes must satisfy (what pointers see: the body, or the CloudEvents envelope);
    /// a message that fails is dead-lettered `schema_violation`.
    #[serde(default)]
    pub schema: Option<String>,
    /// JSON pointer -> required value (exact JSON equality).
    #[serde(default)]
    pub when: BTreeMap<String, serde_json::Value>,
    /// Where the Crisp people id (email or profile UUID) is found.
    pub people_id: Pointers,
    /// Event text: literal, or with `{/pointer}` placeholders.
    pub text: String,
    /// One of Crisp's ten colors.
    #[serde(default)]
    pub color: Option<String>,
    /// Event data: output key -> JSON pointer.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// The JSON Schema of the config file, generated from these types (doc comments become
/// descriptions). `schemas/config.schema.json` is this, kept current by a test.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Config)).unwrap_or_default()
}

#[cfg(test)]
mod load_tests {
    use super::*;

    #[test]
    fn every_type_error_is_listed_and_rules_are_named() {
        let err = from_toml_str(
            r#"
            [amqp]
            prefetch = -1
            [delivery]
            concurrency = "many"
            [surprise]
            x = 1
            [[rules]]
            name = "order-created"
            routing_key = "order.created"
            people_id = "/email"
            text = "order:created"
            color = 7
            "#,
        )
        .unwrap_err()
        .to_string();
        for wanted in [
            "key `amqp.prefetch`",
            "key `delivery.concurrency`",
            "key `surprise`: unknown section",
            "rule `order-created` key `color`",
        ] {
            assert!(err.contains(wanted), "missing {wanted} in\n{err}");
        }
        assert!(!err.contains("rules[0]"), "{err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regenerate with `UPDATE_SCHEMAS=1 cargo test config_schema`.
    #[test]
    fn config_schema_file_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/config.schema.json");
        let generated = format!(
            "{}\n",
            serde_json::to_string_pretty(&json_schema()).unwrap()
        );
        if std::env::var_os("UPDATE_SCHEMAS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "schemas/config.schema.json is stale; run UPDATE_SCHEMAS=1 cargo test config_schema"
        );
    }

    #[test]
    fn the_example_config_loads_and_matches_the_schema() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/crisp-bridge.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let config = from_toml_str(&text).unwrap();
        assert_eq!(config.rules.len(), 4);
        let as_json: serde_json::Value = toml_to_json(&text);
        let validator = jsonschema::validator_for(&json_schema()).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&as_json)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
    }

    fn toml_to_json(text: &str) -> serde_json::Value {
        Figment::new()
            .merge(Toml::string(text))
            .extract::<serde_json::Value>()
            .unwrap()
    }
}
