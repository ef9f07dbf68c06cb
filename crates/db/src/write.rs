//! Writes: interactive edits (`new_edits=true`) and replicated ones (`new_edits=false`),
//! one atomic batch and one shared flush per request.

use super::access::Caller;
use super::queue::Job;
use super::{poisoned, random_hex, Database, DbError, DbResult, WriteState};
use base64::Engine;
use md5::{Digest, Md5};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Arc;
use thali_doc::parse::{
    parse_doc, validate_doc_id, AttInput, IncomingAtt, IncomingDoc, Prepared, StagedBody,
};
use thali_doc::{hash_rev, MergeOutcome, Rev};
use thali_store::{AttMeta, DbStore, DocInfo, RevBody, SeqEntry, WriteBatch};

/// Per-document outcome: the id and new revision, or the error for that document.
pub type DocResult = Result<(String, String), (Option<String>, Option<String>, DbError)>;

pub fn att_digest(bytes: &[u8]) -> String {
    format!(
        "md5-{}",
        base64::engine::general_purpose::STANDARD.encode(Md5::digest(bytes))
    )
}

/// State carried across the documents of one batch, so later documents see earlier ones.
pub(super) struct BatchState {
    /// The generation this batch writes to (fixed while the write lock is held).
    pub(super) data: DbStore,
    pub(super) batch: WriteBatch,
    infos: HashMap<String, DocInfo>,
    bodies: HashMap<(String, String), RevBody>,
    pub(super) locals: HashMap<String, Option<Value>>,
    changed: bool,
    /// Bytes of attachments written to design documents in this batch (not yet readable from
    /// the store), for compiling WASM modules.
    fresh: HashMap<String, Vec<u8>>,
    ddoc_written: bool,
    /// Time spent in validators during this hold of the write lock.
    validating: std::time::Duration,
}

/// What one hold of the write lock applied.
pub(super) struct Hold {
    pub(super) ticket: thali_store::Ticket,
    /// `update_seq`, `doc_count`, `doc_del_count` after the batch.
    pub(super) counts: (u64, u64, u64),
    /// The generation written to.
    pub(super) data: DbStore,
}

/// Who writes (their level decides what they may write; validators see their `userCtx`),
/// `secObj` and the design documents in force.
pub(super) struct WriteCtx {
    pub(super) caller: Caller,
    sec_obj: Value,
    plugins: Arc<thali_plugins::DbPlugins>,
    /// Write only if this document's live leaves are still these (conflict resolutions).
    pub(super) expect_leaves: Option<(String, Vec<Rev>)>,
    /// All documents or none: one refusal cancels the batch (conflict resolutions).
    pub(super) atomic: bool,
}

/// A revision about to be merged: its id, its path back from it, its attachments.
struct Revision {
    rev: Rev,
    path: Vec<String>,
    atts: BTreeMap<String, AttMeta>,
}

/// The document's id; a local edit without one gets a random id.
fn doc_id(doc: &IncomingDoc, new_edits: bool) -> DbResult<String> {
    match &doc.id {
        Some(id) => Ok(id.clone()),
        None if new_edits => Ok(random_hex(16)),
        None => Err(DbError::BadRequest(
            "When `new_edits: false`, the document needs `_id` specified".into(),
        )),
    }
}

fn missing_rev() -> DbError {
    DbError::BadRequest(
        "When `new_edits: false`, the document needs `_rev` or `_revisions` specified".into(),
    )
}

/// The revision a replicated edit names.
fn replicated_rev(doc: &IncomingDoc) -> DbResult<Rev> {
    match (&doc.revisions, &doc.rev) {
        (Some((start, ids)), _) => Ok(Rev::new(*start, ids[0].clone())),
        (None, Some(r)) => Ok(r.clone()),
        (None, None) => Err(missing_rev()),
    }
}

#[cfg(test)]
impl WriteCtx {
    /// The node writing, no validators; `exclusive` as a conflict resolution is.
    pub(super) fn for_test(exclusive: bool) -> WriteCtx {
        WriteCtx {
            caller: Caller::node("test"),
            sec_obj: Value::Null,
            plugins: Arc::default(),
            expect_leaves: None,
            atomic: exclusive,
        }
    }
}

