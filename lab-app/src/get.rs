//! `lab-app get URL`: GET a URL one or more times over one connection and
//! print each body on its own line.

use std::{
    io::{self, Write},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::{
    client::{ClientError, Connection, Target},
    resolve::ResolveArgs,
};

/// Arguments of `lab-app get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The URL: `http(s)://host[:port]/path[?query]`.
    pub url: String,
    /// PEM file of the CA that signs the server's certificate (`https://`).
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM file of a client certificate chain to present (mutual TLS).
    #[arg(long, value_name = "PEM", requires = "key_file")]
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, value_name = "PEM", requires = "cert_file")]
    pub key_file: Option<std::path::PathBuf>,
    /// Connect to this `host:port` instead of the URL's, keeping the URL's
    /// host for SNI and `Host` (as curl's `--connect-to`).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub connect_to: Option<(String, u16)>,
    /// Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// A request header (repeatable).
    #[arg(long = "header", value_name = "K:V", value_parser = parse_header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Requests to send, all over one kept-alive connection unless
    /// `--new-connection` is given.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Open a new connection for every request, so connection-level load
    /// balancing sees each one.
    #[arg(long)]
    pub new_connection: bool,
    /// How names are resolved.
    #[command(flatten)]
    pub resolve: ResolveArgs,
    /// Instead of the bodies, print how many answers came from each
    /// version (the `version` field of the app's JSON; non-2xx answers
    /// count under their status), as one JSON object.
    #[arg(long)]
    pub tally: bool,
    /// Print each response's headers (`name: value`) to stderr.
    #[arg(long)]
    pub show_headers: bool,
    /// Time limit for connecting, and for each request.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub timeout_ms: u64,
}

/// Parses `--connect-to HOST:PORT`.
fn parse_host_port(value: &str) -> Result<(String, u16), String> {
    let (host, port) = value.rsplit_once(':').ok_or("expected HOST:PORT")?;
    let port = port.parse().map_err(|_| format!("port {port:?}"))?;
    Ok((host.to_owned(), port))
}

/// Trusts the CA certificates of `path`; presents the client certificate
/// of `client` (chain and key files), if given.
fn tls_config(
    path: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
    {
        roots
            .add(cert.with_context(|| format!("a certificate in {}", path.display()))?)
            .context("adding a trusted root")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("a certificate in {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading the key {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the client certificate and key")?
        }
    };
    Ok(Arc::new(config))
}

/// Parses `--header K:V`.
fn parse_header(value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = value.split_once(':').ok_or("expected K:V")?;
    let name = HeaderName::try_from(name.trim()).map_err(|err| format!("header name: {err}"))?;
    let value =
        HeaderValue::try_from(value.trim()).map_err(|err| format!("header value: {err}"))?;
    Ok((name, value))
}

/// Runs the requests; `Ok(true)` if every response was 2xx.
pub async fn run(args: GetArgs) -> anyhow::Result<bool> {
    let resolver = args.resolve.resolver()?;
    let mut target = Target::parse(&args.url)?;
    target.connect_to = args.connect_to.clone();
    let client_cert = args.cert_file.as_deref().zip(args.key_file.as_deref());
    let tls = args
        .ca_file
        .as_deref()
        .map(|ca| tls_config(ca, client_cert))
        .transpose()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let headers: HeaderMap = args.headers.into_iter().collect();

    let connect = || async {
        tokio::time::timeout(
            timeout,
            Connection::open_with(&resolver, &target, args.http2, tls.clone()),
        )
        .await
        .map_err(|_| ClientError::Timeout {
            what: format!("connect {}", target.uri),
            timeout,
        })?
    };
    let mut connection = connect().await?;

    let mut all_ok = true;
    let mut tally: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    for i in 0..args.count {
        if args.new_connection && i > 0 {
            connection = connect().await?;
        }
        let response = tokio::time::timeout(timeout, connection.get(&target, &headers))
            .await
            .map_err(|_| ClientError::Timeout {
                what: format!("GET {}", target.uri),
                timeout,
            })??;
        if args.show_headers {
            for (name, value) in response.headers() {
                eprintln!("{name}: {}", String::from_utf8_lossy(value.as_bytes()));
            }
        }
        if args.tally {
            *tally.entry(answered_by(&response)).or_default() += 1;
        } else {
            print_body(response.body()).context("writing to stdout")?;
        }
        if !response.status().is_success() {
            all_ok = false;
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(|l| format!(" (location: {l})"))
                .unwrap_or_default();
            eprintln!(
                "GET {} from {}: {}{location}",
                target.uri,
                connection.peer(),
                response.status()
            );
        }
    }
    if args.tally {
        println!(
            "{}",
            serde_json::to_string(&tally).context("encoding the tally")?
        );
    }
    Ok(all_ok)
}

/// The app version that answered, or `status <code>` when it was not a 2xx.
fn answered_by(response: &http::Response<bytes::Bytes>) -> String {
    if !response.status().is_success() {
        return format!("status {}", response.status().as_u16());
    }
    serde_json::from_slice::<serde_json::Value>(response.body())
        .ok()
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Writes `body` as one line (bodies that already end in a newline are kept as is).
fn print_body(body: &[u8]) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(body)?;
    if !body.ends_with(b"\n") {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        let (name, value) = parse_header("End-User: jason").expect("header");
        assert_eq!(
            (name.as_str(), value.to_str().ok()),
            ("end-user", Some("jason"))
        );
        let (_, value) = parse_header("x-url:http://a:1/").expect("colon in value");
        assert_eq!(value, "http://a:1/");
        assert!(parse_header("no-colon").is_err());
        assert!(parse_header("bad name:v").is_err());
    }
}
