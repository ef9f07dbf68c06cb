//! The Tor task: bootstrap the client, launch the onion service, feed its streams to the peer
//! acceptor, and follow the service's status until shutdown.

use super::{config, discovery, Phase, Tor};
use arti_client::config::onion_service::OnionServiceConfigBuilder;
use arti_client::TorClient;
use futures::StreamExt;
use safelog::DisplayRedacted as _;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use thali_db::Node;
use thali_peer::listener::PeerAcceptor;
use tokio::sync::watch;
use tor_cell::relaycell::msg::Connected;
use tor_hsservice::config::restricted_discovery::HsClientNickname;
use tor_hsservice::status::State;
use tor_proto::stream::IncomingStreamRequest;
use tracing::Instrument;

/// A stream that is not accepted within this time is dropped (the peer's circuit may be gone).
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until `shutdown`. Failures to start are reported in the status and the log; the node
/// keeps serving its other listeners.
pub async fn run(
    tor: Arc<Tor>,
    node: Arc<Node>,
    acceptor: PeerAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("tor");
    // Bootstrapping can take long; shutdown must not wait for it.
    let mut stop = shutdown.clone();
    let work = async {
        if let Err(e) = serve(&tor, &node, acceptor, &mut shutdown).await {
            tracing::error!(error = %e, "Tor onion service failed");
            let mut s = tor.status();
            s.error = Some(e);
            drop(s);
            tor.set_phase(Phase::Failed);
        }
    };
    tokio::select! {
        _ = work.instrument(span) => {}
        _ = async { let _ = stop.wait_for(|v| *v).await; } => {}
    }
    // Dropping the client and the service (in `serve`) stops publishing.
    tor.client.send_replace(None);
}

async fn serve(
    tor: &Arc<Tor>,
    node: &Arc<Node>,
    acceptor: PeerAcceptor,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    std::fs::create_dir_all(&tor.state_dir)
        .map_err(|e| format!("creating {}: {e}", tor.state_dir.display()))?;
    restrict(&tor.state_dir);
    // arti's rustls build uses the process-wide provider; the node's TLS uses ring too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = config::client_config(&tor.options, &tor.state_dir)?;
    let client = TorClient::builder()
        .config(cfg)
        .create_unbootstrapped_async()
        .await
        .map_err(|e| format!("creating the Tor client: {e}"))?;
    tokio::spawn(follow_bootstrap(tor.clone(), client.clone()));
    client
        .bootstrap()
        .await
        .map_err(|e| format!("bootstrapping Tor: {e}"))?;
    {
        let mut s = tor.status();
        s.bootstrapped_after = Some(tor.started.elapsed());
        tracing::info!(
            secs = s.bootstrapped_after.map(|d| d.as_secs_f64()),
            "Tor bootstrapped"
        );
    }
    tor.client.send_replace(Some(client.clone()));

    let mut allowed = allowed_clients(tor, node).await;
    loop {
        let (service, requests) = launch(tor, &client, &allowed).await?;
        let mut events = service.status_events();
        let mut streams = Box::pin(tor_hsservice::handle_rend_requests(requests));
        let mut recheck = tokio::time::interval(RECHECK);
        let port = tor.options.port;
        loop {
            let recheck_due = tokio::select! {
                req = streams.next() => {
                    let Some(req) = req else { return Err("the onion service stopped".into()) };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let wanted = matches!(req.request(), IncomingStreamRequest::Begin(b) if b.port() == port);
                        if !wanted {
                            // Only the peer port exists; anything else closes the circuit.
                            let _ = req.shutdown_circuit();
                            return;
                        }
                        match tokio::time::timeout(ACCEPT_TIMEOUT, req.accept(Connected::new_empty())).await {
                            Ok(Ok(stream)) => acceptor.accept(stream, "onion".into()),
                            Ok(Err(e)) => tracing::debug!(error = %e, "onion stream not accepted"),
                            Err(_) => tracing::debug!("onion stream accept timed out"),
                        }
                    });
                    false
                }
                status = events.next() => {
                    if let Some(status) = status {
                        follow_status(tor, &status);
                    }
                    false
                }
                _ = recheck.tick(), if tor.options.restricted => true,
                _ = shutdown.wait_for(|v| *v) => return Ok(()),
            };
            // Outside the `select!`: its futures (the shutdown watch's guard) are gone here.
            if recheck_due {
                let now = allowed_clients(tor, node).await;
                if now != allowed {
                    tracing::info!(before = allowed.len(), after = now.len(), "peer keys changed: relaunching the onion service with the new discovery list");
                    allowed = now;
                    break;
                }
            }
        }
        // arti reads restricted-discovery keys only at launch: stop this service, start anew.
        drop(streams);
        drop(service);
    }
}

