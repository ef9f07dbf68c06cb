//! Example views (the same as the Lua ones in `scripts/app/views/`), used by the view tests
//! and the benchmark:
//! - `by_type`: `emit(doc.type, doc.n)` for documents with a `type`;
//! - `by_date`: `emit([year, month, day], doc.n)` for documents with a `date` array;
//! - `pair`: `emit(doc.type, [doc.n, 1])`;
//! - `by_key`: `emit(doc.key, doc._id)` for documents with a `key` (collation checks);
//! - `linked`: `emit(doc._id, {"_id": doc.link})` for documents with a `link`;
//! - `fragile`: like `by_type` but throws on `n == 13` (a map that fails on one document);
//! - reduces: `sum` (a custom sum with rereduce) and `grow` (keeps every value: overflows).

use thali_plugin_api::{abi, json, map, reduce, Value};

abi!();

map!(by_type, |doc, e| {
    if let Some(t) = doc.get("type") {
        e.emit(t.clone(), doc["n"].clone());
    }
});

map!(by_date, |doc, e| {
    if let Some(d) = doc.get("date").and_then(Value::as_array) {
        e.emit(Value::Array(d.clone()), doc["n"].clone());
    }
});

map!(pair, |doc, e| {
    if let Some(t) = doc.get("type") {
        e.emit(t.clone(), json!([doc["n"], 1]));
    }
});

map!(by_key, |doc, e| {
    if let Some(k) = doc.get("key") {
        e.emit(k.clone(), doc["_id"].clone());
    }
});

map!(linked, |doc, e| {
    if let Some(l) = doc.get("link") {
        e.emit(doc["_id"].clone(), json!({ "_id": l }));
    }
});

map!(fragile, |doc, e| {
    if doc["n"] == 13 {
        panic!("unlucky document");
    }
    if let Some(t) = doc.get("type") {
        e.emit(t.clone(), doc["n"].clone());
    }
});

reduce!(sum, |_keys, values, _rereduce| {
    let s: f64 = values.iter().filter_map(Value::as_f64).sum();
    if s.fract() == 0.0 {
        json!(s as i64)
    } else {
        json!(s)
    }
});

reduce!(grow, |_keys, values, _rereduce| {
    let mut all = Vec::new();
    for v in values {
        match v {
            Value::Array(a) => all.extend(a.iter().cloned()),
            v => all.push(json!([v, "padding to make the output grow quickly"])),
        }
    }
    Value::Array(all)
});
