//! `lab-app`: the stand-in application every pod of the network-namespace lab
//! runs, and the matching clients.
//!
//! - `lab-app serve` answers HTTP/1.1 and h2c with JSON naming the pod and the
//!   caller (and can call further services), echoes TCP, and speaks a
//!   server-first banner protocol.
//! - `lab-app get URL`, `lab-app upgrade URL`, `lab-app grpc URL` and
//!   `lab-app tcp ADDR` drive it from tests and demos; `lab-app load ADDR`
//!   drives the benchmarks.

use std::{io::IsTerminal, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod client;
mod get;
mod grpc;
mod load;
mod resolve;
mod serve;
mod tcp_client;
mod upgrade;

/// The stand-in app of the network-namespace lab.
#[derive(Debug, Parser)]
#[command(name = "lab-app", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTP, TCP echo and banner ports until SIGTERM or SIGINT.
    Serve(serve::ServeArgs),
    /// GET a URL; print each body on its own line; exit 1 unless all were 2xx.
    Get(get::GetArgs),
    /// Exchange bytes with a TCP echo or banner server; print what came back.
    Tcp(tcp_client::TcpArgs),
    /// Switch an HTTP/1.1 connection to another protocol (as WebSocket
    /// does), then exchange bytes; print what came back.
    Upgrade(upgrade::UpgradeArgs),
    /// Drive a bounded load against a TCP echo or HTTP server; print a JSON
    /// report.
    Load(load::LoadArgs),
    /// Make one gRPC call of the lab's test service (unary, server or
    /// client streaming, bidirectional); print what came back as JSON.
    Grpc(grpc::GrpcArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs each request; the clients keep stderr for problems.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        Command::Get(_)
        | Command::Tcp(_)
        | Command::Load(_)
        | Command::Upgrade(_)
        | Command::Grpc(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // The server and the load generator hold many connections.
    mesh_admin::process::raise_fd_limit();

    let result = match cli.command {
        Command::Serve(args) => serve::run(args).await.map(|()| true),
        Command::Get(args) => get::run(args).await,
        Command::Tcp(args) => tcp_client::run(args).await.map(|()| true),
        Command::Upgrade(args) => upgrade::run(args).await.map(|()| true),
        Command::Load(args) => load::run(args).await.map(|()| true),
        Command::Grpc(args) => grpc::run(args).await.map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
