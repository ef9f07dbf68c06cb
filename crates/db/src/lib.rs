//! The operations of databases: the node's registry of databases and, per database, writes,
//! reads, the changes feed, local documents and compaction. Speaks to `store`, never to sled.

mod access;
mod asynch;
mod changes;
mod compact;
mod error;
mod find;
mod local;
mod offload;
mod plugins;
mod queue;
mod read;
mod resolve;
mod security;
mod upload;
mod views;
mod write;

pub use access::{admin_ctx, Caller, Level};
pub use changes::{ChangeRow, ChangesQuery, FilterFn, Style};
pub use error::{DbError, DbResult};
pub use read::{
    AllDocsPart, AllDocsQuery, AttMode, BulkGetItem, DocOptions, OpenRevs, RevisionOut,
};
pub use security::Security;
/// Attachment bodies received into the store, before and after a write takes them.
pub use thali_store::blob::{Staged, StagedSet};
pub use thali_store::AttMeta;
pub use upload::Upload;
pub use write::{doc_input, DocInput, DocResult};

use rand::RngCore;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use thali_store::{DbStore, Store};

use tokio::sync::watch;

pub const DEFAULT_REVS_LIMIT: u64 = 1000;

/// Limits that protect the node from oversize input.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest JSON body of one document, in bytes (CouchDB's `max_document_size`).
    pub max_doc_size: usize,
    /// Largest attachment, in bytes, as stored (after gzip is decoded), when it streams to
    /// disk (standalone attachment `PUT`).
    pub max_att_size: usize,
    /// Largest attachment held in memory while it is written (inline base64, multipart parts,
    /// gzip decoded): bounded by memory, not disk (`--max-request-size`).
    pub max_inline_att_size: usize,
    /// Sandbox limits of design-document plugins.
    pub plugins: thali_plugins::Limits,
    /// Most databases open at once; the least recently used idle ones close beyond.
    pub max_dbs_open: usize,
    /// Design document languages stored and replicated but not run (`--store-only-language`).
    pub store_only_languages: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_doc_size: 8_000_000,
            max_att_size: 256 << 20,
            max_inline_att_size: 256 << 20,
            plugins: thali_plugins::Limits::default(),
            max_dbs_open: 500,
            store_only_languages: Vec::new(),
        }
    }
}

