//! What goes over the wire, read raw: every request the Crisp client sends, taken byte
//! for byte from a plain TCP listener (no HTTP library to be kind), the sandbox's refusal
//! of what a strict server refuses, and the AMQP acks, read from a tapped connection.

use crisp_bridge::config::{CrispConfig, Secret};
use crisp_bridge::crisp::{CrispClient, Failure};
use crisp_bridge::route::CrispEvent;
use crisp_bridge::sandbox::{Sandbox, SandboxOptions, DEFAULT_WEBSITE_ID};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as it arrived: the request line, every header line in order, the body.
#[derive(Debug)]
struct RawRequest {
    request_line: String,
    header_lines: Vec<String>,
    body: Vec<u8>,
}

/// Accepts one connection, reads one request (headers, then `Content-Length` bytes),
/// answers `response` and closes.
async fn capture_one(listener: &TcpListener, response: &str) -> RawRequest {
    let (mut stream, _) = listener.accept().await.expect("accept");
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the client closed before the end of the headers");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).expect("headers are ASCII");
    let mut lines = head.split("\r\n").map(str::to_owned);
    let request_line = lines.next().expect("a request line");
    let header_lines: Vec<String> = lines.collect();
    let length: usize = header_lines
        .iter()
        .filter_map(|l| l.split_once(": "))
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().expect("numeric content-length"))
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "the client closed before the end of the body");
        body.extend_from_slice(&chunk[..n]);
    }
    stream
        .write_all(response.as_bytes())
        .await
        .expect("write response");
    let _ = stream.shutdown().await;
    RawRequest {
        request_line,
        header_lines,
        body,
    }
}

