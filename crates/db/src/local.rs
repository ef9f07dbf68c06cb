//! `_local` documents: no revision tree, `0-N` revisions, never replicated or listed in
//! `_changes`/`_all_docs`.

use super::access::{is_namespaced, Caller, READER_LOCAL_MAX_BYTES, READER_LOCAL_MAX_DOCS};
use super::write::DocResult;
use super::{Database, DbError, DbResult};
use serde_json::{json, Value};
use std::sync::Arc;
use thali_doc::parse::IncomingDoc;

fn local_rev_number(rev: &str) -> Option<u64> {
    rev.strip_prefix("0-")?.parse().ok()
}

impl Database {
    /// Called from the write path (under the write lock) for ids starting with `_local/`.
    /// `local_id` is the id as the caller named it; where it is stored depends on the caller
    /// (`Caller::local_key`).
    pub(super) fn write_local_in(
        &self,
        named_id: &str,
        doc: IncomingDoc,
        caller: &Caller,
        bs: &mut super::write::BatchState,
    ) -> DbResult<String> {
        let stored = caller.local_key(named_id)?;
        let local_id = stored.as_str();
        // Attachments of a `_local` document are ignored, as in CouchDB (`parse_doc` drops
        // them; this covers documents built otherwise).
        let current = match bs.locals.get(local_id) {
            Some(c) => c.clone(),
            None => bs.data.local(local_id)?,
        };
        let current_rev = current
            .as_ref()
            .and_then(|c| c.get("_rev"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let given = doc.raw_rev.clone();
        let n = match (&current_rev, &given) {
            (Some(cur), Some(g)) if cur == g => local_rev_number(g).unwrap_or(0),
            (Some(_), _) => return Err(DbError::Conflict),
            (None, Some(g)) => local_rev_number(g)
                .ok_or_else(|| DbError::BadRequest("Invalid rev format".into()))?,
            (None, None) => 0,
        };
        let full_id = format!("_local/{named_id}");
        if doc.deleted {
            if current.is_none() {
                return Err(DbError::missing());
            }
            bs.batch.del_local(local_id);
            bs.locals.insert(local_id.to_string(), None);
            return Ok("0-0".into());
        }
        let size = serde_json::to_vec(&doc.body).map(|v| v.len()).unwrap_or(0);
        if size > self.limits.max_doc_size {
            return Err(DbError::DocTooLarge(full_id));
        }
        if let Some(prefix) = caller.reader_prefix() {
            // A reader keeps checkpoints, not data: small documents, a few of them.
            if size > READER_LOCAL_MAX_BYTES {
                return Err(DbError::DocTooLarge(full_id));
            }
            if current.is_none() && self.count_locals(&prefix, bs)? >= READER_LOCAL_MAX_DOCS {
                return Err(DbError::Forbidden(format!(
                    "A read-only peer may keep at most {READER_LOCAL_MAX_DOCS} _local documents."
                )));
            }
        }
        let rev = format!("0-{}", n + 1);
        let mut body = doc.body;
        body.shift_insert(0, "_id".into(), json!(full_id));
        body.shift_insert(1, "_rev".into(), json!(rev));
        let v = Value::Object(body);
        bs.batch.put_local(local_id, &v);
        bs.locals.insert(local_id.to_string(), Some(v));
        Ok(rev)
    }

    /// Local documents under `prefix` once this batch is applied.
    fn count_locals(&self, prefix: &str, bs: &super::write::BatchState) -> DbResult<usize> {
        let mut ids = std::collections::HashSet::new();
        for r in bs.data.locals_with_prefix(prefix) {
            ids.insert(r?.0);
        }
        for (id, doc) in bs.locals.iter().filter(|(k, _)| k.starts_with(prefix)) {
            if doc.is_some() {
                ids.insert(id.clone());
            } else {
                ids.remove(id);
            }
        }
        Ok(ids.len())
    }

    pub fn get_local(&self, local_id: &str, caller: &Caller) -> DbResult<Value> {
        self.check_alive()?;
        let stored = caller.local_key(local_id)?;
        // Stored with the `_id` the caller named (`write_local_in`).
        self.data().local(&stored)?.ok_or_else(DbError::missing)
    }

    pub async fn delete_local(
        self: &Arc<Self>,
        local_id: &str,
        rev: Option<String>,
        caller: &Caller,
    ) -> DbResult<DocResult> {
        // `0-N` is no `Rev`: only the raw form is set.
        let doc = IncomingDoc {
            raw_rev: rev,
            deleted: true,
            ..IncomingDoc::edit(format!("_local/{local_id}"), None)
        };
        let mut r = self.write_docs(vec![Ok(doc)], true, caller).await?;
        r.pop().ok_or_else(|| DbError::Internal("no result".into()))
    }

    /// `_local_docs`: ids and revisions of local documents.
    pub fn local_docs(&self) -> DbResult<Vec<Value>> {
        self.check_alive()?;
        let mut rows = Vec::new();
        for r in self.data().locals() {
            let (id, doc) = r?;
            if is_namespaced(&id) {
                continue;
            }
            let rev = doc.get("_rev").cloned().unwrap_or(Value::Null);
            rows.push(json!({"id": format!("_local/{id}"), "key": format!("_local/{id}"), "value": {"rev": rev}}));
        }
        Ok(rows)
    }
}
