//! Conflict resolution: when a write (usually a replicated one) leaves a document with several
//! live leaves, the database's `resolve_conflict(docs)` merges them, and the result is written
//! as a child of the winning leaf with a tombstone on every other live leaf, in one batch.
//!
//! Convergence across peers rests on determinism: the input is a function of the conflict alone
//! (the live leaves, winner first, as every node orders them), revision ids are hashes of parent
//! and content (`doc::hash_rev`), and the tombstones are the same deletions an interactive
//! DELETE would make. Two nodes resolving the same conflict write byte-identical revisions,
//! which replication then finds already present. The common ancestor's body is deliberately
//! not passed: replication carries leaf bodies only, so whether a node still holds it differs
//! from node to node, and a resolver that used it would break that determinism.
//!
//! A task per open database follows the changes feed (from sequence 0 at open and whenever the
//! resolver's code changes, so conflicts written while no resolver ran are found too) and
//! resolves outside the write path: replication writes never wait for a resolver.

use super::read::DocOptions;
use super::{Database, DbError, DbResult};
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use thali_doc::parse::{parse_doc, AttInput, IncomingDoc};
use thali_doc::{hash_rev, Rev};
use thali_plugins::{Func, PluginError};

/// Resolutions kept for `_active_tasks` (newest last).
const RECENT: usize = 100;
/// Changes read per pass before the task yields.
const PAGE: usize = 1000;

/// What the resolver task has done, for `_active_tasks`.
#[derive(Default)]
pub(super) struct ResolverStats {
    inner: Mutex<StatsInner>,
}

#[derive(Default)]
struct StatsInner {
    ddoc: Option<String>,
    checked_seq: u64,
    resolved: u64,
    declined: u64,
    failed: u64,
    recent: VecDeque<Value>,
}

impl ResolverStats {
    fn with<T>(&self, f: impl FnOnce(&mut StatsInner) -> T) -> T {
        f(&mut thali_sys::sync::lock(&self.inner))
    }
}

/// What one resolver call decided for one document.
enum Outcome {
    /// Nothing to do (no longer conflicted, a design document, gone).
    NotConflicted,
    /// The resolver returned null: the conflict stays.
    Declined,
    /// The revisions to write, given the live leaves they resolve.
    Write {
        leaves: Vec<Rev>,
        docs: Vec<IncomingDoc>,
        rev: Rev,
    },
}

impl Database {
    /// The resolver in force (the first design document by id that has one), and a hash of
    /// all design documents' code: validators decide too whether a resolution can be written,
    /// so any change of code is a reason to look at every conflict again.
    fn resolver(&self) -> Option<(String, String, Func)> {
        let plugins = self.plugins();
        let mut ddocs: Vec<_> = plugins.ddocs.iter().collect();
        ddocs.sort_by(|a, b| a.id.cmp(&b.id));
        let code: Vec<&str> = ddocs.iter().map(|d| d.code_hash.as_str()).collect();
        let d = ddocs.iter().find(|d| d.resolve_conflict.is_some())?;
        let f = d.resolve_conflict.clone()?;
        Some((d.id.clone(), code.join(","), f))
    }

    /// The resolver's task entry for `_active_tasks`, while the database has a resolver.
    pub fn resolver_task(&self) -> Option<Value> {
        self.resolver_stats.with(|s| {
            let ddoc = s.ddoc.clone()?;
            Some(json!({
                "type": "conflict_resolution",
                "database": self.name,
                "design_document": ddoc,
                "checked_seq": s.checked_seq,
                "update_seq": self.update_seq(),
                "resolved": s.resolved,
                "declined": s.declined,
                "failed": s.failed,
                "recent": s.recent.iter().cloned().collect::<Vec<_>>(),
            }))
        })
    }

