//! Document, attachment and `_local` document endpoints.

use super::database::open;
use super::error::{ApiError, ApiResult};
use super::respond::{json_response, ok, status, with_etag};
use super::stream;
use super::{AppState, Req};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use std::sync::Arc;
use thali_db::{AttMode, Database, DbError, DocOptions, OpenRevs, RevisionOut, Staged, StagedSet};
use thali_doc::parse::{parse_doc, AttInput, IncomingDoc, StagedBody};
use thali_doc::Rev;
use thali_multipart as multipart;

fn parse_rev(s: &str) -> ApiResult<Rev> {
    Rev::parse(s).ok_or_else(|| ApiError::bad_request("Invalid rev format"))
}

/// `?rev=` or `If-Match`.
fn requested_rev(r: &Req) -> ApiResult<Option<Rev>> {
    if let Some(s) = r.query.get("rev") {
        return parse_rev(s).map(Some);
    }
    match r
        .headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        Some(s) => parse_rev(s.trim_matches('"')).map(Some),
        None => Ok(None),
    }
}

fn doc_options(r: &Req) -> ApiResult<DocOptions> {
    let q = &r.query;
    let meta = q.bool("meta")?;
    let atts_since = match q.json("atts_since")? {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(|v| v.as_str().and_then(Rev::parse))
                .collect(),
        ),
        Some(_) => return Err(ApiError::bad_request("atts_since must be a JSON array")),
    };
    Ok(DocOptions {
        revs: q.bool("revs")?,
        revs_info: q.bool("revs_info")? || meta,
        conflicts: q.bool("conflicts")? || meta,
        deleted_conflicts: q.bool("deleted_conflicts")? || meta,
        local_seq: q.bool("local_seq")?,
        latest: q.bool("latest")?,
        atts: if q.bool("attachments")? || atts_since.is_some() {
            AttMode::Inline
        } else {
            AttMode::Stub
        },
        atts_since,
    })
}

pub async fn doc(state: &AppState, r: &mut Req, db_name: &str, id: &str) -> ApiResult<Response> {
    let db = open(state, db_name).await?;
    match r.method.clone() {
        Method::GET | Method::HEAD => get_doc(r, db, id).await,
        Method::PUT => put_doc(r, &db, db_name, id).await,
        Method::DELETE => delete_doc(r, &db, db_name, id).await,
        m if m.as_str() == "COPY" => copy(r, &db, id).await,
        _ => Err(ApiError::method_not_allowed("COPY,DELETE,GET,HEAD,PUT")),
    }
}

/// `GET /db/doc`: the document as JSON, or multipart with its attachments.
async fn get_doc(r: &mut Req, db: Arc<Database>, id: &str) -> ApiResult<Response> {
    let mut opts = doc_options(r)?;
    if let Some(open_revs) = r.query.get("open_revs") {
        let open_revs = open_revs.to_string();
        return get_open_revs(r, db, id, &open_revs, opts).await;
    }
    if opts.atts == AttMode::Inline {
        opts.atts = AttMode::Follows;
    }
    let rev = requested_rev(r)?;
    let out = db.get_doc(id, rev.as_ref(), &opts)?;
    let rev_s = out
        .doc
        .get("_rev")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if out.follows.is_empty() {
        let resp = json_response(StatusCode::OK, &stream::DocJson(&out.doc));
        return Ok(with_etag(resp, &rev_s));
    }
    if r.accepts("multipart/related") {
        let boundary = thali_db::random_hex(16);
        let ctype = format!("multipart/related; boundary=\"{boundary}\"");
        let resp = stream::response(StatusCode::OK, &ctype, db, move |db, w| {
            write_related(w, db, out, &boundary)
        });
        return Ok(with_etag(resp, &rev_s));
    }
    let resp = stream::response(StatusCode::OK, "application/json", db, move |db, w| {
        w.doc(db, out)?;
        w.write(b"\n")
    });
    Ok(with_etag(resp, &rev_s))
}

