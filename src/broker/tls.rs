//! TLS to the broker: the `[amqp.tls]` PEM files, read before each connection (cert-manager
//! rotates them), and failed handshakes put in words an operator can act on.

use crate::config::AmqpTlsConfig;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest PEM file read: a CA bundle with every public root is about 250 KiB.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// A `[amqp.tls]` file that cannot serve, with its key and path.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("cannot read {key} {}: {source}{}", path.display(), read_advice(key))]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key} {} is larger than {MAX_PEM_BYTES} bytes; it should hold PEM certificates or one key", path.display())]
    TooLarge { key: &'static str, path: PathBuf },
    #[error("{key} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate { key: &'static str, path: PathBuf },
    // The detail of a key file's parse error is left out: it could quote key material.
    #[error("{key} {} is not valid PEM ({detail})", path.display())]
    BadPem {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("amqp.tls.key_file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1; an encrypted key is not supported)", path.display())]
    NoKey { path: PathBuf },
    #[error("amqp.tls.key_file {} is not the key of the certificate in amqp.tls.cert_file {} ({detail}); mount the matching pair (tls.crt and tls.key of one Secret)", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
}

/// What to do about an unreadable file named by a config key (not by a command-line flag).
fn read_advice(key: &str) -> &'static str {
    if key.starts_with("--") {
        ""
    } else {
        "; mount the file or fix the path (relative paths start at the config file's folder)"
    }
}

impl TlsFileError {
    /// The config key of the file at fault.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Read { key, .. }
            | Self::TooLarge { key, .. }
            | Self::NoCertificate { key, .. }
            | Self::BadPem { key, .. } => key,
            Self::NoKey { .. } | Self::Mismatch { .. } => "amqp.tls.key_file",
        }
    }
}

/// What lapin needs for one connection, read from the files now.
pub fn load(tls: &AmqpTlsConfig) -> Result<OwnedTLSConfig, TlsFileError> {
    let mut config = OwnedTLSConfig::default();
    if let Some(path) = tls.ca() {
        let bytes = read_pem("amqp.tls.ca_file", path)?;
        certificates("amqp.tls.ca_file", path, &bytes)?;
        // Kept as text: lapin takes the CA bundle as a PEM string.
        config.cert_chain = Some(String::from_utf8(bytes).map_err(|_| TlsFileError::BadPem {
            key: "amqp.tls.ca_file",
            path: path.to_owned(),
            detail: "not UTF-8 text".into(),
        })?);
    }
    if let (Some(cert_path), Some(key_path)) = (tls.cert(), tls.key()) {
        let pem_bytes = read_pem("amqp.tls.cert_file", cert_path)?;
        let chain = certificates("amqp.tls.cert_file", cert_path, &pem_bytes)?;
        let key_bytes = read_pem("amqp.tls.key_file", key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsFileError::NoKey {
                path: key_path.to_owned(),
            },
            _ => TlsFileError::BadPem {
                key: "amqp.tls.key_file",
                path: key_path.to_owned(),
                detail: "unreadable private key".into(),
            },
        })?;
        check_pair(chain, key).map_err(|detail| TlsFileError::Mismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            detail,
        })?;
        config.identity = Some(OwnedIdentity::PKCS8 {
            pem: pem_bytes,
            key: key_bytes,
        });
    }
    Ok(config)
}

/// A PEM bundle of CA certificates, checked to hold at least one (also `crisp.ca_file`).
pub fn read_ca_bundle(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let bytes = read_pem(key, path)?;
    certificates(key, path, &bytes)?;
    Ok(bytes)
}

