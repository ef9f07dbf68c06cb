//! The dashboard: `GET /_thali/` serves one embedded page (HTML, CSS and JavaScript in
//! `dashboard/index.html`, no build step, nothing fetched at run time); the page logs in with
//! `POST /_session` (cookie) and then follows `GET /_thali/events`, a server-sent event stream
//! of snapshots (one a second) of what the node knows: identity and URLs (with a QR code), Tor,
//! databases, replications with their progress and transport, peers (paired, allowed, nearby),
//! index builds, recent plugin errors, and the counters the page turns into rates. The document
//! browser uses the ordinary API.

use super::error::{ApiError, ApiResult};
use super::{AppState, Req};
use axum::http::{header, HeaderValue, Method};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};
use std::time::Duration;

const PAGE: &str = include_str!("dashboard/index.html");
/// How often a snapshot is sent.
const EVERY: Duration = Duration::from_secs(1);
/// Databases listed at most (the page is a summary, not `_all_dbs`).
const MAX_DBS: usize = 200;

/// The page's Content-Security-Policy: its one script is allowed by its SHA-256.
fn csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(s, _)| s);
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
        format!(
            "default-src 'none'; connect-src 'self'; style-src 'self' 'unsafe-inline'; \
             script-src 'sha256-{hash}'; img-src 'self' data:; base-uri 'none'; \
             form-action 'self'; frame-ancestors 'none'; object-src 'none'"
        )
    })
}

pub fn page(r: &Req) -> ApiResult<Response> {
    if !matches!(r.method, Method::GET | Method::HEAD) {
        return Err(ApiError::method_not_allowed("GET,HEAD"));
    }
    let mut resp = PAGE.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page only talks to its own origin, and runs its own script alone: no other inline
    // script, no inline handler, no plugin, no form posting elsewhere, no framing.
    if let Ok(v) = HeaderValue::from_str(csp()) {
        h.insert("content-security-policy", v);
    }
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    Ok(resp)
}

