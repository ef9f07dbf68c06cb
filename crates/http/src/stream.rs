//! Responses written as they are produced. A blocking producer (store reads, rendering) writes
//! into a `Sink` that hands 64 KiB chunks to the connection through a channel of a few chunks,
//! so one request holds at most a few chunks plus the one attachment being encoded, whatever
//! the size of the whole answer. Documents are rendered with their attachments' base64 `data`
//! streamed from the store, never built into a JSON value.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine;
use serde_json::Value;
use std::io;
use std::sync::Arc;
use thali_db::AttMeta;
use thali_db::{Database, RevisionOut};
use tokio::sync::mpsc;

const CHUNK: usize = 64 << 10;
/// Chunks in flight between the producer and the connection.
const IN_FLIGHT: usize = 4;
/// Attachment bytes encoded per base64 piece (a multiple of 3: no padding inside the stream).
const B64_PIECE: usize = 48 << 10;

/// Where a streamed answer is written; `io::ErrorKind::BrokenPipe` once the client is gone.
pub struct Sink {
    buf: Vec<u8>,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl Sink {
    pub fn write(&mut self, b: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }

    /// Writes `items` separated by commas, each by `f`.
    pub fn list<T>(
        &mut self,
        items: impl IntoIterator<Item = T>,
        mut f: impl FnMut(&mut Sink, T) -> io::Result<()>,
    ) -> io::Result<()> {
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.write(b",")?;
            }
            f(self, item)?;
        }
        Ok(())
    }

    pub fn json(&mut self, v: &impl serde::Serialize) -> io::Result<()> {
        serde_json::to_writer(&mut self.buf, v)?;
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    /// A rendered revision as JSON; attachments marked `follows` get their bytes inline as
    /// base64 `data`, encoded piece by piece from the store (CouchDB gives no `length` then).
    pub fn doc(&mut self, db: &Database, out: RevisionOut) -> io::Result<()> {
        let mut doc = out.doc;
        let Some(Value::Object(atts)) = doc.shift_remove("_attachments") else {
            return self.json(&DocJson(&doc));
        };
        let head = serde_json::to_vec(&DocJson(&doc))?;
        self.write(&head[..head.len() - 1])?;
        self.write(if doc.is_empty() {
            b"\"_attachments\":{"
        } else {
            b",\"_attachments\":{"
        })?;
        for (i, (name, mut a)) in atts.into_iter().enumerate() {
            if i > 0 {
                self.write(b",")?;
            }
            self.json(&name)?;
            self.write(b":")?;
            let inline = a.get("follows") == Some(&Value::Bool(true));
            let Some(meta) = out
                .follows
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, m)| m)
                .filter(|_| inline)
            else {
                self.json(&a)?;
                continue;
            };
            if let Some(m) = a.as_object_mut() {
                m.shift_remove("follows");
                m.shift_remove("length");
            }
            let a = serde_json::to_vec(&a)?;
            self.write(&a[..a.len() - 1])?;
            self.write(b",\"data\":\"")?;
            self.base64(db, meta)?;
            self.write(b"\"}")?;
        }
        self.write(b"}}")
    }

    /// An attachment's bytes as base64, read a stored chunk at a time; bytes that do not fill
    /// a 3-byte group wait for the next chunk, so no padding lands inside the text.
    fn base64(&mut self, db: &Database, meta: &AttMeta) -> io::Result<()> {
        let engine = &base64::engine::general_purpose::STANDARD;
        let mut carry: Vec<u8> = Vec::new();
        let mut enc = Vec::new();
        let mut encode = |sink: &mut Sink, data: &[u8]| -> io::Result<()> {
            enc.resize(data.len().div_ceil(3) * 4, 0);
            let n = engine
                .encode_slice(data, &mut enc)
                .map_err(io::Error::other)?;
            sink.write(&enc[..n])
        };
        db.attachment_range(&meta.digest, 0, meta.length, &mut |mut piece| {
            if !carry.is_empty() {
                let take = (3 - carry.len()).min(piece.len());
                carry.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                if carry.len() < 3 {
                    return Ok(());
                }
                encode(self, &carry)?;
                carry.clear();
            }
            let whole = piece.len() / 3 * 3;
            for part in piece[..whole].chunks(B64_PIECE) {
                encode(self, part)?;
            }
            carry.extend_from_slice(&piece[whole..]);
            Ok(())
        })?;
        if !carry.is_empty() {
            encode(self, &carry)?;
        }
        Ok(())
    }

    /// An attachment's raw bytes (multipart parts), a stored chunk at a time.
    pub fn attachment(&mut self, db: &Database, meta: &AttMeta) -> io::Result<()> {
        self.attachment_range(db, &meta.digest, 0, meta.length)
    }

    /// The bytes `start..end` of the attachment body `digest`.
    pub fn attachment_range(
        &mut self,
        db: &Database,
        digest: &str,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        db.attachment_range(digest, start, end, &mut |piece| self.write(piece))
    }
}

/// A response whose body `produce` writes on a blocking thread. Errors after the first byte
/// can only cut the body short (as in CouchDB); they are logged.
pub fn response(
    status: StatusCode,
    content_type: &str,
    db: Arc<Database>,
    produce: impl FnOnce(&Database, &mut Sink) -> io::Result<()> + Send + 'static,
) -> Response {
    let mut resp = Response::new(body(db, produce));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("must-revalidate"),
    );
    resp
}

/// A document's members as JSON, with `_revisions` written as CouchDB and PouchDB write it,
/// `{"start":N,"ids":[…]}`: JSON maps here are sorted, and clients compare that member's
/// text (PouchDB's live sync test #3179 compares `JSON.stringify(doc._revisions)`).
pub struct DocJson<'a>(pub &'a serde_json::Map<String, Value>);

impl serde::Serialize for DocJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            match (k.as_str(), v) {
                ("_revisions", Value::Object(r)) if r.len() == 2 => {
                    m.serialize_entry(k, &Revisions(r))?;
                }
                _ => m.serialize_entry(k, v)?,
            }
        }
        m.end()
    }
}

struct Revisions<'a>(&'a serde_json::Map<String, Value>);

impl serde::Serialize for Revisions<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("start", &self.0.get("start"))?;
        m.serialize_entry("ids", &self.0.get("ids"))?;
        m.end()
    }
}

/// A body that `produce` writes on a blocking thread. An error after the first byte ends the
/// body with an error, so the connection is cut rather than the answer looking complete.
pub fn body(
    db: Arc<Database>,
    produce: impl FnOnce(&Database, &mut Sink) -> io::Result<()> + Send + 'static,
) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(IN_FLIGHT);
    // The producer's result travels through the channel; the task's own is not needed.
    db.produce(move |db| {
        let mut sink = Sink {
            buf: Vec::with_capacity(CHUNK),
            tx,
        };
        let res = produce(db, &mut sink).and_then(|()| sink.flush());
        match res {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                tracing::debug!("client went away during a streamed answer")
            }
            Err(e) => {
                tracing::warn!(error = %e, "streamed answer cut short");
                let _ = sink.tx.blocking_send(Err(e));
            }
            Ok(()) => {}
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    Body::from_stream(stream)
}

/// Writes a JSON object member list, e.g. `{"ok":<doc>}`, around a streamed document.
pub fn wrapped_doc(sink: &mut Sink, db: &Database, key: &str, out: RevisionOut) -> io::Result<()> {
    sink.write(b"{")?;
    sink.json(&key)?;
    sink.write(b":")?;
    sink.doc(db, out)?;
    sink.write(b"}")
}
