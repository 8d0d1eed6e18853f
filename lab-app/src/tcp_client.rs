//! `lab-app tcp ADDR`: a raw TCP exchange with an echo or banner server.

use std::{
    io::{self, Write},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::{client::connect_any, resolve::ResolveArgs};

/// The longest banner line accepted.
const MAX_BANNER: u64 = 4096;
/// Chunk size of `--bytes` transfers.
const CHUNK: usize = 64 * 1024;
/// Period of the `--bytes` pattern: a prime, so shifted or dropped chunks show.
const PERIOD: usize = 251;

/// Arguments of `lab-app tcp`.
#[derive(Args, Debug)]
pub struct TcpArgs {
    /// The server: `host:port` (`[v6]:port` for IPv6).
    pub addr: String,
    /// What to send before shutting down the write side.
    #[arg(long, default_value = "", conflicts_with = "bytes")]
    pub send: String,
    /// Read and print one `\r\n`-terminated line before sending anything.
    #[arg(long)]
    pub expect_banner: bool,
    /// Send N bytes of a pattern and check the echo matches exactly; prints `ok N`.
    #[arg(long, value_name = "N")]
    pub bytes: Option<u64>,
    /// Send `--send` one byte every MS milliseconds (a slowloris client)
    /// until the server closes; prints `closed after T ms, sent S of N
    /// bytes` and anything the server sent.
    #[arg(long, value_name = "MS", conflicts_with = "bytes")]
    pub trickle_ms: Option<u64>,
    /// How names are resolved.
    #[command(flatten)]
    pub resolve: ResolveArgs,
    /// Time limit for the whole exchange.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub timeout_ms: u64,
}

/// Runs the exchange within the time limit.
pub async fn run(args: TcpArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    tokio::time::timeout(timeout, exchange(&args))
        .await
        .with_context(|| format!("tcp {} timed out after {} ms", args.addr, args.timeout_ms))?
}

async fn exchange(args: &TcpArgs) -> anyhow::Result<()> {
    let (host, port) = split_host_port(&args.addr)?;
    let resolver = args.resolve.resolver()?;
    let addrs = resolver.resolve(host, port).await?;
    let (stream, peer) = connect_any(&addrs).await?;
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(CHUNK, reader);

    if args.expect_banner {
        let mut line = Vec::new();
        (&mut reader)
            .take(MAX_BANNER)
            .read_until(b'\n', &mut line)
            .await
            .with_context(|| format!("reading banner from {peer}"))?;
        let Some(banner) = line.strip_suffix(b"\r\n") else {
            bail!(
                "no \\r\\n-terminated banner from {peer}: {:?}",
                String::from_utf8_lossy(&line)
            );
        };
        print(&[banner, b"\n"].concat())?;
    }

    if let Some(every) = args.trickle_ms {
        return trickle(&mut reader, &mut writer, args.send.as_bytes(), every).await;
    }
    match args.bytes {
        Some(total) => {
            tokio::try_join!(
                async {
                    send_pattern(&mut writer, total)
                        .await
                        .with_context(|| format!("sending to {peer}"))
                },
                verify_pattern(&mut reader, total),
            )?;
            print(format!("ok {total}\n").as_bytes())
        }
        None => {
            let (_, echoed) = tokio::try_join!(
                async {
                    writer.write_all(args.send.as_bytes()).await?;
                    writer.shutdown().await
                },
                async {
                    let mut echoed = Vec::new();
                    reader.read_to_end(&mut echoed).await.map(|_| echoed)
                },
            )
            .with_context(|| format!("exchange with {peer}"))?;
            print(&echoed)
        }
    }
}

/// Sends `payload` a byte at a time, `every_ms` apart, while reading,
/// until the server closes the connection (or the payload runs out).
async fn trickle(
    reader: &mut (impl AsyncRead + Unpin),
    writer: &mut (impl AsyncWrite + Unpin),
    payload: &[u8],
    every_ms: u64,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut received = Vec::new();
    let mut sent = 0;
    let mut ticks = tokio::time::interval(Duration::from_millis(every_ms.max(1)));
    let mut chunk = [0_u8; 4096];
    loop {
        tokio::select! {
            read = reader.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            },
            _ = ticks.tick(), if sent < payload.len() => {
                if writer.write_all(&payload[sent..=sent]).await.is_err() {
                    break;
                }
                sent += 1;
            }
        }
    }
    print(
        format!(
            "closed after {} ms, sent {sent} of {} bytes\n",
            started.elapsed().as_millis(),
            payload.len()
        )
        .as_bytes(),
    )?;
    print(&received)
}

/// Splits `host:port` or `[v6]:port`.
fn split_host_port(addr: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("{addr}: expected host:port"))?;
    let port = port
        .parse()
        .with_context(|| format!("{addr}: invalid port {port:?}"))?;
    ensure!(!host.is_empty(), "{addr}: no host");
    Ok((host, port))
}

fn print(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .context("writing to stdout")
}

/// The pattern from any offset: `pattern()[offset % PERIOD..][..CHUNK]`.
fn pattern() -> Vec<u8> {
    (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect()
}

/// Writes `total` bytes of the pattern, then shuts down the write side.
async fn send_pattern(writer: &mut (impl AsyncWrite + Unpin), total: u64) -> io::Result<()> {
    let pattern = pattern();
    let mut sent = 0u64;
    while sent < total {
        let start = (sent % PERIOD as u64) as usize;
        let len = (total - sent).min(CHUNK as u64) as usize;
        writer.write_all(&pattern[start..start + len]).await?;
        sent += len as u64;
    }
    writer.shutdown().await
}

/// Reads until EOF and checks the bytes are exactly `total` bytes of the pattern.
async fn verify_pattern(reader: &mut (impl AsyncRead + Unpin), total: u64) -> anyhow::Result<()> {
    let pattern = pattern();
    let mut buffer = vec![0; CHUNK];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buffer).await.context("reading the echo")?;
        if n == 0 {
            break;
        }
        ensure!(
            received + n as u64 <= total,
            "echo is longer than the {total} bytes sent"
        );
        let start = (received % PERIOD as u64) as usize;
        if let Some(i) = buffer[..n]
            .iter()
            .zip(&pattern[start..start + n])
            .position(|(got, want)| got != want)
        {
            bail!("echo differs at byte {}", received + i as u64);
        }
        received += n as u64;
    }
    ensure!(received == total, "echoed {received} of {total} bytes");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split() {
        assert_eq!(
            split_host_port("10.244.1.5:7").ok(),
            Some(("10.244.1.5", 7))
        );
        assert_eq!(split_host_port("ratings:22").ok(), Some(("ratings", 22)));
        assert_eq!(split_host_port("[fd00::1]:7").ok(), Some(("[fd00::1]", 7)));
        for bad in ["ratings", ":7", "ratings:x", "ratings:70000"] {
            assert!(split_host_port(bad).is_err(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn pattern_round_trips_and_detects_corruption() {
        let total = 3 * CHUNK as u64 + 17;
        let mut sent = Vec::new();
        send_pattern(&mut sent, total).await.expect("send");
        assert_eq!(sent.len() as u64, total);
        verify_pattern(&mut sent.as_slice(), total)
            .await
            .expect("verify");

        assert!(
            verify_pattern(&mut &sent[..sent.len() - 1], total)
                .await
                .is_err()
        );
        let mut corrupt = sent.clone();
        corrupt[70_000] ^= 1;
        let err = verify_pattern(&mut corrupt.as_slice(), total)
            .await
            .expect_err("corrupt");
        assert!(err.to_string().contains("70000"), "{err}");
    }
}
