//! The `merge` example resolver (the same as `scripts/app/merge/resolve_conflict.lua`):
//! - a version marked `"obsolete": true` deletes the document;
//! - else a version marked `"final": true` is taken as it is (the first one, winner first);
//! - else the winner's fields, with `tags` the sorted union of every version's string tags
//!   and `count` the largest number among the versions' counts.
//!
//! Deterministic, as resolvers must be: every node that meets the conflict computes the same
//! body, so their resolutions are the same revision.

use thali_plugin_api::{abi, json, resolve_conflict, Value};

abi!();

resolve_conflict!(resolve, |docs| {
    if docs.iter().any(|d| d["obsolete"] == true) {
        return json!({"_deleted": true});
    }
    if let Some(d) = docs.iter().find(|d| d["final"] == true) {
        return d.clone();
    }
    let Some(Value::Object(mut merged)) = docs.first().cloned() else {
        return Value::Null;
    };
    let mut tags: Vec<String> = Vec::new();
    let mut count: Option<&Value> = None;
    for d in docs {
        for t in d["tags"].as_array().into_iter().flatten() {
            if let Some(t) = t.as_str() {
                if !tags.iter().any(|x| x == t) {
                    tags.push(t.to_string());
                }
            }
        }
        if let Some(c) = d["count"].as_f64() {
            if count.and_then(Value::as_f64).is_none_or(|best| c > best) {
                count = Some(&d["count"]);
            }
        }
    }
    tags.sort();
    merged.insert(
        "tags".into(),
        Value::Array(tags.into_iter().map(Value::String).collect()),
    );
    match count {
        Some(c) => merged.insert("count".into(), c.clone()),
        None => merged.remove("count"),
    };
    Value::Object(merged)
});