fn client_for(addr: SocketAddr) -> CrispClient {
    CrispClient::new(&CrispConfig {
        website_id: Some(DEFAULT_WEBSITE_ID.into()),
        identifier: Some(Secret::new("wire-id")),
        key: Some(Secret::new("wire-key")),
        api_url: format!("http://{addr}/v1"),
        ..CrispConfig::default()
    })
    .expect("client")
}

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 44\r\nConnection: close\r\n\r\n{\"error\":false,\"reason\":\"added\",\"data\":{}}";

/// `base64("wire-id:wire-key")`
const AUTH: &str = "authorization: Basic d2lyZS1pZDp3aXJlLWtleQ==";

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

fn expected(addr: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut lines = vec![
        "x-crisp-tier: plugin".to_owned(),
        format!("user-agent: crisp-bridge/{}", env!("CARGO_PKG_VERSION")),
        AUTH.to_owned(),
        "accept: */*".to_owned(),
        format!("host: {addr}"),
    ];
    lines.extend_from_slice(extra);
    sorted(lines)
}

#[tokio::test]
async fn every_request_sends_each_header_exactly_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = client_for(addr);
    let website = format!("/v1/website/{DEFAULT_WEBSITE_ID}");

    // The event POST.
    let event = CrispEvent {
        text: "order:created".into(),
        color: Some("blue".into()),
        data: serde_json::from_str(r#"{"order_id":"A-1","total":42.5}"#).unwrap(),
    };
    let sending = tokio::spawn({
        let client = client.clone();
        async move { client.add_event("jane+x@example.com", &event).await }
    });
    let raw = capture_one(&listener, OK).await;
    sending.await.unwrap().expect("200 is a success");
    let body = br#"{"text":"order:created","color":"blue","data":{"order_id":"A-1","total":42.5}}"#;
    assert_eq!(
        raw.request_line,
        format!("POST {website}/people/events/jane%2Bx@example.com HTTP/1.1")
    );
    assert_eq!(
        sorted(raw.header_lines.clone()),
        expected(
            addr,
            &[
                "content-type: application/json".into(),
                format!("content-length: {}", body.len()),
            ]
        ),
        "event POST header lines: {:#?}",
        raw.header_lines
    );
    assert_eq!(raw.body, body);

    // The profile POST.
    let creating = tokio::spawn({
        let client = client.clone();
        async move { client.create_profile("jane+x@example.com").await }
    });
    let raw = capture_one(&listener, OK).await;
    creating.await.unwrap().expect("200 is a success");
    let body = br#"{"email":"jane+x@example.com","person":{"nickname":"jane+x"}}"#;
    assert_eq!(
        raw.request_line,
        format!("POST {website}/people/profile HTTP/1.1")
    );
    assert_eq!(
        sorted(raw.header_lines.clone()),
        expected(
            addr,
            &[
                "content-type: application/json".into(),
                format!("content-length: {}", body.len()),
            ]
        ),
        "profile POST header lines: {:#?}",
        raw.header_lines
    );
    assert_eq!(raw.body, body);
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = client_for(addr);
    for status in [
        "301 Moved Permanently",
        "302 Found",
        "307 Temporary Redirect",
        "308 Permanent Redirect",
    ] {
        let event = CrispEvent {
            text: "t".into(),
            color: None,
            data: Default::default(),
        };
        let sending = tokio::spawn({
            let client = client.clone();
            async move { client.add_event("jane@example.com", &event).await }
        });
        let answer = format!(
            "HTTP/1.1 {status}\r\nLocation: http://{addr}/elsewhere/jane@example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        capture_one(&listener, &answer).await;
        let error = sending
            .await
            .unwrap()
            .expect_err("a redirect is never a success");
        assert_eq!(error.failure, Failure::Refused, "{status}");
        assert!(
            error
                .message
                .contains(&format!("http://{addr}/elsewhere/j***@example.com")),
            "{}",
            error.message
        );
        // Nothing followed the Location: no second connection arrives.
        let second =
            tokio::time::timeout(std::time::Duration::from_millis(300), listener.accept()).await;
        assert!(
            second.is_err(),
            "{status}: the client followed the redirect"
        );
    }
}

#[tokio::test]
async fn error_bodies_are_read_only_up_to_a_bound() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = client_for(addr);
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .add_event(
                    "jane@example.com",
                    &CrispEvent {
                        text: "t".into(),
                        color: None,
                        data: Default::default(),
                    },
                )
                .await
        }
    });
    // A 500 announcing 800 MB and sending it for as long as anyone reads.
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut head = [0u8; 8192];
    let _ = stream.read(&mut head).await.unwrap();
    stream
        .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 800000000\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0usize;
    let writer = async {
        while stream.write_all(&chunk).await.is_ok() {
            written += chunk.len();
        }
    };
    // The writer stops when the client hangs up; a client that kept reading would
    // keep it going until its own request timeout (10 s).
    tokio::time::timeout(std::time::Duration::from_secs(5), writer)
        .await
        .expect("the client kept reading the error body");
    let error = sending.await.unwrap().expect_err("500");
    assert_eq!(error.failure, Failure::Transient);
    assert!(
        written < 16 * 1024 * 1024,
        "the client read {written} bytes of an error body"
    );
}

