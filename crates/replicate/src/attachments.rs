//! Attachments the target lacks. Small ones travel inline in the `_bulk_docs` batch; a
//! document with larger ones travels alone, as CouchDB's replicator sends it: a
//! `multipart/related` `PUT ?new_edits=false` whose attachment parts are streamed from the
//! source while they are read (a piece at a time in memory), each body's md5 checked on the
//! way. A transfer cut anywhere stores nothing and is tried again from the start.

use super::client::{encode_id, encode_query, Download, Remote, ReqBody, IDLE_TIMEOUT};
use super::error::{ReplError, ReplResult};
use base64::Engine;
use bytes::Bytes;
use hyper::body::Frame;
use hyper::http::Method;
use md5::{Digest, Md5};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use thali_db::{Caller, Database, DbError};
use thali_doc::parse::{parse_doc, AttInput, StagedBody};

/// Lacking attachments up to this many bytes in all go inline in the batch.
pub const INLINE_MAX: u64 = 64 << 10;
/// How often a document's transfer is tried before the batch fails (and the job backs off).
const ATTEMPTS: u32 = 3;
/// Bytes read from a local source per piece (one stored chunk).
const PIECE: u64 = 256 << 10;

/// An attachment of a fetched revision that the target lacks.
#[derive(Clone, Debug)]
pub struct Needed {
    pub name: String,
    pub digest: String,
    pub length: u64,
}

/// The attachments of `doc` (fetched with stubs and `_revisions`) added after the newest of
/// `since` (the target's possible ancestors) on this revision's path: CouchDB's `atts_since`.
pub fn needed(doc: &Value, since: &[String]) -> Vec<Needed> {
    let Some(atts) = doc.get("_attachments").and_then(Value::as_object) else {
        return Vec::new();
    };
    let known = known_pos(doc, since);
    atts.iter()
        .filter(|(_, a)| a.get("stub") == Some(&json!(true)))
        .filter(|(_, a)| {
            a.get("revpos")
                .and_then(Value::as_u64)
                .is_none_or(|p| p > known)
        })
        .map(|(name, a)| Needed {
            name: name.clone(),
            digest: a["digest"].as_str().unwrap_or("").to_string(),
            length: a["length"].as_u64().unwrap_or(0),
        })
        .collect()
}

/// The position of the newest revision of `since` on `doc`'s `_revisions` path, 0 for none.
fn known_pos(doc: &Value, since: &[String]) -> u64 {
    let Some(start) = doc.pointer("/_revisions/start").and_then(Value::as_u64) else {
        return 0;
    };
    let ids = doc
        .pointer("/_revisions/ids")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    since
        .iter()
        .filter_map(|r| {
            let (pos, id) = r.split_once('-')?;
            let pos: u64 = pos.parse().ok()?;
            let i = start.checked_sub(pos)? as usize;
            (ids.get(i)?.as_str()? == id).then_some(pos)
        })
        .max()
        .unwrap_or(0)
}

/// A streamed `GET` from a remote source; any answer but 200 is a transient failure of `what`.
async fn download_ok(remote: &Remote, rel: &str, accept: &str, what: &str) -> ReplResult<Download> {
    let d = remote.download(rel, accept).await?;
    if d.status != 200 {
        let r = d.into_response().await;
        return Err(ReplError::Transient(format!(
            "{}: {what}: {}",
            remote.display(),
            r.describe()
        )));
    }
    Ok(d)
}

/// A streamed answer as the byte stream `multipart::Reader` reads.
type PartStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, String>> + Send>>;

fn part_stream(d: Download) -> PartStream {
    Box::pin(futures_util::stream::unfold(Some(d), |d| async move {
        let mut d = d?;
        match d.piece().await {
            Ok(Some(b)) => Some((Ok(b), Some(d))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    }))
}

enum Source<'a> {
    Local {
        db: Arc<Database>,
        digests: Vec<(String, u64)>,
        pos: u64,
    },
    Remote {
        remote: &'a Remote,
        doc_path: String,
        rev: String,
        /// The source's `multipart/related` answer (the document, then attachment parts), as
        /// CouchDB's replicator pulls it; `None` once read, or for peers that answer JSON.
        parts: Option<thali_multipart::Reader<PartStream>>,
        /// Whether the open attachment comes from `parts` (else from `body`).
        in_parts: bool,
        /// A single attachment `GET`: for attachments the multipart answer did not carry.
        body: Option<Download>,
    },
}

/// The bodies of a revision's lacking attachments, read from the source: `next` opens the next
/// one (in the order the source sends them) and says which it is, `piece` reads it.
pub struct Bodies<'a> {
    src: Source<'a>,
    names: Vec<String>,
    opened: Vec<bool>,
}

