//! Everything that can be checked before touching the network, all problems at once.

use super::{read_secret_file, Config, Secret};
use crate::route::Router;
use std::fmt;
use std::net::SocketAddr;

/// One configuration problem: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// ``rule `order-created` `` for a rule (``rule #3 (unnamed)`` without a name, counting
    /// from 1), empty otherwise.
    pub rule: String,
    /// The key, like `color` or `crisp.website_id`.
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn global(key: &str, message: impl Into<String>) -> Self {
        Self {
            rule: String::new(),
            key: key.into(),
            message: message.into(),
        }
    }

    pub fn rule(index: usize, name: &str, key: &str, message: impl Into<String>) -> Self {
        Self {
            rule: if name.trim().is_empty() {
                format!("rule #{} (unnamed)", index + 1)
            } else {
                format!("rule `{name}`")
            },
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rule.is_empty() {
            write!(f, "{}: {}", self.key, self.message)
        } else {
            write!(f, "{} {}: {}", self.rule, self.key, self.message)
        }
    }
}

/// A config that passed validation, with what validation produced.
#[derive(Debug)]
pub struct Validated {
    pub config: Config,
    pub router: Router,
    pub listen: SocketAddr,
}

/// Longest duration any setting may have (a week): far beyond any sensible value, far
/// below what would overflow a clock.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// Lowest non-zero `delivery.max_requests_per_second`.
const MIN_RATE: f64 = 0.001;

