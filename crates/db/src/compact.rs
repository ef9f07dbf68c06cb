//! Compaction, as CouchDB does it: the live data (every document's tree, the bodies of its
//! leaves, the by-sequence index, local documents, meta and the attachment blobs the leaves
//! refer to) is copied into a new generation of the database's store, which then replaces the
//! old one. Old revision bodies and orphaned blobs are left behind and their files deleted.
//!
//! Writes go on during the copy; a short catch-up under the write lock copies what changed
//! meanwhile (by sequence), then the new generation replaces the old one.

use super::{poisoned, Database, DbResult};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use thali_store::blob::Blob;
use thali_store::{DbStore, DocInfo, NextGeneration, SeqEntry, WriteBatch};

/// Keys copied per batch into the new generation.
const CHUNK: usize = 1000;

#[derive(Debug, Default)]
pub struct CompactionStats {
    pub docs: usize,
    pub bodies_dropped: usize,
    /// Documents written during the copy and copied again in the catch-up.
    pub caught_up: usize,
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
            let res = crate::offload::long(move || span.in_scope(|| db.compact_blocking())).await;
            match res {
                Ok(Ok(s)) => tracing::info!(
                    db = %this.name,
                    docs = s.docs,
                    bodies_dropped = s.bodies_dropped,
                    caught_up = s.caught_up,
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
        self.check_alive()?;
        let old = self.data();
        let mut stats = CompactionStats {
            bytes_before: old.size_on_disk(),
            ..Default::default()
        };
        let next = old.next_generation()?;
        let mut out = Copier {
            next: &next,
            batch: WriteBatch::new(),
            pending: 0,
        };
        let mut digests = HashSet::new();
        // Phase 1, writers running: every document as it is now. Anything written from `since`
        // on is copied again in phase 2.
        let since = self.update_seq();
        for r in old.docs(None, None, true, false) {
            let (id, info) = r?;
            let info = copy_doc(&old, &mut out, &id, info, &mut digests, &mut stats)?;
            out.batch.put_seq(info.seq, &SeqEntry::of(&id, &info.tree));
            stats.docs += 1;
            out.step()?;
        }
        copy_blobs(&old, &mut out, &mut digests)?;
        out.finish()?;

        // Phase 2, writers paused: documents changed since phase 1 began, local docs, meta.
        let _st = self.write.lock().map_err(poisoned)?;
        self.check_alive()?;
        let changed: Vec<(u64, SeqEntry)> = old.changes(since, false).collect::<Result<_, _>>()?;
        stats.caught_up = changed.len();
        for (seq, entry) in changed {
            if let Some(copied) = next.doc_info(&entry.id)? {
                out.batch.del_seq(copied.seq);
            }
            if let Some(info) = old.doc_info(&entry.id)? {
                copy_doc(&old, &mut out, &entry.id, info, &mut digests, &mut stats)?;
            }
            out.batch.put_seq(seq, &entry);
            out.step()?;
        }
        for r in old.locals() {
            let (id, doc) = r?;
            out.batch.put_local(&id, &doc);
            out.step()?;
        }
        for r in old.metas() {
            let (name, v) = r?;
            out.batch.put_meta(&name, &v);
        }
        copy_blobs(&old, &mut out, &mut digests)?;
        out.finish()?;
        let new = next.commit(&old)?;
        stats.bytes_after = new.size_on_disk();
        match self.data.write() {
            Ok(mut d) => *d = new,
            Err(p) => *p.into_inner() = new,
        }
        Ok(stats)
    }
}

/// Writes into the next generation in batches of `CHUNK` keys.
struct Copier<'a> {
    next: &'a NextGeneration,
    batch: WriteBatch,
    pending: usize,
}

impl Copier<'_> {
    fn step(&mut self) -> DbResult<()> {
        self.pending += 1;
        if self.pending >= CHUNK {
            self.finish()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> DbResult<()> {
        self.next.apply(std::mem::take(&mut self.batch))?;
        self.pending = 0;
        Ok(())
    }
}

/// Copies a document's record and its leaves' bodies; older bodies stay behind.
fn copy_doc(
    old: &DbStore,
    out: &mut Copier<'_>,
    id: &str,
    mut info: DocInfo,
    digests: &mut HashSet<String>,
    stats: &mut CompactionStats,
) -> DbResult<DocInfo> {
    let leaves: HashSet<_> = info.tree.leaves().into_iter().map(|l| l.rev).collect();
    let revs: Vec<_> = info.tree.revs().map(|(r, n)| (r, n.available)).collect();
    for (rev, available) in revs {
        if !available {
            continue;
        }
        let rev_s = rev.to_string();
        if leaves.contains(&rev) {
            let is_current = info.current.as_ref().is_some_and(|(r, _)| *r == rev_s);
            if let Some(body) = old.body_of(id, &info, &rev_s)? {
                digests.extend(body.atts.values().map(|m| m.digest.clone()));
                // The current body travels inside the doc info.
                if !is_current {
                    out.batch.put_body(id, &rev_s, &body);
                    out.step()?;
                }
            }
        } else {
            info.tree.set_unavailable(&rev);
            stats.bodies_dropped += 1;
        }
    }
    out.batch.put_doc_info(id, &info);
    Ok(info)
}

/// Copies the blobs named in `digests` (and forgets them, so each is copied once).
fn copy_blobs(old: &DbStore, out: &mut Copier<'_>, digests: &mut HashSet<String>) -> DbResult<()> {
    for d in digests.drain() {
        match old.blob(&d)? {
            None => {}
            Some(Blob::Whole(bytes)) => {
                out.batch.put_att(&d, &bytes);
                out.step()?;
            }
            Some(Blob::Chunked(m)) => {
                // A chunk per batch: a large body is never in memory whole.
                for (i, c) in old.blob_chunks(&m, 0, m.len).enumerate() {
                    out.batch.put_chunk(&m, i as u32, c?);
                    out.finish()?;
                }
                out.batch.put_manifest(&d, &m);
                out.step()?;
            }
        }
    }
    Ok(())
}
