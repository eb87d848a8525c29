//! The sandbox reads each request head raw, before hyper does. hyper is kind: it merges
//! repeated identical `Content-Length` lines (RFC 9110 §8.6 allows that) and lower-cases
//! names, so a handler cannot see what actually crossed the wire. A strict server may
//! refuse such a request, and so must the sandbox.
//!
//! [`RawHeadStream`] passes every byte through unchanged except request heads, to which
//! it adds two headers of its own (incoming ones of those names are dropped):
//! [`RAW_LINES_HEADER`] (the header lines exactly as received, base64 of the lines joined
//! by `\n`) and, when a singleton header repeats, [`VIOLATION_HEADER`]. Bodies framed by
//! `Content-Length` are skipped; after anything else (chunked bodies, a head over
//! [`MAX_HEAD`]) the connection is passed through unread, and hyper judges it alone.

use base64::Engine;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

pub const RAW_LINES_HEADER: &str = "x-sandbox-raw-header-lines";
pub const VIOLATION_HEADER: &str = "x-sandbox-violation";

/// Longest head scanned; hyper refuses longer ones itself.
const MAX_HEAD: usize = 64 * 1024;

/// Header fields a request may carry once (RFC 9110 singletons, and Crisp's tier).
pub const SINGLETON_HEADERS: [&str; 6] = [
    "content-type",
    "content-length",
    "authorization",
    "host",
    "x-crisp-tier",
    "user-agent",
];

/// A TCP listener whose connections are [`RawHeadStream`]s.
pub struct RawHeadListener(pub TcpListener);

impl axum::serve::Listener for RawHeadListener {
    type Io = RawHeadStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (RawHeadStream::new(stream), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

enum Scan {
    /// Collecting a request head.
    Head(Vec<u8>),
    /// Passing a `Content-Length` body through.
    Body(u64),
    /// No longer framing: pass everything through.
    Through,
}

pub struct RawHeadStream<S> {
    inner: S,
    scan: Scan,
    /// Bytes ready for hyper, from `pending[offset..]`.
    pending: Vec<u8>,
    offset: usize,
}

impl<S> RawHeadStream<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            scan: Scan::Head(Vec::new()),
            pending: Vec::new(),
            offset: 0,
        }
    }

    /// Feeds bytes read from the client through the scanner into `pending`.
    fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match &mut self.scan {
                Scan::Through => {
                    self.pending.extend_from_slice(input);
                    return;
                }
                Scan::Body(remaining) => {
                    let n = input
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    self.pending.extend_from_slice(&input[..n]);
                    *remaining -= n as u64;
                    input = &input[n..];
                    if *remaining == 0 {
                        self.scan = Scan::Head(Vec::new());
                    }
                }
                Scan::Head(head) => {
                    let start = head.len().saturating_sub(3);
                    head.extend_from_slice(input);
                    input = &[];
                    let Some(end) = head[start..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|i| start + i + 4)
                    else {
                        if head.len() > MAX_HEAD {
                            let head = std::mem::take(head);
                            self.pending.extend_from_slice(&head);
                            self.scan = Scan::Through;
                        }
                        continue;
                    };
                    let head = std::mem::take(head);
                    let (rewritten, next) = rewrite_head(&head[..end]);
                    self.pending.extend_from_slice(&rewritten);
                    self.scan = next;
                    // The rest belongs to the body or the next request.
                    self.feed_rest(&head[end..]);
                }
            }
        }
    }

    fn feed_rest(&mut self, rest: &[u8]) {
        if !rest.is_empty() {
            self.feed(rest);
        }
    }
}

/// Adds our headers to one request head (`...\r\n\r\n`) and says how its body is framed.
fn rewrite_head(head: &[u8]) -> (Vec<u8>, Scan) {
    let text = String::from_utf8_lossy(&head[..head.len() - 4]);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut kept = Vec::new();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut length = None;
    let mut framed = true;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            kept.push(line);
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        if name == RAW_LINES_HEADER || name == VIOLATION_HEADER {
            continue;
        }
        if SINGLETON_HEADERS.contains(&name.as_str()) {
            *counts.entry(name.clone()).or_default() += 1;
        }
        match name.as_str() {
            "content-length" => length = value.trim().parse::<u64>().ok().or(length),
            "transfer-encoding" => framed = false,
            _ => {}
        }
        kept.push(line);
    }
    let mut out = Vec::with_capacity(head.len() + 256);
    out.extend_from_slice(request_line.as_bytes());
    out.extend_from_slice(b"\r\n");
    for line in &kept {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let raw = base64::engine::general_purpose::STANDARD.encode(kept.join("\n"));
    out.extend_from_slice(format!("{RAW_LINES_HEADER}: {raw}\r\n").as_bytes());
    let repeated: Vec<String> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
    if !repeated.is_empty() {
        out.extend_from_slice(format!("{VIOLATION_HEADER}: {}\r\n", repeated.join(",")).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let next = match (framed, length) {
        (false, _) => Scan::Through,
        (true, Some(n)) if n > 0 => Scan::Body(n),
        (true, _) => Scan::Head(Vec::new()),
    };
    (out, next)
}

/// The raw header lines a request arrived with, as [`RawHeadStream`] recorded them.
pub fn raw_lines(value: &str) -> Vec<String> {
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(|s| {
            s.split('\n')
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

impl<S: AsyncRead + Unpin> AsyncRead for RawHeadStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.offset < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.offset);
                buf.put_slice(&this.pending[this.offset..this.offset + n]);
                this.offset += n;
                if this.offset == this.pending.len() {
                    this.pending.clear();
                    this.offset = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // End of stream: hand over a partial head as it is.
                    if let Scan::Head(head) = &mut this.scan {
                        if !head.is_empty() {
                            let head = std::mem::take(head);
                            this.pending.extend_from_slice(&head);
                            continue;
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    let filled = read.filled().to_vec();
                    this.feed(&filled);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RawHeadStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> String {
        let mut s = RawHeadStream::new(());
        for c in chunks {
            s.feed(c);
        }
        String::from_utf8(s.pending).unwrap()
    }

    #[test]
    fn heads_get_raw_lines_and_bodies_pass_untouched() {
        let out = run(&[
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n{\"a\"",
            b"}GET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        ]);
        let raw = |lines: &str| base64::engine::general_purpose::STANDARD.encode(lines);
        assert_eq!(
            out,
            format!(
                "POST /a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4\r\n{RAW_LINES_HEADER}: {}\r\n\r\n{{\"a\"}}GET /b HTTP/1.1\r\nHost: x\r\n{RAW_LINES_HEADER}: {}\r\n\r\n",
                raw("Host: x\nContent-Type: application/json\nContent-Length: 4"),
                raw("Host: x"),
            )
        );
    }

    #[test]
    fn repeated_singletons_are_flagged_even_when_identical() {
        let out = run(&[
            b"POST /a HTTP/1.1\r\nContent-Length: 0\r\ncontent-length: 0\r\nContent-Type: a\r\n",
            b"Content-Type: a\r\nX-Sandbox-Violation: spoofed\r\n\r\n",
        ]);
        assert!(
            out.contains(&format!(
                "\r\n{VIOLATION_HEADER}: content-length=2,content-type=2\r\n"
            )),
            "{out}"
        );
        assert!(!out.contains("spoofed"), "{out}");
    }

    #[test]
    fn raw_lines_round_trip() {
        let value = base64::engine::general_purpose::STANDARD.encode("A: 1\nb: 2");
        assert_eq!(raw_lines(&value), vec!["A: 1", "b: 2"]);
        assert!(raw_lines("%%%").is_empty());
    }
}
