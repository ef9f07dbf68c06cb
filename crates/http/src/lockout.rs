//! Failed logins, per source address and user name, as CouchDB 3.4's `auth_lockout`: after
//! `THRESHOLD` failures within `PERIOD`, that name is locked from that address until the period
//! ends, and a locked attempt is refused without its password being checked (a guesser learns
//! nothing more, right password or not). Both password paths pass here: Basic on every request
//! and `POST /_session`. Peers never log in with passwords.

use super::error::ApiError;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed per address and name in a period (CouchDB's `lockout_threshold`).
pub const THRESHOLD: u32 = 5;
/// CouchDB's `lockout_period`.
pub const PERIOD: Duration = Duration::from_secs(300);
/// Entries kept; past it, expired ones go first, then all.
const MAX_ENTRIES: usize = 10_000;

struct Entry {
    first: Instant,
    failures: u32,
}

/// Failures by source address, then name (looked up by `&str`, no allocation per request).
type Table = HashMap<IpAddr, HashMap<String, Entry>>;

#[derive(Default)]
pub struct Lockout {
    entries: Mutex<Table>,
    /// Entries held: every request with a password passes `check`, which skips the lock
    /// while nobody has failed.
    held: AtomicUsize,
}

fn unknown_source() -> IpAddr {
    IpAddr::from([0u8, 0, 0, 0])
}

impl Lockout {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        thali_sys::sync::lock(&self.entries)
    }

    /// Refuses, before any password is checked, a name locked from this address.
    pub fn check(&self, source: Option<IpAddr>, name: &str) -> Result<(), ApiError> {
        if self.held.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let ip = source.unwrap_or_else(unknown_source);
        let locked = self
            .lock()
            .get(&ip)
            .and_then(|names| names.get(name))
            .is_some_and(|e| e.first.elapsed() < PERIOD && e.failures >= THRESHOLD);
        if locked {
            return Err(ApiError::new(
                403,
                "forbidden",
                "Account is temporarily locked due to multiple authentication failures",
            ));
        }
        Ok(())
    }

    /// Counts a wrong password for `name` from `source`.
    pub fn failed(&self, source: Option<IpAddr>, name: &str) {
        let ip = source.unwrap_or_else(unknown_source);
        let mut m = self.lock();
        let mut held = self.held.load(Ordering::Relaxed);
        if held >= MAX_ENTRIES {
            // Expired entries go first; if that is not enough, everything (a flood of names).
            m.retain(|_, names| {
                names.retain(|_, e| e.first.elapsed() < PERIOD);
                !names.is_empty()
            });
            held = m.values().map(HashMap::len).sum();
            if held >= MAX_ENTRIES {
                m.clear();
                held = 0;
            }
        }
        let names = m.entry(ip).or_default();
        let e = match names.get_mut(name) {
            Some(e) => e,
            None => {
                held += 1;
                names.entry(name.to_string()).or_insert(Entry {
                    first: Instant::now(),
                    failures: 0,
                })
            }
        };
        if e.first.elapsed() >= PERIOD {
            *e = Entry {
                first: Instant::now(),
                failures: 0,
            };
        }
        e.failures += 1;
        if e.failures == THRESHOLD {
            tracing::warn!(source = ?source, %name, "login locked after repeated failures");
        }
        self.held.store(held, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_locks_from_one_address_only_after_the_threshold() {
        let l = Lockout::default();
        let a = Some(IpAddr::from([127, 0, 0, 1]));
        let b = Some(IpAddr::from([127, 0, 0, 2]));
        for _ in 0..THRESHOLD {
            assert!(l.check(a, "admin").is_ok());
            l.failed(a, "admin");
        }
        assert_eq!(l.check(a, "admin").unwrap_err().status.as_u16(), 403);
        assert!(l.check(b, "admin").is_ok());
        assert!(l.check(a, "someone").is_ok());
    }
}
