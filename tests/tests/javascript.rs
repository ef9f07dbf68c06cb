//! JavaScript design documents (CouchDB's default language) through the real binary's HTTP API:
//! validators enforced with CouchDB's answers, write-time compilation errors, map/reduce views
//! with CommonJS modules, filters (incl. `filter=_view`), hostile scripts bounded while the
//! node keeps serving, `--store-only-language`, and `.js` files in a `--dev` folder.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use thali_tests::{Client, Node, TempDir};

fn ids(changes: &Value) -> Vec<String> {
    changes["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn couchdb_validators_are_enforced() {
    let dir = TempDir::new("js-validate");
    let n = Node::start(&dir.0);
    n.put("/jsv", &json!({}));
    // The example from CouchDB's docs, as a new user tries it.
    let r = n.put(
        "/jsv/_design/guard",
        &json!({"validate_doc_update": "function(n,o,u,s){ throw({forbidden:\"no writes\"}); }"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = n.put("/jsv/x", &json!({"a": 1}));
    r.assert_error(403, "forbidden");
    assert_eq!(r.json()["reason"], "no writes");
    // Design documents are not validated (an admin can always fix a broken validator).
    let rev = r_rev(&n, "/jsv/_design/guard");
    let r = n.put(
        "/jsv/_design/guard",
        &json!({"_rev": rev, "language": "javascript",
                "validate_doc_update": "function(newDoc, oldDoc, userCtx) { if (!userCtx.name) throw({unauthorized: 'log in'}); if (newDoc.n > 9) throw({forbidden: 'n is ' + newDoc.n}); }"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(n.put("/jsv/ok", &json!({"n": 1})).status, 201);
    let r = n.put("/jsv/big", &json!({"n": 10}));
    r.assert_error(403, "forbidden");
    assert_eq!(r.json()["reason"], "n is 10");
    // _bulk_docs: per document, both modes.
    let res = n
        .post(
            "/jsv/_bulk_docs",
            &json!({"docs": [{"_id": "b1", "n": 2}, {"_id": "b2", "n": 20}]}),
        )
        .json();
    assert_eq!(res[0]["ok"], true, "{res}");
    assert_eq!(res[1]["error"], "forbidden", "{res}");
    let res = n
        .post(
            "/jsv/_bulk_docs",
            &json!({"new_edits": false, "docs": [{"_id": "r1", "_rev": "1-abc", "n": 99}]}),
        )
        .json();
    assert_eq!(res[0]["error"], "forbidden", "{res}");
    assert_eq!(n.get("/jsv/r1").status, 404);
    // A validator that throws an Error is a broken validator: 500, nothing written.
    n.put("/jsv2", &json!({}));
    n.put(
        "/jsv2/_design/broken",
        &json!({"validate_doc_update": "function(doc) { return doc.missing.field; }"}),
    );
    let r = n.put("/jsv2/y", &json!({}));
    r.assert_error(500, "plugin_error");
    assert!(r.json()["reason"].as_str().unwrap().contains("TypeError"));
    assert_eq!(n.get("/jsv2/y").status, 404);

    // Code that does not compile is refused when written, with the engine's message.
    let r = n.put(
        "/jsv/_design/bad",
        &json!({"views": {"v": {"map": "function(doc) { emit(doc._id, }"}}}),
    );
    r.assert_error(400, "compilation_error");
    let reason = r.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("views.v.map") && reason.contains("SyntaxError"),
        "{reason}"
    );
    n.put("/jsv/_design/bad2", &json!({"validate_doc_update": "42"}))
        .assert_error(400, "compilation_error");
    // A language the node does not run is refused, not stored silently.
    n.put(
        "/jsv/_design/erl",
        &json!({"language": "erlang", "views": {"v": {"map": "fun({Doc}) -> Emit(1, 1) end."}}}),
    )
    .assert_error(400, "compilation_error");
}

fn r_rev(n: &Node, path: &str) -> String {
    n.get(path).json()["_rev"].as_str().unwrap().to_string()
}

#[test]
fn store_only_languages_are_explicit() {
    let dir = TempDir::new("js-relay");
    let n = Node::start_with(&dir.0, &["--store-only-language", "erlang"]);
    n.put("/relay", &json!({}));
    let r = n.put(
        "/relay/_design/erl",
        &json!({"language": "erlang", "validate_doc_update": "fun(_, _, _, _) -> throw({forbidden, <<\"no\">>}) end."}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // Stored, not run: the relay says so when asked for its views, and does not enforce.
    assert_eq!(n.put("/relay/x", &json!({})).status, 201);
    let r = n.put(
        "/relay/_design/erlv",
        &json!({"language": "erlang", "views": {"v": {"map": "fun({Doc}) -> Emit(1, 1) end."}}}),
    );
    assert_eq!(r.status, 201);
    let r = n.get("/relay/_design/erlv/_view/v");
    r.assert_error(400, "unknown_query_language");
    assert!(r.json()["reason"]
        .as_str()
        .unwrap()
        .contains("--store-only-language"));
}

#[test]
fn views_map_reduce_and_modules() {
    let dir = TempDir::new("js-views");
    let n = Node::start(&dir.0);
    n.put("/v", &json!({}));
    let mut docs: Vec<Value> = (0..10)
        .map(|i| json!({"_id": format!("d{i}"), "n": i, "tag": i % 3}))
        .collect();
    docs.push(json!({"_id": "zbad", "n": 100, "tag": 0, "bad": true}));
    n.post("/v/_bulk_docs", &json!({ "docs": docs }));
    let r = n.put(
        "/v/_design/app",
        &json!({
            "views": {
                "lib": {"scale": "exports.k = require('./base').k * 5;", "base": "module.exports = {k: 2};"},
                "by_tag": {
                    "map": "function (doc) { if (doc.bad) throw new Error('bad doc'); var s = require('views/lib/scale'); emit(doc.tag, doc.n * s.k); }",
                    "reduce": "function (keys, values, rereduce) { return sum(values); }"
                },
                "pairs": {"map": "doc => { emit([doc.tag, doc.n]); }", "reduce": "_count"},
                "big": {"map": "function (doc) { if (doc.n > 7 && !doc.bad) emit(doc._id, doc.n); }"},
                "dups": {"map": "function (doc) { if (doc._id === 'd1') { emit('k', 'z'); emit('k', 'a'); emit('k', 1); } }"}
            },
            "filters": {"above": "function (doc, req) { return doc.n > Number(req.query.min); }"}
        }),
    );
    assert_eq!(r.status, 201, "{}", r.text());

    let rows = n.get("/v/_design/app/_view/by_tag?reduce=false").json();
    assert_eq!(
        rows["total_rows"], 10,
        "the throwing document is skipped: {rows}"
    );
    assert_eq!(rows["rows"][0], json!({"id": "d0", "key": 0, "value": 0}));
    assert_eq!(rows["rows"][9], json!({"id": "d8", "key": 2, "value": 80}));
    let grouped = n.get("/v/_design/app/_view/by_tag?group=true").json();
    assert_eq!(
        grouped["rows"],
        json!([{"key": 0, "value": 180}, {"key": 1, "value": 120}, {"key": 2, "value": 150}])
    );
    // A document's rows with equal keys come ordered by value (CouchDB), whatever the emit order.
    let dups = n.get("/v/_design/app/_view/dups").json();
    let values: Vec<&Value> = dups["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["value"])
        .collect();
    assert_eq!(values, [&json!(1), &json!("a"), &json!("z")]);
    // limit=0 on a reduce: no rows.
    let none = n
        .get("/v/_design/app/_view/by_tag?group=true&limit=0")
        .json();
    assert_eq!(none["rows"], json!([]));
    let all = n.get("/v/_design/app/_view/by_tag").json();
    assert_eq!(all["rows"], json!([{"key": null, "value": 450}]));
    // emit(key) alone: the value is null; built-in reduce with group_level.
    let pairs = n
        .get("/v/_design/app/_view/pairs?reduce=false&limit=1")
        .json();
    assert_eq!(pairs["rows"][0]["value"], Value::Null);
    let lvl = n.get("/v/_design/app/_view/pairs?group_level=1").json();
    assert_eq!(lvl["rows"][0], json!({"key": [0], "value": 5}));

    // Filters: a function, and `_view` (documents the map emits for).
    let ch = n.get("/v/_changes?filter=app/above&min=6").json();
    let mut got = ids(&ch);
    got.sort();
    assert_eq!(got, ["d7", "d8", "d9", "zbad"]);
    let ch = n.get("/v/_changes?filter=_view&view=app/big").json();
    let mut got = ids(&ch);
    got.sort();
    assert_eq!(got, ["d8", "d9"]);
    n.get("/v/_changes?filter=_view&view=app/nope")
        .assert_error(404, "not_found");
    n.get("/v/_changes?filter=_view")
        .assert_error(400, "bad_request");

    // Incremental: a new document and a changed module both show.
    n.put("/v/d10", &json!({"n": 10, "tag": 1}));
    let one = n.get("/v/_design/app/_view/by_tag?key=1&group=true").json();
    assert_eq!(one["rows"], json!([{"key": 1, "value": 220}]));
}

#[test]
fn hostile_scripts_fail_their_call_only() {
    let dir = TempDir::new("js-hostile");
    let n = Node::start_with(&dir.0, &["--plugin-timeout-ms", "1000"]);
    let hostile = [
        ("spin", "function () { while (true) {} }", "limit exceeded"),
        ("recurse", "function f(doc) { return f(doc) + 1; }", "stack"),
        (
            "bomb",
            "function () { var a = []; for (;;) a.push(new Array(100000).fill(a.length)); }",
            "memory",
        ),
        (
            "regex",
            "function (doc) { return /(a+)+b/.test('a'.repeat(40)); }",
            "limit exceeded",
        ),
    ];
    for (name, code, expect) in hostile {
        let db = format!("/h_{name}");
        n.put(&db, &json!({}));
        let r = n.put(
            &format!("{db}/_design/h"),
            &json!({"validate_doc_update": code}),
        );
        assert_eq!(r.status, 201, "{name}: {}", r.text());
        let started = Instant::now();
        let r = n.put(&format!("{db}/doc"), &json!({"x": 1}));
        r.assert_error(500, "plugin_error");
        let reason = r.json()["reason"].as_str().unwrap().to_string();
        assert!(reason.contains(expect), "{name}: {reason}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            started.elapsed()
        );
        assert_eq!(n.get(&format!("{db}/doc")).status, 404, "{name}");
        // The node still serves, and other databases still write.
        assert_eq!(n.get("/").status, 200);
        n.put("/fine", &json!({}));
        assert_eq!(n.post("/fine", &json!({"after": name})).status, 201);
    }
    // Huge output from a map: that document is skipped, the view answers.
    n.put("/h_out", &json!({}));
    n.put("/h_out/small", &json!({"n": 1}));
    n.put("/h_out/huge", &json!({"n": 2, "huge": true}));
    n.put(
        "/h_out/_design/h",
        &json!({"views": {"v": {"map": "function (doc) { emit(doc.n, doc.huge ? 'x'.repeat(20 << 20) : null); }"}}}),
    );
    let rows = n.get("/h_out/_design/h/_view/v").json();
    assert_eq!(
        rows["rows"],
        json!([{"id": "small", "key": 1, "value": null}])
    );
}

#[test]
fn dev_folder_takes_js_files() {
    let dir = TempDir::new("js-dev");
    let devdir = dir.0.join("dev");
    let folder = devdir.join("app").join("rules");
    std::fs::create_dir_all(folder.join("views/by_v")).unwrap();
    std::fs::create_dir_all(folder.join("views/lib")).unwrap();
    std::fs::write(
        folder.join("validate_doc_update.js"),
        "function (doc) { if (doc.v === 1) throw({forbidden: 'one'}); }",
    )
    .unwrap();
    std::fs::write(folder.join("views/lib/twice.js"), "exports.f = x => 2 * x;").unwrap();
    std::fs::write(
        folder.join("views/by_v/map.js"),
        "function (doc) { emit(doc.v, require('views/lib/twice').f(doc.v)); }",
    )
    .unwrap();
    std::fs::write(folder.join("views/by_v/reduce.js"), "_sum").unwrap();
    let data = dir.0.join("data");
    let n = Node::start_with(&data, &["--dev", devdir.to_str().unwrap()]);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}");
    };
    wait("the design document", &|| {
        n.get("/app/_design/rules").status == 200
    });
    let ddoc = n.get("/app/_design/rules").json();
    assert_eq!(ddoc["language"], "javascript");
    n.put("/app/a", &json!({"v": 1}))
        .assert_error(403, "forbidden");
    assert_eq!(n.put("/app/b", &json!({"v": 3})).status, 201);
    let sum = n.get("/app/_design/rules/_view/by_v").json();
    assert_eq!(sum["rows"], json!([{"key": null, "value": 6}]));
    std::fs::write(
        folder.join("validate_doc_update.js"),
        "function (doc) { if (doc.v === 2) throw({forbidden: 'two'}); }",
    )
    .unwrap();
    wait("the new validator", &|| {
        n.post("/app", &json!({"v": 2})).status == 403
    });
    assert_eq!(n.post("/app", &json!({"v": 1})).status, 201);
}
