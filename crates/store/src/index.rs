//! View indexes: one keyspace per design-document signature (`db<id>.v.<sig>`, see the
//! store's module doc). Compaction of the database does not touch them; deleting the database
//! drops them; `_view_cleanup` drops those no design document uses any more.
//!
//! | prefix | key                                            | value                          |
//! |--------|------------------------------------------------|--------------------------------|
//! | `v`    | u16 BE view, collation key, doc id, 0, u32 BE n | JSON `[key, value]`           |
//! | `i`    | doc id                                         | the doc's `v` keys (u32 BE len + bytes)… |
//! | `c`    | u16 BE view                                    | u64 BE row count               |
//! | `m`    | `seq`                                          | u64 BE: database sequence indexed up to |
//!
//! A batch of documents and the sequence they bring the index to are one atomic batch, so
//! after a crash the index is consistent at some sequence and resumes from there. Index writes
//! are not fsynced one by one (an index can always be rebuilt); a build persists at its end.

use super::engine::{self, Keyspace};
use super::{Bytes, Result, Store};
use std::ops::Bound;

/// One design document's index.
pub struct IndexStore {
    store: Store,
    ks: Keyspace,
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
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl IndexBatch {
    pub fn put_row(&mut self, key: &[u8], value: &[u8]) {
        self.ops.push((key.to_vec(), Some(value.to_vec())));
    }
    pub fn del_row(&mut self, key: &[u8]) {
        self.ops.push((key.to_vec(), None));
    }
    /// The rows a document emitted (so its next version can remove them).
    pub fn set_doc_rows(&mut self, id: &str, keys: &[Vec<u8>]) {
        let mut k = vec![b'i'];
        k.extend_from_slice(id.as_bytes());
        if keys.is_empty() {
            self.ops.push((k, None));
            return;
        }
        let mut v = Vec::new();
        for key in keys {
            v.extend_from_slice(&(key.len() as u32).to_be_bytes());
            v.extend_from_slice(key);
        }
        self.ops.push((k, Some(v)));
    }
    pub fn set_count(&mut self, view: u16, n: u64) {
        let mut k = vec![b'c'];
        k.extend_from_slice(&view.to_be_bytes());
        self.ops.push((k, Some(n.to_be_bytes().to_vec())));
    }
    pub fn set_seq(&mut self, seq: u64) {
        self.ops
            .push((b"mseq".to_vec(), Some(seq.to_be_bytes().to_vec())));
    }
}

fn u64_of(v: Option<Bytes>) -> u64 {
    v.and_then(|b| b.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl IndexStore {
    pub(super) fn new(store: Store, ks: Keyspace) -> IndexStore {
        IndexStore { store, ks }
    }

    pub fn seq(&self) -> Result<u64> {
        Ok(u64_of(self.ks.get(b"mseq")?))
    }

    pub fn count(&self, view: u16) -> Result<u64> {
        let mut k = vec![b'c'];
        k.extend_from_slice(&view.to_be_bytes());
        Ok(u64_of(self.ks.get(&k)?))
    }

    /// The row keys `id` emitted when last indexed.
    pub fn doc_rows(&self, id: &str) -> Result<Vec<Vec<u8>>> {
        let mut k = vec![b'i'];
        k.extend_from_slice(id.as_bytes());
        let Some(v) = self.ks.get(&k)? else {
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
        let mut batch = engine::Batch::default();
        for (k, v) in b.ops {
            match v {
                Some(v) => batch.put(&self.ks, k, v),
                None => batch.del(&self.ks, k),
            }
        }
        self.store.commit(batch).map(|_ticket| ())
    }

    /// Makes the index's writes durable (the whole engine's, in fact).
    pub fn flush(&self) -> Result<()> {
        self.store.persist()
    }

    /// Rows (full key, JSON `[key, value]`) within bounds, ascending or descending.
    pub fn rows(&self, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>, descending: bool) -> engine::Iter {
        self.ks.range(lo, hi, descending)
    }

    /// How many rows lie within bounds (keys only; for `offset`).
    pub fn count_range(&self, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>) -> usize {
        self.rows(lo, hi, false).count()
    }

    pub fn size_on_disk(&self) -> u64 {
        self.ks.disk_size()
    }
}
