//! fjall: one LSM database per node (one journal, one block cache), a keyspace per store
//! keyspace.

use super::{is_empty_range, Batch, Bytes, Engine, Iter, Keyspace, KeyspaceOps, Kind, Op, Repr};
use crate::{Result, StoreError};
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
    /// For `reclaim`, which waits for the background compactions to finish first.
    db: Database,
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

/// A key above every key a layout writes (they start with an ASCII kind letter).
const RECLAIM_MARKER: &[u8] = b"\xff\xffthali-reclaim";

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
            db: self.db.clone(),
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

impl FjallKeyspace {
    /// A major compaction, once no background compaction holds tables (fjall's major
    /// compaction does nothing then); waits at most 10 s for them.
    fn major_compact_when_idle(&self) -> Result<()> {
        for _ in 0..500 {
            if self.db.active_compactions() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.ks.major_compact()?;
        Ok(())
    }

    /// Writes and removes a marker (a tombstone under a key no layout uses) and rotates the
    /// memtable: a flush, a new version, and fjall's maintenance, whatever else was written.
    fn rotate_marker(&self) -> Result<()> {
        self.ks.insert(RECLAIM_MARKER, [])?;
        self.ks.remove(RECLAIM_MARKER)?;
        self.ks.rotate_memtable_and_wait()?;
        Ok(())
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

    /// Gives back the space of deleted values now (fjall 3.1 would only do it as compactions
    /// come by). Its steps follow how fjall frees blob files: a compaction that drops values
    /// marks their blob files dead in the version it makes; the next compaction's commit drops
    /// dead blob files from the version; the files of replaced versions are deleted by the
    /// maintenance that runs when a memtable is rotated, once a newer version followed.
    /// A background compaction starting at the wrong moment makes a major compaction skip,
    /// and a compaction rewrites only the older quarter of the blob files that are partly
    /// dead, so rounds repeat (at most 8) while the last one still gave space back.
    fn reclaim(&self) -> Result<()> {
        self.ks.rotate_memtable_and_wait()?;
        let mut size = self.ks.disk_space();
        for round in 0..8 {
            self.major_compact_when_idle()?;
            // A table for the second compaction to work on, then that compaction.
            self.rotate_marker()?;
            self.major_compact_when_idle()?;
            self.rotate_marker()?;
            self.rotate_marker()?;
            let now = self.ks.disk_space();
            if self.ks.blob_file_count() == 0 || (round > 0 && now + (1 << 20) > size) {
                break;
            }
            size = now;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod reclaim_tests {
    use super::*;
    use crate::engine::Engine;

    fn dir_bytes(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }

    /// 48 MiB of incompressible 256 KiB values (blob files) deleted, as a cut upload's chunks
    /// are, and 4 MiB written after them kept: `reclaim` deletes the dead blob files, and the
    /// kept values read back. (Blob files only partly dead are left to fjall's own garbage
    /// collection, which rewrites them once a quarter is dead.)
    #[test]
    fn reclaim_gives_deleted_blobs_space_back_and_keeps_the_rest() {
        let dir = std::env::temp_dir().join(format!("thali-reclaim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = FjallEngine::open(&dir, 8 << 20).unwrap();
        let ks = e.keyspace("k").unwrap();
        let mut x = 1u64;
        let mut value = || {
            let mut v = vec![0u8; 256 << 10];
            for b in v.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            v
        };
        let mut kept = Vec::new();
        for i in 0..208u32 {
            let v = value();
            if i >= 192 {
                kept.push((i, v.clone()));
            }
            let mut b = Batch::default();
            b.put(&ks, i.to_be_bytes().to_vec(), v);
            e.commit(b).unwrap();
        }
        e.persist().unwrap();
        let full = dir_bytes(&dir);
        let mut b = Batch::default();
        for i in (0..208u32).filter(|i| *i < 192) {
            b.del(&ks, i.to_be_bytes().to_vec());
        }
        e.commit(b).unwrap();
        e.persist().unwrap();
        ks.reclaim().unwrap();
        let after = dir_bytes(&dir);
        assert!(
            after + (40 << 20) < full,
            "{} MiB before, {} MiB after reclaim",
            full >> 20,
            after >> 20
        );
        for (i, v) in kept {
            assert_eq!(ks.get(&i.to_be_bytes()).unwrap().as_deref(), Some(&v[..]));
        }
        assert_eq!(
            ks.range(Bound::Unbounded, Bound::Unbounded, false).count(),
            16
        );
        drop(ks);
        drop(e);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
