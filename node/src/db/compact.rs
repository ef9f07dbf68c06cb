//! Compaction: drops the bodies of revisions that are no longer leaves, then the attachment
//! blobs no stored revision refers to.

use super::{poisoned, Database, DbResult};
use crate::store::WriteBatch;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Documents handled per write-lock hold, so writers are not starved.
const CHUNK: usize = 500;

impl Database {
    /// Starts compaction in the background; false when one is already running.
    pub fn start_compaction(self: &Arc<Self>) -> bool {
        if self.compact_running.swap(true, Ordering::SeqCst) {
            return false;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let db = this.clone();
            let res = tokio::task::spawn_blocking(move || db.compact_blocking()).await;
            match res {
                Ok(Ok((bodies, blobs))) => {
                    if let Err(e) = this.store.flush_blocking() {
                        tracing::error!(db = %this.name, error = %e, "flush after compaction failed");
                    }
                    tracing::info!(db = %this.name, bodies, blobs, "compaction done")
                }
                Ok(Err(e)) => tracing::error!(db = %this.name, error = %e, "compaction failed"),
                Err(e) => tracing::error!(db = %this.name, error = %e, "compaction task failed"),
            }
            this.compact_running.store(false, Ordering::SeqCst);
        });
        true
    }

    /// Returns (revision bodies removed, attachment blobs removed).
    pub fn compact_blocking(&self) -> DbResult<(usize, usize)> {
        let mut removed_bodies = 0;
        let mut after: Option<String> = None;
        loop {
            let _st = self.write.lock().map_err(poisoned)?;
            self.check_alive()?;
            let mut batch = WriteBatch::new();
            let mut n = 0;
            let mut last = None;
            let docs = self.data.docs(after.as_deref(), None, true, false);
            for r in docs {
                let (id, mut info) = r?;
                if Some(&id) == after.as_ref() {
                    continue;
                }
                n += 1;
                let leaves: HashSet<_> = info.tree.leaves().into_iter().map(|l| l.rev).collect();
                let stale: Vec<_> = info
                    .tree
                    .revs()
                    .filter(|(r, node)| node.available && !leaves.contains(r))
                    .map(|(r, _)| r)
                    .collect();
                if !stale.is_empty() {
                    for r in &stale {
                        batch.del_body(&id, &r.to_string());
                        info.tree.set_unavailable(r);
                    }
                    removed_bodies += stale.len();
                    batch.put_doc_info(&id, &info);
                }
                last = Some(id);
                if n >= CHUNK {
                    break;
                }
            }
            let _ticket = self.data.apply(&self.store, batch)?;
            match last {
                Some(l) if n >= CHUNK => after = Some(l),
                _ => break,
            }
        }
        // Blobs: everything not referenced by a remaining body goes. Held under the write lock
        // so no write can start referring to a blob between the scan and the delete.
        let _st = self.write.lock().map_err(poisoned)?;
        let mut referenced = HashSet::new();
        for b in self.data.bodies() {
            for m in b?.atts.into_values() {
                referenced.insert(m.digest);
            }
        }
        let mut batch = WriteBatch::new();
        let mut removed_blobs = 0;
        for d in self.data.att_digests() {
            let d = d?;
            if !referenced.contains(&d) {
                batch.del_att(&d);
                removed_blobs += 1;
            }
        }
        let _ticket = self.data.apply(&self.store, batch)?;
        Ok((removed_bodies, removed_blobs))
    }
}
