//! Plain TCP servers: echo, and a server-first banner followed by echo.

use std::{io, sync::Arc};

use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tracing::info;

/// The buffer size for echoing: large transfers move in big chunks.
const BUFFER: usize = 64 * 1024;

/// Accepts connections on `listener` forever. Each connection first gets
/// `banner`, if any, before anything is read, then has its bytes echoed.
pub async fn serve(listener: TcpListener, banner: Option<Arc<[u8]>>) {
    let kind = if banner.is_some() { "banner" } else { "echo" };
    loop {
        let (stream, caller) = super::accept(&listener).await;
        let banner = banner.clone();
        tokio::spawn(async move {
            let local = stream
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
            match echo(stream, banner.as_deref()).await {
                Ok(bytes) => info!(%caller, %local, kind, bytes, "connection closed"),
                Err(err) => info!(%caller, %local, kind, error = %err, "connection failed"),
            }
        });
    }
}

/// Writes `banner`, then echoes until the peer shuts down its write side,
/// then shuts down ours: a half-close is answered only after every byte.
/// Returns the number of bytes echoed.
async fn echo(mut stream: TcpStream, banner: Option<&[u8]>) -> io::Result<u64> {
    if let Some(banner) = banner {
        stream.write_all(banner).await?;
    }
    let (reader, mut writer) = stream.split();
    let mut reader = BufReader::with_capacity(BUFFER, reader);
    let bytes = tokio::io::copy_buf(&mut reader, &mut writer).await?;
    writer.shutdown().await?;
    Ok(bytes)
}
