//! `GET/POST /{db}/_design/{ddoc}/_view/{view}` and `GET /{db}/_design/{ddoc}/_info`: CouchDB's
//! view query parameters parsed into a `ViewQuery` (400 `query_parse_error` on bad ones).

use super::error::{ApiError, ApiResult};
use super::query::Query;
use super::respond::ok;
use super::{database::open, AppState, Req};
use axum::http::Method;
use axum::response::Response;
use serde_json::Value;
use thali_view::{Update, ViewQuery};

pub async fn view(
    state: &AppState,
    r: &mut Req,
    db: &str,
    ddoc: &str,
    view: &str,
) -> ApiResult<Response> {
    let db = open(state, db).await?;
    let body_keys = r.query_body().await?;
    let q = parse(&r.query, body_keys)?;
    Ok(ok(db.view_query(ddoc, view, q).await?))
}

pub async fn info(state: &AppState, r: &Req, db: &str, ddoc: &str) -> ApiResult<Response> {
    if !matches!(r.method, Method::GET | Method::HEAD) {
        return Err(ApiError::method_not_allowed("GET,HEAD"));
    }
    Ok(ok(open(state, db).await?.view_info(ddoc)?))
}

fn parse(q: &Query, body_keys: Option<Value>) -> ApiResult<ViewQuery> {
    let mut v = ViewQuery {
        keys: match body_keys.or(q.json("keys")?) {
            None => None,
            Some(Value::Array(a)) => Some(a),
            Some(_) => return Err(ApiError::query_parse("`keys` member must be an array.")),
        },
        start_key: q.json_alias(&["startkey", "start_key"])?,
        end_key: q.json_alias(&["endkey", "end_key"])?,
        start_docid: docid(q, &["startkey_docid", "start_key_doc_id"]),
        end_docid: docid(q, &["endkey_docid", "end_key_doc_id"]),
        inclusive_end: q.bool_or("inclusive_end", true)?,
        descending: q.bool("descending")?,
        include_docs: q.bool("include_docs")?,
        attachments: q.bool("attachments")?,
        conflicts: q.bool("conflicts")?,
        update_seq: q.bool("update_seq")?,
        ..Default::default()
    };
    if let Some(key) = q.json("key")? {
        if v.keys.is_some() || v.start_key.is_some() || v.end_key.is_some() {
            return Err(ApiError::query_parse(
                "`keys` is incompatible with `key`, `start_key` and `end_key`",
            ));
        }
        v.start_key = Some(key.clone());
        v.end_key = Some(key);
    }
    if let Some(l) = q.get("limit") {
        v.limit = Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::query_parse("`limit` must be a positive integer."))?,
        );
    }
    if let Some(s) = q.get("skip") {
        v.skip = s
            .parse::<usize>()
            .map_err(|_| ApiError::query_parse("`skip` must be >= 0"))?;
    }
    if q.get("reduce").is_some() {
        v.reduce = Some(q.bool("reduce")?);
    }
    if q.bool("group")? {
        v.group = Some(None);
    }
    if let Some(l) = q.get("group_level") {
        let n = l.parse::<usize>().map_err(|_| {
            ApiError::query_parse(format!("Invalid value for `group_level`: \"{l}\""))
        })?;
        if v.group == Some(None) {
            return Err(ApiError::query_parse(
                "Can't specify group_level and group=true at the same time",
            ));
        }
        // Level 0 folds everything into one row, like no grouping.
        v.group = (n > 0).then_some(Some(n));
    }
    v.update = match (q.get("stale"), q.get("update")) {
        (Some("ok"), _) => Update::False,
        (Some("update_after"), _) => Update::Lazy,
        (Some(s), _) => {
            return Err(ApiError::query_parse(format!(
                "Invalid value for `stale`: \"{s}\" (ok or update_after)"
            )))
        }
        (None, None | Some("true")) => Update::True,
        (None, Some("false")) => Update::False,
        (None, Some("lazy")) => Update::Lazy,
        (None, Some(u)) => {
            return Err(ApiError::query_parse(format!(
                "Invalid value for `update`: \"{u}\" (true, false or lazy)"
            )))
        }
    };
    // `stable` and `sorted` change nothing on one node with sorted indexes.
    q.bool("stable")?;
    q.bool_or("sorted", true)?;
    Ok(v)
}

/// Doc ids come as JSON strings (`"a"`) or, leniently, bare.
fn docid(q: &Query, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| {
        q.get(n).map(|s| match serde_json::from_str::<Value>(s) {
            Ok(Value::String(s)) => s,
            _ => s.to_string(),
        })
    })
}