/// Validates the whole config without touching the network.
pub fn validate(mut config: Config) -> Result<Validated, Vec<Problem>> {
    let mut problems = Vec::new();
    read_secret_files(&mut config, &mut problems);
    let mut bad = |key: &str, message: String| problems.push(Problem::global(key, message));

    let amqp = &config.amqp;
    // The file may hold several URLs, one per line: each is checked.
    let urls = match &amqp.url_file {
        Some(_) => super::split_urls(amqp.url.expose()),
        None if !amqp.urls.is_empty() => amqp.urls.clone(),
        None => vec![amqp.url.clone()],
    };
    for url in &urls {
        super::redact::remember_url(url.expose());
    }
    for secret in [&config.crisp.identifier, &config.crisp.key]
        .into_iter()
        .flatten()
    {
        super::redact::remember(secret.expose());
    }
    // The URL may have come from its file, which is then the key to fix.
    let url_key = match (&amqp.url_file, amqp.urls.is_empty()) {
        (Some(_), _) => "amqp.url_file",
        (None, false) => "amqp.urls",
        (None, true) => "amqp.url",
    };
    let where_set = match &amqp.url_file {
        Some(path) => format!("the URL in {}", path.display()),
        None => "set it with CRISP_BRIDGE_AMQP__URL".to_owned(),
    };
    if amqp.url_file.is_some() && !amqp.urls.is_empty() {
        bad(
            "amqp.urls",
            "is set with amqp.url_file; use one: the file may hold one URL per line".into(),
        );
    }
    if urls.is_empty() {
        bad(
            url_key,
            format!(
                "holds no URL; write one per line as {}",
                super::AMQP_URL_FORM
            ),
        );
    }
    for (i, url) in urls.iter().enumerate() {
        let url = url.expose();
        let which = if urls.len() > 1 {
            format!("URL {} of {}", i + 1, urls.len())
        } else {
            "the URL".to_owned()
        };
        // Never echo the URL: it holds the password.
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            bad(
                url_key,
                format!(
                    "{which} must start with amqp:// or amqps:// ({where_set}); write it as {}",
                    super::AMQP_URL_FORM
                ),
            );
        } else if let Err(why) = super::parse_amqp_url(url) {
            bad(
                url_key,
                format!(
                    "{which} does not parse as an AMQP URL: {why} ({where_set}); write it as {}",
                    super::AMQP_URL_FORM
                ),
            );
        }
    }
    let tls_urls = urls
        .iter()
        .filter(|u| u.expose().starts_with("amqps://"))
        .count();
    if tls_urls > 0 && tls_urls < urls.len() {
        bad(
            url_key,
            "mixes amqp:// and amqps:// URLs; the nodes of one cluster speak one or the other: use amqps:// for all".into(),
        );
    }
    if amqp.heartbeat > std::time::Duration::from_secs(u64::from(u16::MAX)) {
        bad(
            "amqp.heartbeat",
            "is longer than AMQP allows (65535 s); use something like \"10s\"".into(),
        );
    }
    if let Some(tls) = &amqp.tls {
        if tls_urls < urls.len() {
            bad(
                "amqp.tls",
                format!("is set but {url_key} starts with amqp://, which never uses TLS; use amqps:// (port 5671 usually) or remove [amqp.tls]"),
            );
        }
        match (tls.cert(), tls.key()) {
            (Some(_), None) => bad(
                "amqp.tls.cert_file",
                "is set without amqp.tls.key_file; a client certificate needs its private key"
                    .into(),
            ),
            (None, Some(_)) => bad(
                "amqp.tls.key_file",
                "is set without amqp.tls.cert_file; a private key needs its client certificate"
                    .into(),
            ),
            _ => {}
        }
    }
    for (key, value) in [
        ("amqp.exchange", &amqp.exchange),
        ("amqp.queue", &amqp.queue),
        ("amqp.dead_letter_exchange", &amqp.dead_letter_exchange),
        ("amqp.dead_letter_queue", &amqp.dead_letter_queue),
    ] {
        if value.trim().is_empty() {
            bad(key, "is empty; name it".into());
        }
    }
    if amqp.queue == amqp.dead_letter_queue {
        bad(
            "amqp.dead_letter_queue",
            "must differ from amqp.queue, or dead letters would loop".into(),
        );
    }
    if amqp.prefetch == 0 {
        bad(
            "amqp.prefetch",
            "is 0, which means unlimited to RabbitMQ; use 1 or more (64 is a good start)".into(),
        );
    }

    let crisp = &config.crisp;
    match crisp.website_id.as_deref() {
        None | Some("") => bad(
            "crisp.website_id",
            "is missing; set it to your Crisp website id (a UUID)".into(),
        ),
        Some(id) if uuid::Uuid::try_parse(id).is_err() => bad(
            "crisp.website_id",
            format!("`{id}` is not a UUID; copy it from Crisp's website settings"),
        ),
        Some(_) => {}
    }
    let missing = |s: &Option<Secret>| s.as_ref().is_none_or(Secret::is_blank);
    if missing(&crisp.identifier) {
        bad(
            "crisp.identifier",
            "is missing; set CRISP_BRIDGE_CRISP__IDENTIFIER to the token identifier".into(),
        );
    }
    if missing(&crisp.key) {
        bad(
            "crisp.key",
            "is missing; set CRISP_BRIDGE_CRISP__KEY to the token key".into(),
        );
    }
    let api_url = reqwest::Url::parse(&crisp.api_url)
        .ok()
        .filter(|_| crisp.api_url.starts_with("http://") || crisp.api_url.starts_with("https://"));
    match api_url {
        None => bad(
            "crisp.api_url",
            format!(
                "`{}` is not an http(s) URL like https://api.crisp.chat/v1",
                hide_userinfo(&crisp.api_url)
            ),
        ),
        // reqwest would send the user info as Basic auth instead of our token.
        Some(url) if !url.username().is_empty() || url.password().is_some() => bad(
            "crisp.api_url",
            format!(
                "`{}` holds user info; remove it (the token goes in crisp.identifier and crisp.key)",
                hide_userinfo(&crisp.api_url)
            ),
        ),
        Some(_) => {}
    }
    if !crisp.proxy.is_blank() {
        let proxy = reqwest::Url::parse(crisp.proxy.expose()).ok();
        if !proxy.is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
            bad(
                "crisp.proxy",
                format!(
                    "`{}` is not a proxy URL like http://proxy:3128; leave it empty to use HTTPS_PROXY / NO_PROXY",
                    hide_userinfo(crisp.proxy.expose())
                ),
            );
        }
    }
    if let Some(path) = crisp
        .ca_file
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty())
    {
        if let Err(e) = crate::broker::tls::read_ca_bundle("crisp.ca_file", path) {
            bad("crisp.ca_file", e.to_string());
        }
    }
    if crisp.timeout.is_zero() {
        bad("crisp.timeout", "is 0; use something like \"10s\"".into());
    }

    let d = &config.delivery;
    if d.concurrency == 0 {
        bad(
            "delivery.concurrency",
            "is 0; at least one request must be allowed in flight".into(),
        );
    }
    let rate = d.max_requests_per_second;
    if !rate.is_finite() || rate < 0.0 || (rate > 0.0 && rate < MIN_RATE) {
        bad(
            "delivery.max_requests_per_second",
            format!("must be 0 (no limit) or at least {MIN_RATE} (one request every 1000 s)"),
        );
    }
    // Durations end up added to clocks: an absurd one would overflow them.
    for (key, value) in [
        ("amqp.consumer_timeout", amqp.consumer_timeout),
        ("crisp.timeout", crisp.timeout),
        ("delivery.initial_backoff", d.initial_backoff),
        ("delivery.max_backoff", d.max_backoff),
        ("delivery.max_retry_time", d.max_retry_time),
        ("delivery.shutdown_timeout", d.shutdown_timeout),
        ("delivery.dedup_window", d.dedup_window),
    ] {
        if value > MAX_DURATION {
            bad(
                key,
                format!(
                    "is longer than {}; use a shorter duration",
                    humantime::format_duration(MAX_DURATION)
                ),
            );
        }
    }
    if d.initial_backoff.is_zero() {
        bad(
            "delivery.initial_backoff",
            "is 0; use something like \"500ms\"".into(),
        );
    }
    if d.max_backoff < d.initial_backoff {
        bad(
            "delivery.max_backoff",
            "is shorter than delivery.initial_backoff".into(),
        );
    }
    // A delivery held past the broker's consumer timeout closes the whole channel. The
    // bridge hands every delivery back by half of it; a request already in flight then
    // must still end (crisp.timeout) well before the broker acts.
    if crisp.timeout >= amqp.consumer_timeout / 2 {
        bad(
            "crisp.timeout",
            format!(
                "{} must stay under half of amqp.consumer_timeout ({}), or RabbitMQ closes the channel holding a message whose request is still in flight",
                humantime::format_duration(crisp.timeout),
                humantime::format_duration(amqp.consumer_timeout)
            ),
        );
    }

    let listen = config.server.listen.parse::<SocketAddr>().map_err(|_| {
        bad(
            "server.listen",
            format!(
                "`{}` is not an address like 0.0.0.0:9464",
                config.server.listen
            ),
        )
    });
    if tracing_subscriber::EnvFilter::try_new(&config.log.level).is_err() {
        bad(
            "log.level",
            format!(
                "`{}` is not a level (error, warn, info, debug, trace) or filter",
                config.log.level
            ),
        );
    }

    let router = Router::compile_in(&config.rules, &config.base_dir)
        .map(|r| r.with_max_data_keys(config.delivery.max_data_keys))
        .map_err(|p| problems.extend(p));
    match (router, listen) {
        (Ok(router), Ok(listen)) if problems.is_empty() => Ok(Validated {
            config,
            router,
            listen,
        }),
        _ => Err(problems),
    }
}

