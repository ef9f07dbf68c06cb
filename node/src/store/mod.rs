//! The on-disk layout in sled. Only this module knows sled.
//!
//! Each database is its own sled instance under `DIR/dbs/<name>/g<N>/`, where `CURRENT` names
//! the live generation. Compaction writes the live data into generation N+1, switches
//! `CURRENT` atomically (write + rename) and deletes generation N, so the space of old
//! revisions really goes back to the file system; deleting a database removes its directory.
//! Node-wide metadata (the uuid) lives in a small sled instance under `DIR/node/`.
//!
//! Within a database, keys are prefixed by kind so that one atomic `apply_batch` covers
//! everything a write touches:
//!
//! | prefix | key                               | value                       |
//! |--------|-----------------------------------|-----------------------------|
//! | `d`    | doc id                            | [`DocInfo`] (JSON)          |
//! | `r`    | u32 BE id length, id, rev string  | [`RevBody`] (JSON)          |
//! | `s`    | u64 BE sequence                   | [`SeqEntry`]: id and leaves |
//! | `l`    | local doc id (without `_local/`)  | the local doc (JSON)        |
//! | `a`    | attachment digest                 | raw bytes                   |
//! | `m`    | meta name                         | JSON value                  |
//!
//! Durability: [`DbStore::durable`] is a group commit: writers that applied their batch before a
//! flush started share that flush.

pub mod index;
mod layout;

pub use layout::{AttMeta, DocInfo, RevBody, SeqEntry};

use layout::*;
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("file system error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    dbs_dir: PathBuf,
    node: sled::Db,
}

/// Returned by [`DbStore::apply`]; pass it to [`DbStore::durable`].
#[must_use]
pub struct Ticket(u64);

fn open_sled(dir: &Path) -> Result<sled::Db> {
    Ok(sled::Config::new()
        .path(dir)
        .cache_capacity(64 * 1024 * 1024)
        .mode(sled::Mode::HighThroughput)
        // Every write flushes explicitly (group commit); no background flusher needed.
        .flush_every_ms(None)
        .open()?)
}

/// Database names may hold `/`; everything else they may hold is safe in a file name.
fn dir_name(db: &str) -> String {
    db.replace('/', "%2F")
}

fn db_name(dir: &str) -> String {
    dir.replace("%2F", "/")
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename, fsync of the directory).
fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        let dbs_dir = dir.join("dbs");
        std::fs::create_dir_all(&dbs_dir)?;
        // The data directory is its owner's alone (the binary's umask covers what is created
        // inside; this covers directories made by older versions or other tools).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let node = open_sled(&dir.join("node"))?;
        Ok(Store {
            inner: Arc::new(StoreInner { dbs_dir, node }),
        })
    }

    pub fn node_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.inner.node.get(key)?.map(|v| decode(&v)).transpose()
    }

    pub fn set_node_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<()> {
        self.inner.node.insert(key, encode(v))?;
        self.inner.node.flush()?;
        Ok(())
    }

    pub fn list_databases(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.inner.dbs_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("CURRENT").exists())
            .filter_map(|e| e.file_name().to_str().map(db_name))
            .collect();
        names.sort();
        names
    }

    /// Opens a database, creating it when `create` is set. A database exists once its
    /// `CURRENT` file is durable.
    pub fn open_database(&self, name: &str, create: bool) -> Result<Option<DbStore>> {
        let dir = self.inner.dbs_dir.join(dir_name(name));
        let current = dir.join("CURRENT");
        let gen = match std::fs::read_to_string(&current) {
            Ok(s) => s
                .trim()
                .strip_prefix('g')
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("{}", current.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                // A leftover directory without CURRENT is a creation that never finished.
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)?;
                // sled locks its files: open the instance once and keep it.
                let store = DbStore::open(dir.clone(), 1)?;
                store.flush_blocking()?;
                write_atomic(&current, b"g1")?;
                return Ok(Some(store));
            }
            Err(e) => return Err(e.into()),
        };
        // Generations other than the current one are leftovers of an interrupted compaction.
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let n = entry.file_name();
            let n = n.to_string_lossy();
            if n.starts_with('g') && n != format!("g{gen}") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Some(DbStore::open(dir, gen)?))
    }

    /// Whether a database exists, without opening it (sled allows one instance per file).
    pub fn database_exists(&self, name: &str) -> bool {
        self.inner
            .dbs_dir
            .join(dir_name(name))
            .join("CURRENT")
            .exists()
    }

    pub fn drop_database(&self, name: &str) -> Result<bool> {
        let dir = self.inner.dbs_dir.join(dir_name(name));
        let current = dir.join("CURRENT");
        if !current.exists() {
            return Ok(false);
        }
        // Removing CURRENT first makes the deletion atomic; the rest is cleanup.
        std::fs::remove_file(&current)?;
        std::fs::File::open(&dir)?.sync_all()?;
        std::fs::remove_dir_all(&dir)?;
        Ok(true)
    }
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One database: its own sled instance (one generation of it).
#[derive(Clone)]
pub struct DbStore {
    inner: Arc<DbInner>,
    tree: sled::Tree,
}

