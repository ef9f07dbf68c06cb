//! `thali migrate`: copies a stopped node's store to the other engine, verifies the copy entry
//! by entry, then switches the data directory's engine record to it.
//!
//! Every keyspace is copied as it is (the catalog, each database's documents with their whole
//! revision trees, bodies, attachments, `_local` documents, `_security` and other meta, view
//! indexes), so sequences and checkpoints carry over unchanged. The copy is built beside the
//! source under `DIR/<engine>.migrating` and renamed into place only once verified; the engine
//! record is rewritten last, atomically, so a cut migration leaves the node on its old engine.

use super::engine::{self, Batch, Engine, Kind};
use super::{recorded_engine, Result, StoreError};
use std::ops::Bound;
use std::path::Path;
use thali_sys::files::write_atomic;

/// Entries copied per batch, and the most bytes per batch (attachment chunks are 256 KiB).
const CHUNK: usize = 1000;
const BATCH_BYTES: u64 = 16 << 20;

#[derive(Debug, Default)]
pub struct Report {
    pub from: Option<Kind>,
    pub keyspaces: usize,
    pub entries: u64,
    pub bytes: u64,
}

pub fn migrate(dir: &Path, to: Kind, cache_bytes: u64) -> Result<Report> {
    let from = recorded_engine(dir)?
        .ok_or_else(|| StoreError::Config(format!("{} holds no thali store", dir.display())))?;
    if from == to {
        return Err(StoreError::Config(format!(
            "{} already uses the {} engine",
            dir.display(),
            to.name()
        )));
    }
    let src = engine::open(from, &dir.join(from.name()), cache_bytes)?;
    let tmp = dir.join(format!("{}.migrating", to.name()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let mut report = Report {
        from: Some(from),
        ..Default::default()
    };
    {
        let dst = engine::open(to, &tmp, cache_bytes)?;
        for name in src.keyspaces()? {
            let (n, bytes) = copy(&*src, &*dst, &name)?;
            report.keyspaces += 1;
            report.entries += n;
            report.bytes += bytes;
        }
        dst.persist()?;
        verify(&*src, &*dst)?;
    }
    drop(src);
    let target = dir.join(to.name());
    if target.exists() {
        // A leftover of an earlier migration that never switched.
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&tmp, &target)?;
    write_atomic(&dir.join("engine"), to.name().as_bytes())?;
    std::fs::remove_dir_all(dir.join(from.name()))?;
    Ok(report)
}

fn copy(src: &dyn Engine, dst: &dyn Engine, name: &str) -> Result<(u64, u64)> {
    let from = src.keyspace(name)?;
    let to = dst.keyspace(name)?;
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut batch = Batch::default();
    let mut batch_bytes = 0;
    for r in from.range(Bound::Unbounded, Bound::Unbounded, false) {
        let (k, v) = r?;
        n += 1;
        let size = (k.len() + v.len()) as u64;
        bytes += size;
        batch_bytes += size;
        batch.put(&to, k.to_vec(), v.to_vec());
        if batch.len() >= CHUNK || batch_bytes >= BATCH_BYTES {
            dst.commit(std::mem::take(&mut batch))?;
            batch_bytes = 0;
        }
    }
    dst.commit(batch)?;
    Ok((n, bytes))
}

/// Walks both stores side by side: the same keyspaces holding the same entries.
fn verify(src: &dyn Engine, dst: &dyn Engine) -> Result<()> {
    let mut a = src.keyspaces()?;
    let mut b = dst.keyspaces()?;
    a.sort();
    b.sort();
    if a != b {
        return Err(StoreError::Corrupt(format!(
            "migration: keyspaces differ ({} vs {})",
            a.len(),
            b.len()
        )));
    }
    for name in &a {
        let x = src.keyspace(name)?;
        let y = dst.keyspace(name)?;
        let mut xs = x.range(Bound::Unbounded, Bound::Unbounded, false);
        let mut ys = y.range(Bound::Unbounded, Bound::Unbounded, false);
        loop {
            match (xs.next().transpose()?, ys.next().transpose()?) {
                (None, None) => break,
                (Some((k1, v1)), Some((k2, v2))) if *k1 == *k2 && *v1 == *v2 => {}
                _ => {
                    return Err(StoreError::Corrupt(format!(
                        "migration: keyspace {name} differs after the copy"
                    )))
                }
            }
        }
    }
    Ok(())
}