/// The `[amqp.tls]` files as a connection would read them now: missing, unreadable or
/// mismatched files. `check` refuses them; `run` only warns, since a file missing at
/// start (cert-manager not done yet) is retried at each connection.
pub fn tls_file_problems(config: &Config) -> Vec<Problem> {
    let Some(tls) = &config.amqp.tls else {
        return Vec::new();
    };
    match crate::broker::tls::load(tls) {
        Ok(_) => Vec::new(),
        Err(e) => vec![Problem::global(e.key(), e.to_string())],
    }
}

/// Reads each `*_file` secret into its inline key, refusing a secret given both ways.
fn read_secret_files(config: &mut Config, problems: &mut Vec<Problem>) {
    let default_url = super::AmqpConfig::default().url;
    let amqp_inline = config.amqp.url.expose() != default_url.expose();
    let slots = [
        (
            "amqp.url_file",
            "amqp.url",
            config.amqp.url_file.clone(),
            amqp_inline,
        ),
        (
            "crisp.identifier_file",
            "crisp.identifier",
            config.crisp.identifier_file.clone(),
            config.crisp.identifier.is_some(),
        ),
        (
            "crisp.key_file",
            "crisp.key",
            config.crisp.key_file.clone(),
            config.crisp.key.is_some(),
        ),
    ];
    for (file_key, inline_key, path, inline_set) in slots {
        let Some(path) = path else { continue };
        if inline_set {
            problems.push(Problem::global(
                file_key,
                format!("excludes {inline_key}; set only one of them (check the environment for an override of {inline_key})"),
            ));
            continue;
        }
        match read_secret_file(&path) {
            Err(e) => problems.push(Problem::global(file_key, e)),
            Ok(secret) => match file_key {
                "amqp.url_file" => config.amqp.url = secret,
                "crisp.identifier_file" => config.crisp.identifier = Some(secret),
                _ => config.crisp.key = Some(secret),
            },
        }
    }
}

