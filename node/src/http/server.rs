//! Server-level endpoints: `/`, `/_up`, `/_all_dbs`, `/_uuids`, `/_session`.

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::respond::ok;
use super::{AppState, Req};
use crate::db::random_hex;
use axum::http::Method;
use axum::response::Response;
use serde_json::json;

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
pub fn session(r: &Req) -> ApiResult<Response> {
    match r.method {
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
