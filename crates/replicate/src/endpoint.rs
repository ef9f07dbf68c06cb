//! One side of a replication: a database of this node, called directly, or a remote database
//! spoken to over HTTP. Both offer the same protocol steps, so the job never cares which.

use super::attachments::{self, Bodies, Needed};
use super::client::{encode_id, encode_query, Remote, Response, ANSWER_TOO_LARGE, REQUEST_TIMEOUT};
use super::error::{ReplError, ReplResult};
use futures_util::StreamExt;
use hyper::http::Method;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thali_db::{
    AttMode, BulkGetItem, ChangesQuery, Database, DbError, DocOptions, FilterFn, Node, Style,
};
use thali_doc::selector::Selector;
use thali_doc::Rev;

/// A request without a body.
const NO_BODY: Option<&Value> = None;

/// Which changes the source lists.
#[derive(Clone, Debug, Default)]
pub enum Filter {
    #[default]
    None,
    DocIds(Vec<String>),
    Selector(Value),
    /// A filter function `ddoc/name` with its query parameters.
    Function(String, Map<String, Value>),
}

/// One row of the changes feed (`style=all_docs`: every leaf).
#[derive(Clone, Debug)]
pub struct Change {
    pub id: String,
    pub revs: Vec<String>,
}

pub struct ChangesBatch {
    pub rows: Vec<Change>,
    pub last_seq: Value,
    pub pending: Option<u64>,
}

/// A fetched revision, or why it could not be fetched.
pub type Fetched = Result<Value, String>;

pub enum LocalPut {
    Ok(String),
    Conflict,
    Refused(String),
}

pub enum Endpoint {
    Local {
        node: Arc<Node>,
        name: String,
    },
    Remote {
        remote: Box<Remote>,
        /// Cleared the first time `_bulk_get` fails; then revisions come through `open_revs`.
        bulk_get: AtomicBool,
        /// Cleared the first time a revision with attachments is answered other than as
        /// `multipart/related` (pouchdb-server); then bodies come one attachment `GET` each.
        multipart: AtomicBool,
    },
}

fn db_err(e: DbError) -> ReplError {
    match e {
        DbError::NotFound(r) => ReplError::DbNotFound(r),
        DbError::Unauthorized(r) | DbError::Forbidden(r) => ReplError::Unauthorized(r),
        DbError::BadRequest(r) => ReplError::BadSpec(r),
        e => ReplError::Transient(e.to_string()),
    }
}

/// A `since` as the local store understands it (numbers; numeric strings from our own feeds).
fn local_seq(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.split('-').next()?.parse().ok()))
        .unwrap_or(0)
}

/// A seq in a query string: strings verbatim, anything else as JSON.
fn seq_param(v: &Value) -> String {
    match v {
        Value::String(s) => encode_query(s),
        v => encode_query(&v.to_string()),
    }
}

fn refused(r: &Response, what: &str, display: &str) -> ReplError {
    if r.status == 401 || r.status == 403 {
        ReplError::Unauthorized(format!("{display} refused {what}: {}", r.describe()))
    } else {
        ReplError::Transient(format!("{display}: {what}: {}", r.describe()))
    }
}

fn parse_change_row(row: &Value) -> Option<Change> {
    let id = row.get("id")?.as_str()?.to_string();
    let revs = row
        .get("changes")?
        .as_array()?
        .iter()
        .filter_map(|c| c.get("rev")?.as_str().map(str::to_string))
        .collect();
    Some(Change { id, revs })
}

impl Endpoint {
    pub fn display(&self) -> String {
        match self {
            Endpoint::Local { name, .. } => name.clone(),
            Endpoint::Remote { remote, .. } => remote.display().to_string(),
        }
    }

    async fn local_db(node: &Arc<Node>, name: &str) -> ReplResult<Arc<Database>> {
        node.db(name).await.map_err(|e| match e {
            DbError::NotFound(_) => ReplError::DbNotFound(name.to_string()),
            e => db_err(e),
        })
    }