/// A URL for an error message, without what may precede an `@` (user, password), even
/// when the URL does not parse.
fn hide_userinfo(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_toml_str;

    const OK: &str = r##"
        [crisp]
        website_id = "04ed9a29-ccda-4f46-b2f3-b151d2d90fa7"
        identifier = "id"
        key = "k"
        [[rules]]
        name = "r"
        routing_key = "#"
        people_id = "/email"
        text = "x"
    "##;

    #[test]
    fn secret_files_fill_their_keys_and_exclude_inline_values() {
        let dir =
            std::env::temp_dir().join(format!("crisp-bridge-validate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("key"), "from-file\n").unwrap();
        std::fs::write(dir.join("url"), "amqp://u:p@127.0.0.1:5672/%2f\n").unwrap();
        let toml = OK.replace("key = \"k\"", "key_file = \"key\"") + "[amqp]\nurl_file = \"url\"\n";
        let mut config = from_toml_str(&toml).unwrap();
        config.resolve_relative_paths(&dir);
        let v = validate(config).unwrap();
        assert_eq!(v.config.crisp.key.unwrap().expose(), "from-file");
        assert_eq!(v.config.amqp.url.expose(), "amqp://u:p@127.0.0.1:5672/%2f");

        // Both ways at once (an env override of `key` over a chart's `key_file`, say).
        let mut config = from_toml_str(OK).unwrap();
        config.crisp.key_file = Some(dir.join("key"));
        let problems = validate(config).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.key == "crisp.key_file" && p.message.contains("excludes crisp.key")),
            "{problems:?}"
        );

        let mut config = from_toml_str(&OK.replace("key = \"k\"", "")).unwrap();
        config.crisp.key_file = Some(dir.join("missing"));
        let problems = validate(config).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.key == "crisp.key_file" && p.message.contains("cannot read")),
            "{problems:?}"
        );

        // A URL file that does not parse names its key and file, never its password.
        for bad in [
            "amqp:guest:Vd8-unparsed=pw@127.0.0.1:5672/%2f",
            "amqp://guest:Vd8-unparsed=pw@127.0.0.1:notaport/%2f",
        ] {
            std::fs::write(dir.join("url"), bad).unwrap();
            let mut config =
                from_toml_str(&(OK.to_owned() + "[amqp]\nurl_file = \"url\"\n")).unwrap();
            config.resolve_relative_paths(&dir);
            let problems = validate(config).unwrap_err();
            let text = format!("{problems:?} {}", problems[0]);
            assert!(
                problems.iter().any(|p| p.key == "amqp.url_file"
                    && p.message.contains("write it as amqp://user:password@host")
                    && p.message.contains(&dir.join("url").display().to_string())),
                "{text}"
            );
            assert!(!text.contains("Vd8-unparsed"), "{text}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_needs_amqps_and_pairs_cert_with_key_relative_to_the_config() {
        let amqps = OK.to_owned() + "[amqp]\nurl = \"amqps://u:p@rabbit:5671/%2f\"\n";
        let with = |url_toml: &str, tls: &str| {
            let mut config = from_toml_str(&format!("{url_toml}[amqp.tls]\n{tls}")).unwrap();
            config.resolve_relative_paths(std::path::Path::new("/etc/cb"));
            config
        };
        let config = with(&amqps, "ca_file = \"tls/ca.crt\"\n");
        let tls = config.amqp.tls.clone().unwrap();
        assert_eq!(tls.ca(), Some(std::path::Path::new("/etc/cb/tls/ca.crt")));
        assert!(validate(config).is_ok());

        let plain = OK.to_owned() + "[amqp]\nurl = \"amqp://u:p@rabbit:5672/%2f\"\n";
        let problems = validate(with(&plain, "ca_file = \"ca.crt\"\n")).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.key == "amqp.tls" && p.message.contains("amqps://")),
            "{problems:?}"
        );
        let problems = validate(with(&amqps, "cert_file = \"tls.crt\"\n")).unwrap_err();
        assert!(
            problems.iter().any(|p| p.key == "amqp.tls.cert_file"),
            "{problems:?}"
        );
        let problems = validate(with(&amqps, "key_file = \"tls.key\"\n")).unwrap_err();
        assert!(
            problems.iter().any(|p| p.key == "amqp.tls.key_file"),
            "{problems:?}"
        );
        // Files are check's (and each connection's) business: a missing one is named.
        let config = with(&amqps, "ca_file = \"missing/ca.crt\"\n");
        let problems = tls_file_problems(&config);
        assert!(
            problems.iter().any(
                |p| p.key == "amqp.tls.ca_file" && p.message.contains("/etc/cb/missing/ca.crt")
            ),
            "{problems:?}"
        );
        // Empty values (a chart leaving them blank) count as unset.
        let config = with(&amqps, "ca_file = \"\"\ncert_file = \"\"\n");
        assert!(tls_file_problems(&config).is_empty());
        assert!(validate(config).is_ok());
    }

    #[test]
    fn crisp_proxy_and_ca_file_are_checked_without_printing_proxy_passwords() {
        let with = |crisp: &str| {
            let toml = OK.replace("key = \"k\"", &format!("key = \"k\"\n{crisp}"));
            let mut config = from_toml_str(&toml).unwrap();
            config.resolve_relative_paths(std::path::Path::new("/etc/cb"));
            validate(config)
        };
        assert!(with("proxy = \"\"").is_ok());
        assert!(with("proxy = \"http://proxy.internal:3128\"").is_ok());
        let problems = with("proxy = \"proxy:3128:x\"").unwrap_err();
        assert!(
            problems.iter().any(|p| p.key == "crisp.proxy"),
            "{problems:?}"
        );
        let problems = with("proxy = \"ftp://user:hunter2@proxy\"").unwrap_err();
        let text = format!("{problems:?}");
        assert!(
            text.contains("crisp.proxy") && !text.contains("hunter2"),
            "{text}"
        );
        let problems = with("ca_file = \"egress-ca.crt\"").unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.key == "crisp.ca_file" && p.message.contains("/etc/cb/egress-ca.crt")),
            "{problems:?}"
        );
    }

    #[test]
    fn absurd_durations_and_rates_are_refused_not_overflowed() {
        let toml = OK.to_owned()
            + "[delivery]\nmax_retry_time = \"500000000000000000s\"\nmax_backoff = \"9999999999h\"\nmax_requests_per_second = 1e-300\n";
        let problems = validate(from_toml_str(&toml).unwrap()).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "delivery.max_retry_time",
            "delivery.max_backoff",
            "delivery.max_requests_per_second",
        ] {
            assert!(keys.contains(&key), "{key} missing in {problems:?}");
        }
    }

    #[test]
    fn a_complete_config_validates() {
        let v = validate(from_toml_str(OK).unwrap()).unwrap();
        assert_eq!(v.router.patterns(), vec!["#"]);
        assert_eq!(v.listen.port(), 9464);
    }

    #[test]
    fn every_global_problem_is_listed() {
        let cfg = from_toml_str(
            r##"
            [amqp]
            url = "http://user:topsecret@host"
            prefetch = 0
            consumer_timeout = "10s"
            [crisp]
            website_id = "nope"
            api_url = "ftp://x"
            [delivery]
            concurrency = 0
            [server]
            listen = "nowhere"
            "##,
        )
        .unwrap();
        let text = validate(cfg)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        for key in [
            "amqp.url",
            "amqp.prefetch",
            "crisp.website_id",
            "crisp.identifier",
            "crisp.key",
            "crisp.api_url",
            "crisp.timeout",
            "delivery.concurrency",
            "server.listen",
            "rules",
        ] {
            assert!(
                text.contains(&format!("{key}:")),
                "missing {key} in\n{text}"
            );
        }
        assert!(
            !text.contains("topsecret"),
            "the URL password leaked: {text}"
        );
    }

    fn api_url_problems(api_url: &str) -> Vec<String> {
        let cfg = from_toml_str(OK).unwrap();
        let cfg = Config {
            crisp: crate::config::CrispConfig {
                api_url: api_url.into(),
                ..cfg.crisp
            },
            ..cfg
        };
        match validate(cfg) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn api_url_with_user_info_is_refused_and_never_printed() {
        for url in [
            "http://user:hunter2@127.0.0.1:9000/v1",
            "https://hunter2@api.crisp.chat/v1",
            "https://user:hunter2@exa mple.com/v1",
            "ftp://user:hunter2@example.com",
            "https://user:p@ss/hunter2@api.crisp.chat/v1",
        ] {
            let problems = api_url_problems(url);
            assert_eq!(problems.len(), 1, "{url}: {problems:?}");
            assert!(problems[0].starts_with("crisp.api_url:"), "{problems:?}");
            assert!(
                !problems[0].contains("hunter2") && !problems[0].contains("user:"),
                "the URL's user info leaked: {}",
                problems[0]
            );
        }
        let problems = api_url_problems("https://user:hunter2@api.crisp.chat/v1");
        assert!(
            problems[0].contains("crisp.identifier"),
            "says what to do: {}",
            problems[0]
        );
        assert!(api_url_problems("https://api.crisp.chat/v1").is_empty());
        assert!(api_url_problems("http://127.0.0.1:9000/v1?at=x@y").is_empty());
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        let err = from_toml_str("[delivery]\nconcurency = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("concurency"), "{err}");
        let err = from_toml_str("[delivery]\nmax_backoff = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("delivery.max_backoff"), "{err}");
    }

    #[test]
    fn several_urls_are_each_checked_and_may_not_mix_tls() {
        let problems = |amqp: &str| {
            let cfg = from_toml_str(&(OK.to_owned() + amqp)).unwrap();
            validate(cfg)
                .err()
                .unwrap_or_default()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let ok = problems(
            "[amqp]\nurls = [\"amqp://u:p@rabbit-0:5672/%2f\", \"amqp://u:p@rabbit-1:5672/%2f\"]\n",
        );
        assert_eq!(ok, "");
        let mixed = problems(
            "[amqp]\nurls = [\"amqp://u:p@rabbit-0:5672/%2f\", \"amqps://u:p@rabbit-1:5671/%2f\"]\n",
        );
        assert!(
            mixed.contains("amqp.urls: mixes amqp:// and amqps://"),
            "{mixed}"
        );
        let bad = problems("[amqp]\nurls = [\"amqp://u:s3cr3t@rabbit-0:5672/%2f\", \"nope\"]\n");
        assert!(bad.contains("URL 2 of 2 must start with amqp://"), "{bad}");
        assert!(!bad.contains("s3cr3t"), "{bad}");
    }

    #[test]
    fn a_url_file_holds_one_url_per_line() {
        let urls = crate::config::split_urls(
            "# the cluster\namqp://a:b@rabbit-0/%2f\n\n  amqp://a:b@rabbit-1/%2f  \n",
        );
        let urls: Vec<&str> = urls.iter().map(|u| u.expose()).collect();
        assert_eq!(urls, ["amqp://a:b@rabbit-0/%2f", "amqp://a:b@rabbit-1/%2f"]);
    }
}
