//! View indexes of a database: opened per design-document signature, brought up to date
//! incrementally from the changes feed (one updater at a time; queries that need an up-to-date
//! index wait for it), queried with CouchDB's parameters, described by `_info`, listed in
//! `_active_tasks` while they build, and removed by `_view_cleanup` once no design document
//! uses them.
//!
//! Map functions see the winning revision of every non-design document (with `_conflicts`);
//! one that fails on a document is logged and that document contributes no rows to that view,
//! as in CouchDB. Reduces run at query time over the rows in range (built-ins in Rust, custom
//! ones in their plugin, chunked with rereduce).

use super::read::DocOptions;
use super::{Database, DbError, DbResult};
use crate::offload;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thali_doc::collate;
use thali_plugins::design::{DesignFns, Reduce};
use thali_store::index::{row_key, row_view, view_prefix, IndexBatch, IndexStore};
use thali_sys::sync::lock;
use thali_view::reduce::{ReduceError, Reducer};
use thali_view::{Update, ViewQuery};

/// Documents per index batch (one atomic write with the sequence they reach).
const BATCH: usize = 1000;

/// The progress of a running update, for `_active_tasks`.
#[derive(Clone)]
struct Progress {
    started_on: u64,
    updated_on: u64,
    changes_done: u64,
    total_changes: u64,
}

/// One design document's index, open.
pub(super) struct ViewIndex {
    sig: String,
    ddoc: String,
    pub(super) store: IndexStore,
    /// Held by the one updater; queries that want a fresh index wait on it.
    update: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
    progress: Mutex<Option<Progress>>,
    cache: Mutex<QueryCache>,
}

/// Answers that cost a scan (the `offset` of a range, a reduce), kept while the index stays at
/// the sequence they were computed at: repeated queries on an unchanged index are O(rows
/// returned) instead of O(rows before / in the range).
#[derive(Default)]
struct QueryCache {
    seq: u64,
    entries: HashMap<String, Value>,
}

const CACHE_MAX: usize = 256;

impl ViewIndex {
    fn cached(
        &self,
        seq: u64,
        key: &str,
        compute: impl FnOnce() -> DbResult<Value>,
    ) -> DbResult<Value> {
        if let Some(v) = {
            let c = lock(&self.cache);
            (c.seq == seq)
                .then(|| c.entries.get(key).cloned())
                .flatten()
        } {
            return Ok(v);
        }
        let v = compute()?;
        let mut c = lock(&self.cache);
        if c.seq != seq || c.entries.len() >= CACHE_MAX {
            c.entries.clear();
            c.seq = seq;
        }
        c.entries.insert(key.to_string(), v.clone());
        Ok(v)
    }
}

/// The open indexes of a database, by signature.
#[derive(Default)]
pub(super) struct Views {
    open: Mutex<HashMap<String, Arc<ViewIndex>>>,
}

fn now() -> u64 {
    thali_sys::clock::unix_now()
}

impl From<ReduceError> for DbError {
    fn from(e: ReduceError) -> DbError {
        match e {
            ReduceError::Overflow(m) => DbError::ReduceOverflow(m),
            ReduceError::Builtin(m) | ReduceError::Plugin(m) => DbError::Plugin(m),
        }
    }
}

/// Where an update's time went (nanoseconds summed over threads), for its log line.
#[derive(Default)]
struct Timing {
    read: std::sync::atomic::AtomicU64,
    map: std::sync::atomic::AtomicU64,
    write: std::sync::atomic::AtomicU64,
    flush: std::sync::atomic::AtomicU64,
}

