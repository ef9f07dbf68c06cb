//! The replicator: this node pulling and pushing between its own databases and any peer that
//! speaks CouchDB's replication protocol (thali over httpkey, CouchDB, pouchdb-server).
//!
//! `Replicator` is the registry of running jobs (what `_active_tasks` and `/_scheduler/jobs`
//! list); `job` runs one replication; `manager` turns `_replicator` documents into jobs.

mod attachments;
mod backoff;
mod checkpoint;
pub mod client;
mod endpoint;
mod error;
mod job;
pub mod manager;
pub mod spec;
pub mod stats;

pub use error::{ReplError, ReplResult};
pub use spec::Spec;
pub use stats::{JobState, Stats};

use job::Job;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thali_db::Node;
use thali_peer::Dialer;
use tokio::sync::watch;

const MAX_JOB_BACKOFF: Duration = Duration::from_secs(60);

pub struct JobHandle {
    pub pid: u64,
    pub rep_id: String,
    pub doc_id: Option<String>,
    pub spec: Spec,
    pub stats: Arc<Stats>,
    cancel: watch::Sender<bool>,
    outcome: watch::Receiver<Option<ReplResult<Value>>>,
}

impl JobHandle {
    /// Waits for the job to end (one-shot: completed or failed; any job: cancelled).
    pub async fn wait(&self) -> ReplResult<Value> {
        let mut rx = self.outcome.clone();
        let out = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Err(ReplError::Cancelled)),
            Err(_) => Err(ReplError::Cancelled),
        };
        out
    }

    pub fn cancel(&self) {
        let _ = self.cancel.send(true);
    }

    fn is_finished(&self) -> bool {
        self.outcome.borrow().is_some()
    }
}

pub struct Replicator {
    node: Arc<Node>,
    dialer: Arc<Dialer>,
    jobs: Mutex<Vec<Arc<JobHandle>>>,
    next_pid: AtomicU64,
}