/// A PEM file's bytes, at most [`MAX_PEM_BYTES`].
pub fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let read_error = |source| TlsFileError::Read {
        key,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsFileError::TooLarge {
            key,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn certificates(
    key: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsFileError::BadPem {
            key,
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsFileError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Whether the key belongs to the chain's first certificate, as rustls checks it when it
/// builds a client config (so a wrong pair fails here, not as a broker refusal).
fn check_pair(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(chain, key)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Why a TLS connection failed, in words naming the setting to fix, when the error (a
/// lapin error wrapping an I/O error wrapping a rustls one) comes from TLS.
pub fn describe_failure(error: &lapin::Error, host: &str, client_cert: bool) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        // An io::Error's source() skips the error it wraps, so look inside it too.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(tls) = e.downcast_ref::<rustls::Error>().or(inner) {
            return Some(describe(tls, host, client_cert));
        }
        next = e.source();
    }
    // Under TLS 1.3 the client's handshake is done before the broker has checked our
    // certificate; a broker that refuses it may just close the socket, with no alert read.
    let closed = matches!(error.kind(), lapin::ErrorKind::IOError(io) if matches!(
        io.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted
    ));
    closed.then(|| {
        let advice = if client_cert {
            "that is how a refused client certificate shows under TLS 1.3: check that amqp.tls.cert_file is signed by a CA the broker trusts and is valid now"
        } else {
            "that is how a broker that requires a client certificate may refuse us under TLS 1.3: set amqp.tls.cert_file and amqp.tls.key_file"
        };
        format!("connection closed by the broker during or right after the TLS handshake; {advice}; the broker's log says which ({error})")
    })
}

fn describe(error: &rustls::Error, host: &str, client_cert: bool) -> String {
    use rustls::Error as E;
    match error {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "unknown issuer: the broker's certificate is not signed by a CA we trust; put its CA in amqp.tls.ca_file ({error})"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "name mismatch: the broker's certificate is not valid for `{host}`; connect with a name the certificate lists, or reissue it with this one ({error})"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "expired: the broker's certificate has expired; renew it on the broker ({error})"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "not valid yet: the broker's certificate starts later; check both clocks ({error})"
            ),
            _ => format!("the broker's certificate is refused: {error}"),
        },
        E::AlertReceived(AlertDescription::CertificateRequired) => format!(
            "certificate required: the broker requires a client certificate; set amqp.tls.cert_file and amqp.tls.key_file ({error})"
        ),
        E::AlertReceived(AlertDescription::HandshakeFailure) if !client_cert => format!(
            "handshake failure: the broker refused the handshake, most likely because it requires a client certificate (set amqp.tls.cert_file and amqp.tls.key_file) ({error})"
        ),
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure),
        ) => format!(
            "client certificate refused ({a:?}): the broker does not accept amqp.tls.cert_file; it must be signed by a CA the broker trusts and be valid now ({error})"
        ),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => format!(
            "the broker did not answer in TLS; is this port an AMQPS listener (usually 5671) and not plain AMQP? ({error})"
        ),
        _ => format!("TLS failed: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(e: rustls::Error) -> lapin::Error {
        lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn each_handshake_failure_names_its_reason() {
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "unknown issuer",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                "name mismatch",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                "expired",
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                "certificate required",
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
                "requires a client certificate",
            ),
        ];
        for (error, expected) in cases {
            let text = describe_failure(&wrapped(error), "rabbit.example", false).unwrap();
            assert!(
                text.starts_with(expected) || text.contains(expected),
                "{text}"
            );
        }
        let refused = describe_failure(
            &wrapped(rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
            "h",
            true,
        )
        .unwrap();
        assert!(
            refused.starts_with("client certificate refused"),
            "{refused}"
        );
        let plain = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(describe_failure(&plain, "h", false), None);
        let reset = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let text = describe_failure(&reset, "h", true).unwrap();
        assert!(text.contains("refused client certificate"), "{text}");
    }

    #[test]
    fn missing_and_mismatched_files_name_key_and_path() {
        let dir = std::env::temp_dir().join(format!("crisp-bridge-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tls = AmqpTlsConfig {
            ca_file: Some(dir.join("missing-ca.crt")),
            ..Default::default()
        };
        let e = load(&tls).unwrap_err().to_string();
        assert!(
            e.contains("amqp.tls.ca_file") && e.contains("missing-ca.crt"),
            "{e}"
        );
        std::fs::write(dir.join("empty.crt"), "not pem\n").unwrap();
        let tls = AmqpTlsConfig {
            ca_file: Some(dir.join("empty.crt")),
            ..Default::default()
        };
        let e = load(&tls).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
