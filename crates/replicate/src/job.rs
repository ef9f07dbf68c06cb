//! One replication run: open both sides, find where to resume, then a pipeline — a reader
//! pages through the source's changes, `parallelism` workers each take a batch through
//! `_revs_diff` → fetch → `_bulk_docs new_edits=false` — and the run checkpoints the highest
//! sequence below which every batch is written, periodically and at the end.

use super::attachments;
use super::cancelled;
use super::checkpoint::{log_doc, resume_seq};
use super::client::Remote;
use super::endpoint::{Change, Endpoint, Filter, LocalPut};
use super::error::{ReplError, ReplResult};
use super::spec::{EndpointSpec, Spec};
use super::stats::Stats;
use futures_util::StreamExt;
use md5::Digest;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thali_db::{random_hex, Node};
use thali_peer::Dialer;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// How long a continuous replication's longpoll waits for the next change.
const LONGPOLL: Duration = Duration::from_secs(10);

pub struct Job {
    pub spec: Spec,
    pub base_id: String,
    pub stats: Arc<Stats>,
    source: Endpoint,
    target: Endpoint,
    filter: Filter,
}

struct Batch {
    no: u64,
    rows: Vec<Change>,
    last_seq: Value,
}

/// What the checkpointer carries between checkpoints of one session.
struct Session {
    id: String,
    /// `_local/<this>` on both sides: the replication id, mixed with the filter's code.
    log_id: String,
    start_time: String,
    start_seq: Value,
    src_log: Option<Value>,
    tgt_log: Option<Value>,
    src_rev: Option<String>,
    tgt_rev: Option<String>,
    /// Cleared when the source refuses our checkpoint (read-only access): the target's log
    /// then decides alone.
    source_ok: bool,
}

