//! The changes feed: one row per document, at the sequence of its latest update.
//! Feeds only show durable writes: rows above the durable `update_seq` are not listed yet.

use super::read::DocOptions;
use super::{Database, DbError, DbResult};
use serde_json::Value;
use std::collections::HashSet;
use thali_doc::selector::Selector;
use thali_doc::Rev;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Style {
    #[default]
    MainOnly,
    AllDocs,
}

#[derive(Clone, Debug, Default)]
pub struct ChangesQuery {
    pub since: u64,
    pub limit: Option<usize>,
    pub descending: bool,
    pub include_docs: bool,
    pub conflicts: bool,
    pub attachments: bool,
    pub style: Style,
    pub doc_ids: Option<HashSet<String>>,
    pub design_only: bool,
    /// `filter=_selector`: only documents whose winning revision matches.
    pub selector: Option<Selector>,
    /// `filter=ddoc/name`: only documents the filter function accepts.
    pub filter: Option<FilterFn>,
}

/// A design document filter with the `req` it is called with.
#[derive(Clone)]
pub struct FilterFn {
    pub name: String,
    pub func: thali_plugins::Func,
    pub req: Value,
}

impl std::fmt::Debug for FilterFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FilterFn({})", self.name)
    }
}

pub struct ChangeRow {
    pub seq: u64,
    /// The row, already serialised: feeds concatenate rows without re-encoding them.
    pub json: String,
}

impl Database {
    /// The winning revision as JSON, for selectors and filter functions.
    fn winner_doc(&self, id: &str, winner: &str) -> DbResult<Option<Value>> {
        let (Some(info), Some(w)) = (self.data().doc_info(id)?, Rev::parse(winner)) else {
            return Ok(None);
        };
        let Some(body) = self.data().body_of(id, &info, winner)? else {
            return Ok(None);
        };
        let doc = self.render(id, &info, &w, body, &DocOptions::default()).doc;
        Ok(Some(Value::Object(doc)))
    }

    fn passes(&self, q: &ChangesQuery, id: &str, winner: &str) -> DbResult<bool> {
        if q.selector.is_none() && q.filter.is_none() {
            return Ok(true);
        }
        let Some(doc) = self.winner_doc(id, winner)? else {
            return Ok(false);
        };
        if let Some(sel) = &q.selector {
            if !sel.matches(&doc) {
                return Ok(false);
            }
        }
        if let Some(f) = &q.filter {
            let out = f
                .func
                .call(&[doc, f.req.clone()])
                .map_err(|e| DbError::Plugin(format!("filter {}: {e}", f.name)))?;
            return Ok(!matches!(out, Value::Null | Value::Bool(false)));
        }
        Ok(true)
    }

    /// Rows after `q.since` (up to `limit`), the `last_seq` to resume from, and how many
    /// changes remain after it.
    pub(crate) fn changes_now(&self, q: &ChangesQuery) -> DbResult<(Vec<ChangeRow>, u64, u64)> {
        self.check_alive()?;
        let durable = self.update_seq();
        let limit = q.limit.unwrap_or(usize::MAX);
        let opts = DocOptions::for_rows(q.conflicts, q.attachments);
        let mut rows = Vec::new();
        let mut last = if q.descending {
            0
        } else {
            q.since.min(durable)
        };
        let iter = self.data().changes(q.since, q.descending);
        let mut hit_limit = false;
        for r in iter {
            let (seq, entry) = r?;
            if seq > durable {
                if q.descending {
                    continue;
                }
                break;
            }
            if rows.len() >= limit {
                hit_limit = true;
                break;
            }
            last = seq;
            let id = &entry.id;
            if q.design_only && !id.starts_with("_design/") {
                continue;
            }
            if q.doc_ids.as_ref().is_some_and(|ids| !ids.contains(id)) {
                continue;
            }
            let Some(winner) = entry.leaves.first() else {
                continue;
            };
            if !self.passes(q, id, winner)? {
                continue;
            }
            let row = self.change_row(q, seq, &entry, winner, &opts)?;
            rows.push(ChangeRow { seq, json: row });
        }
        // Counting the rest would make paging through the feed quadratic; every document has
        // one entry, so the sequence gap is an upper bound that is exact without updates.
        let pending = if hit_limit {
            durable.saturating_sub(last)
        } else {
            0
        };
        if q.descending {
            last = rows.last().map_or(durable, |r| r.seq);
        }
        Ok((rows, last, pending))
    }

    /// One row of the feed as JSON text: sequence, id, the revisions `style` asks for, and the
    /// winning document with `include_docs`.
    fn change_row(
        &self,
        q: &ChangesQuery,
        seq: u64,
        entry: &thali_store::SeqEntry,
        winner: &str,
        opts: &DocOptions,
    ) -> DbResult<String> {
        let id = &entry.id;
        let mut row = String::with_capacity(96);
        row.push_str("{\"seq\":");
        row.push_str(&seq.to_string());
        row.push_str(",\"id\":");
        row.push_str(&serde_json::to_string(id).unwrap_or_default());
        row.push_str(",\"changes\":[");
        let revs: &[String] = match q.style {
            Style::MainOnly => std::slice::from_ref(&entry.leaves[0]),
            Style::AllDocs => &entry.leaves,
        };
        for (i, rev) in revs.iter().enumerate() {
            if i > 0 {
                row.push(',');
            }
            // Revision strings are ASCII alphanumerics and '-': no escaping needed.
            row.push_str("{\"rev\":\"");
            row.push_str(rev);
            row.push_str("\"}");
        }
        row.push(']');
        if entry.deleted {
            row.push_str(",\"deleted\":true");
        }
        if q.include_docs {
            let doc = match (self.data().doc_info(id)?, Rev::parse(winner)) {
                (Some(info), Some(w)) => match self.data().body_of(id, &info, winner)? {
                    Some(body) => Value::Object(self.render(id, &info, &w, body, opts).doc),
                    None => Value::Null,
                },
                _ => Value::Null,
            };
            row.push_str(",\"doc\":");
            row.push_str(&serde_json::to_string(&doc).unwrap_or_default());
        }
        row.push('}');
        Ok(row)
    }
}
