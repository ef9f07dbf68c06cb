//! fjall: one LSM database per node (one journal, one block cache), a keyspace per store
//! keyspace.

use super::{is_empty_range, Batch, Bytes, Engine, Iter, Keyspace, KeyspaceOps, Kind, Op, Repr};
use crate::store::{Result, StoreError};
use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use std::any::Any;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

impl From<fjall::Error> for StoreError {
    fn from(e: fjall::Error) -> StoreError {
        StoreError::Engine(e.to_string())
    }
}

pub struct FjallEngine {
    db: Database,
}

struct FjallKeyspace {
    name: String,
    ks: fjall::Keyspace,
}

/// Each keyspace buffers at most this much before flushing a table: the default (64 MiB) times
/// every database and index would not fit a phone.
const MEMTABLE: u64 = 8 << 20;

/// Values from this size on (attachment chunks, large documents) go to blob files beside the
/// tables: flushes and compactions then move a pointer instead of copying the bytes through
/// memory again and again. Ingesting a 1 GiB attachment peaked at ~150–170 MB above idle
/// without it, ~70 MB with it. fjall records the option per keyspace when it creates one;
/// keyspaces of older data directories keep theirs.
const SEPARATE_FROM: u32 = 16 << 10;

fn options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .max_memtable_size(MEMTABLE)
        .with_kv_separation(Some(
            fjall::KvSeparationOptions::default().separation_threshold(SEPARATE_FROM),
        ))
}

impl FjallEngine {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<FjallEngine> {
        #[allow(deprecated)] // the node-wide write buffer bound is marked "todo" upstream
        let db = Database::builder(dir)
            .cache_size(cache_bytes)
            .max_journaling_size(64 << 20)
            .max_write_buffer_size(Some(64 << 20))
            // With two or more workers, fjall 3.1's worker 0 hands every compaction request
            // back to the queue and takes it again at once, spinning a core for as long as
            // another worker compacts (worker_pool.rs, `Compact` arm): a fifth of the CPU of a
            // bulk load on two cores. One worker flushes and compacts in turn, without spinning.
            .worker_threads(1)
            .open()?;
        Ok(FjallEngine { db })
    }
}

impl Engine for FjallEngine {
    fn kind(&self) -> Kind {
        Kind::Fjall
    }

    fn keyspace(&self, name: &str) -> Result<Keyspace> {
        if name.is_empty() || name.len() > 255 {
            return Err(StoreError::Corrupt(format!("keyspace name {name:?}")));
        }
        let ks = self.db.keyspace(name, options)?;
        Ok(Keyspace(Arc::new(FjallKeyspace {
            name: name.to_string(),
            ks,
        })))
    }

    fn keyspaces(&self) -> Result<Vec<String>> {
        Ok(self
            .db
            .list_keyspace_names()
            .iter()
            .map(|n| n.to_string())
            .collect())
    }

    fn drop_keyspace(&self, name: &str) -> Result<()> {
        if self.db.keyspace_exists(name) {
            let ks = self.db.keyspace(name, options)?;
            self.db.delete_keyspace(ks)?;
        }
        Ok(())
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut b = self.db.batch();
        for (ks, op) in batch.ops {
            let ks = &ks.downcast::<FjallKeyspace>()?.ks;
            match op {
                Op::Put(k, v) => b.insert(ks, k, v),
                Op::Del(k) => b.remove(ks, k),
            }
        }
        b.commit()?;
        Ok(())
    }

    fn persist(&self) -> Result<()> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    fn disk_size(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }
}

impl KeyspaceOps for FjallKeyspace {
    fn name(&self) -> &str {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.ks.get(key)?.map(|v| Bytes(Repr::Fjall(v))))
    }

    fn range(&self, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>, descending: bool) -> Iter {
        if is_empty_range(&lo, &hi) {
            return Box::new(std::iter::empty());
        }
        let it = self.ks.range::<Vec<u8>, _>((lo, hi));
        let kv = |g: fjall::Guard| -> Result<(Bytes, Bytes)> {
            let (k, v) = g.into_inner()?;
            Ok((Bytes(Repr::Fjall(k)), Bytes(Repr::Fjall(v))))
        };
        if descending {
            Box::new(it.rev().map(kv))
        } else {
            Box::new(it.map(kv))
        }
    }

    /// Tables on disk plus what the memtable holds (journaled, not yet in a table).
    fn disk_size(&self) -> u64 {
        use fjall::AbstractTree;
        self.ks.disk_space() + self.ks.tree.active_memtable().size()
    }

    /// A major compaction: the deleted chunks' tombstones meet their values, and blob files
    /// left without live values are removed (fjall's blob garbage collection runs in it).
    fn reclaim(&self) -> Result<()> {
        self.ks.rotate_memtable_and_wait()?;
        self.ks.major_compact()?;
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