impl Timing {
    fn add(slot: &std::sync::atomic::AtomicU64, since: Instant) {
        slot.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    fn secs(slot: &std::sync::atomic::AtomicU64) -> f64 {
        slot.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// One emitted row, ready to store: view number, row key, JSON `[key, value]`.
type Row = (u16, Vec<u8>, Vec<u8>);

/// A key range of an index, as the store takes it.
type Range = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// A reduce group being gathered: its collation bytes, the key shown, its `(key, id, value)`
/// rows.
type Group = (Vec<u8>, Value, Vec<(Value, String, Value)>);

/// What a view request names, resolved: the compiled design document and the view's number.
struct Target {
    fns: Arc<DesignFns>,
    sig: String,
    view: u16,
    name: String,
}

impl Database {
    /// The compiled design document `_design/<ddoc>` with its view signature.
    fn view_ddoc(&self, ddoc: &str) -> DbResult<(Arc<DesignFns>, String)> {
        let id = format!("_design/{ddoc}");
        let plugins = self.plugins();
        if let Some(fns) = plugins.ddoc(&id) {
            let sig = fns
                .view_sig
                .clone()
                .ok_or_else(|| DbError::NotFound("missing_named_view".into()))?;
            return Ok((fns.clone(), sig));
        }
        // Stored but not run here (`--store-only-language`), or missing.
        let doc = self.get_doc(&id, None, &DocOptions::default())?;
        let lang = thali_plugins::design::language_name(&doc.doc);
        if thali_plugins::design::Language::named(lang).is_some() || lang == "query" {
            // A language that runs, but the design document has no functions.
            return Err(DbError::NotFound("missing_named_view".into()));
        }
        Err(DbError::UnknownLanguage(format!(
            "{lang} ({id} is stored and replicated but its views do not run here: the node \
             was started with --store-only-language {lang})"
        )))
    }

    fn target(&self, ddoc: &str, view: &str) -> DbResult<Target> {
        let (fns, sig) = self.view_ddoc(ddoc)?;
        let n = fns
            .views
            .keys()
            .position(|v| v == view)
            .ok_or_else(|| DbError::NotFound("missing_named_view".into()))?;
        Ok(Target {
            fns,
            sig,
            view: n as u16,
            name: view.to_string(),
        })
    }

    pub(super) fn open_index(&self, sig: &str, ddoc: &str) -> DbResult<Arc<ViewIndex>> {
        let mut open = lock(&self.views.open);
        if let Some(i) = open.get(sig) {
            return Ok(i.clone());
        }
        let store = self.data().index(sig)?;
        let idx = Arc::new(ViewIndex {
            sig: sig.to_string(),
            ddoc: ddoc.to_string(),
            store,
            update: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            progress: Mutex::new(None),
            cache: Mutex::new(QueryCache::default()),
        });
        open.insert(sig.to_string(), idx.clone());
        Ok(idx)
    }

    /// Brings the index up to the database's current sequence (waiting for a running update).
    pub(super) async fn refresh(
        self: &Arc<Self>,
        idx: &Arc<ViewIndex>,
        fns: &Arc<DesignFns>,
    ) -> DbResult<()> {
        idx.waiting.fetch_add(1, Ordering::SeqCst);
        let _g = idx.update.lock().await;
        idx.waiting.fetch_sub(1, Ordering::SeqCst);
        if idx.store.seq()? >= self.update_seq() {
            return Ok(());
        }
        let (this, i, f) = (self.clone(), idx.clone(), fns.clone());
        offload::long(move || this.update_index(&i, &f)).await?
    }

    /// Runs the map functions over the changes since the index's sequence. Three stages: this
    /// thread reads chunks of the changes feed, two threads map a chunk ([`Self::map_chunk`]),
    /// a writer applies the previous chunk's batch meanwhile, so a build uses both cores of a
    /// small machine (the log line splits the time into read/map/write). Under sled, reads
    /// beside its writer are slow (its epoch-based reclamation hands the writer's garbage to
    /// readers); fjall reads beside a writer at full speed.
    fn update_index(&self, idx: &ViewIndex, fns: &DesignFns) -> DbResult<()> {
        let target = self.update_seq();
        let since = idx.store.seq()?;
        if since >= target {
            return Ok(());
        }
        // At most this many changes (fewer when documents changed more than once): counting them
        // exactly would cost a pass over the by-sequence index.
        let total = target - since;
        let views: Vec<(&String, &thali_plugins::design::ViewFns)> = fns.views.iter().collect();
        let counts: Vec<u64> = (0..views.len())
            .map(|v| idx.store.count(v as u16))
            .collect::<Result<_, _>>()?;
        let started = Instant::now();
        *lock(&idx.progress) = Some(Progress {
            started_on: now(),
            updated_on: now(),
            changes_done: 0,
            total_changes: total,
        });
        tracing::info!(db = %self.name, ddoc = %idx.ddoc, sig = %idx.sig, since, changes = total, "view index update started");
        let timing = Timing::default();
        let build = Build {
            idx,
            views,
            counts,
            since,
            target,
            total,
            timing: &timing,
        };
        let result = std::thread::scope(|scope| -> DbResult<u64> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(IndexBatch, u64)>(1);
            let (ack_tx, ack_rx) = std::sync::mpsc::channel::<()>();
            let writer = scope.spawn(|| write_batches(idx, rx, ack_tx, &timing));
            let mapped = self.map_changes(build, &tx, &ack_rx);
            drop(tx);
            writer
                .join()
                .map_err(|_| DbError::Internal("index writer panicked".into()))??;
            let done = mapped?;
            let t0 = Instant::now();
            idx.store.flush()?;
            Timing::add(&timing.flush, t0);
            Ok(done)
        });
        *lock(&idx.progress) = None;
        let done = result?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            db = %self.name, ddoc = %idx.ddoc, docs = done, seconds = secs,
            docs_per_s = (done as f64 / secs.max(1e-9)) as u64,
            read_s = Timing::secs(&timing.read), map_s = Timing::secs(&timing.map),
            write_s = Timing::secs(&timing.write), flush_s = Timing::secs(&timing.flush),
            "view index updated"
        );
        Ok(())
    }

    /// The read and map stages: chunks of changes mapped into batches for the writer (the
    /// next chunk is read while the writer applies the previous one). Returns how many
    /// changes were done.
    fn map_changes(
        &self,
        mut b: Build<'_>,
        tx: &std::sync::mpsc::SyncSender<(IndexBatch, u64)>,
        ack_rx: &std::sync::mpsc::Receiver<()>,
    ) -> DbResult<u64> {
        let data = self.data();
        let mut changes = data.changes(b.since, false);
        let target = b.target;
        // The next chunk of changes, and whether the feed ends after it.
        let mut read = || -> DbResult<(Vec<(u64, thali_store::SeqEntry)>, bool)> {
            let mut chunk = Vec::with_capacity(BATCH);
            for r in changes.by_ref() {
                let (seq, entry) = r?;
                if seq > target {
                    return Ok((chunk, true));
                }
                chunk.push((seq, entry));
                if chunk.len() >= BATCH {
                    return Ok((chunk, false));
                }
            }
            Ok((chunk, true))
        };
        let mut done = 0u64;
        let mut last_log = Instant::now();
        let mut in_flight = false;
        let (mut next, mut end) = read()?;
        loop {
            let chunk = std::mem::take(&mut next);
            let last = end;
            let Some(last_seq) = chunk.last().map(|c| c.0) else {
                break;
            };
            let rows = self.map_chunk(b.idx, &b.views, &chunk, b.timing)?;
            if !last {
                let t0 = Instant::now();
                (next, end) = read()?;
                Timing::add(&b.timing.read, t0);
            }
            if in_flight && ack_rx.recv().is_err() {
                // The writer failed; its error is returned by `update_index`.
                return Ok(done);
            }
            let mut batch = b.rows_batch(&chunk, rows)?;
            done += chunk.len() as u64;
            batch.set_seq(if last { target } else { last_seq });
            if tx.send((batch, done)).is_err() {
                return Ok(done);
            }
            in_flight = true;
            if last_log.elapsed().as_secs() >= 10 {
                last_log = Instant::now();
                tracing::info!(db = %self.name, ddoc = %b.idx.ddoc, done, total = b.total, "view index update progress");
            }
            if last {
                return Ok(done);
            }
        }
        // Nothing (left) to map: the index has still seen everything up to `target`.
        let mut batch = IndexBatch::default();
        batch.set_seq(target);
        let _ = tx.send((batch, done));
        Ok(done)
    }

    /// Maps a chunk of changed documents on two threads (WASM calls run in parallel on warm
    /// instances; Lua calls of one design document take turns, but reading and encoding do
    /// not), keeping the chunk's order.
    fn map_chunk(
        &self,
        idx: &ViewIndex,
        views: &[(&String, &thali_plugins::design::ViewFns)],
        chunk: &[(u64, thali_store::SeqEntry)],
        timing: &Timing,
    ) -> DbResult<Vec<Vec<Row>>> {
        let map = |part: &[(u64, thali_store::SeqEntry)]| -> DbResult<Vec<Vec<Row>>> {
            part.iter()
                .map(|(_, e)| self.map_doc(idx, views, e, timing))
                .collect()
        };
        if chunk.len() < 64 {
            return map(chunk);
        }
        let (a, b) = chunk.split_at(chunk.len() / 2);
        std::thread::scope(|s| {
            let second = s.spawn(|| map(b));
            let mut rows = map(a)?;
            rows.extend(
                second
                    .join()
                    .map_err(|_| DbError::Internal("map thread panicked".into()))??,
            );
            Ok(rows)
        })
    }

    /// Maps one changed document with every view: `(view, row key, JSON [key, value])`. A
    /// map that fails on a document skips it (as in CouchDB); one stopped by a sandbox limit
    /// stops the build (CouchDB's `os_process_error`): otherwise a function that loops would
    /// cost the time limit once per document of the database on every query.
    fn map_doc(
        &self,
        idx: &ViewIndex,
        views: &[(&String, &thali_plugins::design::ViewFns)],
        entry: &thali_store::SeqEntry,
        timing: &Timing,
    ) -> DbResult<Vec<Row>> {
        let mut rows_out = Vec::new();
        if entry.deleted || entry.id.starts_with("_design/") {
            return Ok(rows_out);
        }
        let opts = DocOptions {
            conflicts: true,
            ..Default::default()
        };
        let t0 = Instant::now();
        let doc = self.get_doc(&entry.id, None, &opts);
        Timing::add(&timing.read, t0);
        let Ok(out) = doc else {
            return Ok(rows_out);
        };
        let args = [Value::Object(out.doc)];
        for (n, (name, view)) in views.iter().enumerate() {
            let t0 = Instant::now();
            let called = view.map.call(&args);
            Timing::add(&timing.map, t0);
            let rows = match called {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(db = %self.name, ddoc = %idx.ddoc, view = %name, id = %entry.id, error = %e, "map function failed; document skipped");
                    thali_sys::metrics::get().plugin_failed(
                        &self.name,
                        &idx.ddoc,
                        &format!("views.{name}.map"),
                        &entry.id,
                        &e.to_string(),
                    );
                    if e.is_limit() {
                        return Err(DbError::Plugin(format!(
                            "the map function of view {name} in {} stopped at a limit on document {}: {e}; the index is not built",
                            idx.ddoc, entry.id
                        )));
                    }
                    continue;
                }
            };
            let Value::Array(rows) = rows else {
                // An empty Lua table comes back as `{}`: no rows.
                continue;
            };
            let mut emitted = Vec::with_capacity(rows.len());
            for row in rows {
                if !matches!(&row, Value::Array(kv) if kv.len() == 2) {
                    tracing::warn!(db = %self.name, view = %name, id = %entry.id, row = %thali_plugins::design::short(&row), "map emitted something that is not [key, value]");
                    continue;
                }
                if let Some((k, v)) = key_value(row) {
                    emitted.push((collate::encode(&k), k, v));
                }
            }
            // A document's rows with equal keys come out ordered by value, as in CouchDB.
            if emitted.len() > 1 {
                emitted.sort_by_cached_key(|(ek, _, v)| (ek.clone(), collate::encode(v)));
            }
            for (i, (ek, k, v)) in emitted.into_iter().enumerate() {
                let key = row_key(n as u16, &ek, &entry.id, i as u32);
                let val = serde_json::to_vec(&json!([k, v])).unwrap_or_default();
                rows_out.push((n as u16, key, val));
            }
        }
        Ok(rows_out)
    }