/// Sends `request` raw to the sandbox and returns the status line and the body.
async fn raw_exchange(addr: SocketAddr, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn the_sandbox_refuses_what_a_strict_server_refuses() {
    let sandbox = Sandbox::start("127.0.0.1:0".parse().unwrap(), SandboxOptions::default())
        .await
        .unwrap();
    let email = "jane@example.com";
    sandbox.state.add_profile(email);
    let path = format!("/v1/website/{DEFAULT_WEBSITE_ID}/people/events/{email}");
    // base64("sandbox-identifier:sandbox-key")
    let auth = "Authorization: Basic c2FuZGJveC1pZGVudGlmaWVyOnNhbmRib3gta2V5";
    let body = r#"{"text":"t"}"#;
    let request = |extra: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{auth}\r\nX-Crisp-Tier: plugin\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            sandbox.addr,
            body.len()
        )
    };

    let (status, _) =
        raw_exchange(sandbox.addr, &request("Content-Type: application/json\r\n")).await;
    assert_eq!(status, "HTTP/1.1 200 OK");

    for (extra, header) in [
        (
            "Content-Type: application/json\r\nContent-Type: application/json\r\n",
            "content-type",
        ),
        (
            "Content-Type: application/json\r\nX-Crisp-Tier: plugin\r\n",
            "x-crisp-tier",
        ),
        (
            &format!("Content-Type: application/json\r\n{auth}\r\n"),
            "authorization",
        ),
        (
            &format!(
                "Content-Type: application/json\r\nHost: {}\r\n",
                sandbox.addr
            ),
            "host",
        ),
        (
            &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ),
            "content-length",
        ),
    ] {
        let (status, answer) = raw_exchange(sandbox.addr, &request(extra)).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{header}: {status}");
        assert!(
            answer.contains("duplicate_header") && answer.contains(header),
            "{header}: {answer}"
        );
    }
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonp",
    ] {
        let (status, answer) = raw_exchange(
            sandbox.addr,
            &request(&format!("Content-Type: {content_type}\r\n")),
        )
        .await;
        assert!(
            status.starts_with("HTTP/1.1 400"),
            "{content_type}: {status}"
        );
        assert!(answer.contains("invalid_content_type"), "{answer}");
    }
    let (status, answer) = raw_exchange(sandbox.addr, &request("")).await;
    assert!(
        status.starts_with("HTTP/1.1 400"),
        "no content type: {status}"
    );
    assert!(answer.contains("invalid_content_type"), "{answer}");

    // Only the one good request reached the events; the read-back shows the raw lines.
    assert_eq!(sandbox.state.events().len(), 1);
    let attempts = sandbox.state.attempts();
    let refused = attempts
        .iter()
        .find(|a| a.status == 400)
        .expect("a refused attempt is recorded");
    let content_types = refused
        .header_lines
        .iter()
        .filter(|l| l.starts_with("Content-Type: "))
        .count();
    assert_eq!(content_types, 2, "{:#?}", refused.header_lines);
    assert!(refused
        .header_lines
        .contains(&"X-Crisp-Tier: plugin".to_owned()));
    assert!(refused
        .header_lines
        .contains(&"Authorization: Basic <redacted, 40 bytes>".to_owned()));
}

/// A TCP proxy in front of the broker that keeps every byte of its one connection, each
/// chunk with the time it passed and its direction.
pub struct TapProxy {
    pub addr: SocketAddr,
    chunks: std::sync::Arc<std::sync::Mutex<Vec<Chunk>>>,
    accept: tokio::task::JoinHandle<()>,
}

/// Bytes that passed the tap at once.
#[derive(Clone)]
pub struct Chunk {
    pub at: std::time::Instant,
    /// Sent by the client (the bridge), else by the broker.
    pub from_client: bool,
    pub bytes: Vec<u8>,
}

impl TapProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("tap bind");
        let addr = listener.local_addr().expect("tap addr");
        let chunks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = chunks.clone();
        let accept = tokio::spawn(async move {
            // One connection is all the bridge opens here (a second would mean it lost
            // the first: tests see that as a failure to deliver).
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let (client_read, client_write) = inbound.into_split();
            let (broker_read, broker_write) = outbound.into_split();
            let down = tokio::spawn(relay(broker_read, client_write, kept.clone(), false));
            relay(client_read, broker_write, kept, true).await;
            down.abort();
        });
        Self {
            addr,
            chunks,
            accept,
        }
    }

    pub fn chunks(&self) -> Vec<Chunk> {
        self.chunks.lock().expect("tap lock").clone()
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    kept: std::sync::Arc<std::sync::Mutex<Vec<Chunk>>>,
    from_client: bool,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        // Recorded before it is passed on, so a reply never precedes its cause.
        kept.lock().expect("tap lock").push(Chunk {
            at: std::time::Instant::now(),
            from_client,
            bytes: buffer[..n].to_vec(),
        });
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
}

impl Drop for TapProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One AMQP frame read off a tapped stream: its type, channel, payload, and when its
/// last byte passed the tap.
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
    pub at: std::time::Instant,
}

impl Frame {
    /// `(class, method)` of a method frame.
    pub fn method(&self) -> Option<(u16, u16)> {
        (self.kind == 1 && self.payload.len() >= 4).then(|| {
            (
                u16::from_be_bytes([self.payload[0], self.payload[1]]),
                u16::from_be_bytes([self.payload[2], self.payload[3]]),
            )
        })
    }
}

