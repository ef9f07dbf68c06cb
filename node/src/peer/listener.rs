//! The peer listener: TLS 1.3 with a required, self-signed client certificate. Each accepted
//! connection is served by the same router as loopback, with the client's key attached to every
//! request; the router's single authorization point does the rest.

use super::identity::key_id;
use super::tls::cert_key;
use axum::Router;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

/// Attached to requests that arrived over the peer listener: the client's key id.
#[derive(Clone, Debug)]
pub struct PeerKeyId(pub String);

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: Router,
    header_timeout: Duration,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(config);
    // Each connection holds a permit; past the limit new connections are closed at once, so a
    // flood of (possibly unauthenticated) peers cannot exhaust the node.
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        tracing::warn!(%addr, max_connections, "peer connection refused: too many connections");
                        drop(tcp);
                        continue;
                    };
                    let (acceptor, app) = (acceptor.clone(), app.clone());
                    let span = tracing::debug_span!("peer_conn", %addr);
                    tokio::spawn(
                        async move {
                            connection(tcp, addr, acceptor, app, header_timeout).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = async { let _ = shutdown.wait_for(|v| *v).await; } => return,
        }
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    header_timeout: Duration,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "peer handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "peer handshake timed out");
            return;
        }
    };
    let Some(key) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_key(c))
    else {
        return;
    };
    let principal = PeerKeyId(key_id(&key));
    tracing::debug!(%addr, key = %principal.0, "peer connected");
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(principal.clone());
        let app = app.clone();
        async move { tower::ServiceExt::oneshot(app, req).await }
    });
    // A peer that stops sending headers (or idles between requests) is dropped.
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(tls), svc)
        .await
    {
        tracing::debug!(%addr, error = %e, "peer connection ended with an error");
    }
}