    /// The database info, or `None` when it does not exist.
    pub async fn info(&self) -> ReplResult<Option<Value>> {
        match self {
            Endpoint::Local { node, name } => match node.db(name).await {
                Ok(db) => db.info().map(Some).map_err(db_err),
                Err(DbError::NotFound(_)) => Ok(None),
                Err(e) => Err(db_err(e)),
            },
            Endpoint::Remote { remote, .. } => {
                let r = remote
                    .request(Method::GET, "/", NO_BODY, REQUEST_TIMEOUT)
                    .await?;
                match r.status {
                    200 => {
                        let v = r.json()?;
                        if v.get("update_seq").is_none() {
                            return Err(ReplError::Transient(format!(
                                "{} answered without an update_seq",
                                remote.display()
                            )));
                        }
                        Ok(Some(v))
                    }
                    404 => Ok(None),
                    _ => Err(refused(&r, "access to the database", remote.display())),
                }
            }
        }
    }

    pub async fn create(&self) -> ReplResult<()> {
        match self {
            Endpoint::Local { node, name } => match node.create_db(name).await {
                Ok(_) | Err(DbError::FileExists) => Ok(()),
                Err(e) => Err(db_err(e)),
            },
            Endpoint::Remote { remote, .. } => {
                let r = remote
                    .request(Method::PUT, "/", NO_BODY, REQUEST_TIMEOUT)
                    .await?;
                match r.status {
                    200..=299 | 412 => Ok(()),
                    _ => Err(refused(&r, "to create the database", remote.display())),
                }
            }
        }
    }

    pub async fn get_local(&self, id: &str) -> ReplResult<Option<Value>> {
        match self {
            Endpoint::Local { node, name } => {
                match Self::local_db(node, name)
                    .await?
                    .get_local(id, &thali_db::Caller::node(name))
                {
                    Ok(v) => Ok(Some(v)),
                    Err(DbError::NotFound(_)) => Ok(None),
                    Err(e) => Err(db_err(e)),
                }
            }
            Endpoint::Remote { remote, .. } => {
                let rel = format!("/_local/{}", encode_query(id));
                let r = remote
                    .request(Method::GET, &rel, NO_BODY, REQUEST_TIMEOUT)
                    .await?;
                match r.status {
                    200 => r.json().map(Some),
                    404 => Ok(None),
                    _ => Err(refused(&r, "reading the checkpoint", remote.display())),
                }
            }
        }
    }

    pub async fn put_local(&self, id: &str, mut doc: Value) -> ReplResult<LocalPut> {
        match self {
            Endpoint::Local { node, name } => {
                doc["_id"] = json!(format!("_local/{id}"));
                let db = Self::local_db(node, name).await?;
                let ctx = thali_db::Caller::node(name);
                let mut res = db.bulk_docs(vec![doc], true, &ctx).await.map_err(db_err)?;
                match res.pop() {
                    Some(Ok((_, rev))) => Ok(LocalPut::Ok(rev)),
                    Some(Err((_, _, DbError::Conflict))) => Ok(LocalPut::Conflict),
                    Some(Err((_, _, e))) => Ok(LocalPut::Refused(e.reason())),
                    None => Err(ReplError::Transient("no write result".into())),
                }
            }
            Endpoint::Remote { remote, .. } => {
                let rel = format!("/_local/{}", encode_query(id));
                let r = remote
                    .request(Method::PUT, &rel, Some(&doc), REQUEST_TIMEOUT)
                    .await?;
                match r.status {
                    200..=299 => Ok(LocalPut::Ok(
                        r.json()?["rev"].as_str().unwrap_or("").to_string(),
                    )),
                    409 => Ok(LocalPut::Conflict),
                    _ => Ok(LocalPut::Refused(r.describe())),
                }
            }
        }
    }

    /// Up to `limit` changes after `since`. With `wait`, an empty answer waits up to that long
    /// for the next change (continuous replication).
    pub async fn changes(
        &self,
        since: &Value,
        limit: usize,
        filter: &Filter,
        wait: Option<Duration>,
    ) -> ReplResult<ChangesBatch> {
        match self {
            Endpoint::Local { node, name } => {
                local_changes(node, name, since, limit, filter, wait).await
            }
            Endpoint::Remote { remote, .. } => {
                remote_changes(remote, since, limit, filter, wait).await
            }
        }
    }