pub fn events(state: &AppState, r: &Req) -> ApiResult<Response> {
    if r.method != Method::GET {
        return Err(ApiError::method_not_allowed("GET"));
    }
    // `?once=true`: one snapshot, then the stream ends (scripts, tests).
    let once = r.query.bool("once")?;
    let state = state.clone();
    // A stream opened with a session cookie (and no password) lasts only as long as the
    // session: it ends at logout or expiry.
    let cookie = (!r.headers.contains_key(header::AUTHORIZATION))
        .then(|| super::auth::session_cookie(&r.headers))
        .flatten();
    let stream = futures_util::stream::unfold((state, true), move |(state, first)| {
        let cookie = cookie.clone();
        async move {
            if !first {
                if once {
                    return None;
                }
                let mut shutdown = state.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(EVERY) => {}
                    _ = shutdown.wait_for(|v| *v) => return None,
                }
            }
            if let Some(c) = &cookie {
                if !super::auth::session_valid(&state, c) {
                    return None;
                }
            }
            let snap = snapshot(&state).await;
            let ev = Event::default().event("snapshot").data(snap.to_string());
            Some((Ok::<Event, std::convert::Infallible>(ev), (state, false)))
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A `_replicator` document's endpoint as shown: its URL (or name) without a password.
fn endpoint(v: &Value) -> String {
    let s = v.as_str().or_else(|| v["url"].as_str()).unwrap_or("");
    match (s.split_once("://"), s.rfind('@')) {
        (Some((scheme, rest)), Some(_)) if rest.contains('@') => {
            let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
            format!("{scheme}://{host}")
        }
        _ => s.to_string(),
    }
}

/// How a replication endpoint is reached.
fn transport(url: &str) -> &'static str {
    if url.contains(".onion") {
        "tor"
    } else if url.starts_with("httpkey://") {
        "tcp (mutual TLS)"
    } else if url.starts_with("https://") {
        "tcp (TLS)"
    } else if url.starts_with("http://") {
        "tcp"
    } else {
        "local"
    }
}

async fn snapshot(state: &AppState) -> Value {
    let node = &state.node;
    let m = thali_sys::metrics::get();
    let urls = state.pairing.urls();
    let qr_for = urls.first().cloned().unwrap_or_default();
    let qr_svg = (!qr_for.is_empty())
        .then(|| {
            qrcode::QrCode::new(qr_for.as_bytes()).ok().map(|q| {
                q.render::<qrcode::render::svg::Color>()
                    .min_dimensions(140, 140)
                    .build()
            })
        })
        .flatten();
    let mut dbs = Vec::new();
    let names = node.all_dbs();
    for name in names.iter().take(MAX_DBS) {
        if let Ok(info) = node.db(name).await.and_then(|d| d.info()) {
            dbs.push(json!({"name": name, "doc_count": info["doc_count"],
                            "disk_size": info["disk_size"], "update_seq": info["update_seq"]}));
        }
    }
    // Running jobs, then `_replicator` documents whose jobs ended (completed or failed).
    let mut replications: Vec<Value> = state
        .replicator
        .tasks()
        .into_iter()
        .map(|t| {
            let src = t["source"].as_str().unwrap_or("").to_string();
            let tgt = t["target"].as_str().unwrap_or("").to_string();
            json!({"id": t["replication_id"], "doc_id": t["doc_id"], "source": src,
                   "target": tgt, "transport": transport(if src.contains("://") { &src } else { &tgt }),
                   "state": t["state"], "docs_written": t["docs_written"],
                   "pending": t["changes_pending"],
                   "checkpointed_seq": t["checkpointed_source_seq"], "error": t["error"]})
        })
        .collect();
    if let Ok(rdb) = node.db("_replicator").await {
        let running: Vec<Value> = replications.iter().map(|r| r["doc_id"].clone()).collect();
        let q = thali_db::AllDocsQuery {
            include_docs: true,
            limit: Some(100),
            ..Default::default()
        };
        if let Ok(all) = rdb.all_docs(&q) {
            for row in all["rows"].as_array().into_iter().flatten() {
                let d = &row["doc"];
                if running.contains(&row["id"])
                    || row["id"]
                        .as_str()
                        .is_some_and(|i| i.starts_with("_design/"))
                {
                    continue;
                }
                let (src, tgt) = (endpoint(&d["source"]), endpoint(&d["target"]));
                replications.push(json!({"id": row["id"], "doc_id": row["id"],
                    "transport": transport(if src.contains("://") { &src } else { &tgt }),
                    "source": src, "target": tgt,
                    "state": d.get("_replication_state").cloned().unwrap_or(json!("pending")),
                    "docs_written": d["_replication_stats"]["docs_written"],
                    "error": d.get("_replication_state_reason")}));
            }
        }
    }
    let mut paired = state.pairing.peers().await.unwrap_or(json!([]));
    for p in paired.as_array_mut().into_iter().flatten() {
        let seen = p["key"].as_str().and_then(|k| m.peer_last_seen(k));
        p["last_seen"] = json!(seen);
    }
    let paired_keys: Vec<&str> = paired
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["key"].as_str())
        .collect();
    let mut granted: Map<String, Value> = Map::new();
    for name in names.iter().take(MAX_DBS) {
        if let Ok(sec) = node.security_of(name) {
            for (key, level) in sec.grants() {
                if paired_keys.contains(&key) {
                    continue;
                }
                let e = granted.entry(key.to_string()).or_insert_with(
                    || json!({"key": key, "dbs": {}, "last_seen": m.peer_last_seen(key)}),
                );
                e["dbs"][name.as_str()] = json!(level.name());
            }
        }
    }
    let indexers: Vec<Value> = node
        .db_tasks()
        .into_iter()
        .filter(|t| t["type"] == "indexer")
        .collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    json!({
        "t": now_ms,
        "node": {"key": &*state.key_id, "urls": urls, "qr_svg": qr_svg, "qr_for": qr_for,
                 "uptime": m.uptime_seconds(), "memory": thali_sys::metrics::resident_bytes()},
        "tor": state.tor.as_ref().map(|t| t.status_json(&state.key_id)),
        "dbs": dbs,
        "replications": replications,
        "peers": {"paired": paired, "granted": granted.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
                  "nearby": state.pairing.nearby().await.ok()},
        "indexers": indexers,
        "plugin_errors": m.plugin_error_events(),
        "counters": {"requests": m.requests.get(), "writes": m.writes.get(),
                     "repl_docs": m.repl_docs_written.get()},
    })
}
