//! Bridge against floor (issue 10): in one invocation and on one sink (the in-process Crisp
//! sandbox), loads N messages with message ids into a fresh quorum queue, runs one
//! contender (child process) until the sink has N events, reloads, runs the other; the
//! order alternates across runs. Prints msg/s, CPU µs per message (utime + stime of the
//! child from /proc), peak RSS (VmHWM, read before the child exits), the ratios to the
//! floor, and the medians.
//!
//!     scripts/perf.sh [--messages N] [--runs R] [--latency-ms L] [--people P] [--bridge-only]
//!         [--tracing]
//!
//! `--tracing` compares the bridge with tracing off against the bridge with every message
//! traced (`OTEL_TRACES_SAMPLER=always_on`), exporting over OTLP/HTTP to the kit's receiver
//! in this process, instead of the floor against the bridge.
//!
//! `PERF_BRIDGE_BIN` and `PERF_FLOOR_BIN` run other binaries (`scripts/profile.sh` uses
//! builds with symbols); `PERF_SMAPS_DIR=dir` saves each contender's `/proc/<pid>/smaps`
//! there before it stops, to see where its memory is.

use crisp_bridge_testkit::{
    amqp_url, arg, auto_profiles, bin_from_env, free_port, sandbox, BrokerClient, Names, TestConfig,
};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Floor,
    Bridge,
    /// The bridge with every message traced.
    Traced,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Floor => "floor",
            Kind::Bridge => "bridge",
            Kind::Traced => "traced",
        }
    }
}

struct Figures {
    msg_s: f64,
    cpu_us: f64,
    hwm_mib: f64,
    /// RssAnon and RssFile (MiB) at the end: heap and stacks, and the mapped binary.
    anon_mib: f64,
    file_mib: f64,
    /// VmRSS sampled every second (MiB), to see whether memory stays flat.
    rss_mib: Vec<f64>,
}

