//! Mango (CouchDB's `_find`): JSON indexes, the query request, and the planner that picks an
//! index and the key range to read. Execution (reading rows, matching, paging) lives in
//! `db::find`, next to the view indexes it reuses: a JSON index is a design document with
//! `"language": "query"` whose views compile to a native map (`index::IndexMap`), so it is built,
//! updated, listed in `_active_tasks` and cleaned up exactly like any other view index.

pub mod index;
pub mod plan;
pub mod request;

use thali_doc::selector::SelectorError;

/// A refused Mango request: CouchDB's status, `error` and `reason` (`mango_error.erl`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{error}: {reason}")]
pub struct MangoError {
    pub status: u16,
    pub error: &'static str,
    pub reason: String,
}

impl MangoError {
    pub fn new(status: u16, error: &'static str, reason: impl Into<String>) -> MangoError {
        MangoError {
            status,
            error,
            reason: reason.into(),
        }
    }

    pub fn bad(error: &'static str, reason: impl Into<String>) -> MangoError {
        MangoError::new(400, error, reason)
    }
}

impl From<SelectorError> for MangoError {
    fn from(e: SelectorError) -> MangoError {
        MangoError::bad(e.error, e.reason)
    }
}
