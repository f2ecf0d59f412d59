//! Things a stream holds while it lives: a share of a count (streams open
//! on a connection, channels of a session) given back when it is dropped,
//! whichever way the flow ended.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One share of a count: counted from `new` until dropped.
#[derive(Debug)]
pub struct Share(Arc<AtomicUsize>);

impl Share {
    /// Takes a share of `count`.
    pub fn new(count: &Arc<AtomicUsize>) -> Share {
        count.fetch_add(1, Ordering::Relaxed);
        Share(count.clone())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `io` holding `guard` until it is dropped.
pub struct Guarded<S, G> {
    io: S,
    _guard: G,
}

impl<S, G> Guarded<S, G> {
    /// `io`, holding `guard`.
    pub fn new(io: S, guard: G) -> Self {
        Guarded { io, _guard: guard }
    }
}

impl<S: AsyncRead + Unpin, G: Unpin> AsyncRead for Guarded<S, G> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, G: Unpin> AsyncWrite for Guarded<S, G> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_share_is_given_back_with_its_stream() {
        let n = Arc::new(AtomicUsize::new(0));
        let (a, mut b) = tokio::io::duplex(64);
        let mut g = Guarded::new(a, Share::new(&n));
        assert_eq!(n.load(Ordering::Relaxed), 1);
        g.write_all(b"hi").await.unwrap();
        let mut buf = [0; 2];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        drop(g);
        assert_eq!(n.load(Ordering::Relaxed), 0);
    }
}
