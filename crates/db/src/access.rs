//! Who is writing or reading, and what the core paths let them do. Every write carries a
//! `Caller`; the write path (not the HTTP handlers) refuses design documents below the admin
//! level and binds a read-level peer's `_local` documents to its key, whatever route the write
//! came through.

use super::{DbError, DbResult};
use serde_json::{json, Value};

/// What a caller may do on one database, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Pull: reads, `_changes`, `_revs_diff`, `_bulk_get`, and its own `_local` checkpoints.
    Read,
    /// Read plus document writes and any `_local` document.
    Write,
    /// Write plus design documents and `_security`.
    Admin,
}

/// The identity a write or read runs as.
#[derive(Clone, Debug)]
pub struct Caller {
    /// CouchDB's `userCtx`, as validators and filters see it.
    pub user_ctx: Value,
    pub level: Level,
    /// The peer's key id when the caller is a peer (its `_local` namespace at the read level).
    pub peer: Option<String>,
    /// The node itself (its replicator, pairing, resolvers), not a client: only it writes the
    /// replicator's `_replication_*` state into `_replicator` documents.
    pub internal: bool,
}

/// Largest `_local` document a read-level peer may keep (a CouchDB checkpoint with its 50
/// history entries is ~20 KB).
pub const READER_LOCAL_MAX_BYTES: usize = 256 << 10;
/// How many `_local` documents one read-level peer may keep per database.
pub const READER_LOCAL_MAX_DOCS: usize = 64;

/// The first character of a stored `_local` id that belongs to a peer's namespace. No id that
/// arrives from outside may start with it, so no request can name another peer's documents.
const NAMESPACE_MARK: char = '\u{0}';

impl Caller {
    /// The node's own writes (replicator, `_replicator` manager, dev folder, resolvers).
    pub fn node(db: &str) -> Caller {
        Caller {
            user_ctx: admin_ctx(db),
            level: Level::Admin,
            peer: None,
            internal: true,
        }
    }

    /// May this caller write the document `id`? (`_local/` ids are checked by `local_key`.)
    pub fn check_doc_write(&self, id: &str) -> DbResult<()> {
        if id.starts_with("_design/") && self.level < Level::Admin {
            return Err(DbError::Forbidden(
                "You are not a db or server admin.".into(),
            ));
        }
        if self.level < Level::Write && !id.starts_with("_local/") {
            return Err(DbError::Forbidden(
                "You are not allowed to write to this db.".into(),
            ));
        }
        Ok(())
    }

    /// Where the `_local` document `local_id` (without `_local/`) of this caller is stored: as
    /// named for writers and admins; in a namespace of its own key for a read-level peer, so it
    /// keeps replication checkpoints on a database it pulls from without touching anyone else's.
    pub fn local_key(&self, local_id: &str) -> DbResult<String> {
        if local_id.starts_with(NAMESPACE_MARK) {
            return Err(DbError::IllegalDocId(
                "_local document ids must not start with a NUL character".into(),
            ));
        }
        match (&self.peer, self.level) {
            (_, Level::Write | Level::Admin) => Ok(local_id.to_string()),
            (Some(key), Level::Read) => Ok(format!("{}{key}/{local_id}", reader_prefix_start())),
            (None, Level::Read) => Err(DbError::Forbidden(
                "You are not allowed to access this db.".into(),
            )),
        }
    }

    /// The stored-id prefix of this read-level peer's namespace.
    pub fn reader_prefix(&self) -> Option<String> {
        match (&self.peer, self.level) {
            (Some(key), Level::Read) => Some(format!("{}{key}/", reader_prefix_start())),
            _ => None,
        }
    }
}

fn reader_prefix_start() -> String {
    format!("{NAMESPACE_MARK}peer/")
}

/// Is this stored `_local` id in some peer's namespace (hidden from `_local_docs`)?
pub fn is_namespaced(stored_id: &str) -> bool {
    stored_id.starts_with(NAMESPACE_MARK)
}

/// `userCtx` of the node's own writes.
pub fn admin_ctx(db: &str) -> Value {
    json!({"db": db, "name": null, "roles": ["_admin"]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(level: Level) -> Caller {
        Caller {
            user_ctx: Value::Null,
            level,
            peer: Some("ed25519:abc".into()),
            internal: false,
        }
    }

    #[test]
    fn design_documents_need_admin() {
        assert!(peer(Level::Write).check_doc_write("_design/x").is_err());
        assert!(peer(Level::Read).check_doc_write("_design/x").is_err());
        assert!(peer(Level::Admin).check_doc_write("_design/x").is_ok());
        assert!(peer(Level::Write).check_doc_write("doc").is_ok());
        assert!(peer(Level::Read).check_doc_write("doc").is_err());
    }

    #[test]
    fn readers_get_their_own_local_namespace() {
        let r = peer(Level::Read);
        let k = r.local_key("chk").unwrap();
        assert!(is_namespaced(&k) && k.ends_with("ed25519:abc/chk"));
        assert_eq!(peer(Level::Write).local_key("chk").unwrap(), "chk");
        assert!(peer(Level::Write).local_key("\u{0}peer/x/chk").is_err());
        assert!(r.local_key("\u{0}peer/ed25519:abc/chk").is_err());
    }
}
