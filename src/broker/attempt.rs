//! One connection attempt that can be given up (README "Hostile answers and inputs: the
//! bounds"). lapin has no handshake timeout, and dropping its connect future leaves the
//! connection's I/O thread waiting on a peer that took the TCP connection and never
//! answers (the TLS handshake or AMQP's). So the attempt's socket is made here, a
//! duplicate of it kept before any handshake starts; giving up shuts it down, which ends
//! both handshakes and the thread. (lapin logs "Exponential backoff attempts exhausted" at
//! error level as that thread ends: it does not retry, as the bridge sets no backoff.)

use lapin::tcp::{AsyncTcpStream, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
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

    fn hold(&self, fd: OwnedFd) {
        *self.held() = Some(fd);
        // Given up while this socket was being made: shut it down too.
        if self.given_up.load(Ordering::SeqCst) {
            self.give_up();
        }
    }
}

/// Connects as lapin's `connect_uri_with_config` does (TCP, then TLS for `amqps`, with
/// the URL's host as the TLS server name), keeping the socket in `attempt` before any
/// handshake.
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
            let aborted = || std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
            if attempt.given_up.load(Ordering::SeqCst) {
                return Err(aborted().into());
            }
            let host = uri.authority.host.clone();
            let addresses = runtime.to_socket_addrs((host.clone(), uri.authority.port));
            let stream = AsyncTcpStream::connect(&runtime, addresses).await?;
            let AsyncTcpStream::Plain(tcp) = &stream else {
                return Err(aborted().into());
            };
            // Without a duplicate the attempt could not be given up: refuse it.
            attempt.hold(tcp.get_ref().as_fd().try_clone_to_owned()?);
            if attempt.given_up.load(Ordering::SeqCst) {
                return Err(aborted().into());
            }
            let stream = match uri.scheme {
                AMQPScheme::AMQP => stream,
                AMQPScheme::AMQPS => stream.into_tls(&host, tls.as_ref()).await?,
            };
            Ok(stream)
        },
        properties,
    )
    .await
}
