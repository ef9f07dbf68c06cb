//! Who is asking, and the one place that decides what they may do.
//!
//! - On the loopback listener a request is the local admin (basic auth) or anonymous.
//! - On the peer listener it is the key of the client certificate, whatever headers say.
//!
//! Every route is classified by what it needs (`Need`); peers get database access from the
//! database's `_security` object, read on every request so a change takes effect at once:
//! `admins.names` → admin, `members.names` → write, `readers.names` → read.

use super::error::{ApiError, ApiResult};
use super::{AppState, HttpConfig, Req};
use crate::peer::listener::PeerKeyId;
use axum::http::{header, Extensions, HeaderMap, Method};
use base64::Engine;
use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The local admin, authenticated with basic auth on the loopback listener.
    Admin,
    /// A peer, by the key id of its client certificate.
    Peer(String),
    Anonymous,
}

/// What a peer may do on one database, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Pull: reads, `_changes`, `_revs_diff`, `_bulk_get`, `_local` checkpoints.
    Read,
    /// Read plus document writes.
    Write,
    /// Write plus design documents and `_security`.
    Admin,
}

/// What a route needs.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    /// Anyone, peers included (`GET /`, `/_session`).
    Open,
    /// Anyone on the loopback listener (`/_up`).
    LoopbackOpen,
    /// The node's admin only (creating and deleting databases, server endpoints).
    NodeAdmin,
    Db(String, Level),
}

impl Principal {
    /// CouchDB's `userCtx` for this principal on `db`.
    pub fn user_ctx(&self, db: Option<&str>) -> Value {
        match self {
            Principal::Admin => json!({"db": db, "name": "admin", "roles": ["_admin"]}),
            Principal::Peer(k) => json!({"db": db, "name": k, "roles": []}),
            Principal::Anonymous => json!({"db": db, "name": null, "roles": []}),
        }
    }
}

pub fn principal(headers: &HeaderMap, ext: &Extensions, cfg: &HttpConfig) -> Principal {
    if let Some(PeerKeyId(k)) = ext.get::<PeerKeyId>() {
        return Principal::Peer(k.clone());
    }
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Principal::Anonymous;
    };
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Principal::Anonymous;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return Principal::Anonymous;
    };
    let Ok(s) = String::from_utf8(raw) else {
        return Principal::Anonymous;
    };
    match s.split_once(':') {
        Some(("admin", pw)) if constant_time_eq(pw.as_bytes(), cfg.admin_password.as_bytes()) => {
            Principal::Admin
        }
        _ => Principal::Anonymous,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn classify(r: &Req) -> Need {
    let m = &r.method;
    let read_method = matches!(*m, Method::GET | Method::HEAD);
    let segs: Vec<&str> = r.segments.iter().map(String::as_str).collect();
    let db = |level| Need::Db(segs[0].to_string(), level);
    match segs.as_slice() {
        [] => Need::Open,
        ["_session"] => Need::Open,
        ["_up"] => Need::LoopbackOpen,
        [first, ..] if first.starts_with('_') => Need::NodeAdmin,
        [_] if read_method => db(Level::Read),
        [_] if *m == Method::POST => db(Level::Write),
        [_] => Need::NodeAdmin,
        [_, "_all_docs"
        | "_changes"
        | "_bulk_get"
        | "_revs_diff"
        | "_local_docs"
        | "_ensure_full_commit"] => db(Level::Read),
        [_, "_local", ..] => db(Level::Read),
        [_, "_revs_limit"] if read_method => db(Level::Read),
        [_, "_revs_limit" | "_security" | "_compact" | "_view_cleanup", ..] => db(Level::Admin),
        [_, "_bulk_docs"] => db(Level::Write),
        [_, "_design", ..] if read_method => db(Level::Read),
        // A view query with its parameters in a POST body is a read.
        [_, "_design", _, "_view", _] if *m == Method::POST => db(Level::Read),
        [_, "_design", ..] => db(Level::Admin),
        // `_design%2Fname` as one segment (CouchDB accepts it, so the router does too).
        [_, id, ..] if id.starts_with("_design/") && !read_method => db(Level::Admin),
        [_, ..] if read_method => db(Level::Read),
        [_, ..] if m.as_str() == "COPY" => {
            let to_design = r
                .headers
                .get("destination")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|d| d.starts_with("_design/") || d.starts_with("_design%2F"));
            db(if to_design {
                Level::Admin
            } else {
                Level::Write
            })
        }
        [_, ..] => db(Level::Write),
    }
}

/// A peer's level on a database from its `_security` object, if any.
pub fn level_in(sec: &Value, key: &str) -> Option<Level> {
    let has = |section: &str| {
        sec.get(section)
            .and_then(|s| s.get("names"))
            .and_then(Value::as_array)
            .is_some_and(|names| names.iter().any(|n| n == key))
    };
    if has("admins") {
        Some(Level::Admin)
    } else if has("members") {
        Some(Level::Write)
    } else if has("readers") {
        Some(Level::Read)
    } else {
        None
    }
}

/// The principal's level on `db` (the local admin has every level).
fn db_level(state: &AppState, principal: &Principal, db: &str) -> Option<Level> {
    match principal {
        Principal::Admin => Some(Level::Admin),
        Principal::Anonymous => None,
        Principal::Peer(key) => {
            let sec = state.node.db(db).ok()?.security().ok()?;
            level_in(&sec, key)
        }
    }
}

/// The single authorization point: every request passes here before its handler runs.
/// Returns the principal's level on the route's database, for handlers that decide per document
/// (`_bulk_docs` and design documents).
pub fn authorize(state: &AppState, r: &Req) -> ApiResult<Option<Level>> {
    let need = classify(r);
    match (&r.principal, need) {
        (Principal::Admin, _) => Ok(Some(Level::Admin)),
        (_, Need::Open) => Ok(None),
        (Principal::Anonymous, Need::LoopbackOpen) => Ok(None),
        (Principal::Anonymous, _) => Err(ApiError::unauthorized()),
        (Principal::Peer(_), Need::LoopbackOpen | Need::NodeAdmin) => Err(ApiError::new(
            403,
            "forbidden",
            "Only the node's admin may do this.",
        )),
        (p @ Principal::Peer(key), Need::Db(db, need)) => match db_level(state, p, &db) {
            Some(have) if have >= need => Ok(Some(have)),
            Some(_) => {
                tracing::debug!(%key, %db, ?need, "peer lacks the permission");
                Err(ApiError::new(
                    403,
                    "forbidden",
                    format!("Key {key} may not do this on database {db}."),
                ))
            }
            None => {
                tracing::debug!(%key, %db, "unknown peer key");
                Err(ApiError::new(
                    403,
                    "forbidden",
                    "You are not allowed to access this db.",
                ))
            }
        },
    }
}
