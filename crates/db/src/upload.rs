//! An attachment body received into the store as it arrives (an HTTP body, a multipart part,
//! a body pulled by the replicator): at most [`BATCH`] bytes in memory, its md5 computed on
//! the way, gunzipped when it came compressed, refused past the size limit. The store's writes
//! run off the async workers; a dropped or failed upload removes the chunks it wrote.

use crate::{offload, Database, DbError, DbResult};
use std::io::Write;
use thali_store::blob::{BlobWriter, Staged};

/// Bytes gathered before one trip to the blocking pool.
const BATCH: usize = 256 * 1024;

pub struct Upload {
    sink: Option<Sink>,
    pending: Vec<u8>,
    /// What the size error names ("request body", "multipart part").
    what: &'static str,
}

enum Sink {
    Plain(Limited),
    Gzip(Box<flate2::write::GzDecoder<Limited>>),
}

/// A `BlobWriter` as `io::Write` (for the gzip decoder), refusing more than `max` bytes.
struct Limited {
    w: BlobWriter,
    max: u64,
}

impl Write for Limited {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.w.len() + buf.len() as u64 > self.max {
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        self.w.write(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(b),
            Sink::Gzip(d) => d.write_all(b),
        }
    }

    fn finish(self) -> std::io::Result<Staged> {
        let limited = match self {
            Sink::Plain(w) => w,
            Sink::Gzip(d) => d.finish()?,
        };
        limited.w.finish().map_err(std::io::Error::other)
    }
}

impl Database {
    /// Starts receiving an attachment body; `gzip` when it arrives gzip-compressed (it is
    /// stored decompressed). `what` names the body in a size error.
    pub fn upload(&self, gzip: bool, what: &'static str) -> DbResult<Upload> {
        self.check_alive()?;
        let limited = Limited {
            w: self.data().blob_writer(),
            max: self.max_attachment_size(),
        };
        let sink = if gzip {
            Sink::Gzip(Box::new(flate2::write::GzDecoder::new(limited)))
        } else {
            Sink::Plain(limited)
        };
        Ok(Upload {
            sink: Some(sink),
            pending: Vec::new(),
            what,
        })
    }
}

impl Upload {
    /// Takes the next piece of the body.
    pub async fn write(&mut self, piece: &[u8]) -> DbResult<()> {
        self.pending.extend_from_slice(piece);
        if self.pending.len() >= BATCH {
            self.drain().await?;
        }
        Ok(())
    }

    /// Writes what is pending and seals the body.
    pub async fn finish(mut self) -> DbResult<Staged> {
        self.drain().await?;
        let sink = self.sink.take().ok_or_else(broken)?;
        let what = self.what;
        offload::long(move || sink.finish())
            .await?
            .map_err(|e| io_err(e, what))
    }

    async fn drain(&mut self) -> DbResult<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut sink = self.sink.take().ok_or_else(broken)?;
        let data = std::mem::take(&mut self.pending);
        let (sink, res) = offload::long(move || {
            let res = sink.write_all(&data);
            (sink, res)
        })
        .await?;
        self.sink = Some(sink);
        res.map_err(|e| io_err(e, self.what))
    }
}

/// An earlier write failed or was cut (its sink went with it).
fn broken() -> DbError {
    DbError::Internal("attachment upload used after a failure".into())
}

fn io_err(e: std::io::Error, what: &str) -> DbError {
    if e.get_ref()
        .is_some_and(|r| r.is::<thali_store::StoreError>())
    {
        if let Some(Ok(store)) = e
            .into_inner()
            .map(|r| r.downcast::<thali_store::StoreError>())
        {
            return DbError::from(*store);
        }
        return DbError::Internal("store error".into());
    }
    match e.kind() {
        std::io::ErrorKind::FileTooLarge => DbError::AttTooLarge(what.into()),
        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
            DbError::BadRequest(format!("an attachment part is not valid gzip: {e}"))
        }
        _ => DbError::Internal(e.to_string()),
    }
}
