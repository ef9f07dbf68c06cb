//! View indexes on disk: one sled instance per design-document signature under
//! `dbs/<name>/views/<signature>/`, beside the database's generations (compaction of the
//! database does not touch them; deleting the database removes them; `_view_cleanup` removes
//! those no design document uses any more).
//!
//! | prefix | key                                            | value                          |
//! |--------|------------------------------------------------|--------------------------------|
//! | `v`    | u16 BE view, collation key, doc id, 0, u32 BE n | JSON `[key, value]`           |
//! | `i`    | doc id                                         | the doc's `v` keys (u32 BE len + bytes)… |
//! | `c`    | u16 BE view                                    | u64 BE row count               |
//! | `m`    | `seq`                                          | u64 BE: database sequence indexed up to |
//!
//! A batch of documents and the sequence they bring the index to are one atomic `apply_batch`,
//! so after a crash the index is consistent at some sequence and resumes from there. Index
//! writes are not fsynced one by one (an index can always be rebuilt); a build flushes at its end.

use super::Result;
use std::ops::Bound;
use std::path::{Path, PathBuf};

/// One design document's index.
pub struct IndexStore {
    db: sled::Db,
    dir: PathBuf,
}

/// The entries of one view, for range scans: `[u16 BE view]`.
pub fn view_prefix(view: u16) -> Vec<u8> {
    let mut k = vec![b'v'];
    k.extend_from_slice(&view.to_be_bytes());
    k
}

/// The full key of one emitted row.
pub fn row_key(view: u16, collated: &[u8], id: &str, n: u32) -> Vec<u8> {
    let mut k = view_prefix(view);
    k.extend_from_slice(collated);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The view number of a row key.
pub fn row_view(key: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*key.get(1)?, *key.get(2)?]))
}

#[derive(Default)]
pub struct IndexBatch {
    batch: sled::Batch,
}

impl IndexBatch {
    pub fn put_row(&mut self, key: &[u8], value: &[u8]) {
        self.batch.insert(key, value);
    }
    pub fn del_row(&mut self, key: &[u8]) {
        self.batch.remove(key);
    }
    /// The rows a document emitted (so its next version can remove them).
    pub fn set_doc_rows(&mut self, id: &str, keys: &[Vec<u8>]) {
        let mut k = vec![b'i'];
        k.extend_from_slice(id.as_bytes());
        if keys.is_empty() {
            self.batch.remove(k);
            return;
        }
        let mut v = Vec::new();
        for key in keys {
            v.extend_from_slice(&(key.len() as u32).to_be_bytes());
            v.extend_from_slice(key);
        }
        self.batch.insert(k, v);
    }
    pub fn set_count(&mut self, view: u16, n: u64) {
        let mut k = vec![b'c'];
        k.extend_from_slice(&view.to_be_bytes());
        self.batch.insert(k, &n.to_be_bytes());
    }
    pub fn set_seq(&mut self, seq: u64) {
        self.batch.insert(b"mseq", &seq.to_be_bytes());
    }
}

fn u64_of(v: Option<sled::IVec>) -> u64 {
    v.and_then(|b| b.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl IndexStore {
    pub fn open(dir: &Path) -> Result<IndexStore> {
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(32 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()?;
        Ok(IndexStore {
            db,
            dir: dir.to_path_buf(),
        })
    }

    pub fn seq(&self) -> Result<u64> {
        Ok(u64_of(self.db.get(b"mseq")?))
    }

    pub fn count(&self, view: u16) -> Result<u64> {
        let mut k = vec![b'c'];
        k.extend_from_slice(&view.to_be_bytes());
        Ok(u64_of(self.db.get(k)?))
    }

    /// The row keys `id` emitted when last indexed.
    pub fn doc_rows(&self, id: &str) -> Result<Vec<Vec<u8>>> {
        let mut k = vec![b'i'];
        k.extend_from_slice(id.as_bytes());
        let Some(v) = self.db.get(k)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut rest: &[u8] = &v;
        while rest.len() >= 4 {
            let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(key) = rest.get(4..4 + n) else { break };
            out.push(key.to_vec());
            rest = &rest[4 + n..];
        }
        Ok(out)
    }

    pub fn apply(&self, b: IndexBatch) -> Result<()> {
        self.db.apply_batch(b.batch)?;
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Rows (full key, JSON `[key, value]`) within bounds, ascending or descending.
    pub fn rows(
        &self,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
        descending: bool,
    ) -> Box<dyn Iterator<Item = Result<(sled::IVec, sled::IVec)>> + Send> {
        let empty = match (&lo, &hi) {
            (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
                a > b
            }
            _ => false,
        };
        if empty {
            return Box::new(std::iter::empty());
        }
        let r = self.db.range((lo, hi));
        if descending {
            Box::new(r.rev().map(|x| x.map_err(Into::into)))
        } else {
            Box::new(r.map(|x| x.map_err(Into::into)))
        }
    }

    /// How many rows lie within bounds (keys only; for `offset`).
    pub fn count_range(&self, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>) -> usize {
        self.rows(lo, hi, false).count()
    }

    pub fn size_on_disk(&self) -> u64 {
        super::dir_size(&self.dir)
    }
}

/// The signatures that have an index directory under `root`.
pub fn list(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect()
}

/// Deletes the index of `sig` (its instance must be closed, or about to be dropped).
pub fn remove(root: &Path, sig: &str) -> Result<()> {
    match std::fs::remove_dir_all(root.join(sig)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}
