//! The bridge binary as a child process.

use crate::{eventually, WAIT};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;

/// A port free at the time of asking, for a child's admin server.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The bridge binary of this build's profile, relative to the repository (examples run
/// from there).
pub fn default_bin() -> PathBuf {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    PathBuf::from(format!("target/{profile}/crisp-bridge"))
}

/// The binary named by the environment variable `var`, else [`default_bin`]. (Not a
/// `CRISP_BRIDGE_*` name where the child inherits it: the bridge reads those as config.)
pub fn bin_from_env(var: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(default_bin, PathBuf::from)
}

/// The number after the last `name` in `args`, else `default` (so a script's defaults
/// can be overridden by arguments after them).
pub fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .rposition(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How to start a child bridge: [`Bridge::command`], then [`BridgeCommand::spawn`].
pub struct BridgeCommand {
    command: tokio::process::Command,
    bin: PathBuf,
    admin_port: u16,
    capture: bool,
}

impl BridgeCommand {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.command.env_remove(key);
        self
    }

    /// Keeps stdout and stderr in memory ([`Bridge::output`]) instead of passing stderr
    /// through and dropping stdout.
    pub fn capture_output(mut self) -> Self {
        self.capture = true;
        self
    }

    /// Starts the child and waits until its `/readyz` answers 200.
    pub async fn spawn(self) -> Bridge {
        let bridge = self.start();
        bridge.wait_ready().await;
        bridge
    }

    /// Starts the child without waiting for it (a test of what keeps it from ready).
    pub fn start(mut self) -> Bridge {
        let (stdout, stderr) = if self.capture {
            (Stdio::piped(), Stdio::piped())
        } else {
            (Stdio::null(), Stdio::inherit())
        };
        let mut child = self
            .command
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {}: {e} (build it first)", self.bin.display())
            });
        let output = Arc::new(Mutex::new(Vec::new()));
        let streams = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ];
        for mut stream in streams.into_iter().flatten() {
            let output = output.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .expect("log lock")
                        .extend_from_slice(&buf[..n]);
                }
            });
        }
        Bridge {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], self.admin_port)),
            output,
        }
    }
}

/// A running child bridge; killed when dropped.
pub struct Bridge {
    pub child: tokio::process::Child,
    pub admin: SocketAddr,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Bridge {
    /// `bin run --config config`, its admin server on `admin_port` (set through the
    /// environment, which overrides the file), no `CRISP_BRIDGE_CONFIG` inherited.
    pub fn command(bin: &Path, config: &Path, admin_port: u16) -> BridgeCommand {
        let mut command = tokio::process::Command::new(bin);
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .env(
                "CRISP_BRIDGE_SERVER__LISTEN",
                format!("127.0.0.1:{admin_port}"),
            )
            .env_remove("CRISP_BRIDGE_CONFIG")
            .kill_on_drop(true);
        BridgeCommand {
            command,
            bin: bin.to_path_buf(),
            admin_port,
            capture: false,
        }
    }

    /// What `/readyz` answers; 0 while the admin server is not up.
    pub async fn readyz(&self) -> u16 {
        match reqwest::get(format!("http://{}/readyz", self.admin)).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    pub async fn wait_ready(&self) {
        eventually("the child bridge to be ready", || async {
            (self.readyz().await == 200).then_some(())
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body")
    }

    /// Sends signal `name` (`TERM`, `KILL`, ...) to the child.
    pub fn signal(&self, name: &str) {
        assert!(self.try_signal(name), "kill -s {name} failed");
    }

    /// [`Self::signal`], telling whether it reached a running child.
    fn try_signal(&self, name: &str) -> bool {
        let Some(pid) = self.child.id() else {
            return false;
        };
        std::process::Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits for the child to exit, at most [`WAIT`].
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exit in time")
            .expect("wait")
    }

    /// SIGTERM, then waits for the exit (a benchmark's stop: up to a minute).
    pub async fn stop(mut self) {
        self.try_signal("TERM");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), self.child.wait()).await;
    }

    /// How many of the child's threads are lapin's connection I/O loops (lapin runs each
    /// connection's I/O on a thread of its own); 0 once it has exited.
    pub fn io_loop_threads(&self) -> usize {
        let Some(pid) = self.child.id() else {
            return 0;
        };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "lapin-io-loop")
            .count()
    }

    /// What the child wrote so far (with [`BridgeCommand::capture_output`]).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("log lock")).into_owned()
    }
}
