//! Outgoing connections: TCP for ordinary hosts, Tor for `.onion` hosts (never the system
//! resolver), with mutual TLS on top for httpkey URLs. The replicator's one way out.

use super::{HttpKeyUrl, Identity};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// A connected stream of either kind.
pub type Stream = Box<dyn Io>;

/// Whether `host` is an onion address (reached through Tor only, never resolved).
pub fn is_onion(host: &str) -> bool {
    host.trim_end_matches('.')
        .to_ascii_lowercase()
        .ends_with(".onion")
}

pub type Connecting<'a> = Pin<Box<dyn Future<Output = Result<Stream, String>> + Send + 'a>>;

/// How onion hosts are reached: the `tor` module implements it above this layer.
pub trait OnionConnect: Send + Sync {
    fn connect<'a>(&'a self, host: &'a str, port: u16, timeout: Duration) -> Connecting<'a>;
}

pub struct Dialer {
    pub identity: Arc<Identity>,
    /// Present when the node runs with `--tor`.
    pub tor: Option<Arc<dyn OnionConnect>>,
}

impl Dialer {
    pub fn new(identity: Arc<Identity>, tor: Option<Arc<dyn OnionConnect>>) -> Arc<Dialer> {
        Arc::new(Dialer { identity, tor })
    }

    /// A byte stream to `host:port`; `timeout` bounds each step.
    pub async fn stream(&self, host: &str, port: u16, timeout: Duration) -> Result<Stream, String> {
        if is_onion(host) {
            let tor = self.tor.as_ref().ok_or_else(|| {
                format!("{host} is an onion address: it can only be reached by a node started with --tor")
            })?;
            return tor.connect(host, port, timeout).await;
        }
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        Ok(Box::new(tcp))
    }

    /// A mutual-TLS connection to an httpkey URL's host, the URL's key pinned.
    pub async fn httpkey(
        &self,
        url: &HttpKeyUrl,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<Stream>, String> {
        let stream = self.stream(&url.host, url.port, timeout).await?;
        super::tls::connect(&self.identity, url, stream, timeout).await
    }
}
