//! The on-disk layout in sled. Only this module knows sled.
//!
//! One sled tree per database (`db/<name>`), keys prefixed by kind so that one atomic
//! `apply_batch` covers everything a write touches:
//!
//! | prefix | key                               | value                      |
//! |--------|-----------------------------------|----------------------------|
//! | `d`    | doc id                            | [`DocInfo`] (JSON)         |
//! | `r`    | u32 BE id length, id, rev string  | [`RevBody`] (JSON)         |
//! | `s`    | u64 BE sequence                   | [`SeqEntry`]: id and leaves |
//! | `l`    | local doc id (without `_local/`)  | the local doc (JSON)       |
//! | `a`    | attachment digest                 | raw bytes                  |
//! | `m`    | meta name                         | JSON value                 |
//!
//! Durability: [`Store::durable`] is a group commit: writers that applied their batch before a
//! flush started share that flush.

mod layout;

pub use layout::{AttMeta, DocInfo, RevBody, SeqEntry};

use layout::*;
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

const DB_TREE_PREFIX: &str = "db/";

#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    db: sled::Db,
    node_meta: sled::Tree,
    /// Count of applied batches; a flush that starts after reading N makes batches 1..=N durable.
    applied: AtomicU64,
    flushed: tokio::sync::Mutex<u64>,
}

/// Returned by [`DbStore::apply`]; pass it to [`Store::durable`].
#[must_use]
pub struct Ticket(u64);

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir.join("store"))
            .cache_capacity(256 * 1024 * 1024)
            .flush_every_ms(Some(1000))
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let node_meta = db.open_tree("node")?;
        Ok(Store {
            inner: Arc::new(StoreInner {
                db,
                node_meta,
                applied: AtomicU64::new(0),
                flushed: tokio::sync::Mutex::new(0),
            }),
        })
    }

    pub fn node_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.inner
            .node_meta
            .get(key)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn set_node_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<()> {
        self.inner.node_meta.insert(key, encode(v))?;
        self.inner.db.flush()?;
        Ok(())
    }

    pub fn list_databases(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .db
            .tree_names()
            .into_iter()
            .filter_map(|n| {
                let s = std::str::from_utf8(&n).ok()?;
                s.strip_prefix(DB_TREE_PREFIX).map(str::to_string)
            })
            .collect();
        names.sort();
        names
    }

    /// Opens a database's tree, creating it when `create` is set. A database exists once its
    /// `created` meta key is durable.
    pub fn open_database(&self, name: &str, create: bool) -> Result<Option<DbStore>> {
        let tree_name = format!("{DB_TREE_PREFIX}{name}");
        let exists = self
            .inner
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == tree_name.as_bytes());
        if !exists && !create {
            return Ok(None);
        }
        let tree = self.inner.db.open_tree(&tree_name)?;
        if create && !exists {
            tree.insert(meta_key("created"), encode(&true))?;
            self.inner.db.flush()?;
        }
        Ok(Some(DbStore { tree }))
    }

    pub fn drop_database(&self, name: &str) -> Result<bool> {
        let dropped = self.inner.db.drop_tree(format!("{DB_TREE_PREFIX}{name}"))?;
        self.inner.db.flush()?;
        Ok(dropped)
    }

    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// Waits until the batch behind `ticket` is on disk. Concurrent callers share one flush.
    pub async fn durable(&self, ticket: Ticket) -> Result<()> {
        let mut flushed = self.inner.flushed.lock().await;
        if *flushed >= ticket.0 {
            return Ok(());
        }
        let target = self.inner.applied.load(Ordering::SeqCst);
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Corrupt(format!("flush task failed: {e}")))??;
        *flushed = target;
        Ok(())
    }

    pub fn flush_blocking(&self) -> Result<()> {
        self.inner.db.flush()?;
        Ok(())
    }

    fn next_ticket(&self) -> Ticket {
        Ticket(self.inner.applied.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

/// One database's tree.
#[derive(Clone)]
pub struct DbStore {
    tree: sled::Tree,
}

/// The writes of one atomic update.
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    empty: bool,
}

impl WriteBatch {
    pub fn new() -> Self {
        WriteBatch {
            batch: sled::Batch::default(),
            empty: true,
        }
    }
    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.empty = false;
        self.batch.insert(k, v);
    }
    fn del(&mut self, k: Vec<u8>) {
        self.empty = false;
        self.batch.remove(k);
    }
    pub fn is_empty(&self) -> bool {
        self.empty
    }
    pub fn put_doc_info(&mut self, id: &str, info: &DocInfo) {
        self.put(doc_key(id), encode(info));
    }
    pub fn put_body(&mut self, id: &str, rev: &str, body: &RevBody) {
        self.put(body_key(id, rev), encode(body));
    }
    pub fn del_body(&mut self, id: &str, rev: &str) {
        self.del(body_key(id, rev));
    }
    pub fn put_seq(&mut self, seq: u64, entry: &SeqEntry) {
        self.put(seq_key(seq), encode(entry));
    }
    pub fn del_seq(&mut self, seq: u64) {
        self.del(seq_key(seq));
    }
    pub fn put_att(&mut self, digest: &str, data: &[u8]) {
        self.put(att_key(digest), data.to_vec());
    }
    pub fn del_att(&mut self, digest: &str) {
        self.del(att_key(digest));
    }
    pub fn put_local(&mut self, id: &str, doc: &serde_json::Value) {
        self.put(local_key(id), encode(doc));
    }
    pub fn del_local(&mut self, id: &str) {
        self.del(local_key(id));
    }
    pub fn put_meta<T: Serialize>(&mut self, name: &str, v: &T) {
        self.put(meta_key(name), encode(v));
    }
}

