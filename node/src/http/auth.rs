//! Who is asking, and the one place that decides what they may do on this listener.

use super::error::{ApiError, ApiResult};
use super::{HttpConfig, Req};
use axum::http::{header, HeaderMap, Method};
use base64::Engine;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The local admin, authenticated with basic auth.
    Admin,
    Anonymous,
}

pub fn principal(headers: &HeaderMap, cfg: &HttpConfig) -> Principal {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Principal::Anonymous;
    };
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Principal::Anonymous;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return Principal::Anonymous;
    };
    let Ok(s) = String::from_utf8(raw) else {
        return Principal::Anonymous;
    };
    match s.split_once(':') {
        Some(("admin", pw)) if constant_time_eq(pw.as_bytes(), cfg.admin_password.as_bytes()) => {
            Principal::Admin
        }
        _ => Principal::Anonymous,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Anonymous callers may read `GET /` and `/_up` (and reach `/_session`, which answers 404
/// so replicators fall back to basic auth); everything else needs the admin.
pub fn authorize(r: &Req) -> ApiResult<()> {
    if r.principal == Principal::Admin {
        return Ok(());
    }
    let open = matches!(
        (&r.method, r.segments.first().map(String::as_str)),
        (&Method::GET | &Method::HEAD, None | Some("_up")) | (_, Some("_session"))
    ) && r.segments.len() <= 1;
    if open {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}
