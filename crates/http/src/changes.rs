//! `_changes`: normal, longpoll, continuous and eventsource feeds.

use super::database::open;
use super::error::{ApiError, ApiResult};
use super::{AppState, Req};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method};
use axum::response::Response;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use thali_db::{ChangesQuery, Database, FilterFn, Style};
use thali_doc::selector::Selector;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Feed {
    Normal,
    Longpoll,
    Continuous,
    EventSource,
}

/// `since`: an integer, `now`, or a CouchDB-style `N-opaque` string.
fn parse_since(s: &str, db: &Database) -> ApiResult<u64> {
    if s == "now" {
        return Ok(db.update_seq());
    }
    let s = s.trim_matches('"');
    let num = s.split('-').next().unwrap_or("");
    num.parse::<u64>().map_err(|_| {
        ApiError::bad_request(format!(
            "Malformed sequence supplied in 'since' parameter: {s}"
        ))
    })
}

pub async fn changes(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    let db = open(state, name).await?;
    let body = request_body(r).await?;
    let feed = feed_of(r.query.get("feed"))?;
    let mut cq = query_of(r, &db)?;
    add_filter(&mut cq, r, &db, name, body)?;
    let heartbeat = heartbeat_of(r.query.get("heartbeat"))?;
    let timeout = Duration::from_millis(r.query.uint("timeout")?.unwrap_or(60_000));

    if feed == Feed::Normal || cq.descending {
        let (rows, last, pending) = db.changes(&cq).await?;
        return Ok(results_response(&rows, last, Some(pending)));
    }

    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let shutdown = state.shutdown.clone();
    let span = tracing::debug_span!("changes_feed", db = %name);
    tokio::spawn(tracing::Instrument::instrument(
        run_feed(db, cq, feed, heartbeat, timeout, tx, shutdown),
        span,
    ));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let ctype = if feed == Feed::EventSource {
        "text/event-stream"
    } else {
        "application/json"
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("must-revalidate"),
    );
    Ok(resp)
}

/// A POST's JSON body (`null` for GET or an empty body).
async fn request_body(r: &mut Req) -> ApiResult<Value> {
    match r.method {
        Method::GET | Method::HEAD => Ok(Value::Null),
        Method::POST => {
            let bytes = r.bytes().await?;
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            r.require_json()?;
            serde_json::from_slice(&bytes).map_err(|_| ApiError::bad_request("invalid UTF-8 JSON"))
        }
        _ => Err(ApiError::method_not_allowed("GET,HEAD,POST")),
    }
}

fn feed_of(v: Option<&str>) -> ApiResult<Feed> {
    Ok(match v.unwrap_or("normal") {
        "normal" => Feed::Normal,
        "longpoll" => Feed::Longpoll,
        "continuous" => Feed::Continuous,
        "eventsource" => Feed::EventSource,
        other => {
            return Err(ApiError::bad_request(format!(
            "Supported `feed` types: normal, continuous, live, longpoll, eventsource; not {other}"
        )))
        }
    })
}

/// The query parameters other than the filter.
fn query_of(r: &Req, db: &Database) -> ApiResult<ChangesQuery> {
    let q = &r.query;
    let mut cq = ChangesQuery {
        since: 0,
        limit: q.uint("limit")?.map(|l| l as usize),
        descending: q.bool("descending")?,
        include_docs: q.bool("include_docs")?,
        conflicts: q.bool("conflicts")?,
        attachments: q.bool("attachments")?,
        style: match q.get("style") {
            Some("all_docs") => Style::AllDocs,
            _ => Style::MainOnly,
        },
        doc_ids: None,
        design_only: false,
        selector: None,
        filter: None,
    };
    if let Some(s) = q.get("since").or_else(|| q.get("last-event-id")) {
        cq.since = parse_since(s, db)?;
    } else if let Some(s) = r.headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        cq.since = parse_since(s, db)?;
    }
    Ok(cq)
}

fn heartbeat_of(v: Option<&str>) -> ApiResult<Option<Duration>> {
    Ok(match v {
        None => None,
        Some("true") => Some(Duration::from_millis(60_000)),
        Some(v) => Some(Duration::from_millis(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request("heartbeat must be a number"))?
                .max(100),
        )),
    })
}

