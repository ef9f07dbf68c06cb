//! Database-level endpoints.

use super::error::{ApiError, ApiResult};
use super::respond::{ok, status};
use super::stream;
use super::{AppState, Req};
use axum::http::{header, HeaderValue, Method};
use axum::response::Response;
use serde_json::{json, Value};
use std::sync::Arc;
use thali_db::{
    doc_input, AllDocsPart, AllDocsQuery, AttMode, BulkGetItem, Database, DbError, DocInput,
    DocOptions, DocResult,
};
use thali_doc::Rev;

/// Most items one `_bulk_get` or `_revs_diff` takes (CouchDB's `max_bulk_get_count` default):
/// their answers can be far larger than the request. `_bulk_docs` answers in proportion to its
/// body, which the request size bounds.
const MAX_BULK_COUNT: usize = 10_000;
/// Most revisions one `_revs_diff` asks about.
const MAX_REVS_DIFF: usize = 100_000;

pub async fn open(state: &AppState, name: &str) -> ApiResult<Arc<Database>> {
    Ok(state.node.db(name).await?)
}

pub async fn db_root(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    match r.method {
        Method::GET | Method::HEAD => {
            let db = open(state, name).await?;
            Ok(ok(db.info()?))
        }
        Method::PUT => {
            state.node.create_db(name).await?;
            let mut resp = status(201, json!({"ok": true}));
            if let Ok(v) = HeaderValue::from_str(&format!("/{name}")) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Ok(resp)
        }
        Method::DELETE => {
            if r.query.get("rev").is_some() {
                return Err(ApiError::bad_request(
                    "You tried to DELETE a database with a ?rev= parameter. Did you mean to \
                     DELETE a document instead?",
                ));
            }
            state.node.delete_db(name).await?;
            Ok(ok(json!({"ok": true})))
        }
        Method::POST => {
            let db = open(state, name).await?;
            r.require_json()?;
            let doc = r.json().await?;
            if !doc.is_object() {
                return Err(ApiError::bad_request("Document must be a JSON object"));
            }
            let mut res = db.bulk_docs(vec![doc], true, &r.caller(name)).await?;
            match res.pop() {
                Some(Ok((id, rev))) => Ok(super::respond::with_etag(
                    status(201, json!({"ok": true, "id": id, "rev": rev})),
                    &rev,
                )),
                Some(Err((_, _, e))) => Err(e.into()),
                None => Err(ApiError::new(500, "internal_server_error", "no result")),
            }
        }
        _ => Err(ApiError::method_not_allowed("DELETE,GET,HEAD,POST,PUT")),
    }
}

fn result_json(r: &DocResult) -> Value {
    match r {
        Ok((id, rev)) => json!({"ok": true, "id": id, "rev": rev}),
        Err((id, rev, e)) => {
            let mut v = json!({"id": id, "error": e.name(), "reason": e.reason()});
            // CouchDB names the revision in a refused row, except in a conflict (there is no
            // revision of that document the request could have meant).
            match rev {
                Some(rev) if !matches!(e, DbError::Conflict) => v["rev"] = json!(rev),
                _ => {}
            }
            v
        }
    }
}

pub async fn bulk_docs(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    if r.method != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    let db = open(state, name).await?;
    r.require_json()?;
    let mut body = r.json().await?;
    // Taken, not cloned: the documents are the bulk of the request.
    let Some(Value::Array(docs)) = body.get_mut("docs").map(Value::take) else {
        return Err(ApiError::bad_request(
            "POST body must include `docs` parameter.",
        ));
    };
    let new_edits = match body.get("new_edits") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`new_edits` parameter must be a boolean.",
            ))
        }
    };
    let inputs: Vec<DocInput> = docs.into_iter().map(doc_input).collect();
    // As in CouchDB, a document that does not parse (an illegal `_id`, a bad `_rev`, a bad
    // special member) or a replicated one without revisions fails the whole request.
    for input in &inputs {
        match input {
            Err((_, e)) => return Err(e.clone().into()),
            Ok(d) if !new_edits && d.rev.is_none() && d.revisions.is_none() && !d.bad_rev => {
                return Err(DbError::BadRequest(
                    "When `new_edits: false`, the document needs `_rev` or `_revisions` \
                     specified"
                        .into(),
                )
                .into())
            }
            Ok(_) => {}
        }
    }
    let results = db.write_docs(inputs, new_edits, &r.caller(name)).await?;
    let out: Vec<Value> = results
        .iter()
        .filter(|r| new_edits || r.is_err())
        .map(result_json)
        .collect();
    Ok(status(201, Value::Array(out)))
}