impl<'a> Bodies<'a> {
    pub fn local(db: Arc<Database>, atts: &[Needed]) -> Self {
        Bodies {
            src: Source::Local {
                db,
                digests: atts.iter().map(|n| (n.digest.clone(), n.length)).collect(),
                pos: 0,
            },
            names: atts.iter().map(|n| n.name.clone()).collect(),
            opened: vec![false; atts.len()],
        }
    }

    /// A remote source's bodies from one `GET` of the revision with
    /// `attachments=true&atts_since=…` asking for `multipart/related`. A peer that answers
    /// otherwise (pouchdb-server: JSON) gets `Ok(None)`, unread; then `remote_each`.
    pub async fn remote(
        remote: &'a Remote,
        id: &str,
        rev: &str,
        since: &[String],
        atts: &[Needed],
    ) -> ReplResult<Option<Self>> {
        let doc_path = encode_id(id);
        let mut rel = format!(
            "/{doc_path}?rev={}&revs=true&attachments=true",
            encode_query(rev)
        );
        if !since.is_empty() {
            rel.push_str(&format!(
                "&atts_since={}",
                encode_query(&json!(since).to_string())
            ));
        }
        let what = format!("{doc_path} with attachments");
        let d = download_ok(remote, &rel, "multipart/related", &what).await?;
        let boundary = d
            .content_type
            .to_ascii_lowercase()
            .starts_with("multipart/related")
            .then(|| thali_multipart::boundary(&d.content_type))
            .flatten();
        // Dropping the answer unread closes its connection: a JSON answer is not downloaded.
        let Some(boundary) = boundary else {
            return Ok(None);
        };
        let mut reader = thali_multipart::Reader::new(part_stream(d), &boundary);
        // The document part comes first; its JSON is the one we already have.
        match reader.next_part().await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(ReplError::Transient("an empty multipart answer".into())),
            Err(e) => return Err(ReplError::Transient(format!("{}: {e}", remote.display()))),
        }
        let mut b = Self::remote_each(remote, id, rev, atts);
        if let Source::Remote { parts, .. } = &mut b.src {
            *parts = Some(reader);
        }
        Ok(Some(b))
    }

    /// A remote source's bodies, one streamed attachment `GET` each.
    pub fn remote_each(remote: &'a Remote, id: &str, rev: &str, atts: &[Needed]) -> Self {
        Bodies {
            src: Source::Remote {
                remote,
                doc_path: encode_id(id),
                rev: rev.to_string(),
                parts: None,
                in_parts: false,
                body: None,
            },
            names: atts.iter().map(|n| n.name.clone()).collect(),
            opened: vec![false; atts.len()],
        }
    }

    /// Opens the next attachment and returns its index in the list the bodies were made for;
    /// `None` once every one was opened.
    async fn next(&mut self) -> ReplResult<Option<usize>> {
        if let Source::Remote {
            remote,
            parts,
            in_parts,
            ..
        } = &mut self.src
        {
            while let Some(reader) = parts.as_mut() {
                let head = reader.next_part().await.map_err(|e| {
                    ReplError::Transient(format!("{}: multipart answer: {e}", remote.display()))
                })?;
                let Some(head) = head else {
                    *parts = None;
                    break;
                };
                // Parts of attachments the target has, or of ones already read, are skipped.
                let Some(i) = head
                    .filename()
                    .and_then(|f| self.names.iter().position(|n| *n == f))
                    .filter(|i| !self.opened[*i])
                else {
                    continue;
                };
                self.opened[i] = true;
                *in_parts = true;
                return Ok(Some(i));
            }
        }
        let Some(i) = self.opened.iter().position(|o| !o) else {
            return Ok(None);
        };
        self.opened[i] = true;
        match &mut self.src {
            Source::Local { pos, .. } => *pos = 0,
            Source::Remote {
                remote,
                doc_path,
                rev,
                in_parts,
                body,
                ..
            } => {
                *in_parts = false;
                let rel = format!(
                    "/{doc_path}/{}?rev={}",
                    encode_query(&self.names[i]),
                    encode_query(rev)
                );
                let what = format!("attachment {} of {doc_path}", self.names[i]);
                *body = Some(download_ok(remote, &rel, "*/*", &what).await?);
            }
        }
        Ok(Some(i))
    }

    /// The next piece of the open attachment `i`; `None` at its end.
    async fn piece(&mut self, i: usize) -> ReplResult<Option<Bytes>> {
        match &mut self.src {
            Source::Local { db, digests, pos } => {
                let (digest, len) = &digests[i];
                if *pos >= *len {
                    return Ok(None);
                }
                let end = (*pos + PIECE).min(*len);
                let out = db.attachment_piece(digest, *pos, end).await.map_err(|e| {
                    ReplError::Transient(format!("reading attachment {digest}: {e}"))
                })?;
                if out.is_empty() {
                    return Err(ReplError::Transient(format!(
                        "attachment {digest} is shorter than its length"
                    )));
                }
                *pos += out.len() as u64;
                Ok(Some(out.into()))
            }
            Source::Remote {
                remote,
                doc_path,
                parts,
                in_parts,
                body,
                ..
            } => {
                let got = match (*in_parts, parts.as_mut(), body.as_mut()) {
                    (true, Some(r), _) => r.piece().await.map_err(|e| e.to_string()),
                    (false, _, Some(b)) => b.piece().await,
                    _ => Ok(None),
                };
                got.map_err(|e| {
                    ReplError::Transient(format!(
                        "{}: attachment of {doc_path}: {e}",
                        remote.display()
                    ))
                })
            }
        }
    }
}

