//! Offline commands whose reader goes away (`map … | head`): they exit at once, quietly
//! and with 141, as a process killed by SIGPIPE would, instead of panicking on the
//! broken pipe or reading their whole input into a pipe nobody reads.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/crisp-bridge.toml");
const ORDER: &str = r#"{"id": "A-1001", "status": "paid", "customer": {"email": "jane.doe+shop@example.com"}, "amount": {"total": 42.5, "currency": "EUR"}}"#;
/// "At once": far less than a slow CI machine needs to notice nothing happens.
const BOUND: Duration = Duration::from_secs(5);
const EXIT_CLOSED_PIPE: i32 = 141;

fn spawn(args: &[&str]) -> (Child, std::thread::JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crisp-bridge"))
        .arg("--config")
        .arg(CONFIG)
        .args(args)
        .env_remove("CRISP_BRIDGE_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crisp-bridge");
    let mut stderr = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    (child, stderr)
}

/// Feeds `line` to stdin for as long as the child reads; returns how many lines it took.
fn feed_forever(mut stdin: ChildStdin, line: String) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut fed = 0;
        while stdin.write_all(line.as_bytes()).is_ok() {
            fed += 1;
        }
        fed
    })
}

/// The child's exit status once it exits, or `None` (and the child killed) after [`BOUND`].
fn exit_within_bound(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_quiet_exit(what: &str, status: Option<ExitStatus>, stderr: String) {
    let status = status.unwrap_or_else(|| {
        panic!("{what}: still running {BOUND:?} after its reader went; stderr:\n{stderr}")
    });
    assert_eq!(
        status.code(),
        Some(EXIT_CLOSED_PIPE),
        "{what}: {status}; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.to_lowercase().contains("broken pipe"),
        "{what}: not quiet:\n{stderr}"
    );
}

#[test]
fn map_input_from_stdin_stops_when_its_reader_goes() {
    let (mut child, stderr) = spawn(&["map", "--input", "-"]);
    let line = format!("{{\"routing_key\": \"order.created\", \"body\": {ORDER}}}\n");
    let feeder = feed_forever(child.stdin.take().expect("stdin"), line);
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("first result");
    assert!(first.starts_with("line 1: deliver"), "{first}");
    drop(out);
    let status = exit_within_bound(&mut child);
    let fed = feeder.join().expect("feeder");
    assert_quiet_exit(
        &format!("map --input - (fed {fed} lines)"),
        status,
        stderr.join().expect("stderr"),
    );
}

#[test]
fn map_of_one_message_exits_quietly_when_nobody_reads() {
    let (mut child, stderr) = spawn(&["map", "--routing-key", "order.created", "-"]);
    // Gone before the message is even written: the first line out hits a closed pipe.
    drop(child.stdout.take());
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(ORDER.as_bytes()).expect("write message");
    drop(stdin);
    let status = exit_within_bound(&mut child);
    assert_quiet_exit("map", status, stderr.join().expect("stderr"));
}

#[test]
fn test_with_many_cases_stops_when_its_reader_goes() {
    // Far more output than a pipe buffers (64 KiB), so the reader's going is seen.
    let cases = 5000;
    let file = std::env::temp_dir().join(format!("crisp-bridge-pipes-{}.toml", std::process::id()));
    let mut toml = String::new();
    for i in 0..cases {
        toml.push_str(&format!(
            "[[case]]\nname = \"an unpaid order is skipped, number {i}\"\nrouting_key = \"order.created\"\nbody = {{ id = \"A-{i}\", status = \"pending\", email = \"kim@example.com\", amount = {{ total = 10, currency = \"EUR\" }} }}\nexpect = {{ outcome = \"skip\" }}\n\n"
        ));
    }
    std::fs::write(&file, toml).expect("write test file");
    let path = file.display().to_string();
    let (mut child, stderr) = spawn(&["test", &path]);
    drop(child.stdin.take());
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("first result");
    assert!(first.starts_with("ok "), "{first}");
    drop(out);
    let status = exit_within_bound(&mut child);
    let _ = std::fs::remove_file(&file);
    assert_quiet_exit("test", status, stderr.join().expect("stderr"));
}