    /// `GET/POST /db/_design/ddoc/_view/name`.
    pub async fn view_query(
        self: &Arc<Self>,
        ddoc: &str,
        view: &str,
        q: ViewQuery,
    ) -> DbResult<Value> {
        self.check_alive()?;
        let t = self.target(ddoc, view)?;
        let vf = &t.fns.views[&t.name];
        let reduce = q.check(vf.reduce.is_some()).map_err(DbError::QueryParse)?;
        let idx = self.open_index(&t.sig, &t.fns.id)?;
        if q.update == Update::True {
            self.refresh(&idx, &t.fns).await?;
        }
        let reducer = match (&vf.reduce, reduce) {
            (Some(Reduce::Builtin(b)), true) => Reducer::builtin(b),
            (Some(Reduce::Func(f)), true) => Some(Reducer::Custom(f.clone())),
            _ => None,
        };
        let (this, i, q2) = (self.clone(), idx.clone(), q.clone());
        let view_n = t.view;
        let out = offload::run(move || match reducer {
            Some(r) => {
                let seq = i.store.seq()?;
                let key = format!("reduce {view_n} {q2:?}");
                i.cached(seq, &key, || this.reduce_rows(&i, view_n, &q2, &r))
            }
            None => this.map_rows(&i, view_n, &q2),
        })
        .await??;
        if q.update == Update::Lazy {
            let (this, fns) = (self.clone(), t.fns.clone());
            tokio::spawn(async move {
                if let Err(e) = this.refresh(&idx, &fns).await {
                    tracing::warn!(db = %this.name, error = %e, "lazy view update failed");
                }
            });
        }
        Ok(out)
    }