impl DbStore {
    /// Applies a batch atomically. The result is visible at once and durable after
    /// [`Store::durable`] with the returned ticket.
    pub fn apply(&self, store: &Store, batch: WriteBatch) -> Result<Ticket> {
        if !batch.empty {
            self.tree.apply_batch(batch.batch)?;
        }
        Ok(store.next_ticket())
    }

    pub fn doc_info(&self, id: &str) -> Result<Option<DocInfo>> {
        self.tree.get(doc_key(id))?.map(|v| decode(&v)).transpose()
    }

    pub fn body(&self, id: &str, rev: &str) -> Result<Option<RevBody>> {
        self.tree
            .get(body_key(id, rev))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn att(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(att_key(digest))?.map(|v| v.to_vec()))
    }

    pub fn has_att(&self, digest: &str) -> Result<bool> {
        Ok(self.tree.contains_key(att_key(digest))?)
    }

    pub fn local(&self, id: &str) -> Result<Option<serde_json::Value>> {
        self.tree
            .get(local_key(id))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.tree
            .get(meta_key(name))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Documents by id (raw byte order) within `[start, end]` bounds, ascending or descending.
    pub fn docs(
        &self,
        start: Option<&str>,
        end: Option<&str>,
        end_inclusive: bool,
        descending: bool,
    ) -> impl Iterator<Item = Result<(String, DocInfo)>> {
        use std::ops::Bound;
        let (lo, hi) = if descending {
            (end, start)
        } else {
            (start, end)
        };
        let (lo_inc, hi_inc) = if descending {
            (end_inclusive, true)
        } else {
            (true, end_inclusive)
        };
        let lo_b = match lo {
            Some(k) if lo_inc => Bound::Included(doc_key(k)),
            Some(k) => Bound::Excluded(doc_key(k)),
            None => Bound::Included(vec![b'd']),
        };
        let hi_b = match hi {
            Some(k) if hi_inc => Bound::Included(doc_key(k)),
            Some(k) => Bound::Excluded(doc_key(k)),
            None => Bound::Excluded(vec![b'd' + 1]),
        };
        let empty = matches!((&lo_b, &hi_b), (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) if a > b);
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if empty {
            Box::new(std::iter::empty())
        } else if descending {
            Box::new(self.tree.range((lo_b, hi_b)).rev())
        } else {
            Box::new(self.tree.range((lo_b, hi_b)))
        };
        iter.map(|r| {
            let (k, v) = r?;
            let id = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Corrupt("doc id".into()))?;
            Ok((id, decode(&v)?))
        })
    }

    /// `(seq, entry)` after `since`, ascending, or all of them descending.
    pub fn changes(
        &self,
        since: u64,
        descending: bool,
    ) -> impl Iterator<Item = Result<(u64, SeqEntry)>> {
        let lo = seq_key(since.saturating_add(1));
        let hi = vec![b's' + 1];
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if descending {
            Box::new(self.tree.range(seq_key(0)..hi).rev())
        } else {
            Box::new(self.tree.range(lo..hi))
        };
        iter.map(|r| {
            let (k, v) = r?;
            let seq = k
                .get(1..9)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt("seq key".into()))?;
            Ok((seq, decode(&v)?))
        })
    }

    /// Local documents in id order.
    pub fn locals(&self) -> impl Iterator<Item = Result<(String, serde_json::Value)>> {
        self.tree.scan_prefix([b'l']).map(|r| {
            let (k, v) = r?;
            let id = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Corrupt("local id".into()))?;
            Ok((id, decode(&v)?))
        })
    }

    /// Digests of all stored attachment blobs.
    pub fn att_digests(&self) -> impl Iterator<Item = Result<String>> {
        self.tree.scan_prefix([b'a']).keys().map(|r| {
            let k = r?;
            String::from_utf8(k[1..].to_vec()).map_err(|_| StoreError::Corrupt("att key".into()))
        })
    }

    /// Every stored revision body (for compaction).
    pub fn bodies(&self) -> impl Iterator<Item = Result<RevBody>> {
        self.tree.scan_prefix([b'r']).values().map(|r| decode(&r?))
    }
}

fn encode<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    // Our own types always serialise.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}