/// All databases of one node.
pub struct Node {
    store: Store,
    dbs: RwLock<HashMap<String, Arc<Database>>>,
    uuid: String,
    limits: Limits,
    /// Serialises create/delete so a name is never half created.
    admin_lock: Mutex<()>,
    /// Per-name locks of databases being loaded.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Ticks of database use, for closing the least recently used.
    clock: AtomicU64,
    host: Arc<thali_plugins::Host>,
    /// Bumped whenever some `_security` changes or a database comes or goes.
    security_epoch: Arc<AtomicU64>,
    /// The keys some `_security` names, as of an epoch.
    peer_keys: Mutex<(u64, Arc<HashSet<String>>)>,
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// CouchDB's rule for database names, plus the system databases we know.
pub fn validate_db_name(name: &str) -> DbResult<()> {
    let ok = matches!(name, "_replicator" | "_users")
        || (name.len() <= 238
            && name
                .as_bytes()
                .first()
                .is_some_and(|c| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_$()+-/".contains(&c)));
    if ok {
        Ok(())
    } else {
        Err(DbError::IllegalDbName(format!(
            "Name: '{name}'. Only lowercase characters (a-z), digits (0-9), and any of the \
             characters _, $, (, ), +, -, and / are allowed. Must begin with a letter."
        )))
    }
}

impl Node {
    pub fn open(
        dir: &Path,
        store_opts: &thali_store::Options,
        limits: Limits,
    ) -> DbResult<Arc<Node>> {
        let store = Store::open(dir, store_opts)?;
        let uuid = match store.node_meta::<String>("uuid")? {
            Some(u) => u,
            None => {
                let u = random_hex(16);
                store.set_node_meta("uuid", &u)?;
                u
            }
        };
        let host =
            thali_plugins::Host::new(limits.plugins.clone(), limits.store_only_languages.clone())
                .map_err(|e| DbError::Internal(e.to_string()))?;
        Ok(Arc::new(Node {
            store,
            dbs: RwLock::new(HashMap::new()),
            uuid,
            limits,
            admin_lock: Mutex::new(()),
            opening: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            host,
            security_epoch: Arc::new(AtomicU64::new(1)),
            peer_keys: Mutex::new((0, Arc::default())),
        }))
    }

    /// Every key some database's `_security` names, at any level. Recomputed only after a
    /// `_security` write or a database created or deleted.
    pub fn peer_keys_blocking(&self) -> Arc<HashSet<String>> {
        if let Some(keys) = self.peer_keys_cached() {
            return keys;
        }
        let epoch = self.security_epoch.load(Ordering::SeqCst);
        let mut keys = HashSet::new();
        for name in self.all_dbs() {
            let Ok(sec) = self.security_of(&name) else {
                continue;
            };
            keys.extend(sec.grants().map(|(k, _)| k.to_string()));
        }
        let keys = Arc::new(keys);
        if let Ok(mut c) = self.peer_keys.lock() {
            *c = (epoch, keys.clone());
        }
        keys
    }

    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Bytes the whole store takes on disk.
    pub fn disk_size(&self) -> u64 {
        self.store.disk_size()
    }

    /// Whether the store answers reads (`/_up`).
    pub fn healthy(&self) -> DbResult<()> {
        self.store.node_meta::<String>("uuid")?;
        Ok(())
    }

    /// A record of the node's own (pairing state), not of any database.
    pub fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> DbResult<Option<T>> {
        Ok(self.store.node_meta(key)?)
    }

    /// Writes a node record durably.
    /// Stores a node-wide setting durably (off the async workers: it waits for a flush).
    pub async fn set_meta<T: serde::Serialize>(self: &Arc<Self>, key: &str, v: &T) -> DbResult<()> {
        let v = serde_json::to_value(v).map_err(|e| DbError::Internal(e.to_string()))?;
        let (this, key) = (self.clone(), key.to_string());
        offload::run(move || Ok(this.store.set_node_meta(&key, &v)?)).await?
    }

    pub fn all_dbs(&self) -> Vec<String> {
        match self.store.list_databases() {
            Ok(names) => names,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the catalog of databases");
                Vec::new()
            }
        }
    }

    /// Makes every write durable (at shutdown).
    pub fn flush(&self) -> DbResult<()> {
        Ok(self.store.persist()?)
    }

    /// Opens an existing database (or finds it open). Loading one (its design documents
    /// compiled) holds only that name's lock, not the node's.
    pub fn db_blocking(&self, name: &str) -> DbResult<Arc<Database>> {
        if let Some(db) = self.open_db(name) {
            return Ok(db);
        }
        let name_lock = {
            let mut opening = self.opening.lock().map_err(poisoned)?;
            opening.entry(name.to_string()).or_default().clone()
        };
        let _n = name_lock.lock().map_err(poisoned)?;
        if let Some(db) = self.dbs.read().map_err(poisoned)?.get(name) {
            return Ok(db.clone());
        }
        let res = (|| {
            let data = self
                .store
                .open_database(name, false)?
                .ok_or_else(|| DbError::NotFound("Database does not exist.".into()))?;
            let db = self.load(name, data.clone())?;
            // A creation may have registered the database meanwhile (keep that one: there is
            // one handle per database, or two write locks would guard one keyspace), or a
            // deletion removed it (or a new one took its name).
            let _g = self.admin_lock.lock().map_err(poisoned)?;
            if let Some(db) = self.dbs.read().map_err(poisoned)?.get(name) {
                return Ok(db.clone());
            }
            if !self.store.is_current(&data)? {
                return Err(DbError::NotFound("Database does not exist.".into()));
            }
            self.register(name, db.clone())?;
            Ok(db)
        })();
        if let Ok(mut opening) = self.opening.lock() {
            opening.remove(name);
        }
        res
    }

    /// The keys of [`Node::peer_keys_blocking`] when nothing changed since they were read.
    pub(crate) fn peer_keys_cached(&self) -> Option<Arc<HashSet<String>>> {
        let epoch = self.security_epoch.load(Ordering::SeqCst);
        let c = self.peer_keys.lock().ok()?;
        (c.0 == epoch).then(|| c.1.clone())
    }

    /// The database `name` if it is open (and marks it used).
    fn open_db(&self, name: &str) -> Option<Arc<Database>> {
        let db = self.dbs.read().ok()?.get(name)?.clone();
        db.touch(&self.clock);
        Some(db)
    }

    fn load(&self, name: &str, data: DbStore) -> DbResult<Arc<Database>> {
        Ok(Arc::new(Database::load(
            name,
            data,
            self.limits.clone(),
            self.host.clone(),
            self.security_epoch.clone(),
        )?))
    }

    /// Enters a loaded database in the registry, closing the least recently used idle ones
    /// beyond `max_dbs_open`.
    fn register(&self, name: &str, db: Arc<Database>) -> DbResult<()> {
        db.touch(&self.clock);
        let mut dbs = self.dbs.write().map_err(poisoned)?;
        dbs.insert(name.to_string(), db.clone());
        if dbs.len() > self.limits.max_dbs_open {
            // Idle: nobody but the registry holds it (requests, feeds and replications hold a
            // reference while they use one).
            let mut idle: Vec<(u64, String)> = dbs
                .iter()
                .filter(|(n, d)| n.as_str() != name && Arc::strong_count(d) == 1)
                .map(|(n, d)| (d.last_used.load(Ordering::Relaxed), n.clone()))
                .collect();
            idle.sort();
            let excess = dbs.len() - self.limits.max_dbs_open;
            for (_, n) in idle.into_iter().take(excess) {
                if let Some(d) = dbs.get(&n) {
                    if d.close() {
                        dbs.remove(&n);
                        tracing::debug!(db = %n, "idle database closed");
                    }
                }
            }
        }
        drop(dbs);
        resolve::spawn(&db);
        Ok(())
    }

    /// How many databases are open.
    pub fn open_dbs(&self) -> usize {
        self.dbs.read().map(|d| d.len()).unwrap_or(0)
    }

    /// A database's `_security`, without loading it (no design documents compiled).
    pub fn security_of(&self, name: &str) -> DbResult<Security> {
        if let Some(db) = self.dbs.read().map_err(poisoned)?.get(name) {
            return db.security();
        }
        let data = self
            .store
            .open_database(name, false)?
            .ok_or_else(|| DbError::NotFound("Database does not exist.".into()))?;
        Ok(Security::stored(data.meta("security")?))
    }

    /// `_active_tasks` entries of open databases: index updates and conflict resolvers.
    pub fn db_tasks(&self) -> Vec<Value> {
        let dbs: Vec<Arc<Database>> = match self.dbs.read() {
            Ok(d) => d.values().cloned().collect(),
            Err(_) => return Vec::new(),
        };
        let mut out = Vec::new();
        for d in dbs {
            out.extend(d.indexer_tasks());
            out.extend(d.resolver_task());
        }
        out
    }

    pub fn create_db_blocking(&self, name: &str) -> DbResult<Arc<Database>> {
        validate_db_name(name)?;
        let _g = self.admin_lock.lock().map_err(poisoned)?;
        if self.store.database_exists(name)? {
            return Err(DbError::FileExists);
        }
        let data = self
            .store
            .open_database(name, true)?
            .ok_or_else(|| DbError::Internal("database vanished".into()))?;
        let db = self.load(name, data)?;
        self.register(name, db.clone())?;
        self.security_epoch.fetch_add(1, Ordering::SeqCst);
        tracing::info!(db = name, "database created");
        Ok(db)
    }

    pub fn delete_db_blocking(&self, name: &str) -> DbResult<()> {
        let _g = self.admin_lock.lock().map_err(poisoned)?;
        if let Some(db) = self.dbs.write().map_err(poisoned)?.remove(name) {
            db.deleted.store(true, Ordering::SeqCst);
            // Wake feeds so they end.
            db.updates.send_modify(|_| {});
        }
        if !self.store.drop_database(name)? {
            return Err(DbError::NotFound("Database does not exist.".into()));
        }
        self.security_epoch.fetch_add(1, Ordering::SeqCst);
        tracing::info!(db = name, "database deleted");
        Ok(())
    }
}

fn poisoned<T>(_: T) -> DbError {
    DbError::Internal("lock poisoned".into())
}

/// Counters changed only under the write lock.
#[derive(Clone, Copy)]
struct WriteState {
    update_seq: u64,
    doc_count: u64,
    doc_del_count: u64,
}

/// One open database.
pub struct Database {
    name: String,
    /// The current generation; replaced by compaction.
    data: RwLock<DbStore>,
    write: Mutex<WriteState>,
    /// Write requests waiting for the writer (`queue.rs`).
    queue: Mutex<queue::WriteQueue>,
    revs_limit: AtomicU64,
    /// Counts as of the last applied write, readable without the write lock.
    /// `(update_seq, doc_count, doc_del_count)` as of the newest durable write: what `GET /db`
    /// reports, consistent with the changes feed (a write's counts show once it is durable).
    counts: Mutex<(u64, u64, u64)>,
    /// The latest durable `update_seq`; changes feeds wait on it.
    updates: watch::Sender<u64>,
    compact_running: AtomicBool,
    deleted: AtomicBool,
    /// Closed as idle by the registry: a stale handle (the resolver's) may not write.
    closed: AtomicBool,
    /// The registry's clock when last looked up.
    last_used: AtomicU64,
    /// The node's count of `_security` changes (`Node::peer_keys` caches by it).
    security_epoch: Arc<AtomicU64>,
    limits: Limits,
    host: Arc<thali_plugins::Host>,
    /// The compiled design documents, replaced as a whole when one changes.
    plugins: RwLock<Arc<thali_plugins::DbPlugins>>,
    /// The Mango JSON indexes of those design documents, replaced with them.
    mango: RwLock<Arc<Vec<thali_mango::index::IndexDef>>>,
    resolver_stats: resolve::ResolverStats,
    views: views::Views,
}

impl Database {
    fn load(
        name: &str,
        data: DbStore,
        limits: Limits,
        host: Arc<thali_plugins::Host>,
        security_epoch: Arc<AtomicU64>,
    ) -> DbResult<Database> {
        let update_seq: u64 = data.meta("update_seq")?.unwrap_or(0);
        let doc_count: u64 = data.meta("doc_count")?.unwrap_or(0);
        let doc_del_count: u64 = data.meta("doc_del_count")?.unwrap_or(0);
        let revs_limit: u64 = data.meta("revs_limit")?.unwrap_or(DEFAULT_REVS_LIMIT);
        let (updates, _) = watch::channel(update_seq);
        Ok(Database {
            name: name.to_string(),
            data: RwLock::new(data),
            write: Mutex::new(WriteState {
                update_seq,
                doc_count,
                doc_del_count,
            }),
            queue: Default::default(),
            revs_limit: AtomicU64::new(revs_limit),
            counts: Mutex::new((update_seq, doc_count, doc_del_count)),
            updates,
            compact_running: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
            limits,
            host,
            plugins: RwLock::new(Arc::default()),
            mango: RwLock::new(Arc::default()),
            resolver_stats: Default::default(),
            views: Default::default(),
            security_epoch,
        }
        .with_plugins())
    }

    /// The database's store (its current generation).
    pub(crate) fn data(&self) -> DbStore {
        match self.data.read() {
            Ok(d) => d.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn size_on_disk(&self) -> u64 {
        self.data().size_on_disk()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Deleted, or closed by the registry (then a fresh handle comes from `Node::db`).
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst)
    }

    fn check_alive(&self) -> DbResult<()> {
        if self.closed.load(Ordering::SeqCst) {
            Err(DbError::Internal(
                "database handle closed; open it again".into(),
            ))
        } else if self.is_deleted() {
            Err(DbError::NotFound("Database does not exist.".into()))
        } else {
            Ok(())
        }
    }

    fn touch(&self, clock: &AtomicU64) {
        let t = clock.fetch_add(1, Ordering::Relaxed);
        self.last_used.store(t, Ordering::Relaxed);
    }

    /// Closes this handle unless a write holds it: no write can follow on it.
    fn close(&self) -> bool {
        match self.write.try_lock() {
            Ok(_st) => {
                self.closed.store(true, Ordering::SeqCst);
                true
            }
            Err(_) => false,
        }
    }

    pub fn update_seq(&self) -> u64 {
        *self.updates.borrow()
    }

    /// A receiver that changes whenever a write becomes durable.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }

    pub fn info(&self) -> DbResult<Value> {
        let disk_size = self.size_on_disk();
        self.check_alive()?;
        Ok(json!({
            "db_name": self.name,
            "doc_count": self.doc_count(),
            "doc_del_count": self.counts().2,
            "update_seq": self.update_seq(),
            "purge_seq": 0,
            "compact_running": self.compact_running.load(Ordering::SeqCst),
            "sizes": {"file": disk_size, "external": 0, "active": disk_size},
            "disk_size": disk_size,
            "instance_start_time": "0",
            "disk_format_version": 1,
            "props": {},
        }))
    }

    /// Documents whose winning revision is not deleted.
    fn counts(&self) -> (u64, u64, u64) {
        *thali_sys::sync::lock(&self.counts)
    }

    /// Publishes the counts of a durable write, unless a newer write's are already out.
    fn publish_counts(&self, seq: u64, doc_count: u64, doc_del_count: u64) {
        let mut c = thali_sys::sync::lock(&self.counts);
        if seq >= c.0 {
            *c = (seq, doc_count, doc_del_count);
        }
    }

    pub fn doc_count(&self) -> u64 {
        self.counts().1
    }

    pub fn revs_limit(&self) -> u64 {
        self.revs_limit.load(Ordering::SeqCst)
    }

    pub async fn set_revs_limit(&self, limit: u64) -> DbResult<()> {
        self.check_alive()?;
        if limit == 0 {
            return Err(DbError::BadRequest("revs_limit must be positive".into()));
        }
        self.put_meta("revs_limit", &limit).await?;
        self.revs_limit.store(limit, Ordering::SeqCst);
        Ok(())
    }

    pub fn security(&self) -> DbResult<Security> {
        self.check_alive()?;
        Ok(Security::stored(self.data().meta("security")?))
    }

    pub async fn set_security(&self, sec: Value) -> DbResult<()> {
        self.check_alive()?;
        let sec = Security::parse(sec).map_err(DbError::BadRequest)?;
        self.put_meta("security", sec.as_value()).await?;
        self.security_epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn put_meta<T: serde::Serialize>(&self, name: &str, v: &T) -> DbResult<()> {
        let (data, ticket) = {
            let _st = self.write.lock().map_err(poisoned)?;
            self.check_alive()?;
            let mut b = thali_store::WriteBatch::new();
            b.put_meta(name, v);
            let data = self.data();
            let t = data.apply(b)?;
            (data, t)
        };
        data.durable(ticket).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(max: usize) -> (std::path::PathBuf, Arc<Node>) {
        let dir = std::env::temp_dir().join(format!("thali-lru-{}", random_hex(6)));
        let limits = Limits {
            max_dbs_open: max,
            ..Default::default()
        };
        let node = Node::open(&dir, &Default::default(), limits).unwrap();
        (dir, node)
    }

    async fn put(db: &Arc<Database>, id: &str) {
        let r = db
            .bulk_docs(vec![json!({ "_id": id })], true, &Caller::node(db.name()))
            .await
            .unwrap();
        assert!(r[0].is_ok(), "{id}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_databases_close_beyond_max_dbs_open() {
        let (dir, node) = node(3);
        for i in 0..8 {
            let db = node.create_db(&format!("db{i}")).await.unwrap();
            put(&db, "a").await;
        }
        // `_replicator` and the eight: never more than three open.
        assert!(node.open_dbs() <= 3, "{} open", node.open_dbs());
        // A database in use is never closed under its user.
        let held = node.db("db0").await.unwrap();
        for i in 1..8 {
            let db = node.db(&format!("db{i}")).await.unwrap();
            put(&db, "b").await;
        }
        assert!(!held.is_deleted());
        put(&held, "b").await;
        // Reopened ones kept every write and their counters.
        for i in 0..8 {
            let db = node.db(&format!("db{i}")).await.unwrap();
            assert_eq!(db.doc_count(), 2, "db{i}");
            assert_eq!(db.update_seq(), 2, "db{i}");
        }
        drop(held);
        // A handle closed by the registry refuses writes; the registry hands out a fresh one.
        let stale = node.db("db1").await.unwrap();
        let weak = Arc::downgrade(&stale);
        drop(stale);
        for i in 2..8 {
            node.db(&format!("db{i}")).await.unwrap();
        }
        if let Some(stale) = weak.upgrade() {
            assert!(stale.is_deleted());
            let r = stale
                .bulk_docs(vec![json!({"_id": "late"})], true, &Caller::node("db1"))
                .await;
            assert!(r.is_err());
        }
        let db1 = node.db("db1").await.unwrap();
        assert!(db1.get_doc("late", None, &Default::default()).is_err());
        drop(node);
        let _ = std::fs::remove_dir_all(dir);
    }
}
