//! Reads: one document with CouchDB's options, `open_revs`, `_bulk_get`, `_revs_diff`,
//! `_all_docs` and attachments.

use super::{Database, DbError, DbResult};
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use thali_doc::{object, Rev};
use thali_store::blob::Blob;
use thali_store::{AttMeta, DocInfo, RevBody};

/// How attachments appear in a rendered document.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttMode {
    /// `stub: true` entries.
    #[default]
    Stub,
    /// base64 `data` inline.
    Inline,
    /// `follows: true`; the bytes go in multipart parts after the JSON.
    Follows,
}

#[derive(Clone, Debug, Default)]
pub struct DocOptions {
    pub revs: bool,
    pub revs_info: bool,
    pub conflicts: bool,
    pub deleted_conflicts: bool,
    pub local_seq: bool,
    pub latest: bool,
    /// Applies to attachments newer than `atts_since` (all of them when that is empty).
    pub atts: AttMode,
    pub atts_since: Option<Vec<Rev>>,
}

impl DocOptions {
    /// The documents of feed, `_all_docs` and view rows (`include_docs`): `conflicts` and
    /// `attachments` as asked, bodies inline. View rows are values held while the answer is
    /// built, so `attachments=true` there is bounded by the request, not streamed.
    pub fn for_rows(conflicts: bool, attachments: bool) -> DocOptions {
        DocOptions {
            conflicts,
            atts: if attachments {
                AttMode::Inline
            } else {
                AttMode::Stub
            },
            ..Default::default()
        }
    }
}

#[derive(Clone)]
pub enum OpenRevs {
    All,
    List(Vec<Rev>),
}

/// One rendered revision; `follows` lists, in JSON order, the attachments whose bytes must
/// follow in a multipart body.
#[derive(Debug)]
pub struct RevisionOut {
    pub doc: Map<String, Value>,
    pub follows: Vec<(String, AttMeta)>,
}

#[derive(Debug, Default)]
pub struct AllDocsQuery {
    pub keys: Option<Vec<Value>>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub inclusive_end: bool,
    pub descending: bool,
    pub limit: Option<usize>,
    pub skip: usize,
    pub include_docs: bool,
    pub conflicts: bool,
    pub attachments: bool,
    pub update_seq: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BulkGetItem {
    pub id: Option<String>,
    pub rev: Option<String>,
    pub atts_since: Option<Vec<Rev>>,
}

/// What `Database::all_docs_with` emits.
pub enum AllDocsPart {
    /// Before the first row; `offset` is `None` for a `keys` query (CouchDB answers `null`).
    Head {
        total_rows: u64,
        offset: Option<usize>,
    },
    Row(Value),
}

impl Database {
    fn info_of(&self, id: &str) -> DbResult<DocInfo> {
        self.check_alive()?;
        match self.data().doc_info(id)? {
            Some(i) if !i.tree.is_empty() => Ok(i),
            _ => Err(DbError::missing()),
        }
    }

    /// `GET /db/doc` (without `open_revs`).
    pub fn get_doc(&self, id: &str, rev: Option<&Rev>, opts: &DocOptions) -> DbResult<RevisionOut> {
        thali_sys::metrics::get().reads.inc();
        let info = self.info_of(id)?;
        let rev = match rev {
            Some(r) if opts.latest => info
                .tree
                .leaves_under(r)
                .into_iter()
                .next()
                .map(|l| l.rev)
                .ok_or_else(DbError::missing)?,
            Some(r) => r.clone(),
            None => {
                let w = info.tree.winner().ok_or_else(DbError::missing)?;
                if w.deleted {
                    return Err(DbError::NotFound("deleted".into()));
                }
                w.rev
            }
        };
        let mut info = info;
        let body = self
            .take_body(id, &mut info, &rev)?
            .ok_or_else(DbError::missing)?;
        Ok(self.render(id, &info, &rev, body, opts))
    }

