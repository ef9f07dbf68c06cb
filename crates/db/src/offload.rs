//! How engine work leaves the async workers, private to this crate: callers of `db` see async
//! methods and never choose. Writes, flushes, index builds, plugin compilation and scans can
//! block for milliseconds to seconds (an fsync, a cold range read); running them on a runtime
//! worker would stall every other request on it. Point reads of single records stay inline:
//! they cost microseconds from the block cache.
//!
//! - [`run`]: short owned work (a write batch, a query), at most [`SHORT_SLOTS`] at once, so a
//!   burst of concurrent writers does not grow the blocking pool to one thread each (every
//!   thread keeps its own allocator pages: 32 concurrent PUTs left ~300 MB resident).
//! - [`detach`]: short work started and not awaited (a database's writer draining its queue).
//! - [`long`] / [`spawn`]: long owned work (compaction, an index build, a streamed answer),
//!   awaited or not, outside that bound so it never starves the short work.

/// Short work running at once on the blocking pool; writes to one database serialise on its
/// lock anyway, so more would only add threads.
pub(crate) const SHORT_SLOTS: usize = 4;

static SHORT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SHORT_SLOTS);

/// Runs short work `f` on the blocking pool (waiting for a slot). Errors only if the task
/// panicked or the runtime is gone.
pub(crate) async fn run<T, F>(f: F) -> Result<T, Gone>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let _slot = SHORT.acquire().await.map_err(|e| Gone(e.to_string()))?;
    long(f).await
}

/// Starts short work `f` on the blocking pool once a slot is free, without waiting for it: it
/// runs even if the caller goes away (a database's write queue relies on that).
pub(crate) fn detach<F>(f: F)
where
    F: FnOnce() + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::spawn(async move {
        // The semaphore is never closed.
        if let Ok(_slot) = SHORT.acquire().await {
            let _ = tokio::task::spawn_blocking(move || span.in_scope(f)).await;
        }
    });
}

/// Runs long work `f` on the blocking pool, outside the short-work bound.
pub(crate) async fn long<T, F>(f: F) -> Result<T, Gone>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn(f).await.map_err(|e| Gone(e.to_string()))
}

/// Starts `f` on the blocking pool (in the caller's tracing span) without waiting for it.
pub(crate) fn spawn<T, F>(f: F) -> tokio::task::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
}

/// A blocking task that did not finish (it panicked, or the runtime shut down).
#[derive(Debug, thiserror::Error)]
#[error("storage task failed: {0}")]
pub struct Gone(pub String);
