//! sled: one instance per node, a tree per store keyspace. Kept selectable for data
//! directories created with it; fjall is the default.

use super::{is_empty_range, Batch, Bytes, Engine, Iter, Keyspace, KeyspaceOps, Kind, Op, Repr};
use crate::{Result, StoreError};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::any::Any;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        StoreError::Engine(e.to_string())
    }
}

pub struct SledEngine {
    db: sled::Db,
}

struct SledKeyspace {
    name: String,
    tree: sled::Tree,
    db: sled::Db,
}

impl SledEngine {
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<SledEngine> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // Durability comes from explicit flushes (group commit); no background flusher.
            .flush_every_ms(None)
            .open()?;
        Ok(SledEngine { db })
    }
}

/// sled names its own default tree so; it is never a store keyspace.
const DEFAULT_TREE: &[u8] = b"__sled__default";

impl Engine for SledEngine {
    fn kind(&self) -> Kind {
        Kind::Sled
    }

    fn keyspace(&self, name: &str) -> Result<Keyspace> {
        let tree = self.db.open_tree(name)?;
        Ok(Keyspace(Arc::new(SledKeyspace {
            name: name.to_string(),
            tree,
            db: self.db.clone(),
        })))
    }

    fn keyspaces(&self) -> Result<Vec<String>> {
        Ok(self
            .db
            .tree_names()
            .into_iter()
            .filter(|n| &n[..] != DEFAULT_TREE)
            .filter_map(|n| String::from_utf8(n.to_vec()).ok())
            .collect())
    }

    fn drop_keyspace(&self, name: &str) -> Result<()> {
        self.db.drop_tree(name)?;
        Ok(())
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        let mut trees: Vec<sled::Tree> = Vec::new();
        let mut per_tree: Vec<sled::Batch> = Vec::new();
        for (ks, op) in batch.ops {
            let tree = &ks.downcast::<SledKeyspace>()?.tree;
            let i = match trees.iter().position(|t| t.name() == tree.name()) {
                Some(i) => i,
                None => {
                    trees.push(tree.clone());
                    per_tree.push(sled::Batch::default());
                    trees.len() - 1
                }
            };
            match op {
                Op::Put(k, v) => per_tree[i].insert(k, v),
                Op::Del(k) => per_tree[i].remove(k),
            }
        }
        match trees.len() {
            0 => Ok(()),
            1 => Ok(trees[0].apply_batch(per_tree.pop().unwrap_or_default())?),
            _ => {
                // Atomic across trees only inside a transaction.
                let res: std::result::Result<(), TransactionError<()>> =
                    trees.as_slice().transaction(|txs| {
                        for (tx, b) in txs.iter().zip(&per_tree) {
                            tx.apply_batch(b)?;
                        }
                        Ok::<_, ConflictableTransactionError<()>>(())
                    });
                res.map_err(|e| StoreError::Engine(format!("{e:?}")))
            }
        }
    }

    fn persist(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn disk_size(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

impl KeyspaceOps for SledKeyspace {
    fn name(&self) -> &str {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.tree.get(key)?.map(|v| Bytes(Repr::Sled(v))))
    }

    fn range(&self, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>, descending: bool) -> Iter {
        if is_empty_range(&lo, &hi) {
            return Box::new(std::iter::empty());
        }
        let it = self.tree.range((lo, hi));
        let kv = |r: sled::Result<(sled::IVec, sled::IVec)>| -> Result<(Bytes, Bytes)> {
            let (k, v) = r?;
            Ok((Bytes(Repr::Sled(k)), Bytes(Repr::Sled(v))))
        };
        if descending {
            Box::new(it.rev().map(kv))
        } else {
            Box::new(it.map(kv))
        }
    }

    /// sled keeps every tree in one file: the node's whole size is the only figure it has.
    fn disk_size(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
