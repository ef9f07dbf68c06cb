//! Tor, embedded with arti. With `--tor` the node bootstraps one `TorClient` whose state lives in
//! `DIR/tor/` (so the onion service's identity key, and with it the `.onion` address, survives
//! restarts), launches an onion service and hands every incoming stream to the same mutual-TLS
//! peer acceptor as the TCP listener. The replicator dials `.onion` hosts through the same
//! client ([`Tor::connect`]); nothing here ever uses the system resolver.
//!
//! The onion address only says which host answered; the TLS key inside still decides who the
//! peer is and what it may do.

mod config;
mod discovery;
mod service;

pub use config::TorOptions;

use arti_client::{DataStream, TorClient};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

type Client = TorClient<tor_rtcompat::PreferredRuntime>;

/// What the onion service is doing, as reported in `GET /` and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Building the Tor client: loading or fetching the directory.
    Bootstrapping,
    /// Bootstrapped; the service is choosing introduction points and uploading descriptors.
    Publishing,
    /// arti reports the descriptor published and introduction points established.
    Reachable,
    /// arti reports a problem (no descriptor upload, lost introduction points); it retries.
    Degraded,
    /// The client or the service could not start; `error` says why.
    Failed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Bootstrapping => "bootstrapping",
            Phase::Publishing => "publishing",
            Phase::Reachable => "reachable",
            Phase::Degraded => "degraded",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug)]
struct Status {
    phase: Phase,
    onion: Option<String>,
    /// arti's own state word for the service (it flips often on small test networks).
    service_state: Option<String>,
    bootstrap: String,
    bootstrapped_after: Option<Duration>,
    first_reachable_after: Option<Duration>,
    error: Option<String>,
    /// With restricted discovery: how many client keys the published service lists.
    allowed_clients: usize,
}

/// The node's Tor presence: the client (once created) and the onion service's status.
pub struct Tor {
    options: TorOptions,
    /// This node's Ed25519 seed: its discovery key for services in restricted mode.
    seed: Option<[u8; 32]>,
    own_key: [u8; 32],
    /// Onion hosts this client already holds a discovery key for.
    authorized: Mutex<std::collections::HashSet<String>>,
    state_dir: PathBuf,
    started: Instant,
    client: watch::Sender<Option<Arc<Client>>>,
    status: Mutex<Status>,
}

/// `DIR/tor/<this>`: `<onion>:<port>` of the last launch.
pub const ADDRESS_FILE: &str = "onion-address";

/// The onion host and port of the node's last launch, if it ever ran with `--tor`.
pub fn last_address(data: &Path) -> Option<String> {
    let s = std::fs::read_to_string(data.join("tor").join(ADDRESS_FILE)).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Every onion connect is bounded: arti occasionally never answers one (seen on test networks).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(45);

impl Tor {
    pub fn new(data: &Path, options: TorOptions, identity: &thali_peer::Identity) -> Arc<Tor> {
        Arc::new(Tor {
            options,
            seed: identity.ed25519_seed(),
            own_key: *identity.public_key(),
            authorized: Mutex::new(Default::default()),
            state_dir: data.join("tor"),
            started: Instant::now(),
            client: watch::channel(None).0,
            status: Mutex::new(Status {
                phase: Phase::Bootstrapping,
                onion: None,
                service_state: None,
                bootstrap: "not started".into(),
                bootstrapped_after: None,
                first_reachable_after: None,
                error: None,
                allowed_clients: 0,
            }),
        })
    }

    pub fn port(&self) -> u16 {
        self.options.port
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        thali_sys::sync::lock(&self.status)
    }

    /// The `.onion` host name, once the service has been launched (or from the last run).
    pub fn onion(&self) -> Option<String> {
        self.status().onion.clone()
    }

    /// The status object of `GET /`.
    pub fn status_json(&self, key_id: &str) -> Value {
        let s = self.status();
        let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
        json!({
            "state": s.phase.as_str(),
            "restricted_discovery": self.options.restricted.then_some(s.allowed_clients),
            "onion": s.onion,
            "port": self.options.port,
            "url": s.onion.as_ref().map(|o| format!("httpkey://{o}:{}/{key_id}/", self.options.port)),
            "service_state": s.service_state,
            "bootstrap": s.bootstrap,
            "bootstrapped_after_s": secs(s.bootstrapped_after),
            "first_reachable_after_s": secs(s.first_reachable_after),
            "error": s.error,
        })
    }

    fn set_phase(&self, phase: Phase) {
        let mut s = self.status();
        if s.phase != phase {
            tracing::info!(from = s.phase.as_str(), to = phase.as_str(), onion = ?s.onion, "onion service state");
            s.phase = phase;
            if phase == Phase::Reachable && s.first_reachable_after.is_none() {
                s.first_reachable_after = Some(self.started.elapsed());
            }
        }
    }

    /// Opens a stream to `host:port` (a `.onion` host) through Tor. Waits up to `timeout` for
    /// the client to bootstrap, then up to `timeout` for the connect itself.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<DataStream, String> {
        {
            let s = self.status();
            if s.phase == Phase::Failed {
                return Err(format!(
                    "Tor is not running: {}",
                    s.error.as_deref().unwrap_or("it failed to start")
                ));
            }
        }
        let mut rx = self.client.subscribe();
        let client = tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
            .await
            .map_err(|_| format!("Tor is still bootstrapping ({})", self.status().bootstrap))?
            .map_err(|_| "Tor is shutting down".to_string())?
            .clone()
            .ok_or("Tor client missing")?;
        self.authorize(&client, host);
        let started = Instant::now();
        let stream = tokio::time::timeout(timeout, client.connect((host, port)))
            .await
            .map_err(|_| format!("connecting to {host}:{port} over Tor timed out"))?
            .map_err(|e| format!("connecting to {host}:{port} over Tor: {e}"))?;
        tracing::debug!(%host, port, ms = started.elapsed().as_millis() as u64, "onion stream open");
        Ok(stream)
    }
}

impl Tor {
    /// Gives arti this node's discovery key for `host`, so services in restricted discovery
    /// mode that list this node can be found (harmless for the others).
    fn authorize(&self, client: &Client, host: &str) {
        let Some(seed) = &self.seed else { return };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let mut done = thali_sys::sync::lock(&self.authorized);
        if done.contains(&host) {
            return;
        }
        let Ok(hsid) = host.parse::<arti_client::HsId>() else {
            return;
        };
        match client.insert_service_discovery_key(
            arti_client::KeystoreSelector::Primary,
            hsid,
            discovery::client_secret(seed),
        ) {
            Ok(_) => {
                done.insert(host);
            }
            Err(e) => tracing::warn!(%host, error = %e, "cannot store the discovery key"),
        }
    }
}

/// True for hosts that must be reached through Tor.
pub use thali_peer::dial::is_onion;

impl thali_peer::dial::OnionConnect for Tor {
    fn connect<'a>(
        &'a self,
        host: &'a str,
        port: u16,
        timeout: Duration,
    ) -> thali_peer::dial::Connecting<'a> {
        Box::pin(async move {
            let s: thali_peer::dial::Stream =
                Box::new(Tor::connect(self, host, port, timeout).await?);
            Ok(s)
        })
    }
}

pub use service::run;

#[cfg(test)]
mod tests {
    #[test]
    fn onion_hosts() {
        assert!(super::is_onion("abc.onion"));
        assert!(super::is_onion("abc.ONION."));
        assert!(!super::is_onion("onion"));
        assert!(!super::is_onion("example.org"));
    }
}