pub async fn bulk_get(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    if r.method != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    let db = open(state, name).await?;
    r.require_json()?;
    let body = r.json().await?;
    let Some(docs) = body.get("docs").and_then(Value::as_array) else {
        return Err(ApiError::bad_request("Missing JSON list of 'docs'."));
    };
    if docs.len() > MAX_BULK_COUNT {
        return Err(thali_db::DbError::TooMany {
            error: "max_bulk_get_count_exceeded",
            reason: MAX_BULK_COUNT.to_string(),
        }
        .into());
    }
    let mut items = Vec::with_capacity(docs.len());
    let mut seen = std::collections::HashSet::new();
    for d in docs {
        let atts_since = match d.get("atts_since") {
            Some(Value::Array(a)) => Some(
                a.iter()
                    .filter_map(|v| v.as_str().and_then(Rev::parse))
                    .collect(),
            ),
            _ => None,
        };
        let item = BulkGetItem {
            id: d.get("id").and_then(Value::as_str).map(str::to_string),
            rev: d.get("rev").and_then(Value::as_str).map(str::to_string),
            atts_since,
        };
        // The same item asked twice is answered once: a small request must not buy a
        // large answer.
        if seen.insert(item.clone()) {
            items.push(item);
        }
    }
    let flag = |k: &str| -> ApiResult<bool> {
        Ok(r.query.bool(k)? || body.get(k) == Some(&Value::Bool(true)))
    };
    let opts = DocOptions {
        revs: flag("revs")?,
        latest: flag("latest")?,
        // Attachment bytes are streamed inline by `stream::Sink::doc`.
        atts: if flag("attachments")? {
            AttMode::Follows
        } else {
            AttMode::Stub
        },
        ..Default::default()
    };
    if r.accepts("multipart/mixed") || r.accepts("multipart/related") {
        return Ok(bulk_get_multipart(db, items, opts));
    }
    Ok(stream::response(
        axum::http::StatusCode::OK,
        "application/json",
        db,
        move |db, out| {
            out.write(b"{\"results\":[")?;
            out.list(&items, |out, item| {
                out.write(b"{\"id\":")?;
                out.json(&item.id)?;
                out.write(b",\"docs\":[")?;
                let docs = db
                    .bulk_get_item(item, &opts)
                    .map_err(std::io::Error::other)?;
                out.list(docs, |out, d| match d {
                    Ok(rev) => stream::wrapped_doc(out, db, "ok", rev),
                    Err(e) => out.json(&e),
                })?;
                out.write(b"]}")
            })?;
            out.write(b"]}\n")
        },
    ))
}

/// `_bulk_get` as CouchDB answers a client accepting multipart: one `multipart/mixed` part per
/// revision (named by `X-Doc-Id` and `X-Rev-Id`), attachment bodies streamed from the store.
fn bulk_get_multipart(
    db: std::sync::Arc<thali_db::Database>,
    items: Vec<BulkGetItem>,
    opts: DocOptions,
) -> Response {
    let outer = thali_db::random_hex(16);
    let ctype = format!("multipart/mixed; boundary=\"{outer}\"");
    stream::response(axum::http::StatusCode::OK, &ctype, db, move |db, w| {
        for item in &items {
            let docs = db
                .bulk_get_item(item, &opts)
                .map_err(std::io::Error::other)?;
            for d in docs {
                let (id, rev) = match &d {
                    Ok(o) => (o.doc.get("_id"), o.doc.get("_rev")),
                    Err(e) => (e["error"].get("id"), e["error"].get("rev")),
                };
                let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
                let (id, rev) = (text(id), text(rev));
                let d = d.map_err(|mut e| e["error"].take());
                let headers = [("X-Doc-Id", id.as_str()), ("X-Rev-Id", rev.as_str())];
                crate::document::write_mixed_part(w, db, &outer, d, &headers)?;
            }
        }
        w.write(format!("--{outer}--").as_bytes())
    })
}

