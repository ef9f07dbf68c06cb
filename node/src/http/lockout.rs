//! Failed logins, per source address and user name, as CouchDB 3.4's `auth_lockout`: after
//! `THRESHOLD` failures within `PERIOD`, that name is locked from that address until the period
//! ends, and a locked attempt is refused without its password being checked (a guesser learns
//! nothing more, right password or not). Both password paths pass here: Basic on every request
//! and `POST /_session`. Peers never log in with passwords.

use super::error::ApiError;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed per address and name in a period (CouchDB's `lockout_threshold`).
pub const THRESHOLD: u32 = 5;
/// CouchDB's `lockout_period`.
pub const PERIOD: Duration = Duration::from_secs(300);
/// Entries kept; past it, expired ones go first, then the oldest.
const MAX_ENTRIES: usize = 10_000;

struct Entry {
    first: Instant,
    failures: u32,
}

#[derive(Default)]
pub struct Lockout {
    entries: Mutex<HashMap<(IpAddr, String), Entry>>,
}

fn unknown_source() -> IpAddr {
    IpAddr::from([0u8, 0, 0, 0])
}

impl Lockout {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(IpAddr, String), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses, before any password is checked, a name locked from this address.
    pub fn check(&self, source: Option<IpAddr>, name: &str) -> Result<(), ApiError> {
        let key = (source.unwrap_or_else(unknown_source), name.to_string());
        let mut m = self.lock();
        let locked = match m.get(&key) {
            Some(e) if e.first.elapsed() >= PERIOD => {
                m.remove(&key);
                false
            }
            Some(e) => e.failures >= THRESHOLD,
            None => false,
        };
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
        let key = (source.unwrap_or_else(unknown_source), name.to_string());
        let mut m = self.lock();
        if m.len() >= MAX_ENTRIES && !m.contains_key(&key) {
            m.retain(|_, e| e.first.elapsed() < PERIOD);
            if m.len() >= MAX_ENTRIES {
                if let Some(oldest) = m
                    .iter()
                    .min_by_key(|(_, e)| e.first)
                    .map(|(k, _)| k.clone())
                {
                    m.remove(&oldest);
                }
            }
        }
        let e = m.entry(key).or_insert_with(|| Entry {
            first: Instant::now(),
            failures: 0,
        });
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
