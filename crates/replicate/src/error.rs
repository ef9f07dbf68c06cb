//! `ReplError`, the replicator's boundary error. It knows whether retrying can help and how it
//! looks to an HTTP client (`POST /_replicate`) or in a `_replicator` document.

#[derive(Clone, Debug, thiserror::Error)]
pub enum ReplError {
    /// The replication request itself is wrong (bad URL, bad option).
    #[error("{0}")]
    BadSpec(String),
    /// A database does not exist (and `create_target` was not asked for).
    #[error("could not open {0}")]
    DbNotFound(String),
    /// The peer refused us (401/403 outside document writes): retrying will not help.
    #[error("{0}")]
    Unauthorized(String),
    /// Network failures, timeouts, 5xx answers, unexpected bodies: retried with backoff.
    #[error("{0}")]
    Transient(String),
    #[error("replication cancelled")]
    Cancelled,
}

pub type ReplResult<T> = Result<T, ReplError>;

impl ReplError {
    pub fn retryable(&self) -> bool {
        matches!(self, ReplError::Transient(_))
    }

    pub fn status(&self) -> u16 {
        match self {
            ReplError::BadSpec(_) => 400,
            ReplError::DbNotFound(_) => 404,
            ReplError::Unauthorized(_) => 401,
            ReplError::Transient(_) => 500,
            ReplError::Cancelled => 500,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ReplError::BadSpec(_) => "bad_request",
            ReplError::DbNotFound(_) => "db_not_found",
            ReplError::Unauthorized(_) => "unauthorized",
            ReplError::Transient(_) => "replication_error",
            ReplError::Cancelled => "cancelled",
        }
    }
}