    /// The key ranges a query covers, in the order they are read.
    fn ranges(&self, view: u16, q: &ViewQuery) -> Vec<Range> {
        let prefix = view_prefix(view);
        let with = |parts: &[&[u8]]| -> Vec<u8> {
            let mut k = prefix.clone();
            for p in parts {
                k.extend_from_slice(p);
            }
            k
        };
        let view_end = {
            let mut k = prefix.clone();
            k.push(0xff);
            k
        };
        if let Some(keys) = &q.keys {
            return keys
                .iter()
                .map(|key| {
                    let e = collate::encode(key);
                    (
                        Bound::Included(with(&[&e])),
                        Bound::Included(with(&[&e, &[0xff]])),
                    )
                })
                .collect();
        }
        let enc = |k: &Option<Value>| k.as_ref().map(collate::encode);
        let (start, end) = (enc(&q.start_key), enc(&q.end_key));
        let (sd, ed) = (
            q.start_docid.as_deref().map(str::as_bytes),
            q.end_docid.as_deref().map(str::as_bytes),
        );
        // Ascending: start is the low end; descending: the high end.
        let (lo, hi) = if !q.descending {
            let lo = match (&start, sd) {
                (Some(s), Some(d)) => Bound::Included(with(&[s, d])),
                (Some(s), None) => Bound::Included(with(&[s])),
                (None, _) => Bound::Included(prefix.clone()),
            };
            let hi = match (&end, ed, q.inclusive_end) {
                (Some(e), Some(d), true) => Bound::Included(with(&[e, d, &[0, 0xff]])),
                (Some(e), Some(d), false) => Bound::Excluded(with(&[e, d, &[0]])),
                (Some(e), None, true) => Bound::Included(with(&[e, &[0xff]])),
                (Some(e), None, false) => Bound::Excluded(with(&[e])),
                (None, _, _) => Bound::Excluded(view_end.clone()),
            };
            (lo, hi)
        } else {
            let hi = match (&start, sd) {
                (Some(s), Some(d)) => Bound::Included(with(&[s, d, &[0, 0xff]])),
                (Some(s), None) => Bound::Included(with(&[s, &[0xff]])),
                (None, _) => Bound::Excluded(view_end.clone()),
            };
            let lo = match (&end, ed, q.inclusive_end) {
                (Some(e), Some(d), true) => Bound::Included(with(&[e, d])),
                (Some(e), Some(d), false) => Bound::Included(with(&[e, d, &[1]])),
                (Some(e), None, true) => Bound::Included(with(&[e])),
                (Some(e), None, false) => Bound::Included(with(&[e, &[0xff]])),
                (None, _, _) => Bound::Included(prefix.clone()),
            };
            (lo, hi)
        };
        vec![(lo, hi)]
    }