/// The frames of one direction of a tapped connection (the client's starts with the
/// 8-byte protocol header).
pub fn frames(chunks: &[Chunk], from_client: bool) -> Vec<Frame> {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for c in chunks.iter().filter(|c| c.from_client == from_client) {
        stream.extend_from_slice(&c.bytes);
        ends.push((stream.len(), c.at));
    }
    let mut at = if from_client {
        assert_eq!(
            &stream[..8],
            b"AMQP\x00\x00\x09\x01",
            "AMQP 0-9-1 protocol header"
        );
        8
    } else {
        0
    };
    let mut out = Vec::new();
    while at + 7 <= stream.len() {
        let size = u32::from_be_bytes(stream[at + 3..at + 7].try_into().expect("4 bytes")) as usize;
        let end = at + 7 + size + 1;
        if end > stream.len() {
            break; // a frame still being written
        }
        assert_eq!(stream[end - 1], 0xCE, "frame end octet at {at}");
        let passed = ends
            .iter()
            .find(|(len, _)| *len >= end)
            .map(|(_, t)| *t)
            .expect("a chunk ends after the frame");
        out.push(Frame {
            kind: stream[at],
            channel: u16::from_be_bytes([stream[at + 1], stream[at + 2]]),
            payload: stream[at + 7..at + 7 + size].to_vec(),
            at: passed,
        });
        at = end;
    }
    out
}

/// Every `basic.ack` frame the client sent: (raw frame, delivery tag, multiple).
fn basic_acks(chunks: &[Chunk]) -> Vec<(Vec<u8>, u64, bool)> {
    frames(chunks, true)
        .into_iter()
        .filter(|f| f.method() == Some((60, 80)))
        .map(|f| {
            let tag = u64::from_be_bytes(f.payload[4..12].try_into().expect("8 bytes"));
            let mut raw = vec![f.kind];
            raw.extend_from_slice(&f.channel.to_be_bytes());
            raw.extend_from_slice(&(f.payload.len() as u32).to_be_bytes());
            raw.extend_from_slice(&f.payload);
            raw.push(0xCE);
            (raw, tag, f.payload[12] & 1 == 1)
        })
        .collect()
}

/// Acks read raw from the AMQP connection: each `basic.ack` frame is exactly the 21 bytes
/// of the spec, `multiple` covers runs of messages (fewer frames than messages), and
/// together the frames ack every delivery exactly once: none twice (a channel error), none
/// missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_on_the_wire_cover_each_delivery_once_in_batches() {
    use crate::harness::{amqp_url_via, auto_profiles, broker_addr, TestApp};
    let proxy = TapProxy::start(broker_addr().await).await;
    let url = amqp_url_via(proxy.addr).await;
    let mut app = TestApp::builder("acks-wire")
        .sandbox(auto_profiles())
        .config(&format!("[amqp]\nurl = \"{url}\""))
        .start()
        .await;
    let n = 300u64;
    app.publish_people(n as usize).await;
    app.events_for_people(n as usize).await;
    app.stop_with_empty_queues().await;

    let acks = basic_acks(&proxy.chunks());
    let mut acked = std::collections::BTreeSet::new();
    let mut batched = 0;
    for (frame, tag, multiple) in &acks {
        let channel = [frame[1], frame[2]];
        let mut expected = vec![1, channel[0], channel[1], 0, 0, 0, 13, 0, 60, 0, 80];
        expected.extend_from_slice(&tag.to_be_bytes());
        expected.extend_from_slice(&[u8::from(*multiple), 0xCE]);
        assert_eq!(frame, &expected, "basic.ack frame byte for byte");
        if *multiple {
            let covered: Vec<u64> = (1..=*tag).filter(|t| !acked.contains(t)).collect();
            assert!(!covered.is_empty(), "a batch up to {tag} acked nothing new");
            batched += u64::from(covered.len() > 1);
            acked.extend(covered);
        } else {
            assert!(acked.insert(*tag), "tag {tag} acked twice");
        }
    }
    assert_eq!(acked, (1..=n).collect(), "every delivery acked, once");
    assert!(
        (acks.len() as u64) < n && batched > 0,
        "{} ack frames for {n} messages, {batched} covering several",
        acks.len()
    );
    eprintln!(
        "{} ack frames for {n} messages ({batched} batches of several)",
        acks.len()
    );
}
