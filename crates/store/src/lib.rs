//! The document store: databases and view indexes as keyspaces of one engine per node
//! (`engine`: fjall by default, sled selectable). Only this module and its children know the
//! engine; `db` speaks to [`Store`], [`DbStore`] and [`index::IndexStore`].
//!
//! A data directory records its engine in `DIR/engine` and keeps it (`thali migrate` copies a
//! stopped node's data to the other one). The engine lives in `DIR/<engine>/`. Its keyspace
//! `node` holds the node's metadata and the catalog of databases:
//!
//! | key            | value                                                   |
//! |----------------|---------------------------------------------------------|
//! | `n` name       | node metadata (JSON), e.g. the uuid                     |
//! | `c` db name    | [`CatalogEntry`]: the database's id and live generation |
//! | `i`            | the last database id handed out (u64 BE)                |
//!
//! Database `<id>` keeps its data in keyspace `db<id>.g<gen>` and view index `<sig>` in
//! `db<id>.v.<sig>`. A database exists once its catalog entry is durable; deleting it removes
//! the entry first and then its keyspaces, so a crash in between leaves only keyspaces that the
//! next start drops (as it drops generations that an interrupted compaction left).
//!
//! Within a database's keyspace, keys are prefixed by kind so that one atomic batch covers
//! everything a write touches:
//!
//! | prefix | key                               | value                       |
//! |--------|-----------------------------------|-----------------------------|
//! | `d`    | doc id                            | [`DocInfo`] (JSON)          |
//! | `r`    | u32 BE id length, id, rev string  | [`RevBody`] (JSON)          |
//! | `s`    | u64 BE sequence                   | [`SeqEntry`]: id and leaves |
//! | `l`    | local doc id (without `_local/`)  | the local doc (JSON)        |
//! | `a`    | attachment digest                 | raw bytes (≤ 256 KiB)       |
//! | `A`    | attachment digest                 | `blob::Manifest` (JSON)     |
//! | `c`    | blob id (32 hex), u32 BE index    | 256 KiB chunk of a body     |
//! | `m`    | meta name                         | JSON value                  |
//!
//! Durability: [`Store::durable`] is a group commit over the whole node: writers (to any
//! database) that committed their batch before a flush started share that flush.

pub mod blob;
pub mod engine;
pub mod index;
mod layout;
pub mod migrate;
pub mod space;

pub use engine::{Bytes, Kind};
pub use layout::{AttMeta, DocInfo, RevBody, SeqEntry};

use engine::{Batch, Engine, Keyspace};
use layout::*;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("file system error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Config(String),
    /// Less free space than the reserve (`space.rs`): the write was not made (507).
    #[error("{0}")]
    Full(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// How to open a data directory's store.
#[derive(Clone, Debug)]
pub struct Options {
    /// The engine for a new data directory; an existing one must match or be `None`.
    pub engine: Option<Kind>,
    /// The node's one block cache, in bytes.
    pub cache_bytes: u64,
    /// Writes that add data are refused while less than this is free (`space.rs`).
    pub min_free: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            engine: None,
            cache_bytes: DEFAULT_CACHE,
            min_free: space::DEFAULT_RESERVE,
        }
    }
}

/// Enough for the working set of a laptop's databases, small enough for a phone.
pub const DEFAULT_CACHE: u64 = 32 << 20;

#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    engine: Arc<dyn Engine>,
    node: Keyspace,
    space: space::Space,
    /// Serialises catalog changes.
    catalog: Mutex<()>,
    /// Count of committed batches; a flush that starts after reading N makes 1..=N durable.
    applied: AtomicU64,
    /// The highest ticket known durable; held while a flush runs, so writers that arrive
    /// meanwhile wait for it and then find their batch covered or start the next one.
    flushed: Mutex<u64>,
}

/// A database's entry in the catalog.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub id: u64,
    pub gen: u64,
}

/// Returned by [`DbStore::apply`]; pass it to [`DbStore::durable`].
#[must_use]
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

fn data_keyspace(e: CatalogEntry) -> String {
    format!("db{}.g{}", e.id, e.gen)
}

fn index_keyspace(id: u64, sig: &str) -> String {
    format!("db{id}.v.{sig}")
}

fn catalog_key(name: &str) -> Vec<u8> {
    let mut k = vec![b'c'];
    k.extend_from_slice(name.as_bytes());
    k
}

