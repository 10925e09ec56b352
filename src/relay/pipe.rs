//! After an IMAP or POP3 login: the client and the upstream joined by a plain bidirectional copy
//! (`tokio::io::copy_bidirectional`, 8 KiB buffers each way), every byte unchanged, so `IDLE`,
//! literals and large `FETCH`es work as they do without the relay. The copy ends when both
//! sides have closed, or when no byte moved either way for the idle bound (an IMAP `IDLE` is
//! kept alive by the server's periodic untagged lines and the client's `DONE`). Hand-written:
//! the wrapper that notes the last byte moved and the watchdog that reads it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::mail::Io;

/// When a byte last moved, in milliseconds after `start`.
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let now = self.start.elapsed();
        now.saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// A stream that notes every byte read from or written to it.
struct Watched {
    io: Box<dyn Io>,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// One side: the stream and the bytes already read from it that the other side has not seen.
pub(crate) struct Side {
    /// The stream.
    pub(crate) io: Box<dyn Io>,
    /// Read from `io` and not yet passed on.
    pub(crate) pending: Vec<u8>,
}

/// Copies between `client` and `upstream` until both close or nothing moved for `idle`; each
/// side's pending bytes go to the other first (within `write`).
pub(crate) async fn join(client: Side, upstream: Side, idle: Duration, write: Duration) {
    let activity = Arc::new(Activity { start: Instant::now(), last: AtomicU64::new(0) });
    let mut a = Watched { io: client.io, activity: activity.clone() };
    let mut b = Watched { io: upstream.io, activity: activity.clone() };
    let pending = async {
        if !client.pending.is_empty() {
            b.write_all(&client.pending).await?;
            b.flush().await?;
        }
        if !upstream.pending.is_empty() {
            a.write_all(&upstream.pending).await?;
            a.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    if !matches!(tokio::time::timeout(write, pending).await, Ok(Ok(()))) {
        return;
    }
    let watchdog = async {
        loop {
            let quiet = activity.quiet_for();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle.saturating_sub(quiet)).await;
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
        () = watchdog => {
            tracing::debug!("a relayed session was idle too long and is closed");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), a.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), b.shutdown()).await;
}
