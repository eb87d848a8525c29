//! The command line (`docs/contract.md`, "Command line"): `run`, `check`, `map`, `test`, `replay`,
//! `tap`, `sandbox`.

use crate::config::{self, Problem};
use crate::contract::capture::{self, CaptureError};
use crate::contract::{test_file, Message, Offline, Verdict};
use crate::sandbox::{Sandbox, SandboxOptions};
use crate::{app::App, telemetry};
use clap::{Parser, Subcommand};
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// `eprintln!` without its panic when stderr is a closed pipe (`… 2>&1 | head`): there
/// is nobody left to tell.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Exit code of `run` when the config is invalid (nothing was started).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code of `run` when the broker's queue exists with other arguments than the config
/// declares (sysexits' EX_CONFIG): restarting cannot help until one of them changes.
pub const EXIT_QUEUE_MISMATCH: u8 = 78;
/// Exit code of `map` when the message would be dead-lettered.
pub const EXIT_DEAD_LETTER: u8 = 3;
/// Exit code of a command whose output is a closed pipe (its reader, `head` say, went):
/// what a shell reports for a process killed by SIGPIPE.
pub const EXIT_CLOSED_PIPE: u8 = 141;

/// The data output of the commands: stdout, locked and buffered, with every write error
/// returned. Rust ignores SIGPIPE, so `println!` panics on a closed pipe, and a discarded
/// error keeps a command reading its input into a pipe nobody reads.
struct Out {
    writer: std::io::BufWriter<std::io::StdoutLock<'static>>,
    /// Flush after each line: the input may be live (`--input -`), and a reader that went
    /// is then noticed at the next line.
    each_line: bool,
}

impl Out {
    fn new(each_line: bool) -> Self {
        Self {
            writer: std::io::BufWriter::new(std::io::stdout().lock()),
            each_line,
        }
    }