/// md5 and length of a body as it passes, checked against what the source's stub said.
struct Check {
    md5: Md5,
    len: u64,
}

impl Check {
    fn new() -> Self {
        Check {
            md5: Md5::new(),
            len: 0,
        }
    }

    fn update(&mut self, b: &[u8]) {
        self.md5.update(b);
        self.len += b.len() as u64;
    }

    fn verify(self, n: &Needed) -> ReplResult<()> {
        let digest = format!(
            "md5-{}",
            base64::engine::general_purpose::STANDARD.encode(self.md5.finalize())
        );
        if self.len != n.length || (n.digest.starts_with("md5-") && digest != n.digest) {
            return Err(ReplError::Transient(format!(
                "attachment {} arrived as {} bytes with {digest}, the source said {} bytes with {}",
                n.name, self.len, n.length, n.digest
            )));
        }
        Ok(())
    }
}

/// A write failure of one document, as `_bulk_docs` reports it.
fn failure(doc: &Value, error: &str, reason: String) -> Value {
    json!({"id": doc["_id"], "rev": doc["_rev"], "error": error, "reason": reason})
}

/// Writes `doc` with its lacking attachments into a local database, each body received into
/// the store as it is read. `Ok(Some(row))`: the database refused the document.
pub async fn write_local(
    db: &Arc<Database>,
    doc: Value,
    atts: &[Needed],
    mut bodies: Bodies<'_>,
) -> ReplResult<Option<Value>> {
    let ctx = Caller::node(db.name());
    let mut incoming = match parse_doc(doc.clone()) {
        Ok(d) => d,
        Err(e) => {
            let e = DbError::from(e);
            return Ok(Some(failure(&doc, e.name(), e.reason())));
        }
    };
    let mut received = thali_db::StagedSet::default();
    let db_err = |e: DbError| ReplError::Transient(e.to_string());
    while let Some(i) = bodies.next().await? {
        let n = &atts[i];
        let mut w = db.upload(false, "attachment").map_err(db_err)?;
        let mut check = Check::new();
        while let Some(p) = bodies.piece(i).await? {
            check.update(&p);
            w.write(&p).await.map_err(db_err)?;
        }
        check.verify(n)?;
        let staged = w.finish().await.map_err(db_err)?;
        received.push(staged.clone());
        if let Some(a) = incoming.atts.get_mut(&n.name) {
            a.input = AttInput::Staged(StagedBody(Arc::new(staged)));
        }
    }
    let mut res = match db.write_docs(vec![Ok(incoming)], false, &ctx).await {
        Ok(r) => r,
        Err(DbError::Internal(e)) => {
            received.keep();
            return Err(ReplError::Transient(e));
        }
        Err(e) => return Err(ReplError::Transient(e.to_string())),
    };
    match res.pop() {
        Some(Ok(_)) => {
            received.keep();
            Ok(None)
        }
        Some(Err((_, _, DbError::Internal(e)))) => {
            received.keep();
            Err(ReplError::Transient(e))
        }
        Some(Err((_, _, e))) => Ok(Some(failure(&doc, e.name(), e.reason()))),
        None => Err(ReplError::Transient("no write result".into())),
    }
}

