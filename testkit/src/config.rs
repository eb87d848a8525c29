//! Names and the config builder, for the bridge in process and as a child alike.

use std::path::{Path, PathBuf};

/// Unique broker names for one test or run.
#[derive(Clone, Debug)]
pub struct Names {
    pub exchange: String,
    pub queue: String,
    pub dlx: String,
    pub dlq: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let base = format!("{prefix}.{}", &id[..8]);
        Self {
            exchange: format!("{base}.events"),
            queue: base.clone(),
            dlx: format!("{base}.dlx"),
            dlq: format!("{base}.dead"),
        }
    }
}

/// The rules most tests use: an order rule with a condition plus a catch-all for trials.
pub const RULES: &str = r##"
[[rules]]
name = "order-created"
routing_key = "order.created"
when = { "/status" = "paid" }
people_id = ["/customer/email", "/email"]
text = "order:created"
color = "blue"
data = { order_id = "/id", total = "/amount/total", currency = "/amount/currency" }

[[rules]]
name = "trial"
routing_key = "trial.#"
people_id = "/email"
text = "trial:{/phase}"
color = "green"
data = { plan = "/plan", account = "/account" }
"##;

/// The one rule of the benchmarks' and the soak's load (`load.event`, see
/// [`crate::load_message`]).
pub const LOAD_RULES: &str = r##"
[[rules]]
name = "load"
routing_key = "load.#"
people_id = "/email"
text = "load:{/seq}"
color = "blue"
data = { seq = "/seq", plan = "/plan" }
"##;

/// Which base config: the tests' (short backoffs, a 2 s Crisp timeout) or the load's
/// (the product's delivery defaults, JSON logs at `warn`, as a benchmark measures them).
#[derive(Clone, Copy, Debug)]
enum Base {
    Test,
    Load { prefetch: u16 },
}

/// A bridge config: a base, rules, edits of the base, and layers merged over it key by
/// key. The in-process app reads the layers as they are; a child reads them merged into
/// one file ([`TestConfig::write`]).
#[derive(Clone, Debug)]
pub struct TestConfig {
    base: Base,
    amqp_url: String,
    names: Names,
    api_url: String,
    rules: String,
    replacements: Vec<(String, String)>,
    layers: Vec<String>,
}

impl TestConfig {
    /// The tests' config with [`RULES`].
    pub fn test(amqp_url: &str, names: &Names, api_url: &str) -> Self {
        Self::with_base(Base::Test, amqp_url, names, api_url, RULES)
    }

    /// The load's config with [`LOAD_RULES`].
    pub fn load(amqp_url: &str, names: &Names, api_url: &str, prefetch: u16) -> Self {
        Self::with_base(
            Base::Load { prefetch },
            amqp_url,
            names,
            api_url,
            LOAD_RULES,
        )
    }

    fn with_base(base: Base, amqp_url: &str, names: &Names, api_url: &str, rules: &str) -> Self {
        Self {
            base,
            amqp_url: amqp_url.into(),
            names: names.clone(),
            api_url: api_url.into(),
            rules: rules.into(),
            replacements: Vec::new(),
            layers: Vec::new(),
        }
    }

    /// Replaces the rules of the base.
    pub fn rules(mut self, rules: &str) -> Self {
        self.rules = rules.into();
        self
    }

    /// Replaces `from` in the base with `to`, for keys a later layer cannot unset.
    pub fn replace(mut self, from: &str, to: &str) -> Self {
        self.replacements.push((from.into(), to.into()));
        self
    }

    /// TOML merged over the base, key by key.
    pub fn layer(mut self, toml: &str) -> Self {
        self.layers.push(toml.into());
        self
    }

    /// The base with its rules and replacements.
    pub fn base_toml(&self) -> String {
        let (amqp, crisp, rest) = match self.base {
            Base::Test => (
                "prefetch = 16\n".to_owned(),
                "timeout = \"2s\"",
                "[delivery]\ninitial_backoff = \"20ms\"\nmax_backoff = \"200ms\"\nmax_retry_time = \"20s\"\nshutdown_timeout = \"5s\"\n\n[server]\nlisten = \"127.0.0.1:0\"",
            ),
            Base::Load { prefetch } => (
                format!("prefetch = {prefetch}\ndelivery_limit = 1000\n"),
                "timeout = \"5s\"",
                "[server]\nlisten = \"127.0.0.1:0\"\n\n[log]\nformat = \"json\"\nlevel = \"warn\"",
            ),
        };
        let mut toml = format!(
            r#"
[amqp]
url = "{url}"
exchange = "{ex}"
queue = "{q}"
queue_type = "quorum"
{amqp}dead_letter_exchange = "{dlx}"
dead_letter_queue = "{dlq}"

[crisp]
website_id = "{website}"
identifier = "{id}"
key = "{key}"
api_url = "{api_url}"
{crisp}

{rest}
{rules}
"#,
            url = self.amqp_url,
            ex = self.names.exchange,
            q = self.names.queue,
            dlx = self.names.dlx,
            dlq = self.names.dlq,
            website = crisp_bridge::sandbox::DEFAULT_WEBSITE_ID,
            id = crisp_bridge::sandbox::DEFAULT_IDENTIFIER,
            key = crisp_bridge::sandbox::DEFAULT_KEY,
            api_url = self.api_url,
            rules = self.rules,
        );
        for (from, to) in &self.replacements {
            assert!(
                toml.contains(from.as_str()),
                "`{from}` is not in the base config"
            );
            toml = toml.replace(from.as_str(), to);
        }
        toml
    }

    /// The base, then every layer, as the bridge merges them.
    pub fn layers(&self) -> Vec<String> {
        std::iter::once(self.base_toml())
            .chain(self.layers.iter().cloned())
            .collect()
    }

    /// The config as the bridge validates it (in process).
    pub fn validated(&self) -> crisp_bridge::config::Validated {
        let layers = self.layers();
        let refs: Vec<&str> = layers.iter().map(String::as_str).collect();
        let config = crisp_bridge::config::from_toml_layers(&refs)
            .unwrap_or_else(|e| panic!("test config: {e}\n{}", layers.join("\n")));
        crisp_bridge::config::validate(config)
            .unwrap_or_else(|p| panic!("test config invalid: {p:?}"))
    }

    /// Every layer merged into one TOML document: tables key by key, other values (and
    /// arrays, such as rules) replaced, as the bridge's own layering does.
    pub fn merged_toml(&self) -> String {
        let mut merged = toml::Table::new();
        for layer in self.layers() {
            let table: toml::Table = layer
                .parse()
                .unwrap_or_else(|e| panic!("config layer: {e}\n{layer}"));
            merge(&mut merged, table);
        }
        toml::to_string(&merged).expect("config serializes")
    }

    /// Writes [`Self::merged_toml`] to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.merged_toml()).expect("write config");
    }

    /// Where [`Self::write_temp`] writes: a file named after the queue.
    pub fn temp_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}.toml", self.names.queue))
    }

    /// Writes the config to [`Self::temp_path`] and returns that path.
    pub fn write_temp(&self) -> PathBuf {
        let path = self.temp_path();
        self.write(&path);
        path
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}
