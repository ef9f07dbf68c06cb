//! Live figures of a replication job, read by `_active_tasks`, `/_scheduler/jobs`, the
//! `_replicator` manager and the command line's progress bar.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    /// Failed with an error that may pass; waiting to retry.
    Crashing,
    Completed,
    Failed,
}

impl JobState {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Crashing => "crashing",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }
}

pub use thali_sys::clock::unix_now;

struct Status {
    state: JobState,
    error: Option<String>,
    source_seq: Value,
    through_seq: Value,
    checkpointed_seq: Value,
    updated_on: u64,
    /// `(unix time, event)`, newest first, bounded.
    history: Vec<(u64, String)>,
}

pub struct Stats {
    pub docs_read: AtomicU64,
    pub docs_written: AtomicU64,
    pub doc_write_failures: AtomicU64,
    pub missing_revisions_found: AtomicU64,
    pub revisions_checked: AtomicU64,
    pub changes_pending: AtomicU64,
    pub started_on: u64,
    status: Mutex<Status>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            docs_read: AtomicU64::new(0),
            docs_written: AtomicU64::new(0),
            doc_write_failures: AtomicU64::new(0),
            missing_revisions_found: AtomicU64::new(0),
            revisions_checked: AtomicU64::new(0),
            changes_pending: AtomicU64::new(0),
            started_on: unix_now(),
            status: Mutex::new(Status {
                state: JobState::Pending,
                error: None,
                source_seq: json!(0),
                through_seq: json!(0),
                checkpointed_seq: json!(0),
                updated_on: unix_now(),
                history: vec![(unix_now(), "added".into())],
            }),
        }
    }
}

impl Stats {
    fn with<T>(&self, f: impl FnOnce(&mut Status) -> T) -> T {
        let mut g = thali_sys::sync::lock(&self.status);
        g.updated_on = unix_now();
        f(&mut g)
    }

    pub fn set_state(&self, state: JobState, error: Option<String>) {
        self.with(|s| {
            if s.state != state {
                s.history
                    .insert(0, (unix_now(), state.as_str().to_string()));
                s.history.truncate(20);
            }
            s.state = state;
            s.error = error;
        })
    }

    pub fn state(&self) -> (JobState, Option<String>) {
        self.with(|s| (s.state, s.error.clone()))
    }

    pub fn set_source_seq(&self, v: Value) {
        self.with(|s| s.source_seq = v)
    }
    pub fn set_through_seq(&self, v: Value) {
        self.with(|s| s.through_seq = v)
    }
    pub fn set_checkpointed_seq(&self, v: Value) {
        self.with(|s| s.checkpointed_seq = v)
    }

    /// Something that moves whenever an attempt gets work done.
    pub fn progress_marker(&self) -> (u64, String) {
        (
            self.docs_written.load(Relaxed) + self.doc_write_failures.load(Relaxed),
            self.with(|s| s.checkpointed_seq.to_string()),
        )
    }

    /// The counters as CouchDB names them.
    pub fn info(&self) -> Value {
        let (source_seq, through_seq, checkpointed, error, updated_on) = self.with(|s| {
            (
                s.source_seq.clone(),
                s.through_seq.clone(),
                s.checkpointed_seq.clone(),
                s.error.clone(),
                s.updated_on,
            )
        });
        json!({
            "docs_read": self.docs_read.load(Relaxed),
            "docs_written": self.docs_written.load(Relaxed),
            "doc_write_failures": self.doc_write_failures.load(Relaxed),
            "missing_revisions_found": self.missing_revisions_found.load(Relaxed),
            "revisions_checked": self.revisions_checked.load(Relaxed),
            "changes_pending": self.changes_pending.load(Relaxed),
            "source_seq": source_seq,
            "through_seq": through_seq,
            "checkpointed_source_seq": checkpointed,
            "error": error,
            "updated_on": updated_on,
        })
    }

    pub fn history(&self) -> Vec<Value> {
        self.with(|s| {
            s.history
                .iter()
                .map(|(t, e)| json!({"timestamp": format_unix(*t), "type": e}))
                .collect()
        })
    }
}

pub fn format_unix(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string()
}
