//! The engine boundary: the little the store needs from a key-value engine. Two engines
//! implement it, fjall (the default) and sled; nothing outside `store/` names either.
//!
//! An engine holds named keyspaces (ordered byte maps). One [`Batch`] may touch several
//! keyspaces and applies atomically; a committed batch is visible at once and durable after
//! [`Engine::persist`], which covers every keyspace (one journal, so concurrent writers to any
//! database share an fsync).

mod fjall;
mod sled;

use super::{Result, StoreError};
use std::any::Any;
use std::ops::{Bound, Deref};
use std::path::Path;
use std::sync::Arc;

/// The engines a data directory can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Fjall,
    Sled,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Fjall => "fjall",
            Kind::Sled => "sled",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Kind, String> {
        match s.trim() {
            "fjall" => Ok(Kind::Fjall),
            "sled" => Ok(Kind::Sled),
            other => Err(format!("unknown storage engine {other:?} (fjall or sled)")),
        }
    }
}

/// Opens the engine of `kind` in `dir` with a block cache of `cache_bytes` for the whole node.
pub fn open(kind: Kind, dir: &Path, cache_bytes: u64) -> Result<Arc<dyn Engine>> {
    Ok(match kind {
        Kind::Fjall => Arc::new(fjall::FjallEngine::open(dir, cache_bytes)?),
        Kind::Sled => Arc::new(sled::SledEngine::open(dir, cache_bytes)?),
    })
}

pub trait Engine: Send + Sync + 'static {
    fn kind(&self) -> Kind;
    /// Opens a keyspace, creating it empty when it does not exist.
    fn keyspace(&self, name: &str) -> Result<Keyspace>;
    /// The names of every keyspace.
    fn keyspaces(&self) -> Result<Vec<String>>;
    /// Removes a keyspace and gives its space back (once no handle is in use).
    fn drop_keyspace(&self, name: &str) -> Result<()>;
    /// Applies every write of the batch, or none.
    fn commit(&self, batch: Batch) -> Result<()>;
    /// Makes every committed batch durable.
    fn persist(&self) -> Result<()>;
    /// Bytes on disk for the whole engine.
    fn disk_size(&self) -> u64;
}

/// One ordered key space of an engine.
pub trait KeyspaceOps: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>>;
    /// Entries within bounds, ascending or descending.
    fn range(&self, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>, descending: bool) -> Iter;
    /// Bytes on disk for this keyspace (an estimate where the engine shares files).
    fn disk_size(&self) -> u64;
    /// Gives back the disk space of deleted entries now, rather than whenever the engine
    /// next compacts by itself (blocking; called after uploads were thrown away).
    fn reclaim(&self) -> Result<()> {
        Ok(())
    }
    fn as_any(&self) -> &dyn Any;
}

#[derive(Clone)]
pub struct Keyspace(Arc<dyn KeyspaceOps>);

impl Deref for Keyspace {
    type Target = dyn KeyspaceOps;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Keyspace {
    /// Every entry whose key starts with `prefix`, in key order.
    pub fn prefix(&self, prefix: &[u8]) -> Iter {
        self.range(Bound::Included(prefix.to_vec()), prefix_end(prefix), false)
    }

    fn downcast<T: 'static>(&self) -> Result<&T> {
        self.0
            .as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| StoreError::Corrupt("keyspace of another engine".into()))
    }
}

/// The exclusive upper bound of the keys starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Bound<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bound::Excluded(end);
        }
    }
    Bound::Unbounded
}

/// Whether the bounds describe an empty range (engines may panic on inverted ones).
pub fn is_empty_range(lo: &Bound<Vec<u8>>, hi: &Bound<Vec<u8>>) -> bool {
    match (lo, hi) {
        (Bound::Included(a), Bound::Included(b)) => a > b,
        (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
            a >= b
        }
        _ => false,
    }
}

pub type Iter = Box<dyn Iterator<Item = Result<(Bytes, Bytes)>> + Send>;

/// A key or value read from an engine, without copying it out of the engine's buffer.
#[derive(Clone)]
pub struct Bytes(Repr);

#[derive(Clone)]
enum Repr {
    Fjall(::fjall::Slice),
    Sled(::sled::IVec),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Fjall(s) => s,
            Repr::Sled(v) => v,
        }
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

enum Op {
    Put(Vec<u8>, Vec<u8>),
    Del(Vec<u8>),
}

/// Writes to one or more keyspaces, applied atomically by [`Engine::commit`].
#[derive(Default)]
pub struct Batch {
    ops: Vec<(Keyspace, Op)>,
}

impl Batch {
    pub fn put(&mut self, ks: &Keyspace, k: Vec<u8>, v: Vec<u8>) {
        self.ops.push((ks.clone(), Op::Put(k, v)));
    }
    pub fn del(&mut self, ks: &Keyspace, k: Vec<u8>) {
        self.ops.push((ks.clone(), Op::Del(k)));
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Holds a put: a batch of deletions only (a few bytes of tombstones each) frees space.
    pub fn adds_data(&self) -> bool {
        self.ops.iter().any(|(_, op)| matches!(op, Op::Put(..)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(b"a"), Bound::Excluded(b"b".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xff]), Bound::Excluded(b"b".to_vec()));
        assert_eq!(prefix_end(&[0xff, 0xff]), Bound::Unbounded);
    }

    #[test]
    fn empty_ranges() {
        let b = |s: &[u8]| s.to_vec();
        assert!(is_empty_range(
            &Bound::Included(b(b"b")),
            &Bound::Included(b(b"a"))
        ));
        assert!(!is_empty_range(
            &Bound::Included(b(b"a")),
            &Bound::Included(b(b"a"))
        ));
        assert!(is_empty_range(
            &Bound::Included(b(b"a")),
            &Bound::Excluded(b(b"a"))
        ));
        assert!(!is_empty_range(
            &Bound::Unbounded,
            &Bound::Excluded(b(b"a"))
        ));
    }
}