    /// [`Database::body_of`], moving the current body out of `info` (each revision rendered
    /// once).
    fn take_body(&self, id: &str, info: &mut DocInfo, rev: &Rev) -> DbResult<Option<RevBody>> {
        if !info.tree.get(rev).is_some_and(|n| n.available) {
            return Ok(None);
        }
        Ok(self.data().take_body(id, info, &rev.to_string())?)
    }

    fn body_of(&self, id: &str, info: &DocInfo, rev: &Rev) -> DbResult<Option<RevBody>> {
        if !info.tree.get(rev).is_some_and(|n| n.available) {
            return Ok(None);
        }
        Ok(self.data().body_of(id, info, &rev.to_string())?)
    }

    /// `open_revs`: per requested revision the document, or `Err(rev)` when it is missing.
    pub(crate) fn open_revs_now(
        &self,
        id: &str,
        which: &OpenRevs,
        opts: &DocOptions,
    ) -> DbResult<Vec<Result<RevisionOut, String>>> {
        self.check_alive()?;
        let mut info = self.data().doc_info(id)?.unwrap_or_default();
        let revs: Vec<(Rev, String)> = match which {
            OpenRevs::All => {
                if info.tree.is_empty() {
                    return Err(DbError::missing());
                }
                info.tree
                    .leaves()
                    .into_iter()
                    .map(|l| (l.rev.clone(), l.rev.to_string()))
                    .collect()
            }
            OpenRevs::List(list) => {
                let mut out = Vec::new();
                let mut seen = HashSet::new();
                for r in list {
                    let targets = if opts.latest {
                        let under = info.tree.leaves_under(r);
                        if under.is_empty() {
                            vec![r.clone()]
                        } else {
                            under.into_iter().map(|l| l.rev).collect()
                        }
                    } else {
                        vec![r.clone()]
                    };
                    for t in targets {
                        if seen.insert(t.clone()) {
                            out.push((t, r.to_string()));
                        }
                    }
                }
                out
            }
        };
        let mut results = Vec::with_capacity(revs.len());
        // Each revision is listed once, so the current body can be moved out of `info`.
        for (rev, asked) in revs {
            match self.take_body(id, &mut info, &rev)? {
                Some(body) => results.push(Ok(self.render(id, &info, &rev, body, opts))),
                None => results.push(Err(if opts.latest { asked } else { rev.to_string() })),
            }
        }
        Ok(results)
    }