struct DbInner {
    db: sled::Db,
    dir: PathBuf,
    gen: u64,
    /// Count of applied batches; a flush that starts after reading N makes batches 1..=N durable.
    applied: AtomicU64,
    flushed: tokio::sync::Mutex<u64>,
}

/// The next generation of a database being filled by compaction.
pub struct NextGeneration {
    store: DbStore,
}

impl NextGeneration {
    pub fn apply(&self, batch: WriteBatch) -> Result<()> {
        let _ticket = self.store.apply(batch)?;
        Ok(())
    }

    pub fn doc_info(&self, id: &str) -> Result<Option<DocInfo>> {
        self.store.doc_info(id)
    }

    /// Makes this generation the database's current one and deletes the old one.
    pub fn commit(self, old: &DbStore) -> Result<DbStore> {
        self.store.inner.db.flush()?;
        write_atomic(
            &self.store.inner.dir.join("CURRENT"),
            format!("g{}", self.store.inner.gen).as_bytes(),
        )?;
        // Readers still holding the old generation keep reading it (unlinked files stay
        // readable); no writer can, since compaction holds the write lock.
        let _ = std::fs::remove_dir_all(old.inner.dir.join(format!("g{}", old.inner.gen)));
        Ok(self.store)
    }
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
    /// Makes `body` the document's current body (stored with its doc info); the previous
    /// current body moves under its own key unless stemming removed that revision.
    pub fn set_current_body(&mut self, id: &str, info: &mut DocInfo, rev: String, body: RevBody) {
        if let Some((old_rev, old_body)) = info.current.take() {
            let kept = crate::doc::Rev::parse(&old_rev).is_some_and(|r| info.tree.contains(&r));
            if kept {
                self.put_body(id, &old_rev, &old_body);
            }
        }
        info.current = Some((rev, body));
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
    fn open(dir: PathBuf, gen: u64) -> Result<DbStore> {
        let db = open_sled(&dir.join(format!("g{gen}")))?;
        let tree: sled::Tree = (*db).clone();
        Ok(DbStore {
            inner: Arc::new(DbInner {
                db,
                dir,
                gen,
                applied: AtomicU64::new(0),
                flushed: tokio::sync::Mutex::new(0),
            }),
            tree,
        })
    }

    /// Starts an empty next generation (for compaction).
    pub fn next_generation(&self) -> Result<NextGeneration> {
        let gen = self.inner.gen + 1;
        let path = self.inner.dir.join(format!("g{gen}"));
        let _ = std::fs::remove_dir_all(&path);
        Ok(NextGeneration {
            store: DbStore::open(self.inner.dir.clone(), gen)?,
        })
    }

    /// Applies a batch atomically. The result is visible at once and durable after
    /// [`DbStore::durable`] with the returned ticket.
    pub fn apply(&self, batch: WriteBatch) -> Result<Ticket> {
        if !batch.empty {
            self.tree.apply_batch(batch.batch)?;
        }
        Ok(Ticket(
            self.inner.applied.fetch_add(1, Ordering::SeqCst) + 1,
        ))
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

    /// The live generation's size (view indexes beside it are not counted).
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.inner.dir.join(format!("g{}", self.inner.gen)))
    }

    /// Where this database's view indexes live (`store::index`).
    pub fn index_root(&self) -> PathBuf {
        self.inner.dir.join("views")
    }

    pub fn doc_info(&self, id: &str) -> Result<Option<DocInfo>> {
        self.tree.get(doc_key(id))?.map(|v| decode(&v)).transpose()
    }

    /// The body of `rev`: the current one in `info`, or the one stored under its own key.
    pub fn body_of(&self, id: &str, info: &DocInfo, rev: &str) -> Result<Option<RevBody>> {
        match &info.current {
            Some((r, b)) if r == rev => Ok(Some(b.clone())),
            _ => self.body(id, rev),
        }
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

    /// Meta entries (name, raw JSON value).
    pub fn metas(&self) -> impl Iterator<Item = Result<(String, serde_json::Value)>> {
        self.tree.scan_prefix([b'm']).map(|r| {
            let (k, v) = r?;
            let name = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Corrupt("meta key".into()))?;
            Ok((name, decode(&v)?))
        })
    }

    /// Local documents in id order.
    pub fn locals(&self) -> impl Iterator<Item = Result<(String, serde_json::Value)>> {
        self.locals_with_prefix("")
    }

    /// Local documents whose id starts with `prefix`, in id order.
    pub fn locals_with_prefix(
        &self,
        prefix: &str,
    ) -> impl Iterator<Item = Result<(String, serde_json::Value)>> {
        let mut key = vec![b'l'];
        key.extend_from_slice(prefix.as_bytes());
        self.tree.scan_prefix(key).map(|r| {
            let (k, v) = r?;
            let id = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Corrupt("local id".into()))?;
            Ok((id, decode(&v)?))
        })
    }
}

fn encode<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    // Our own types always serialise.
    serde_json::to_vec(v).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}
