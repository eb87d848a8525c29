//! HTTPS for the sandbox (`--tls-cert`, `--tls-key`): stands in for Crisp behind a
//! TLS-inspecting proxy, or for Crisp itself, with a test CA.

use super::raw::RawHeadStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a client may take to finish its handshake. Handshakes run one at a time in
/// `accept` (enough for a test stand-in), so a silent client must not hold the others.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server certificate chain and key, PEM.
#[derive(Debug, Clone)]
pub struct SandboxTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl SandboxTls {
    pub fn acceptor(&self) -> io::Result<TlsAcceptor> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let pem = crate::broker::tls::read_ca_bundle("--tls-cert", &self.cert_file)
            .map_err(|e| invalid(e.to_string()))?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("--tls-cert {}: {e}", self.cert_file.display())))?;
        let key_pem = crate::broker::tls::read_pem("--tls-key", &self.key_file)
            .map_err(|e| invalid(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
            invalid(format!(
                "--tls-key {} holds no PEM private key",
                self.key_file.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| invalid(format!("--tls-cert and --tls-key: {e}")))?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// A TCP listener whose connections are TLS, then [`RawHeadStream`]s.
pub struct TlsRawHeadListener {
    pub tcp: TcpListener,
    pub acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsRawHeadListener {
    type Io = RawHeadStream<TlsStream<TcpStream>>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.tcp).await;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
                Ok(Ok(tls)) => return (RawHeadStream::new(tls), addr),
                Ok(Err(e)) => tracing::debug!(error = %e, %addr, "sandbox TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, "sandbox TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
