use std::io;

use http::StatusCode;

use crate::identity::Identity;

/// Errors returned by the HBONE client, server and certificate helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket-level failure (connect, read, write).
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake failed (includes peer identity verification).
    #[error("tls handshake: {0}")]
    Tls(io::Error),
    /// TLS configuration could not be built.
    #[error("tls config: {0}")]
    TlsConfig(#[from] rustls::Error),
    /// HTTP/2 protocol failure.
    #[error("http2: {0}")]
    H2(#[from] h2::Error),
    /// The peer answered the CONNECT request with a non-200 status.
    #[error("tunnel refused with status {0}")]
    Status(StatusCode),
    /// No certificate is available for the local identity.
    #[error("no certificate for identity {0}")]
    NoCertificate(Identity),
    /// A certificate or key could not be parsed or is inconsistent.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// The peer negotiated something other than `h2` via ALPN.
    #[error("peer did not negotiate ALPN h2")]
    NoAlpn,
    /// An operation timed out.
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

impl Error {
    /// The HTTP status of a refused tunnel, if that is what this error is.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status(s) => Some(*s),
            _ => None,
        }
    }

    /// True if the error happened during the TLS handshake.
    pub fn is_tls(&self) -> bool {
        matches!(self, Error::Tls(_))
    }
}