    /// `_revs_diff`: for each document the revisions the target lacks and possible ancestors.
    pub async fn revs_diff(&self, req: Map<String, Value>) -> ReplResult<Map<String, Value>> {
        if req.is_empty() {
            return Ok(Map::new());
        }
        let v = match self {
            Endpoint::Local { node, name } => {
                let db = Self::local_db(node, name).await?;
                db.revs_diff(req).await.map_err(db_err)?
            }
            Endpoint::Remote { remote, .. } => {
                let r = remote
                    .request(
                        Method::POST,
                        "/_revs_diff",
                        Some(&Value::Object(req)),
                        REQUEST_TIMEOUT,
                    )
                    .await?;
                if r.status != 200 {
                    return Err(refused(&r, "_revs_diff", remote.display()));
                }
                r.json()?
            }
        };
        match v {
            Value::Object(m) => Ok(m),
            _ => Err(ReplError::Transient(
                "_revs_diff answer is not an object".into(),
            )),
        }
    }

    /// The revisions `(id, rev, atts_since)` with their `_revisions` and `latest`; attachments
    /// as stubs, or with `inline` as base64 except those already present at `atts_since`.
    pub async fn fetch(
        &self,
        items: Vec<(String, String, Vec<String>)>,
        inline: bool,
    ) -> ReplResult<Vec<Fetched>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Endpoint::Local { node, name } => {
                let db = Self::local_db(node, name).await?;
                let items = items
                    .into_iter()
                    .map(|(id, rev, since)| BulkGetItem {
                        id: Some(id),
                        rev: Some(rev),
                        atts_since: Some(since.iter().filter_map(|r| Rev::parse(r)).collect()),
                    })
                    .collect();
                let opts = DocOptions {
                    revs: true,
                    latest: true,
                    atts: if inline {
                        AttMode::Inline
                    } else {
                        AttMode::Stub
                    },
                    ..Default::default()
                };
                let v = db.bulk_get(items, &opts).await.map_err(db_err)?;
                Ok(bulk_get_results(v))
            }
            Endpoint::Remote {
                remote, bulk_get, ..
            } => {
                if bulk_get.load(Ordering::Relaxed) {
                    let body = json!({"docs": items.iter().map(|(id, rev, since)| {
                        let mut d = json!({"id": id, "rev": rev});
                        if !since.is_empty() {
                            d["atts_since"] = json!(since);
                        }
                        d
                    }).collect::<Vec<_>>()});
                    let rel = if inline {
                        "/_bulk_get?revs=true&latest=true&attachments=true"
                    } else {
                        "/_bulk_get?revs=true&latest=true"
                    };
                    let r = match remote
                        .request(Method::POST, rel, Some(&body), REQUEST_TIMEOUT)
                        .await
                    {
                        Err(ReplError::Transient(m))
                            if m.contains(ANSWER_TOO_LARGE) && items.len() > 1 =>
                        {
                            // Too much for one answer: each half on its own.
                            let mut items = items;
                            let second = items.split_off(items.len() / 2);
                            let mut out = Box::pin(self.fetch(items, inline)).await?;
                            out.extend(Box::pin(self.fetch(second, inline)).await?);
                            return Ok(out);
                        }
                        r => r?,
                    };
                    match r.status {
                        200 => return Ok(bulk_get_results(r.json()?)),
                        401 | 403 => return Err(refused(&r, "_bulk_get", remote.display())),
                        _ => {
                            tracing::info!(
                                peer = remote.display(),
                                status = r.status,
                                "no _bulk_get; falling back to open_revs"
                            );
                            bulk_get.store(false, Ordering::Relaxed);
                        }
                    }
                }
                open_revs(remote, items, inline).await
            }
        }
    }

    /// The bodies of `atts` of revision `rev` of `id` (`since`: the target's possible
    /// ancestors), to be read as they come.
    pub async fn bodies(
        &self,
        id: &str,
        rev: &str,
        since: &[String],
        atts: &[Needed],
    ) -> ReplResult<Bodies<'_>> {
        match self {
            Endpoint::Local { node, name } => {
                Ok(Bodies::local(Self::local_db(node, name).await?, atts))
            }
            Endpoint::Remote {
                remote, multipart, ..
            } => {
                if multipart.load(Ordering::Relaxed) {
                    match Bodies::remote(remote, id, rev, since, atts).await? {
                        Some(b) => return Ok(b),
                        None => {
                            tracing::info!(
                                peer = remote.display(),
                                "no multipart answers; attachments come one GET each"
                            );
                            multipart.store(false, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Bodies::remote_each(remote, id, rev, atts))
            }
        }
    }

    /// Writes one replicated revision whose attachments `atts` come from `bodies`, streamed.
    /// `Ok(Some(row))` when the target refused the document.
    pub async fn write_streamed(
        &self,
        doc: Value,
        atts: &[Needed],
        bodies: Bodies<'_>,
    ) -> ReplResult<Option<Value>> {
        match self {
            Endpoint::Local { node, name } => {
                let db = Self::local_db(node, name).await?;
                attachments::write_local(&db, doc, atts, bodies).await
            }
            Endpoint::Remote { remote, .. } => {
                attachments::write_remote(remote, doc, atts, bodies).await
            }
        }
    }

    /// `_bulk_docs` with `new_edits=false`; returns the per-document errors.
    pub async fn write(&self, docs: Vec<Value>) -> ReplResult<Vec<Value>> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Endpoint::Local { node, name } => {
                let db = Self::local_db(node, name).await?;
                let ctx = thali_db::Caller::node(name);
                let res = db.bulk_docs(docs, false, &ctx).await.map_err(db_err)?;
                Ok(res
                    .into_iter()
                    .filter_map(|r| r.err())
                    .map(|(id, rev, e)| json!({"id": id, "rev": rev, "error": e.name(), "reason": e.reason()}))
                    .collect())
            }
            Endpoint::Remote { remote, .. } => Box::pin(write_remote(remote, docs)).await,
        }
    }

    /// What identifies a filter function's code (it is part of the checkpoint id, as in
    /// CouchDB: changing the filter starts a new checkpoint lineage).
    pub async fn filter_code(&self, spec: &str) -> ReplResult<String> {
        let missing = || {
            ReplError::BadSpec(format!(
                "filter {spec} is not defined in {}",
                self.display()
            ))
        };
        let (ddoc, fname) = spec.split_once('/').ok_or_else(missing)?;
        match self {
            Endpoint::Local { node, name } => {
                let plugins = Self::local_db(node, name).await?.plugins();
                let (d, _) = plugins.filter(spec).ok_or_else(missing)?;
                Ok(format!("{}/{fname}", d.code_hash))
            }
            Endpoint::Remote { remote, .. } => {
                let rel = format!("/_design/{}", encode_query(ddoc));
                let r = remote
                    .request(Method::GET, &rel, NO_BODY, REQUEST_TIMEOUT)
                    .await?;
                if r.status == 404 {
                    return Err(missing());
                }
                if r.status != 200 {
                    return Err(refused(
                        &r,
                        "reading the filter's design document",
                        remote.display(),
                    ));
                }
                let d = r.json()?;
                let code = d
                    .get("filters")
                    .and_then(|f| f.get(fname))
                    .ok_or_else(missing)?;
                let digests: Vec<&Value> = d
                    .get("_attachments")
                    .and_then(Value::as_object)
                    .map(|a| a.values().filter_map(|v| v.get("digest")).collect())
                    .unwrap_or_default();
                Ok(json!([d.get("language"), code, digests]).to_string())
            }
        }
    }

    pub async fn ensure_full_commit(&self) -> ReplResult<()> {
        if let Endpoint::Remote { remote, .. } = self {
            // Every thali write is durable already; CouchDB 3 answers 201 without work too.
            // Non-2xx answers are tolerated: old servers lack the endpoint.
            remote
                .request(
                    Method::POST,
                    "/_ensure_full_commit",
                    Some(&json!({})),
                    REQUEST_TIMEOUT,
                )
                .await?;
        }
        Ok(())
    }
}

