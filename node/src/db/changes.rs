//! The changes feed: one row per document, at the sequence of its latest update.
//! Feeds only show durable writes: rows above the durable `update_seq` are not listed yet.

use super::read::{AttMode, DocOptions};
use super::{Database, DbResult};
use serde_json::{json, Value};
use std::collections::HashSet;

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
}

pub struct ChangeRow {
    pub seq: u64,
    pub row: Value,
}

impl Database {
    /// Rows after `q.since` (up to `limit`), the `last_seq` to resume from, and how many
    /// changes remain after it.
    pub fn changes(&self, q: &ChangesQuery) -> DbResult<(Vec<ChangeRow>, u64, u64)> {
        self.check_alive()?;
        let durable = self.update_seq();
        let limit = q.limit.unwrap_or(usize::MAX);
        let opts = DocOptions {
            conflicts: q.conflicts,
            atts: if q.attachments { AttMode::Inline } else { AttMode::Stub },
            ..Default::default()
        };
        let mut rows = Vec::new();
        let mut last = if q.descending { 0 } else { q.since.min(durable) };
        let mut iter = self.data.changes(q.since, q.descending);
        let mut hit_limit = false;
        for r in iter.by_ref() {
            let (seq, id) = r?;
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
            if q.design_only && !id.starts_with("_design/") {
                continue;
            }
            if let Some(ids) = &q.doc_ids {
                if !ids.contains(&id) {
                    continue;
                }
            }
            let Some(info) = self.data.doc_info(&id)? else { continue };
            let leaves = info.tree.leaves();
            let Some(winner) = leaves.first() else { continue };
            let revs: Vec<Value> = match q.style {
                Style::MainOnly => vec![json!({"rev": winner.rev.to_string()})],
                Style::AllDocs => leaves.iter().map(|l| json!({"rev": l.rev.to_string()})).collect(),
            };
            let mut row = json!({"seq": seq, "id": id, "changes": revs});
            if winner.deleted {
                row["deleted"] = json!(true);
            }
            if q.include_docs {
                row["doc"] = match self.data.body(&id, &winner.rev.to_string())? {
                    Some(body) => Value::Object(self.render(&id, &info, &winner.rev, body, &opts).doc),
                    None => Value::Null,
                };
            }
            rows.push(ChangeRow { seq, row });
        }
        let pending = if hit_limit {
            1 + iter.take_while(|r| matches!(r, Ok((s, _)) if *s <= durable)).count() as u64
        } else {
            0
        };
        if q.descending && rows.is_empty() {
            last = durable;
        }
        if q.descending {
            last = rows.last().map_or(last, |r| r.seq);
        }
        Ok((rows, last, pending))
    }
}
