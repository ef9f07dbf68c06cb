//! The HTTP client the replicator uses for remote endpoints: plain HTTP, HTTPS (web PKI roots)
//! and httpkey (mutual TLS with the node's key, the server's key pinned). Keep-alive connections
//! are pooled per endpoint. Requests that fail in transit or answer 5xx are retried with
//! exponential backoff; every other answer goes back to the caller.

use super::backoff::Backoff;
use super::error::{ReplError, ReplResult};
use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper::http::{HeaderName, HeaderValue, Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thali_peer::{Dialer, HttpKeyUrl};
use tokio::io::{AsyncRead, AsyncWrite};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one request may take (longpoll requests add their own timeout to this).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a streamed body may pause, either way, before the transfer is abandoned.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A request body: whole bytes, or a stream (an attachment on its way from source to target).
pub type ReqBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn whole(b: Bytes) -> ReqBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}
/// Largest answer read whole from a remote endpoint: what a hostile source can make the
/// replicator hold per request. A `_bulk_get` batch past it is asked for again in halves
/// (`endpoint.rs`); attachments above 64 KiB never travel inline (they stream).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// How an answer past `MAX_RESPONSE_BYTES` is reported (not retried: it would be as large).
pub const ANSWER_TOO_LARGE: &str = "the answer is larger than the replicator reads at once";

enum Transport {
    Http,
    Https(Arc<rustls::ClientConfig>, ServerName<'static>),
    HttpKey(HttpKeyUrl),
}

/// Retries per request unless the replication says otherwise.
const DEFAULT_RETRIES: u32 = 5;
/// Onion peers get more by default: new onion circuits fail now and then, and a service can be
/// unreachable for a minute or two after a descriptor period ends. With the backoff capped at
/// 10 s this is about four minutes of patience.
const ONION_RETRIES: u32 = 25;

pub struct Remote {
    addr: String,
    host: String,
    port: u16,
    dialer: Arc<Dialer>,
    host_header: HeaderValue,
    /// The database's path on the server, percent-encoded, without a trailing slash.
    base: String,
    transport: Transport,
    headers: Vec<(HeaderName, HeaderValue)>,
    pool: Mutex<Vec<SendRequest<ReqBody>>>,
    retries: u32,
    display: String,
    /// The most this client reads of one answer (`MAX_RESPONSE_BYTES` unless set lower).
    answer_limit: usize,
}

pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    pub fn json(&self) -> ReplResult<Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ReplError::Transient(format!(
                "HTTP {} answer is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            ))
        })
    }

    /// The peer's `{"error","reason"}` as one line.
    pub fn describe(&self) -> String {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(v) if v.get("error").is_some() => format!(
                "HTTP {}: {}: {}",
                self.status,
                v["error"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("")
            ),
            _ => format!(
                "HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
            ),
        }
    }
}

/// An endpoint's transport, host, port and database path.
type Endpoint = (Transport, String, u16, String);

/// Where an httpkey endpoint is: its transport, host, port and database path.
fn httpkey_endpoint(url: &str, display: &str) -> ReplResult<Endpoint> {
    let u = HttpKeyUrl::parse(url).map_err(ReplError::BadSpec)?;
    if u.db().is_none() {
        return Err(ReplError::BadSpec(format!(
            "{display} names no database after the key"
        )));
    }
    let (host, port, base) = (u.host.clone(), u.port, u.path());
    Ok((Transport::HttpKey(u), host, port, base))
}

