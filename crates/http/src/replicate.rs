//! `POST /_replicate`, `GET /_active_tasks`, `GET /_scheduler/jobs`: the replicator over HTTP.

use super::error::{ApiError, ApiResult};
use super::respond::{ok, status};
use super::{AppState, Req};
use axum::http::Method;
use axum::response::Response;
use serde_json::{json, Value};
use thali_replicate::{ReplError, Spec};

impl From<ReplError> for ApiError {
    fn from(e: ReplError) -> ApiError {
        ApiError::new(e.status(), e.name(), e.to_string())
    }
}

/// CouchDB's body: a one-shot replication answers when done (200 with its history); a
/// continuous one answers 202 at once; `"cancel": true` stops a running one.
pub async fn replicate(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    if r.method != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    r.require_json()?;
    let body = r.json().await?;
    let rep = &state.replicator;
    if body.get("cancel") == Some(&Value::Bool(true)) {
        // By `replication_id` (as listed in _active_tasks) or by the same body that started it;
        // `cancel` is not part of `Spec` because a cancel by id need not be a valid spec.
        let id = match body.get("replication_id").and_then(Value::as_str) {
            Some(id) => id.to_string(),
            None => rep.full_id(&Spec::parse(&body)?),
        };
        return if rep.cancel(&id) {
            Ok(ok(json!({"ok": true, "_local_id": id})))
        } else {
            Err(ApiError::not_found(format!(
                "replication {id} is not running"
            )))
        };
    }
    let spec = Spec::parse(&body)?;
    let continuous = spec.continuous;
    let handle = rep.start(spec, None)?;
    if continuous {
        return Ok(status(202, json!({"ok": true, "_local_id": handle.rep_id})));
    }
    Ok(ok(handle.wait().await?))
}

pub fn active_tasks(state: &AppState, r: &Req) -> ApiResult<Response> {
    if !matches!(r.method, Method::GET | Method::HEAD) {
        return Err(ApiError::method_not_allowed("GET,HEAD"));
    }
    let mut tasks = state.replicator.tasks();
    tasks.extend(state.node.db_tasks());
    Ok(ok(json!(tasks)))
}

pub fn scheduler_jobs(state: &AppState, r: &Req) -> ApiResult<Response> {
    if !matches!(r.method, Method::GET | Method::HEAD) {
        return Err(ApiError::method_not_allowed("GET,HEAD"));
    }
    Ok(ok(state.replicator.scheduler_jobs()))
}