fn bulk_get_results(mut v: Value) -> Vec<Fetched> {
    let mut out = Vec::new();
    let results = match v.get_mut("results") {
        Some(Value::Array(a)) => std::mem::take(a),
        _ => Vec::new(),
    };
    for mut r in results {
        let docs = match r.get_mut("docs") {
            Some(Value::Array(a)) => std::mem::take(a),
            _ => continue,
        };
        for mut d in docs {
            match (d.get_mut("ok").map(Value::take), d.get("error")) {
                (Some(doc), _) => out.push(Ok(doc)),
                (_, Some(e)) => out.push(Err(format!(
                    "{} {}: {}",
                    e["id"].as_str().unwrap_or("?"),
                    e["rev"].as_str().unwrap_or("?"),
                    e["reason"].as_str().unwrap_or("error")
                ))),
                _ => {}
            }
        }
    }
    out
}

/// The fallback for peers without `_bulk_get`: one `open_revs` request per document, a few at
/// a time.
async fn open_revs(
    remote: &Remote,
    items: Vec<(String, String, Vec<String>)>,
    inline: bool,
) -> ReplResult<Vec<Fetched>> {
    let mut per_doc: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (id, rev, since) in items {
        match per_doc.last_mut() {
            Some((last, revs, s)) if *last == id => {
                revs.push(rev);
                s.extend(since);
            }
            _ => per_doc.push((id, vec![rev], since)),
        }
    }
    let results: Vec<ReplResult<Vec<Fetched>>> = futures_util::stream::iter(per_doc)
        .map(|(id, revs, since)| async move {
            let mut rel = format!(
                "/{}?revs=true&latest=true&open_revs={}",
                encode_id(&id),
                encode_query(&json!(revs).to_string())
            );
            if inline {
                rel.push_str("&attachments=true");
            }
            if inline && !since.is_empty() {
                rel.push_str(&format!(
                    "&atts_since={}",
                    encode_query(&json!(since).to_string())
                ));
            }
            let r = remote
                .request(Method::GET, &rel, NO_BODY, REQUEST_TIMEOUT)
                .await?;
            match r.status {
                200 => Ok(r
                    .json()?
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| match e.get("ok") {
                        Some(doc) => Ok(doc.clone()),
                        None => Err(format!("{id}: missing {}", e["missing"])),
                    })
                    .collect()),
                404 => Ok(vec![Err(format!("{id}: not found"))]),
                _ => Err(refused(&r, "open_revs", remote.display())),
            }
        })
        .buffered(8)
        .collect()
        .await;
    let mut out = Vec::new();
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// A `_bulk_docs` body borrowing its documents (`json!` would deep-copy each one).
#[derive(serde::Serialize)]
struct BulkDocsBody<'a> {
    docs: &'a [Value],
    new_edits: bool,
}