    fn line(&mut self, text: &str) -> std::io::Result<()> {
        self.writer.write_all(text.as_bytes())?;
        self.writer.write_all(b"\n")?;
        if self.each_line {
            self.writer.flush()?;
        }
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

/// The exit when the output could not be written: quiet for a reader that went, else
/// the error on stderr.
fn output_failed(e: &std::io::Error) -> ExitCode {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return ExitCode::from(EXIT_CLOSED_PIPE);
    }
    eprintln!("error: cannot write the output to stdout: {e}");
    ExitCode::FAILURE
}

/// Prints one line of data output (no `println!`: see [`Out`]).
fn print_line(text: &str) -> Result<(), ExitCode> {
    let mut out = Out::new(false);
    out.line(text)
        .and_then(|()| out.finish())
        .map_err(|e| output_failed(&e))
}

#[derive(Debug, Parser)]
#[command(
    name = "crisp-bridge",
    version,
    about = "RabbitMQ domain events -> Crisp people events, acked only after Crisp accepted them"
)]
pub struct Cli {
    /// Config file (else $CRISP_BRIDGE_CONFIG, else ./crisp-bridge.toml)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume and deliver (the default)
    Run,
    /// Validate the whole config without touching the network
    Check,
    /// Print the Crisp request a message would produce, or its outcome; no network
    Map {
        /// Routing key the message would arrive with (one message)
        #[arg(long, required_unless_present = "input", conflicts_with = "input")]
        routing_key: Option<String>,
        /// Message file, or - for stdin (one message)
        #[arg(default_value = "-", conflicts_with = "input")]
        message: String,
        /// A capture: JSON lines {"routing_key", "body", "properties"} (or - for stdin)
        #[arg(long, value_name = "FILE")]
        input: Option<String>,
        /// Output of --input: a readable line, or one JSON object per input line
        #[arg(long, value_enum, default_value = "text", requires = "input")]
        format: Format,
    },
    /// Run TOML test files of [[case]] tables against the rules; no network
    Test {
        /// Test files
        #[arg(required = true, value_name = "TESTFILE")]
        files: Vec<PathBuf>,
    },
    /// Move selected dead letters back to the main exchange (with publisher confirms)
    Replay {
        /// Reason code to replay (repeatable; `broker:delivery_limit` for messages the
        /// broker dead-lettered itself); default: any
        #[arg(long = "reason", value_name = "CODE")]
        reasons: Vec<String>,
        /// Rule name to replay (repeatable); default: any
        #[arg(long = "rule", value_name = "NAME")]
        rules: Vec<String>,
        /// Most messages to replay
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Print what would be replayed; change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a running bridge's message decisions live, as JSON lines (its admin `/tap`)
    Tap {
        /// The bridge's admin server (default: from the config's server.listen, else
        /// http://127.0.0.1:9464)
        #[arg(long, value_name = "URL")]
        admin: Option<String>,
        /// Only this rule's decisions (repeatable; `none` for messages no rule took)
        #[arg(long = "rule", value_name = "NAME")]
        rules: Vec<String>,
        /// Only these outcomes (repeatable)
        #[arg(long = "outcome", value_name = "OUTCOME",
              value_parser = clap::builder::PossibleValuesParser::new(crate::telemetry::tap::OUTCOMES))]
        outcomes: Vec<String>,
    },
    /// Run a local stand-in for the Crisp REST API
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: SocketAddr,
        #[arg(long, default_value = crate::sandbox::DEFAULT_IDENTIFIER)]
        identifier: String,
        #[arg(long, default_value = crate::sandbox::DEFAULT_KEY)]
        key: String,
        /// Website ids it serves (repeatable)
        #[arg(long = "website-id", default_value = crate::sandbox::DEFAULT_WEBSITE_ID)]
        website_ids: Vec<String>,
        #[arg(long, default_value = "plugin")]
        tier: String,
        /// Accept events for unknown emails (Crisp's behaviour here is unconfirmed; the
        /// default answers 404 people_not_found)
        #[arg(long)]
        auto_create_profiles: bool,
        /// Enforce the limits Crisp published for chatbox events (text 80 characters, 10
        /// data keys, keys of 1-50 characters [A-Za-z0-9_-], values up to 120 characters):
        /// 400 invalid_data beyond them
        #[arg(long)]
        event_limits: bool,
        /// Limit event POSTs to this many a second, shared by every client (429 beyond)
        #[arg(long, value_name = "N")]
        rate_limit: Option<u32>,
        /// How --rate-limit counts: sliding_window, token_bucket, fixed_window,
        /// fixed_window_minute
        #[arg(long, value_name = "SHAPE", default_value = "sliding_window", value_parser = parse_shape)]
        rate_limit_shape: crate::sandbox::LimiterShape,
        /// Serve HTTPS with this PEM certificate chain (needs --tls-key)
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => runtime.block_on(run(cli.config)),
        Command::Check => check(cli.config),
        Command::Map {
            routing_key,
            message,
            input,
            format,
        } => {
            match (input, routing_key) {
                (Some(input), _) => map_capture(cli.config, &input, format),
                (None, Some(routing_key)) => map(cli.config, &routing_key, &message),
                (None, None) => {
                    eprintln!("error: map needs --routing-key KEY (one message) or --input FILE (a capture)");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Test { files } => test(cli.config, &files),
        Command::Replay {
            reasons,
            rules,
            limit,
            dry_run,
        } => {
            let selection = crate::replay::Selection {
                reasons,
                rules,
                limit,
                dry_run,
            };
            runtime.block_on(replay(cli.config, selection))
        }
        Command::Tap {
            admin,
            rules,
            outcomes,
        } => runtime.block_on(tap(cli.config, admin, &rules, &outcomes)),
        Command::Sandbox {
            listen,
            identifier,
            key,
            website_ids,
            tier,
            auto_create_profiles,
            event_limits,
            rate_limit,
            rate_limit_shape,
            tls_cert,
            tls_key,
        } => {
            let options = SandboxOptions {
                identifier,
                key,
                tier,
                website_ids,
                auto_create_profiles,
                event_limits,
                tls: tls_cert.zip(tls_key).map(|(cert_file, key_file)| {
                    crate::sandbox::SandboxTls {
                        cert_file,
                        key_file,
                    }
                }),
            };
            runtime.block_on(sandbox(listen, options, rate_limit, rate_limit_shape))
        }
    }
}

/// The admin server's base URL: `--admin`, else the config's `server.listen` (an
/// unspecified address such as `0.0.0.0` meaning this host's loopback).
fn admin_url(path: Option<PathBuf>, admin: Option<String>) -> Result<String, ExitCode> {
    let given = match admin {
        Some(url) => url,
        None => load(path.as_deref(), ExitCode::FAILURE)?.server.listen,
    };
    let given = given.trim().trim_end_matches('/');
    if given.contains("://") {
        return Ok(given.to_owned());
    }
    Ok(match given.parse::<SocketAddr>() {
        Ok(mut addr) => {
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            format!("http://{addr}")
        }
        Err(_) => format!("http://{given}"),
    })
}

/// `tap`: streams `GET /tap` to stdout as it comes; ends quietly (141) when stdout's
/// reader goes, 0 when the bridge closes the stream, 1 when the admin port cannot be
/// reached or refuses.
async fn tap(
    path: Option<PathBuf>,
    admin: Option<String>,
    rules: &[String],
    outcomes: &[String],
) -> ExitCode {
    let base = match admin_url(path, admin) {
        Ok(base) => base,
        Err(code) => return code,
    };
    let mut url = match reqwest::Url::parse(&format!("{base}/tap")) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("error: --admin `{base}` is not a URL like http://127.0.0.1:9464: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut query = url.query_pairs_mut();
        for rule in rules {
            query.append_pair("rule", rule);
        }
        for outcome in outcomes {
            query.append_pair("outcome", outcome);
        }
    }
    if rules.is_empty() && outcomes.is_empty() {
        url.set_query(None);
    }
    let client = match reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(std::time::Duration::from_secs(5))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: cannot build the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut response = match client.get(url).send().await {
        Ok(response) => response,
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            eprintln!("error: cannot reach the bridge's admin server at {base} ({e}{cause}); is crisp-bridge running there? Give its admin address with --admin URL (server.listen)");
            return ExitCode::FAILURE;
        }
    };
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let text: String = text.trim().chars().take(500).collect();
        eprintln!("error: {base}/tap answered {status}: {text}");
        return ExitCode::FAILURE;
    }
    let mut out = std::io::stdout().lock();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
                    return output_failed(&e);
                }
            }
            Ok(None) => {
                eprintln!("tap: the bridge closed the stream (it is stopping)");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("error: the tap stream from {base} broke: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

async fn replay(path: Option<PathBuf>, selection: crate::replay::Selection) -> ExitCode {
    let loaded = match load(path.as_deref(), ExitCode::FAILURE) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let amqp = &loaded.amqp;
    match crate::replay::replay(amqp, &selection).await {
        Ok(report) => {
            let verb = if selection.dry_run {
                "would replay"
            } else {
                "replayed"
            };
            let list = |m: &std::collections::BTreeMap<String, usize>| {
                m.iter()
                    .map(|(r, n)| format!("{r}={n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let printed = print_line(&format!(
                "{verb} {} message(s) to `{}` ({}); kept {} in `{}` ({})",
                report.replayed_total(),
                amqp.exchange,
                list(&report.replayed),
                report.kept_total(),
                amqp.dead_letter_queue,
                list(&report.kept)
            ));
            if let Err(code) = printed {
                return code;
            }
            if report.kept_max_delivery_count >= 10 {
                eprintln!(
                    "warning: a dead letter kept in `{}` has been handed back {} times; on RabbitMQ 4.x the broker drops it after the queue's delivery limit (20 by default): set a policy {{\"delivery-limit\": -1}} on that queue (README: Replaying dead letters)",
                    amqp.dead_letter_queue, report.kept_max_delivery_count
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Scrubbed once more: whatever a library put in the error, no secret is shown.
            eprintln!("error: {}", config::redact::scrub(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// Loads the config, or says why it cannot and gives `failure` to exit with.
fn load(path: Option<&std::path::Path>, failure: ExitCode) -> Result<config::Config, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        failure
    })
}

fn print_problems(problems: &[Problem]) {
    eprintln!("config has {} problem(s):", problems.len());
    for p in problems {
        eprintln!("  - {p}");
    }
}

fn check(path: Option<PathBuf>) -> ExitCode {
    let loaded = match load(path.as_deref(), ExitCode::FAILURE) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // The TLS files as the first connection would read them (run retries instead).
    let tls_problems = config::tls_file_problems(&loaded);
    match config::validate(loaded) {
        Ok(_) if !tls_problems.is_empty() => {
            print_problems(&tls_problems);
            ExitCode::FAILURE
        }
        Ok(v) => {
            for w in v.router.warnings() {
                eprintln!("warning: {w}");
            }
            let names: Vec<&str> = v.router.rule_names().collect();
            let printed = print_line(&format!(
                "config OK: {} rule(s) ({}); queue `{}` bound to `{}` with {}",
                names.len(),
                names.join(", "),
                v.config.amqp.queue,
                v.config.amqp.exchange,
                v.router.patterns().join(", ")
            ));
            printed.err().unwrap_or(ExitCode::SUCCESS)
        }
        Err(mut problems) => {
            problems.extend(tls_problems);
            print_problems(&problems);
            ExitCode::FAILURE
        }
    }
}

/// Loads the config and compiles only the rules: trying rules needs no credentials.
fn offline(path: Option<PathBuf>) -> Option<(config::Config, Offline)> {
    let loaded = load(path.as_deref(), ExitCode::FAILURE).ok()?;
    match Offline::from_config(&loaded) {
        Ok(offline) => Some((loaded, offline)),
        Err(problems) => {
            print_problems(&problems);
            None
        }
    }
}

fn map(path: Option<PathBuf>, routing_key: &str, message: &str) -> ExitCode {
    let Some((loaded, offline)) = offline(path) else {
        return ExitCode::FAILURE;
    };
    let mut body = Vec::new();
    let read = if message == "-" {
        std::io::stdin().read_to_end(&mut body).map(|_| ())
    } else {
        std::fs::read(message).map(|b| body = b)
    };
    if let Err(e) = read {
        eprintln!("error: cannot read message {message}: {e}");
        return ExitCode::FAILURE;
    }
    let message = Message {
        routing_key: routing_key.to_owned(),
        body,
        ..Message::default()
    };
    let mut out = Out::new(false);
    let (lines, code) = match offline.evaluate(&message) {
        Verdict::Deliver(m) => {
            let mut lines = vec![
                format!("POST {}", offline.url(&m)),
                "Content-Type: application/json".to_owned(),
                format!("X-Crisp-Tier: {}", loaded.crisp.tier.as_str()),
            ];
            let mut notes = vec![format!("# rule: {}", m.rule)];
            let c = &m.counts;
            for (n, what) in [
                (c.stripped, "secret-looking field(s) stripped"),
                (
                    c.collisions,
                    "key collision(s) after Crisp's key rule (first value kept)",
                ),
                (c.dropped, "key(s) over delivery.max_data_keys left out"),
            ] {
                if n > 0 {
                    notes.push(format!("{n} {what}"));
                }
            }
            lines.push(notes.join(", "));
            match serde_json::to_string(&m.event) {
                Ok(json) => lines.push(format!("\n{json}")),
                Err(e) => {
                    eprintln!("error: cannot serialise the event: {e}");
                    return ExitCode::FAILURE;
                }
            }
            (lines, ExitCode::SUCCESS)
        }
        Verdict::Skip(detail) => (vec![format!("skipped: {detail}")], ExitCode::SUCCESS),
        Verdict::DeadLetter(dl) => {
            let rule = dl
                .rule
                .as_deref()
                .map(|r| format!(" (rule `{r}`)"))
                .unwrap_or_default();
            (
                vec![format!("{}: {}{rule}", dl.reason.code(), dl.detail)],
                ExitCode::from(EXIT_DEAD_LETTER),
            )
        }
    };
    let written = lines
        .iter()
        .try_for_each(|line| out.line(line))
        .and_then(|()| out.finish());
    match written {
        Ok(()) => code,
        Err(e) => output_failed(&e),
    }
}

/// `map --input`: one result per captured message; exit 0, 3 when one is dead-lettered,
/// 1 when the capture cannot be read.
fn map_capture(path: Option<PathBuf>, input: &str, format: Format) -> ExitCode {
    let Some((_, offline)) = offline(path) else {
        return ExitCode::FAILURE;
    };
    let reader: Box<dyn BufRead> = if input == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(input) {
            Ok(f) => Box::new(std::io::BufReader::new(f)),
            Err(e) => {
                eprintln!("error: cannot read {input}: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    // From stdin the capture may be live (`tail -f … | crisp-bridge map --input -`).
    let mut out = Out::new(input == "-");
    let mut dead = 0usize;
    let name = if input == "-" { "stdin" } else { input };
    let result = capture::try_for_each(reader, name, |line, message| {
        let outcome = offline.evaluate(&message);
        if matches!(outcome, Verdict::DeadLetter(_)) {
            dead += 1;
        }
        let text = match format {
            Format::Json => offline.json_line(line, &outcome).to_string(),
            Format::Text => offline.text_line(line, &outcome),
        };
        out.line(&text)
    });
    let result = result.and_then(|n| out.finish().map(|()| n).map_err(CaptureError::Write));
    match result {
        Err(CaptureError::Write(e)) => output_failed(&e),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Ok(_) if dead > 0 => ExitCode::from(EXIT_DEAD_LETTER),
        Ok(_) => ExitCode::SUCCESS,
    }
}

/// `test`: every case of every file, `ok` or `FAILED` with a diff; exit 0 when all pass.
fn test(path: Option<PathBuf>, files: &[PathBuf]) -> ExitCode {
    let Some((_, offline)) = offline(path) else {
        return ExitCode::FAILURE;
    };
    let mut out = Out::new(false);
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in files {
        let results = match test_file::run_file(&offline, file) {
            Ok(r) => r,
            Err(e) => {
                // The results so far first, in order with the error.
                let _ = out.writer.flush();
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        for r in results {
            let line = match r.failure {
                None => {
                    passed += 1;
                    format!("ok      {} :: {}", file.display(), r.name)
                }
                Some(diff) => {
                    failed += 1;
                    format!(
                        "FAILED  {} :: {}\n{}",
                        file.display(),
                        r.name,
                        diff.trim_end()
                    )
                }
            };
            if let Err(e) = out.line(&line) {
                return output_failed(&e);
            }
        }
    }
    let summary = out
        .line(&format!("{passed} passed, {failed} failed"))
        .and_then(|()| out.finish());
    if let Err(e) = summary {
        return output_failed(&e);
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run(path: Option<PathBuf>) -> ExitCode {
    let loaded = match load(path.as_deref(), ExitCode::from(EXIT_CONFIG)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Traces only when an OTLP endpoint is set (README "Tracing").
    let traces = telemetry::traces::requested().then(telemetry::traces::Traces::from_env);
    let (traces, traces_failed) = match traces {
        Some(Ok(t)) => (Some(t), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    telemetry::init_logging(&loaded.log);
    if let Some(e) = traces_failed {
        tracing::warn!(error = %e, "running without traces");
    }
    if let Some(t) = &traces {
        t.activate();
        tracing::info!("exporting traces over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT)");
    }
    let code = run_validated(loaded).await;
    if let Some(t) = traces {
        t.shutdown().await;
    }
    code
}

async fn run_validated(loaded: config::Config) -> ExitCode {
    let validated = match config::validate(loaded) {
        Ok(v) => v,
        Err(problems) => {
            for p in &problems {
                tracing::error!(problem = %p, "invalid config");
            }
            print_problems(&problems);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for w in validated.router.warnings() {
        tracing::warn!(warning = %w, "a rule may exceed Crisp's chatbox event limits");
    }
    let app = match App::build(validated).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(admin = %app.admin_addr(), version = env!("CARGO_PKG_VERSION"), "crisp-bridge starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    match app.run(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<crate::broker::QueueMismatch>().is_some() => {
            tracing::error!(error = %e, "cannot start: the queue does not match the config");
            ExitCode::from(EXIT_QUEUE_MISMATCH)
        }
        Err(e) => {
            tracing::error!(error = %e, "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

async fn sandbox(
    listen: SocketAddr,
    options: SandboxOptions,
    rate_limit: Option<u32>,
    shape: crate::sandbox::LimiterShape,
) -> ExitCode {
    telemetry::init_logging(&config::LogConfig {
        level: "info".into(),
        format: config::LogFormat::Text,
    });
    let sandbox = match Sandbox::start(listen, options).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot start the sandbox on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    sandbox.state.set_rate_limiter(rate_limit, false, shape);
    tracing::info!(api_url = %sandbox.api_url(), events = %format!("{}/_sandbox/events", sandbox.api_url().trim_end_matches("/v1")), "Crisp sandbox listening");
    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(stop.clone()));
    stop.cancelled().await;
    sandbox.stop();
    ExitCode::SUCCESS
}

fn parse_shape(name: &str) -> Result<crate::sandbox::LimiterShape, String> {
    crate::sandbox::LimiterShape::parse(name).ok_or_else(|| {
        format!(
            "`{name}` is not a limiter shape; use one of {}",
            crate::sandbox::LimiterShape::ALL
                .map(|s| s.name())
                .join(", ")
        )
    })
}

/// The first SIGTERM/SIGINT starts a graceful shutdown; a second exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    // Made once: a signal arriving between two waits on fresh streams would be lost.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        _ => {
            tracing::warn!("cannot listen for signals; stop with SIGKILL");
            return;
        }
    };
    let mut first = true;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if first {
            tracing::info!(
                "shutdown requested; finishing in-flight messages (signal again to exit at once)"
            );
            shutdown.cancel();
            first = false;
        } else {
            tracing::warn!("second signal: exiting now; unacked messages return to the queue");
            std::process::exit(130);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_url_comes_from_the_flag_or_server_listen() {
        let url = |admin: &str| admin_url(None, Some(admin.to_owned())).unwrap();
        assert_eq!(url("http://10.0.0.5:9464/"), "http://10.0.0.5:9464");
        assert_eq!(url("127.0.0.1:9000"), "http://127.0.0.1:9000");
        assert_eq!(url("0.0.0.0:9464"), "http://127.0.0.1:9464");
        assert_eq!(url("[::]:9464"), "http://[::1]:9464");
        assert_eq!(url("bridge.local:9464"), "http://bridge.local:9464");
        let dir = std::env::temp_dir().join(format!("tap-url-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[server]\nlisten = \"0.0.0.0:9555\"\n").unwrap();
        assert_eq!(
            admin_url(Some(file.clone()), None).unwrap(),
            "http://127.0.0.1:9555"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
