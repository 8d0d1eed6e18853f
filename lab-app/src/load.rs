//! `lab-app load ADDR`: a bounded load against a TCP echo server, printed as
//! one JSON line (operations, bytes, latency percentiles). The benchmark
//! harness runs it in client pods; it never targets anything outside the lab.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Longest run accepted, so a typo cannot turn into a long load.
const MAX_SECONDS: f64 = 60.0;

/// What load to generate.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    /// One connection streaming as fast as it can; the echo comes back on
    /// the same connection (bytes are counted once, in the echo).
    Stream,
    /// Request/response of `--size` bytes on one persistent connection, at
    /// `--rate` per second (0: as fast as possible).
    Rr,
    /// A new connection per exchange of `--size` bytes, as fast as possible.
    Connect,
}

/// Arguments of `lab-app load`.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The echo server, `ip:port`.
    pub addr: SocketAddr,
    /// The load.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// How long to run (at most 60 s).
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Message size of `rr` and `connect`.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Requests per second of `rr` (0: closed loop, as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    /// Completed operations (exchanges, or connections).
    pub ops: u64,
    /// Bytes echoed back.
    pub bytes: u64,
    /// Wall time of the run in seconds.
    pub seconds: f64,
    /// Operations per second.
    pub ops_per_second: f64,
    /// Echoed bytes per second.
    pub bytes_per_second: f64,
    /// Latency percentiles of one operation, in microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
}

/// Runs the load and prints its report.
pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= MAX_SECONDS) {
        bail!("--seconds must be in (0, {MAX_SECONDS}]");
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    let (ops, bytes) = match args.mode {
        Mode::Stream => stream(args.addr, duration).await?,
        Mode::Rr => rr(&args, duration, &mut histogram).await?,
        Mode::Connect => connect(&args, duration, &mut histogram).await?,
    };
    let seconds = started.elapsed().as_secs_f64();
    let report = LoadReport {
        ops,
        bytes,
        seconds,
        ops_per_second: ops as f64 / seconds,
        bytes_per_second: bytes as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.5),
        p90_us: histogram.value_at_quantile(0.9),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn open(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn stream(addr: SocketAddr, duration: Duration) -> anyhow::Result<(u64, u64)> {
    let (mut reader, mut writer) = open(addr).await?.into_split();
    let writing = tokio::spawn(async move {
        let chunk = vec![0x5a_u8; 64 * 1024];
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            writer.write_all(&chunk).await?;
        }
        writer.shutdown().await?;
        anyhow::Ok(())
    });
    let mut buffer = vec![0_u8; 256 * 1024];
    let mut echoed = 0_u64;
    loop {
        let n = reader.read(&mut buffer).await.context("reading the echo")?;
        if n == 0 {
            break;
        }
        echoed += n as u64;
    }
    writing.await??;
    Ok((1, echoed))
}

async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    response: &mut [u8],
) -> anyhow::Result<()> {
    stream.write_all(request).await?;
    stream
        .read_exact(response)
        .await
        .context("the echo ended early")?;
    Ok(())
}

async fn rr(
    args: &LoadArgs,
    duration: Duration,
    histogram: &mut Histogram<u64>,
) -> anyhow::Result<(u64, u64)> {
    let mut stream = open(args.addr).await?;
    let request = vec![0x42_u8; args.size];
    let mut response = vec![0_u8; args.size];
    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let started = Instant::now();
    let mut ops = 0_u64;
    while started.elapsed() < duration {
        // Fixed rate: each request has a scheduled start and its latency
        // counts from it, so a stall is not hidden (no coordinated
        // omission). The timer wheel is only millisecond-precise, so the
        // last stretch before the start is spun, not slept.
        let from = match interval {
            Some(interval) => {
                let scheduled = started + interval * ops as u32;
                if let Some(early) = scheduled.checked_sub(Duration::from_micros(1500))
                    && early > Instant::now()
                {
                    tokio::time::sleep_until(early.into()).await;
                }
                while Instant::now() < scheduled {
                    std::hint::spin_loop();
                }
                scheduled
            }
            None => Instant::now(),
        };
        exchange(&mut stream, &request, &mut response).await?;
        histogram.saturating_record(from.elapsed().as_micros() as u64);
        ops += 1;
    }
    Ok((ops, ops * args.size as u64))
}

async fn connect(
    args: &LoadArgs,
    duration: Duration,
    histogram: &mut Histogram<u64>,
) -> anyhow::Result<(u64, u64)> {
    let request = vec![0x43_u8; args.size];
    let mut response = vec![0_u8; args.size];
    let started = Instant::now();
    let mut ops = 0_u64;
    while started.elapsed() < duration {
        let begun = Instant::now();
        let mut stream = open(args.addr).await?;
        exchange(&mut stream, &request, &mut response).await?;
        drop(stream);
        histogram.saturating_record(begun.elapsed().as_micros() as u64);
        ops += 1;
    }
    Ok((ops, ops * args.size as u64))
}