    fn map_rows(&self, idx: &ViewIndex, view: u16, q: &ViewQuery) -> DbResult<Value> {
        let seq = idx.store.seq()?;
        let total = idx.store.count(view)?;
        let ranges = self.ranges(view, q);
        // Rows before the first one returned, in the direction of reading.
        let cache_key = format!("offset {view} {} {:?}", q.descending, ranges.first());
        let offset_before = idx
            .cached(seq, &cache_key, || {
                Ok(json!(match ranges.first() {
                    Some((lo, hi)) => {
                        let prefix = view_prefix(view);
                        let mut view_end = prefix.clone();
                        view_end.push(0xff);
                        if q.descending {
                            let from = match hi {
                                Bound::Included(k) => Bound::Excluded(k.clone()),
                                Bound::Excluded(k) => Bound::Included(k.clone()),
                                Bound::Unbounded => Bound::Excluded(view_end.clone()),
                            };
                            idx.store.count_range(from, Bound::Excluded(view_end))
                        } else {
                            let to = match lo {
                                Bound::Included(k) => Bound::Excluded(k.clone()),
                                Bound::Excluded(k) => Bound::Included(k.clone()),
                                Bound::Unbounded => Bound::Excluded(prefix.clone()),
                            };
                            idx.store.count_range(Bound::Included(prefix), to)
                        }
                    }
                    None => 0,
                }))
            })?
            .as_u64()
            .unwrap_or(0) as usize;
        let limit = q.limit.unwrap_or(usize::MAX);
        let mut skip = q.skip;
        let mut rows = Vec::new();
        'ranges: for (lo, hi) in ranges {
            for r in idx.store.rows(lo, hi, q.descending) {
                if rows.len() >= limit {
                    break 'ranges;
                }
                let (k, v) = r?;
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                rows.push(self.row(&k, &v, q)?);
            }
        }
        let mut out = json!({
            "total_rows": total,
            "offset": (offset_before + q.skip).min(total as usize),
            "rows": rows,
        });
        if q.update_seq {
            out["update_seq"] = json!(idx.store.seq()?);
        }
        Ok(out)
    }

    /// One map row: `{id, key, value}` and, with `include_docs`, the document (the one whose
    /// `_id` the value names, else the emitting one).
    fn row(&self, key: &[u8], val: &[u8], q: &ViewQuery) -> DbResult<Value> {
        let id = row_id(key);
        let (k, v) = stored_row(val)?;
        let mut row = Map::new();
        row.insert("id".into(), json!(id));
        row.insert("key".into(), k);
        if q.include_docs {
            let (doc_id, rev) = match v.get("_id").and_then(Value::as_str) {
                Some(linked) => (
                    linked.to_string(),
                    v.get("_rev")
                        .and_then(Value::as_str)
                        .and_then(thali_doc::Rev::parse),
                ),
                None => (id.clone(), None),
            };
            let opts = DocOptions::for_rows(q.conflicts, q.attachments);
            let doc = match self.get_doc(&doc_id, rev.as_ref(), &opts) {
                Ok(d) => Value::Object(d.doc),
                Err(DbError::NotFound(_)) => Value::Null,
                Err(e) => return Err(e),
            };
            row.insert("value".into(), v);
            row.insert("doc".into(), doc);
        } else {
            row.insert("value".into(), v);
        }
        Ok(Value::Object(row))
    }

    fn reduce_rows(
        &self,
        idx: &ViewIndex,
        view: u16,
        q: &ViewQuery,
        reducer: &Reducer,
    ) -> DbResult<Value> {
        let limit = q.limit.unwrap_or(usize::MAX);
        let mut skip = q.skip;
        let mut out_rows = Vec::new();
        // The group being gathered: its collation bytes, its key, and its rows.
        let mut group: Option<Group> = None;
        let prefix_len = view_prefix(view).len();
        let mut emit = |g: Group, out: &mut Vec<Value>| -> DbResult<bool> {
            if out.len() >= limit {
                return Ok(false);
            }
            if skip > 0 {
                skip -= 1;
                return Ok(true);
            }
            let rows: Vec<(&Value, &str, &Value)> =
                g.2.iter().map(|(k, id, v)| (k, id.as_str(), v)).collect();
            let value = match reducer.reduce(&rows) {
                Ok(v) => v,
                Err(ReduceError::Builtin(m)) => {
                    json!({"error": "builtin_reduce_error", "reason": m})
                }
                Err(e) => return Err(e.into()),
            };
            out.push(thali_doc::object([("key", g.1), ("value", value)]));
            Ok(out.len() < limit)
        };
        let per_key = q.keys.is_some();
        'ranges: for (lo, hi) in self.ranges(view, q) {
            for r in idx.store.rows(lo, hi, q.descending) {
                let (k, v) = r?;
                let enc = &k[prefix_len..];
                let enc = &enc[..collate::term_len(enc)];
                let gkey = match q.group {
                    None if !per_key => Vec::new(),
                    None | Some(None) => enc.to_vec(),
                    Some(Some(level)) => collate::truncate(enc, level),
                };
                let (key, value) = stored_row(&v)?;
                let same = group.as_ref().is_some_and(|g| g.0 == gkey);
                if !same {
                    if let Some(g) = group.take() {
                        if !emit(g, &mut out_rows)? {
                            break 'ranges;
                        }
                    }
                    let shown = match q.group {
                        None if !per_key => Value::Null,
                        None | Some(None) => key.clone(),
                        Some(Some(level)) => collate::truncate_value(&key, level),
                    };
                    group = Some((gkey, shown, Vec::new()));
                }
                if let Some(g) = group.as_mut() {
                    g.2.push((key, row_id(&k), value));
                }
            }
            // With `keys`, each key is its own group even when keys repeat.
            if per_key {
                if let Some(g) = group.take() {
                    if !emit(g, &mut out_rows)? {
                        break 'ranges;
                    }
                }
            }
        }
        if let Some(g) = group.take() {
            if out_rows.len() < limit {
                emit(g, &mut out_rows)?;
            }
        }
        let mut out = thali_doc::object([("rows", Value::Array(out_rows))]);
        if q.update_seq {
            out["update_seq"] = json!(idx.store.seq()?);
        }
        Ok(out)
    }

    /// `GET /db/_design/ddoc/_info`.
    pub fn view_info(&self, ddoc: &str) -> DbResult<Value> {
        self.check_alive()?;
        let (fns, sig) = self.view_ddoc(ddoc)?;
        let idx = self.open_index(&sig, &fns.id)?;
        let size = idx.store.size_on_disk();
        let seq = idx.store.seq()?;
        let pending = self.update_seq().saturating_sub(seq);
        Ok(json!({
            "name": ddoc,
            "view_index": {
                "signature": sig,
                "language": format!("{:?}", fns.language).to_lowercase(),
                "sizes": {"file": size, "active": size, "external": 0},
                "update_seq": seq,
                "purge_seq": 0,
                "updater_running": lock(&idx.progress).is_some(),
                "compact_running": false,
                "waiting_clients": idx.waiting.load(Ordering::SeqCst),
                "waiting_commit": false,
                "updates_pending": {"minimum": pending, "preferred": pending, "total": pending},
                "collator_versions": [collate::VERSION],
            }
        }))
    }

    /// `POST /db/_view_cleanup`: removes the indexes of signatures no design document has.
    pub fn view_cleanup(&self) -> DbResult<usize> {
        self.check_alive()?;
        let plugins = self.plugins();
        let live: Vec<&String> = plugins
            .ddocs
            .iter()
            .filter_map(|d| d.view_sig.as_ref())
            .collect();
        let data = self.data();
        let mut removed = 0;
        for sig in data.index_sigs()? {
            if live.contains(&&sig) {
                continue;
            }
            let gone = lock(&self.views.open).remove(&sig);
            drop(gone);
            data.drop_index(&sig)?;
            tracing::info!(db = %self.name, sig = %sig, "unused view index removed");
            removed += 1;
        }
        Ok(removed)
    }

    /// `_active_tasks` entries of index updates running on this database.
    pub fn indexer_tasks(&self) -> Vec<Value> {
        let open: Vec<Arc<ViewIndex>> = lock(&self.views.open).values().cloned().collect();
        open.iter()
            .filter_map(|i| {
                let p = lock(&i.progress).clone()?;
                let pct = (p.changes_done * 100)
                    .checked_div(p.total_changes)
                    .unwrap_or(100);
                Some(json!({
                    "type": "indexer",
                    "database": self.name,
                    "design_document": i.ddoc,
                    "signature": i.sig,
                    "changes_done": p.changes_done,
                    "total_changes": p.total_changes,
                    "progress": pct,
                    "started_on": p.started_on,
                    "updated_on": p.updated_on,
                }))
            })
            .collect()
    }
}

