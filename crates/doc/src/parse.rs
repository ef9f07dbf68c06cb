//! Turning an incoming JSON document into its parts, with CouchDB's validation rules.

use super::rev::{normalise_id, valid_rev_id, Rev};
use base64::Engine;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// 400 bad_request
    BadRequest(String),
    /// 400 doc_validation
    DocValidation(String),
    /// 400 illegal_docid
    IllegalDocId(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttInput {
    /// Inline bytes (decoded from base64, or a multipart part once matched).
    Data(Vec<u8>),
    /// Refers to the attachment of an earlier revision.
    Stub,
    /// The bytes follow in a multipart/related body.
    Follows,
    /// Already received into the store while it streamed in (standalone attachment `PUT`).
    Staged(StagedBody),
}

/// A body the store received before its document (`store::blob::Staged`, a layer above this
/// one): opaque here, the write path takes it out again.
#[derive(Clone)]
pub struct StagedBody(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for StagedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StagedBody")
    }
}

impl PartialEq for StagedBody {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct IncomingAtt {
    pub content_type: String,
    pub input: AttInput,
    pub digest: Option<String>,
    pub revpos: Option<u64>,
    pub length: Option<u64>,
    /// `gzip` when the bytes that follow are compressed (CouchDB's replicator sends those).
    pub encoding: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct IncomingDoc {
    pub id: Option<String>,
    pub rev: Option<Rev>,
    /// `_rev` exactly as sent: `_local` documents use `0-N`, which is no valid `Rev`.
    pub raw_rev: Option<String>,
    /// Set when `_rev` was present but malformed; reported only for non-local documents.
    pub bad_rev: bool,
    /// `_revisions` as (start, ids newest first).
    pub revisions: Option<(u64, Vec<String>)>,
    pub deleted: bool,
    /// The user's fields, without any `_` member.
    pub body: Map<String, Value>,
    pub atts: BTreeMap<String, IncomingAtt>,
    /// Work done before the write lock, so the database's one writer does less per document.
    pub prepared: Option<Prepared>,
}

/// What `IncomingDoc::prepare` computed from the document alone.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prepared {
    /// The body's compact JSON length (the document size limit applies to it).
    pub size: usize,
    /// For an edit without attachments: the new revision's id if its parent is the `_rev` the
    /// document names (or none). The writer uses it only when that is the parent it finds.
    pub rev_id: Option<String>,
}

impl IncomingDoc {
    /// Computes `prepared` (one serialisation of the body). Called off the write lock.
    pub fn prepare(&mut self, new_edits: bool) {
        if new_edits && self.atts.is_empty() {
            let (rev_id, size) =
                super::rev::hash_rev_and_len(self.rev.as_ref(), self.deleted, &self.body);
            self.prepared = Some(Prepared {
                size,
                rev_id: Some(rev_id),
            });
        } else {
            self.prepared = Some(Prepared {
                size: super::rev::json_len(&self.body),
                rev_id: None,
            });
        }
    }

    /// An empty edit of `id` on top of `rev` (attachment edits, deletions built by the node).
    pub fn edit(id: String, rev: Option<Rev>) -> IncomingDoc {
        IncomingDoc {
            id: Some(id),
            raw_rev: rev.as_ref().map(Rev::to_string),
            rev,
            ..Default::default()
        }
    }
}

/// Checks a document id. `_design/` and `_local/` are the only reserved prefixes.
pub fn validate_doc_id(id: &str) -> Result<(), ParseError> {
    if id.is_empty() {
        return Err(ParseError::IllegalDocId(
            "Document id must not be empty".into(),
        ));
    }
    if id.starts_with('_') && !id.starts_with("_design/") && !id.starts_with("_local/") {
        return Err(ParseError::IllegalDocId(
            "Only reserved document ids may start with underscore.".into(),
        ));
    }
    if id == "_design/" || id == "_local/" {
        return Err(ParseError::IllegalDocId(
            "Document id must not be empty".into(),
        ));
    }
    Ok(())
}

/// Drops what a `_local` document's JSON may carry but CouchDB ignores for it (`_revisions`,
/// `_attachments`); for bodies written to a `_local/` path without an `_id` member.
pub fn strip_local_members(map: &mut Map<String, Value>) {
    map.shift_remove("_revisions");
    map.shift_remove("_attachments");
}

pub fn parse_doc(value: Value) -> Result<IncomingDoc, ParseError> {
    let Value::Object(mut map) = value else {
        return Err(ParseError::BadRequest(
            "Document must be a JSON object".into(),
        ));
    };
    let mut doc = IncomingDoc::default();
    // `_local` documents have no revision tree and no attachments: CouchDB ignores both
    // members there, whatever they hold.
    if map
        .get("_id")
        .and_then(Value::as_str)
        .is_some_and(|id| id.starts_with("_local/"))
    {
        strip_local_members(&mut map);
    }
    // The special members are taken out and the rest of the map becomes the body as it is,
    // without rebuilding it.
    let special: Vec<String> = map.keys().filter(|k| k.starts_with('_')).cloned().collect();
    for k in special {
        let Some(v) = map.shift_remove(&k) else {
            continue;
        };
        match k.as_str() {
            "_id" => match v {
                Value::String(s) => {
                    validate_doc_id(&s)?;
                    doc.id = Some(s)
                }
                _ => {
                    return Err(ParseError::BadRequest(
                        "Document id must be a string".into(),
                    ))
                }
            },
            "_rev" => match v {
                Value::String(s) => {
                    doc.rev = Rev::parse(&s);
                    doc.bad_rev = doc.rev.is_none();
                    doc.raw_rev = Some(s);
                }
                Value::Null => {}
                _ => doc.bad_rev = true,
            },
            "_deleted" => doc.deleted = v == Value::Bool(true),
            "_revisions" => doc.revisions = Some(parse_revisions(&v)?),
            "_attachments" => doc.atts = parse_attachments(v)?,
            "_revs_info" | "_local_seq" | "_conflicts" | "_deleted_conflicts" => {}
            // The replicator's state fields in `_replicator` documents (CouchDB reserves them
            // there; accepting them everywhere keeps the parser free of database context).
            k if k.starts_with("_replication_") => {
                doc.body.insert(k.to_string(), v);
            }
            _ => {
                return Err(ParseError::DocValidation(format!(
                    "Bad special document member: {k}"
                )))
            }
        }
    }
    if doc.body.is_empty() {
        doc.body = map;
    } else {
        doc.body.append(&mut map);
    }
    if let (Some(rev), Some((start, ids))) = (&doc.rev, &doc.revisions) {
        if rev.pos != *start || ids.first() != Some(&rev.id) {
            // CouchDB lets `_revisions` win; keep them consistent so nothing downstream sees two
            // different heads.
            doc.rev = Some(Rev::new(*start, ids[0].clone()));
        }
    }
    Ok(doc)
}

fn parse_revisions(v: &Value) -> Result<(u64, Vec<String>), ParseError> {
    let bad = |m: &str| ParseError::DocValidation(m.to_string());
    let start = v
        .get("start")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("_revisions.start isn't an integer"))?;
    let ids = v
        .get("ids")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("_revisions.ids isn't a array"))?;
    if ids.is_empty() || start == 0 || (ids.len() as u64) > start {
        return Err(bad("_revisions is invalid"));
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let s = id.as_str().ok_or_else(|| bad("RevId isn't a string"))?;
        if !valid_rev_id(s) {
            return Err(bad("RevId isn't a valid hexadecimal"));
        }
        out.push(normalise_id(s));
    }
    Ok((start, out))
}