/// `PUT /db/id?new_edits=false` as `multipart/related` to a remote target, the attachment
/// parts streamed from `bodies`. A body that arrives other than the source described aborts
/// the request, so the target stores nothing of it.
pub async fn write_remote(
    remote: &Remote,
    mut doc: Value,
    atts: &[Needed],
    mut bodies: Bodies<'_>,
) -> ReplResult<Option<Value>> {
    use thali_multipart::PART_END;
    mark_follows(&mut doc, atts);
    let Framing {
        boundary,
        json_head,
        json,
        heads,
        close,
        len,
    } = Framing::new(&doc, atts)?;

    type Item = Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>;
    let (tx, rx) = tokio::sync::mpsc::channel::<Item>(4);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let body: ReqBody = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream));
    let ctype = format!("multipart/related; boundary=\"{boundary}\"");
    let id = doc["_id"].as_str().unwrap_or("").to_string();
    let rel = format!("/{}?new_edits=false", encode_id(&id));

    // Hands a piece to the request; `false` once the request stopped taking them.
    async fn put(tx: &tokio::sync::mpsc::Sender<Item>, b: Bytes) -> ReplResult<bool> {
        match tokio::time::timeout(IDLE_TIMEOUT, tx.send(Ok(Frame::data(b)))).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(_)) => Ok(false),
            Err(_) => Err(ReplError::Transient(format!(
                "the target took no data for {}s",
                IDLE_TIMEOUT.as_secs()
            ))),
        }
    }
    let produce = async move {
        let r: ReplResult<()> = async {
            let tx = &tx;
            let head = [json_head.as_bytes(), &json, PART_END.as_bytes()].concat();
            if !put(tx, head.into()).await? {
                return Ok(());
            }
            while let Some(i) = bodies.next().await? {
                let n = &atts[i];
                if !put(tx, Bytes::from(heads[i].clone())).await? {
                    return Ok(());
                }
                let mut check = Check::new();
                while let Some(p) = bodies.piece(i).await? {
                    check.update(&p);
                    if check.len > n.length {
                        break;
                    }
                    if !put(tx, p).await? {
                        return Ok(());
                    }
                }
                check.verify(n)?;
                if !put(tx, Bytes::from_static(PART_END.as_bytes())).await? {
                    return Ok(());
                }
            }
            put(tx, Bytes::from(close.clone())).await.map(|_| ())
        }
        .await;
        if r.is_err() {
            // The request must not end as a complete body: abort it.
            let _ = tx.try_send(Err("the source failed mid-attachment".into()));
        }
        r
    };
    let send = remote.send_streamed(Method::PUT, &rel, &ctype, len, body);
    tokio::pin!(produce, send);
    let mut produced: Option<ReplResult<()>> = None;
    let resp = loop {
        tokio::select! {
            r = &mut send => break r,
            p = &mut produce, if produced.is_none() => produced = Some(p),
        }
    };
    // A failure reading the source is the real cause of a cut request.
    if let Some(Err(e)) = produced {
        return Err(e);
    }
    put_outcome(remote, &doc, &id, resp?)
}

