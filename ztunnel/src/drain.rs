//! Draining on shutdown: ztunnel counts the relays it carries (captured
//! outbound and inbound connections, inbound HBONE tunnels), and on SIGTERM
//! stops accepting, then waits until they are all closed or the drain
//! period is over, whichever comes first.
//!
//! HBONE *connections* are not counted: peers pool them and keep them open
//! while idle, so waiting for them would always last the whole period. The
//! tunnels inside them are what carry traffic.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

/// How many relays are open; wakes [`drained`](Self::drained) when the
/// last one closes.
#[derive(Debug, Default)]
pub struct OpenConnections {
    count: AtomicUsize,
    idle: Notify,
}

/// Counts one open relay until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<OpenConnections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl OpenConnections {
    /// Counts one relay until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.clone())
    }

    /// `future`, counted as one relay while it runs (and until it is
    /// dropped, should its task be aborted).
    pub fn track<F: Future>(
        self: &Arc<Self>,
        future: F,
    ) -> impl Future<Output = F::Output> + use<F> {
        let guard = self.open();
        async move {
            let _guard = guard;
            future.await
        }
    }

    /// How many relays are open now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Waits until no relay is open, or `period` has passed; returns how
    /// many are still open (0: drained).
    pub async fn drained(&self, period: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + period;
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the check: a close racing it still wakes us.
            idle.as_mut().enable();
            let open = self.count();
            if open == 0 {
                return 0;
            }
            tokio::select! {
                () = idle => {}
                () = tokio::time::sleep_until(deadline) => return self.count(),
            }
        }
    }
}

/// A byte stream counted as one open relay while it lives.
#[derive(Debug)]
pub struct Tracked<T> {
    inner: T,
    _guard: ConnectionGuard,
}

impl<T> Tracked<T> {
    /// `inner`, counted in `open`.
    pub fn new(inner: T, open: &Arc<OpenConnections>) -> Self {
        Self {
            inner,
            _guard: open.open(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_ends_when_the_last_relay_closes() {
        let open = Arc::new(OpenConnections::default());
        assert_eq!(
            open.drained(Duration::from_secs(5)).await,
            0,
            "nothing open"
        );
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(open.track(async move {
            let _ = done_rx.await;
        }));
        let stream = Tracked::new(tokio::io::empty(), &open);
        assert_eq!(open.count(), 2);
        drop(stream);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = done_tx.send(());
        });
        let started = tokio::time::Instant::now();
        assert_eq!(open.drained(Duration::from_secs(30)).await, 0);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(10),
            "until the relay closed, not the full period: {took:?}"
        );
        relay.await.unwrap();
    }

    #[tokio::test]
    async fn drain_gives_up_after_the_period() {
        let open = Arc::new(OpenConnections::default());
        let held = tokio::spawn(open.track(std::future::pending::<()>()));
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        assert_eq!(open.drained(Duration::from_millis(200)).await, 1);
        assert!(started.elapsed() >= Duration::from_millis(200));
        // An aborted relay task is no longer counted.
        held.abort();
        let _ = held.await;
        assert_eq!(open.count(), 0);
    }
}