async fn write_remote(remote: &Remote, docs: Vec<Value>) -> ReplResult<Vec<Value>> {
    let body = BulkDocsBody {
        docs: &docs,
        new_edits: false,
    };
    let r = remote
        .request(Method::POST, "/_bulk_docs", Some(&body), REQUEST_TIMEOUT)
        .await?;
    match r.status {
        200..=299 | 417 => Ok(r
            .json()?
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e.get("error").is_some())
            .cloned()
            .collect()),
        413 if docs.len() > 1 => {
            let mut docs = docs;
            let second = docs.split_off(docs.len() / 2);
            let mut errs = Box::pin(write_remote(remote, docs)).await?;
            errs.extend(Box::pin(write_remote(remote, second)).await?);
            Ok(errs)
        }
        // The whole batch refused: each document is a write failure, the job goes on.
        401 | 403 | 413 => {
            let reason = r.describe();
            Ok(docs
                .iter()
                .map(|d| json!({"id": d["_id"], "rev": d["_rev"], "error": "forbidden", "reason": reason}))
                .collect())
        }
        _ => Err(ReplError::Transient(format!(
            "{}: _bulk_docs: {}",
            remote.display(),
            r.describe()
        ))),
    }
}

/// [`Endpoint::changes`] of a local database.
async fn local_changes(
    node: &Arc<Node>,
    name: &str,
    since: &Value,
    limit: usize,
    filter: &Filter,
    wait: Option<Duration>,
) -> ReplResult<ChangesBatch> {
    let db = Endpoint::local_db(node, name).await?;
    let mut q = ChangesQuery {
        since: local_seq(since),
        limit: Some(limit),
        style: Style::AllDocs,
        ..Default::default()
    };
    match filter {
        Filter::None => {}
        Filter::DocIds(ids) => q.doc_ids = Some(ids.iter().cloned().collect::<HashSet<_>>()),
        Filter::Selector(s) => {
            q.selector = Some(Selector::parse(s).map_err(|e| ReplError::BadSpec(e.to_string()))?)
        }
        Filter::Function(fname, params) => {
            let plugins = db.plugins();
            let (_, f) = plugins.filter(fname).ok_or_else(|| {
                ReplError::BadSpec(format!("filter {fname} is not defined in {name}"))
            })?;
            q.filter = Some(FilterFn {
                name: fname.clone(),
                func: f.clone(),
                req: json!({"method": "GET", "query": params, "body": null, "userCtx": thali_db::admin_ctx(name)}),
            });
        }
    }
    let mut updates = db.subscribe();
    let mut res = db.changes(&q).await.map_err(db_err)?;
    if res.0.is_empty() {
        if let Some(wait) = wait {
            let _ =
                tokio::time::timeout(wait, updates.wait_for(|s| *s > q.since || db.is_deleted()))
                    .await;
            res = db.changes(&q).await.map_err(db_err)?;
        }
    }
    let (rows, last, pending) = res;
    let rows = rows
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(&r.json).ok())
        .filter_map(|v| parse_change_row(&v))
        .collect();
    Ok(ChangesBatch {
        rows,
        last_seq: json!(last),
        pending: Some(pending),
    })
}

