//! TLS for the `Join` server (rustls, ring): the server's certificate chain
//! and key from PEM files, and optionally a CA whose certificates clients
//! must present (mutual TLS). ALPN offers `h2`, which gRPC clients (Flower's
//! Python ones included) require.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;

pub use tokio_rustls::rustls::ServerConfig;

/// Errors reading certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS settings: {0}")]
    Invalid(String),
}

/// The PEM files of a TLS server (Flower's `--ssl-certfile`,
/// `--ssl-keyfile`, `--ssl-ca-certfile`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// A CA: clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The certificates of a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_err(path, format!("holds no PEM private key: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration of a server with `files`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| file_err(ca, format!("unusable CA certificate: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .map_err(|e| file_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Invalid(format!(
            "{} and {} do not make a certificate and its key: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What the first byte a client sends says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstByte {
    /// A TLS handshake record.
    Tls,
    /// `PRI * HTTP/2.0`: the plaintext HTTP/2 preface.
    PlainHttp2,
    /// Neither.
    Other,
}

impl FirstByte {
    pub(crate) fn of(b: u8) -> FirstByte {
        match b {
            0x16 => FirstByte::Tls,
            b'P' => FirstByte::PlainHttp2,
            _ => FirstByte::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("cert.pem");
        std::fs::write(&bogus, "not a certificate").unwrap();
        let files = TlsFiles {
            cert: bogus.clone(),
            key: dir.path().join("missing.key"),
            client_ca: None,
        };
        let e = server_config(&files).unwrap_err().to_string();
        assert!(
            e.contains("cert.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let files = TlsFiles {
            cert: dir.path().join("nope.pem"),
            ..files
        };
        let e = server_config(&files).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
    }

    #[test]
    fn first_bytes_tell_tls_from_plaintext() {
        assert_eq!(FirstByte::of(0x16), FirstByte::Tls);
        assert_eq!(FirstByte::of(b'P'), FirstByte::PlainHttp2);
        assert_eq!(FirstByte::of(b'G'), FirstByte::Other);
    }
}
