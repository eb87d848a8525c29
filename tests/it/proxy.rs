//! Crisp through a forward proxy: the sandbox serves HTTPS with the test CA's server
//! certificate, the bridge trusts that CA through `crisp.ca_file`, and reaches the sandbox
//! only through a CONNECT proxy this test runs, named by `crisp.proxy` or by
//! `HTTPS_PROXY`. The broker side is the TLS node of tests/it/tls.rs.

use crate::tls::{tls_env, Setup};
use crisp_bridge::sandbox::{SandboxOptions, SandboxTls};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest CONNECT request head read.
const MAX_HEAD: usize = 8 * 1024;

/// A forward proxy that only tunnels (CONNECT), recording each target.
struct ConnectProxy {
    addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let targets = Arc::new(Mutex::new(Vec::new()));
        let seen = targets.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(tunnel(client, seen.clone()));
            }
        });
        Self { addr, targets }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn targets(&self) -> Vec<String> {
        self.targets.lock().expect("targets").clone()
    }
}

async fn tunnel(mut client: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_HEAD {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut words = head.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    seen.lock().expect("targets").push(target.to_owned());
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_ok()
    {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

/// A broker-side TLS setup whose sandbox serves HTTPS, trusted through `crisp.ca_file`.
async fn https_setup(test: &str, crisp: &str) -> Setup {
    let env = tls_env();
    let sandbox = SandboxOptions {
        auto_create_profiles: true,
        tls: Some(SandboxTls {
            cert_file: env.dir.join("server.crt"),
            key_file: env.dir.join("server.key"),
        }),
        ..Default::default()
    };
    let crisp = format!("ca_file = \"crisp-ca.crt\"\n{crisp}");
    let setup = Setup::with(
        test,
        &env.amqps,
        &env.plain,
        "ca_file = \"ca.crt\"\n",
        sandbox,
        &crisp,
    )
    .await;
    setup.install(&env, "ca.crt", "ca.crt");
    setup.install(&env, "ca.crt", "crisp-ca.crt");
    assert!(setup.sandbox.api_url().starts_with("https://"));
    setup
}

/// Proxy variables of the machine running the tests would take the requests elsewhere.
const PROXY_VARIABLES: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crisp_proxy_tunnels_https_to_crisp_with_a_private_ca() {
    let proxy = ConnectProxy::start().await;
    let setup = https_setup("proxy-key", &format!("proxy = \"{}\"", proxy.url())).await;
    setup.publish_trials(3).await;
    let bridge = setup.spawn_with(&[], &PROXY_VARIABLES);
    bridge.wait_ready().await;
    setup.all_delivered(3).await;
    let sandbox = setup.sandbox.addr.to_string();
    assert!(
        !proxy.targets().is_empty() && proxy.targets().iter().all(|t| *t == sandbox),
        "CONNECT targets {:?}, sandbox {sandbox}",
        proxy.targets()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_crisp_proxy_uses_https_proxy_from_the_environment() {
    let proxy = ConnectProxy::start().await;
    let setup = https_setup("proxy-env", "").await;
    setup.publish_trials(2).await;
    let url = proxy.url();
    let bridge = setup.spawn_with(&[("HTTPS_PROXY", url.as_str())], &PROXY_VARIABLES);
    bridge.wait_ready().await;
    setup.all_delivered(2).await;
    assert!(
        !proxy.targets().is_empty(),
        "nothing went through the proxy"
    );
    drop(bridge);

    // NO_PROXY, as curl reads it, sends the sandbox's address around the proxy.
    let before = proxy.targets().len();
    let setup = https_setup("proxy-no", "").await;
    setup.publish_trials(1).await;
    let bridge = setup.spawn_with(
        &[("HTTPS_PROXY", url.as_str()), ("NO_PROXY", "127.0.0.1")],
        &PROXY_VARIABLES,
    );
    bridge.wait_ready().await;
    setup.all_delivered(1).await;
    assert_eq!(proxy.targets().len(), before, "NO_PROXY was not honoured");
}
