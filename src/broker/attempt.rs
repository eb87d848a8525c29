//! One connection attempt that can be given up (README "Hostile answers and inputs: the
//! bounds"). lapin has no handshake timeout, and dropping its connect future leaves the
//! connection's I/O thread waiting on a peer that took the TCP connection and never
//! answers. Giving up shuts that socket down, so the thread ends, and refuses lapin's
//! own retry of the handshake on a fresh socket.

use lapin::tcp::{AMQPUriTcpExt, AsyncTcpStream, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// What [`connect`] shares with the caller that may give the attempt up.
#[derive(Default)]
pub struct Attempt {
    given_up: AtomicBool,
    /// A duplicate of the attempt's socket (its TCP stream, under TLS too).
    socket: Mutex<Option<OwnedFd>>,
}

impl Attempt {
    /// Ends the attempt: no new socket, and the open one shut down both ways.
    pub fn give_up(&self) {
        self.given_up.store(true, Ordering::SeqCst);
        if let Some(fd) = self.held().take() {
            let _ = std::net::TcpStream::from(fd).shutdown(Shutdown::Both);
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<OwnedFd>> {
        self.socket.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hold(&self, fd: Option<OwnedFd>) {
        *self.held() = fd;
        // Given up while this socket was being made: shut it down too.
        if self.given_up.load(Ordering::SeqCst) {
            self.give_up();
        }
    }
}

/// Connects as lapin's `connect_uri_with_config` does (TCP, then TLS for `amqps`),
/// keeping the socket in `attempt`.
pub async fn connect(
    attempt: Arc<Attempt>,
    uri: AMQPUri,
    properties: ConnectionProperties,
    tls: OwnedTLSConfig,
) -> lapin::Result<Connection> {
    let runtime = lapin::runtime::default_runtime()?;
    Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| {
            if attempt.given_up.load(Ordering::SeqCst) {
                return Err(std::io::Error::from(std::io::ErrorKind::ConnectionAborted).into());
            }
            let stream =
                AMQPUriTcpExt::connect_with_config_async(&uri, tls.as_ref(), &runtime).await?;
            let fd = match &stream {
                AsyncTcpStream::Plain(tcp) => tcp.get_ref().as_fd().try_clone_to_owned().ok(),
                AsyncTcpStream::Rustls(tls) => {
                    tls.get_ref().0.get_ref().as_fd().try_clone_to_owned().ok()
                }
                _ => None,
            };
            attempt.hold(fd);
            Ok(stream)
        },
        properties,
    )
    .await
}
