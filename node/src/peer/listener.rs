//! The peer acceptor: TLS 1.3 with a required, self-signed client certificate. Each accepted
//! connection, whether it came from a TCP listener or an onion service stream, is served by the
//! same router as loopback, with the client's key attached to every request; the router's single
//! authorization point does the rest.

use super::identity::key_id;
use super::tls::cert_key;
use axum::Router;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::identity::PeerKeyId;

/// Time to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to send each request's headers (the first one included) once TLS is up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections of one address that may be in their handshake at once; a further one from that
/// address replaces the oldest.
const PENDING_PER_ADDRESS: usize = 32;

/// Is this key named by some database's `_security`?
pub type KnownKeys = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Connections still in their TLS handshake, oldest first. When the cap (overall or for one
/// address) is reached, the oldest is dropped to make room: a flood of connections that never
/// finish TLS costs the flooder its own older connections, while a real peer's handshake, which
/// takes milliseconds, completes.
struct Pending {
    next: u64,
    order: VecDeque<(u64, String, oneshot::Sender<()>)>,
    cap: usize,
}

impl Pending {
    fn admit(&mut self, addr: &str) -> (u64, oneshot::Receiver<()>) {
        let same = self.order.iter().filter(|(_, a, _)| a == addr).count();
        let victim = if same >= PENDING_PER_ADDRESS {
            self.order.iter().position(|(_, a, _)| a == addr)
        } else if self.order.len() >= self.cap {
            Some(0)
        } else {
            None
        };
        if let Some(i) = victim {
            if let Some((_, a, cancel)) = self.order.remove(i) {
                tracing::debug!(addr = %a, "dropping the oldest pending handshake to make room");
                let _ = cancel.send(());
            }
        }
        let (tx, rx) = oneshot::channel();
        self.next += 1;
        self.order.push_back((self.next, addr.to_string(), tx));
        (self.next, rx)
    }

    fn done(&mut self, id: u64) {
        if let Some(i) = self.order.iter().position(|(n, _, _)| *n == id) {
            self.order.remove(i);
        }
    }
}

/// Everything needed to serve one incoming peer connection; cheap to clone. All transports
/// share the limits: handshakes in progress (`Pending`), then a slot by who the key is: peers
/// some `_security` names have slots strangers cannot take, and each stranger key few.
#[derive(Clone)]
pub struct PeerAcceptor {
    tls: TlsAcceptor,
    app: Router,
    header_timeout: Duration,
    pending: Arc<Mutex<Pending>>,
    known_slots: Arc<Semaphore>,
    stranger_slots: Arc<Semaphore>,
    per_stranger: Arc<Mutex<HashMap<String, usize>>>,
    is_known: KnownKeys,
}

/// Connections one unknown key may hold.
const PER_STRANGER: usize = 4;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PeerAcceptor {
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        app: Router,
        header_timeout: Duration,
        max_connections: usize,
        is_known: KnownKeys,
    ) -> PeerAcceptor {
        let max = max_connections.max(4);
        let strangers = (max / 8).max(1);
        PeerAcceptor {
            tls: TlsAcceptor::from(config),
            app,
            header_timeout: header_timeout.min(HEADER_TIMEOUT),
            pending: Arc::new(Mutex::new(Pending {
                next: 0,
                order: VecDeque::new(),
                cap: (max / 2).max(1),
            })),
            known_slots: Arc::new(Semaphore::new(max - strangers)),
            stranger_slots: Arc::new(Semaphore::new(strangers)),
            per_stranger: Arc::new(Mutex::new(HashMap::new())),
            is_known,
        }
    }

    /// Serves `stream` in its own task. `from` is `ip:port` (TCP) or a transport name (onion);
    /// its address part is what the per-address handshake cap counts.
    pub fn accept<S>(&self, stream: S, from: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = match from.parse::<std::net::SocketAddr>() {
            Ok(a) => a.ip().to_string(),
            Err(_) => from.clone(),
        };
        let (id, evicted) = lock(&self.pending).admit(&addr);
        let this = self.clone();
        let span = tracing::debug_span!("peer_conn", %from);
        tokio::spawn(
            async move {
                let tls = tokio::select! {
                    _ = evicted => {
                        tracing::debug!(%from, "peer handshake dropped for a newer connection");
                        return;
                    }
                    r = tokio::time::timeout(HANDSHAKE_TIMEOUT, this.tls.accept(stream)) => r,
                };
                lock(&this.pending).done(id);
                let tls = match tls {
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
                this.serve_tls(tls, &from).await;
            }
            .instrument(span),
        );
    }

    async fn serve_tls<S>(self, tls: tokio_rustls::server::TlsStream<S>, from: &str)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(key) = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| cert_key(c))
        else {
            return;
        };
        let key = key_id(&key);
        let known = tokio::task::block_in_place(|| (self.is_known)(&key));
        let slots = if known {
            &self.known_slots
        } else {
            &self.stranger_slots
        };
        let Ok(_permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%from, %key, known, "peer connection refused: too many connections");
            return;
        };
        let _stranger = if known {
            None
        } else {
            let mut per = lock(&self.per_stranger);
            let n = per.entry(key.clone()).or_insert(0);
            if *n >= PER_STRANGER {
                tracing::debug!(%from, %key, "peer connection refused: too many for this key");
                return;
            }
            *n += 1;
            Some(StrangerSlot(self.per_stranger.clone(), key.clone()))
        };
        let principal = PeerKeyId(key);
        tracing::debug!(%from, key = %principal.0, known, "peer connected");
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

/// A stranger key's connection count, given back when the connection ends.
struct StrangerSlot(Arc<Mutex<HashMap<String, usize>>>, String);

impl Drop for StrangerSlot {
    fn drop(&mut self) {
        let mut per = lock(&self.0);
        if let Some(n) = per.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.1);
            }
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
                Ok((tcp, addr)) => {
                    // Streamed answers end in a small write: with Nagle on it waits for the
                    // peer's delayed ACK, 40 ms per `_bulk_get`.
                    let _ = tcp.set_nodelay(true);
                    acceptor.accept(tcp, addr.to_string())
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
