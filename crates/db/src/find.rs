//! `_find`, `_explain` and `_index`: Mango queries over the JSON indexes (view indexes whose
//! maps are native, see `mango::index`) or, without a usable one, over the documents by id.
//! Every document read is matched against the whole selector; the index only narrows the
//! scan. A bookmark is the last row's key: the next page starts strictly after it, so paging
//! neither repeats nor skips documents whose indexed fields do not change meanwhile.

use super::read::DocOptions;
use super::views::row_id;
use super::{Caller, Database, DbError, DbResult};
use crate::offload;
use base64::Engine;
use serde_json::{json, Map, Value};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;
use thali_doc::collate;
use thali_mango::index::{self, IndexDef};
use thali_mango::plan::{self, Access, Plan};
use thali_mango::request::{project, FindRequest};
use thali_mango::MangoError;
use thali_plugins::DesignFns;
use thali_store::index::view_prefix;

/// Bookmarks of `_all_docs` scans start with this byte, those of index scans with the row
/// key's own `v`.
const ALL_DOCS_TAG: u8 = b'd';

/// Ratio of documents examined to results above which `_find` warns (CouchDB's default).
const SCAN_WARNING_RATIO: u64 = 10;

/// A `_find` answer is held whole while it is built: past this many bytes of documents it ends
/// early, with a warning and a bookmark to go on from (a `limit` of millions cannot exhaust
/// the node's memory).
const MAX_ANSWER_BYTES: usize = 64 << 20;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn bad_bookmark(b: &str) -> DbError {
    MangoError::bad(
        "invalid_bookmark",
        format!("Invalid bookmark value: \"{b}\""),
    )
    .into()
}

/// The special index every database has.
fn all_docs_json() -> Value {
    json!({"ddoc": null, "name": "_all_docs", "type": "special",
        "def": {"fields": [{"_id": "asc"}]}})
}

/// What one `_find` read and returned.
#[derive(Default)]
struct Scan {
    docs: Vec<Value>,
    keys_examined: u64,
    docs_examined: u64,
    last_key: Option<Vec<u8>>,
    /// JSON bytes of `docs` so far.
    bytes: usize,
}

impl Database {
    /// The database's JSON indexes, sorted by design document and name (a snapshot, replaced
    /// with the compiled design documents).
    fn mango_indexes(&self) -> Arc<Vec<IndexDef>> {
        match self.mango.read() {
            Ok(m) => m.clone(),
            Err(m) => m.into_inner().clone(),
        }
    }

    /// The compiled design document of an index, its view signature and its view's number.
    fn index_view(&self, idx: &IndexDef) -> DbResult<(Arc<DesignFns>, String, u16)> {
        let fns = self
            .plugins()
            .ddoc(&idx.ddoc)
            .cloned()
            .ok_or_else(|| DbError::Internal("index design document vanished".into()))?;
        let sig = fns.view_sig.clone();
        let view = fns.views.keys().position(|v| *v == idx.name);
        match (sig, view) {
            (Some(sig), Some(view)) => Ok((fns, sig, view as u16)),
            _ => Err(DbError::Internal("index view vanished".into())),
        }
    }

    /// `POST /db/_find`.
    pub async fn find(self: &Arc<Self>, req: FindRequest) -> DbResult<Value> {
        self.check_alive()?;
        let started = Instant::now();
        let indexes = self.mango_indexes();
        // The chosen index is brought up to date first (unless `update: false`).
        if let Access::Json(chosen) = plan::plan(&req, &indexes)?.access {
            if req.update {
                let (fns, sig, _) = self.index_view(chosen)?;
                let idx = self.open_index(&sig, &chosen.ddoc)?;
                self.refresh(&idx, &fns).await?;
            }
        }
        let this = self.clone();
        offload::run(move || this.find_now(&req, &indexes, started)).await?
    }

