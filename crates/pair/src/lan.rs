//! Discovery on the local network (`thali serve --lan`): the node announces its peer listener
//! over mDNS/DNS-SD as `_thali._tcp.local.` and browses for others.
//!
//! What a passive listener sees is a random instance and host name, replaced every
//! ten minutes (`--lan-rotate`), an address and a port: no key, no device name, nothing in TXT. A node's key is
//! learned the way Thali's presence work intended, over a mutual-TLS handshake with the
//! announced address (`peer::tls::probe_key`); entries are kept by key, so a rotated name
//! updates the same entry. Probes are bounded (a few at a time, each address at most once per
//! `REPROBE`, at most `MAX_SEEN` nodes remembered), so a noisy network cannot make the node
//! dial without limit.

use super::Pairing;
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

pub const SERVICE: &str = "_thali._tcp.local.";
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const REPROBE: Duration = Duration::from_secs(30);
const MAX_SEEN: usize = 256;
/// Nodes not announced for this long are no longer listed.
const FORGET: Duration = Duration::from_secs(900);

#[derive(Default)]
pub(super) struct Lan {
    on: bool,
    started: Option<Instant>,
    /// By key.
    seen: HashMap<String, Seen>,
    /// When each address was last probed.
    probed: HashMap<SocketAddr, Instant>,
}

struct Seen {
    addrs: Vec<SocketAddr>,
    first: u64,
    last: u64,
    last_at: Instant,
    /// Seconds from `serve --lan` to this node being listed.
    after: f64,
}

impl Pairing {
    fn lan(&self) -> std::sync::MutexGuard<'_, Lan> {
        thali_sys::sync::lock(&self.lan)
    }

    /// The nodes discovered nearby (`GET /_thali/peers`).
    pub async fn nearby(&self) -> Result<Value, super::PairError> {
        let paired = self.state().map(|s| s.peers).unwrap_or_default();
        let known = self.node.peer_keys().await;
        let lan = self.lan();
        if !lan.on {
            return Err(super::PairError::bad(
                "discovery is off: start the node with --lan",
            ));
        }
        let mut out: Vec<Value> = lan
            .seen
            .iter()
            .filter(|(_, s)| s.last_at.elapsed() < FORGET)
            .map(|(key, s)| {
                let name = paired
                    .iter()
                    .find(|p| &p.key == key)
                    .map(|p| p.name.clone());
                let addr = s.addrs.first().map(|a| a.to_string()).unwrap_or_default();
                json!({"key": key, "name": name, "paired": name.is_some(),
                       "known": name.is_some() || known.contains(key),
                       "addresses": s.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                       "url": format!("httpkey://{addr}/{key}/"),
                       "first_seen": s.first, "last_seen": s.last,
                       "listed_after_s": s.after})
            })
            .collect();
        out.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        Ok(Value::Array(out))
    }

    /// A discovered node's URL by the start of its key (with or without `ed25519:`).
    pub(super) fn discovered_url(&self, prefix: &str) -> Option<Result<String, String>> {
        let p = if prefix.starts_with("ed25519:") {
            prefix.to_string()
        } else {
            format!("ed25519:{prefix}")
        };
        let lan = self.lan();
        let hits: Vec<(&String, &Seen)> =
            lan.seen.iter().filter(|(k, _)| k.starts_with(&p)).collect();
        match hits.as_slice() {
            [] => None,
            [(k, s)] => s.addrs.first().map(|a| Ok(format!("httpkey://{a}/{k}/"))),
            _ => Some(Err(format!(
                "{prefix:?} matches several nearby nodes: give more of the key"
            ))),
        }
    }
}

