//! The peer acceptor: TLS 1.3 with a required, self-signed client certificate. Each accepted
//! connection, whether it came from a TCP listener or an onion service stream, is served by the
//! same router as loopback, with the client's key attached to every request; the router's single
//! authorization point does the rest.

use super::identity::key_id;
use super::tls::cert_key;
use axum::Router;
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thali_sys::sync::lock;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use super::guard::{PerKey, Stall};
use super::identity::{PeerAddr, PeerKeyId, Stranger};

/// Time to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to send each request's headers (the first one included) once TLS is up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections of one address that may be in their handshake at once; a further one from that
/// address replaces the oldest.
const PENDING_PER_ADDRESS: usize = 32;
/// Stranger connections of one address at once; a further one replaces that address's oldest.
const STRANGERS_PER_ADDRESS: usize = 16;

/// Is this key named by some database's `_security`?
pub type KnownKeys = Arc<
    dyn Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

/// Connections that may be dropped to make room, oldest first: those still in their TLS
/// handshake, and strangers' connections. When the cap (overall or for one address) is
/// reached, the oldest is dropped: a flood of connections that never finish TLS, or of
/// strangers that stall, costs the flooder its own older connections, while a real peer's
/// handshake or pairing message, which takes milliseconds, completes.
struct Pending {
    next: u64,
    order: VecDeque<(u64, String, oneshot::Sender<()>)>,
    cap: usize,
    per_address: usize,
}

impl Pending {
    fn new(cap: usize, per_address: usize) -> Pending {
        Pending {
            next: 0,
            order: VecDeque::new(),
            cap: cap.max(1),
            per_address,
        }
    }

    fn admit(&mut self, addr: &str) -> (u64, oneshot::Receiver<()>) {
        let same = self.order.iter().filter(|(_, a, _)| a == addr).count();
        let victim = if same >= self.per_address {
            self.order.iter().position(|(_, a, _)| a == addr)
        } else if self.order.len() >= self.cap {
            Some(0)
        } else {
            None
        };
        if let Some(i) = victim {
            if let Some((_, a, cancel)) = self.order.remove(i) {
                tracing::debug!(addr = %a, "dropping the oldest connection to make room");
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
    /// Strangers' connections: a new one replaces the oldest when full, so stalled strangers
    /// never keep a real guest out.
    strangers: Arc<Mutex<Pending>>,
    per_key: Arc<PerKey>,
    /// How long a write may wait for the peer to read (`--request-timeout`).
    stall: Duration,
    is_known: KnownKeys,
}

impl PeerAcceptor {
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        app: Router,
        request_timeout: Duration,
        max_connections: usize,
        peer_rate: u32,
        is_known: KnownKeys,
    ) -> PeerAcceptor {
        let max = max_connections.max(4);
        let strangers = (max / 8).max(1);
        // A quarter of the known slots per key: one peer's feeds cannot take every slot.
        let per_known = (max - strangers) / 4;
        PeerAcceptor {
            tls: TlsAcceptor::from(config),
            app,
            header_timeout: request_timeout.min(HEADER_TIMEOUT),
            pending: Arc::new(Mutex::new(Pending::new(max / 2, PENDING_PER_ADDRESS))),
            known_slots: Arc::new(Semaphore::new(max - strangers)),
            strangers: Arc::new(Mutex::new(Pending::new(strangers, STRANGERS_PER_ADDRESS))),
            per_key: PerKey::new(per_known, peer_rate),
            stall: request_timeout,
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
                this.serve_tls(tls, &from, &addr).await;
            }
            .instrument(span),
        );
    }

    async fn serve_tls<S>(self, tls: tokio_rustls::server::TlsStream<S>, from: &str, addr: &str)
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
        let known = (self.is_known)(key.clone()).await;
        let Some(_key_slot) = self.per_key.connect(&key, known) else {
            tracing::debug!(%from, %key, known, "peer connection refused: too many for this key");
            return;
        };
        let (_permit, evicted) = if known {
            let Ok(p) = self.known_slots.clone().try_acquire_owned() else {
                tracing::warn!(%from, %key, "peer connection refused: too many connections");
                return;
            };
            (Some(p), None)
        } else {
            let (id, evicted) = lock(&self.strangers).admit(addr);
            (
                None,
                Some(StrangerSlot(self.strangers.clone(), id, evicted)),
            )
        };
        let principal = PeerKeyId(key);
        let ip = addr.parse::<std::net::IpAddr>().ok().map(PeerAddr);
        tracing::debug!(%from, key = %principal.0, known, "peer connected");
        let app = self.app;
        let per_key = self.per_key.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let allowed = per_key.request(&principal.0);
                if !allowed {
                    // Refused before the router, so counted here.
                    thali_sys::metrics::get().request(req.method().as_str(), 429, 0.0);
                }
                req.extensions_mut().insert(principal.clone());
                if !known {
                    req.extensions_mut().insert(Stranger);
                }
                if let Some(ip) = &ip {
                    req.extensions_mut().insert(ip.clone());
                }
                let app = app.clone();
                async move {
                    if !allowed {
                        return Ok(too_many_requests());
                    }
                    tower::ServiceExt::oneshot(app, req).await
                }
            });
        // A peer that stops sending headers (or idles between requests) is dropped.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .serve_connection(TokioIo::new(Stall::new(tls, self.stall)), svc);
        let result = match evicted {
            None => conn.await,
            Some(mut slot) => tokio::select! {
                r = conn => r,
                _ = &mut slot.2 => {
                    tracing::debug!(%from, "stranger connection dropped for a newer one");
                    Ok(())
                }
            },
        };
        if let Err(e) = result {
            tracing::debug!(%from, error = %e, "peer connection ended with an error");
        }
    }
}

/// A stranger's place in `PeerAcceptor::strangers`, given back when its connection ends.
struct StrangerSlot(Arc<Mutex<Pending>>, u64, oneshot::Receiver<()>);

impl Drop for StrangerSlot {
    fn drop(&mut self) {
        lock(&self.0).done(self.1);
    }
}

/// A key past its request rate (`--peer-rate`): CouchDB-shaped, with when to come back.
fn too_many_requests() -> axum::response::Response {
    let body = serde_json::json!({
        "error": "too_many_requests",
        "reason": "this key sends requests faster than the node serves one peer (--peer-rate)",
    });
    let mut r = axum::response::Response::new(axum::body::Body::from(body.to_string()));
    *r.status_mut() = axum::http::StatusCode::TOO_MANY_REQUESTS;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        axum::http::HeaderValue::from_static("application/json"),
    );
    h.insert("retry-after", axum::http::HeaderValue::from_static("1"));
    r
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
