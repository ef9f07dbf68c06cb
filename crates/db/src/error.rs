//! The errors of database operations, shaped as CouchDB reports them.

use thali_doc::parse::ParseError;
use thali_store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    #[error("not_found: {0}")]
    NotFound(String),
    #[error("conflict")]
    Conflict,
    #[error("bad_request: {0}")]
    BadRequest(String),
    #[error("doc_validation: {0}")]
    DocValidation(String),
    #[error("illegal_docid: {0}")]
    IllegalDocId(String),
    #[error("illegal_database_name: {0}")]
    IllegalDbName(String),
    #[error("missing_stub: {0}")]
    MissingStub(String),
    #[error("file_exists")]
    FileExists,
    #[error("document_too_large: {0}")]
    DocTooLarge(String),
    /// An attachment over the size limit, also after decompression (413).
    #[error("attachment_too_large: {0}")]
    AttTooLarge(String),
    /// A request that asks for more items than the node serves at once (413, with CouchDB's
    /// `max_bulk_*_count_exceeded` names).
    #[error("{error}: {reason}")]
    TooMany { error: &'static str, reason: String },
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A design document's code does not compile (400).
    #[error("compilation_error: {0}")]
    Compilation(String),
    /// A plugin call failed (trap, limit, bad output): this one operation fails.
    #[error("plugin_error: {0}")]
    Plugin(String),
    /// A view query's parameters do not make sense (400).
    #[error("query_parse_error: {0}")]
    QueryParse(String),
    /// A reduce whose output does not shrink (CouchDB's `reduce_limit`, 500).
    #[error("reduce_overflow_error: {0}")]
    ReduceOverflow(String),
    /// A view in a language this node does not run (JavaScript design documents).
    #[error("unknown_query_language: {0}")]
    UnknownLanguage(String),
    #[error("internal: {0}")]
    Internal(String),
    /// The disk is (nearly) full: nothing was written (507).
    #[error("insufficient_storage: {0}")]
    InsufficientStorage(String),
    /// A refused `_find` or `_index` request, with Mango's own status and names.
    #[error("{0}")]
    Mango(#[from] thali_mango::MangoError),
}

impl DbError {
    /// CouchDB's `error` string.
    pub fn name(&self) -> &'static str {
        match self {
            DbError::NotFound(_) => "not_found",
            DbError::Conflict => "conflict",
            DbError::BadRequest(_) => "bad_request",
            DbError::DocValidation(_) => "doc_validation",
            DbError::IllegalDocId(_) => "illegal_docid",
            DbError::IllegalDbName(_) => "illegal_database_name",
            DbError::MissingStub(_) => "missing_stub",
            DbError::FileExists => "file_exists",
            DbError::DocTooLarge(_) => "document_too_large",
            DbError::AttTooLarge(_) => "attachment_too_large",
            DbError::TooMany { error, .. } => error,
            DbError::Forbidden(_) => "forbidden",
            DbError::Unauthorized(_) => "unauthorized",
            DbError::Compilation(_) => "compilation_error",
            DbError::Plugin(_) => "plugin_error",
            DbError::QueryParse(_) => "query_parse_error",
            DbError::ReduceOverflow(_) => "reduce_overflow_error",
            DbError::UnknownLanguage(_) => "unknown_query_language",
            DbError::InsufficientStorage(_) => "insufficient_storage",
            DbError::Internal(_) => "internal_server_error",
            DbError::Mango(e) => e.error,
        }
    }

    /// CouchDB's `reason` string.
    pub fn reason(&self) -> String {
        match self {
            DbError::Conflict => "Document update conflict.".into(),
            DbError::FileExists => {
                "The database could not be created, the file already exists.".into()
            }
            DbError::NotFound(r)
            | DbError::BadRequest(r)
            | DbError::DocValidation(r)
            | DbError::IllegalDocId(r)
            | DbError::IllegalDbName(r)
            | DbError::MissingStub(r)
            | DbError::DocTooLarge(r)
            | DbError::AttTooLarge(r)
            | DbError::TooMany { reason: r, .. }
            | DbError::Forbidden(r)
            | DbError::Unauthorized(r)
            | DbError::Compilation(r)
            | DbError::Plugin(r)
            | DbError::QueryParse(r)
            | DbError::ReduceOverflow(r)
            | DbError::UnknownLanguage(r)
            | DbError::InsufficientStorage(r)
            | DbError::Internal(r) => r.clone(),
            DbError::Mango(e) => e.reason.clone(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            DbError::NotFound(_) => 404,
            DbError::Conflict => 409,
            DbError::BadRequest(_)
            | DbError::DocValidation(_)
            | DbError::IllegalDocId(_)
            | DbError::IllegalDbName(_)
            | DbError::Compilation(_)
            | DbError::QueryParse(_)
            | DbError::UnknownLanguage(_) => 400,
            DbError::MissingStub(_) | DbError::FileExists => 412,
            DbError::DocTooLarge(_) | DbError::AttTooLarge(_) | DbError::TooMany { .. } => 413,
            DbError::Forbidden(_) => 403,
            DbError::Unauthorized(_) => 401,
            DbError::Plugin(_) | DbError::ReduceOverflow(_) | DbError::Internal(_) => 500,
            DbError::InsufficientStorage(_) => 507,
            DbError::Mango(e) => e.status,
        }
    }

    pub fn missing() -> DbError {
        DbError::NotFound("missing".into())
    }
}

impl From<ParseError> for DbError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::BadRequest(r) => DbError::BadRequest(r),
            ParseError::DocValidation(r) => DbError::DocValidation(r),
            ParseError::IllegalDocId(r) => DbError::IllegalDocId(r),
        }
    }
}

impl From<StoreError> for DbError {
    fn from(e: StoreError) -> Self {
        if let StoreError::Full(reason) = e {
            tracing::warn!(%reason, "write refused");
            return DbError::InsufficientStorage(reason);
        }
        tracing::error!(error = %e, "store error");
        DbError::Internal(e.to_string())
    }
}

impl From<crate::offload::Gone> for DbError {
    fn from(e: crate::offload::Gone) -> Self {
        DbError::Internal(e.to_string())
    }
}

pub type DbResult<T> = Result<T, DbError>;