/// Announces the first peer listener and browses until shutdown.
pub async fn run(
    pairing: Arc<Pairing>,
    listener: SocketAddr,
    rotate_every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let daemon = match ServiceDaemon::new() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "LAN discovery cannot start");
            return;
        }
    };
    let events = match daemon.browse(SERVICE) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "LAN discovery cannot browse");
            return;
        }
    };
    {
        let mut l = pairing.lan();
        l.on = true;
        l.started = Some(Instant::now());
    }
    let probes = Arc::new(Semaphore::new(4));
    let mut own: Option<String> = None;
    let mut rotate = tokio::time::interval(rotate_every);
    tracing::info!(
        port = listener.port(),
        rotate_s = rotate_every.as_secs(),
        "LAN discovery on"
    );
    loop {
        tokio::select! {
            _ = rotate.tick() => {
                if let Some(old) = own.take() {
                    let _ = daemon.unregister(&old);
                }
                match announce(&daemon, listener) {
                    Ok(name) => {
                        tracing::debug!(%name, "announced on the LAN");
                        own = Some(name)
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot announce on the LAN"),
                }
            }
            ev = events.recv_async() => {
                let Ok(ev) = ev else {
                    tracing::debug!("browse channel closed");
                    break;
                };
                tracing::trace!(?ev, "mdns event");
                if let ServiceEvent::ServiceResolved(r) = ev {
                    if Some(r.get_fullname()) == own.as_deref() {
                        continue;
                    }
                    let port = r.get_port();
                    for ip in r.get_addresses() {
                        let ip: IpAddr = ip.to_ip_addr();
                        if ip.is_ipv6() {
                            continue; // link-local v6 would need its scope in every URL
                        }
                        probe(&pairing, &probes, SocketAddr::new(ip, port));
                    }
                }
            }
            _ = shutdown.wait_for(|v| *v) => {
                tracing::debug!("LAN discovery stopping");
                break;
            }
        }
    }
    if let Some(old) = own {
        let _ = daemon.unregister(&old);
    }
    let _ = daemon.shutdown();
}

/// Registers a fresh random name for the listener; returns its full name.
fn announce(daemon: &ServiceDaemon, listener: SocketAddr) -> Result<String, String> {
    let name = thali_db::random_hex(8);
    let host = format!("{name}.local.");
    let props: HashMap<String, String> = HashMap::new();
    let info = if listener.ip().is_unspecified() {
        ServiceInfo::new(SERVICE, &name, &host, "", listener.port(), props)
            .map(ServiceInfo::enable_addr_auto)
    } else {
        ServiceInfo::new(SERVICE, &name, &host, listener.ip(), listener.port(), props)
    }
    .map_err(|e| e.to_string())?;
    let full = info.get_fullname().to_string();
    daemon.register(info).map_err(|e| e.to_string())?;
    Ok(full)
}

/// Learns the key at `addr` in the background, unless it was probed moments ago.
fn probe(pairing: &Arc<Pairing>, probes: &Arc<Semaphore>, addr: SocketAddr) {
    {
        let mut l = pairing.lan();
        if l.probed.get(&addr).is_some_and(|t| t.elapsed() < REPROBE) {
            // Seen again: it is still there.
            let now = thali_sys::clock::unix_now();
            for s in l.seen.values_mut().filter(|s| s.addrs.contains(&addr)) {
                s.last = now;
                s.last_at = Instant::now();
            }
            return;
        }
        l.probed.retain(|_, t| t.elapsed() < REPROBE);
        if l.probed.len() >= MAX_SEEN {
            return;
        }
        l.probed.insert(addr, Instant::now());
    }
    let Ok(permit) = probes.clone().try_acquire_owned() else {
        return;
    };
    let pairing = pairing.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let key = match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(tcp)) => thali_peer::tls::probe_key(&pairing.identity, tcp, PROBE_TIMEOUT).await,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".into()),
        };
        let key = match key {
            Ok(k) => thali_peer::key_id(&k),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "discovered address did not answer as a node");
                return;
            }
        };
        if key == pairing.identity.key_id() {
            return;
        }
        let now = thali_sys::clock::unix_now();
        let mut l = pairing.lan();
        let after = l.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        if !l.seen.contains_key(&key) && l.seen.len() >= MAX_SEEN {
            return;
        }
        let s = l.seen.entry(key.clone()).or_insert_with(|| {
            tracing::info!(peer = %key, %addr, "node discovered on the LAN");
            Seen {
                addrs: Vec::new(),
                first: now,
                last: now,
                last_at: Instant::now(),
                after,
            }
        });
        if !s.addrs.contains(&addr) {
            s.addrs.insert(0, addr);
            s.addrs.truncate(4);
        }
        s.last = now;
        s.last_at = Instant::now();
    });
}
