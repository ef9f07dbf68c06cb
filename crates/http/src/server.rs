//! Server-level endpoints: `/`, `/_up`, `/_all_dbs`, `/_uuids`, `/_session`.

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::respond::ok;
use super::{AppState, Req};
use axum::http::Method;
use axum::response::Response;
use serde_json::json;
use thali_db::random_hex;

fn only(r: &Req, methods: &[Method], label: &str) -> ApiResult<()> {
    if methods.contains(&r.method) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(label))
    }
}

pub fn root(state: &AppState, r: &Req) -> ApiResult<Response> {
    only(r, &[Method::GET, Method::HEAD], "GET,HEAD")?;
    let mut info = json!({
        "couchdb": "Welcome",
        "version": "3.5.0",
        "uuid": state.node.uuid(),
        "vendor": {"name": "thali", "version": env!("CARGO_PKG_VERSION")},
        "features": [],
    });
    // The node's identity and Tor status are for its admin, not for every peer.
    if matches!(r.principal, Principal::Admin) {
        info["key"] = json!(&*state.key_id);
        if let Some(tor) = &state.tor {
            info["tor"] = tor.status_json(&state.key_id);
        }
    }
    Ok(ok(info))
}

/// `/_up`: `ok` when the store answers a read; 503 with the reason otherwise.
pub fn up(state: &AppState, r: &Req) -> ApiResult<Response> {
    only(r, &[Method::GET, Method::HEAD], "GET,HEAD")?;
    match state.node.healthy() {
        Ok(()) => Ok(ok(json!({"status": "ok", "storage": "ok"}))),
        Err(e) => Ok(super::respond::status(
            503,
            json!({"status": "error", "storage": e.reason()}),
        )),
    }
}

pub fn all_dbs(state: &AppState, r: &Req) -> ApiResult<Response> {
    only(r, &[Method::GET, Method::HEAD], "GET,HEAD")?;
    Ok(ok(json!(state.node.all_dbs())))
}

pub fn uuids(r: &Req) -> ApiResult<Response> {
    only(r, &[Method::GET, Method::HEAD], "GET,HEAD")?;
    let count = r.query.uint("count")?.unwrap_or(1);
    if count > 1000 {
        return Err(ApiError::bad_request("count parameter too large"));
    }
    let ids: Vec<String> = (0..count).map(|_| random_hex(16)).collect();
    Ok(ok(json!({ "uuids": ids })))
}

/// Cookie sessions are not implemented: POST answers 404, which tells CouchDB's replicator to
/// use basic auth. GET reports who the request authenticated as.
/// `/_session`: `GET` tells who is asking; `POST` (JSON or form `name`, `password`) checks the
/// admin's password and sets an `AuthSession` cookie; `DELETE` clears it. Only on the loopback
/// API: a peer is its key, and the peer listener must not test admin passwords.
pub async fn session(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    use super::auth::cookie;
    match r.method {
        Method::POST => {
            if matches!(r.principal, Principal::Peer(_)) {
                return Err(ApiError::new(
                    403,
                    "forbidden",
                    "Peers are their keys; log in on the node's local API.",
                ));
            }
            // JSON when it says so; otherwise a form, as CouchDB's clients send it.
            let json = r
                .content_type()
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json");
            let body = r.bytes().await?;
            let (name, password) = if !json {
                let q = super::query::Query::parse(std::str::from_utf8(&body).ok());
                (
                    q.get("name").unwrap_or("").to_string(),
                    q.get("password").unwrap_or("").to_string(),
                )
            } else {
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|_| ApiError::bad_request("invalid UTF-8 JSON"))?;
                (
                    v["name"].as_str().unwrap_or("").to_string(),
                    v["password"].as_str().unwrap_or("").to_string(),
                )
            };
            state.lockout.check(r.source(), &name)?;
            if name != "admin" || !super::auth::admin_password_ok(&state.config, &password) {
                state.lockout.failed(r.source(), &name);
                return Err(ApiError::unauthorized());
            }
            let mut resp = ok(json!({"ok": true, "name": "admin", "roles": ["_admin"]}));
            let c = cookie::header(Some(&cookie::make(&state.config, "admin")));
            if let Ok(v) = axum::http::HeaderValue::from_str(&c) {
                resp.headers_mut().insert(axum::http::header::SET_COOKIE, v);
            }
            Ok(resp)
        }
        Method::DELETE => {
            // The cookie ends here too, not only in the browser: requests and event streams
            // that carry it are refused from now on.
            if let Some(t) = super::auth::session_cookie(&r.headers) {
                if let Some((_, expires)) = cookie::verify(&state.config, &t) {
                    state.logged_out.add(&t, expires);
                }
            }
            let mut resp = ok(json!({"ok": true}));
            if let Ok(v) = axum::http::HeaderValue::from_str(&cookie::header(None)) {
                resp.headers_mut().insert(axum::http::header::SET_COOKIE, v);
            }
            Ok(resp)
        }
        Method::GET | Method::HEAD => {
            let mut ctx = r.principal.user_ctx(None);
            if let Some(m) = ctx.as_object_mut() {
                m.shift_remove("db");
            }
            Ok(ok(json!({
                "ok": true,
                "userCtx": ctx,
                "info": {"authentication_handlers": ["default"], "authenticated": "default"},
            })))
        }
        _ => Err(ApiError::not_found("missing")),
    }
}