    fn find_now(
        &self,
        req: &FindRequest,
        indexes: &[IndexDef],
        started: Instant,
    ) -> DbResult<Value> {
        let p = plan::plan(req, indexes)?;
        let scan = match p.access {
            Access::AllDocs => self.scan_all_docs(req, &p)?,
            Access::Json(chosen) => {
                let (_, sig, view) = self.index_view(chosen)?;
                self.scan_index(req, &p, &sig, &chosen.ddoc, view)?
            }
        };
        let mut out = Map::new();
        let results = scan.docs.len() as u64;
        out.insert("docs".into(), Value::Array(scan.docs));
        let bookmark = match scan.last_key {
            Some(k) => b64().encode(k),
            None => req.bookmark.clone().unwrap_or_else(|| "nil".into()),
        };
        out.insert("bookmark".into(), json!(bookmark));
        let mut warnings = p.warnings.clone();
        let ratio = scan
            .docs_examined
            .checked_div(results)
            .unwrap_or(scan.docs_examined);
        if scan.bytes >= MAX_ANSWER_BYTES && (results as usize) < req.limit {
            warnings.push(format!(
                "The answer reached {} MiB and ends early: go on with its bookmark.",
                MAX_ANSWER_BYTES >> 20
            ));
        }
        if ratio > SCAN_WARNING_RATIO {
            warnings.push("The number of documents examined is high in proportion to the number of results returned. Consider adding a more specific index to improve this.".into());
        }
        if !warnings.is_empty() {
            out.insert("warning".into(), json!(warnings.join("\n")));
        }
        if req.execution_stats {
            out.insert(
                "execution_stats".into(),
                json!({
                    "total_keys_examined": scan.keys_examined,
                    "total_docs_examined": scan.docs_examined,
                    "total_quorum_docs_examined": 0,
                    "results_returned": results,
                    "execution_time_ms": started.elapsed().as_secs_f64() * 1000.0,
                }),
            );
        }
        Ok(Value::Object(out))
    }

    /// Reads document `id` and keeps it when it matches; `false` once the page is full.
    fn consider(
        &self,
        req: &FindRequest,
        id: &str,
        scan: &mut Scan,
        skip: &mut usize,
    ) -> DbResult<bool> {
        if id.starts_with("_design/") {
            return Ok(true);
        }
        scan.docs_examined += 1;
        let opts = DocOptions {
            conflicts: req.conflicts,
            ..Default::default()
        };
        let doc = match self.get_doc(id, None, &opts) {
            Ok(d) => Value::Object(d.doc),
            Err(DbError::NotFound(_)) => return Ok(true),
            Err(e) => return Err(e),
        };
        if !req.selector.matches(&doc) {
            return Ok(true);
        }
        if *skip > 0 {
            *skip -= 1;
            return Ok(true);
        }
        let doc = match &req.fields {
            Some(f) => project(&doc, f),
            None => doc,
        };
        scan.bytes += serde_json::to_vec(&doc).map_or(0, |v| v.len());
        scan.docs.push(doc);
        Ok(scan.docs.len() < req.limit && scan.bytes < MAX_ANSWER_BYTES)
    }

    fn scan_all_docs(&self, req: &FindRequest, p: &Plan) -> DbResult<Scan> {
        let mut scan = Scan::default();
        if p.empty || req.limit == 0 {
            return Ok(scan);
        }
        let after = match &req.bookmark {
            None => None,
            Some(b) => match b64().decode(b) {
                Ok(k) if k.first() == Some(&ALL_DOCS_TAG) => {
                    Some(String::from_utf8(k[1..].to_vec()).map_err(|_| bad_bookmark(b))?)
                }
                _ => return Err(bad_bookmark(b)),
            },
        };
        // Resuming narrows the range to the side after the bookmark's id.
        let (mut lo, mut hi) = (p.id_lo.clone(), p.id_hi.clone());
        if let Some(a) = &after {
            let side = if p.descending { &mut hi } else { &mut lo };
            let tighter = match side.as_deref() {
                None => true,
                Some(s) if p.descending => a.as_str() < s,
                Some(s) => a.as_str() > s,
            };
            if tighter {
                *side = Some(a.clone());
            }
        }
        if let (Some(l), Some(h)) = (&lo, &hi) {
            if l > h {
                return Ok(scan);
            }
        }
        let (start, end) = if p.descending { (hi, lo) } else { (lo, hi) };
        let mut skip = req.skip;
        for r in self
            .data()
            .docs(start.as_deref(), end.as_deref(), true, p.descending)
        {
            let (id, info) = r?;
            if after.as_deref() == Some(id.as_str()) {
                continue;
            }
            scan.keys_examined += 1;
            if info.tree.winner().is_none_or(|w| w.deleted) {
                continue;
            }
            let before = scan.docs.len();
            let more = self.consider(req, &id, &mut scan, &mut skip)?;
            if scan.docs.len() > before {
                let mut k = vec![ALL_DOCS_TAG];
                k.extend_from_slice(id.as_bytes());
                scan.last_key = Some(k);
            }
            if !more {
                break;
            }
        }
        Ok(scan)
    }