/// Where an http(s) endpoint is; its credentials become an `Authorization` header in `extra`.
fn http_endpoint(
    url: &str,
    https: bool,
    display: &str,
    extra: &mut Vec<(HeaderName, HeaderValue)>,
) -> ReplResult<Endpoint> {
    let u = url::Url::parse(url).map_err(|e| ReplError::BadSpec(format!("{display}: {e}")))?;
    if u.query().is_some() || u.fragment().is_some() {
        return Err(ReplError::BadSpec(format!(
            "{display}: query strings are not allowed in a database URL"
        )));
    }
    let host = match u.host() {
        // Without brackets: `addr` below adds them.
        Some(url::Host::Ipv6(a)) => a.to_string(),
        Some(h) => h.to_string(),
        None => return Err(ReplError::BadSpec(format!("{display}: no host"))),
    };
    let port = u
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    if !u.username().is_empty() || u.password().is_some() {
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            dec(u.username()),
            dec(u.password().unwrap_or(""))
        ));
        extra.push((
            hyper::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|_| ReplError::BadSpec("bad credentials".into()))?,
        ));
    }
    // The path as sent (percent-encoding kept: `a%2Fb` is one database name).
    let path = u
        .path()
        .strip_prefix('/')
        .unwrap_or("")
        .trim_end_matches('/');
    if path.is_empty() {
        return Err(ReplError::BadSpec(format!("{display} names no database")));
    }
    let path = path.to_string();
    let transport = if https {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let cfg = rustls::ClientConfig::builder_with_provider(thali_peer::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ReplError::BadSpec(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(host.clone())
            .map_err(|_| ReplError::BadSpec(format!("bad host name {host:?}")))?;
        Transport::Https(Arc::new(cfg), name)
    } else {
        Transport::Http
    };
    Ok((transport, host, port, format!("/{path}")))
}

impl Remote {
    pub fn new(
        url: &str,
        headers: &Map<String, Value>,
        dialer: Arc<Dialer>,
        retries: Option<u32>,
        display: String,
    ) -> ReplResult<Remote> {
        let (scheme, _) = url
            .split_once("://")
            .ok_or_else(|| ReplError::BadSpec(format!("not a URL: {display}")))?;
        let mut extra = Vec::new();
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ReplError::BadSpec(format!("bad header name {k:?}")))?;
            let value = HeaderValue::from_str(v.as_str().unwrap_or(""))
                .map_err(|_| ReplError::BadSpec(format!("bad value for header {k:?}")))?;
            extra.push((name, value));
        }
        let (transport, host, port, base) = match scheme.to_ascii_lowercase().as_str() {
            "httpkey" => httpkey_endpoint(url, &display)?,
            s @ ("http" | "https") => http_endpoint(url, s == "https", &display, &mut extra)?,
            other => {
                return Err(ReplError::BadSpec(format!(
                    "unsupported URL scheme {other:?} (use http, https or httpkey)"
                )))
            }
        };
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        if thali_peer::dial::is_onion(&host) && dialer.tor.is_none() {
            return Err(ReplError::BadSpec(format!(
                "{display}: {host} is an onion address: only a node started with --tor can reach it"
            )));
        }
        let retries = retries.unwrap_or(if thali_peer::dial::is_onion(&host) {
            ONION_RETRIES
        } else {
            DEFAULT_RETRIES
        });
        Ok(Remote {
            host,
            port,
            dialer,
            host_header: HeaderValue::from_str(&addr)
                .map_err(|_| ReplError::BadSpec(format!("bad host {addr:?}")))?,
            addr,
            base,
            transport,
            headers: extra,
            pool: Mutex::new(Vec::new()),
            retries,
            display,
            answer_limit: MAX_RESPONSE_BYTES,
        })
    }

    /// Reads at most `bytes` of any answer (pairing's messages are small: an answer larger
    /// than that is refused before it is buffered whole).
    pub fn with_answer_limit(mut self, bytes: usize) -> Remote {
        self.answer_limit = bytes.min(MAX_RESPONSE_BYTES);
        self
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    async fn connect(&self) -> Result<SendRequest<ReqBody>, String> {
        match &self.transport {
            Transport::Http => start(self.stream().await?).await,
            Transport::Https(cfg, name) => {
                let s = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(name.clone(), self.stream().await?),
                )
                .await
                .map_err(|_| format!("TLS handshake with {} timed out", self.addr))?
                .map_err(|e| format!("TLS handshake with {} failed: {e}", self.addr))?;
                start(s).await
            }
            Transport::HttpKey(url) => {
                start(self.dialer.httpkey(url, self.connect_timeout()).await?).await
            }
        }
    }

    async fn stream(&self) -> Result<thali_peer::dial::Stream, String> {
        self.dialer
            .stream(&self.host, self.port, self.connect_timeout())
            .await
    }

    fn connect_timeout(&self) -> Duration {
        if thali_peer::dial::is_onion(&self.host) {
            thali_tor::CONNECT_TIMEOUT
        } else {
            CONNECT_TIMEOUT
        }
    }

    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        body: &Bytes,
        timeout: Duration,
    ) -> Result<Response, String> {
        let pooled = self.pool.lock().map(|mut p| p.pop()).unwrap_or(None);
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        match self
            .exchange(&mut sender, method, path, body, timeout)
            .await
        {
            Ok(r) => {
                if !sender.is_closed() {
                    if let Ok(mut p) = self.pool.lock() {
                        p.push(sender);
                    }
                }
                Ok(r)
            }
            // A kept-alive connection the server closed meanwhile: one fresh try, not counted.
            Err(_) if reused => {
                let mut sender = self.connect().await?;
                let r = self
                    .exchange(&mut sender, method, path, body, timeout)
                    .await?;
                if let Ok(mut p) = self.pool.lock() {
                    p.push(sender);
                }
                Ok(r)
            }
            Err(e) => Err(e),
        }
    }

    async fn exchange(
        &self,
        sender: &mut SendRequest<ReqBody>,
        method: &Method,
        path: &str,
        body: &Bytes,
        timeout: Duration,
    ) -> Result<Response, String> {
        let work = async {
            sender.ready().await.map_err(|e| e.to_string())?;
            let mut req = self.builder(method, path, "application/json");
            if !body.is_empty() {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let req = req.body(whole(body.clone())).map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            // A peer cannot make the replicator hold more than this for one answer.
            let body = http_body_util::Limited::new(resp.into_body(), self.answer_limit)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        format!("{ANSWER_TOO_LARGE} ({} KiB)", self.answer_limit >> 10)
                    } else {
                        format!("reading the answer: {e}")
                    }
                })?
                .to_bytes();
            Ok(Response { status, body })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
    }

    /// `method` on the database path plus `rel` (`""`, `"/_changes?…"`), retried on transport
    /// errors, 5xx and 429 answers. The body is serialised straight to bytes: a batch of documents
    /// is never copied into another `Value` on its way out.
    pub async fn request<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        rel: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> ReplResult<Response> {
        let path = format!("{}{}", self.base, rel);
        self.send_retrying(method, &path, rel, body, timeout).await
    }

    /// `method` on a path of the node rather than of its database (pairing's `/_thali/…`),
    /// retried as `request` is.
    pub async fn request_path<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> ReplResult<Response> {
        let shown = format!(" {path}");
        self.send_retrying(method, path, &shown, body, timeout)
            .await
    }

    /// `shown` follows the endpoint's name in error messages.
    async fn send_retrying<B: serde::Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        shown: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> ReplResult<Response> {
        let body = body
            .map(|b| Bytes::from(serde_json::to_vec(b).unwrap_or_default()))
            .unwrap_or_default();
        let mut backoff = Backoff::new(Duration::from_millis(250), MAX_BACKOFF);
        let mut attempt = 0;
        loop {
            let err = match self.send_once(&method, path, &body, timeout).await {
                // 429: the peer's rate limit; retried as a 5xx is, with the same backoff.
                Ok(r) if r.status >= 500 || r.status == 429 => r.describe(),
                Ok(r) => return Ok(r),
                Err(e) => e,
            };
            let msg = format!("{method} {}{shown}: {err}", self.display);
            if attempt >= self.retries || err.starts_with(ANSWER_TOO_LARGE) {
                return Err(ReplError::Transient(msg));
            }
            tracing::debug!(attempt, error = %msg, "request failed, retrying");
            attempt += 1;
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

/// An answer whose body is read as it arrives (an attachment).
pub struct Download {
    pub status: u16,
    pub content_type: String,
    body: hyper::body::Incoming,
}

impl Download {
    /// The next piece of the body, `None` at its end; a pause longer than `IDLE_TIMEOUT` or a
    /// cut connection is an error.
    pub async fn piece(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            let frame = tokio::time::timeout(IDLE_TIMEOUT, self.body.frame())
                .await
                .map_err(|_| format!("the answer paused for over {}s", IDLE_TIMEOUT.as_secs()))?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(format!("the answer was cut: {e}")),
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }

    /// A small body whole (an error answer), as a `Response`.
    pub async fn into_response(self) -> Response {
        let body = http_body_util::Limited::new(self.body, 1 << 20)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Response {
            status: self.status,
            body,
        }
    }
}

impl Remote {
    /// A `GET` whose answer is streamed (`Download`), retried like `request` until an answer
    /// with headers arrives. The connection is not pooled again: the caller may stop reading.
    pub async fn download(&self, rel: &str, accept: &str) -> ReplResult<Download> {
        let path = format!("{}{}", self.base, rel);
        let mut backoff = Backoff::new(Duration::from_millis(250), MAX_BACKOFF);
        let mut attempt = 0;
        loop {
            let err = match self.download_once(&path, accept).await {
                Ok(d) if d.status >= 500 || d.status == 429 => d.into_response().await.describe(),
                Ok(d) => return Ok(d),
                Err(e) => e,
            };
            let msg = format!("GET {}{rel}: {err}", self.display);
            if attempt >= self.retries {
                return Err(ReplError::Transient(msg));
            }
            attempt += 1;
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn download_once(&self, path: &str, accept: &str) -> Result<Download, String> {
        let mut sender = self.connect().await?;
        let req = self
            .builder(&Method::GET, path, accept)
            .body(whole(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, async {
            sender.ready().await.map_err(|e| e.to_string())?;
            sender.send_request(req).await.map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))??;
        let content_type = resp
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok(Download {
            status: resp.status().as_u16(),
            content_type,
            body: resp.into_body(),
        })
    }

    /// One request with a streamed body of `len` bytes, not retried (a stream cannot be
    /// replayed; the caller starts the transfer again). Waits for the answer at most
    /// `REQUEST_TIMEOUT` once the body is sent: the body's producer bounds the time before.
    pub async fn send_streamed(
        &self,
        method: Method,
        rel: &str,
        content_type: &str,
        len: u64,
        body: ReqBody,
    ) -> ReplResult<Response> {
        let path = format!("{}{}", self.base, rel);
        let fail = |e: String| ReplError::Transient(format!("{method} {}{rel}: {e}", self.display));
        let mut sender = self.connect().await.map_err(fail)?;
        let req = self
            .builder(&method, &path, "application/json")
            .header(hyper::header::CONTENT_TYPE, content_type)
            .header(hyper::header::CONTENT_LENGTH, len)
            .body(body)
            .map_err(|e| fail(e.to_string()))?;
        sender.ready().await.map_err(|e| fail(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = tokio::time::timeout(
            REQUEST_TIMEOUT,
            http_body_util::Limited::new(resp.into_body(), 1 << 20).collect(),
        )
        .await
        .map_err(|_| fail("the answer did not arrive in time".into()))?
        .map_err(|e| fail(format!("reading the answer: {e}")))?
        .to_bytes();
        if let Ok(mut p) = self.pool.lock() {
            if !sender.is_closed() {
                p.push(sender);
            }
        }
        Ok(Response { status, body })
    }

    fn builder(&self, method: &Method, path: &str, accept: &str) -> hyper::http::request::Builder {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, self.host_header.clone())
            .header(hyper::header::ACCEPT, accept)
            .header(
                hyper::header::USER_AGENT,
                concat!("thali-replicator/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        req
    }
}

async fn start<T>(io: T) -> Result<SendRequest<ReqBody>, String>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Percent-encodes a document id for a URL path; `_design/` keeps its slash, as CouchDB prints it.
pub fn encode_id(id: &str) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    match id.strip_prefix("_design/") {
        Some(rest) => format!("_design/{}", enc(rest)),
        None => match id.strip_prefix("_local/") {
            Some(rest) => format!("_local/{}", enc(rest)),
            None => enc(id),
        },
    }
}

/// A query-string value.
pub fn encode_query(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let id = Dialer::new(Arc::new(thali_peer::Identity::generate().unwrap()), None);
        let r = Remote::new(
            "http://u:p%40ss@[::1]:5984/a%2Fb/",
            &Map::new(),
            id.clone(),
            Some(0),
            "x".into(),
        )
        .unwrap();
        assert_eq!(r.addr, "[::1]:5984");
        assert_eq!(r.base, "/a%2Fb");
        let auth = r
            .headers
            .iter()
            .find(|(k, _)| k == hyper::header::AUTHORIZATION)
            .unwrap();
        assert_eq!(
            auth.1.to_str().unwrap(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("u:p@ss")
            )
        );
        assert!(Remote::new("ftp://h/db", &Map::new(), id.clone(), Some(0), "x".into()).is_err());
        assert!(Remote::new(
            "http://h:port/db",
            &Map::new(),
            id.clone(),
            Some(0),
            "x".into()
        )
        .is_err());
        assert!(Remote::new("http://h:1/", &Map::new(), id, Some(0), "x".into()).is_err());
        assert_eq!(encode_id("_design/a b"), "_design/a%20b");
        assert_eq!(encode_id("a/b"), "a%2Fb");
    }
}
