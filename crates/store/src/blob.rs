//! Attachment bodies, of any size, with bounded memory.
//!
//! Up to [`CHUNK`] bytes a body is one value under `a<digest>`, written in its document's
//! batch. A larger one is written while it streams in, [`CHUNK`] bytes per entry under
//! `c<blob id><chunk index>`, before its document; the document's batch then adds a
//! [`Manifest`] under `A<digest>` naming the blob. Chunks that no manifest names (an upload cut
//! short, a refused write, a crash in between) go at the next compaction, which copies only
//! the blobs documents reference. Readers go through [`DbStore::blob`] and
//! [`DbStore::blob_chunks`], a chunk at a time.

use super::layout::{att_key, chunk_key, manifest_key};
use super::{DbStore, Result, StoreError, WriteBatch};
use base64::Engine as _;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// Bytes per stored chunk, and the largest body stored whole.
pub const CHUNK: usize = 256 << 10;

/// Where a chunked body's chunks are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The blob id: the chunks' key prefix.
    #[serde(rename = "b")]
    pub blob: String,
    #[serde(rename = "l")]
    pub len: u64,
}

impl Manifest {
    fn chunks(&self) -> u64 {
        self.len.div_ceil(CHUNK as u64)
    }
}

/// A stored body.
#[derive(Clone, Debug, PartialEq)]
pub enum Blob {
    Whole(Vec<u8>),
    Chunked(Manifest),
}

impl Blob {
    pub fn len(&self) -> u64 {
        match self {
            Blob::Whole(b) => b.len() as u64,
            Blob::Chunked(m) => m.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A body received before its document is written: what that document's batch must add
/// (`WriteBatch::put_staged`).
#[derive(Clone)]
pub struct Staged {
    /// `md5-<base64>` of the bytes.
    pub digest: String,
    pub blob: Blob,
    /// The generation the chunks went to (kept open by this handle: a compaction in between
    /// retires it, and the chunks are then copied over, see `DbStore::adopt`).
    store: DbStore,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("digest", &self.digest)
            .field("len", &self.blob.len())
            .finish()
    }
}

impl PartialEq for Staged {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && self.blob == other.blob
    }
}

/// Receives a body piece by piece; see the module comment. Dropped unfinished, it removes
/// the chunks it wrote.
pub struct BlobWriter {
    store: DbStore,
    blob: String,
    md5: Md5,
    buf: Vec<u8>,
    len: u64,
    written: u32,
    finished: bool,
}

impl DbStore {
    /// Starts receiving an attachment body into this generation.
    pub fn blob_writer(&self) -> BlobWriter {
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
        BlobWriter {
            store: self.clone(),
            blob: hex::encode(id),
            md5: Md5::new(),
            buf: Vec::new(),
            len: 0,
            written: 0,
            finished: false,
        }
    }

    /// The body stored under `digest`, whole when small, else where its chunks are.
    pub fn blob(&self, digest: &str) -> Result<Option<Blob>> {
        if let Some(v) = self.inner.ks.get(&att_key(digest))? {
            return Ok(Some(Blob::Whole(v.to_vec())));
        }
        match self.inner.ks.get(&manifest_key(digest))? {
            Some(v) => Ok(Some(Blob::Chunked(super::decode(&v)?))),
            None => Ok(None),
        }
    }

    /// The bytes `start..end` of a chunked body, a chunk (or part of one) at a time.
    pub fn blob_chunks<'a>(
        &'a self,
        m: &'a Manifest,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = Result<Vec<u8>>> + 'a {
        let end = end.min(m.len);
        let first = start / CHUNK as u64;
        let last = if end == 0 {
            0
        } else {
            end.div_ceil(CHUNK as u64)
        };
        (first..last.min(m.chunks())).map(move |i| {
            let key = chunk_key(&m.blob, i as u32);
            let v = self.inner.ks.get(&key)?.ok_or_else(|| {
                StoreError::Corrupt(format!("chunk {i} of blob {} is missing", m.blob))
            })?;
            let at = i * CHUNK as u64;
            let from = start.saturating_sub(at) as usize;
            let to = ((end - at) as usize).min(v.len());
            if from > to {
                return Err(StoreError::Corrupt(format!(
                    "chunk {i} of blob {} is short",
                    m.blob
                )));
            }
            Ok(v[from..to].to_vec())
        })
    }

    /// A whole body in memory (small ones; large ones are read with `blob_chunks`).
    pub fn blob_bytes(&self, blob: Blob) -> Result<Vec<u8>> {
        match blob {
            Blob::Whole(b) => Ok(b),
            Blob::Chunked(m) => {
                let mut out = Vec::with_capacity(m.len as usize);
                for c in self.blob_chunks(&m, 0, m.len) {
                    out.extend_from_slice(&c?);
                }
                Ok(out)
            }
        }
    }