    /// Runs the resolver on one document, if it has live conflicts.
    fn plan_resolution(&self, id: &str, ddoc: &str, func: &Func) -> DbResult<Outcome> {
        if id.starts_with("_design/") {
            return Ok(Outcome::NotConflicted);
        }
        let Some(info) = self.data().doc_info(id)? else {
            return Ok(Outcome::NotConflicted);
        };
        let live = info.tree.live_leaves();
        if live.len() < 2 {
            return Ok(Outcome::NotConflicted);
        }
        let mut docs = Vec::with_capacity(live.len());
        for rev in &live {
            let out = self.get_doc(id, Some(rev), &DocOptions::default())?;
            docs.push(Value::Object(out.doc));
        }
        let result = match func.call(&[Value::Array(docs.clone())]) {
            Ok(v) => v,
            Err(PluginError::Thrown(v)) => {
                return Err(DbError::Plugin(format!(
                    "{ddoc}/resolve_conflict threw {}",
                    thali_plugins::design::short(&v)
                )))
            }
            // Names the design document and function already.
            Err(e) => return Err(DbError::Plugin(e.to_string())),
        };
        let body = match result {
            Value::Null => return Ok(Outcome::Declined),
            Value::Object(m) => m,
            other => {
                return Err(DbError::Plugin(format!(
                    "{ddoc}/resolve_conflict returned {}; expected a document body or null",
                    thali_plugins::design::short(&other)
                )))
            }
        };
        let winner = &live[0];
        let merged = merged_revision(id, winner, body, &docs[0])
            .map_err(|e| DbError::Plugin(format!("{ddoc}/resolve_conflict: {e}")))?;
        let rev = merged
            .rev
            .clone()
            .ok_or_else(|| DbError::Internal("no rev".into()))?;
        let mut writes = vec![merged];
        writes.extend(live[1..].iter().map(|l| tombstone(id, l)));
        Ok(Outcome::Write {
            leaves: live,
            docs: writes,
            rev,
        })
    }

