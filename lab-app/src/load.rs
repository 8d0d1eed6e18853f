//! `lab-app load ADDR`: a bounded load against a TCP echo server or an HTTP
//! server (`lab-app serve`'s `/bytes/N`), printed as one JSON line
//! (operations, bytes, latency percentiles). The benchmark harness runs it in
//! client pods; it never targets anything outside the lab.

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
/// Most connections `--connections` accepts.
const MAX_CONNECTIONS: usize = 20_000;
/// Connections `hold` opens at once; the rest wait their turn, so the
/// listener's backlog is not what is measured.
const OPENING_AT_ONCE: usize = 64;

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
    /// HTTP/1.1 keep-alive `GET /bytes/<size>` on each of `--connections`
    /// connections, closed loop.
    Http,
    /// Opens `--connections` connections, one exchange of `--size` bytes on
    /// each, holds them all open for `--seconds`, then checks every one
    /// still echoes. Latency is each connection's setup and first exchange.
    Hold,
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
    /// Concurrent connections of `http` and `hold`.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
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
    if !(1..=MAX_CONNECTIONS).contains(&args.connections) {
        bail!("--connections must be in 1..={MAX_CONNECTIONS}");
    }
    let duration = Duration::from_secs_f64(args.seconds);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let started = Instant::now();
    // Rates divide by the run's wall time; `hold`'s by the time opening took.
    let timed = |(ops, bytes): (u64, u64)| (ops, bytes, started.elapsed());
    let (ops, bytes, seconds) = match args.mode {
        Mode::Stream => timed(stream(args.addr, duration).await?),
        Mode::Rr => timed(rr(&args, duration, &mut histogram).await?),
        Mode::Connect => timed(connect(&args, duration, &mut histogram).await?),
        Mode::Http => timed(http(&args, duration, &mut histogram).await?),
        Mode::Hold => hold(&args, duration, &mut histogram).await?,
    };
    report(ops, bytes, seconds.as_secs_f64(), &histogram)
}

/// Prints what a run measured; `seconds` is what the rates divide by.
fn report(ops: u64, bytes: u64, seconds: f64, histogram: &Histogram<u64>) -> anyhow::Result<()> {
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

/// How long before a fixed-rate request's scheduled start the load stops
/// sleeping and spins: more than a sleeping thread's wake-up delay here.
const RATE_SPIN: Duration = Duration::from_micros(150);

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
        // omission). Tokio's timer wheel is only millisecond-precise, so
        // the wait is a thread sleep (an hrtimer, tens of microseconds
        // late at worst) until just before the start, and only that last
        // stretch is spun: spinning the whole interval would hold one of
        // the machine's cores away from the path being measured.
        let from = match interval {
            Some(interval) => {
                let scheduled = started + interval * ops as u32;
                if let Some(early) = scheduled.checked_sub(RATE_SPIN) {
                    let now = Instant::now();
                    if early > now {
                        tokio::task::block_in_place(|| std::thread::sleep(early - now));
                    }
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

/// Closed-loop HTTP/1.1 keep-alive GETs on `--connections` connections.
async fn http(
    args: &LoadArgs,
    duration: Duration,
    histogram: &mut Histogram<u64>,
) -> anyhow::Result<(u64, u64)> {
    let uri: http::Uri = format!("http://{}/bytes/{}", args.addr, args.size).parse()?;
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let (addr, uri, mut histogram) = (args.addr, uri.clone(), histogram.clone());
        tasks.spawn(async move {
            let (ops, bytes) = http_connection(addr, uri, deadline, &mut histogram).await?;
            anyhow::Ok((ops, bytes, histogram))
        });
    }
    let (mut ops, mut bytes) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (o, b, h) = done??;
        ops += o;
        bytes += b;
        histogram.add(h)?;
    }
    Ok((ops, bytes))
}

async fn http_connection(
    addr: SocketAddr,
    uri: http::Uri,
    deadline: Instant,
    histogram: &mut Histogram<u64>,
) -> anyhow::Result<(u64, u64)> {
    use http_body_util::{BodyExt as _, Empty};

    let io = hyper_util::rt::TokioIo::new(open(addr).await?);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let driving = tokio::spawn(connection);
    let host = http::HeaderValue::from_str(&addr.to_string())?;
    let (mut ops, mut bytes) = (0_u64, 0_u64);
    while Instant::now() < deadline {
        let begun = Instant::now();
        sender.ready().await.context("the connection closed")?;
        let request = http::Request::get(uri.clone())
            .header(http::header::HOST, host.clone())
            .body(Empty::<bytes::Bytes>::new())?;
        let response = sender
            .send_request(request)
            .await
            .context("sending a request")?;
        if !response.status().is_success() {
            bail!("{uri} answered {}", response.status());
        }
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Some(data) = frame.context("reading a response body")?.data_ref() {
                bytes += data.len() as u64;
            }
        }
        histogram.saturating_record(begun.elapsed().as_micros() as u64);
        ops += 1;
    }
    drop(sender);
    let _ = driving.await;
    Ok((ops, bytes))
}

/// Opens `--connections` echo connections, holds them, checks them;
/// returns the time opening them took.
async fn hold(
    args: &LoadArgs,
    duration: Duration,
    histogram: &mut Histogram<u64>,
) -> anyhow::Result<(u64, u64, Duration)> {
    ensure_fd_limit(args.connections)?;
    let request = vec![0x44_u8; args.size];
    let opening = std::sync::Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.connections {
        let (addr, request, opening) = (args.addr, request.clone(), opening.clone());
        tasks.spawn(async move {
            let permit = opening.acquire_owned().await?;
            let begun = Instant::now();
            let mut stream = open(addr).await?;
            let mut response = vec![0_u8; request.len()];
            exchange(&mut stream, &request, &mut response).await?;
            drop(permit);
            anyhow::Ok((stream, begun.elapsed()))
        });
    }
    let opening_started = Instant::now();
    let mut streams = Vec::with_capacity(args.connections);
    while let Some(opened) = tasks.join_next().await {
        let (stream, took) = opened??;
        histogram.saturating_record(took.as_micros() as u64);
        streams.push(stream);
    }
    let opened_in = opening_started.elapsed();
    tokio::time::sleep(duration).await;
    // Every connection must have survived being held.
    let mut response = vec![0_u8; args.size];
    for (i, stream) in streams.iter_mut().enumerate() {
        exchange(stream, &request, &mut response)
            .await
            .with_context(|| format!("connection {i} of {} after holding", args.connections))?;
    }
    // Close with a reset: thousands of connections in TIME_WAIT would slow
    // the connection setup of the runs that follow.
    for stream in &streams {
        stream.set_zero_linger()?;
    }
    let ops = streams.len() as u64;
    Ok((ops, 2 * ops * args.size as u64, opened_in))
}

/// Checks this process may hold `connections` sockets (and a margin);
/// `main` has already raised the limit as far as it goes.
fn ensure_fd_limit(connections: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit};

    let needed = connections as u64 + 64;
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    anyhow::ensure!(
        soft >= needed,
        "{connections} connections need {needed} open files; the limit is {soft}"
    );
    Ok(())
}
