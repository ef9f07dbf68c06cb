//! The CouchDB HTTP API. One dispatcher splits the raw path into percent-decoded segments
//! (so `%2F` inside an id stays part of it), decides who is asking, and routes.

mod auth;
mod changes;
mod dashboard;
mod database;
mod document;
mod error;
mod find;
pub mod lockout;
mod node;
mod pair;
mod query;
mod replicate;
mod respond;
pub mod routes;
mod server;
mod stream;
mod view;

pub use auth::{Level, Principal};
pub use error::{ApiError, ApiResult};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use query::Query;
use std::sync::Arc;
use std::time::Instant;
use thali_db::Node;
use tokio::sync::watch;
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct HttpConfig {
    pub admin_password: String,
    /// Origins allowed by CORS; `*` allows any.
    pub cors_origins: Vec<String>,
    pub max_request_size: usize,
    /// How long a client may take to send a request body.
    pub body_timeout: std::time::Duration,
    /// Signs `AuthSession` cookies (random per start: a restart logs everyone out).
    pub cookie_secret: [u8; 32],
    /// Host names the loopback API answers to besides loopback names and IP addresses.
    pub allowed_hosts: Vec<String>,
}

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub config: Arc<HttpConfig>,
    /// Flips to true on shutdown so endless feeds end.
    pub shutdown: watch::Receiver<bool>,
    pub replicator: Arc<thali_replicate::Replicator>,
    /// The node's key id and, with `--tor`, its onion service (status in `GET /`).
    pub key_id: Arc<str>,
    pub tor: Option<Arc<thali_tor::Tor>>,
    pub pairing: Arc<thali_pair::Pairing>,
    /// The settings in force, for `/_node/_local/_config` (the `log` section is live).
    pub settings: Arc<serde_json::Value>,
    /// Failed logins per source and name (`lockout.rs`).
    pub lockout: Arc<lockout::Lockout>,
    /// Session cookies ended by a logout.
    pub logged_out: Arc<auth::cookie::LoggedOut>,
}

/// Seconds an `AuthSession` cookie lasts.
pub const SESSION_TIMEOUT: u64 = auth::cookie::TIMEOUT;

pub fn router(state: AppState) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

/// How long a small message's body (a stranger's, a pairing message) may take to arrive.
pub const MESSAGE_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A parsed request as the handlers see it.
pub struct Req {
    pub method: Method,
    pub segments: Vec<String>,
    pub query: Query,
    pub headers: HeaderMap,
    /// In a mutex only so that `&Req` is `Send` across awaits (Body is not `Sync`).
    pub body: std::sync::Mutex<Option<Body>>,
    pub principal: Principal,
    /// The principal's level on the route's database, set by the authorization point.
    pub db_level: Option<Level>,
    /// The client's IP address (none for onion streams), for budgets kept per address.
    source: Option<std::net::IpAddr>,
    max_body: usize,
    body_timeout: std::time::Duration,
}