fn endpoint(
    spec: &EndpointSpec,
    node: &Arc<Node>,
    dialer: &Arc<Dialer>,
    retries: Option<u32>,
) -> ReplResult<Endpoint> {
    Ok(match spec {
        EndpointSpec::Local(name) => Endpoint::Local {
            node: node.clone(),
            name: name.clone(),
        },
        EndpointSpec::Remote { url, headers } => Endpoint::Remote {
            remote: Box::new(Remote::new(
                url,
                headers,
                dialer.clone(),
                retries,
                spec.display(),
            )?),
            bulk_get: AtomicBool::new(true),
            multipart: AtomicBool::new(true),
        },
    })
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Job {
    pub fn new(
        spec: Spec,
        node: &Arc<Node>,
        dialer: &Arc<Dialer>,
        stats: Arc<Stats>,
    ) -> ReplResult<Job> {
        let source = endpoint(&spec.source, node, dialer, spec.retries_per_request)?;
        let target = endpoint(&spec.target, node, dialer, spec.retries_per_request)?;
        let filter = if let Some(ids) = &spec.doc_ids {
            Filter::DocIds(ids.clone())
        } else if let Some(s) = &spec.selector {
            Filter::Selector(s.clone())
        } else if let Some(f) = &spec.filter {
            Filter::Function(f.clone(), spec.query_params.clone())
        } else {
            Filter::None
        };
        Ok(Job {
            base_id: spec.base_id(node.uuid()),
            spec,
            stats,
            source,
            target,
            filter,
        })
    }

    /// One attempt. Returns CouchDB's one-shot answer (session, last seq, history entry).
    pub async fn run_once(self: &Arc<Self>, cancel: &watch::Receiver<bool>) -> ReplResult<Value> {
        let span = tracing::info_span!("replication", id = %self.base_id, source = %self.source.display(), target = %self.target.display());
        let mut cancel = cancel.clone();
        let open = self.open().instrument(span.clone());
        let mut session = tokio::select! {
            s = open => s?,
            _ = cancelled(&mut cancel) => return Err(ReplError::Cancelled),
        };
        let res = self
            .pipeline(&mut session, &mut cancel)
            .instrument(span.clone())
            .await;
        match &res {
            Err(ReplError::Cancelled) => span.in_scope(|| tracing::info!("replication stopped")),
            Err(e) => span.in_scope(|| tracing::warn!(error = %e, "replication attempt failed")),
            Ok(_) => {}
        }
        res
    }

    async fn open(self: &Arc<Self>) -> ReplResult<Session> {
        let src_info = self
            .source
            .info()
            .await?
            .ok_or_else(|| ReplError::DbNotFound(self.source.display()))?;
        if self.target.info().await?.is_none() {
            if !self.spec.create_target {
                return Err(ReplError::DbNotFound(self.target.display()));
            }
            self.target.create().await?;
            if self.target.info().await?.is_none() {
                return Err(ReplError::DbNotFound(self.target.display()));
            }
        }
        self.stats.set_source_seq(src_info["update_seq"].clone());
        let log_id = match &self.filter {
            Filter::Function(name, _) => {
                let code = self.source.filter_code(name).await?;
                hex::encode(md5::Md5::digest(
                    format!("{}{code}", self.base_id).as_bytes(),
                ))
            }
            _ => self.base_id.clone(),
        };
        let src_log = self.source.get_local(&log_id).await?;
        let tgt_log = self.target.get_local(&log_id).await?;
        let resumed = resume_seq(src_log.as_ref(), tgt_log.as_ref());
        let start_seq = resumed
            .clone()
            .or_else(|| self.spec.since_seq.clone())
            .unwrap_or(json!(0));
        tracing::info!(since = %start_seq, resumed = resumed.is_some(), "replication starting");
        let rev = |l: &Option<Value>| {
            l.as_ref()
                .and_then(|l| l.get("_rev"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Ok(Session {
            id: random_hex(16),
            log_id,
            start_time: now_rfc3339(),
            src_rev: rev(&src_log),
            tgt_rev: rev(&tgt_log),
            src_log,
            tgt_log,
            start_seq,
            source_ok: true,
        })
    }

    async fn pipeline(
        self: &Arc<Self>,
        session: &mut Session,
        cancel: &mut watch::Receiver<bool>,
    ) -> ReplResult<Value> {
        let workers = self.spec.parallelism;
        let (batch_tx, batch_rx) = mpsc::channel::<Batch>(workers * 2);
        let batch_rx = Arc::new(tokio::sync::Mutex::new(batch_rx));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, Value)>();
        let mut tasks = tokio::task::JoinSet::new();
        let span = tracing::Span::current();
        tasks.spawn(
            self.clone()
                .read_changes(session.start_seq.clone(), batch_tx)
                .instrument(span.clone()),
        );
        for _ in 0..workers {
            tasks.spawn(
                self.clone()
                    .work(batch_rx.clone(), done_tx.clone())
                    .instrument(span.clone()),
            );
        }
        drop(done_tx);

        let mut through = session.start_seq.clone();
        let mut checkpointed = through.clone();
        let mut next_no = 0;
        let mut finished = BTreeMap::new();
        let mut tick = tokio::time::interval(self.spec.checkpoint_interval);
        tick.tick().await;
        let outcome: ReplResult<()> = loop {
            tokio::select! {
                d = done_rx.recv() => match d {
                    Some((no, seq)) => {
                        finished.insert(no, seq);
                        while let Some(seq) = finished.remove(&next_no) {
                            through = seq;
                            next_no += 1;
                        }
                        self.stats.set_through_seq(through.clone());
                    }
                    None => break Ok(()),
                },
                Some(res) = tasks.join_next() => match res {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(ReplError::Transient(format!("replication task failed: {e}"))),
                },
                _ = tick.tick() => {
                    if through != checkpointed {
                        if let Err(e) = self.checkpoint(session, &through).await {
                            break Err(e);
                        }
                        checkpointed = through.clone();
                    }
                }
                _ = cancelled(cancel) => break Err(ReplError::Cancelled),
            }
        };
        let outcome = match outcome {
            Ok(()) => loop {
                match tasks.join_next().await {
                    None => break Ok(()),
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => {
                        break Err(ReplError::Transient(format!(
                            "replication task failed: {e}"
                        )))
                    }
                }
            },
            e => e,
        };
        tasks.abort_all();
        match outcome {
            Ok(()) => {
                if through != checkpointed {
                    self.checkpoint(session, &through).await?;
                }
                let entry = self.history_entry(session, &through);
                let mut out = json!({
                    "ok": true,
                    "session_id": session.id,
                    "source_last_seq": through,
                    "replication_id_version": 4,
                    "history": [entry],
                });
                if self.stats.docs_read.load(Relaxed) == 0 && session.start_seq == through {
                    out["no_changes"] = json!(true);
                }
                Ok(out)
            }
            Err(e) => {
                // What was written below `through` is safe to record; a dead peer must not hold
                // the job up for long, so this is best effort.
                if through != checkpointed {
                    let ck = self.checkpoint(session, &through);
                    if let Ok(Err(ce)) = tokio::time::timeout(Duration::from_secs(5), ck).await {
                        tracing::debug!(error = %ce, "checkpoint after failure failed");
                    }
                }
                Err(e)
            }
        }
    }

    async fn read_changes(
        self: Arc<Self>,
        start: Value,
        tx: mpsc::Sender<Batch>,
    ) -> ReplResult<()> {
        let limit = self.spec.batch_size;
        let continuous = self.spec.continuous;
        let mut since = start;
        let mut no = 0;
        let mut caught_up = false;
        loop {
            let wait = (continuous && caught_up).then_some(LONGPOLL);
            let asked = Instant::now();
            let b = self
                .source
                .changes(&since, limit, &self.filter, wait)
                .await?;
            if let Some(p) = b.pending {
                self.stats.changes_pending.store(p, Relaxed);
            }
            let n = b.rows.len();
            if n > 0 || b.last_seq != since {
                since = b.last_seq.clone();
                let batch = Batch {
                    no,
                    rows: b.rows,
                    last_seq: b.last_seq,
                };
                if tx.send(batch).await.is_err() {
                    return Ok(());
                }
                no += 1;
            }
            caught_up = n < limit;
            if caught_up {
                if !continuous {
                    return Ok(());
                }
                if let Ok(Some(info)) = self.source.info().await {
                    self.stats.set_source_seq(info["update_seq"].clone());
                }
                // A peer that answers a longpoll at once with nothing must not make us spin.
                if n == 0 && asked.elapsed() < Duration::from_millis(500) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn work(
        self: Arc<Self>,
        rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Batch>>>,
        done: mpsc::UnboundedSender<(u64, Value)>,
    ) -> ReplResult<()> {
        loop {
            let batch = rx.lock().await.recv().await;
            let Some(batch) = batch else { return Ok(()) };
            self.replicate_batch(&batch.rows).await?;
            let _ = done.send((batch.no, batch.last_seq));
        }
    }

    async fn replicate_batch(&self, rows: &[Change]) -> ReplResult<()> {
        let mut req = Map::new();
        let mut checked = 0;
        for c in rows {
            checked += c.revs.len() as u64;
            let revs = req.entry(c.id.clone()).or_insert_with(|| json!([]));
            if let Value::Array(a) = revs {
                a.extend(c.revs.iter().map(|r| json!(r)));
            }
        }
        self.stats.revisions_checked.fetch_add(checked, Relaxed);
        let diff = self.target.revs_diff(req).await?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        };
        let mut items = Vec::new();
        let mut ancestors = HashMap::new();
        for (id, d) in diff {
            let since = strings(&d["possible_ancestors"]);
            for rev in strings(&d["missing"]) {
                items.push((id.clone(), rev, since.clone()));
            }
            ancestors.insert(id, since);
        }
        self.stats
            .missing_revisions_found
            .fetch_add(items.len() as u64, Relaxed);
        if items.is_empty() {
            return Ok(());
        }
        // Stubs first: what each revision's attachments weigh decides how it travels.
        let mut docs = Vec::with_capacity(items.len());
        let mut small = Vec::new();
        let mut large = Vec::new();
        for f in self.source.fetch(items, false).await? {
            let doc = match f {
                Ok(d) => d,
                // Compacted away or deleted meanwhile: a later change brings the successor.
                Err(e) => {
                    tracing::debug!(error = %e, "revision not fetched");
                    continue;
                }
            };
            let id = doc["_id"].as_str().unwrap_or("").to_string();
            let since = ancestors.get(&id).cloned().unwrap_or_default();
            let lacking = attachments::needed(&doc, &since);
            let weight: u64 = lacking.iter().map(|n| n.length).sum();
            if lacking.is_empty() {
                docs.push(doc);
            } else if weight <= attachments::INLINE_MAX {
                let rev = doc["_rev"].as_str().unwrap_or("").to_string();
                small.push((id, rev, since));
            } else {
                large.push((doc, lacking, since));
            }
        }
        for f in self.source.fetch(small, true).await? {
            match f {
                Ok(d) => docs.push(d),
                Err(e) => tracing::debug!(error = %e, "revision not fetched"),
            }
        }
        let n = docs.len() as u64 + large.len() as u64;
        self.stats.docs_read.fetch_add(n, Relaxed);
        thali_sys::metrics::get().repl_docs_read.inc_by(n);
        let mut errors = self.target.write(docs).await?;
        // Documents with large attachments go one by one (two at a time), bodies streamed.
        let streamed: Vec<ReplResult<Option<Value>>> = futures_util::stream::iter(large)
            .map(|(doc, lacking, since)| async move {
                let id = doc["_id"].as_str().unwrap_or("").to_string();
                let rev = doc["_rev"].as_str().unwrap_or("").to_string();
                attachments::with_retries(&id, || async {
                    let bodies = self.source.bodies(&id, &rev, &since, &lacking).await?;
                    self.target
                        .write_streamed(doc.clone(), &lacking, bodies)
                        .await
                })
                .await
            })
            .buffer_unordered(2)
            .collect()
            .await;
        for r in streamed {
            errors.extend(r?);
        }
        for e in &errors {
            tracing::warn!(id = %e["id"], error = %e["error"], reason = %e["reason"], "document not written");
        }
        let failed = errors.len() as u64;
        self.stats.doc_write_failures.fetch_add(failed, Relaxed);
        self.stats
            .docs_written
            .fetch_add(n.saturating_sub(failed), Relaxed);
        let m = thali_sys::metrics::get();
        m.repl_docs_written.inc_by(n.saturating_sub(failed));
        m.repl_write_failures.inc_by(failed);
        Ok(())
    }

    fn history_entry(&self, s: &Session, seq: &Value) -> Value {
        let st = &self.stats;
        json!({
            "session_id": s.id,
            "start_time": s.start_time,
            "end_time": now_rfc3339(),
            "start_last_seq": s.start_seq,
            "end_last_seq": seq,
            "recorded_seq": seq,
            "missing_checked": st.revisions_checked.load(Relaxed),
            "missing_found": st.missing_revisions_found.load(Relaxed),
            "docs_read": st.docs_read.load(Relaxed),
            "docs_written": st.docs_written.load(Relaxed),
            "doc_write_failures": st.doc_write_failures.load(Relaxed),
        })
    }

    /// Records `seq` in both logs: source first, then target (CouchDB's order).
    async fn checkpoint(&self, s: &mut Session, seq: &Value) -> ReplResult<()> {
        self.target.ensure_full_commit().await?;
        let entry = self.history_entry(s, seq);
        if s.source_ok {
            let doc = log_doc(&s.id, seq, entry.clone(), s.src_log.as_ref(), true);
            match self
                .put_log(&self.source, &s.log_id, doc, &mut s.src_rev)
                .await?
            {
                None => {}
                Some(reason) => {
                    tracing::warn!(%reason, "source refused the checkpoint; the target's log decides from now on");
                    s.source_ok = false;
                }
            }
        }
        let doc = log_doc(&s.id, seq, entry, s.tgt_log.as_ref(), s.source_ok);
        if let Some(reason) = self
            .put_log(&self.target, &s.log_id, doc, &mut s.tgt_rev)
            .await?
        {
            return Err(ReplError::Transient(format!(
                "{} refused the checkpoint: {reason}",
                self.target.display()
            )));
        }
        self.stats.set_checkpointed_seq(seq.clone());
        tracing::debug!(%seq, "checkpoint");
        Ok(())
    }

    /// Writes a log document; a conflict (someone else's write, or our own retried request)
    /// re-reads the revision once. Returns the reason when the endpoint refuses it.
    async fn put_log(
        &self,
        ep: &Endpoint,
        log_id: &str,
        doc: Value,
        rev: &mut Option<String>,
    ) -> ReplResult<Option<String>> {
        for _ in 0..2 {
            let mut d = doc.clone();
            if let Some(r) = rev.as_ref() {
                d["_rev"] = json!(r);
            }
            match ep.put_local(log_id, d).await? {
                LocalPut::Ok(r) => {
                    *rev = Some(r);
                    return Ok(None);
                }
                LocalPut::Refused(reason) => return Ok(Some(reason)),
                LocalPut::Conflict => {
                    *rev = ep
                        .get_local(log_id)
                        .await?
                        .and_then(|l| l.get("_rev").and_then(Value::as_str).map(str::to_string));
                }
            }
        }
        Err(ReplError::Transient(format!(
            "{}: checkpoint document keeps conflicting",
            ep.display()
        )))
    }
}
