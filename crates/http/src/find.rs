//! Mango over HTTP: `POST /{db}/_find`, `POST /{db}/_explain`, `GET/POST /{db}/_index` and
//! `DELETE /{db}/_index/{ddoc}/json/{name}`. Parsing and planning live in `thali_mango`,
//! execution in `db::find`; this module only reads bodies and picks the method.

use super::database::open;
use super::error::{ApiError, ApiResult};
use super::respond::ok;
use super::{AppState, Req};
use axum::http::Method;
use axum::response::Response;
use thali_db::DbError;
use thali_mango::request::FindRequest;

async fn request(r: &mut Req) -> ApiResult<FindRequest> {
    if r.method != Method::POST {
        return Err(ApiError::method_not_allowed("POST"));
    }
    r.require_json()?;
    let body = r.json().await?;
    Ok(FindRequest::parse(&body).map_err(DbError::from)?)
}

pub async fn find(state: &AppState, r: &mut Req, db: &str) -> ApiResult<Response> {
    let db = open(state, db).await?;
    let req = request(r).await?;
    Ok(ok(db.find(req).await?))
}

pub async fn explain(state: &AppState, r: &mut Req, db: &str) -> ApiResult<Response> {
    let db = open(state, db).await?;
    let req = request(r).await?;
    Ok(ok(db.explain(&req)?))
}

pub async fn index(state: &AppState, r: &mut Req, name: &str) -> ApiResult<Response> {
    let db = open(state, name).await?;
    match r.method {
        Method::GET | Method::HEAD => {
            let num = |k: &str| -> ApiResult<Option<usize>> {
                r.query
                    .get(k)
                    .map(|v| {
                        v.parse::<usize>().map_err(|_| {
                            ApiError::query_parse(format!("Invalid value for {k}: {v}"))
                        })
                    })
                    .transpose()
            };
            Ok(ok(
                db.list_indexes(num("skip")?.unwrap_or(0), num("limit")?)?
            ))
        }
        Method::POST => {
            r.require_json()?;
            let body = r.json().await?;
            Ok(ok(db.create_index(&body, &r.caller(name)).await?))
        }
        _ => Err(ApiError::method_not_allowed("GET,HEAD,POST")),
    }
}

pub async fn delete_index(
    state: &AppState,
    r: &mut Req,
    name: &str,
    ddoc: &str,
    index: &str,
) -> ApiResult<Response> {
    if r.method != Method::DELETE {
        return Err(ApiError::method_not_allowed("DELETE"));
    }
    let db = open(state, name).await?;
    Ok(ok(db.delete_index(ddoc, index, &r.caller(name)).await?))
}