pub async fn revs_diff(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    if r.method != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    let db = open(state, name).await?;
    r.require_json()?;
    let Value::Object(body) = r.json().await? else {
        return Err(ApiError::bad_request("Request body must be a JSON object"));
    };
    let revs: usize = body
        .values()
        .map(|v| v.as_array().map_or(1, Vec::len))
        .sum();
    if body.len() > MAX_BULK_COUNT || revs > MAX_REVS_DIFF {
        return Err(thali_db::DbError::TooMany {
            error: "too_large",
            reason: format!(
                "_revs_diff takes at most {MAX_BULK_COUNT} documents and {MAX_REVS_DIFF} revisions"
            ),
        }
        .into());
    }
    Ok(ok(db.revs_diff(body).await?))
}

/// `_all_docs`, or with `design_only` `_design_docs` (the same, within `_design/`).
pub async fn all_docs(
    state: &AppState,
    r: &mut Req,
    name: &str,
    design_only: bool,
) -> ApiResult<Response> {
    let db = open(state, name).await?;
    let body_keys = r.query_body().await?;
    let query = all_docs_query(r, body_keys, design_only)?;
    // An inverted key range is no error here (CouchDB answers no rows; views refuse it).
    // Streamed: `_all_docs` of a large database would otherwise be held whole, twice (as
    // values, then as text).
    Ok(super::stream::response(
        axum::http::StatusCode::OK,
        "application/json",
        db,
        move |db, sink| {
            let cut = |e: std::io::Error| DbError::Internal(e.to_string());
            let mut first = true;
            let res = db.all_docs_with(&query, &mut |part| {
                match part {
                    AllDocsPart::Head { total_rows, offset } => sink
                        .write(b"{\"total_rows\":")
                        .and_then(|()| sink.json(&total_rows))
                        .and_then(|()| sink.write(b",\"offset\":"))
                        .and_then(|()| sink.json(&offset))
                        .and_then(|()| sink.write(b",\"rows\":[")),
                    AllDocsPart::Row(row) => {
                        if !std::mem::take(&mut first) {
                            sink.write(b",").map_err(cut)?;
                        }
                        sink.json(&row)
                    }
                }
                .map_err(cut)
            });
            if let Err(e) = res {
                // Headers are gone: the best left is to cut the answer short.
                return Err(std::io::Error::other(e.to_string()));
            }
            sink.write(b"]")?;
            if query.update_seq {
                sink.write(b",\"update_seq\":")?;
                sink.json(&db.update_seq())?;
            }
            sink.write(b"}")
        },
    ))
}