    pub(super) fn render(
        &self,
        id: &str,
        info: &DocInfo,
        rev: &Rev,
        body: RevBody,
        opts: &DocOptions,
    ) -> RevisionOut {
        let mut doc = body.body;
        // First, as CouchDB prints them; the body keeps its members' order after them.
        doc.shift_insert(0, "_id".into(), json!(id));
        doc.shift_insert(1, "_rev".into(), json!(rev.to_string()));
        if body.deleted {
            doc.insert("_deleted".into(), json!(true));
        }
        let path = info.tree.path(rev);
        let mut follows = Vec::new();
        if !body.atts.is_empty() {
            // Attachments at or before the newest `atts_since` revision on our path are stubs.
            let since_pos = opts.atts_since.as_ref().map(|since| {
                since
                    .iter()
                    .filter(|s| {
                        s.pos <= rev.pos
                            && path
                                .get((rev.pos - s.pos) as usize)
                                .is_some_and(|p| *p == s.id)
                    })
                    .map(|s| s.pos)
                    .max()
                    .unwrap_or(0)
            });
            let mut atts = Map::new();
            for (name, m) in body.atts {
                let mut a = json!({
                    "content_type": m.content_type,
                    "digest": m.digest,
                    "length": m.length,
                    "revpos": m.revpos,
                });
                let wanted = opts.atts != AttMode::Stub && since_pos.is_none_or(|p| m.revpos > p);
                match (wanted, opts.atts) {
                    (true, AttMode::Inline) => {
                        let data = self
                            .data()
                            .att(&m.digest)
                            .ok()
                            .flatten()
                            .unwrap_or_default();
                        a["data"] = json!(base64::engine::general_purpose::STANDARD.encode(data));
                        // CouchDB gives no `length` beside inline `data`.
                        if let Some(m) = a.as_object_mut() {
                            m.shift_remove("length");
                        }
                    }
                    (true, AttMode::Follows) => {
                        a["follows"] = json!(true);
                        follows.push((name.clone(), m));
                    }
                    _ => a["stub"] = json!(true),
                }
                atts.insert(name, a);
            }
            doc.insert("_attachments".into(), Value::Object(atts));
        }
        if opts.revs {
            doc.insert("_revisions".into(), json!({"start": rev.pos, "ids": path}));
        }
        if opts.revs_info {
            let infos: Vec<Value> = path
                .iter()
                .enumerate()
                .map(|(i, rid)| {
                    let r = Rev::new(rev.pos - i as u64, rid.clone());
                    let status = match info.tree.get(&r) {
                        Some(n) if n.available && n.deleted => "deleted",
                        Some(n) if n.available => "available",
                        _ => "missing",
                    };
                    json!({"rev": r.to_string(), "status": status})
                })
                .collect();
            doc.insert("_revs_info".into(), Value::Array(infos));
        }
        if opts.conflicts || opts.deleted_conflicts {
            let leaves = info.tree.leaves();
            let winner = leaves.first().map(|l| l.rev.clone());
            let others = leaves.iter().filter(|l| Some(&l.rev) != winner.as_ref());
            let (del, live): (Vec<_>, Vec<_>) = others.partition(|l| l.deleted);
            if opts.conflicts && !live.is_empty() {
                let v: Vec<String> = live.iter().map(|l| l.rev.to_string()).collect();
                doc.insert("_conflicts".into(), json!(v));
            }
            if opts.deleted_conflicts && !del.is_empty() {
                let v: Vec<String> = del.iter().map(|l| l.rev.to_string()).collect();
                doc.insert("_deleted_conflicts".into(), json!(v));
            }
        }
        if opts.local_seq {
            doc.insert("_local_seq".into(), json!(info.seq));
        }
        RevisionOut { doc, follows }
    }

    /// The metadata of one attachment of `rev` (or of the winner); its bytes are read with
    /// `attachment_range`.
    pub fn get_attachment(&self, id: &str, rev: Option<&Rev>, name: &str) -> DbResult<AttMeta> {
        let info = self.info_of(id)?;
        let rev = match rev {
            Some(r) => r.clone(),
            None => {
                let w = info.tree.winner().ok_or_else(DbError::missing)?;
                if w.deleted {
                    return Err(DbError::NotFound("deleted".into()));
                }
                w.rev
            }
        };
        let body = self
            .body_of(id, &info, &rev)?
            .ok_or_else(DbError::missing)?;
        let meta = body
            .atts
            .get(name)
            .cloned()
            .ok_or_else(|| DbError::NotFound("Document is missing attachment".into()))?;
        Ok(meta)
    }

    /// Calls `f` with the bytes `start..end` of the attachment body `digest`, a stored chunk at
    /// a time: a chunked body is never in memory whole.
    pub fn attachment_range(
        &self,
        digest: &str,
        start: u64,
        end: u64,
        f: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let data = self.data();
        match data.blob(digest).map_err(std::io::Error::other)? {
            None => Err(std::io::Error::other(format!(
                "attachment blob {digest} is missing"
            ))),
            Some(Blob::Whole(b)) => {
                let end = (end as usize).min(b.len());
                f(&b[(start as usize).min(end)..end])
            }
            Some(Blob::Chunked(m)) => {
                for c in data.blob_chunks(&m, start, end) {
                    f(&c.map_err(std::io::Error::other)?)?;
                }
                Ok(())
            }
        }
    }

    pub fn attachment_bytes(&self, digest: &str) -> DbResult<Vec<u8>> {
        self.data()
            .att(digest)?
            .ok_or_else(|| DbError::Internal(format!("attachment blob {digest} is missing")))
    }