impl Req {
    /// The request body, within the configured size limit and time.
    pub async fn bytes(&mut self) -> ApiResult<Bytes> {
        let max = self.max_body;
        if let Some(len) = self
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
        {
            if len > max {
                return Err(ApiError::too_large());
            }
        }
        let body = self
            .body
            .get_mut()
            .ok()
            .and_then(Option::take)
            .unwrap_or_default();
        match tokio::time::timeout(self.body_timeout, axum::body::to_bytes(body, max)).await {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(_)) => Err(ApiError::too_large()),
            Err(_) => Err(ApiError::new(
                408,
                "request_timeout",
                "the request body did not arrive in time",
            )),
        }
    }

    /// The request body as a stream of frames, for bodies received piece by piece (attachments);
    /// `next_frame` applies the body timeout between frames.
    pub fn body_stream(&mut self) -> axum::body::BodyDataStream {
        self.body
            .get_mut()
            .ok()
            .and_then(Option::take)
            .unwrap_or_default()
            .into_data_stream()
    }

    /// The next piece of a streamed body: `None` at its end; 408 when the client stalls for
    /// longer than the body timeout, 400 when the body is cut short.
    pub async fn next_frame(
        &self,
        body: &mut axum::body::BodyDataStream,
    ) -> ApiResult<Option<Bytes>> {
        use futures_util::StreamExt;
        match tokio::time::timeout(self.body_timeout, body.next()).await {
            Ok(None) => Ok(None),
            Ok(Some(Ok(b))) => Ok(Some(b)),
            Ok(Some(Err(e))) => Err(ApiError::bad_request(format!(
                "the request body ended early: {e}"
            ))),
            Err(_) => Err(ApiError::new(
                408,
                "request_timeout",
                "the request body did not arrive in time",
            )),
        }
    }

    /// The body as a stream whose every frame must arrive within the body timeout (a stalled
    /// client ends it with an error), for readers that own their stream (multipart).
    pub fn timed_body(
        &mut self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, String>> + Unpin + Send + 'static {
        use futures_util::StreamExt;
        let timeout = self.body_timeout;
        let body = self.body_stream();
        Box::pin(futures_util::stream::unfold(
            Some(body),
            move |st| async move {
                let mut body = st?;
                match tokio::time::timeout(timeout, body.next()).await {
                    Ok(None) => None,
                    Ok(Some(Ok(b))) => Some((Ok(b), Some(body))),
                    Ok(Some(Err(e))) => {
                        Some((Err(format!("the request body ended early: {e}")), None))
                    }
                    Err(_) => Some((Err("the request body did not arrive in time".into()), None)),
                }
            },
        ))
    }

    /// The client's IP address, when it came over TCP.
    pub fn source(&self) -> Option<std::net::IpAddr> {
        self.source
    }

    /// Lowers this request's body limits (a route whose messages are small).
    pub fn cap_body(&mut self, max: usize, timeout: std::time::Duration) {
        self.max_body = self.max_body.min(max);
        self.body_timeout = self.body_timeout.min(timeout);
    }

    /// The largest request body read whole.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// The `Content-Length` the client announced.
    pub fn content_length(&self) -> Option<u64> {
        self.headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }

    /// Who this request writes and reads as on `db`: its principal with the level the
    /// authorization point found. The write path decides per document from it.
    pub fn caller(&self, db: &str) -> thali_db::Caller {
        thali_db::Caller {
            user_ctx: self.principal.user_ctx(Some(db)),
            level: match self.principal {
                Principal::Admin => Level::Admin,
                // Anonymous requests never reach database routes; `Read` grants nothing more.
                _ => self.db_level.unwrap_or(Level::Read),
            },
            peer: match &self.principal {
                Principal::Peer(k) => Some(k.clone()),
                _ => None,
            },
            internal: false,
        }
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn require_json(&self) -> ApiResult<()> {
        if self
            .content_type()
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
        {
            Ok(())
        } else {
            Err(ApiError::bad_ctype())
        }
    }

    /// GET, or POST with the query's options in a JSON object body (`_all_docs`, views):
    /// merges the body's options into the query and returns its `keys`.
    pub async fn query_body(&mut self) -> ApiResult<Option<serde_json::Value>> {
        match self.method {
            Method::GET | Method::HEAD => Ok(None),
            Method::POST => {
                self.require_json()?;
                let body = self.json().await?;
                if !body.is_object() {
                    return Err(ApiError::bad_request("Request body must be a JSON object"));
                }
                self.query.merge_body(&body);
                Ok(body.get("keys").cloned())
            }
            _ => Err(ApiError::method_not_allowed("GET,HEAD,POST")),
        }
    }

    pub async fn json(&mut self) -> ApiResult<serde_json::Value> {
        let b = self.bytes().await?;
        serde_json::from_slice(&b).map_err(|_| ApiError::bad_request("invalid UTF-8 JSON"))
    }

    pub fn accepts(&self, mime: &str) -> bool {
        self.headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains(mime))
    }
}

/// The path's segments, each percent-decoded after splitting (so `a%2Fb` is one id); a
/// trailing slash is dropped. Bytes that are not UTF-8 after decoding are a 400, never replaced.
fn split_path(path: &str) -> ApiResult<Vec<String>> {
    let mut segs = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| ApiError::bad_request("The request path is not valid UTF-8."))
        })
        .collect::<ApiResult<Vec<String>>>()?;
    if segs.last().is_some_and(String::is_empty) {
        segs.pop();
    }
    Ok(segs)
}