/// `[key, value]` as a pair (what maps emit and what a row stores).
fn key_value(v: Value) -> Option<(Value, Value)> {
    match v {
        Value::Array(mut kv) if kv.len() == 2 => {
            let v = kv.pop()?;
            Some((kv.pop()?, v))
        }
        _ => None,
    }
}

/// A stored row's JSON `[key, value]`.
fn stored_row(val: &[u8]) -> DbResult<(Value, Value)> {
    let kv: Value = serde_json::from_slice(val).map_err(|e| DbError::Internal(e.to_string()))?;
    key_value(kv).ok_or_else(|| DbError::Internal("index row is not [key, value]".into()))
}

/// The document id inside a row key (after the collation key, up to the 0 before `n`).
pub(super) fn row_id(key: &[u8]) -> String {
    let enc = &key[3..];
    let start = 3 + collate::term_len(enc);
    let end = key.len().saturating_sub(5).max(start);
    String::from_utf8_lossy(&key[start..end]).into_owned()
}

/// One index update under way: what [`Database::update_index`]'s stages share.
struct Build<'a> {
    idx: &'a ViewIndex,
    views: Vec<(&'a String, &'a thali_plugins::design::ViewFns)>,
    /// Rows per view, kept up to date batch by batch.
    counts: Vec<u64>,
    since: u64,
    target: u64,
    total: u64,
    timing: &'a Timing,
}