/// [`Endpoint::changes`] of a remote database, through its `_changes` (longpoll when waiting).
async fn remote_changes(
    remote: &Remote,
    since: &Value,
    limit: usize,
    filter: &Filter,
    wait: Option<Duration>,
) -> ReplResult<ChangesBatch> {
    let mut rel = format!(
        "/_changes?style=all_docs&since={}&limit={limit}",
        seq_param(since)
    );
    let mut timeout = REQUEST_TIMEOUT;
    if let Some(w) = wait {
        rel.push_str(&format!("&feed=longpoll&timeout={}", w.as_millis()));
        timeout += w;
    }
    let (method, body) = match filter {
        Filter::None => (Method::GET, None),
        Filter::DocIds(ids) => {
            rel.push_str("&filter=_doc_ids");
            (Method::POST, Some(json!({ "doc_ids": ids })))
        }
        Filter::Selector(s) => {
            rel.push_str("&filter=_selector");
            (Method::POST, Some(json!({ "selector": s })))
        }
        Filter::Function(name, params) => {
            rel.push_str(&format!("&filter={}", encode_query(name)));
            for (k, v) in params {
                let v = match v {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                rel.push_str(&format!("&{}={}", encode_query(k), encode_query(&v)));
            }
            (Method::GET, None)
        }
    };
    let r = remote.request(method, &rel, body.as_ref(), timeout).await?;
    if r.status != 200 {
        return Err(match r.status {
            404 => ReplError::DbNotFound(remote.display().to_string()),
            400 => ReplError::BadSpec(format!(
                "{} refused the changes request: {}",
                remote.display(),
                r.describe()
            )),
            _ => refused(&r, "reading changes", remote.display()),
        });
    }
    let v = r.json()?;
    let rows = v
        .get("results")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            ReplError::Transient(format!(
                "{}: _changes answer without results",
                remote.display()
            ))
        })?
        .iter()
        .filter_map(parse_change_row)
        .collect();
    Ok(ChangesBatch {
        rows,
        last_seq: v.get("last_seq").cloned().unwrap_or_else(|| since.clone()),
        pending: v.get("pending").and_then(Value::as_u64),
    })
}
