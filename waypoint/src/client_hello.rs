//! Reading a TLS ClientHello without consuming it: the ingress gateway
//! learns the SNI name first, then either terminates TLS with the chosen
//! chain's certificate or passes the untouched bytes through to a backend.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A ClientHello larger than this is refused (real ones are a few KiB,
/// post-quantum key shares included).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Reads from `io` until a whole ClientHello has arrived. Returns the bytes
/// read (to be replayed, see [`Prefixed`]) and the SNI name, if any.
pub async fn read<IO>(io: &mut IO) -> io::Result<(Bytes, Option<String>)>
where
    IO: AsyncRead + Unpin,
{
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&chunk[..n]);
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_owned);
                return Ok((Bytes::from(seen), sni));
            }
            Ok(None) if seen.len() > MAX_CLIENT_HELLO => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no complete ClientHello in {MAX_CLIENT_HELLO} bytes"),
                ));
            }
            Ok(None) => {}
            Err((err, _alert)) => return Err(io::Error::new(io::ErrorKind::InvalidData, err)),
        }
    }
}

/// A stream whose first bytes were already read: reads return `prefix`
/// first, then the stream's own bytes; writes go to the stream.
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    /// `io`, with `prefix` to be read before its own bytes.
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Self { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// The first flight of a real rustls client for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name.to_owned().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn the_sni_is_read_and_every_byte_replayed() {
        let hello = client_hello("pass.example.com");
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        // Sent in two pieces, then application bytes after it.
        let (first, rest) = hello.split_at(10);
        client.write_all(first).await.unwrap();
        let writer = {
            let rest = rest.to_vec();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                client.write_all(&rest).await.unwrap();
                client.write_all(b"after").await.unwrap();
                client
            })
        };
        let (seen, sni) = read(&mut server).await.unwrap();
        assert_eq!(sni.as_deref(), Some("pass.example.com"));
        let _client = writer.await.unwrap();
        let mut replayed = Prefixed::new(seen, server);
        let mut all = vec![0u8; hello.len() + 5];
        replayed.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..hello.len()], hello.as_slice());
        assert_eq!(&all[hello.len()..], b"after");
    }

    #[tokio::test]
    async fn garbage_and_early_close_are_errors() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let err = read(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(&client_hello("a.example")[..20])
            .await
            .unwrap();
        drop(client);
        let err = read(&mut server).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
