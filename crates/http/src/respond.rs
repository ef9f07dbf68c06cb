//! Building responses.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::Value;

pub fn json_response<T: serde::Serialize + ?Sized>(status: StatusCode, v: &T) -> Response {
    let mut bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("must-revalidate"),
    );
    r
}

pub fn ok(v: Value) -> Response {
    json_response(StatusCode::OK, &v)
}

pub fn status(code: u16, v: Value) -> Response {
    json_response(StatusCode::from_u16(code).unwrap_or(StatusCode::OK), &v)
}

pub fn with_etag(mut r: Response, rev: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{rev}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}
