//! `lab-app upgrade URL`: an HTTP/1.1 protocol upgrade (the mechanism
//! WebSocket uses) followed by an exchange of raw bytes: the client sends
//! `--send`, half-closes, and prints everything the server sent back. The
//! lab's server answers upgrades with `101 Switching Protocols`, a line
//! naming the pod, then an echo.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use http::{
    HeaderValue, Request, StatusCode,
    header::{CONNECTION, HOST, UPGRADE},
};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    client::{Target, connect_any},
    resolve::ResolveArgs,
};

/// Arguments of `lab-app upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The URL: `http://host[:port]/path`.
    pub url: String,
    /// The protocol to switch to (the `Upgrade` header).
    #[arg(long, default_value = "websocket")]
    pub protocol: String,
    /// Bytes to send once switched.
    #[arg(long, default_value = "")]
    pub send: String,
    /// How names are resolved.
    #[command(flatten)]
    pub resolve: ResolveArgs,
    /// Time limit for the whole exchange.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub timeout_ms: u64,
}

/// Runs the upgrade and the exchange.
pub async fn run(args: UpgradeArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    tokio::time::timeout(timeout, exchange(&args))
        .await
        .with_context(|| {
            format!(
                "upgrade {} timed out after {} ms",
                args.url, args.timeout_ms
            )
        })?
}

async fn exchange(args: &UpgradeArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.url)?;
    if target.tls {
        bail!("upgrade speaks http:// only");
    }
    let resolver = args.resolve.resolver()?;
    let addrs = resolver.resolve(&target.host, target.port).await?;
    let (stream, peer) = connect_any(&addrs).await?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP/1.1 handshake with {peer}"))?;
    tokio::spawn(connection.with_upgrades());
    let path = target.uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(HOST, format!("{}:{}", target.host, target.port))
        .header(CONNECTION, HeaderValue::from_static("upgrade"))
        .header(UPGRADE, &args.protocol)
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET {}", target.uri))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        bail!(
            "{} answered {} instead of 101",
            target.uri,
            response.status()
        );
    }
    let upgraded = hyper::upgrade::on(response)
        .await
        .context("switching protocols")?;
    let mut io = TokioIo::new(upgraded);
    io.write_all(args.send.as_bytes())
        .await
        .context("sending")?;
    io.shutdown().await.context("half-closing")?;
    let mut received = Vec::new();
    io.read_to_end(&mut received).await.context("reading")?;
    print!("{}", String::from_utf8_lossy(&received));
    Ok(())
}