/// A revision as validators see it: body plus `_id`, `_rev`, `_revisions`, `_deleted` and
/// attachment stubs.
fn doc_json(
    id: &str,
    rev: &Rev,
    ancestry: &[String],
    deleted: bool,
    body: &serde_json::Map<String, Value>,
    atts: &BTreeMap<String, AttMeta>,
) -> Value {
    let mut m = body.clone();
    m.shift_insert(0, "_id".into(), Value::String(id.to_string()));
    m.shift_insert(1, "_rev".into(), Value::String(rev.to_string()));
    if !ancestry.is_empty() {
        m.insert(
            "_revisions".into(),
            serde_json::json!({"start": rev.pos, "ids": ancestry}),
        );
    }
    if deleted {
        m.insert("_deleted".into(), Value::Bool(true));
    }
    if !atts.is_empty() {
        let stubs: serde_json::Map<String, Value> = atts
            .iter()
            .map(|(n, a)| {
                (
                    n.clone(),
                    serde_json::json!({"content_type": a.content_type, "digest": a.digest, "length": a.length, "revpos": a.revpos, "stub": true}),
                )
            })
            .collect();
        m.insert("_attachments".into(), Value::Object(stubs));
    }
    Value::Object(m)
}

/// A document to write, or why it was refused before reaching the store (with its id).
pub type DocInput = Result<IncomingDoc, (Option<String>, DbError)>;

/// Parses one JSON document for writing; a refusal keeps the document's `_id` for the result.
pub fn doc_input(v: Value) -> DocInput {
    let id = v.get("_id").and_then(Value::as_str).map(str::to_string);
    parse_doc(v).map_err(|e| (id, DbError::from(e)))
}

impl Database {
    /// `_bulk_docs` and single-document writes from JSON values.
    pub async fn bulk_docs(
        self: &Arc<Self>,
        docs: Vec<Value>,
        new_edits: bool,
        caller: &Caller,
    ) -> DbResult<Vec<DocResult>> {
        let parsed = docs.into_iter().map(doc_input).collect();
        self.write_docs(parsed, new_edits, caller).await
    }

    /// Writes already parsed documents (multipart bodies arrive this way) as `caller`: the one
    /// write path every route and the replicator go through.
    pub async fn write_docs(
        self: &Arc<Self>,
        docs: Vec<DocInput>,
        new_edits: bool,
        caller: &Caller,
    ) -> DbResult<Vec<DocResult>> {
        let ctx = self.write_ctx(caller)?;
        let mut docs = docs;
        // The replicator's state members are the node's alone (CouchDB's replicator database
        // keeps them so too): from anyone else, by any route or replication, they are dropped.
        let strip_state = self.name == "_replicator" && !caller.internal;
        for doc in docs.iter_mut().flatten() {
            if strip_state {
                doc.body.retain(|k, _| !k.starts_with("_replication_"));
            }
            doc.prepare(new_edits);
        }
        let results = self.enqueue(docs, new_edits, ctx).await?;
        let written = results.iter().filter(|r| r.is_ok()).count();
        thali_sys::metrics::get().writes.inc_by(written as u64);
        Ok(results)
    }

    pub(super) fn write_ctx(&self, caller: &Caller) -> DbResult<WriteCtx> {
        self.check_alive()?;
        let plugins = self.plugins();
        let sec_obj = if plugins.has_validators() {
            self.security()?.as_value().clone()
        } else {
            Value::Null
        };
        Ok(WriteCtx {
            caller: caller.clone(),
            sec_obj,
            plugins,
            expect_leaves: None,
            atomic: false,
        })
    }

    /// A conflict resolution: the replicated-style revisions in `docs` (the merged child of
    /// the winner and a tombstone per other leaf), written in one batch, all or nothing, and
    /// only if `id`'s live leaves are still `leaves`. `Ok(false)` when they changed meanwhile.
    pub(super) async fn write_resolution(
        self: &Arc<Self>,
        id: &str,
        leaves: Vec<Rev>,
        docs: Vec<IncomingDoc>,
    ) -> DbResult<bool> {
        let mut ctx = self.write_ctx(&Caller::node(&self.name))?;
        ctx.expect_leaves = Some((id.to_string(), leaves));
        ctx.atomic = true;
        let results = self
            .enqueue(docs.into_iter().map(Ok).collect(), false, ctx)
            .await?;
        Ok(!results.is_empty())
    }

