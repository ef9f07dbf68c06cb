//! The peer acceptor: TLS 1.3 with a required, self-signed client certificate. Each accepted
//! connection, whether it came from a TCP listener or an onion service stream, is served by the
//! same router as loopback, with the client's key attached to every request; the router's single
//! authorization point does the rest.

use super::identity::key_id;
use super::tls::cert_key;
use axum::Router;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

/// Attached to requests that arrived over the peer listener: the client's key id.
#[derive(Clone, Debug)]
pub struct PeerKeyId(pub String);

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything needed to serve one incoming peer connection; cheap to clone. All transports
/// share one connection limit.
#[derive(Clone)]
pub struct PeerAcceptor {
    tls: TlsAcceptor,
    app: Router,
    header_timeout: Duration,
    permits: Arc<Semaphore>,
}

impl PeerAcceptor {
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        app: Router,
        header_timeout: Duration,
        max_connections: usize,
    ) -> PeerAcceptor {
        PeerAcceptor {
            tls: TlsAcceptor::from(config),
            app,
            header_timeout,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
        }
    }

    /// Serves `stream` in its own task. Past the connection limit the stream is closed at
    /// once, so a flood of (possibly unauthenticated) peers cannot exhaust the node.
    pub fn accept<S>(&self, stream: S, from: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!(%from, "peer connection refused: too many connections");
            return;
        };
        let this = self.clone();
        let span = tracing::debug_span!("peer_conn", %from);
        tokio::spawn(
            async move {
                this.connection(stream, &from).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    async fn connection<S>(self, stream: S, from: &str)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%from, error = %e, "peer handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%from, "peer handshake timed out");
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
        tracing::debug!(%from, key = %principal.0, "peer connected");
        let app = self.app;
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(principal.clone());
                let app = app.clone();
                async move { tower::ServiceExt::oneshot(app, req).await }
            });
        // A peer that stops sending headers (or idles between requests) is dropped.
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .serve_connection(TokioIo::new(tls), svc)
            .await
        {
            tracing::debug!(%from, error = %e, "peer connection ended with an error");
        }
    }
}

/// Accepts TCP connections on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    acceptor: PeerAcceptor,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => acceptor.accept(tcp, addr.to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = async { let _ = shutdown.wait_for(|v| *v).await; } => return,
        }
    }
}
