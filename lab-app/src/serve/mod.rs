//! `lab-app serve`: the pod's container. Listens on every configured port of
//! `0.0.0.0` until SIGTERM or SIGINT.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};
use tracing::{info, warn};

use crate::{client::Target, resolve::Resolver};

pub mod http;
pub mod tcp;

/// Who this pod is; reported in every HTTP answer.
#[derive(Args, Clone, Debug, Default, Serialize)]
pub struct Identity {
    /// Pod name (also sent in the banner).
    #[arg(long, default_value = "")]
    pub pod: String,
    /// Pod namespace; also picks the DNS search path.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The `app` label.
    #[arg(long, default_value = "")]
    pub app: String,
    /// The `version` label.
    #[arg(long, default_value = "")]
    pub version: String,
    /// The node the pod runs on.
    #[arg(long, default_value = "")]
    pub node: String,
    /// The pod's service account.
    #[arg(long, default_value = "")]
    pub service_account: String,
}

/// A path whose requests fan out to downstream URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRoute {
    /// The request path, matched exactly.
    pub path: String,
    /// The URLs called, in order.
    pub urls: Vec<String>,
}

/// Parses `--call PATH=URL[,URL...]`.
fn parse_call(value: &str) -> Result<CallRoute, String> {
    let (path, urls) = value.split_once('=').ok_or("expected PATH=URL[,URL...]")?;
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    let urls: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err(format!("no URLs for {path}"));
    }
    for url in &urls {
        Target::parse(url).map_err(|err| err.to_string())?;
    }
    Ok(CallRoute {
        path: path.to_owned(),
        urls,
    })
}

/// Arguments of `lab-app serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    /// Identity reported in answers.
    pub identity: Identity,
    /// Serve HTTP/1.1 and h2c on this port (repeatable).
    #[arg(long = "http", value_name = "PORT")]
    pub http: Vec<u16>,
    /// Serve TCP echo on this port (repeatable).
    #[arg(long = "echo", value_name = "PORT")]
    pub echo: Vec<u16>,
    /// Serve a banner, then echo, on this port (repeatable).
    #[arg(long = "banner", value_name = "PORT")]
    pub banner: Vec<u16>,
    /// Hosts file for outgoing calls, re-read when it changes.
    #[arg(long, value_name = "FILE")]
    pub hosts: Option<std::path::PathBuf>,
    /// On requests for PATH, GET each URL and report the answers (repeatable).
    #[arg(long = "call", value_name = "PATH=URL[,URL...]", value_parser = parse_call)]
    pub calls: Vec<CallRoute>,
}

/// Runs the servers until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Handle signals before anything listens, so a prompt SIGTERM still exits 0.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let resolver = Resolver::new(args.hosts.as_deref(), &args.identity.namespace)?;
    let banner: Arc<[u8]> = format!("LAB-BANNER {}\r\n", args.identity.pod)
        .into_bytes()
        .into();
    let app = Arc::new(http::App::new(args.identity, args.calls, resolver));

    let mut servers = JoinSet::new();
    for &port in &args.http {
        servers.spawn(http::serve(bind(port, "http").await?, Arc::clone(&app)));
    }
    for &port in &args.echo {
        servers.spawn(tcp::serve(bind(port, "echo").await?, None));
    }
    for &port in &args.banner {
        servers.spawn(tcp::serve(
            bind(port, "banner").await?,
            Some(Arc::clone(&banner)),
        ));
    }

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    info!(signal, "shutting down");
    servers.shutdown().await;
    Ok(())
}

async fn bind(port: u16, kind: &str) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr} ({kind})"))?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(%local, kind, "listening");
    Ok(listener)
}

/// The next connection; accept errors (such as running out of file
/// descriptors) are logged and retried after a pause instead of ending the server.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(connection) => return connection,
            Err(err) => {
                warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_routes_parse() {
        assert_eq!(
            parse_call("/productpage=http://details:9080/details/0, http://reviews:9080/reviews/0"),
            Ok(CallRoute {
                path: "/productpage".into(),
                urls: vec![
                    "http://details:9080/details/0".into(),
                    "http://reviews:9080/reviews/0".into()
                ],
            })
        );
        assert!(parse_call("/x").is_err());
        assert!(parse_call("x=http://a/").is_err());
        assert!(parse_call("/x=").is_err());
        assert!(parse_call("/x=ftp://a/").is_err());
    }
}