/// What the target's answer to a document PUT means: written, refused (a failure for the
/// replication's report), or worth retrying.
fn put_outcome(
    remote: &Remote,
    doc: &Value,
    id: &str,
    r: super::client::Response,
) -> ReplResult<Option<Value>> {
    match r.status {
        200..=299 => Ok(None),
        400 | 401 | 403 | 409 | 412 | 413 | 415 => {
            let v = serde_json::from_slice::<Value>(&r.body).unwrap_or_default();
            Ok(Some(failure(
                doc,
                v["error"].as_str().unwrap_or("forbidden"),
                r.describe(),
            )))
        }
        _ => Err(ReplError::Transient(format!(
            "{}: PUT {id}: {}",
            remote.display(),
            r.describe()
        ))),
    }
}

/// Turns the stubs of the attachments being sent into `follows` entries.
fn mark_follows(doc: &mut Value, atts: &[Needed]) {
    for n in atts {
        if let Some(a) = doc
            .get_mut("_attachments")
            .and_then(|a| a.get_mut(&n.name))
            .and_then(Value::as_object_mut)
        {
            a.shift_remove("stub");
            a.insert("follows".into(), json!(true));
            a.insert("length".into(), json!(n.length));
        }
    }
}

/// The fixed parts of a multipart/related document PUT, and its whole length (sent as
/// `Content-Length`, so the target can refuse an oversize body before it arrives).
struct Framing {
    boundary: String,
    json_head: String,
    json: Vec<u8>,
    /// One head per attachment, in `atts` order.
    heads: Vec<String>,
    close: String,
    len: u64,
}

impl Framing {
    fn new(doc: &Value, atts: &[Needed]) -> ReplResult<Framing> {
        use thali_multipart::{closing, part_head, PART_END};
        let boundary = thali_db::random_hex(16);
        let json = serde_json::to_vec(doc).map_err(|e| ReplError::Transient(e.to_string()))?;
        let json_head = part_head(&boundary, &[("Content-Type", "application/json")]);
        let heads: Vec<String> = atts
            .iter()
            .map(|n| {
                let disposition =
                    format!("attachment; filename=\"{}\"", n.name.replace('"', "\\\""));
                part_head(
                    &boundary,
                    &[
                        ("Content-Disposition", &disposition),
                        ("Content-Type", "application/octet-stream"),
                        ("Content-Length", &n.length.to_string()),
                    ],
                )
            })
            .collect();
        let close = closing(&boundary);
        let len = (json_head.len() + json.len() + PART_END.len()) as u64
            + heads
                .iter()
                .zip(atts)
                .map(|(h, n)| (h.len() + PART_END.len()) as u64 + n.length)
                .sum::<u64>()
            + close.len() as u64;
        Ok(Framing {
            boundary,
            json_head,
            json,
            heads,
            close,
            len,
        })
    }
}

/// Retries a document's transfer a few times (a stale pooled connection, a cut) before the
/// error goes to the job.
pub async fn with_retries<F, Fut>(id: &str, mut attempt: F) -> ReplResult<Option<Value>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ReplResult<Option<Value>>>,
{
    let mut delay = Duration::from_millis(500);
    let mut n = 1;
    loop {
        match attempt().await {
            Err(e) if e.retryable() && n < ATTEMPTS => {
                tracing::info!(id, attempt = n, error = %e, "attachment transfer failed; trying again");
                tokio::time::sleep(delay).await;
                delay *= 4;
                n += 1;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lacking_attachments_follow_atts_since() {
        let doc = json!({
            "_id": "a", "_rev": "3-c",
            "_revisions": {"start": 3, "ids": ["c", "b", "a"]},
            "_attachments": {
                "old": {"stub": true, "revpos": 1, "digest": "md5-x", "length": 5},
                "new": {"stub": true, "revpos": 3, "digest": "md5-y", "length": 7},
                "inline": {"data": "aGk=", "revpos": 3}
            }
        });
        let names = |v: Vec<Needed>| v.into_iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(names(needed(&doc, &[])), ["old", "new"]);
        assert_eq!(names(needed(&doc, &["2-b".into()])), ["new"]);
        // A possible ancestor on another branch says nothing about this path.
        assert_eq!(names(needed(&doc, &["2-z".into()])), ["old", "new"]);
        assert!(needed(&doc, &["3-c".into(), "1-a".into()]).is_empty());
        assert!(needed(&json!({"_id": "x"}), &[]).is_empty());
    }
}