/// `_all_docs` parameters (and `keys` from a POST body); `_design_docs` clamps the range to
/// design documents.
fn all_docs_query(r: &Req, body_keys: Option<Value>, design_only: bool) -> ApiResult<AllDocsQuery> {
    let q = &r.query;
    let keys = match body_keys.or(q.json("keys")?) {
        None => None,
        Some(Value::Array(a)) => Some(a),
        Some(_) => return Err(ApiError::query_parse("`keys` member must be an array.")),
    };
    let as_key =
        |v: Option<Value>| -> Option<String> { v.and_then(|v| v.as_str().map(str::to_string)) };
    let key = q.json("key")?;
    if keys.is_some() && (key.is_some() || q.get("startkey").is_some() || q.get("endkey").is_some())
    {
        return Err(ApiError::query_parse(
            "`keys` is incompatible with `key`, `start_key` and `end_key`",
        ));
    }
    let limit = q.uint("limit")?.map(|l| l as usize);
    let mut query = AllDocsQuery {
        keys,
        start: as_key(q.json_alias(&["startkey", "start_key"])?),
        end: as_key(q.json_alias(&["endkey", "end_key"])?),
        inclusive_end: q.bool_or("inclusive_end", true)?,
        descending: q.bool("descending")?,
        limit,
        skip: q.uint("skip")?.unwrap_or(0) as usize,
        include_docs: q.bool("include_docs")?,
        conflicts: q.bool("conflicts")?,
        attachments: q.bool("attachments")?,
        update_seq: q.bool("update_seq")?,
    };
    if let Some(k) = key {
        let k = k.as_str().map(str::to_string);
        match k {
            Some(k) => {
                query.start = Some(k.clone());
                query.end = Some(k);
                query.inclusive_end = true;
            }
            None => query.limit = Some(0),
        }
    }
    if design_only {
        // Within `_design/` whatever the range asked ("_design0" is no legal id: past them all).
        let (lo, hi) = ("_design/".to_string(), "_design0".to_string());
        let (low, high) = if query.descending {
            (&mut query.end, &mut query.start)
        } else {
            (&mut query.start, &mut query.end)
        };
        *low = Some(low.take().map_or(lo.clone(), |s| s.max(lo)));
        *high = Some(high.take().map_or(hi.clone(), |s| s.min(hi)));
    }
    Ok(query)
}

/// Every write is durable before it is answered, so there is nothing left to commit; the
/// replicators only need the 201 and the `instance_start_time`.
pub async fn ensure_full_commit(state: &AppState, r: &Req, name: &str) -> ApiResult<Response> {
    if r.method != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    open(state, name).await?;
    Ok(status(201, json!({"ok": true, "instance_start_time": "0"})))
}

pub async fn compact(state: &AppState, r: &Req, name: &str) -> ApiResult<Response> {
    if r.method != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    r.require_json()?;
    let db = open(state, name).await?;
    db.start_compaction();
    Ok(status(202, json!({"ok": true})))
}

pub async fn view_cleanup(state: &AppState, r: &Req, name: &str) -> ApiResult<Response> {
    if r.method != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    let removed = open(state, name).await?.view_cleanup()?;
    tracing::debug!(db = name, removed, "view cleanup");
    Ok(status(202, json!({"ok": true})))
}

pub async fn security(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    let db = open(state, name).await?;
    match r.method {
        Method::GET | Method::HEAD => Ok(ok(db.security()?.as_value().clone())),
        Method::PUT => {
            let body = r.json().await?;
            db.set_security(body).await?;
            Ok(ok(json!({"ok": true})))
        }
        _ => Err(ApiError::method_not_allowed("GET,HEAD,PUT")),
    }
}

pub async fn revs_limit(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    let db = open(state, name).await?;
    match r.method {
        Method::GET | Method::HEAD => Ok(ok(json!(db.revs_limit()))),
        Method::PUT => {
            let body = r.json().await?;
            let n = body
                .as_u64()
                .ok_or_else(|| ApiError::bad_request("Rev limit has to be an integer"))?;
            db.set_revs_limit(n).await?;
            Ok(ok(json!({"ok": true})))
        }
        _ => Err(ApiError::method_not_allowed("GET,HEAD,PUT")),
    }
}

pub async fn local_docs(state: &AppState, r: &Req, name: &str) -> ApiResult<Response> {
    if !matches!(r.method, Method::GET | Method::HEAD) {
        return Err(ApiError::method_not_allowed("GET,HEAD"));
    }
    let db = open(state, name).await?;
    let rows = db.local_docs()?;
    Ok(ok(
        json!({"total_rows": null, "offset": null, "rows": rows}),
    ))
}
