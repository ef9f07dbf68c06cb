//! Responses written as they are produced. A blocking producer (store reads, rendering) writes
//! into a `Sink` that hands 64 KiB chunks to the connection through a channel of a few chunks,
//! so one request holds at most a few chunks plus the one attachment being encoded, whatever
//! the size of the whole answer. Documents are rendered with their attachments' base64 `data`
//! streamed from the store, never built into a JSON value.

use crate::db::{Database, RevisionOut};
use crate::store::AttMeta;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine;
use serde_json::Value;
use std::io;
use std::sync::Arc;
use tokio::sync::mpsc;

const CHUNK: usize = 64 << 10;
/// Chunks in flight between the producer and the connection.
const IN_FLIGHT: usize = 4;
/// Attachment bytes encoded per base64 piece (a multiple of 3: no padding inside the stream).
const B64_PIECE: usize = 48 << 10;

/// Where a streamed answer is written; `io::ErrorKind::BrokenPipe` once the client is gone.
pub struct Sink {
    buf: Vec<u8>,
    tx: mpsc::Sender<Bytes>,
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
            .blocking_send(chunk)
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
        let Some(Value::Object(atts)) = doc.remove("_attachments") else {
            return self.json(&doc);
        };
        let head = serde_json::to_vec(&doc)?;
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
                m.remove("follows");
                m.remove("length");
            }
            let a = serde_json::to_vec(&a)?;
            self.write(&a[..a.len() - 1])?;
            self.write(b",\"data\":\"")?;
            self.base64(db, meta)?;
            self.write(b"\"}")?;
        }
        self.write(b"}}")
    }

    fn base64(&mut self, db: &Database, meta: &AttMeta) -> io::Result<()> {
        let data = db
            .attachment_bytes(&meta.digest)
            .map_err(io::Error::other)?;
        let engine = &base64::engine::general_purpose::STANDARD;
        for piece in data.chunks(B64_PIECE) {
            let mut enc = Vec::with_capacity(piece.len() / 3 * 4 + 4);
            enc.resize(piece.len().div_ceil(3) * 4, 0);
            let n = engine
                .encode_slice(piece, &mut enc)
                .map_err(io::Error::other)?;
            self.write(&enc[..n])?;
        }
        Ok(())
    }

    /// An attachment's raw bytes (multipart parts).
    pub fn attachment(&mut self, db: &Database, meta: &AttMeta) -> io::Result<()> {
        let data = db
            .attachment_bytes(&meta.digest)
            .map_err(io::Error::other)?;
        for piece in data.chunks(CHUNK) {
            self.write(piece)?;
        }
        Ok(())
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
    let (tx, rx) = mpsc::channel::<Bytes>(IN_FLIGHT);
    // The producer's result travels through the channel; the task's own is not needed.
    let _task = crate::store::gateway::spawn(move || {
        let mut sink = Sink {
            buf: Vec::with_capacity(CHUNK),
            tx,
        };
        let res = produce(&db, &mut sink).and_then(|()| sink.flush());
        match res {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                tracing::debug!("client went away during a streamed answer")
            }
            Err(e) => tracing::warn!(error = %e, "streamed answer cut short"),
            Ok(()) => {}
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, io::Error>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(body));
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

/// Writes a JSON object member list, e.g. `{"ok":<doc>}`, around a streamed document.
pub fn wrapped_doc(sink: &mut Sink, db: &Database, key: &str, out: RevisionOut) -> io::Result<()> {
    sink.write(b"{")?;
    sink.json(&key)?;
    sink.write(b":")?;
    sink.doc(db, out)?;
    sink.write(b"}")
}
