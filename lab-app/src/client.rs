//! A minimal HTTP client over one connection: HTTP/1.1 with keep-alive, or
//! HTTP/2 with prior knowledge (h2c), in the clear or over TLS (`https://`,
//! the server checked against a given CA). Used by `lab-app get` and by the
//! server's outgoing calls. One [`Connection`] is one TCP connection, so the
//! lab's connect-time load balancing sees every new connection.

use std::{error::Error as StdError, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, Uri,
    header::{HOST, USER_AGENT},
    uri::{Authority, Scheme},
};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use thiserror::Error;
use tokio::net::TcpStream;
use tracing::debug;

use crate::resolve::{ResolveError, Resolver};

/// The largest response body read; larger ones are an error.
pub const MAX_BODY: usize = 16 << 20;

/// Why an HTTP exchange failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The URL is not `http(s)://host[:port]/...`.
    #[error("invalid URL {url}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The host name could not be resolved.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// No address of the host accepted a connection.
    #[error("connect {addr}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed, or TLS was not configured.
    #[error("TLS with {addr}")]
    Tls {
        /// The peer.
        addr: SocketAddr,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The HTTP handshake failed.
    #[error("{protocol} handshake with {addr}")]
    Handshake {
        /// `HTTP/1.1` or `HTTP/2`.
        protocol: &'static str,
        /// The peer.
        addr: SocketAddr,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// Sending the request or reading the response head failed.
    #[error("GET {uri}")]
    Request {
        /// The request URL.
        uri: Uri,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// Reading the response body failed (or it exceeded [`MAX_BODY`]).
    #[error("reading body of {uri}")]
    Body {
        /// The request URL.
        uri: Uri,
        /// What went wrong.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The exchange took too long.
    #[error("{what} timed out after {} ms", timeout.as_millis())]
    Timeout {
        /// What was under way (`connect <url>`, `GET <url>`).
        what: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Formats `err` with its chain of causes: `connect 10.96.0.5:9080: Connection refused`.
pub fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The parts of an `http://` or `https://` URL a connection needs.
#[derive(Clone, Debug)]
pub struct Target {
    /// The whole URL, normalised to have a path.
    pub uri: Uri,
    /// The host as written (a name, an IP, or `[v6]`).
    pub host: String,
    /// The port (80, or 443 for https, if the URL has none).
    pub port: u16,
    /// `https://`: TLS with the host as the server name.
    pub tls: bool,
    /// Where to connect instead of the URL's host and port (curl's
    /// `--connect-to`): the URL still gives SNI and `Host`.
    pub connect_to: Option<(String, u16)>,
}

impl Target {
    /// Parses and checks an `http://` URL.
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let invalid = |reason| ClientError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        let tls = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => false,
            Some(s) if *s == Scheme::HTTPS => true,
            _ => return Err(invalid("only http:// and https:// are supported")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        let host = authority.host().to_owned();
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        // `http://host` has no path; requests need at least `/`.
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let uri = Uri::builder()
            .scheme(if tls { Scheme::HTTPS } else { Scheme::HTTP })
            .authority(authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|_| invalid("not a URL"))?;
        Ok(Self {
            uri,
            host,
            port,
            tls,
            connect_to: None,
        })
    }

    /// The `Host` header value: `host[:port]` as in the URL, without user info.
    fn host_header(&self) -> Option<HeaderValue> {
        let authority: &Authority = self.uri.authority()?;
        let value = match authority.port() {
            Some(port) => format!("{}:{}", self.host, port.as_str()),
            None => self.host.clone(),
        };
        HeaderValue::from_str(&value).ok()
    }
}

enum Sender {
    Http1(http1::SendRequest<Empty<Bytes>>),
    Http2(http2::SendRequest<Empty<Bytes>>),
}

/// One client connection to one server.
pub struct Connection {
    sender: Sender,
    peer: SocketAddr,
}

impl Connection {
    /// Resolves `target`'s host and connects, trying each address in turn,
    /// then performs the HTTP/1.1 or HTTP/2 (prior knowledge) handshake.
    pub async fn open(
        resolver: &Resolver,
        target: &Target,
        http2_prior_knowledge: bool,
    ) -> Result<Self, ClientError> {
        Self::open_with(resolver, target, http2_prior_knowledge, None).await
    }

    /// As [`open`](Self::open), with TLS for `https://` targets (`tls`
    /// holds the trusted roots; ALPN is set to the chosen protocol).
    pub async fn open_with(
        resolver: &Resolver,
        target: &Target,
        http2_prior_knowledge: bool,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ClientError> {
        let (host, port) = match &target.connect_to {
            Some((host, port)) => (host.as_str(), *port),
            None => (target.host.as_str(), target.port),
        };
        let addrs = resolver.resolve(host, port).await?;
        let (stream, peer) = connect_any(&addrs).await?;
        let _ = stream.set_nodelay(true);
        if !target.tls {
            return Self::handshake(stream, peer, http2_prior_knowledge).await;
        }
        let tls_error = |source| ClientError::Tls { addr: peer, source };
        let Some(config) = tls else {
            return Err(tls_error(io::Error::other(
                "https:// needs trusted roots (--ca-file)",
            )));
        };
        let mut config = (*config).clone();
        config.alpn_protocols = vec![if http2_prior_knowledge {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let name = rustls_pki_types::ServerName::try_from(target.host.clone())
            .map_err(|e| tls_error(io::Error::other(e.to_string())))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(tls_error)?;
        Self::handshake(stream, peer, http2_prior_knowledge).await
    }

    async fn handshake<IO>(stream: IO, peer: SocketAddr, http2: bool) -> Result<Self, ClientError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(stream);
        let sender = if http2 {
            let (sender, conn) =
                http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|source| ClientError::Handshake {
                        protocol: "HTTP/2",
                        addr: peer,
                        source,
                    })?;
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    debug!(%peer, error = %error_chain(&err), "HTTP/2 client connection ended");
                }
            });
            Sender::Http2(sender)
        } else {
            let (sender, conn) =
                http1::handshake(io)
                    .await
                    .map_err(|source| ClientError::Handshake {
                        protocol: "HTTP/1.1",
                        addr: peer,
                        source,
                    })?;
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    debug!(%peer, error = %error_chain(&err), "HTTP/1.1 client connection ended");
                }
            });
            Sender::Http1(sender)
        };
        Ok(Self { sender, peer })
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sends `GET target` with `headers` and reads the whole response.
    pub async fn get(
        &mut self,
        target: &Target,
        headers: &HeaderMap,
    ) -> Result<Response<Bytes>, ClientError> {
        let mut request = Request::get(target.uri.clone())
            .body(Empty::<Bytes>::new())
            .map_err(|_| ClientError::InvalidUrl {
                url: target.uri.to_string(),
                reason: "not a valid request target",
            })?;
        request.headers_mut().extend(headers.clone());
        request
            .headers_mut()
            .entry(USER_AGENT)
            .or_insert(HeaderValue::from_static(concat!(
                "lab-app/",
                env!("CARGO_PKG_VERSION")
            )));
        let request_error = |source| ClientError::Request {
            uri: target.uri.clone(),
            source,
        };
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                // HTTP/1.1 sends origin-form (`/path?q`) plus a Host header.
                *request.uri_mut() = target
                    .uri
                    .path_and_query()
                    .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
                if let Some(host) = target.host_header() {
                    request.headers_mut().insert(HOST, host);
                }
                sender.ready().await.map_err(request_error)?;
                sender.send_request(request).await
            }
            // HTTP/2 takes `:scheme` and `:authority` from the absolute URI.
            Sender::Http2(sender) => {
                request.headers_mut().remove(HOST);
                sender.ready().await.map_err(request_error)?;
                sender.send_request(request).await
            }
        }
        .map_err(request_error)?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|source| ClientError::Body {
                uri: target.uri.clone(),
                source,
            })?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