/// The client's IP address: the peer listener's `PeerAddr`, or the loopback connection's.
fn source_ip(ext: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    ext.get::<thali_peer::PeerAddr>().map(|a| a.0).or_else(|| {
        ext.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip())
    })
}

/// Who is asking, after the loopback `Host` check (DNS rebinding) and the login lockout.
fn who(
    state: &AppState,
    parts: &axum::http::request::Parts,
    source: Option<std::net::IpAddr>,
) -> ApiResult<Principal> {
    let from_peer = parts.extensions.get::<thali_peer::PeerKeyId>().is_some();
    if !from_peer && !auth::host_allowed(&parts.headers, &state.config) {
        return Err(ApiError::new(
            403,
            "forbidden",
            "this Host is not one the node answers to: use a loopback name or address, or list the name with --allowed-host",
        ));
    }
    let principal = auth::principal(&parts.headers, &parts.extensions, state, source)?;
    if let Principal::Peer(key) = &principal {
        thali_sys::metrics::get().peer_seen(key);
    }
    Ok(principal)
}

/// The request's body limits. A stranger's body is read only in pairing-message sizes and
/// briefly, whatever the route: strangers together never make the node hold more than their
/// slots times this.
fn body_limits(state: &AppState, ext: &axum::http::Extensions) -> (usize, std::time::Duration) {
    if ext.get::<thali_peer::Stranger>().is_some() {
        (
            thali_pair::MAX_MESSAGE,
            state.config.body_timeout.min(MESSAGE_BODY_TIMEOUT),
        )
    } else {
        (state.config.max_request_size, state.config.body_timeout)
    }
}

async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", %method, path = %path);
    let origin = req.headers().get(header::ORIGIN).cloned();
    let resp = async {
        if method == Method::OPTIONS {
            return StatusCode::NO_CONTENT.into_response();
        }
        let (parts, body) = req.into_parts();
        let source = source_ip(&parts.extensions);
        let principal = match who(&state, &parts, source) {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        let refresh = matches!(principal, Principal::Admin)
            && !parts.headers.contains_key(header::AUTHORIZATION)
            && auth::session_cookie(&parts.headers)
                .filter(|c| !state.logged_out.contains(c))
                .and_then(|c| auth::cookie::verify(&state.config, &c))
                .is_some_and(|(_, exp)| {
                    exp < thali_sys::clock::unix_now() + auth::cookie::TIMEOUT / 2
                });
        let segments = match split_path(parts.uri.path()) {
            Ok(s) => s,
            Err(e) => return e.into_response(),
        };
        let (max_body, body_timeout) = body_limits(&state, &parts.extensions);
        let r = Req {
            method: parts.method,
            source,
            segments,
            query: Query::parse(parts.uri.query()),
            headers: parts.headers,
            body: std::sync::Mutex::new(Some(body)),
            principal,
            db_level: None,
            max_body,
            body_timeout,
        };
        let head = r.method == Method::HEAD;
        let mut resp = match route(&state, r).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        if head {
            *resp.body_mut() = Body::empty();
        }
        if refresh && !resp.headers().contains_key(header::SET_COOKIE) {
            let v = auth::cookie::header(Some(&auth::cookie::make(&state.config, "admin")));
            if let Ok(v) = HeaderValue::from_str(&v) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
        }
        resp
    }
    .instrument(span.clone())
    .await;
    let mut resp = resp;
    cors::apply(&state.config, origin.as_ref(), &method, &mut resp);
    resp.headers_mut().insert(
        header::SERVER,
        HeaderValue::from_static(concat!("thali/", env!("CARGO_PKG_VERSION"))),
    );
    thali_sys::metrics::get().request(
        method.as_str(),
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "done"
        )
    });
    resp
}

