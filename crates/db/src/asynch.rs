//! The async face of `Node` and `Database` for work that may block: opening, creating and
//! deleting databases, feeds, revision reads for the replicator, attachment ranges and
//! streamed answers. Each decides here whether its work is short (bounded slots) or long;
//! callers never pick. The `*_blocking` forms are for threads that are not async workers
//! (the CLI, the design-document watcher).

use crate::{
    offload, BulkGetItem, ChangeRow, ChangesQuery, Database, DbError, DbResult, DocOptions, Node,
    OpenRevs, RevisionOut,
};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Arc;

impl Node {
    /// Opens an existing database, or finds it open. Loading one compiles its design
    /// documents, so it runs off the async workers; an open one is found inline.
    pub async fn db(self: &Arc<Self>, name: &str) -> DbResult<Arc<Database>> {
        if let Some(db) = self.open_db(name) {
            return Ok(db);
        }
        let (this, name) = (self.clone(), name.to_string());
        offload::run(move || this.db_blocking(&name)).await?
    }

    /// Every key some database's `_security` names, at any level; read again (off the async
    /// workers) only after a `_security` write or a database created or deleted.
    pub async fn peer_keys(self: &Arc<Self>) -> Arc<HashSet<String>> {
        if let Some(keys) = self.peer_keys_cached() {
            return keys;
        }
        let this = self.clone();
        offload::run(move || this.peer_keys_blocking())
            .await
            .unwrap_or_default()
    }

    /// Creates a database (its files made durable before it answers).
    pub async fn create_db(self: &Arc<Self>, name: &str) -> DbResult<Arc<Database>> {
        let (this, name) = (self.clone(), name.to_string());
        offload::run(move || this.create_db_blocking(&name)).await?
    }

    /// Deletes a database and its files.
    pub async fn delete_db(self: &Arc<Self>, name: &str) -> DbResult<()> {
        let (this, name) = (self.clone(), name.to_string());
        offload::run(move || this.delete_db_blocking(&name)).await?
    }

    /// Opens a database, creating it when it does not exist (a creation racing this one is
    /// fine).
    pub async fn db_or_create(self: &Arc<Self>, name: &str) -> DbResult<Arc<Database>> {
        match self.db(name).await {
            Err(DbError::NotFound(_)) => match self.create_db(name).await {
                Err(DbError::FileExists) => self.db(name).await,
                r => r,
            },
            r => r,
        }
    }
}

impl Database {
    /// Rows after `q.since` (up to `limit`), the `last_seq` to resume from, and how many
    /// changes remain after it.
    pub async fn changes(
        self: &Arc<Self>,
        q: &ChangesQuery,
    ) -> DbResult<(Vec<ChangeRow>, u64, u64)> {
        let (this, q) = (self.clone(), q.clone());
        offload::run(move || this.changes_now(&q)).await?
    }

    /// `open_revs`: per requested revision the document, or `Err(rev)` when it is missing.
    pub async fn open_revs(
        self: &Arc<Self>,
        id: &str,
        which: &OpenRevs,
        opts: &DocOptions,
    ) -> DbResult<Vec<Result<RevisionOut, String>>> {
        let (this, id, which, opts) = (self.clone(), id.to_string(), which.clone(), opts.clone());
        offload::run(move || this.open_revs_now(&id, &which, &opts)).await?
    }

    /// `_revs_diff`: per document the revisions this database lacks.
    pub async fn revs_diff(self: &Arc<Self>, req: Map<String, Value>) -> DbResult<Value> {
        let this = self.clone();
        offload::run(move || this.revs_diff_now(req)).await?
    }

    /// `_bulk_get`.
    pub async fn bulk_get(
        self: &Arc<Self>,
        items: Vec<BulkGetItem>,
        opts: &DocOptions,
    ) -> DbResult<Value> {
        let (this, opts) = (self.clone(), opts.clone());
        offload::run(move || this.bulk_get_now(items, &opts)).await?
    }

    /// The bytes `start..end` of the attachment body `digest`.
    pub async fn attachment_piece(
        self: &Arc<Self>,
        digest: &str,
        start: u64,
        end: u64,
    ) -> std::io::Result<Vec<u8>> {
        let (this, digest) = (self.clone(), digest.to_string());
        offload::run(move || {
            let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
            this.attachment_range(&digest, start, end, &mut |b| {
                out.extend_from_slice(b);
                Ok(())
            })
            .map(|()| out)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Runs `produce` (a long read feeding a streamed answer) off the async workers, without
    /// waiting for it.
    pub fn produce<F>(self: &Arc<Self>, produce: F)
    where
        F: FnOnce(&Database) + Send + 'static,
    {
        let this = self.clone();
        offload::spawn(move || produce(&this));
    }
}