/// `GET /db/doc?open_revs=…`: the requested leaves, as a JSON array or multipart/mixed.
async fn get_open_revs(
    r: &Req,
    db: Arc<Database>,
    id: &str,
    open_revs: &str,
    mut opts: DocOptions,
) -> ApiResult<Response> {
    let which = if open_revs == "all" {
        OpenRevs::All
    } else {
        let v: Value = serde_json::from_str(open_revs)
            .map_err(|_| ApiError::bad_request("invalid open_revs"))?;
        let list = v
            .as_array()
            .ok_or_else(|| ApiError::bad_request("open_revs must be an array"))?;
        let revs = list
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| ApiError::bad_request("Invalid rev format"))
                    .and_then(parse_rev)
            })
            .collect::<ApiResult<Vec<_>>>()?;
        OpenRevs::List(revs)
    };
    let multipart = r.accepts("multipart/mixed");
    if multipart || opts.atts == AttMode::Inline {
        // CouchDB always sends attachment bodies in multipart answers; inline
        // ones are streamed into the JSON by `stream::Sink::doc`.
        opts.atts = AttMode::Follows;
    }
    let results = db.open_revs(id, &which, &opts).await?;
    if multipart {
        return Ok(open_revs_multipart(db, results));
    }
    Ok(stream::response(
        StatusCode::OK,
        "application/json",
        db,
        move |db, out| {
            out.write(b"[")?;
            out.list(results, |out, res| match res {
                Ok(o) => stream::wrapped_doc(out, db, "ok", o),
                Err(rev) => out.json(&json!({ "missing": rev })),
            })?;
            out.write(b"]\n")
        },
    ))
}

/// `PUT /db/doc`: JSON, or multipart/related with attachment bodies.
async fn put_doc(r: &mut Req, db: &Arc<Database>, db_name: &str, id: &str) -> ApiResult<Response> {
    let new_edits = r.query.bool_or("new_edits", true)?;
    let caller = r.caller(db_name);
    // Refuse before receiving attachment bodies the write path would refuse anyway.
    caller.check_doc_write(id)?;
    let (mut doc, received) = read_doc_body(r, db).await?;
    doc.id = Some(id.to_string());
    if doc.rev.is_none() && !doc.bad_rev {
        if let Some(rev) = requested_rev(r)? {
            doc.raw_rev = Some(rev.to_string());
            doc.rev = Some(rev);
        }
    }
    let res = db.write_docs(vec![Ok(doc)], new_edits, &caller).await;
    // The bodies stay unless the write was refused (after an internal error the batch
    // may have landed; compaction drops chunks nothing names).
    let refused = |e: &DbError| !matches!(e, DbError::Internal(_));
    match &res {
        Err(e) if refused(e) => {}
        Ok(r) if matches!(r.last(), Some(Err((_, _, e))) if refused(e)) => {}
        _ => received.keep(),
    }
    let mut res = res?;
    match res.pop() {
        Some(Ok((id, rev))) => {
            let code = if r.query.get("batch") == Some("ok") {
                202
            } else {
                201
            };
            Ok(with_etag(
                status(code, json!({"ok": true, "id": id, "rev": rev})),
                &rev,
            ))
        }
        Some(Err((_, _, e))) => Err(e.into()),
        None => Err(ApiError::new(500, "internal_server_error", "no result")),
    }
}

async fn delete_doc(
    r: &mut Req,
    db: &Arc<Database>,
    db_name: &str,
    id: &str,
) -> ApiResult<Response> {
    let Some(rev) = requested_rev(r)? else {
        return Err(thali_db::DbError::Conflict.into());
    };
    let doc = json!({"_id": id, "_rev": rev.to_string(), "_deleted": true});
    let mut res = db.bulk_docs(vec![doc], true, &r.caller(db_name)).await?;
    match res.pop() {
        Some(Ok((id, rev))) => Ok(with_etag(
            ok(json!({"ok": true, "id": id, "rev": rev})),
            &rev,
        )),
        Some(Err((_, _, e))) => Err(e.into()),
        None => Err(ApiError::new(500, "internal_server_error", "no result")),
    }
}

fn multipart_err(e: thali_multipart::Error) -> ApiError {
    match e {
        thali_multipart::Error::TooLarge => ApiError::too_large(),
        thali_multipart::Error::Source(m) if m.contains("in time") => {
            ApiError::new(408, "request_timeout", m)
        }
        e => ApiError::bad_request(e.to_string()),
    }
}

