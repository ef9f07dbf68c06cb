//! What one peer key may use of the peer listener, whichever transport it came by:
//! connections (a stranger few, a known peer a share of the known slots, so no single key can
//! hold them all), requests per second (a token bucket per key: past it, 429), and time with a
//! write pending (a peer that stops reading its answers loses the connection instead of
//! holding it and its buffers forever).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use thali_sys::sync::lock;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Connections one unknown key may hold.
pub const PER_STRANGER: usize = 4;

struct KeyUse {
    connections: usize,
    tokens: f64,
    refilled: Instant,
}

/// Per-key connection counts and request buckets; a key's entry lives while it has a
/// connection or its bucket is refilling (at most two seconds after its last request), so the
/// map holds the keys connected now or moments ago.
pub struct PerKey {
    keys: Mutex<HashMap<String, KeyUse>>,
    per_known: usize,
    /// Requests per second per key (0: unlimited); the bucket holds two seconds' worth.
    rate: f64,
}

impl PerKey {
    pub fn new(per_known: usize, rate: u32) -> Arc<PerKey> {
        Arc::new(PerKey {
            keys: Mutex::new(HashMap::new()),
            per_known: per_known.max(PER_STRANGER),
            rate: f64::from(rate),
        })
    }

    /// A connection slot for `key`, or `None` when the key holds its share already.
    pub fn connect(self: &Arc<Self>, key: &str, known: bool) -> Option<KeySlot> {
        let cap = if known { self.per_known } else { PER_STRANGER };
        let now = Instant::now();
        let mut keys = lock(&self.keys);
        // A key's bucket outlives its connections until it has refilled: reconnecting does
        // not buy a fresh burst. Entries without connections and with a full bucket go.
        keys.retain(|_, u| {
            self.refill(u, now);
            u.connections > 0 || u.tokens < self.burst()
        });
        let u = keys.entry(key.to_string()).or_insert_with(|| KeyUse {
            connections: 0,
            tokens: self.burst(),
            refilled: now,
        });
        if u.connections >= cap {
            return None;
        }
        u.connections += 1;
        Some(KeySlot(self.clone(), key.to_string()))
    }

    fn burst(&self) -> f64 {
        self.rate * 2.0
    }

    fn refill(&self, u: &mut KeyUse, now: Instant) {
        let gained = now.duration_since(u.refilled).as_secs_f64() * self.rate;
        u.tokens = (u.tokens + gained).min(self.burst());
        u.refilled = now;
    }

    /// Takes one request from `key`'s bucket; `false` when it is empty.
    pub fn request(&self, key: &str) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut keys = lock(&self.keys);
        let Some(u) = keys.get_mut(key) else {
            return true;
        };
        self.refill(u, Instant::now());
        if u.tokens >= 1.0 {
            u.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A key's connection, given back when the connection ends.
pub struct KeySlot(Arc<PerKey>, String);

impl Drop for KeySlot {
    fn drop(&mut self) {
        if let Some(u) = lock(&self.0.keys).get_mut(&self.1) {
            u.connections = u.connections.saturating_sub(1);
        }
    }
}

/// A stream whose writes fail once one has been pending for `limit`: the other side stopped
/// reading. Reads pass through untouched (an idle live feed is not a stall).
pub struct Stall<S> {
    inner: S,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Stall<S> {
    pub fn new(inner: S, limit: Duration) -> Stall<S> {
        Stall {
            inner,
            limit,
            timer: None,
        }
    }

    fn pending<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.timer = None;
            return r;
        }
        let limit = self.limit;
        let t = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if t.as_mut().poll(cx).is_ready() {
            self.timer = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {}s", limit.as_secs()),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.pending(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.pending(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.pending(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_its_share_of_connections_and_gives_them_back() {
        let p = PerKey::new(6, 0);
        let known: Vec<_> = (0..6).map(|_| p.connect("k", true).unwrap()).collect();
        assert!(p.connect("k", true).is_none());
        assert!(p.connect("other", true).is_some());
        let strangers: Vec<_> = (0..PER_STRANGER)
            .map(|_| p.connect("s", false).unwrap())
            .collect();
        assert!(p.connect("s", false).is_none());
        drop(known);
        drop(strangers);
        let _again = p.connect("k", true).expect("slots given back");
        assert_eq!(
            lock(&p.keys).len(),
            1,
            "entries go with their last connection"
        );
    }

    #[test]
    fn the_bucket_allows_two_seconds_of_requests_then_refills() {
        let p = PerKey::new(8, 50);
        let _slot = p.connect("k", true).unwrap();
        let allowed = (0..1000).filter(|_| p.request("k")).count();
        assert!((100..=101).contains(&allowed), "{allowed}");
        std::thread::sleep(Duration::from_millis(100));
        assert!(p.request("k"), "refilled at 50/s");
    }

    #[test]
    fn reconnecting_does_not_refill_the_bucket() {
        let p = PerKey::new(8, 50);
        let slot = p.connect("k", true).unwrap();
        while p.request("k") {}
        drop(slot);
        let _slot = p.connect("k", true).unwrap();
        assert!(!p.request("k"), "a new connection got a fresh burst");
    }

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_the_limit() {
        use tokio::io::AsyncWriteExt;
        let (a, _b) = tokio::io::duplex(1024);
        let mut s = Stall::new(a, Duration::from_millis(200));
        let t = Instant::now();
        let err = s.write_all(&vec![0u8; 1 << 20]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t.elapsed() >= Duration::from_millis(200));
    }
}