    /// `_revs_diff`.
    pub(crate) fn revs_diff_now(&self, req: Map<String, Value>) -> DbResult<Value> {
        self.check_alive()?;
        let mut out = Map::new();
        for (id, revs) in req {
            let Value::Array(revs) = revs else {
                return Err(DbError::BadRequest(format!(
                    "revs for {id} must be an array"
                )));
            };
            let mut parsed = Vec::new();
            for r in &revs {
                let r = r
                    .as_str()
                    .and_then(Rev::parse)
                    .ok_or_else(|| DbError::BadRequest("Invalid rev format".into()))?;
                parsed.push(r);
            }
            let info = self.data().doc_info(&id)?.unwrap_or_default();
            let missing: Vec<Rev> = parsed
                .into_iter()
                .filter(|r| !info.tree.contains(r))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let mut entry = Map::new();
            let ancestors = info.tree.possible_ancestors(&missing);
            entry.insert(
                "missing".into(),
                json!(missing.iter().map(Rev::to_string).collect::<Vec<_>>()),
            );
            if !ancestors.is_empty() {
                entry.insert(
                    "possible_ancestors".into(),
                    json!(ancestors.iter().map(Rev::to_string).collect::<Vec<_>>()),
                );
            }
            out.insert(id, Value::Object(entry));
        }
        Ok(Value::Object(out))
    }

    /// One `_bulk_get` item: per revision the rendered document or an error member.
    pub fn bulk_get_item(
        &self,
        item: &BulkGetItem,
        opts: &DocOptions,
    ) -> DbResult<Vec<Result<RevisionOut, Value>>> {
        self.check_alive()?;
        thali_sys::metrics::get().reads.inc();
        let Some(id) = &item.id else {
            return Ok(vec![Err(
                json!({"error": {"id": null, "rev": null, "error": "illegal_docid", "reason": "missing document id"}}),
            )]);
        };
        let err = |rev: &str, e: &str, reason: &str| json!({"error": {"id": id, "rev": rev, "error": e, "reason": reason}});
        let mut o = opts.clone();
        if item.atts_since.is_some() {
            o.atts_since = item.atts_since.clone();
        }
        let which = match &item.rev {
            None => OpenRevs::All,
            Some(r) => match Rev::parse(r) {
                Some(r) => OpenRevs::List(vec![r]),
                None => return Ok(vec![Err(err(r, "bad_request", "Invalid rev format"))]),
            },
        };
        match self.open_revs_now(id, &which, &o) {
            Ok(revs) => Ok(revs
                .into_iter()
                .map(|r| r.map_err(|rev| err(&rev, "not_found", "missing")))
                .collect()),
            Err(DbError::NotFound(_)) => Ok(vec![Err(err(
                item.rev.as_deref().unwrap_or("undefined"),
                "not_found",
                "missing",
            ))]),
            Err(e) => Err(e),
        }
    }

    /// `_bulk_get` as one JSON value (the replicator's local endpoint; HTTP streams instead).
    pub(crate) fn bulk_get_now(
        &self,
        items: Vec<BulkGetItem>,
        opts: &DocOptions,
    ) -> DbResult<Value> {
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let docs: Vec<Value> = self
                .bulk_get_item(&item, opts)?
                .into_iter()
                .map(|r| match r {
                    Ok(out) => object([("ok", Value::Object(out.doc))]),
                    Err(e) => e,
                })
                .collect();
            results.push(object([
                ("id", item.id.map_or(Value::Null, Value::String)),
                ("docs", Value::Array(docs)),
            ]));
        }
        Ok(object([("results", Value::Array(results))]))
    }