/// Reads a PUT body: JSON, or multipart/related whose attachment parts stream into the store
/// as they arrive (a piece at a time in memory, md5 on the way). Parts match the `follows`
/// attachments in order; a filename, when given, wins. A declared `length` or md5 `digest`
/// that the bytes do not match is a 400 and stores nothing.
async fn read_doc_body(r: &mut Req, db: &Database) -> ApiResult<(IncomingDoc, StagedSet)> {
    let ctype = r.content_type().to_string();
    if !ctype.to_ascii_lowercase().starts_with("multipart/related") {
        // Like CouchDB, a document PUT reads any other body as JSON (curl sends form types).
        let bytes = r.bytes().await?;
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|_| ApiError::bad_request("invalid UTF-8 JSON"))?;
        return Ok((
            parse_doc(json).map_err(DbError::from)?,
            StagedSet::default(),
        ));
    }
    let boundary = multipart::boundary(&ctype)
        .ok_or_else(|| ApiError::bad_request("multipart body without boundary"))?;
    if r.content_length()
        .is_some_and(|n| n > db.max_attachment_size().saturating_add(r.max_body() as u64))
    {
        return Err(ApiError::too_large());
    }
    let max_json = r.max_body();
    let mut reader = multipart::Reader::new(r.timed_body(), &boundary);
    if reader.next_part().await.map_err(multipart_err)?.is_none() {
        return Err(ApiError::bad_request("empty multipart body"));
    }
    let json = reader.read_to_vec(max_json).await.map_err(multipart_err)?;
    let json: Value =
        serde_json::from_slice(&json).map_err(|_| ApiError::bad_request("invalid UTF-8 JSON"))?;
    let mut doc = parse_doc(json).map_err(DbError::from)?;
    let follows: Vec<String> = doc
        .atts
        .iter()
        .filter(|(_, a)| a.input == AttInput::Follows)
        .map(|(n, _)| n.clone())
        .collect();
    let mut order = follows.iter();
    let mut received = StagedSet::default();
    while let Some(head) = reader.next_part().await.map_err(multipart_err)? {
        let name = match head.filename() {
            Some(n) if doc.atts.contains_key(&n) => n,
            _ => order
                .next()
                .cloned()
                .ok_or_else(|| ApiError::bad_request("more multipart parts than attachments"))?,
        };
        let Some(att) = doc.atts.get_mut(&name) else {
            continue;
        };
        let gzip = att.encoding.as_deref() == Some("gzip")
            || head
                .get("content-encoding")
                .is_some_and(|e| e.eq_ignore_ascii_case("gzip"));
        let body = receive_part(&mut reader, db, gzip).await?;
        received.push(body.clone());
        if att.length.is_some_and(|l| l != body.len()) {
            return Err(ApiError::bad_request(format!(
                "attachment {name} has {} bytes, its length says {}",
                body.len(),
                att.length.unwrap_or(0)
            )));
        }
        if !gzip
            && att
                .digest
                .as_deref()
                .is_some_and(|d| d.starts_with("md5-") && d != body.digest)
        {
            return Err(ApiError::bad_request(format!(
                "attachment {name}: the bytes do not match its digest"
            )));
        }
        att.encoding = None;
        att.input = AttInput::Staged(StagedBody(std::sync::Arc::new(body)));
    }
    Ok((doc, received))
}

/// One attachment part into the store, gunzipped on the way when it came compressed.
async fn receive_part<S>(
    reader: &mut multipart::Reader<S>,
    db: &Database,
    gzip: bool,
) -> ApiResult<Staged>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, String>> + Unpin,
{
    let mut upload = db.upload(gzip, "multipart part")?;
    while let Some(p) = reader.piece().await.map_err(multipart_err)? {
        upload.write(&p).await?;
    }
    Ok(upload.finish().await?)
}

/// `open_revs` as `multipart/mixed`: one part per revision, a `multipart/related` part (the
/// JSON, then each attachment's bytes) for revisions with attachments. Streamed.
fn open_revs_multipart(
    db: std::sync::Arc<thali_db::Database>,
    results: Vec<Result<RevisionOut, String>>,
) -> Response {
    let outer = thali_db::random_hex(16);
    let ctype = format!("multipart/mixed; boundary=\"{outer}\"");
    stream::response(StatusCode::OK, &ctype, db, move |db, w| {
        for res in results {
            let res = res.map_err(|rev| json!({ "missing": rev }));
            write_mixed_part(w, db, &outer, res, &[])?;
        }
        w.write(format!("--{outer}--").as_bytes())
    })
}

