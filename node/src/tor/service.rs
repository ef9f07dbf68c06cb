//! The Tor task: bootstrap the client, launch the onion service, feed its streams to the peer
//! acceptor, and follow the service's status until shutdown.

use super::{config, Phase, Tor};
use crate::peer::listener::PeerAcceptor;
use arti_client::config::onion_service::OnionServiceConfigBuilder;
use arti_client::TorClient;
use futures::StreamExt;
use safelog::DisplayRedacted as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tor_cell::relaycell::msg::Connected;
use tor_hsservice::status::State;
use tor_proto::stream::IncomingStreamRequest;
use tracing::Instrument;

/// A stream that is not accepted within this time is dropped (the peer's circuit may be gone).
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until `shutdown`. Failures to start are reported in the status and the log; the node
/// keeps serving its other listeners.
pub async fn run(tor: Arc<Tor>, acceptor: PeerAcceptor, mut shutdown: watch::Receiver<bool>) {
    let span = tracing::info_span!("tor");
    // Bootstrapping can take long; shutdown must not wait for it.
    let mut stop = shutdown.clone();
    let work = async {
        if let Err(e) = serve(&tor, acceptor, &mut shutdown).await {
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

    let svc_cfg = OnionServiceConfigBuilder::default()
        .nickname(
            tor.options
                .nickname
                .parse()
                .map_err(|e| format!("bad onion service nickname: {e}"))?,
        )
        .build()
        .map_err(|e| format!("onion service configuration: {e}"))?;
    let (service, requests) = client
        .launch_onion_service(svc_cfg)
        .map_err(|e| format!("launching the onion service: {e}"))?
        .ok_or("the onion service is disabled in the Tor configuration")?;
    let onion = service
        .onion_address()
        .ok_or("the onion service has no address")?
        .display_unredacted()
        .to_string();
    tracing::info!(%onion, port = tor.options.port, "onion service launched");
    // Kept for `thali id` while the node is stopped: the address is stable across restarts.
    let _ = std::fs::write(
        tor.state_dir.join(super::ADDRESS_FILE),
        format!("{onion}:{}", tor.options.port),
    );
    tor.status().onion = Some(onion);
    tor.set_phase(Phase::Publishing);

    let mut events = service.status_events();
    let mut streams = Box::pin(tor_hsservice::handle_rend_requests(requests));
    let port = tor.options.port;
    loop {
        tokio::select! {
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
            }
            status = events.next() => {
                let Some(status) = status else { continue };
                let state = status.state();
                let phase = match state {
                    State::Running | State::DegradedReachable => Phase::Reachable,
                    State::Bootstrapping => Phase::Publishing,
                    // Reported before the service's tasks start; a real shutdown ends the
                    // stream of requests instead.
                    State::Shutdown => continue,
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
            _ = shutdown.wait_for(|v| *v) => return Ok(()),
        }
    }
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
