//! The `typed` example plugin (the same rules as `scripts/app/typed/` in Lua):
//! - every document (except deletions and design documents) needs a string `type`;
//! - `invoice` documents need a non-negative number `amount`;
//! - a document whose current version is `locked` cannot be changed or deleted;
//! - `config` documents may only be written by database admins (names in `secObj.admins`)
//!   or the node admin (`_admin` role), others get 401;
//! - filter `by_type` passes documents whose `type` equals the `type` query parameter.

use thali_plugin_api::{abi, filter, log, validate_doc_update, Reject, Value};

abi!();

fn is_admin(user: &Value, sec: &Value) -> bool {
    let roles = user["roles"].as_array().cloned().unwrap_or_default();
    if roles.iter().any(|r| r == "_admin") {
        return true;
    }
    let names = sec["admins"]["names"].as_array().cloned().unwrap_or_default();
    names.iter().any(|n| *n == user["name"])
}

validate_doc_update!(validate, |new, old, user, sec| {
    if old["locked"] == true {
        return Err(Reject::Forbidden("this document is locked".into()));
    }
    let id = new["_id"].as_str().unwrap_or("");
    if new["_deleted"] == true || id.starts_with("_design/") {
        return Ok(());
    }
    let Some(kind) = new["type"].as_str() else {
        return Err(Reject::Forbidden("documents need a string `type`".into()));
    };
    match kind {
        "invoice" if !new["amount"].as_f64().is_some_and(|a| a >= 0.0) => {
            Err(Reject::Forbidden("invoices need a non-negative `amount`".into()))
        }
        "config" if !is_admin(user, sec) => {
            log(1, &format!("refused config write by {}", user["name"]));
            Err(Reject::Unauthorized("only admins may write config documents".into()))
        }
        _ => Ok(()),
    }
});

filter!(by_type, |doc, req| doc["type"].is_string() && doc["type"] == req["query"]["type"]);