    /// `_all_docs` as one JSON value (small answers; HTTP streams `all_docs_with`).
    pub fn all_docs(&self, q: &AllDocsQuery) -> DbResult<Value> {
        let mut head = (0, None);
        let mut rows = Vec::new();
        self.all_docs_with(q, &mut |part| {
            match part {
                AllDocsPart::Head { total_rows, offset } => head = (total_rows, offset),
                AllDocsPart::Row(r) => rows.push(r),
            }
            Ok(())
        })?;
        let mut out = object([
            ("total_rows", json!(head.0)),
            ("offset", json!(head.1)),
            ("rows", Value::Array(rows)),
        ]);
        if q.update_seq {
            out["update_seq"] = json!(self.update_seq());
        }
        Ok(out)
    }

    /// `_all_docs` piece by piece: the head once before the first row, then each row, so an
    /// answer of any size is never held whole.
    pub fn all_docs_with(
        &self,
        q: &AllDocsQuery,
        emit: &mut dyn FnMut(AllDocsPart) -> DbResult<()>,
    ) -> DbResult<()> {
        self.check_alive()?;
        let doc_opts = DocOptions::for_rows(q.conflicts, q.attachments);
        let total_rows = self.doc_count();
        let data = self.data();
        let limit = q.limit.unwrap_or(usize::MAX);
        if let Some(keys) = &q.keys {
            emit(AllDocsPart::Head {
                total_rows,
                offset: None,
            })?;
            for key in keys.iter().skip(q.skip).take(limit) {
                let row = match key.as_str() {
                    None => json!({"key": key, "error": "not_found"}),
                    Some(id) => match data.doc_info(id)? {
                        Some(info) if !info.tree.is_empty() => {
                            self.all_docs_row(id, &info, q.include_docs, &doc_opts, true)?
                        }
                        _ => json!({"key": id, "error": "not_found"}),
                    },
                };
                emit(AllDocsPart::Row(row))?;
            }
            return Ok(());
        }
        let mut offset = q.skip;
        if let Some(start) = q.start.as_deref() {
            // Rows before the start key (in the feed's direction) count toward `offset`.
            let live = |r: &thali_store::Result<(String, DocInfo)>| matches!(r, Ok((_, i)) if i.tree.winner().is_some_and(|w| !w.deleted));
            let before = if q.descending {
                let up_to = data
                    .docs(None, Some(start), true, false)
                    .filter(live)
                    .count();
                (total_rows as usize).saturating_sub(up_to)
            } else {
                data.docs(None, Some(start), false, false)
                    .filter(live)
                    .count()
            };
            offset += before;
        }
        emit(AllDocsPart::Head {
            total_rows,
            offset: Some(offset),
        })?;
        let iter = data.docs(
            q.start.as_deref(),
            q.end.as_deref(),
            q.inclusive_end,
            q.descending,
        );
        let (mut skipped, mut sent) = (0, 0);
        for r in iter {
            let (id, info) = r?;
            if info.tree.winner().is_none_or(|w| w.deleted) {
                continue;
            }
            if skipped < q.skip {
                skipped += 1;
                continue;
            }
            if sent >= limit {
                break;
            }
            sent += 1;
            emit(AllDocsPart::Row(self.all_docs_row(
                &id,
                &info,
                q.include_docs,
                &doc_opts,
                false,
            )?))?;
        }
        Ok(())
    }

    fn all_docs_row(
        &self,
        id: &str,
        info: &DocInfo,
        include_docs: bool,
        opts: &DocOptions,
        show_deleted: bool,
    ) -> DbResult<Value> {
        let w = info.tree.winner().ok_or_else(DbError::missing)?;
        let mut row = json!({"id": id, "key": id, "value": {"rev": w.rev.to_string()}});
        if w.deleted && show_deleted {
            row["value"]["deleted"] = json!(true);
            if include_docs {
                row["doc"] = Value::Null;
            }
            return Ok(row);
        }
        if include_docs {
            row["doc"] = match self.body_of(id, info, &w.rev)? {
                Some(body) => Value::Object(self.render(id, info, &w.rev, body, opts).doc),
                None => Value::Null,
            };
        }
        Ok(row)
    }
}