    fn scan_index(
        &self,
        req: &FindRequest,
        p: &Plan,
        sig: &str,
        ddoc: &str,
        view: u16,
    ) -> DbResult<Scan> {
        let mut scan = Scan::default();
        if p.empty || req.limit == 0 {
            return Ok(scan);
        }
        let prefix = view_prefix(view);
        let key = |vals: &[Value], end: bool| {
            let mut k = prefix.clone();
            k.push(0x60); // an array: the index key is the list of the columns' values
            for v in vals {
                collate::encode_into(v, &mut k);
            }
            if end {
                k.push(0xff);
            }
            k
        };
        let mut lo = Bound::Included(key(&p.lo, false));
        let mut hi = Bound::Included(key(&p.hi, true));
        if let Some(b) = &req.bookmark {
            let k = b64()
                .decode(b)
                .ok()
                .filter(|k| k.starts_with(&prefix) && k.len() > prefix.len())
                .ok_or_else(|| bad_bookmark(b))?;
            if p.descending {
                if matches!(&hi, Bound::Included(h) if k < *h) {
                    hi = Bound::Excluded(k);
                }
            } else if matches!(&lo, Bound::Included(l) if k > *l) {
                lo = Bound::Excluded(k);
            }
        }
        let (Bound::Included(l) | Bound::Excluded(l), Bound::Included(h) | Bound::Excluded(h)) =
            (&lo, &hi)
        else {
            unreachable!("both bounds are set above")
        };
        if l >= h {
            return Ok(scan);
        }
        let idx = self.open_index(sig, ddoc)?;
        let mut skip = req.skip;
        for r in idx.store.rows(lo, hi, p.descending) {
            let (k, _) = r?;
            scan.keys_examined += 1;
            let id = row_id(&k);
            let before = scan.docs.len();
            let more = self.consider(req, &id, &mut scan, &mut skip)?;
            if scan.docs.len() > before {
                scan.last_key = Some(k.to_vec());
            }
            if !more {
                break;
            }
        }
        Ok(scan)
    }

    /// `POST /db/_explain`: the plan `_find` would follow.
    pub fn explain(&self, req: &FindRequest) -> DbResult<Value> {
        self.check_alive()?;
        let indexes = self.mango_indexes();
        let p = plan::plan(req, &indexes)?;
        let (index, start_key, end_key) = match p.access {
            Access::AllDocs => (
                all_docs_json(),
                json!(p.id_lo),
                json!(p.id_hi.clone().unwrap_or_else(|| "<MAX>".into())),
            ),
            Access::Json(i) => {
                let mut end = p.hi.clone();
                end.push(json!("<MAX>"));
                (i.json(), json!(p.lo), json!(end))
            }
        };
        let fields = match &req.fields {
            None => json!("all_fields"),
            Some(f) => json!(f.iter().map(|p| p.join(".")).collect::<Vec<_>>()),
        };
        Ok(json!({
            "dbname": self.name(),
            "index": index,
            "partitioned": false,
            "selector": req.selector.json(),
            "opts": {
                "use_index": req.use_index.as_ref().map_or(json!([]), |(d, n)| match n {
                    None => json!([d]),
                    Some(n) => json!([d, n]),
                }),
                "bookmark": req.bookmark.clone().unwrap_or_else(|| "nil".into()),
                "limit": req.limit,
                "skip": req.skip,
                "sort": req.sort.iter().map(|c| json!({c.name.clone(): if c.desc {"desc"} else {"asc"}})).collect::<Vec<_>>(),
                "fields": fields,
                "conflicts": req.conflicts,
                "update": req.update,
                "execution_stats": req.execution_stats,
                "allow_fallback": req.allow_fallback,
            },
            "limit": req.limit,
            "skip": req.skip,
            "fields": fields,
            "mrargs": {
                "include_docs": true,
                "view_type": "map",
                "reduce": false,
                "start_key": start_key,
                "end_key": end_key,
                "direction": if p.descending { "rev" } else { "fwd" },
                "update": req.update,
                "conflicts": req.conflicts,
            },
            "warning": (!p.warnings.is_empty()).then(|| p.warnings.join("\n")),
        }))
    }

