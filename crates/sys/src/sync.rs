//! Locks that survive a panic elsewhere: a thread that panicked while holding a lock leaves
//! state that every user here keeps consistent per operation (counters, caches, tables), so
//! the next caller goes on rather than propagating the poison into every request.

use std::sync::{Mutex, MutexGuard};

/// `m.lock()`, ignoring poisoning.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
