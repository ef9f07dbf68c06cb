//! Where databases meet the plugin host: the compiled design documents of a database (loaded
//! at open, replaced after a design document is written), compilation at write time, and
//! `validate_doc_update` on every write.

use super::read::{AllDocsQuery, DocOptions};
use super::{Database, DbError, DbResult};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use thali_plugins::design::{verdict, Verdict};
use thali_plugins::{DbPlugins, PluginError};
use thali_store::AttMeta;

impl Database {
    pub(super) fn with_plugins(self) -> Database {
        self.reload_plugins();
        self
    }

    /// The compiled design documents as of now (a snapshot; cheap to hold).
    pub fn plugins(&self) -> Arc<DbPlugins> {
        match self.plugins.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Recompiles (from cache, mostly) every live design document. One that no longer compiles
    /// (e.g. replicated from a newer node) is logged and left out.
    pub(super) fn reload_plugins(&self) {
        let q = AllDocsQuery {
            start: Some("_design/".into()),
            end: Some("_design0".into()),
            inclusive_end: false,
            ..Default::default()
        };
        let mut ddocs = Vec::new();
        let mut indexes = Vec::new();
        let rows = self.all_docs(&q).ok();
        for row in rows
            .iter()
            .flat_map(|v| v["rows"].as_array().cloned().unwrap_or_default())
        {
            let Some(id) = row["id"].as_str() else {
                continue;
            };
            let Ok(out) = self.get_doc(id, None, &DocOptions::default()) else {
                continue;
            };
            let atts = out.doc.get("_attachments").cloned().unwrap_or(Value::Null);
            let fetch = |name: &str| -> Option<Vec<u8>> {
                let digest = atts.get(name)?.get("digest")?.as_str()?;
                self.attachment_bytes(digest).ok()
            };
            if thali_plugins::design::language_name(&out.doc) == "query" {
                // Mango indexes: native maps, nothing to sandbox.
                let defs = thali_mango::index::from_ddoc(id, &out.doc);
                if let Some(fns) = thali_mango::index::compile(id, &defs) {
                    ddocs.push(Arc::new(fns));
                }
                indexes.extend(defs);
                continue;
            }
            match self.host.compile(&self.name, id, &out.doc, &fetch) {
                Ok(Some(fns)) => ddocs.push(fns),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(db = %self.name, ddoc = id, error = %e, "design document does not compile; its functions are off")
                }
            }
        }
        let set = Arc::new(DbPlugins { ddocs });
        match self.plugins.write() {
            Ok(mut p) => *p = set,
            Err(p) => *p.into_inner() = set,
        }
        // Sorted once here: `_index` lists them so, and the planner breaks ties by name.
        indexes.sort_by(|a, b| (&a.ddoc, &a.name).cmp(&(&b.ddoc, &b.name)));
        let indexes = Arc::new(indexes);
        match self.mango.write() {
            Ok(mut m) => *m = indexes,
            Err(m) => *m.into_inner() = indexes,
        }
    }

    /// Refuses a design document whose code does not compile (CouchDB's 400
    /// `compilation_error`). `fresh` holds bytes of attachments written in this batch.
    pub(super) fn check_design_doc(
        &self,
        id: &str,
        body: &Map<String, Value>,
        atts: &BTreeMap<String, AttMeta>,
        fresh: &HashMap<String, Vec<u8>>,
    ) -> DbResult<()> {
        let fetch = |name: &str| -> Option<Vec<u8>> {
            let digest = &atts.get(name)?.digest;
            fresh
                .get(digest)
                .cloned()
                .or_else(|| self.attachment_bytes(digest).ok())
        };
        match self.host.compile(&self.name, id, body, &fetch) {
            Ok(_) => Ok(()),
            Err(e) => Err(DbError::Compilation(e.to_string())),
        }
    }

    /// Runs every design document's `validate_doc_update` on a write; the first refusal wins.
    pub(super) fn validate(
        &self,
        plugins: &DbPlugins,
        new_doc: &Value,
        old_doc: &Value,
        user_ctx: &Value,
        sec_obj: &Value,
    ) -> DbResult<()> {
        let args = [
            new_doc.clone(),
            old_doc.clone(),
            user_ctx.clone(),
            sec_obj.clone(),
        ];
        for (ddoc, f) in plugins.validators() {
            let out = match f.call(&args) {
                Ok(v) => v,
                Err(PluginError::Thrown(v)) => v,
                Err(e) => {
                    tracing::warn!(db = %self.name, %ddoc, doc = %new_doc["_id"], error = %e, "validator failed; write refused");
                    thali_sys::metrics::get().plugin_failed(
                        &self.name,
                        ddoc,
                        "validate_doc_update",
                        new_doc["_id"].as_str().unwrap_or(""),
                        &e.to_string(),
                    );
                    return Err(DbError::Plugin(e.to_string()));
                }
            };
            match verdict(&out) {
                Ok(Verdict::Accept) => {}
                Ok(Verdict::Forbidden(r)) => return Err(DbError::Forbidden(r)),
                Ok(Verdict::Unauthorized(r)) => return Err(DbError::Unauthorized(r)),
                Err(m) => {
                    tracing::warn!(db = %self.name, %ddoc, error = %m, "validator returned garbage");
                    return Err(DbError::Plugin(format!("{ddoc}: {m}")));
                }
            }
        }
        Ok(())
    }
}
