//! Key encodings and the records stored per document.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thali_doc::RevTree;

/// What the store keeps per document: its revision tree and its current sequence.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DocInfo {
    #[serde(rename = "t")]
    pub tree: RevTree,
    #[serde(rename = "s")]
    pub seq: u64,
    /// The body of the most recently written revision (always a leaf), kept in this record so a
    /// new document costs one insert less and the usual read one lookup less. Older bodies live
    /// under `r` keys.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub current: Option<(String, RevBody)>,
}

/// The by-sequence entry of a document: enough for a `_changes` row without reading the
/// document itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeqEntry {
    pub id: String,
    /// Leaf revisions, winner first.
    pub leaves: Vec<String>,
    /// Whether the winner is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl SeqEntry {
    /// The entry for a document with this revision tree.
    pub fn of(id: &str, tree: &RevTree) -> SeqEntry {
        Self::from_leaves(id, &tree.leaves())
    }

    /// The same from leaves already computed (winner first).
    pub fn from_leaves(id: &str, leaves: &[thali_doc::Leaf]) -> SeqEntry {
        SeqEntry {
            id: id.to_string(),
            deleted: leaves.first().is_some_and(|w| w.deleted),
            leaves: leaves.iter().map(|l| l.rev.to_string()).collect(),
        }
    }
}

/// Metadata of one attachment of one revision; the bytes live under their digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttMeta {
    pub content_type: String,
    /// `md5-<base64>` of the raw bytes; also the blob's key.
    pub digest: String,
    pub length: u64,
    pub revpos: u64,
}

/// The stored body of one revision.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RevBody {
    #[serde(rename = "b")]
    pub body: serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "a", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub atts: BTreeMap<String, AttMeta>,
    #[serde(rename = "d", default)]
    pub deleted: bool,
}

pub(super) fn doc_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(b'd');
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn body_key(id: &str, rev: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + rev.len() + 5);
    k.push(b'r');
    k.extend_from_slice(&(id.len() as u32).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k.extend_from_slice(rev.as_bytes());
    k
}

pub(super) fn seq_key(seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b's');
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn local_key(id: &str) -> Vec<u8> {
    let mut k = vec![b'l'];
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn att_key(digest: &str) -> Vec<u8> {
    let mut k = vec![b'a'];
    k.extend_from_slice(digest.as_bytes());
    k
}

/// A chunked attachment body's manifest (`blob.rs`).
pub(super) fn manifest_key(digest: &str) -> Vec<u8> {
    let mut k = vec![b'A'];
    k.extend_from_slice(digest.as_bytes());
    k
}

/// Chunk `i` of blob `blob` (`blob.rs`): big-endian, so a blob's chunks sort in order.
pub(super) fn chunk_key(blob: &str, i: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(blob.len() + 5);
    k.push(b'c');
    k.extend_from_slice(blob.as_bytes());
    k.extend_from_slice(&i.to_be_bytes());
    k
}

pub(super) fn meta_key(name: &str) -> Vec<u8> {
    let mut k = vec![b'm'];
    k.extend_from_slice(name.as_bytes());
    k
}