    /// `GET /db/_index`.
    pub fn list_indexes(&self, skip: usize, limit: Option<usize>) -> DbResult<Value> {
        self.check_alive()?;
        let mut all = vec![all_docs_json()];
        all.extend(self.mango_indexes().iter().map(IndexDef::json));
        let total = all.len();
        let page: Vec<Value> = all
            .into_iter()
            .skip(skip)
            .take(limit.unwrap_or(usize::MAX))
            .collect();
        Ok(json!({"total_rows": total, "indexes": page}))
    }

    /// `POST /db/_index`: adds the index to its design document (a write like any other, so
    /// only callers who may write design documents can).
    pub async fn create_index(self: &Arc<Self>, body: &Value, caller: &Caller) -> DbResult<Value> {
        self.check_alive()?;
        let new = index::parse_create(body)?;
        let def = new.def;
        let mut doc = self.ddoc_for_index(&def.ddoc)?;
        if !index::add_to_ddoc(&mut doc, &def)? {
            return Ok(json!({"result": "exists", "id": def.ddoc, "name": def.name}));
        }
        self.write_ddoc(doc, caller).await?;
        Ok(json!({"result": "created", "id": def.ddoc, "name": def.name}))
    }

    /// `DELETE /db/_index/{ddoc}/json/{name}`.
    pub async fn delete_index(
        self: &Arc<Self>,
        ddoc: &str,
        name: &str,
        caller: &Caller,
    ) -> DbResult<Value> {
        self.check_alive()?;
        let id = if ddoc.starts_with("_design/") {
            ddoc.to_string()
        } else {
            format!("_design/{ddoc}")
        };
        let mut doc = match self.get_doc(&id, None, &DocOptions::default()) {
            Ok(d) if thali_plugins::design::language_name(&d.doc) == "query" => d.doc,
            _ => {
                return Err(MangoError::new(404, "not_found", "Index not found").into());
            }
        };
        if index::remove_from_ddoc(&mut doc, name)? {
            doc.insert("_deleted".into(), json!(true));
        }
        self.write_ddoc(doc, caller).await?;
        Ok(json!({"ok": true}))
    }

    /// The design document an index goes into: the stored one, or a new `{"_id"}`.
    fn ddoc_for_index(&self, id: &str) -> DbResult<Map<String, Value>> {
        match self.get_doc(id, None, &DocOptions::default()) {
            Ok(d) => Ok(d.doc),
            Err(DbError::NotFound(_)) => {
                let mut m = Map::new();
                m.insert("_id".into(), json!(id));
                Ok(m)
            }
            Err(e) => Err(e),
        }
    }

    async fn write_ddoc(
        self: &Arc<Self>,
        doc: Map<String, Value>,
        caller: &Caller,
    ) -> DbResult<()> {
        let mut res = self
            .bulk_docs(vec![Value::Object(doc)], true, caller)
            .await?;
        match res.pop() {
            Some(Ok(_)) => Ok(()),
            Some(Err((_, _, e))) => Err(e),
            None => Err(DbError::Internal("no write result".into())),
        }
    }
}