impl Replicator {
    pub fn new(node: Arc<Node>, dialer: Arc<Dialer>) -> Arc<Replicator> {
        Arc::new(Replicator {
            node,
            dialer,
            jobs: Mutex::new(Vec::new()),
            next_pid: AtomicU64::new(1),
        })
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, Vec<Arc<JobHandle>>> {
        thali_sys::sync::lock(&self.jobs)
    }

    pub fn full_id(&self, spec: &Spec) -> String {
        spec.full_id(self.node.uuid())
    }

    /// Starts a replication, or returns the job already running the same one.
    pub fn start(
        self: &Arc<Self>,
        spec: Spec,
        doc_id: Option<String>,
    ) -> ReplResult<Arc<JobHandle>> {
        let rep_id = self.full_id(&spec);
        let mut jobs = self.jobs();
        if let Some(h) = jobs.iter().find(|h| h.rep_id == rep_id && !h.is_finished()) {
            return Ok(h.clone());
        }
        let stats = Arc::new(Stats::default());
        let job = Arc::new(Job::new(
            spec.clone(),
            &self.node,
            &self.dialer,
            stats.clone(),
        )?);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let (outcome_tx, outcome_rx) = watch::channel(None);
        let handle = Arc::new(JobHandle {
            pid: self.next_pid.fetch_add(1, Ordering::Relaxed),
            rep_id: rep_id.clone(),
            doc_id,
            spec,
            stats,
            cancel: cancel_tx,
            outcome: outcome_rx,
        });
        jobs.push(handle.clone());
        let this = self.clone();
        let pid = handle.pid;
        tokio::spawn(async move {
            let res = run(job, cancel_rx).await;
            let _ = outcome_tx.send(Some(res));
            this.jobs().retain(|h| h.pid != pid);
        });
        Ok(handle)
    }

    /// Cancels the running replication with this full id; false when there is none.
    pub fn cancel(&self, rep_id: &str) -> bool {
        let jobs = self.jobs();
        let mut found = false;
        for h in jobs
            .iter()
            .filter(|h| h.rep_id == rep_id || h.rep_id.starts_with(&format!("{rep_id}+")))
        {
            h.cancel();
            found = true;
        }
        found
    }

    pub fn handles(&self) -> Vec<Arc<JobHandle>> {
        self.jobs().clone()
    }

    /// `_active_tasks` entries.
    pub fn tasks(&self) -> Vec<Value> {
        self.handles()
            .iter()
            .map(|h| {
                let mut t = h.stats.info();
                let o = t.as_object_mut().expect("info is an object");
                for (k, v) in [
                    ("type", json!("replication")),
                    ("node", json!("thali@local")),
                    ("pid", json!(format!("<0.{}.0>", h.pid))),
                    ("replication_id", json!(h.rep_id)),
                    ("doc_id", json!(h.doc_id)),
                    ("database", json!(h.doc_id.as_ref().map(|_| "_replicator"))),
                    ("source", json!(h.spec.source.display())),
                    ("target", json!(h.spec.target.display())),
                    ("continuous", json!(h.spec.continuous)),
                    ("started_on", json!(h.stats.started_on)),
                    (
                        "checkpoint_interval",
                        json!(h.spec.checkpoint_interval.as_millis() as u64),
                    ),
                    ("state", json!(h.stats.state().0.as_str())),
                ] {
                    o.insert(k.into(), v);
                }
                t
            })
            .collect()
    }

    /// `/_scheduler/jobs`.
    pub fn scheduler_jobs(&self) -> Value {
        let jobs: Vec<Value> = self
            .handles()
            .iter()
            .map(|h| {
                let (state, error) = h.stats.state();
                let mut info = h.stats.info();
                info["error"] = json!(error);
                json!({
                    "database": h.doc_id.as_ref().map(|_| "_replicator"),
                    "id": h.rep_id,
                    "pid": format!("<0.{}.0>", h.pid),
                    "source": h.spec.source.display(),
                    "target": h.spec.target.display(),
                    "user": null,
                    "doc_id": h.doc_id,
                    "node": "thali@local",
                    "state": state.as_str(),
                    "start_time": stats::format_unix(h.stats.started_on),
                    "history": h.stats.history(),
                    "info": info,
                })
            })
            .collect();
        json!({"total_rows": jobs.len(), "offset": 0, "jobs": jobs})
    }

    /// Cancels every job and waits (bounded) for their last checkpoints.
    pub async fn shutdown(&self) {
        let handles = self.handles();
        for h in &handles {
            h.cancel();
        }
        let all = futures_util::future::join_all(handles.iter().map(|h| h.wait()));
        let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
    }
}

/// Resolves once `flag` turns true (or its sender is gone). Holds no borrow across awaits, so
/// it can sit in a `select!` of a `Send` future.
pub(crate) use thali_sys::shutdown::cancelled;

/// Runs a job until it completes, fails for good, or is cancelled. Transient errors restart it
/// from its checkpoint after an exponential backoff; a one-shot replication gives up after
/// `max_attempts` attempts in a row that made no progress.
async fn run(job: Arc<Job>, mut cancel: watch::Receiver<bool>) -> ReplResult<Value> {
    let mut backoff = backoff::Backoff::new(Duration::from_secs(1), MAX_JOB_BACKOFF);
    let mut failures = 0u32;
    loop {
        job.stats.set_state(JobState::Running, None);
        let before = job.stats.progress_marker();
        match job.run_once(&cancel).await {
            Ok(v) => {
                job.stats.set_state(JobState::Completed, None);
                return Ok(v);
            }
            Err(ReplError::Cancelled) => return Err(ReplError::Cancelled),
            Err(e) if !e.retryable() => {
                job.stats.set_state(JobState::Failed, Some(e.to_string()));
                return Err(e);
            }
            Err(e) => {
                if job.stats.progress_marker() != before {
                    failures = 0;
                    backoff.reset();
                }
                failures += 1;
                if !job.spec.continuous && failures >= job.spec.max_attempts {
                    job.stats.set_state(JobState::Failed, Some(e.to_string()));
                    return Err(e);
                }
                job.stats.set_state(JobState::Crashing, Some(e.to_string()));
                let delay = backoff.next_delay();
                tracing::info!(id = %job.base_id, error = %e, retry_in = ?delay, "replication crashed; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancelled(&mut cancel) => return Err(ReplError::Cancelled),
                }
            }
        }
    }
}