async fn route(state: &AppState, mut r: Req) -> ApiResult<Response> {
    use routes::Kind::*;
    let segs: Vec<&str> = r.segments.iter().map(String::as_str).collect();
    let parsed = routes::Route::parse(&segs);
    r.db_level = auth::authorize(state, &r, parsed.as_ref().ok())?;
    let rt = parsed?;
    let (db, id, sub) = (rt.db.as_str(), rt.id.as_str(), rt.sub.as_str());
    let r = &mut r;
    match rt.kind {
        Root => server::root(state, r),
        Up => server::up(state, r),
        AllDbs => server::all_dbs(state, r),
        Uuids => server::uuids(r),
        Session => server::session(state, r).await,
        ActiveTasks => replicate::active_tasks(state, r),
        Replicate => replicate::replicate(state, r).await,
        SchedulerJobs => replicate::scheduler_jobs(state, r),
        Db => database::db_root(state, r, db).await,
        AllDocs => database::all_docs(state, r, db, false).await,
        DesignDocs => database::all_docs(state, r, db, true).await,
        BulkDocs => database::bulk_docs(state, r, db).await,
        BulkGet => database::bulk_get(state, r, db).await,
        RevsDiff => database::revs_diff(state, r, db).await,
        Changes => changes::changes(state, r, db).await,
        EnsureFullCommit => database::ensure_full_commit(state, r, db).await,
        Compact => database::compact(state, r, db).await,
        ViewCleanup => database::view_cleanup(state, r, db).await,
        Security => database::security(state, r, db).await,
        RevsLimit => database::revs_limit(state, r, db).await,
        LocalDocs => database::local_docs(state, r, db).await,
        Local => document::local(state, r, db, id).await,
        Doc | DesignDoc => document::doc(state, r, db, id).await,
        View => view::view(state, r, db, id.strip_prefix("_design/").unwrap_or(id), sub).await,
        ViewInfo => view::info(state, r, db, id.strip_prefix("_design/").unwrap_or(id)).await,
        Attachment | DesignAttachment => document::attachment(state, r, db, id, sub).await,
        Find => find::find(state, r, db).await,
        Explain => find::explain(state, r, db).await,
        Index => find::index(state, r, db).await,
        IndexDoc => find::delete_index(state, r, db, id, sub).await,
        Invites => pair::invites(state, r).await,
        Invite => pair::revoke_invite(state, r, id).await,
        Join => pair::join(state, r).await,
        PairAccept => pair::accept(state, r).await,
        Paired => pair::paired(state, r).await,
        PairedPeer => pair::remove(state, r, id).await,
        Pairing => pair::pairing(state, r).await,
        PairStep => pair::step(state, r).await,
        Nearby => pair::nearby(state, r).await,
        NodeStats => node::stats(state, r, id, sub),
        NodePrometheus => node::prometheus(state, r, id),
        NodeSystem => node::system(state, r, id),
        NodeConfig => node::config(state, r, id, sub).await,
        Membership => node::membership(r),
        DbsInfo => node::dbs_info(state, r).await,
        Dashboard => dashboard::page(r),
        Events => dashboard::events(state, r),
    }
}

mod cors {
    use super::HttpConfig;
    use axum::http::{HeaderValue, Method};
    use axum::response::Response;

    pub fn apply(
        cfg: &HttpConfig,
        origin: Option<&HeaderValue>,
        method: &Method,
        resp: &mut Response,
    ) {
        let Some(origin) = origin else { return };
        let Ok(o) = origin.to_str() else { return };
        if !cfg.cors_origins.iter().any(|a| a == "*" || a == o) {
            return;
        }
        let h = resp.headers_mut();
        h.insert("access-control-allow-origin", origin.clone());
        h.insert(
            "access-control-allow-credentials",
            HeaderValue::from_static("true"),
        );
        h.insert(
            "access-control-expose-headers",
            HeaderValue::from_static(
                "content-type, cache-control, accept-ranges, etag, server, x-couch-request-id",
            ),
        );
        if method == Method::OPTIONS {
            h.insert(
                "access-control-allow-methods",
                HeaderValue::from_static("GET, PUT, POST, HEAD, DELETE"),
            );
            h.insert(
                "access-control-allow-headers",
                HeaderValue::from_static(
                    "accept, authorization, content-type, origin, referer, x-csrf-token",
                ),
            );
            h.insert("access-control-max-age", HeaderValue::from_static("600"));
        }
    }
}