    /// One hold of the write lock: applies documents from the front of each of `jobs`, in
    /// order, as one batch. A hold ends early (the rest stays in the jobs) once validators have
    /// used the plugin time limit in it, so no plugin keeps the database's writes waiting past
    /// that. An exclusive job (atomic or conditional) comes alone.
    pub(super) fn write_blocking(&self, jobs: &mut [Job]) -> DbResult<Hold> {
        let mut st = self.write.lock().map_err(poisoned)?;
        self.check_alive()?;
        let data = self.data();
        if let [job] = &mut *jobs {
            if let Some((id, expected)) = &job.ctx.expect_leaves {
                let live = data.doc_info(id)?.unwrap_or_default().tree.live_leaves();
                if live != *expected {
                    job.docs.clear();
                    let ticket = data.apply(WriteBatch::new())?;
                    let counts = (st.update_seq, st.doc_count, st.doc_del_count);
                    return Ok(Hold {
                        ticket,
                        counts,
                        data,
                    });
                }
            }
        }
        let before = *st;
        let mut bs = BatchState {
            data,
            batch: WriteBatch::new(),
            infos: HashMap::new(),
            bodies: HashMap::new(),
            locals: HashMap::new(),
            changed: false,
            fresh: HashMap::new(),
            ddoc_written: false,
            validating: std::time::Duration::ZERO,
        };
        let budget = self.limits.plugins.timeout;
        'jobs: for job in jobs.iter_mut() {
            let Job {
                docs,
                ctx,
                results,
                new_edits,
                ..
            } = job;
            while let Some(doc) = docs.pop_front() {
                let res = match doc {
                    Err((id, e)) => Err((id, None, e)),
                    Ok(doc) => {
                        let id = doc.id.clone();
                        let rev = doc.raw_rev.clone();
                        self.write_one(doc, *new_edits, ctx, &mut st, &mut bs)
                            .map_err(|e| (id, rev, e))
                    }
                };
                if let Err((id, _, e)) = &res {
                    if let DbError::Internal(_) = e {
                        return Err(e.clone());
                    }
                    tracing::debug!(db = %self.name, id = ?id, error = %e, "document rejected");
                }
                if ctx.atomic {
                    if let Err((_, _, e)) = res {
                        // Nothing of the batch is applied; the counters go back.
                        *st = before;
                        return Err(e);
                    }
                }
                results.push(res);
                if !ctx.atomic && bs.validating >= budget {
                    // Let other writers in; the rest of the documents go in the next hold.
                    break 'jobs;
                }
            }
        }
        if bs.changed {
            bs.batch.put_meta("update_seq", &st.update_seq);
            bs.batch.put_meta("doc_count", &st.doc_count);
            bs.batch.put_meta("doc_del_count", &st.doc_del_count);
        }
        let ticket = match bs.data.apply(bs.batch) {
            Ok(t) => t,
            Err(e) => {
                // Refused (a full disk) or failed: nothing of the hold is written, so neither
                // are its counters; every job in it gets the error.
                *st = before;
                return Err(e.into());
            }
        };
        if bs.ddoc_written {
            // Still under the write lock, so no write runs between a design document becoming
            // readable and its functions being in force (compiling hits the cache filled when
            // the document was checked above).
            self.reload_plugins();
        }
        let counts = (st.update_seq, st.doc_count, st.doc_del_count);
        Ok(Hold {
            ticket,
            counts,
            data: bs.data,
        })
    }

    fn load_info(&self, id: &str, bs: &BatchState) -> DbResult<DocInfo> {
        if let Some(i) = bs.infos.get(id) {
            return Ok(i.clone());
        }
        Ok(bs.data.doc_info(id)?.unwrap_or_default())
    }

    fn load_body(
        &self,
        id: &str,
        info: &DocInfo,
        rev: &Rev,
        bs: &BatchState,
    ) -> DbResult<Option<RevBody>> {
        let r = rev.to_string();
        if let Some(b) = bs.bodies.get(&(id.to_string(), r.clone())) {
            return Ok(Some(b.clone()));
        }
        Ok(bs.data.body_of(id, info, &r)?)
    }

    /// One document of a batch: admission (id, permission, size), its revision and
    /// attachments, design-document and validator checks, then the merge into its tree.
    fn write_one(
        &self,
        mut doc: IncomingDoc,
        new_edits: bool,
        ctx: &WriteCtx,
        st: &mut WriteState,
        bs: &mut BatchState,
    ) -> DbResult<(String, String)> {
        let id = doc_id(&doc, new_edits)?;
        // Every route and the replicator end here: ids are checked after all decoding.
        validate_doc_id(&id)?;
        if let Some(local_id) = id.strip_prefix("_local/") {
            let rev = self.write_local_in(local_id, doc, &ctx.caller, bs)?;
            return Ok((id, rev));
        }
        self.admit(&id, &doc, ctx)?;
        let info = self.load_info(&id, bs)?;
        let atts_in = std::mem::take(&mut doc.atts);
        let revision = if new_edits {
            self.new_edit(&id, &doc, atts_in, &info, bs)?
        } else {
            match self.replicated_edit(&id, &doc, atts_in, &info, bs)? {
                Some(r) => r,
                // Already stored: a no-op, as in CouchDB.
                None => return Ok((id, replicated_rev(&doc)?.to_string())),
            }
        };
        // An existing revision is a no-op or a conflict (the merge below decides): nothing to
        // compile or validate.
        if info.tree.get(&revision.rev).is_none() {
            self.check_new_revision(&id, &doc, &revision, &info, ctx, bs)?;
        }
        self.merge(id, doc, revision, info, new_edits, st, bs)
    }

    /// What the caller may write and how large a document may be.
    fn admit(&self, id: &str, doc: &IncomingDoc, ctx: &WriteCtx) -> DbResult<()> {
        ctx.caller.check_doc_write(id)?;
        if doc.bad_rev {
            return Err(DbError::BadRequest("Invalid rev format".into()));
        }
        let size = match &doc.prepared {
            Some(p) => p.size,
            None => thali_doc::rev::json_len(&doc.body),
        };
        if size > self.limits.max_doc_size {
            return Err(DbError::DocTooLarge(id.to_string()));
        }
        Ok(())
    }

    /// A local edit (`new_edits: true`): the next revision after `doc.rev`, which must be a
    /// leaf (or the current winner's deleted one when none is given).
    fn new_edit(
        &self,
        id: &str,
        doc: &IncomingDoc,
        atts_in: BTreeMap<String, IncomingAtt>,
        info: &DocInfo,
        bs: &mut BatchState,
    ) -> DbResult<Revision> {
        let parent = match (&doc.rev, info.tree.winner()) {
            (Some(r), _) if info.tree.is_leaf(r) => Some(r.clone()),
            (Some(_), _) => return Err(DbError::Conflict),
            (None, None) => None,
            // Recreating a deleted document continues its winning branch.
            (None, Some(w)) if w.deleted => Some(w.rev.clone()),
            (None, Some(_)) => return Err(DbError::Conflict),
        };
        let parent_body = match &parent {
            Some(p) => self.load_body(id, info, p, bs)?,
            None => None,
        };
        let pos = parent.as_ref().map_or(1, |p| p.pos + 1);
        let atts = self.resolve_atts(id, atts_in, pos, true, bs, |name| {
            parent_body.as_ref().and_then(|b| b.atts.get(name).cloned())
        })?;
        let digests: Vec<(&str, &str)> = atts
            .iter()
            .map(|(n, a)| (n.as_str(), a.digest.as_str()))
            .collect();
        let rev_id = match &doc.prepared {
            Some(Prepared {
                rev_id: Some(r), ..
            }) if digests.is_empty() && parent == doc.rev => r.clone(),
            _ => hash_rev(parent.as_ref(), doc.deleted, &doc.body, &digests),
        };
        let mut path = vec![rev_id.clone()];
        if let Some(p) = &parent {
            path.push(p.id.clone());
        }
        Ok(Revision {
            rev: Rev::new(pos, rev_id),
            path,
            atts,
        })
    }

    /// A replicated edit (`new_edits: false`): the revision and its history as given; `None`
    /// when it is already stored.
    fn replicated_edit(
        &self,
        id: &str,
        doc: &IncomingDoc,
        atts_in: BTreeMap<String, IncomingAtt>,
        info: &DocInfo,
        bs: &mut BatchState,
    ) -> DbResult<Option<Revision>> {
        let (start, ids) = match (doc.revisions.clone(), &doc.rev) {
            (Some(r), _) => r,
            (None, Some(r)) => (r.pos, vec![r.id.clone()]),
            (None, None) => return Err(missing_rev()),
        };
        let new_rev = Rev::new(start, ids[0].clone());
        if info.tree.contains(&new_rev) {
            return Ok(None);
        }
        // Stubs refer to the nearest ancestor whose body we still hold.
        let mut ancestors = Vec::new();
        for (i, aid) in ids.iter().enumerate().skip(1) {
            let r = Rev::new(start - i as u64, aid.clone());
            if info.tree.get(&r).is_some_and(|n| n.available) {
                if let Some(b) = self.load_body(id, info, &r, bs)? {
                    ancestors.push(b);
                }
            }
        }
        let atts = self.resolve_atts(id, atts_in, start, false, bs, |name| {
            ancestors.iter().find_map(|b| b.atts.get(name).cloned())
        })?;
        Ok(Some(Revision {
            rev: new_rev,
            path: ids,
            atts,
        }))
    }

    /// A revision not yet stored: a design document must compile; any other document must
    /// pass the database's validators.
    fn check_new_revision(
        &self,
        id: &str,
        doc: &IncomingDoc,
        revision: &Revision,
        info: &DocInfo,
        ctx: &WriteCtx,
        bs: &mut BatchState,
    ) -> DbResult<()> {
        if id.starts_with("_design/") {
            if !doc.deleted {
                self.check_design_doc(id, &doc.body, &revision.atts, &bs.fresh)?;
            }
            bs.ddoc_written = true;
            // Design documents are not passed to validators (CouchDB): only admins write
            // them, and a validator that refuses everything must stay removable.
            return Ok(());
        }
        if !ctx.plugins.has_validators() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let Revision { rev, path, atts } = revision;
        let new_doc = doc_json(id, rev, path, doc.deleted, &doc.body, atts);
        let old_doc = match info.tree.winner() {
            Some(w) if !w.deleted => match self.load_body(id, info, &w.rev, bs)? {
                Some(b) => doc_json(id, &w.rev, &[], false, &b.body, &b.atts),
                None => Value::Null,
            },
            _ => Value::Null,
        };
        let verdict = self.validate(
            &ctx.plugins,
            &new_doc,
            &old_doc,
            &ctx.caller.user_ctx,
            &ctx.sec_obj,
        );
        bs.validating += started.elapsed();
        verdict
    }

    /// Merges the revision into the document's tree and stages the body, the by-sequence
    /// entry and the counts in the batch.
    #[allow(clippy::too_many_arguments)]
    fn merge(
        &self,
        id: String,
        doc: IncomingDoc,
        revision: Revision,
        mut info: DocInfo,
        new_edits: bool,
        st: &mut WriteState,
        bs: &mut BatchState,
    ) -> DbResult<(String, String)> {
        let Revision {
            rev: new_rev,
            path,
            atts,
        } = revision;
        let old_winner = info.tree.winner();
        match info.tree.merge_path(new_rev.pos, &path, doc.deleted) {
            MergeOutcome::Existing if new_edits => return Err(DbError::Conflict),
            MergeOutcome::Existing => return Ok((id, new_rev.to_string())),
            MergeOutcome::NewBranch if new_edits => return Err(DbError::Conflict),
            _ => {}
        }
        for gone in info.tree.stem(self.revs_limit() as usize) {
            bs.batch.del_body(&id, &gone.to_string());
        }
        let body = RevBody {
            body: doc.body,
            atts,
            deleted: doc.deleted,
        };
        let rev_s = new_rev.to_string();
        // Later documents of the batch only look bodies up to resolve attachment stubs.
        if !body.atts.is_empty() {
            bs.bodies.insert((id.clone(), rev_s.clone()), body.clone());
        }
        bs.batch
            .set_current_body(&id, &mut info, rev_s.clone(), body);

        st.update_seq += 1;
        if info.seq > 0 {
            bs.batch.del_seq(info.seq);
        }
        info.seq = st.update_seq;
        let leaves = info.tree.leaves();
        let entry = SeqEntry::from_leaves(&id, &leaves);
        bs.batch.put_seq(info.seq, &entry);
        let new_winner = leaves.into_iter().next();
        match old_winner {
            None => {}
            Some(w) if w.deleted => st.doc_del_count = st.doc_del_count.saturating_sub(1),
            Some(_) => st.doc_count = st.doc_count.saturating_sub(1),
        }
        match new_winner {
            Some(w) if w.deleted => st.doc_del_count += 1,
            _ => st.doc_count += 1,
        }
        bs.batch.put_doc_info(&id, &info);
        bs.infos.insert(id.clone(), info);
        bs.changed = true;
        Ok((id, rev_s))
    }

    fn resolve_atts(
        &self,
        id: &str,
        incoming: BTreeMap<String, IncomingAtt>,
        new_pos: u64,
        new_edits: bool,
        bs: &mut BatchState,
        ancestor: impl Fn(&str) -> Option<AttMeta>,
    ) -> DbResult<BTreeMap<String, AttMeta>> {
        let mut out = BTreeMap::new();
        for (name, att) in incoming {
            let meta = match att.input {
                AttInput::Data(bytes) => {
                    // Held in memory: the in-memory bound, not the streamed one.
                    let max = self.limits.max_inline_att_size;
                    let bytes = match att.encoding.as_deref() {
                        Some("gzip") => match gunzip(&bytes, max) {
                            Ok(Some(b)) => b,
                            Ok(None) => return Err(DbError::AttTooLarge(name)),
                            Err(_) => {
                                return Err(DbError::BadRequest(format!(
                                    "Attachment {name} is not valid gzip"
                                )))
                            }
                        },
                        _ if bytes.len() > max => return Err(DbError::AttTooLarge(name)),
                        _ => bytes,
                    };
                    let digest = att_digest(&bytes);
                    bs.batch.put_att(&digest, &bytes);
                    if id.starts_with("_design/") {
                        bs.fresh.insert(digest.clone(), bytes.clone());
                    }
                    AttMeta {
                        content_type: att.content_type,
                        digest,
                        length: bytes.len() as u64,
                        revpos: if new_edits {
                            new_pos
                        } else {
                            att.revpos.unwrap_or(new_pos)
                        },
                    }
                }
                AttInput::Staged(staged) => {
                    let staged = staged
                        .0
                        .downcast_ref::<thali_store::blob::Staged>()
                        .ok_or_else(|| DbError::Internal("unknown staged body".into()))?
                        .clone();
                    if staged.len() > self.limits.max_att_size as u64 {
                        return Err(DbError::AttTooLarge(name));
                    }
                    bs.data.adopt(&staged)?;
                    bs.batch.put_staged(&staged);
                    if id.starts_with("_design/") {
                        bs.fresh.insert(staged.digest.clone(), staged.bytes()?);
                    }
                    AttMeta {
                        content_type: att.content_type,
                        digest: staged.digest,
                        length: staged.blob.len(),
                        revpos: if new_edits {
                            new_pos
                        } else {
                            att.revpos.unwrap_or(new_pos)
                        },
                    }
                }
                AttInput::Stub => match ancestor(&name) {
                    Some(m) => m,
                    None => match att.digest {
                        // A replicated stub whose bytes we hold under the same digest.
                        Some(d) if !new_edits && bs.data.has_att(&d)? => AttMeta {
                            content_type: att.content_type,
                            digest: d,
                            length: att.length.unwrap_or(0),
                            revpos: att.revpos.unwrap_or(new_pos),
                        },
                        _ => {
                            return Err(DbError::MissingStub(format!(
                                "Invalid attachment stub in {id} for {name}"
                            )))
                        }
                    },
                },
                AttInput::Follows => {
                    return Err(DbError::BadRequest(format!(
                        "Attachment {name} follows, but its data is missing from the body"
                    )))
                }
            };
            out.insert(name, meta);
        }
        Ok(out)
    }

    /// The largest attachment this node stores, in bytes.
    pub fn max_attachment_size(&self) -> u64 {
        self.limits.max_att_size as u64
    }

    /// Starts receiving an attachment body into the store (`BlobWriter`: chunks as they come,
    /// md5 on the way), for `put_attachment`.
    pub fn attachment_writer(&self) -> DbResult<thali_store::blob::BlobWriter> {
        self.check_alive()?;
        Ok(self.data().blob_writer())
    }

    /// Stores one received attachment as a new revision of its document. A refused write
    /// removes the body's chunks again.
    pub async fn put_attachment(
        self: &Arc<Self>,
        id: &str,
        rev: Option<Rev>,
        name: &str,
        content_type: &str,
        body: thali_store::blob::Staged,
        caller: &Caller,
    ) -> DbResult<String> {
        let mut doc = match self.doc_for_attachment_edit(id, rev) {
            Ok(d) => d,
            Err(e) => {
                body.discard();
                return Err(e);
            }
        };
        doc.atts.insert(
            name.to_string(),
            IncomingAtt {
                content_type: content_type.to_string(),
                input: AttInput::Staged(StagedBody(Arc::new(body.clone()))),
                digest: None,
                revpos: None,
                length: None,
                encoding: None,
            },
        );
        let res = self.single_write(doc, caller).await;
        // Refused: nothing names the chunks. After an internal error the batch may still have
        // landed, so the chunks stay (compaction drops them if nothing names them).
        if matches!(&res, Err(e) if !matches!(e, DbError::Internal(_))) {
            body.discard();
        }
        res
    }

    pub async fn delete_attachment(
        self: &Arc<Self>,
        id: &str,
        rev: Option<Rev>,
        name: &str,
        caller: &Caller,
    ) -> DbResult<String> {
        if rev.is_none() {
            return Err(DbError::Conflict);
        }
        let mut doc = self.doc_for_attachment_edit(id, rev)?;
        if doc.atts.remove(name).is_none() {
            return Err(DbError::NotFound("Document is missing attachment".into()));
        }
        self.single_write(doc, caller).await
    }

    async fn single_write(self: &Arc<Self>, doc: IncomingDoc, caller: &Caller) -> DbResult<String> {
        let mut res = self.write_docs(vec![Ok(doc)], true, caller).await?;
        match res.pop() {
            Some(Ok((_, rev))) => Ok(rev),
            Some(Err((_, _, e))) => Err(e),
            None => Err(DbError::Internal("no write result".into())),
        }
    }

    /// The document at `rev` as an edit that keeps its body and attachments (as stubs).
    fn doc_for_attachment_edit(&self, id: &str, rev: Option<Rev>) -> DbResult<IncomingDoc> {
        let mut doc = IncomingDoc::edit(id.to_string(), rev.clone());
        let Some(rev) = rev else { return Ok(doc) };
        let data = self.data();
        let info = data.doc_info(id)?.unwrap_or_default();
        let Some(body) = data.body_of(id, &info, &rev.to_string())? else {
            return Err(DbError::Conflict);
        };
        if body.deleted {
            // Adding an attachment to a tombstone starts the document afresh.
            return Ok(doc);
        }
        doc.body = body.body;
        for (name, m) in body.atts {
            doc.atts.insert(
                name,
                IncomingAtt {
                    content_type: m.content_type,
                    input: AttInput::Stub,
                    digest: Some(m.digest),
                    revpos: Some(m.revpos),
                    length: Some(m.length),
                    encoding: None,
                },
            );
        }
        Ok(doc)
    }
}

/// Decodes gzip, or `None` when the result would be over `max` bytes. The size is measured in a
/// first pass that keeps nothing, so a compression bomb costs CPU, never memory.
fn gunzip(bytes: &[u8], max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let limit = max as u64 + 1;
    let size = std::io::copy(
        &mut flate2::read::GzDecoder::new(bytes).take(limit),
        &mut std::io::sink(),
    )?;
    if size >= limit {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(size as usize);
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(Some(out))
}
