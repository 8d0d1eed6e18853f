//! Byte-stream adapter over one HTTP/2 stream, and the relay between such a
//! stream and a socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read from the socket side of a [`relay`]: one HTTP/2 DATA frame
/// at most 16 KiB, so a read rarely needs more than a couple of frames.
const RELAY_READ: usize = 32 * 1024;

/// Drops the first `n` bytes of `buf`. Once all are gone the handle is
/// replaced, not just advanced: a received DATA frame shares its
/// allocation with HTTP/2's read buffer, and an empty but live slice of it
/// would keep that buffer alive for as long as the tunnel idles.
fn consume(buf: &mut Bytes, n: usize) {
    if n >= buf.len() {
        *buf = Bytes::new();
    } else {
        buf.advance(n);
    }
}

/// One established HBONE stream as a tokio byte stream.
///
/// Reading yields the peer's DATA frames (EOF on END_STREAM), writing sends
/// DATA frames respecting flow control, and `poll_shutdown` sends
/// END_STREAM (a TCP half-close). Dropping it before both sides finished
/// resets the stream (RST_STREAM).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    buf: Bytes,
    read_eof: bool,
    write_closed: bool,
    bytes_read: u64,
    bytes_written: u64,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id())
            .field("bytes_read", &self.bytes_read)
            .field("bytes_written", &self.bytes_written)
            .finish()
    }
}

pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 io error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl H2Stream {
    /// Wraps the two halves of an HTTP/2 stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            buf: Bytes::new(),
            read_eof: false,
            write_closed: false,
            bytes_read: 0,
            bytes_written: 0,
        }
    }

    /// Payload bytes received from the peer so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Payload bytes sent to the peer so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Resets the stream (RST_STREAM with CANCEL).
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.buf.is_empty() {
                let n = this.buf.len().min(out.remaining());
                out.put_slice(&this.buf[..n]);
                consume(&mut this.buf, n);
                this.bytes_read += n as u64;
                return Poll::Ready(Ok(()));
            }
            if this.read_eof || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // At most one chunk is buffered here, so releasing the
                    // window now keeps memory bounded by the frame size.
                    let _ = this.recv.flow_control().release_capacity(chunk.len());
                    this.buf = chunk;
                }
                Some(Err(e)) => {
                    if e.reason() == Some(h2::Reason::NO_ERROR) {
                        this.read_eof = true;
                    } else {
                        return Poll::Ready(Err(h2_to_io(e)));
                    }
                }
                None => this.read_eof = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        this.send.reserve_capacity(buf.len());
        let cap = loop {
            let cap = this.send.capacity();
            if cap > 0 {
                break cap;
            }
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "stream closed",
                    )));
                }
            }
        };
        let n = cap.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        this.bytes_written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are flushed by the connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.send.reserve_capacity(0);
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Relays between an HBONE stream and `io` until both directions finished
/// (each half-close is passed on: END_STREAM becomes a write shutdown of
/// `io` and EOF on `io` becomes END_STREAM). Returns the bytes moved from
/// the stream to `io` and from `io` to the stream.
///
/// Unlike `tokio::io::copy_bidirectional`, it holds no buffer while the
/// connection is idle (reads land in a stack buffer only when `io` has
/// data, DATA frames are written to `io` as they arrive), so an idle
/// tunnel costs no copy buffers; and received DATA is acknowledged to the
/// peer (flow-control window) only once `io` took it, so a slow reader
/// slows the sender instead of growing memory.
pub async fn relay<IO>(stream: &mut H2Stream, io: &mut IO) -> io::Result<(u64, u64)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // Whatever an earlier read left buffered goes first; its window was
    // released when it arrived.
    let mut state = Relay {
        up_pending: Bytes::new(),
        up_done: false,
        down_pending: std::mem::take(&mut stream.buf),
        down_released: true,
        down_done: false,
    };
    std::future::poll_fn(|cx| state.poll(cx, stream, io)).await?;
    Ok((stream.bytes_read, stream.bytes_written))
}

