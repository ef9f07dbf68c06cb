//! The HTTP boundary's error: a status and CouchDB's `{"error","reason"}` body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use thali_db::DbError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub reason: String,
}

impl ApiError {
    pub fn new(status: u16, error: &str, reason: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            error: error.to_string(),
            reason: reason.into(),
        }
    }
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(400, "bad_request", reason)
    }
    pub fn query_parse(reason: impl Into<String>) -> Self {
        Self::new(400, "query_parse_error", reason)
    }
    pub fn not_found(reason: impl Into<String>) -> Self {
        Self::new(404, "not_found", reason)
    }
    pub fn method_not_allowed(allowed: &str) -> Self {
        Self::new(405, "method_not_allowed", format!("Only {allowed} allowed"))
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "unauthorized", "Name or password is incorrect.")
    }
    pub fn bad_ctype() -> Self {
        Self::new(
            415,
            "bad_content_type",
            "Content-Type must be application/json",
        )
    }
    pub fn too_large() -> Self {
        Self::new(413, "too_large", "the request entity is too large")
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        ApiError::new(e.status(), e.name(), e.reason())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "reason": self.reason});
        super::respond::json_response(self.status, &body)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