/// `filter`: the built-in ones (`_doc_ids`, `_design`, `_selector`, `_view`) or a design
/// document's.
fn add_filter(
    cq: &mut ChangesQuery,
    r: &Req,
    db: &Database,
    name: &str,
    body: Value,
) -> ApiResult<()> {
    let q = &r.query;
    match q.get("filter") {
        None => {}
        Some("_doc_ids") => {
            let ids = match body.get("doc_ids") {
                Some(v) => v.clone(),
                None => q.json("doc_ids")?.unwrap_or(Value::Null),
            };
            let Value::Array(ids) = ids else {
                return Err(ApiError::bad_request(
                    "`doc_ids` filter parameter is not a list of doc ids.",
                ));
            };
            cq.doc_ids = Some(
                ids.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect::<HashSet<_>>(),
            );
        }
        Some("_design") => cq.design_only = true,
        Some("_selector") => {
            let sel = body.get("selector").ok_or_else(|| {
                ApiError::bad_request("filter=_selector needs a \"selector\" in the body")
            })?;
            cq.selector =
                Some(Selector::parse(sel).map_err(|e| ApiError::new(400, e.error, e.reason))?);
        }
        Some("_view") => {
            let Some(spec) = q.get("view") else {
                return Err(ApiError::bad_request(
                    "`view` filter parameter is not provided.",
                ));
            };
            let plugins = db.plugins();
            let map = spec.split_once('/').and_then(|(ddoc, view)| {
                let d = plugins.ddoc(&format!("_design/{ddoc}"))?;
                d.views.get(view).map(|v| v.map.clone())
            });
            let Some(map) = map else {
                return Err(ApiError::not_found(format!(
                    "missing_named_view: no view {spec} that runs here"
                )));
            };
            cq.filter = Some(FilterFn {
                name: format!("_view {spec}"),
                func: thali_plugins::design::view_filter(map),
                req: Value::Null,
            });
        }
        Some(f) if f.starts_with('_') => {
            return Err(ApiError::bad_request(format!(
                "filter `{f}` is not supported"
            )));
        }
        Some(f) => {
            let plugins = db.plugins();
            let Some((_, func)) = plugins.filter(f) else {
                return Err(ApiError::not_found(format!(
                    "filter `{f}` is not defined (a design document with filters.NAME in javascript, lua or wasm)"
                )));
            };
            let query: serde_json::Map<String, Value> = q
                .all()
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            cq.filter = Some(FilterFn {
                name: f.to_string(),
                func: func.clone(),
                req: json!({
                    "method": r.method.as_str(),
                    "query": query,
                    "body": body,
                    "userCtx": r.principal.user_ctx(Some(name)),
                }),
            });
        }
    }
    Ok(())
}

async fn run_feed(
    db: Arc<Database>,
    mut cq: ChangesQuery,
    feed: Feed,
    heartbeat: Option<Duration>,
    timeout: Duration,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut updates = db.subscribe();
    let send = |s: String| {
        let tx = tx.clone();
        async move { tx.send(Ok(Bytes::from(s))).await.is_ok() }
    };
    let mut sent = 0usize;
    // With a heartbeat the feed runs until the client leaves; otherwise until `timeout`.
    let mut deadline = Instant::now() + timeout;
    loop {
        updates.borrow_and_update();
        let Ok((rows, last, _)) = db.changes(&cq).await else {
            return;
        };
        if feed == Feed::Longpoll {
            if !rows.is_empty() {
                send(results_body(&rows, last, None)).await;
                return;
            }
        } else {
            for r in rows {
                sent += 1;
                let line = if feed == Feed::EventSource {
                    format!("data: {}\nid: {}\n\n", r.json, r.seq)
                } else {
                    format!("{}\n", r.json)
                };
                if !send(line).await {
                    return;
                }
            }
            if cq.limit.is_some_and(|l| sent >= l) {
                if feed == Feed::Continuous {
                    send(format!("{}\n", json!({ "last_seq": last }))).await;
                }
                return;
            }
            cq.limit = cq.limit.map(|l| l - sent.min(l));
            sent = 0;
            if heartbeat.is_some() {
                deadline = Instant::now() + timeout.max(Duration::from_secs(3600 * 24 * 365));
            }
        }
        cq.since = last;
        // Wait for a change, a heartbeat tick, the timeout or shutdown.
        loop {
            let tick = heartbeat.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() || db.is_deleted() {
                        // A longpoll answer is one JSON object: end it as one.
                        if feed == Feed::Longpoll {
                            send(json!({"results": [], "last_seq": cq.since}).to_string()).await;
                        }
                        return;
                    }
                    break;
                }
                _ = tokio::time::sleep(tick) => {
                    let hb = if feed == Feed::EventSource { "event: heartbeat\ndata: \n\n" } else { "\n" };
                    if heartbeat.is_some() && !send(hb.to_string()).await {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline), if heartbeat.is_none() || feed == Feed::Longpoll => {
                    let end = match feed {
                        Feed::Longpoll => json!({"results": [], "last_seq": cq.since}).to_string(),
                        Feed::EventSource => String::new(),
                        _ => format!("{}\n", json!({ "last_seq": cq.since })),
                    };
                    send(end).await;
                    return;
                }
                _ = shutdown.changed() => {
                    if feed == Feed::Longpoll {
                        send(json!({"results": [], "last_seq": cq.since}).to_string()).await;
                    }
                    return;
                }
            }
        }
    }
}

/// `{"results":[…],"last_seq":N[,"pending":P]}` from pre-serialised rows.
fn results_body(rows: &[thali_db::ChangeRow], last: u64, pending: Option<u64>) -> String {
    let mut out = String::with_capacity(rows.iter().map(|r| r.json.len() + 2).sum::<usize>() + 64);
    out.push_str("{\"results\":[");
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('\n');
        out.push_str(&r.json);
    }
    out.push_str("\n],\"last_seq\":");
    out.push_str(&last.to_string());
    if let Some(p) = pending {
        out.push_str(",\"pending\":");
        out.push_str(&p.to_string());
    }
    out.push_str("}\n");
    out
}

fn results_response(rows: &[thali_db::ChangeRow], last: u64, pending: Option<u64>) -> Response {
    let mut resp = Response::new(Body::from(results_body(rows, last, pending)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("must-revalidate"),
    );
    resp
}
