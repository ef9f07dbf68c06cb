//! The CouchDB HTTP API. One dispatcher splits the raw path into percent-decoded segments
//! (so `%2F` inside an id stays part of it), decides who is asking, and routes.

mod auth;
mod changes;
mod database;
mod document;
mod error;
mod multipart;
mod query;
mod replicate;
mod respond;
mod server;
mod view;

pub use auth::{Level, Principal};
pub use error::{ApiError, ApiResult};

use crate::db::Node;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use query::Query;
use std::sync::Arc;
use std::time::Instant;
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
}

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub config: Arc<HttpConfig>,
    /// Flips to true on shutdown so endless feeds end.
    pub shutdown: watch::Receiver<bool>,
    pub replicator: Arc<crate::replicate::Replicator>,
    /// The node's key id and, with `--tor`, its onion service (status in `GET /`).
    pub key_id: Arc<str>,
    pub tor: Option<Arc<crate::tor::Tor>>,
}

pub fn router(state: AppState) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

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

fn split_path(path: &str) -> Vec<String> {
    let mut segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    if segs.last().is_some_and(String::is_empty) {
        segs.pop();
    }
    segs
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
        let principal = auth::principal(&parts.headers, &parts.extensions, &state.config);
        let r = Req {
            method: parts.method,
            segments: split_path(parts.uri.path()),
            query: Query::parse(parts.uri.query()),
            headers: parts.headers,
            body: std::sync::Mutex::new(Some(body)),
            principal,
            db_level: None,
            max_body: state.config.max_request_size,
            body_timeout: state.config.body_timeout,
        };
        let head = r.method == Method::HEAD;
        let mut resp = match route(&state, r).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        if head {
            *resp.body_mut() = Body::empty();
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
    r.db_level = auth::authorize(state, &r)?;
    let segs = r.segments.clone();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match segs.as_slice() {
        [] | [""] => server::root(state, &r),
        ["_up"] => server::up(&r),
        ["_all_dbs"] => server::all_dbs(state, &r),
        ["_uuids"] => server::uuids(&r),
        ["_session"] => server::session(&r),
        ["_active_tasks"] => replicate::active_tasks(state, &r),
        ["_replicate"] => replicate::replicate(state, &mut r).await,
        ["_scheduler", "jobs"] => replicate::scheduler_jobs(state, &r),
        [name, ..] if name.starts_with('_') && !matches!(*name, "_replicator" | "_users") => {
            Err(ApiError::new(
                400,
                "illegal_database_name",
                format!("Name: '{name}'. Only lowercase characters (a-z), digits (0-9), and any of the characters _, $, (, ), +, -, and / are allowed. Must begin with a letter."),
            ))
        }
        [db] => database::db_root(state, &mut r, db).await,
        [db, "_all_docs"] => database::all_docs(state, &mut r, db).await,
        [db, "_bulk_docs"] => database::bulk_docs(state, &mut r, db).await,
        [db, "_bulk_get"] => database::bulk_get(state, &mut r, db).await,
        [db, "_revs_diff"] => database::revs_diff(state, &mut r, db).await,
        [db, "_changes"] => changes::changes(state, &mut r, db).await,
        [db, "_ensure_full_commit"] => database::ensure_full_commit(state, &r, db),
        [db, "_compact", ..] => database::compact(state, &r, db),
        [db, "_view_cleanup"] => database::view_cleanup(state, &r, db),
        [db, "_security"] => database::security(state, &mut r, db).await,
        [db, "_revs_limit"] => database::revs_limit(state, &mut r, db).await,
        [db, "_local_docs"] => database::local_docs(state, &r, db),
        [db, "_local", id] => document::local(state, &mut r, db, id).await,
        [_, "_local", ..] => Err(ApiError::bad_request("_local documents do not accept attachments.")),
        [db, id] if id.starts_with("_design/") => document::doc(state, &mut r, db, id).await,
        [db, "_design", name] => document::doc(state, &mut r, db, &format!("_design/{name}")).await,
        [db, "_design", name, "_view", v] => view::view(state, &mut r, db, name, v).await,
        [db, "_design", name, "_info"] => view::info(state, &r, db, name),
        [db, "_design", name, att @ ..] => {
            document::attachment(state, &mut r, db, &format!("_design/{name}"), &att.join("/")).await
        }
        [_, id] if id.starts_with('_') => Err(ApiError::new(
            400,
            "illegal_docid",
            "Only reserved document ids may start with underscore.",
        )),
        [db, id] => document::doc(state, &mut r, db, id).await,
        [db, id, att @ ..] => document::attachment(state, &mut r, db, id, &att.join("/")).await,
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