/// One part of a `multipart/mixed` answer (`open_revs`, `_bulk_get`): an error as JSON marked
/// `error="true"`, a revision without attachment bodies as JSON, else a nested
/// `multipart/related` part streamed from the store.
pub(crate) fn write_mixed_part(
    w: &mut stream::Sink,
    db: &Database,
    outer: &str,
    res: Result<RevisionOut, Value>,
    headers: &[(&str, &str)],
) -> std::io::Result<()> {
    w.write(format!("--{outer}\r\n").as_bytes())?;
    for (k, v) in headers {
        w.write(format!("{k}: {v}\r\n").as_bytes())?;
    }
    match res {
        Err(e) => {
            w.write(b"Content-Type: application/json; error=\"true\"\r\n\r\n")?;
            w.json(&e)?;
        }
        Ok(out) if out.follows.is_empty() => {
            w.write(b"Content-Type: application/json\r\n\r\n")?;
            w.json(&Value::Object(out.doc))?;
        }
        Ok(out) => {
            let inner = thali_db::random_hex(16);
            w.write(
                format!("Content-Type: multipart/related; boundary=\"{inner}\"\r\n\r\n").as_bytes(),
            )?;
            write_related(w, db, out, &inner)?;
        }
    }
    w.write(b"\r\n")
}

/// A revision as `multipart/related`: its JSON (attachments marked `follows`), then each
/// attachment's bytes read from the store a chunk at a time.
fn write_related(
    w: &mut stream::Sink,
    db: &Database,
    out: RevisionOut,
    boundary: &str,
) -> std::io::Result<()> {
    w.write(multipart::part_head(boundary, &[("Content-Type", "application/json")]).as_bytes())?;
    w.json(&Value::Object(out.doc))?;
    w.write(multipart::PART_END.as_bytes())?;
    for (name, meta) in &out.follows {
        let disposition = format!("attachment; filename=\"{name}\"");
        let length = meta.length.to_string();
        let head = multipart::part_head(
            boundary,
            &[
                ("Content-Disposition", &disposition),
                ("Content-Type", &meta.content_type),
                ("Content-Length", &length),
            ],
        );
        w.write(head.as_bytes())?;
        w.attachment(db, meta)?;
        w.write(multipart::PART_END.as_bytes())?;
    }
    w.write(multipart::closing(boundary).as_bytes())
}

async fn copy(
    r: &mut Req,
    db: &std::sync::Arc<thali_db::Database>,
    id: &str,
) -> ApiResult<Response> {
    let dest = r
        .headers
        .get("destination")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::bad_request("Destination header is mandatory for COPY."))?;
    let (dest_id, dest_rev) = match dest.split_once("?rev=") {
        Some((i, rv)) => (super::query::decode(i), Some(rv.to_string())),
        None => (super::query::decode(dest), None),
    };
    let src_rev = requested_rev(r)?;
    let opts = DocOptions {
        atts: AttMode::Inline,
        ..Default::default()
    };
    let mut src = db.get_doc(id, src_rev.as_ref(), &opts)?.doc;
    src.insert("_id".into(), json!(dest_id));
    match dest_rev {
        Some(rv) => src.insert("_rev".into(), json!(rv)),
        None => src.shift_remove("_rev"),
    };
    let mut res = db
        .bulk_docs(vec![Value::Object(src)], true, &r.caller(db.name()))
        .await?;
    match res.pop() {
        Some(Ok((id, rev))) => Ok(with_etag(
            status(201, json!({"ok": true, "id": id, "rev": rev})),
            &rev,
        )),
        Some(Err((_, _, e))) => Err(e.into()),
        None => Err(ApiError::new(500, "internal_server_error", "no result")),
    }
}