/// The two directions of a [`relay`]: "up" is `io` to the HBONE peer,
/// "down" the HBONE peer to `io`.
struct Relay {
    /// Read from `io`, not yet sent for want of flow-control capacity.
    up_pending: Bytes,
    /// END_STREAM sent.
    up_done: bool,
    /// Received from the peer, not yet written to `io`.
    down_pending: Bytes,
    /// Whether `down_pending`'s flow-control window was already released.
    down_released: bool,
    /// `io` shut down for writing after the peer's END_STREAM.
    down_done: bool,
}

impl Relay {
    fn poll<IO>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut H2Stream,
        io: &mut IO,
    ) -> Poll<io::Result<()>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        // Each direction runs until it would block; errors end both.
        if !self.up_done {
            self.poll_up(cx, stream, io)?;
        }
        if !self.down_done {
            self.poll_down(cx, stream, io)?;
        }
        if self.up_done && self.down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn poll_up<IO>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut H2Stream,
        io: &mut IO,
    ) -> io::Result<()>
    where
        IO: AsyncRead + Unpin,
    {
        loop {
            if !self.up_pending.is_empty() {
                let send = &mut stream.send;
                send.reserve_capacity(self.up_pending.len());
                let mut capacity = send.capacity();
                while capacity == 0 {
                    match send.poll_capacity(cx) {
                        Poll::Pending => return Ok(()),
                        Poll::Ready(Some(Ok(n))) => capacity = n,
                        Poll::Ready(Some(Err(e))) => return Err(h2_to_io(e)),
                        Poll::Ready(None) => {
                            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"));
                        }
                    }
                }
                let chunk = self
                    .up_pending
                    .split_to(capacity.min(self.up_pending.len()));
                stream.bytes_written += chunk.len() as u64;
                send.send_data(chunk, false).map_err(h2_to_io)?;
                continue;
            }
            if stream.write_closed {
                self.up_done = true;
                return Ok(());
            }
            // A stack buffer, so an idle connection holds none; left
            // uninitialised, so a read that finds nothing costs nothing.
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); RELAY_READ];
            let mut read = ReadBuf::uninit(&mut buf);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    stream.write_closed = true;
                    stream.send.reserve_capacity(0);
                    stream
                        .send
                        .send_data(Bytes::new(), true)
                        .map_err(h2_to_io)?;
                    self.up_done = true;
                    return Ok(());
                }
                Poll::Ready(Ok(())) => {
                    self.up_pending = Bytes::copy_from_slice(read.filled());
                }
            }
        }
    }

    fn poll_down<IO>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut H2Stream,
        io: &mut IO,
    ) -> io::Result<()>
    where
        IO: AsyncWrite + Unpin,
    {
        loop {
            if !self.down_pending.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, &self.down_pending) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Ready(Ok(0)) => {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the socket accepted no bytes",
                        ));
                    }
                    Poll::Ready(Ok(n)) => {
                        consume(&mut self.down_pending, n);
                        stream.bytes_read += n as u64;
                        if !self.down_released {
                            // The peer may send again what `io` has taken.
                            let _ = stream.recv.flow_control().release_capacity(n);
                        }
                        continue;
                    }
                }
            }
            if stream.read_eof {
                match Pin::new(&mut *io).poll_shutdown(cx) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(result) => {
                        // A socket the other side already closed cannot be
                        // shut down; the relay still finished.
                        if let Err(e) = result
                            && e.kind() != io::ErrorKind::NotConnected
                        {
                            return Err(e);
                        }
                        self.down_done = true;
                        return Ok(());
                    }
                }
            }
            match stream.recv.poll_data(cx) {
                Poll::Pending => {
                    // Nothing more to write for now: push out what `io` buffers.
                    return match Pin::new(&mut *io).poll_flush(cx) {
                        Poll::Ready(Err(e)) => Err(e),
                        _ => Ok(()),
                    };
                }
                Poll::Ready(Some(Ok(chunk))) => {
                    self.down_pending = chunk;
                    self.down_released = false;
                }
                Poll::Ready(Some(Err(e))) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    stream.read_eof = true;
                }
                Poll::Ready(Some(Err(e))) => return Err(h2_to_io(e)),
                Poll::Ready(None) => stream.read_eof = true,
            }
        }
    }
}
