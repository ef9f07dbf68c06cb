//! Persistent replications: documents in the `_replicator` database, with CouchDB's semantics.
//! A document starts a job; the job's state (`running`, `completed`, `failed`, with the reason
//! and, when done, its figures) is written back into the document; deleting the document stops
//! the job; after a node restart every job that had not completed or failed starts again and
//! resumes from its checkpoint.

use super::job::now_rfc3339;
use super::{cancelled, JobHandle, ReplError, Replicator, Spec};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use thali_db::{ChangesQuery, Database, DbError, DocOptions};
use tokio::sync::watch;

pub const DB: &str = "_replicator";
const STATE_FIELDS: [&str; 5] = [
    "_replication_state",
    "_replication_state_time",
    "_replication_state_reason",
    "_replication_id",
    "_replication_stats",
];

/// Follows `_replicator` until shutdown. Opens (or creates) the database first.
pub async fn run(rep: Arc<Replicator>, mut shutdown: watch::Receiver<bool>) {
    // Which replication each document started in this process: our own state writes come back
    // through the feed and must not start anything again.
    let mut known: HashMap<String, String> = HashMap::new();
    let mut since = 0;
    loop {
        let db = match rep.node().db_or_create(DB).await {
            Ok(db) => db,
            Err(e) => {
                tracing::error!(error = %e, "cannot open _replicator");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    _ = cancelled(&mut shutdown) => return,
                }
            }
        };
        let mut updates = db.subscribe();
        let q = ChangesQuery {
            since,
            ..Default::default()
        };
        match db.changes(&q).await {
            Ok((rows, last, _)) => {
                for row in rows {
                    let Ok(v) = serde_json::from_str::<Value>(&row.json) else {
                        continue;
                    };
                    let (Some(id), deleted) = (v["id"].as_str(), v["deleted"] == json!(true))
                    else {
                        continue;
                    };
                    handle_doc(&rep, &db, &mut known, id, deleted).await;
                }
                since = last;
            }
            Err(e) => {
                // Deleted under us: start over with a fresh database.
                tracing::warn!(error = %e, "reading _replicator changes");
                since = 0;
                known.clear();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        tokio::select! {
            _ = async { let _ = updates.wait_for(|s| *s > since || db.is_deleted()).await; } => {}
            _ = cancelled(&mut shutdown) => return,
        }
    }
}

fn running_for(rep: &Replicator, doc_id: &str) -> Option<Arc<JobHandle>> {
    rep.handles()
        .into_iter()
        .find(|h| h.doc_id.as_deref() == Some(doc_id))
}

async fn handle_doc(
    rep: &Arc<Replicator>,
    db: &Arc<Database>,
    known: &mut HashMap<String, String>,
    id: &str,
    deleted: bool,
) {
    if id.starts_with("_design/") {
        return;
    }
    if deleted {
        known.remove(id);
        if let Some(h) = running_for(rep, id) {
            tracing::info!(doc = id, "replication document deleted; stopping its job");
            h.cancel();
        }
        return;
    }
    let Ok(doc) = db.get_doc(id, None, &DocOptions::default()) else {
        return;
    };
    let doc = doc.doc;
    let mut spec_doc = doc.clone();
    for f in STATE_FIELDS {
        spec_doc.shift_remove(f);
    }
    let spec = match Spec::parse(&Value::Object(spec_doc)) {
        Ok(s) => s,
        Err(e) => {
            if let Some(h) = running_for(rep, id) {
                h.cancel();
            }
            let reason = e.to_string();
            if doc.get("_replication_state_reason") != Some(&json!(reason)) {
                write_state(db, id, "failed", None, Some(reason), None).await;
            }
            known.remove(id);
            return;
        }
    };
    let rep_id = rep.full_id(&spec);
    if known.get(id) == Some(&rep_id) {
        return;
    }
    if let Some(h) = running_for(rep, id) {
        tracing::info!(doc = id, "replication document changed; restarting its job");
        h.cancel();
        let _ = h.wait().await;
    }
    known.insert(id.to_string(), rep_id.clone());
    let state = doc.get("_replication_state").and_then(Value::as_str);
    let same_id = doc.get("_replication_id") == Some(&json!(rep_id));
    if same_id && matches!(state, Some("completed" | "failed")) {
        return;
    }
    let handle = match rep.start(spec, Some(id.to_string())) {
        Ok(h) => h,
        Err(e) => {
            write_state(db, id, "failed", Some(&rep_id), Some(e.to_string()), None).await;
            return;
        }
    };
    if !(same_id && state == Some("running")) {
        write_state(db, id, "running", Some(&rep_id), None, None).await;
    }
    let db = db.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        match handle.wait().await {
            Ok(_) => {
                let stats = handle.stats.info();
                write_state(&db, &id, "completed", Some(&rep_id), None, Some(stats)).await;
            }
            Err(ReplError::Cancelled) => {}
            Err(e) => {
                write_state(&db, &id, "failed", Some(&rep_id), Some(e.to_string()), None).await;
            }
        }
    });
}

/// Writes the job's state into its document (retrying on conflicts with the user's edits).
async fn write_state(
    db: &Arc<Database>,
    id: &str,
    state: &str,
    rep_id: Option<&str>,
    reason: Option<String>,
    stats: Option<Value>,
) {
    for _ in 0..5 {
        let Ok(cur) = db.get_doc(id, None, &DocOptions::default()) else {
            return;
        };
        let mut d: Map<String, Value> = cur.doc;
        d.insert("_replication_state".into(), json!(state));
        d.insert("_replication_state_time".into(), json!(now_rfc3339()));
        match rep_id {
            Some(r) => d.insert("_replication_id".into(), json!(r)),
            None => d.shift_remove("_replication_id"),
        };
        match reason {
            Some(ref r) => d.insert("_replication_state_reason".into(), json!(r)),
            None => d.shift_remove("_replication_state_reason"),
        };
        match stats {
            Some(ref s) => d.insert("_replication_stats".into(), s.clone()),
            None => d.shift_remove("_replication_stats"),
        };
        match db
            .bulk_docs(vec![Value::Object(d)], true, &thali_db::Caller::node(DB))
            .await
        {
            Ok(mut r) => match r.pop() {
                Some(Ok(_)) => return,
                Some(Err((_, _, DbError::Conflict))) => continue,
                other => {
                    tracing::warn!(doc = id, result = ?other.map(|r| r.err()), "cannot record the replication state");
                    return;
                }
            },
            Err(e) => {
                tracing::warn!(doc = id, error = %e, "cannot record the replication state");
                return;
            }
        }
    }
}
