//! The node's own admin endpoints that CouchDB tools expect: `/_node/{node}/_stats[/group/…]`
//! (CouchDB's JSON shape), `/_node/{node}/_prometheus`, `/_node/{node}/_system`,
//! `/_membership` and `/_dbs_info`. `{node}` is `_local` or the name `_membership` lists.
//! The numbers come from `sys::metrics`.

use super::error::{ApiError, ApiResult};
use super::respond::ok;
use super::{AppState, Req};
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use thali_sys::metrics::{self, Gauges};

/// The one node of this "cluster", as CouchDB names a single node.
pub const NODE_NAME: &str = "nonode@nohost";

fn read_only(r: &Req) -> ApiResult<()> {
    if matches!(r.method, Method::GET | Method::HEAD) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed("GET,HEAD"))
    }
}

fn this_node(name: &str) -> ApiResult<()> {
    if name == "_local" || name == NODE_NAME {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "no node {name:?} in this cluster"
        )))
    }
}

fn gauges(state: &AppState) -> Gauges {
    Gauges {
        open_databases: state.node.open_dbs() as i64,
        storage_bytes: state.node.disk_size() as i64,
        replication_jobs: state.replicator.handles().len() as i64,
        tor_reachable: state
            .tor
            .as_ref()
            .map(|t| t.status_json(&state.key_id)["state"] == "reachable"),
    }
}

pub fn stats(state: &AppState, r: &Req, node: &str, path: &str) -> ApiResult<Response> {
    read_only(r)?;
    this_node(node)?;
    let mut v = metrics::get().stats(&gauges(state));
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        v = v
            .get(seg)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no statistic {path:?}")))?;
    }
    Ok(ok(v))
}

pub fn prometheus(state: &AppState, r: &Req, node: &str) -> ApiResult<Response> {
    read_only(r)?;
    this_node(node)?;
    let mut resp = metrics::get().prometheus(&gauges(state)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

pub fn system(state: &AppState, r: &Req, node: &str) -> ApiResult<Response> {
    read_only(r)?;
    this_node(node)?;
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let g = gauges(state);
    Ok(ok(json!({
        "uptime": metrics::get().uptime_seconds(),
        "memory": {"resident": metrics::resident_bytes()},
        "threads": threads,
        "open_files": fds,
        "open_databases": g.open_databases,
        "storage_bytes": g.storage_bytes,
        "replication_jobs": g.replication_jobs,
        "run_queue": 0,
    })))
}

/// `/_node/{node}/_config[/section[/key]]`: the settings in force. Only `log/level` changes
/// while the node runs (`PUT` a JSON string of `tracing` directives; the old value comes back);
/// the rest are read at start, from flags, `THALI_*` or `DIR/thali.toml`.
pub async fn config(state: &AppState, r: &mut Req, node: &str, path: &str) -> ApiResult<Response> {
    this_node(node)?;
    let mut all = (*state.settings).clone();
    all["log"] = json!({"level": thali_sys::logs::current()});
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let unknown = || ApiError::not_found("unknown_config_value");
    match r.method {
        Method::GET | Method::HEAD => {
            let mut v = &all;
            for p in &parts {
                v = v.get(*p).ok_or_else(unknown)?;
            }
            Ok(ok(v.clone()))
        }
        Method::PUT | Method::DELETE => {
            let [section, key] = parts.as_slice() else {
                return Err(ApiError::bad_request("give a section and a key"));
            };
            all.get(*section)
                .and_then(|s| s.get(*key))
                .ok_or_else(unknown)?;
            if (*section, *key) != ("log", "level") || r.method == Method::DELETE {
                return Err(ApiError::bad_request(format!(
                    "{section}/{key} is read at start: set it with its flag, THALI_* or thali.toml and restart"
                )));
            }
            let v = r.json().await?;
            let level = v
                .as_str()
                .ok_or_else(|| ApiError::bad_request("the value must be a JSON string"))?;
            let old = thali_sys::logs::set(level).map_err(ApiError::bad_request)?;
            tracing::info!(level, "log level changed");
            Ok(ok(json!(old)))
        }
        _ => Err(ApiError::method_not_allowed("GET,HEAD,PUT,DELETE")),
    }
}

pub fn membership(r: &Req) -> ApiResult<Response> {
    read_only(r)?;
    Ok(ok(
        json!({"all_nodes": [NODE_NAME], "cluster_nodes": [NODE_NAME]}),
    ))
}

/// `GET /_dbs_info` (every database) or `POST {"keys": [...]}`: `[{key, info | error}]`.
pub async fn dbs_info(state: &AppState, r: &mut Req) -> ApiResult<Response> {
    let names: Vec<String> = match r.method {
        Method::GET | Method::HEAD => state.node.all_dbs(),
        Method::POST => {
            r.require_json()?;
            let body = r.json().await?;
            let keys = body
                .get("keys")
                .and_then(Value::as_array)
                .ok_or_else(|| ApiError::bad_request("`keys` member must exist."))?;
            if keys.len() > 100 {
                return Err(ApiError::bad_request(
                    "`keys` member must have at most 100 names.",
                ));
            }
            keys.iter()
                .map(|k| {
                    k.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| ApiError::bad_request("`keys` must be database names"))
                })
                .collect::<ApiResult<_>>()?
        }
        _ => return Err(ApiError::method_not_allowed("GET,HEAD,POST")),
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        out.push(match state.node.db(&name).await.and_then(|d| d.info()) {
            Ok(info) => json!({"key": name, "info": info}),
            Err(_) => json!({"key": name, "error": "not_found"}),
        });
    }
    Ok(ok(Value::Array(out)))
}