pub async fn attachment(
    state: &AppState,
    r: &mut Req,
    db_name: &str,
    id: &str,
    name: &str,
) -> ApiResult<Response> {
    let db = open(state, db_name).await?;
    match r.method.clone() {
        Method::GET | Method::HEAD => {
            let rev = requested_rev(r)?;
            let meta = db.get_attachment(id, rev.as_ref(), name)?;
            let total = meta.length;
            let range = r
                .headers
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_range(v, total));
            let (code, (start, last)) = match range {
                Some(r) => (StatusCode::PARTIAL_CONTENT, r),
                None => (StatusCode::OK, (0, total.saturating_sub(1))),
            };
            let end = if total == 0 { 0 } else { last + 1 };
            // Read a stored chunk at a time on a blocking thread; `Content-Length` is set, so
            // a body cut short by a store error is seen as such by the client.
            let digest = meta.digest.clone();
            let body = stream::body(db, move |db, sink| {
                sink.attachment_range(db, &digest, start, end)
            });
            let mut resp = Response::new(body);
            *resp.status_mut() = code;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
            if let Ok(v) = HeaderValue::from_str(&meta.content_type) {
                h.insert(header::CONTENT_TYPE, v);
            }
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            // Attachments are data, whoever wrote them: a `text/html` one opened in a browser
            // runs in a sandbox (no script, an opaque origin), never as the admin's origin
            // (CouchDB 3.2's `[csp] attachments`); and its type is never sniffed.
            h.insert(
                "content-security-policy",
                HeaderValue::from_static("sandbox"),
            );
            h.insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", meta.digest)) {
                h.insert(header::ETAG, v);
            }
            if let Some((a, b)) = range {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{total}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            Ok(resp)
        }
        Method::PUT => {
            let rev = requested_rev(r)?;
            let ctype = match r.content_type() {
                "" => "application/octet-stream".to_string(),
                c => c.to_string(),
            };
            thali_doc::parse::validate_att_name(name).map_err(thali_db::DbError::from)?;
            let caller = r.caller(db_name);
            // Refuse before receiving a body the write path would refuse anyway.
            caller.check_doc_write(id)?;
            let body = receive_attachment(r, &db).await?;
            let new_rev = db
                .put_attachment(id, rev, name, &ctype, body, &caller)
                .await?;
            Ok(with_etag(
                status(201, json!({"ok": true, "id": id, "rev": new_rev})),
                &new_rev,
            ))
        }
        Method::DELETE => {
            let rev = requested_rev(r)?;
            let new_rev = db
                .delete_attachment(id, rev, name, &r.caller(db_name))
                .await?;
            Ok(with_etag(
                ok(json!({"ok": true, "id": id, "rev": new_rev})),
                &new_rev,
            ))
        }
        _ => Err(ApiError::method_not_allowed("DELETE,GET,HEAD,PUT")),
    }
}

/// Receives a standalone attachment's body into the store as it arrives: a chunk at most in
/// memory, its md5 computed on the way. A body shorter than its `Content-Length`, a stalled
/// client or one over the size limit stores nothing (the chunks written go again).
async fn receive_attachment(r: &mut Req, db: &Database) -> ApiResult<Staged> {
    if r.content_length()
        .is_some_and(|n| n > db.max_attachment_size())
    {
        return Err(DbError::AttTooLarge("request body".into()).into());
    }
    let mut body = r.body_stream();
    let mut upload = db.upload(false, "request body")?;
    while let Some(piece) = r.next_frame(&mut body).await? {
        upload.write(&piece).await?;
    }
    Ok(upload.finish().await?)
}

/// A single `bytes=a-b` range (`a-`, `-n` too) within `total`; anything else serves it all.
fn parse_range(v: &str, total: u64) -> Option<(u64, u64)> {
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') || total == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (total.saturating_sub(n), total - 1)
        }
        (a, "") => (a.parse().ok()?, total - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(total - 1)),
    };
    (start <= end && end < total).then_some((start, end))
}

pub async fn local(
    state: &AppState,
    r: &mut Req,
    db_name: &str,
    local_id: &str,
) -> ApiResult<Response> {
    let db = open(state, db_name).await?;
    match r.method.clone() {
        Method::GET | Method::HEAD => Ok(ok(db.get_local(local_id, &r.caller(db_name))?)),
        Method::PUT => {
            let mut json = r.json().await?;
            if let Value::Object(m) = &mut json {
                thali_doc::parse::strip_local_members(m);
            }
            let mut doc = parse_doc(json).map_err(thali_db::DbError::from)?;
            doc.id = Some(format!("_local/{local_id}"));
            if doc.raw_rev.is_none() {
                doc.raw_rev = r.query.get("rev").map(str::to_string);
            }
            let mut res = db
                .write_docs(vec![Ok(doc)], true, &r.caller(db_name))
                .await?;
            match res.pop() {
                Some(Ok((id, rev))) => Ok(status(201, json!({"ok": true, "id": id, "rev": rev}))),
                Some(Err((_, _, e))) => Err(e.into()),
                None => Err(ApiError::new(500, "internal_server_error", "no result")),
            }
        }
        Method::DELETE => {
            let rev = r.query.get("rev").map(str::to_string);
            match db.delete_local(local_id, rev, &r.caller(db_name)).await? {
                Ok((id, rev)) => Ok(ok(json!({"ok": true, "id": id, "rev": rev}))),
                Err((_, _, e)) => Err(e.into()),
            }
        }
        _ => Err(ApiError::method_not_allowed("DELETE,GET,HEAD,PUT")),
    }
}
