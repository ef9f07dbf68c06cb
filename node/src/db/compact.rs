//! Compaction, as CouchDB does it: the live data (every document's tree, the bodies of its
//! leaves, the by-sequence index, local documents, meta and the attachment blobs the leaves
//! refer to) is copied into a new generation of the database's store, which then replaces the
//! old one. Old revision bodies and orphaned blobs are left behind and their files deleted.
//!
//! Writes wait while it runs (it holds the write lock); reads go on against the old generation.

use super::{poisoned, Database, DbResult};
use crate::store::WriteBatch;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Keys copied per batch into the new generation.
const CHUNK: usize = 1000;

#[derive(Debug, Default)]
pub struct CompactionStats {
    pub docs: usize,
    pub bodies_dropped: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl Database {
    /// Starts compaction in the background; false when one is already running.
    pub fn start_compaction(self: &Arc<Self>) -> bool {
        if self.compact_running.swap(true, Ordering::SeqCst) {
            return false;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let db = this.clone();
            let span = tracing::info_span!("compaction", db = %this.name);
            let res =
                tokio::task::spawn_blocking(move || span.in_scope(|| db.compact_blocking())).await;
            match res {
                Ok(Ok(s)) => tracing::info!(
                    db = %this.name,
                    docs = s.docs,
                    bodies_dropped = s.bodies_dropped,
                    bytes_before = s.bytes_before,
                    bytes_after = s.bytes_after,
                    "compaction done"
                ),
                Ok(Err(e)) => tracing::error!(db = %this.name, error = %e, "compaction failed"),
                Err(e) => tracing::error!(db = %this.name, error = %e, "compaction task failed"),
            }
            this.compact_running.store(false, Ordering::SeqCst);
        });
        true
    }

    pub fn compact_blocking(&self) -> DbResult<CompactionStats> {
        let _st = self.write.lock().map_err(poisoned)?;
        self.check_alive()?;
        let old = self.data();
        let mut stats = CompactionStats {
            bytes_before: old.size_on_disk(),
            ..Default::default()
        };
        let next = old.next_generation()?;
        let mut batch = WriteBatch::new();
        let mut n = 0;
        let flush = |batch: &mut WriteBatch, n: &mut usize, force: bool| -> DbResult<()> {
            if force || *n >= CHUNK {
                next.apply(std::mem::take(batch))?;
                *n = 0;
            }
            Ok(())
        };
        let mut digests = HashSet::new();
        for r in old.docs(None, None, true, false) {
            let (id, mut info) = r?;
            let leaves: HashSet<_> = info.tree.leaves().into_iter().map(|l| l.rev).collect();
            let revs: Vec<_> = info.tree.revs().map(|(r, n)| (r, n.available)).collect();
            for (rev, available) in revs {
                if !available {
                    continue;
                }
                let rev_s = rev.to_string();
                if leaves.contains(&rev) {
                    let is_current = info.current.as_ref().is_some_and(|(r, _)| *r == rev_s);
                    if let Some(body) = old.body_of(&id, &info, &rev_s)? {
                        digests.extend(body.atts.values().map(|m| m.digest.clone()));
                        // The current body travels inside the doc info.
                        if !is_current {
                            batch.put_body(&id, &rev_s, &body);
                            n += 1;
                        }
                    }
                } else {
                    info.tree.set_unavailable(&rev);
                    stats.bodies_dropped += 1;
                }
            }
            batch.put_doc_info(&id, &info);
            stats.docs += 1;
            n += 1;
            flush(&mut batch, &mut n, false)?;
        }
        for r in old.changes(0, false) {
            let (seq, entry) = r?;
            batch.put_seq(seq, &entry);
            n += 1;
            flush(&mut batch, &mut n, false)?;
        }
        for r in old.locals() {
            let (id, doc) = r?;
            batch.put_local(&id, &doc);
            n += 1;
            flush(&mut batch, &mut n, false)?;
        }
        for r in old.metas() {
            let (name, v) = r?;
            batch.put_meta(&name, &v);
        }
        for d in digests {
            if let Some(bytes) = old.att(&d)? {
                batch.put_att(&d, &bytes);
                n += 1;
                flush(&mut batch, &mut n, false)?;
            }
        }
        flush(&mut batch, &mut n, true)?;
        let new = next.commit(&old)?;
        stats.bytes_after = new.size_on_disk();
        match self.data.write() {
            Ok(mut d) => *d = new,
            Err(p) => *p.into_inner() = new,
        }
        Ok(stats)
    }
}