    /// Resolves the conflicted documents changed after `since` (up to `PAGE` changes) and
    /// returns the sequence checked up to.
    async fn resolve_page(self: &Arc<Self>, since: u64, ddoc: &str, func: &Func) -> u64 {
        let durable = self.update_seq();
        let mut ids = Vec::new();
        let mut upto = since;
        for r in self.data().changes(since, false).take(PAGE) {
            let Ok((seq, entry)) = r else { break };
            if seq > durable {
                break;
            }
            upto = seq;
            if entry.leaves.len() > 1 {
                ids.push(entry.id);
            }
        }
        for id in ids {
            let this = self.clone();
            let (d, f, i) = (ddoc.to_string(), func.clone(), id.clone());
            let planned = crate::offload::run(move || this.plan_resolution(&i, &d, &f))
                .await
                .unwrap_or_else(|e| Err(e.into()));
            let outcome = match planned {
                Ok(Outcome::Write { leaves, docs, rev }) => {
                    let ids: Vec<String> = leaves.iter().map(Rev::to_string).collect();
                    match self.write_resolution(&id, leaves, docs).await {
                        Ok(true) => Ok(Some((ids, rev))),
                        // The leaves moved meanwhile; the write that moved them comes back
                        // through the feed.
                        Ok(false) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
                Ok(Outcome::Declined) => {
                    self.resolver_stats.with(|s| s.declined += 1);
                    tracing::info!(db = %self.name, id = %id, "resolver left the conflict");
                    Ok(None)
                }
                Ok(Outcome::NotConflicted) => Ok(None),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(Some((leaves, rev))) => {
                    tracing::info!(db = %self.name, id = %id, ?leaves, rev = %rev, "conflict resolved");
                    self.resolver_stats.with(|s| {
                        s.resolved += 1;
                        if s.recent.len() == RECENT {
                            s.recent.pop_front();
                        }
                        s.recent
                            .push_back(json!({"id": id, "leaves": leaves, "rev": rev.to_string()}));
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    self.resolver_stats.with(|s| s.failed += 1);
                    tracing::warn!(db = %self.name, id = %id, error = %e, "conflict left unresolved");
                }
            }
        }
        upto
    }
}

/// The resolver's body as a child of the winner: `_` fields that describe revisions dropped,
/// `_deleted` and attachment stubs kept; the id is `hash_rev` of it, as on every node.
fn merged_revision(
    id: &str,
    winner: &Rev,
    mut body: Map<String, Value>,
    winner_doc: &Value,
) -> Result<IncomingDoc, String> {
    for k in [
        "_id",
        "_rev",
        "_revisions",
        "_conflicts",
        "_deleted_conflicts",
        "_local_seq",
        "_revs_info",
    ] {
        body.shift_remove(k);
    }
    body.insert("_id".into(), Value::String(id.to_string()));
    let mut doc = parse_doc(Value::Object(body)).map_err(|e| DbError::from(e).to_string())?;
    // The write resolves a stub from the winner first (then from any stored blob with that
    // digest), so the hash takes the digest from the same place.
    let mut digests = Vec::new();
    for (name, att) in &doc.atts {
        if att.input != AttInput::Stub {
            return Err(format!(
                "attachment {name} is not a stub: a resolver keeps attachments, it cannot add them"
            ));
        }
        let digest = winner_doc["_attachments"][name]["digest"]
            .as_str()
            .map(str::to_string)
            .or_else(|| att.digest.clone())
            .ok_or_else(|| format!("attachment stub {name} has no digest"))?;
        digests.push((name.clone(), digest));
    }
    let pairs: Vec<(&str, &str)> = digests
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_str()))
        .collect();
    let rev_id = hash_rev(Some(winner), doc.deleted, &doc.body, &pairs);
    let rev = Rev::new(winner.pos + 1, rev_id.clone());
    doc.raw_rev = Some(rev.to_string());
    doc.rev = Some(rev);
    doc.revisions = Some((winner.pos + 1, vec![rev_id, winner.id.clone()]));
    Ok(doc)
}

/// The deletion of a losing leaf: the same revision a `DELETE` of it would make.
fn tombstone(id: &str, leaf: &Rev) -> IncomingDoc {
    let rev_id = hash_rev(Some(leaf), true, &Map::new(), &[]);
    let rev = Rev::new(leaf.pos + 1, rev_id.clone());
    IncomingDoc {
        id: Some(id.to_string()),
        raw_rev: Some(rev.to_string()),
        rev: Some(rev),
        revisions: Some((leaf.pos + 1, vec![rev_id, leaf.id.clone()])),
        deleted: true,
        ..Default::default()
    }
}

/// Starts the resolver task of a database (when a tokio runtime is there to run it).
pub(super) fn spawn(db: &Arc<Database>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let rx = db.subscribe();
    rt.spawn(run(Arc::downgrade(db), rx));
}

async fn run(db: Weak<Database>, mut rx: tokio::sync::watch::Receiver<u64>) {
    let mut cursor = 0;
    let mut code: Option<String> = None;
    loop {
        let Some(this) = db.upgrade() else { return };
        if this.is_deleted() {
            return;
        }
        let more = match this.resolver() {
            None => {
                code = None;
                this.resolver_stats.with(|s| s.ddoc = None);
                false
            }
            Some((ddoc, hash, func)) => {
                if code.as_ref() != Some(&hash) {
                    // New code: look at every document again.
                    cursor = 0;
                    code = Some(hash);
                    this.resolver_stats.with(|s| s.ddoc = Some(ddoc.clone()));
                }
                let upto = this.resolve_page(cursor, &ddoc, &func).await;
                let more = upto > cursor && upto < this.update_seq();
                cursor = upto;
                this.resolver_stats.with(|s| s.checked_seq = cursor);
                more
            }
        };
        drop(this);
        if !more && rx.changed().await.is_err() {
            return;
        }
    }
}