struct Settings {
    messages: u64,
    runs: usize,
    latency_ms: u64,
    people: u64,
    bridge: PathBuf,
    floor: PathBuf,
    url: String,
    clock_ticks: f64,
    /// The OTLP receiver's URL, for `Kind::Traced`.
    otlp: Option<String>,
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/<pid>/stat, counted
/// after the parenthesised command name, which may contain spaces).
fn cpu_ticks(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

async fn run_one(kind: Kind, s: &Settings, sandbox: &crisp_bridge::sandbox::Sandbox) -> Figures {
    let names = Names::new("perf");
    let admin_port = free_port();
    let config = TestConfig::load(&s.url, &names, &sandbox.api_url(), 128)
        .layer(&format!(
            "[delivery]\nconcurrency = 32\ndedup_window = \"10m\"\n[server]\nlisten = \"127.0.0.1:{admin_port}\""
        ))
        .write_temp();
    let publisher = BrokerClient::connect_to(&s.url).await;
    publisher.declare(&config).await;
    publisher
        .publish_load_many(&names.exchange, "load.event", 0..s.messages, s.people)
        .await;
    sandbox.state.clear_received();

    let mut command = match kind {
        Kind::Bridge | Kind::Traced => {
            let mut c = tokio::process::Command::new(&s.bridge);
            c.arg("run").arg("--config").arg(&config);
            if let (Kind::Traced, Some(otlp)) = (kind, &s.otlp) {
                c.env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
                    .env("OTEL_TRACES_SAMPLER", "always_on");
            }
            c
        }
        Kind::Floor => {
            let mut c = tokio::process::Command::new(&s.floor);
            c.env("AMQP_URL", &s.url)
                .env("FLOOR_QUEUE", &names.queue)
                .env("FLOOR_API_URL", sandbox.api_url());
            c
        }
    };
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e} (build it first)", kind.name()));
    let pid = child.id().expect("child pid");
    let mut rss_mib = Vec::new();
    let mut next_sample = started;
    while (sandbox.state.event_count() as u64) < s.messages {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{} exited early: {status}", kind.name());
        }
        if Instant::now() >= next_sample {
            rss_mib.extend(status_kib(pid, "VmRSS:").map(|k| k / 1024.0));
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Read before the child exits: /proc/<pid> goes with it.
    let ticks = cpu_ticks(pid).expect("cpu ticks");
    let hwm_kib = status_kib(pid, "VmHWM:").expect("VmHWM");
    let anon_kib = status_kib(pid, "RssAnon:").unwrap_or(0.0);
    // A diagnostic: where the resident memory is, mapping by mapping.
    if let Ok(dir) = std::env::var("PERF_SMAPS_DIR") {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let _ = std::fs::write(format!("{dir}/{}.smaps", kind.name()), smaps);
    }
    let file_kib = status_kib(pid, "RssFile:").unwrap_or(0.0);
    let _ = std::process::Command::new("kill")
        .args(["-s", "TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
    publisher.delete(&names).await;
    let _ = std::fs::remove_file(config);
    sandbox.state.clear_received();
    Figures {
        msg_s: s.messages as f64 / elapsed,
        cpu_us: ticks / s.clock_ticks * 1e6 / s.messages as f64,
        hwm_mib: hwm_kib / 1024.0,
        anon_mib: anon_kib / 1024.0,
        file_mib: file_kib / 1024.0,
        rss_mib,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn rss_line(f: &Figures) -> String {
    let show: Vec<String> = f.rss_mib.iter().map(|m| format!("{m:.1}")).collect();
    format!("[{}]", show.join(" "))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let clock_ticks = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    let s = Settings {
        messages: arg(&args, "--messages", 20_000),
        runs: arg(&args, "--runs", 3) as usize,
        latency_ms: arg(&args, "--latency-ms", 0),
        people: arg(&args, "--people", 1_000),
        // Not CRISP_BRIDGE_*: the bridge would read that as a config key and refuse it.
        bridge: bin_from_env("PERF_BRIDGE_BIN"),
        floor: std::env::var("PERF_FLOOR_BIN")
            .map(Into::into)
            .unwrap_or_else(|_| PathBuf::from(format!("target/{profile}/examples/floor"))),
        url: amqp_url().await,
        clock_ticks,
        otlp: None,
    };
    let tracing = args.iter().any(|a| a == "--tracing");
    let (otlp, received) = crisp_bridge_testkit::otlp::receiver().await;
    let s = Settings {
        otlp: Some(otlp),
        ..s
    };
    // The baseline and the contender: the floor and the bridge, or the bridge without and
    // with tracing.
    let (base, contender) = if tracing {
        (Kind::Bridge, Kind::Traced)
    } else {
        (Kind::Floor, Kind::Bridge)
    };
    let sandbox = sandbox(auto_profiles()).await;
    sandbox
        .state
        .set_latency(Duration::from_millis(s.latency_ms));
    println!(
        "perf: {} messages with message ids, {} people, quorum queue, prefetch 128, concurrency 32, Crisp latency {} ms",
        s.messages, s.people, s.latency_ms
    );
    let (a, b) = (base.name(), contender.name());
    println!("| run | order | {a} msg/s | {b} msg/s | ratio | {a} CPU µs/msg | {b} CPU µs/msg | ratio | {a} peak RSS | {b} peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    if args.iter().any(|a| a == "--bridge-only") {
        // Scale runs (a million messages): the bridge alone, its RSS each second.
        let f = run_one(Kind::Bridge, &s, &sandbox).await;
        println!(
            "bridge alone: {:.0} msg/s, {:.1} µs CPU/msg, peak RSS {:.1} MiB; RSS each second {}",
            f.msg_s,
            f.cpu_us,
            f.hwm_mib,
            rss_line(&f)
        );
        sandbox.stop();
        return;
    }
    let mut all = Vec::new();
    for run in 0..s.runs {
        let order = if run % 2 == 0 {
            [base, contender]
        } else {
            [contender, base]
        };
        let mut floor = None;
        let mut bridge = None;
        for kind in order {
            let f = run_one(kind, &s, &sandbox).await;
            eprintln!(
                "run {} {}: {:.0} msg/s, {:.1} µs CPU/msg, peak RSS {:.1} MiB (at the end: {:.1} anon + {:.1} file), RSS each second {}",
                run + 1,
                kind.name(),
                f.msg_s,
                f.cpu_us,
                f.hwm_mib,
                f.anon_mib,
                f.file_mib,
                rss_line(&f)
            );
            if kind == base {
                floor = Some(f);
            } else {
                bridge = Some(f);
            }
        }
        let (f, b) = (floor.expect("baseline ran"), bridge.expect("contender ran"));
        println!(
            "| {} | {} first | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} MiB | {:.1} MiB |",
            run + 1,
            order[0].name(),
            f.msg_s,
            b.msg_s,
            b.msg_s / f.msg_s,
            f.cpu_us,
            b.cpu_us,
            b.cpu_us / f.cpu_us,
            f.hwm_mib,
            b.hwm_mib
        );
        all.push((f, b));
    }
    let col = |pick: &dyn Fn(&(Figures, Figures)) -> f64| median(all.iter().map(pick).collect());
    println!(
        "| median | | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} | {:.1} MiB | {:.1} MiB |",
        col(&|r| r.0.msg_s),
        col(&|r| r.1.msg_s),
        col(&|r| r.1.msg_s / r.0.msg_s),
        col(&|r| r.0.cpu_us),
        col(&|r| r.1.cpu_us),
        col(&|r| r.1.cpu_us / r.0.cpu_us),
        col(&|r| r.0.hwm_mib),
        col(&|r| r.1.hwm_mib),
    );
    if tracing {
        println!(
            "spans received: {} for {} traced messages",
            received.span_count(),
            s.messages * s.runs as u64
        );
    }
    sandbox.stop();
}