/// Connects to the first address that accepts; the error names the last one tried.
pub async fn connect_any(addrs: &[SocketAddr]) -> Result<(TcpStream, SocketAddr), ClientError> {
    let mut last = None;
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(source) => {
                debug!(%addr, error = %source, "connect failed");
                last = Some(ClientError::Connect { addr, source });
            }
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Connect {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
    }))
}

/// One GET over a fresh HTTP/1.1 connection, all within `timeout`.
pub async fn get_once(
    resolver: &Resolver,
    target: &Target,
    headers: &HeaderMap,
    timeout: Duration,
) -> Result<Response<Bytes>, ClientError> {
    let exchange = async {
        let mut connection = Connection::open(resolver, target, false).await?;
        connection.get(target, headers).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            what: format!("GET {}", target.uri),
            timeout,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_normalise() {
        let t = Target::parse("http://details:9080/details/0?x=1").expect("url");
        assert_eq!((t.host.as_str(), t.port), ("details", 9080));
        assert_eq!(t.uri.to_string(), "http://details:9080/details/0?x=1");
        assert_eq!(
            t.host_header(),
            Some(HeaderValue::from_static("details:9080"))
        );

        let t = Target::parse("http://10.96.0.5").expect("url");
        assert_eq!((t.port, t.uri.path()), (80, "/"));
        assert_eq!(t.host_header(), Some(HeaderValue::from_static("10.96.0.5")));

        let t = Target::parse("http://[fd00::1]:8080/").expect("v6");
        assert_eq!((t.host.as_str(), t.port), ("[fd00::1]", 8080));

        let t = Target::parse("https://bookinfo.example.com/productpage").expect("https");
        assert_eq!((t.port, t.tls), (443, true));

        for bad in ["ftp://x/", "details:9080", "/path", "http://", "not a url"] {
            assert!(Target::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn error_chain_joins_causes() {
        let err = ClientError::Connect {
            addr: "10.96.0.5:9080".parse().expect("addr"),
            source: io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused"),
        };
        assert_eq!(
            error_chain(&err),
            "connect 10.96.0.5:9080: connection refused"
        );
    }
}
