//! Pairing over HTTP: `/_thali/invites[/{id}]`, `/_thali/join`, `/_thali/paired[/{name}]`,
//! `/_thali/pairing` (by code) and `/_thali/peers` (discovered nearby) for the node's admin;
//! `/_thali/accept` (invites) and `/_thali/pair` (code exchange) for any peer key over mutual
//! TLS. The logic lives in
//! `thali_pair`; this module reads bodies and picks the method.

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::respond::ok;
use super::{AppState, Req};
use axum::http::Method;
use axum::response::Response;
use serde::de::DeserializeOwned;
use thali_pair::PairError;

impl From<PairError> for ApiError {
    fn from(e: PairError) -> ApiError {
        ApiError::new(e.status, e.error, e.reason)
    }
}

fn only(r: &Req, m: Method) -> ApiResult<()> {
    if r.method == m {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(m.as_str()))
    }
}

async fn body<T: DeserializeOwned>(r: &mut Req) -> ApiResult<T> {
    r.require_json()?;
    let v = r.json().await?;
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub async fn invites(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    match r.method {
        Method::GET | Method::HEAD => Ok(ok(state.pairing.invites().await?)),
        Method::POST => {
            let req = body(r).await?;
            Ok(ok(state.pairing.create_invite(req).await?))
        }
        _ => Err(ApiError::method_not_allowed("GET,HEAD,POST")),
    }
}

pub async fn revoke_invite(state: &AppState, r: &mut Req, id: &str) -> ApiResult<Response> {
    only(r, Method::DELETE)?;
    Ok(ok(state.pairing.revoke_invite(id).await?))
}

pub async fn join(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    only(r, Method::POST)?;
    let req = body(r).await?;
    Ok(ok(state.pairing.join(req).await?))
}

/// The peer's key: these routes are for peers over mutual TLS.
fn peer_key(r: &Req) -> ApiResult<String> {
    match &r.principal {
        Principal::Peer(key) => Ok(key.clone()),
        _ => Err(ApiError::bad_request(
            "pairing messages come from peers over mutual TLS only",
        )),
    }
}

/// A peer's pairing message: its key's failure budget is checked before a byte of the body is
/// read, and the body is read only up to a pairing message's size, briefly.
async fn message<T: DeserializeOwned>(state: &AppState, r: &mut Req) -> ApiResult<(String, T)> {
    only(r, Method::POST)?;
    let key = peer_key(r)?;
    state.pairing.admit(&key, r.source())?;
    r.cap_body(thali_pair::MAX_MESSAGE, super::MESSAGE_BODY_TIMEOUT);
    let msg = body(r).await?;
    Ok((key, msg))
}

pub async fn accept(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    let (key, msg) = message(state, r).await?;
    Ok(ok(state.pairing.accept(&key, msg).await?))
}

pub async fn step(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    let (key, msg) = message(state, r).await?;
    Ok(ok(state.pairing.peer_step(&key, msg).await?))
}

pub async fn pairing(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    only(r, Method::POST)?;
    let a = body(r).await?;
    Ok(ok(state.pairing.action(a).await?))
}

pub async fn nearby(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    if !matches!(r.method, Method::GET | Method::HEAD) {
        return Err(ApiError::method_not_allowed("GET,HEAD"));
    }
    Ok(ok(state.pairing.nearby().await?))
}

pub async fn paired(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    if !matches!(r.method, Method::GET | Method::HEAD) {
        return Err(ApiError::method_not_allowed("GET,HEAD"));
    }
    Ok(ok(state.pairing.peers().await?))
}

pub async fn remove(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    only(r, Method::DELETE)?;
    Ok(ok(state.pairing.remove(name).await?))
}