fn parse_attachments(v: Value) -> Result<BTreeMap<String, IncomingAtt>, ParseError> {
    let Value::Object(map) = v else {
        return Err(ParseError::BadRequest(
            "_attachments must be an object".into(),
        ));
    };
    let mut out = BTreeMap::new();
    for (name, att) in map {
        validate_att_name(&name)?;
        let Value::Object(a) = att else {
            return Err(ParseError::BadRequest(format!("Invalid attachment {name}")));
        };
        let content_type = a
            .get("content_type")
            .and_then(Value::as_str)
            .unwrap_or("application/octet-stream")
            .to_string();
        let digest = a.get("digest").and_then(Value::as_str).map(str::to_string);
        let revpos = a.get("revpos").and_then(Value::as_u64);
        let length = a
            .get("length")
            .or_else(|| a.get("encoded_length"))
            .and_then(Value::as_u64);
        let encoding = a
            .get("encoding")
            .and_then(Value::as_str)
            .map(str::to_string);
        let input = if let Some(data) = a.get("data") {
            let s = data.as_str().unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(|_| {
                    ParseError::BadRequest(format!("Invalid attachment data for {name}"))
                })?;
            AttInput::Data(bytes)
        } else if a.get("follows") == Some(&Value::Bool(true)) {
            AttInput::Follows
        } else if a.get("stub") == Some(&Value::Bool(true)) {
            AttInput::Stub
        } else {
            return Err(ParseError::BadRequest(format!(
                "Invalid attachment stub in {name}: needs data, stub or follows"
            )));
        };
        out.insert(
            name,
            IncomingAtt {
                content_type,
                input,
                digest,
                revpos,
                length,
                encoding,
            },
        );
    }
    Ok(out)
}

pub fn validate_att_name(name: &str) -> Result<(), ParseError> {
    if name.is_empty() {
        return Err(ParseError::BadRequest(
            "Attachment name can't be empty".into(),
        ));
    }
    if name.starts_with('_') {
        return Err(ParseError::BadRequest(
            "Attachment name can't start with '_'".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_fields() {
        let d = parse_doc(json!({"_id":"x","_rev":"1-abc","a":1,"_conflicts":[],"_deleted":true}))
            .unwrap();
        assert_eq!(d.id.as_deref(), Some("x"));
        assert_eq!(d.rev, Rev::parse("1-abc"));
        assert!(d.deleted);
        assert_eq!(d.body.len(), 1);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            parse_doc(json!({"_foo":1})),
            Err(ParseError::DocValidation(_))
        ));
        assert!(matches!(
            parse_doc(json!({"_id":"_x"})),
            Err(ParseError::IllegalDocId(_))
        ));
        assert!(matches!(
            parse_doc(json!({"_id":""})),
            Err(ParseError::IllegalDocId(_))
        ));
        assert!(matches!(
            parse_doc(json!({"_id":1})),
            Err(ParseError::BadRequest(_))
        ));
        assert!(parse_doc(json!({"_rev":"zz"})).unwrap().bad_rev);
        assert!(matches!(
            parse_doc(json!([1])),
            Err(ParseError::BadRequest(_))
        ));
        assert!(matches!(
            parse_doc(json!({"_revisions":{"start":1,"ids":["a","b"]}})),
            Err(ParseError::DocValidation(_))
        ));
        assert!(matches!(
            parse_doc(json!({"_attachments":{"a":{"data":"!!"}}})),
            Err(ParseError::BadRequest(_))
        ));
        assert!(matches!(
            parse_doc(json!({"_attachments":{"_a":{"data":""}}})),
            Err(ParseError::BadRequest(_))
        ));
    }

    #[test]
    fn revisions_win_over_rev() {
        let d = parse_doc(json!({"_rev":"1-a","_revisions":{"start":2,"ids":["b","a"]}})).unwrap();
        assert_eq!(d.rev, Some(Rev::new(2, "b")));
    }
}
