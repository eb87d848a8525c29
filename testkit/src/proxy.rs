//! One TCP proxy in front of the broker, for every failure the tests stage: cut every
//! connection (a network failure), half-close them (the broker's end of the stream, then
//! waiting for the client to let go), freeze them (a silent node: nothing passes, nothing
//! closes), and a tap that keeps every byte with its time.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

/// Bytes that passed the tap at once.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Which connection through the proxy, counted from 0 in accept order.
    pub connection: usize,
    pub at: Instant,
    /// Sent by the client (the bridge), else by the broker.
    pub from_client: bool,
    pub bytes: Vec<u8>,
}

/// One connection through the proxy, until the next cut or half-close.
struct Open {
    relay: AbortHandle,
    half_close: CancellationToken,
    gone: oneshot::Receiver<()>,
}

#[derive(Default)]
struct Shared {
    open: Mutex<Vec<Open>>,
    /// `Some` when tapping.
    chunks: Option<Mutex<Vec<Chunk>>>,
    accepted: Mutex<usize>,
    /// `true` while frozen: no byte is passed on, either way.
    frozen: watch::Sender<bool>,
}

/// A TCP proxy to `target` (the broker).
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Relays every connection; keeps nothing.
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_with(target, false).await
    }

    /// Relays every connection and keeps every chunk ([`Proxy::chunks`]).
    pub async fn tapped(target: SocketAddr) -> Self {
        Self::start_with(target, true).await
    }

    async fn start_with(target: SocketAddr, tap: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared {
            chunks: tap.then(Default::default),
            ..Default::default()
        });
        let accepting = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let connection = {
                    let mut accepted = accepting.accepted.lock().expect("proxy lock");
                    *accepted += 1;
                    *accepted - 1
                };
                let half_close = CancellationToken::new();
                let (gone_tx, gone) = oneshot::channel();
                let relay = tokio::spawn(relay(
                    client,
                    target,
                    accepting.clone(),
                    connection,
                    half_close.clone(),
                    gone_tx,
                ));
                accepting.open.lock().expect("proxy lock").push(Open {
                    relay: relay.abort_handle(),
                    half_close,
                    gone,
                });
            }
        });
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// Drops both ends of every connection opened since the last cut, as a network
    /// failure would; returns how many there were.
    pub fn cut(&self) -> usize {
        let open = std::mem::take(&mut *self.shared.open.lock().expect("proxy lock"));
        for c in &open {
            c.relay.abort();
        }
        open.len()
    }

    /// Ends every connection opened since the last cut as the broker's going away looks
    /// to the client: the broker side is dropped and the client's stream ends (it reads
    /// end-of-stream). Resolves once each client closed its own end, and gives how many
    /// did.
    pub async fn half_close(&self) -> usize {
        let open = std::mem::take(&mut *self.shared.open.lock().expect("proxy lock"));
        let mut closed = 0;
        for c in open {
            c.half_close.cancel();
            closed += usize::from(c.gone.await.is_ok());
        }
        closed
    }

    /// Stops passing bytes on, both ways and for connections opened later too, without
    /// closing anything: the node went silent (a frozen VM, a network that drops
    /// packets). Bytes read meanwhile are held until [`Proxy::thaw`].
    pub fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    /// Passes bytes on again after [`Proxy::freeze`].
    pub fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    /// How many connections the proxy accepted.
    pub fn accepted(&self) -> usize {
        *self.shared.accepted.lock().expect("proxy lock")
    }

    /// Every chunk that passed, in order (empty unless [`Proxy::tapped`]).
    pub fn chunks(&self) -> Vec<Chunk> {
        self.shared
            .chunks
            .as_ref()
            .map(|c| c.lock().expect("tap lock").clone())
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    shared: Arc<Shared>,
    connection: usize,
    half_close: CancellationToken,
    gone: oneshot::Sender<()>,
) {
    let Ok(mut broker) = TcpStream::connect(target).await else {
        return;
    };
    let frozen = shared.frozen.subscribe();
    let keep = |from_client: bool, bytes: &[u8]| {
        if let Some(chunks) = &shared.chunks {
            chunks.lock().expect("tap lock").push(Chunk {
                connection,
                at: Instant::now(),
                from_client,
                bytes: bytes.to_vec(),
            });
        }
    };
    let half_closed = {
        let (mut client_read, mut client_write) = client.split();
        let (mut broker_read, mut broker_write) = broker.split();
        // Each direction on its own, so a slow reader on one side never stalls the other.
        tokio::select! {
            _ = half_close.cancelled() => true,
            _ = pump(&mut client_read, &mut broker_write, true, &keep, frozen.clone()) => false,
            _ = pump(&mut broker_read, &mut client_write, false, &keep, frozen.clone()) => false,
        }
    };
    if !half_closed {
        return;
    }
    drop(broker);
    let _ = client.shutdown().await;
    let mut rest = vec![0u8; 64 * 1024];
    while let Ok(n) = client.read(&mut rest).await {
        if n == 0 {
            break;
        }
    }
    let _ = gone.send(());
}

/// Copies `from` to `to` until either ends, keeping each chunk before it is passed on
/// (so a reply never precedes its cause); while `frozen`, holds what it read.
async fn pump(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    from_client: bool,
    keep: &impl Fn(bool, &[u8]),
    mut frozen: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buffer).await {
        // Frozen, even an end of stream is held: a silent node closes nothing.
        if frozen.wait_for(|f| !*f).await.is_err() || n == 0 {
            return;
        }
        keep(from_client, &buffer[..n]);
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// One AMQP frame read off a tapped stream: its type, channel, payload, and when its
/// last byte passed the tap.
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
    pub at: Instant,
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

/// The frames of one direction of the first connection of a tap (the client's starts
/// with the 8-byte protocol header).
pub fn frames(chunks: &[Chunk], from_client: bool) -> Vec<Frame> {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for c in chunks
        .iter()
        .filter(|c| c.connection == 0 && c.from_client == from_client)
    {
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