impl Build<'_> {
    /// The batch that replaces the chunk's documents' previous rows with their new ones.
    fn rows_batch(
        &mut self,
        chunk: &[(u64, thali_store::SeqEntry)],
        rows: Vec<Vec<Row>>,
    ) -> DbResult<IndexBatch> {
        let fresh = self.since == 0;
        let mut batch = IndexBatch::default();
        for ((_, entry), rows) in chunk.iter().zip(rows) {
            // A document is once in the range, so its previous rows (if any) were written by
            // an earlier update, never by a batch still in flight.
            if !fresh {
                for key in self.idx.store.doc_rows(&entry.id)? {
                    if let Some(c) = row_view(&key).and_then(|v| self.counts.get_mut(v as usize)) {
                        *c = c.saturating_sub(1);
                    }
                    batch.del_row(&key);
                }
            }
            if fresh && rows.is_empty() {
                // Nothing emitted and nothing to remove.
                continue;
            }
            let mut keys = Vec::with_capacity(rows.len());
            for (view, key, val) in rows {
                batch.put_row(&key, &val);
                self.counts[view as usize] += 1;
                keys.push(key);
            }
            batch.set_doc_rows(&entry.id, &keys);
        }
        for (v, c) in self.counts.iter().enumerate() {
            batch.set_count(v as u16, *c);
        }
        Ok(batch)
    }
}

/// The write stage: applies the batches in order, acknowledging each.
fn write_batches(
    idx: &ViewIndex,
    rx: std::sync::mpsc::Receiver<(IndexBatch, u64)>,
    ack_tx: std::sync::mpsc::Sender<()>,
    timing: &Timing,
) -> DbResult<()> {
    for (b, done) in rx {
        let t0 = Instant::now();
        idx.store.apply(b)?;
        Timing::add(&timing.write, t0);
        if let Some(p) = lock(&idx.progress).as_mut() {
            p.changes_done = done;
            p.updated_on = now();
        }
        let _ = ack_tx.send(());
    }
    Ok(())
}