/// How often restricted discovery rereads the peer keys from `_security`.
const RECHECK: Duration = Duration::from_secs(10);

/// Launches the service (same nickname, so the same key and address) with `allowed` as the
/// restricted-discovery list when that mode is on.
async fn launch(
    tor: &Arc<Tor>,
    client: &Arc<super::Client>,
    allowed: &BTreeSet<[u8; 32]>,
) -> Result<
    (
        Arc<tor_hsservice::RunningOnionService>,
        impl futures::Stream<Item = tor_hsservice::RendRequest>,
    ),
    String,
> {
    let mut builder = OnionServiceConfigBuilder::default();
    builder.nickname(
        tor.options
            .nickname
            .parse()
            .map_err(|e| format!("bad onion service nickname: {e}"))?,
    );
    if tor.options.restricted {
        let rd = builder.restricted_discovery();
        rd.enabled(true);
        for key in allowed {
            let nick: HsClientNickname = format!("k{}", thali_peer::identity::base32(key))
                .parse()
                .map_err(|e| format!("client nickname: {e}"))?;
            if let Some(k) = discovery::client_key(key) {
                rd.static_keys().access().push((nick, k));
            }
        }
    }
    let svc_cfg = builder
        .build()
        .map_err(|e| format!("onion service configuration: {e}"))?;
    // After a relaunch the previous instance may hold its state lock for a moment.
    let mut attempt = 0;
    let (service, requests) = loop {
        match client.launch_onion_service(svc_cfg.clone()) {
            Ok(Some(launched)) => break launched,
            Ok(None) => return Err("the onion service is disabled in the Tor configuration".into()),
            Err(e) if attempt < 60 && e.to_string().contains("already in use") => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(format!("launching the onion service: {e}")),
        }
    };
    let onion = service
        .onion_address()
        .ok_or("the onion service has no address")?
        .display_unredacted()
        .to_string();
    tracing::info!(%onion, port = tor.options.port, restricted = tor.options.restricted, clients = allowed.len(), "onion service launched");
    // Kept for `thali id` while the node is stopped: the address is stable across restarts.
    let _ = std::fs::write(
        tor.state_dir.join(super::ADDRESS_FILE),
        format!("{onion}:{}", tor.options.port),
    );
    {
        let mut s = tor.status();
        s.onion = Some(onion);
        s.allowed_clients = allowed.len();
    }
    tor.set_phase(Phase::Publishing);
    Ok((service, requests))
}

fn follow_status(tor: &Tor, status: &tor_hsservice::status::OnionServiceStatus) {
    let state = status.state();
    let phase = match state {
        State::Running | State::DegradedReachable => Phase::Reachable,
        State::Bootstrapping => Phase::Publishing,
        // Reported before the service's tasks start; a real shutdown ends the stream of
        // requests instead.
        State::Shutdown => return,
        _ => Phase::Degraded,
    };
    let problem = status.current_problem().map(|p| format!("{p:?}"));
    {
        let mut s = tor.status();
        s.service_state = Some(format!("{state:?}"));
        s.error = problem.clone();
    }
    tracing::debug!(state = ?state, problem = ?problem, "onion service status");
    tor.set_phase(phase);
}

/// The peer keys any database's `_security` names (the node's own key included, so the list is
/// never empty): the clients restricted discovery lets find the service.
async fn allowed_clients(tor: &Tor, node: &Arc<Node>) -> BTreeSet<[u8; 32]> {
    let mut keys = BTreeSet::from([tor.own_key]);
    if !tor.options.restricted {
        return keys;
    }
    keys.extend(
        node.peer_keys()
            .await
            .iter()
            .filter_map(|n| thali_peer::parse_key_id(n).ok()),
    );
    keys
}

/// Copies bootstrap progress into the status until the client is ready (it holds the client,
/// so it must end).
async fn follow_bootstrap(tor: Arc<Tor>, client: Arc<super::Client>) {
    let mut events = client.bootstrap_events();
    while let Some(ev) = events.next().await {
        let text = ev.to_string();
        let done = ev.ready_for_traffic();
        {
            let mut s = tor.status();
            if s.bootstrap != text {
                tracing::debug!(status = %text, "Tor bootstrap");
                s.bootstrap = text;
            }
        }
        if done {
            break;
        }
    }
}

/// arti refuses state directories that others can write; the node's own is private.
fn restrict(dir: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
}