    /// Makes a staged body's chunks part of this generation when compaction replaced the one
    /// they were written to meanwhile: copied a chunk per batch (rare, and bounded memory).
    pub fn adopt(&self, staged: &Staged) -> Result<()> {
        let Blob::Chunked(m) = &staged.blob else {
            return Ok(());
        };
        if staged.store.inner.ks.name() == self.inner.ks.name() {
            return Ok(());
        }
        for (i, c) in staged.store.blob_chunks(m, 0, m.len).enumerate() {
            let mut b = WriteBatch::new();
            b.put(chunk_key(&m.blob, i as u32), c?);
            let _ticket = self.apply(b)?;
        }
        Ok(())
    }
}

impl BlobWriter {
    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes the next piece of the body; every full chunk goes to the store at once (not
    /// durably: the document's write flushes).
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        self.md5.update(data);
        self.len += data.len() as u64;
        while !data.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(CHUNK);
            }
            let take = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK {
                self.put_chunk()?;
            }
        }
        Ok(())
    }

    fn put_chunk(&mut self) -> Result<()> {
        let mut b = WriteBatch::new();
        b.put(
            chunk_key(&self.blob, self.written),
            std::mem::take(&mut self.buf),
        );
        self.written += 1;
        // Not durable yet: the document's write flushes the one journal these went to first.
        let _ticket = self.store.apply(b)?;
        Ok(())
    }

    /// The body is complete: its digest, and what its document's batch must add.
    pub fn finish(mut self) -> Result<Staged> {
        let md5 = std::mem::take(&mut self.md5);
        let digest = format!(
            "md5-{}",
            base64::engine::general_purpose::STANDARD.encode(md5.finalize())
        );
        let blob = if self.written == 0 {
            Blob::Whole(std::mem::take(&mut self.buf))
        } else {
            if !self.buf.is_empty() {
                self.put_chunk()?;
            }
            Blob::Chunked(Manifest {
                blob: self.blob.clone(),
                len: self.len,
            })
        };
        self.finished = true;
        Ok(Staged {
            digest,
            blob,
            store: self.store.clone(),
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.finished || self.written == 0 {
            return;
        }
        let mut b = WriteBatch::new();
        for i in 0..self.written {
            b.del(chunk_key(&self.blob, i));
        }
        match self.store.apply(b) {
            Ok(_ticket) => self.store.discarded(u64::from(self.written) * CHUNK as u64),
            Err(e) => {
                tracing::warn!(error = %e, "could not remove the chunks of an unfinished upload")
            }
        }
    }
}

/// Bytes of uploads thrown away (cut, or refused with their document) since the database's
/// space was last given back. Deleting chunks only writes tombstones: the engine frees their
/// space when it next compacts them, which for a database that is not written to may be never.
/// From `RECLAIM_AFTER` bytes on, a background compaction of the database gives it back, at
/// most once per `RECLAIM_EVERY` (so cutting uploads on purpose cannot keep the disk busy).
#[derive(Default)]
pub(super) struct Reclaim {
    pending: std::sync::atomic::AtomicU64,
    running: std::sync::atomic::AtomicBool,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

const RECLAIM_AFTER: u64 = 8 << 20;
const RECLAIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl DbStore {
    /// Counts `bytes` of thrown-away chunks, and starts giving the space back once enough.
    fn discarded(&self, bytes: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let r = &self.inner.reclaim;
        let pending = r.pending.fetch_add(bytes, SeqCst) + bytes;
        if pending < RECLAIM_AFTER || r.running.swap(true, SeqCst) {
            return;
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("thali-reclaim".into())
            .spawn(move || {
                let r = &store.inner.reclaim;
                let last = *thali_sys::sync::lock(&r.last);
                if let Some(wait) = last.and_then(|t| RECLAIM_EVERY.checked_sub(t.elapsed())) {
                    std::thread::sleep(wait);
                }
                let bytes = r.pending.swap(0, SeqCst);
                let started = std::time::Instant::now();
                match store.inner.ks.reclaim() {
                    Ok(()) => tracing::info!(db = %store.inner.name, mib = bytes >> 20,
                        ms = started.elapsed().as_millis() as u64,
                        "gave back the space of thrown-away uploads"),
                    Err(e) => tracing::warn!(db = %store.inner.name, error = %e,
                        "could not give back the space of thrown-away uploads"),
                }
                *thali_sys::sync::lock(&r.last) = Some(std::time::Instant::now());
                r.running.store(false, SeqCst);
            });
        if spawned.is_err() {
            r.running.store(false, SeqCst);
        }
    }
}

impl WriteBatch {
    /// A chunk of a chunked body (compaction copying it).
    pub fn put_chunk(&mut self, m: &Manifest, i: u32, bytes: Vec<u8>) {
        self.put(chunk_key(&m.blob, i), bytes);
    }

    /// A chunked body's manifest (compaction copying it, after its chunks).
    pub fn put_manifest(&mut self, digest: &str, m: &Manifest) {
        self.put(manifest_key(digest), super::encode(m));
    }

    /// Makes a staged body readable under its digest (with its document).
    pub fn put_staged(&mut self, s: &Staged) {
        match &s.blob {
            Blob::Whole(b) => self.put(att_key(&s.digest), b.clone()),
            Blob::Chunked(m) => self.put(manifest_key(&s.digest), super::encode(m)),
        }
    }
}

impl Staged {
    /// Removes the chunks again (the document was refused) and counts their space to give
    /// back. Best effort: orphaned chunks are dropped by the next `_compact` anyway.
    pub fn discard(&self) {
        let Blob::Chunked(m) = &self.blob else {
            return;
        };
        let mut b = WriteBatch::new();
        for i in 0..m.chunks() {
            b.del(chunk_key(&m.blob, i as u32));
        }
        match self.store.apply(b) {
            Ok(_ticket) => self.store.discarded(m.len),
            Err(e) => tracing::debug!(error = %e, "could not remove a refused upload's chunks"),
        }
    }

    /// The whole body in memory (design documents compile their modules from it).
    pub fn bytes(&self) -> Result<Vec<u8>> {
        self.store.blob_bytes(self.blob.clone())
    }

    pub fn len(&self) -> u64 {
        self.blob.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blob.is_empty()
    }
}

/// Bodies received for one document write: discarded when dropped unless the write that names
/// them went through (`keep`).
#[derive(Default)]
pub struct StagedSet(Vec<Staged>);

impl StagedSet {
    pub fn push(&mut self, s: Staged) {
        self.0.push(s);
    }

    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for StagedSet {
    fn drop(&mut self) {
        for s in &self.0 {
            s.discard();
        }
    }
}