/// The engine a data directory records, if it records one.
pub fn recorded_engine(dir: &Path) -> Result<Option<Kind>> {
    match std::fs::read_to_string(dir.join("engine")) {
        Ok(s) => s.parse().map(Some).map_err(StoreError::Config),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join("dbs").exists() || dir.join("node").exists() {
                return Err(StoreError::Config(format!(
                    "{} holds the store layout of thali before engines were selectable (a sled \
                     instance per database), which this version does not read; replicate its \
                     databases into a new data directory with the older binary",
                    dir.display()
                )));
            }
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

impl Store {
    pub fn open(dir: &Path, opts: &Options) -> Result<Store> {
        std::fs::create_dir_all(dir)?;
        // The data directory is its owner's alone (the binary's umask covers what is created
        // inside; this covers directories made by older versions or other tools).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let kind = match (recorded_engine(dir)?, opts.engine) {
            (Some(have), Some(want)) if have != want => {
                return Err(StoreError::Config(format!(
                    "{} uses the {} engine, not {}; `thali migrate --data DIR --to {}` converts it",
                    dir.display(),
                    have.name(),
                    want.name(),
                    want.name()
                )))
            }
            (Some(have), _) => have,
            (None, want) => {
                let kind = want.unwrap_or(Kind::Fjall);
                thali_sys::files::write_atomic(&dir.join("engine"), kind.name().as_bytes())?;
                kind
            }
        };
        let engine = engine::open(kind, &dir.join(kind.name()), opts.cache_bytes)?;
        let node = engine.keyspace("node")?;
        let store = Store {
            inner: Arc::new(StoreInner {
                engine,
                node,
                space: space::Space::new(dir, opts.min_free),
                catalog: Mutex::new(()),
                applied: AtomicU64::new(0),
                flushed: Mutex::new(0),
            }),
        };
        store.drop_orphans()?;
        Ok(store)
    }

    pub fn engine_kind(&self) -> Kind {
        self.inner.engine.kind()
    }

    /// Bytes on disk of the whole store.
    pub fn disk_size(&self) -> u64 {
        self.inner.engine.disk_size()
    }

    /// Drops keyspaces the catalog does not name: generations an interrupted compaction left,
    /// databases whose deletion was cut short.
    fn drop_orphans(&self) -> Result<()> {
        let live: std::collections::HashMap<u64, u64> = self
            .catalog()?
            .into_iter()
            .map(|(_, e)| (e.id, e.gen))
            .collect();
        for name in self.inner.engine.keyspaces()? {
            let Some(rest) = name.strip_prefix("db") else {
                continue;
            };
            let Some((id, what)) = rest.split_once('.') else {
                continue;
            };
            let Ok(id) = id.parse::<u64>() else { continue };
            let keep = match live.get(&id) {
                None => false,
                Some(gen) => what.starts_with("v.") || what == format!("g{gen}"),
            };
            if !keep {
                tracing::info!(keyspace = %name, "dropping an orphaned keyspace");
                self.inner.engine.drop_keyspace(&name)?;
            }
        }
        Ok(())
    }

    fn catalog(&self) -> Result<Vec<(String, CatalogEntry)>> {
        self.inner
            .node
            .prefix(b"c")
            .map(|r| {
                let (k, v) = r?;
                let name = String::from_utf8(k[1..].to_vec())
                    .map_err(|_| StoreError::Corrupt("catalog key".into()))?;
                Ok((name, decode(&v)?))
            })
            .collect()
    }

    fn entry(&self, name: &str) -> Result<Option<CatalogEntry>> {
        self.inner
            .node
            .get(&catalog_key(name))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Commits a batch to the node keyspace and waits until it is durable.
    fn commit_node(&self, batch: Batch) -> Result<()> {
        self.inner.engine.commit(batch)?;
        self.inner.engine.persist()
    }

    pub fn node_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let mut k = vec![b'n'];
        k.extend_from_slice(key.as_bytes());
        self.inner.node.get(&k)?.map(|v| decode(&v)).transpose()
    }

    pub fn set_node_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<()> {
        let mut k = vec![b'n'];
        k.extend_from_slice(key.as_bytes());
        let mut b = Batch::default();
        b.put(&self.inner.node, k, encode(v));
        self.commit_node(b)
    }

    pub fn list_databases(&self) -> Result<Vec<String>> {
        Ok(self.catalog()?.into_iter().map(|(n, _)| n).collect())
    }

    /// Opens a database, creating it when `create` is set.
    pub fn open_database(&self, name: &str, create: bool) -> Result<Option<DbStore>> {
        let _g = thali_sys::sync::lock(&self.inner.catalog);
        let entry = match self.entry(name)? {
            Some(e) => e,
            None if !create => return Ok(None),
            None => {
                let last = self
                    .inner
                    .node
                    .get(b"i")?
                    .and_then(|v| v.as_ref().try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                let e = CatalogEntry {
                    id: last + 1,
                    gen: 1,
                };
                let mut b = Batch::default();
                b.put(&self.inner.node, b"i".to_vec(), e.id.to_be_bytes().to_vec());
                b.put(&self.inner.node, catalog_key(name), encode(&e));
                self.commit_node(b)?;
                e
            }
        };
        Ok(Some(self.db_store(name, entry)?))
    }

    fn db_store(&self, name: &str, entry: CatalogEntry) -> Result<DbStore> {
        let ks = self.inner.engine.keyspace(&data_keyspace(entry))?;
        Ok(DbStore {
            inner: Arc::new(DbInner {
                store: self.clone(),
                name: name.to_string(),
                entry,
                ks,
                retired: AtomicBool::new(false),
                reclaim: blob::Reclaim::default(),
            }),
        })
    }

    /// Whether `db` is still the catalog's database of its name (not deleted, not replaced).
    pub fn is_current(&self, db: &DbStore) -> Result<bool> {
        Ok(self
            .entry(&db.inner.name)?
            .is_some_and(|e| e.id == db.inner.entry.id))
    }

    pub fn database_exists(&self, name: &str) -> Result<bool> {
        Ok(self.entry(name)?.is_some())
    }

    /// Deletes a database and its view indexes; their space goes back to the file system.
    pub fn drop_database(&self, name: &str) -> Result<bool> {
        let _g = thali_sys::sync::lock(&self.inner.catalog);
        let Some(entry) = self.entry(name)? else {
            return Ok(false);
        };
        let mut b = Batch::default();
        b.del(&self.inner.node, catalog_key(name));
        self.commit_node(b)?;
        let prefix = format!("db{}.", entry.id);
        for ks in self.inner.engine.keyspaces()? {
            if ks.starts_with(&prefix) {
                self.inner.engine.drop_keyspace(&ks)?;
            }
        }
        Ok(true)
    }

    /// Commits a batch; durable after [`Store::durable`] with the ticket. Every batch that
    /// adds data to a database or an index comes here, so here the free space is checked
    /// (deletions alone pass: they are how space comes back).
    fn commit(&self, batch: Batch) -> Result<Ticket> {
        if batch.adds_data() {
            self.inner.space.check()?;
        }
        self.inner.engine.commit(batch)?;
        Ok(Ticket(
            self.inner.applied.fetch_add(1, Ordering::SeqCst) + 1,
        ))
    }

    /// Waits until the batch behind `ticket` is on disk. Concurrent callers share one flush.
    pub async fn durable(&self, ticket: Ticket) -> Result<()> {
        if self.is_durable(ticket) {
            return Ok(());
        }
        let store = self.clone();
        // A flush is long work: on the blocking pool, never on an async worker.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| store.durable_blocking(ticket)))
            .await
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
    }

    fn is_durable(&self, ticket: Ticket) -> bool {
        *thali_sys::sync::lock(&self.inner.flushed) >= ticket.0
    }

    /// [`Store::durable`] on this thread (a blocking one).
    pub fn durable_blocking(&self, ticket: Ticket) -> Result<()> {
        let mut flushed = thali_sys::sync::lock(&self.inner.flushed);
        if *flushed >= ticket.0 {
            return Ok(());
        }
        let target = self.inner.applied.load(Ordering::SeqCst);
        self.inner.engine.persist()?;
        *flushed = target;
        Ok(())
    }

    /// Makes everything committed durable (at shutdown, and for tools).
    pub fn persist(&self) -> Result<()> {
        self.inner.engine.persist()
    }
}

/// One database: a keyspace of the node's engine (one generation of it).
#[derive(Clone)]
pub struct DbStore {
    inner: Arc<DbInner>,
}

struct DbInner {
    store: Store,
    name: String,
    entry: CatalogEntry,
    ks: Keyspace,
    /// Set when compaction replaced this generation: its keyspace goes once the last reader
    /// holding it is done.
    retired: AtomicBool,
    /// Bytes of thrown-away uploads not yet given back (`blob.rs`).
    reclaim: blob::Reclaim,
}

impl Drop for DbInner {
    fn drop(&mut self) {
        if self.retired.load(Ordering::SeqCst) {
            if let Err(e) = self.store.inner.engine.drop_keyspace(self.ks.name()) {
                tracing::warn!(keyspace = %self.ks.name(), error = %e, "old generation not dropped");
            }
        }
    }
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

    /// Makes this generation the database's current one; the old one is dropped once no
    /// reader holds it.
    pub fn commit(self, old: &DbStore) -> Result<DbStore> {
        let store = &old.inner.store;
        let _g = store
            .inner
            .catalog
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        store.inner.engine.persist()?;
        let mut b = Batch::default();
        b.put(
            &store.inner.node,
            catalog_key(&old.inner.name),
            encode(&self.store.inner.entry),
        );
        if store.entry(&old.inner.name)?.map(|e| e.gen) != Some(old.inner.entry.gen) {
            return Err(StoreError::Corrupt(format!(
                "database {} changed during compaction",
                old.inner.name
            )));
        }
        store.commit_node(b)?;
        old.inner.retired.store(true, Ordering::SeqCst);
        self.store.inner.retired.store(false, Ordering::SeqCst);
        Ok(self.store)
    }
}

/// The writes of one atomic update.
#[derive(Default)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn new() -> Self {
        WriteBatch::default()
    }
    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.ops.push((k, Some(v)));
    }
    fn del(&mut self, k: Vec<u8>) {
        self.ops.push((k, None));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn put_doc_info(&mut self, id: &str, info: &DocInfo) {
        // Sized for a typical document, so encoding does not regrow the buffer several times.
        let mut v = Vec::with_capacity(512);
        // Our own types always serialise.
        let _ = serde_json::to_writer(&mut v, info);
        self.put(doc_key(id), v);
    }
    pub fn put_body(&mut self, id: &str, rev: &str, body: &RevBody) {
        self.put(body_key(id, rev), encode(body));
    }
    /// Makes `body` the document's current body (stored with its doc info); the previous
    /// current body moves under its own key unless stemming removed that revision.
    pub fn set_current_body(&mut self, id: &str, info: &mut DocInfo, rev: String, body: RevBody) {
        if let Some((old_rev, old_body)) = info.current.take() {
            let kept = thali_doc::Rev::parse(&old_rev).is_some_and(|r| info.tree.contains(&r));
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
    /// Starts an empty next generation (for compaction); dropped unless committed.
    pub fn next_generation(&self) -> Result<NextGeneration> {
        let entry = CatalogEntry {
            id: self.inner.entry.id,
            gen: self.inner.entry.gen + 1,
        };
        let engine = &self.inner.store.inner.engine;
        // A leftover of a compaction cut short in this process.
        engine.drop_keyspace(&data_keyspace(entry))?;
        let store = self.inner.store.db_store(&self.inner.name, entry)?;
        store.inner.retired.store(true, Ordering::SeqCst);
        Ok(NextGeneration { store })
    }

    /// Commits a batch atomically. The result is visible at once and durable after
    /// [`DbStore::durable`] with the returned ticket.
    pub fn apply(&self, batch: WriteBatch) -> Result<Ticket> {
        let mut b = Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.put(&self.inner.ks, k, v),
                None => b.del(&self.inner.ks, k),
            }
        }
        self.inner.store.commit(b)
    }

    /// Waits until the batch behind `ticket` is on disk (shared with every other writer).
    pub async fn durable(&self, ticket: Ticket) -> Result<()> {
        self.inner.store.durable(ticket).await
    }

    /// [`DbStore::durable`] on this thread (a blocking one).
    pub fn durable_blocking(&self, ticket: Ticket) -> Result<()> {
        self.inner.store.durable_blocking(ticket)
    }

    pub fn flush_blocking(&self) -> Result<()> {
        self.inner.store.persist()
    }

    /// The live generation's size on disk (view indexes not counted).
    pub fn size_on_disk(&self) -> u64 {
        self.inner.ks.disk_size()
    }

    /// Opens (or creates) the view index of signature `sig`.
    pub fn index(&self, sig: &str) -> Result<index::IndexStore> {
        let ks = self
            .inner
            .store
            .inner
            .engine
            .keyspace(&index_keyspace(self.inner.entry.id, sig))?;
        Ok(index::IndexStore::new(self.inner.store.clone(), ks))
    }

    /// The signatures that have an index.
    pub fn index_sigs(&self) -> Result<Vec<String>> {
        let prefix = index_keyspace(self.inner.entry.id, "");
        Ok(self
            .inner
            .store
            .inner
            .engine
            .keyspaces()?
            .into_iter()
            .filter_map(|n| n.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// Deletes the index of `sig` (its handles should be dropped; fjall keeps the files until
    /// they are).
    pub fn drop_index(&self, sig: &str) -> Result<()> {
        self.inner
            .store
            .inner
            .engine
            .drop_keyspace(&index_keyspace(self.inner.entry.id, sig))
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        self.inner.ks.get(key)?.map(|v| decode(&v)).transpose()
    }

    pub fn doc_info(&self, id: &str) -> Result<Option<DocInfo>> {
        self.get(&doc_key(id))
    }

    /// [`DbStore::body_of`], moving the current body out of `info` instead of copying it (for
    /// callers that render each revision once).
    pub fn take_body(&self, id: &str, info: &mut DocInfo, rev: &str) -> Result<Option<RevBody>> {
        match info.current.take() {
            Some((r, b)) if r == rev => Ok(Some(b)),
            other => {
                info.current = other;
                self.body(id, rev)
            }
        }
    }

    /// The body of `rev`: the current one in `info`, or the one stored under its own key.
    pub fn body_of(&self, id: &str, info: &DocInfo, rev: &str) -> Result<Option<RevBody>> {
        match &info.current {
            Some((r, b)) if r == rev => Ok(Some(b.clone())),
            _ => self.body(id, rev),
        }
    }

    pub fn body(&self, id: &str, rev: &str) -> Result<Option<RevBody>> {
        self.get(&body_key(id, rev))
    }

    /// A whole attachment body in memory (small ones: design documents' modules). Bodies of
    /// any size are read with `blob` and `blob_chunks`.
    pub fn att(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        self.blob(digest)?.map(|b| self.blob_bytes(b)).transpose()
    }

    pub fn has_att(&self, digest: &str) -> Result<bool> {
        Ok(self.inner.ks.get(&att_key(digest))?.is_some()
            || self.inner.ks.get(&manifest_key(digest))?.is_some())
    }

    pub fn local(&self, id: &str) -> Result<Option<serde_json::Value>> {
        self.get(&local_key(id))
    }

    pub fn meta<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.get(&meta_key(name))
    }

    /// Documents by id (raw byte order) within `[start, end]` bounds, ascending or descending.
    pub fn docs(
        &self,
        start: Option<&str>,
        end: Option<&str>,
        end_inclusive: bool,
        descending: bool,
    ) -> impl Iterator<Item = Result<(String, DocInfo)>> {
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
        self.inner.ks.range(lo_b, hi_b, descending).map(|r| {
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
        let lo = if descending {
            seq_key(0)
        } else {
            seq_key(since.saturating_add(1))
        };
        let hi = vec![b's' + 1];
        self.inner
            .ks
            .range(Bound::Included(lo), Bound::Excluded(hi), descending)
            .map(|r| {
                let (k, v) = r?;
                let seq = k
                    .get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| StoreError::Corrupt("seq key".into()))?;
                Ok((seq, decode(&v)?))
            })
    }

    /// Every entry of this database's keyspace, raw (for `thali migrate`).
    pub fn raw_entries(&self) -> engine::Iter {
        self.inner
            .ks
            .range(Bound::Unbounded, Bound::Unbounded, false)
    }

    /// Meta entries (name, raw JSON value).
    pub fn metas(&self) -> impl Iterator<Item = Result<(String, serde_json::Value)>> {
        self.inner.ks.prefix(b"m").map(|r| {
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
        self.inner.ks.prefix(&key).map(|r| {
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

#[cfg(test)]
mod tests;
