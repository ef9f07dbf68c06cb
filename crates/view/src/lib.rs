//! Views, the pure parts: reduce functions (`reduce`) and the query a view request asks
//! (`ViewQuery`). Key collation is `doc::collate`; the index itself lives in `db::views`
//! (maintenance and queries) and `store::index` (its keyspace).

pub mod reduce;

use serde_json::Value;
use thali_doc::collate;

/// When a query brings the index up to date.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Update {
    /// Before answering (the default).
    #[default]
    True,
    /// Never: answer from the index as it is (`stale=ok`).
    False,
    /// After answering (`stale=update_after`).
    Lazy,
}

/// A view query with CouchDB's parameters, already validated.
#[derive(Clone, Debug)]
pub struct ViewQuery {
    pub keys: Option<Vec<Value>>,
    pub start_key: Option<Value>,
    pub end_key: Option<Value>,
    pub start_docid: Option<String>,
    pub end_docid: Option<String>,
    pub inclusive_end: bool,
    pub descending: bool,
    pub limit: Option<usize>,
    pub skip: usize,
    /// `Some(None)` is `group=true` (exact keys); `Some(Some(n))` is `group_level=n`.
    pub group: Option<Option<usize>>,
    /// `reduce=false` turns a reduce view into a map query.
    pub reduce: Option<bool>,
    pub include_docs: bool,
    /// With `include_docs`: attachments inline as base64 (CouchDB's `attachments=true`).
    pub attachments: bool,
    pub conflicts: bool,
    pub update_seq: bool,
    pub update: Update,
}

impl Default for ViewQuery {
    fn default() -> Self {
        ViewQuery {
            keys: None,
            start_key: None,
            end_key: None,
            start_docid: None,
            end_docid: None,
            inclusive_end: true,
            descending: false,
            limit: None,
            skip: 0,
            group: None,
            reduce: None,
            include_docs: false,
            attachments: false,
            conflicts: false,
            update_seq: false,
            update: Update::True,
        }
    }
}

impl ViewQuery {
    /// CouchDB's checks that depend on the view (`couch_mrview_util:validate_args`), with its
    /// `query_parse_error` messages.
    pub fn check(&self, has_reduce: bool) -> Result<bool, String> {
        let reduce = match (self.reduce, has_reduce) {
            (Some(true), false) => return Err("Reduce is invalid for map-only views.".into()),
            (Some(r), true) => r,
            (None, r) => r,
            (Some(false), false) => false,
        };
        // A reduce view queried with reduce=false is a map view, as in CouchDB.
        if !reduce && self.group.is_some() {
            return Err("Invalid use of grouping on a map view.".into());
        }
        if reduce && self.include_docs {
            return Err("`include_docs` is invalid for reduce".into());
        }
        if reduce && self.keys.is_some() && self.group != Some(None) {
            return Err("Multi-key fetches for reduce views must use `group=true`".into());
        }
        if self.keys.is_some() && (self.start_key.is_some() || self.end_key.is_some()) {
            return Err("`keys` is incompatible with `key`, `start_key` and `end_key`".into());
        }
        if let (Some(s), Some(e)) = (&self.start_key, &self.end_key) {
            let (s, e) = (collate::encode(s), collate::encode(e));
            let wrong = if self.descending { s < e } else { s > e };
            if wrong {
                return Err(format!(
                    "No rows can match your key range, reverse your start_key and end_key or \
                     set descending={}",
                    !self.descending
                ));
            }
        }
        Ok(reduce)
    }
}
