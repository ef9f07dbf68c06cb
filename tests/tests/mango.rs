//! Mango (`_find`, `_index`, `_explain`) through the real binary: every operator with and without
//! JSON indexes (the same answers either way; `_explain` shows which index answered), sorting,
//! `fields`, partial indexes, bookmark paging through 10k documents while other clients write,
//! and the errors CouchDB gives for bad requests.

use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use thali_tests::{Client, Node, TempDir};

fn start(tag: &str) -> (TempDir, Node) {
    let dir = TempDir::new(tag);
    let n = Node::start(&dir.0);
    assert_eq!(n.put("/db", &json!({})).status, 201);
    (dir, n)
}

const NAMES: [&str; 5] = ["ann", "bob", "bea", "cid", "eve"];

/// Document `i`: most have every field; every 9th lacks `n`, every 11th has a string `n`.
fn doc(i: usize) -> Value {
    let mut d = json!({
        "_id": format!("d{i:03}"),
        "name": NAMES[i % 5],
        "nested": {"x": i % 7},
        "tags": (0..(i % 4)).map(|t| format!("t{t}")).collect::<Vec<_>>(),
        "s": format!("s{i}"),
        "type": if i.is_multiple_of(2) { "user" } else { "item" },
    });
    if !i.is_multiple_of(9) {
        d["n"] = if i.is_multiple_of(11) {
            json!(format!("{i}"))
        } else {
            json!(i)
        };
    }
    d
}

const N: usize = 200;

fn load(n: &Node) {
    let docs: Vec<Value> = (0..N).map(doc).collect();
    let r = n.post("/db/_bulk_docs", &json!({ "docs": docs }));
    assert_eq!(r.status, 201, "{}", r.text());
}

fn find(n: &Node, body: Value) -> Value {
    let r = n.post("/db/_find", &body);
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()
}

fn ids(v: &Value) -> Vec<String> {
    v["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["_id"].as_str().unwrap().to_string())
        .collect()
}

fn id_set(v: &Value) -> BTreeSet<String> {
    ids(v).into_iter().collect()
}

fn expect(f: impl Fn(usize, &Value) -> bool) -> BTreeSet<String> {
    (0..N)
        .filter(|i| f(*i, &doc(*i)))
        .map(|i| format!("d{i:03}"))
        .collect()
}

fn num(d: &Value) -> Option<f64> {
    d.get("n").and_then(Value::as_f64)
}

/// Selectors and the documents each must return, decided from the data above.
#[allow(clippy::type_complexity)]
fn cases() -> Vec<(Value, Box<dyn Fn(usize, &Value) -> bool>)> {
    vec![
        (
            json!({"n": {"$gte": 10, "$lt": 20}}),
            Box::new(|_, d| num(d).is_some_and(|n| (10.0..20.0).contains(&n))),
        ),
        (json!({"n": 33}), Box::new(|_, d| num(d) == Some(33.0))),
        // CouchDB compares across types by collation: every string is above every number.
        (
            json!({"n": {"$gt": 190}}),
            Box::new(|i, d| num(d).is_some_and(|n| n > 190.0) || (i % 9 != 0 && i % 11 == 0)),
        ),
        (
            json!({"n": {"$lte": 5}}),
            Box::new(|_, d| num(d).is_some_and(|n| n <= 5.0)),
        ),
        (
            json!({"n": {"$gt": 195, "$type": "number"}}),
            Box::new(|_, d| num(d).is_some_and(|n| n > 195.0)),
        ),
        (
            json!({"n": {"$type": "string"}}),
            Box::new(|i, _| i % 9 != 0 && i % 11 == 0),
        ),
        (
            json!({"n": {"$exists": false}}),
            Box::new(|i, _| i % 9 == 0),
        ),
        (
            json!({"n": {"$ne": 4}}),
            Box::new(|i, d| i % 9 != 0 && num(d) != Some(4.0)),
        ),
        (json!({"name": "bob"}), Box::new(|i, _| i % 5 == 1)),
        (
            json!({"name": {"$beginsWith": "b"}}),
            Box::new(|i, _| matches!(i % 5, 1 | 2)),
        ),
        (
            json!({"name": {"$in": ["ann", "eve"]}}),
            Box::new(|i, _| matches!(i % 5, 0 | 4)),
        ),
        (
            json!({"name": {"$nin": ["ann", "eve"]}}),
            Box::new(|i, _| !matches!(i % 5, 0 | 4)),
        ),
        (
            json!({"name": "bob", "n": {"$lt": 50}}),
            Box::new(|i, d| i % 5 == 1 && num(d).is_some_and(|n| n < 50.0)),
        ),
        (
            json!({"nested.x": {"$in": [1, 2]}}),
            Box::new(|i, _| matches!(i % 7, 1 | 2)),
        ),
        (
            json!({"$or": [{"n": 5}, {"name": "eve"}]}),
            Box::new(|i, d| num(d) == Some(5.0) || i % 5 == 4),
        ),
        (
            json!({"$nor": [{"name": "ann"}, {"type": "user"}]}),
            Box::new(|i, _| i % 5 != 0 && i % 2 == 1),
        ),
        (
            json!({"$not": {"type": "user"}}),
            Box::new(|i, _| i % 2 == 1),
        ),
        (
            json!({"tags": {"$elemMatch": {"$eq": "t2"}}}),
            Box::new(|i, _| i % 4 == 3),
        ),
        (
            json!({"tags": {"$all": ["t0", "t1"]}}),
            Box::new(|i, _| i % 4 >= 2),
        ),
        (json!({"tags": {"$size": 0}}), Box::new(|i, _| i % 4 == 0)),
        (
            json!({"tags": {"$allMatch": {"$beginsWith": "t"}}, "tags.0": {"$exists": true}}),
            Box::new(|i, _| i % 4 != 0),
        ),
        (
            json!({"s": {"$regex": "^s1[0-9]$"}}),
            Box::new(|i, _| (10..20).contains(&i)),
        ),
        (
            json!({"n": {"$mod": [50, 0]}}),
            Box::new(|_, d| num(d).is_some_and(|n| n as i64 % 50 == 0)),
        ),
        (
            json!({"nested": {"$keyMapMatch": {"$eq": "x"}}}),
            Box::new(|_, _| true),
        ),
        (json!({"_id": {"$gt": "d190"}}), Box::new(|i, _| i > 190)),
        (
            json!({"_id": {"$beginsWith": "d01"}}),
            Box::new(|i, _| (10..20).contains(&i)),
        ),
        (
            json!({"type": "user", "n": {"$gte": 100}}),
            Box::new(|i, d| {
                i % 2 == 0 && (num(d).is_some_and(|n| n >= 100.0) || d["n"].is_string())
            }),
        ),
        (json!({"n": {"$gt": 50, "$lt": 40}}), Box::new(|_, _| false)),
    ]
}

fn run_cases(n: &Node) {
    for (sel, want) in cases() {
        let got = find(n, json!({"selector": sel, "limit": 1000}));
        assert_eq!(id_set(&got), expect(want), "selector {sel}");
    }
}

fn explain_index(n: &Node, body: Value) -> String {
    let r = n.post("/db/_explain", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["index"]["name"].as_str().unwrap().to_string()
}

#[test]
fn operators_answer_the_same_with_and_without_indexes() {
    let (_d, n) = start("mango-ops");
    load(&n);
    // Without indexes every query scans `_all_docs` and says so.
    run_cases(&n);
    let r = find(&n, json!({"selector": {"name": "bob"}}));
    assert_eq!(
        r["warning"],
        "No matching index found, create an index to optimize query time."
    );
    assert_eq!(r["docs"].as_array().unwrap().len(), 25, "default limit");
    assert_eq!(
        explain_index(&n, json!({"selector": {"n": 1}})),
        "_all_docs"
    );

    for (fields, name) in [
        (json!(["n"]), "by_n"),
        (json!(["name", "n"]), "by_name_n"),
        (json!(["nested.x"]), "by_x"),
        (json!(["name"]), "by_name"),
    ] {
        let r = n.post(
            "/db/_index",
            &json!({"index": {"fields": fields}, "ddoc": "idx", "name": name}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["result"], "created");
    }
    let again = n.post(
        "/db/_index",
        &json!({"index": {"fields": ["n"]}, "ddoc": "idx", "name": "by_n"}),
    );
    assert_eq!(
        again.json(),
        json!({"result": "exists", "id": "_design/idx", "name": "by_n"})
    );
    // The same answers through the indexes.
    run_cases(&n);
    assert_eq!(
        explain_index(&n, json!({"selector": {"n": {"$gt": 3}}})),
        "by_n"
    );
    assert_eq!(
        explain_index(&n, json!({"selector": {"name": "bob", "n": {"$gt": 3}}})),
        "by_name_n"
    );
    assert_eq!(
        explain_index(&n, json!({"selector": {"name": "bob"}})),
        "by_name"
    );
    assert_eq!(
        explain_index(&n, json!({"selector": {"nested.x": 3}})),
        "by_x"
    );
    let r = find(
        &n,
        json!({"selector": {"n": {"$gte": 10, "$lt": 20}}, "execution_stats": true}),
    );
    assert!(r.get("warning").is_none(), "{r}");
    let stats = &r["execution_stats"];
    // 18 has no `n` and 11 a string one.
    assert_eq!(stats["results_returned"], 8);
    assert!(
        stats["total_docs_examined"].as_u64().unwrap() <= 9,
        "the index narrows the scan: {stats}"
    );

    // Sorting: by an index, both directions; after an `$eq`-fixed column; refused without one.
    let r = find(
        &n,
        json!({"selector": {"n": {"$gte": 0}}, "sort": [{"n": "desc"}], "limit": 5}),
    );
    let ns: Vec<Value> = r["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["n"].clone())
        .collect();
    // Strings collate after numbers, so the string `n`s come first in descending order.
    assert!(
        ns.iter().take_while(|v| v.is_string()).count() >= 1,
        "{ns:?}"
    );
    let r = find(
        &n,
        json!({"selector": {"n": {"$lt": 1000}}, "sort": ["n"], "limit": 1000}),
    );
    let ns: Vec<f64> = r["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["n"].as_f64().unwrap())
        .collect();
    assert!(
        ns.windows(2).all(|w| w[0] <= w[1]) && ns.len() > 150,
        "{ns:?}"
    );
    let r = find(
        &n,
        json!({"selector": {"name": "cid"}, "sort": [{"name": "desc"}, {"n": "desc"}], "limit": 3}),
    );
    let ns: Vec<f64> = r["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["n"].as_f64().unwrap_or(f64::MAX))
        .collect();
    assert!(ns.windows(2).all(|w| w[0] >= w[1]), "{ns:?}");
    assert_eq!(
        explain_index(&n, json!({"selector": {"name": "cid"}, "sort": ["n"]})),
        "by_name_n"
    );
    n.post(
        "/db/_find",
        &json!({"selector": {"s": {"$gt": null}}, "sort": ["s"]}),
    )
    .assert_error(400, "no_usable_index");
    // `_id` sorts need no index.
    let r = find(
        &n,
        json!({"selector": {"type": "item"}, "sort": [{"_id": "desc"}], "limit": 2}),
    );
    assert_eq!(ids(&r), ["d199", "d197"]);

    // fields, skip, limit, conflicts.
    let r = find(
        &n,
        json!({"selector": {"n": {"$gte": 20}}, "sort": ["n"], "fields": ["_id", "nested.x"], "skip": 2, "limit": 2}),
    );
    assert_eq!(
        r["docs"],
        json!([{"_id": "d023", "nested": {"x": 2}}, {"_id": "d024", "nested": {"x": 3}}])
    );

    // Index list and deletion.
    let list = n.get("/db/_index").json();
    assert_eq!(list["total_rows"], 5);
    assert_eq!(list["indexes"][0]["name"], "_all_docs");
    assert_eq!(
        list["indexes"][3],
        json!({"ddoc": "_design/idx", "name": "by_name_n", "type": "json", "partitioned": false,
               "def": {"fields": [{"name": "asc"}, {"n": "asc"}]}})
    );
    assert_eq!(
        n.delete("/db/_index/idx/json/by_n").json(),
        json!({"ok": true})
    );
    assert_eq!(
        n.delete("/db/_index/_design/idx/json/by_x").json(),
        json!({"ok": true})
    );
    n.delete("/db/_index/idx/json/by_n")
        .assert_error(404, "not_found");
    assert_eq!(n.get("/db/_index").json()["total_rows"], 3);
    run_cases(&n);
}

#[test]
fn partial_indexes_are_used_only_when_asked_for() {
    let (_d, n) = start("mango-partial");
    load(&n);
    let r = n.post(
        "/db/_index",
        &json!({"index": {"fields": ["n"], "partial_filter_selector": {"type": "user"}},
                "ddoc": "p", "name": "users_by_n"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // pouchdb-find lists indexes through `_design_docs`: design documents only, either way.
    assert_eq!(
        n.put("/db/_design/other", &json!({"language": "lua"}))
            .status,
        201
    );
    for q in [
        "",
        "?descending=true",
        "?startkey=%22_design%2Fo%22",
        "?endkey=%22zzz%22&include_docs=true",
    ] {
        let r = n.get(&format!("/db/_design_docs{q}")).json();
        let rows: Vec<&str> = r["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        let mut want = vec!["_design/other", "_design/p"];
        if q.contains("descending") {
            want.reverse();
        }
        assert_eq!(rows, want, "{q}");
    }
    let sel = json!({"type": "user", "n": {"$lt": 30}});
    assert_eq!(explain_index(&n, json!({"selector": sel})), "_all_docs");
    let r = find(&n, json!({"selector": sel, "use_index": "p"}));
    assert!(r.get("warning").is_none(), "{r}");
    assert_eq!(
        id_set(&r),
        expect(|i, d| i % 2 == 0 && num(d).is_some_and(|n| n < 30.0))
    );
    assert_eq!(
        explain_index(
            &n,
            json!({"selector": sel, "use_index": ["p", "users_by_n"]})
        ),
        "users_by_n"
    );
    // A `use_index` that cannot answer: a fallback with a warning, or an error.
    let r = find(
        &n,
        json!({"selector": {"name": "bob"}, "use_index": "nope"}),
    );
    assert!(
        r["warning"]
            .as_str()
            .unwrap()
            .contains("_design/nope was not used"),
        "{r}"
    );
    n.post(
        "/db/_find",
        &json!({"selector": {"name": "bob"}, "use_index": "nope", "allow_fallback": false}),
    )
    .assert_error(400, "invalid_index");
    // The partial index follows edits: a document leaving the filter leaves the index.
    let d = n.get("/db/d002").json();
    let mut d2 = d.clone();
    d2["type"] = json!("item");
    assert_eq!(n.put("/db/d002", &d2).status, 201);
    let r = find(
        &n,
        json!({"selector": {"n": {"$lt": 30}}, "use_index": "p", "limit": 100}),
    );
    assert!(!ids(&r).contains(&"d002".to_string()));
}

#[test]
fn bookmarks_page_through_10k_documents_while_others_write() {
    let (_d, n) = start("mango-paging");
    const DOCS: usize = 10_000;
    for chunk in (0..DOCS).collect::<Vec<_>>().chunks(2000) {
        let docs: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"_id": format!("p{i:05}"), "k": (i * 7919) % DOCS, "v": 0}))
            .collect();
        assert_eq!(
            n.post("/db/_bulk_docs", &json!({ "docs": docs })).status,
            201
        );
    }
    let r = n.post(
        "/db/_index",
        &json!({"index": {"fields": ["k"]}, "name": "k"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let addr = n.addr;
    let url = n.url();
    for (round, (sort, selector)) in [
        (json!(["k"]), json!({"k": {"$gte": 0}})),
        (json!([{"k": "desc"}]), json!({"k": {"$gte": 0}})),
        // No index: `_all_docs` in id order.
        (
            json!([]),
            json!({"v": {"$gte": 0}, "_id": {"$beginsWith": "p"}}),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        // Writers meanwhile: new documents outside the original set, and edits of a field the
        // index does not hold.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let url = url.clone();
            std::thread::spawn(move || {
                let _ = url;
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 100_000 {
                    let id = format!("x{round}-{i:06}");
                    let body =
                        serde_json::to_vec(&json!({"_id": id, "k": i % 5000, "v": 1})).unwrap();
                    let h = vec![
                        ("Authorization".to_string(), thali_tests::admin_auth()),
                        ("Content-Type".to_string(), "application/json".to_string()),
                    ];
                    let r = thali_tests::request(addr, "POST", "/db", &h, Some(&body));
                    assert_eq!(r.status, 201, "{}", r.text());
                    i += 1;
                }
                i
            })
        };
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut bookmark = Value::Null;
        let mut last_k: Option<i64> = None;
        let desc = sort
            .as_array()
            .unwrap()
            .first()
            .is_some_and(|s| s.is_object());
        for page in 0.. {
            assert!(page < 200, "paging does not end");
            let r = find(
                &n,
                json!({"selector": selector, "sort": sort, "limit": 300, "bookmark": bookmark}),
            );
            let docs = r["docs"].as_array().unwrap().clone();
            if docs.is_empty() {
                break;
            }
            for d in &docs {
                let id = d["_id"].as_str().unwrap().to_string();
                if id.starts_with('p') && sort != json!([]) {
                    let k = d["k"].as_i64().unwrap();
                    if let Some(l) = last_k {
                        assert!(if desc { k <= l } else { k >= l }, "order broken at {id}");
                    }
                    last_k = Some(k);
                }
                *seen.entry(id).or_default() += 1;
            }
            bookmark = r["bookmark"].clone();
            // Edit a page's first original document: its indexed field stays.
            if let Some(first) = docs
                .iter()
                .find(|d| d["_id"].as_str().unwrap().starts_with('p'))
            {
                let mut e = first.clone();
                e["v"] = json!(e["v"].as_i64().unwrap_or(0) + 1);
                if let Some(m) = e.as_object_mut() {
                    m.remove("_conflicts");
                }
                let r = n.put(&format!("/db/{}", first["_id"].as_str().unwrap()), &e);
                assert_eq!(r.status, 201, "{}", r.text());
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let written = writer.join().unwrap();
        assert!(written > 0, "the writer ran alongside");
        for i in 0..DOCS {
            let id = format!("p{i:05}");
            assert_eq!(seen.get(&id).copied(), Some(1), "{id} with sort {sort}");
        }
        assert!(seen.values().all(|c| *c == 1), "no document twice");
    }
    let _ = url;
}

#[test]
fn bad_requests_get_couchdb_errors_and_change_nothing() {
    let (_d, n) = start("mango-bad");
    load(&n);
    let post = |path: &str, body: Value| n.post(path, &body);
    post("/db/_find", json!({})).assert_error(400, "missing_required_key");
    post("/db/_find", json!({"selector": 1})).assert_error(400, "invalid_selector_json");
    post("/db/_find", json!({"selector": {"a": {"$bogus": 1}}}))
        .assert_error(400, "invalid_operator");
    post("/db/_find", json!({"selector": {"a": {"$regex": "("}}})).assert_error(400, "bad_arg");
    post("/db/_find", json!({"selector": {}, "limit": -1}))
        .assert_error(400, "invalid_non_neg_integer");
    post("/db/_find", json!({"selector": {}, "bookmark": "!!!"}))
        .assert_error(400, "invalid_bookmark");
    post("/db/_find", json!({"selector": {}, "bookmark": "dmZvbw"}))
        .assert_error(400, "invalid_bookmark");
    post("/db/_find", json!({"selector": {}, "sort": [{"a": "up"}]}))
        .assert_error(400, "invalid_sort_dir");
    post(
        "/db/_find",
        json!({"selector": {}, "sort": ["a", {"b": "desc"}]}),
    )
    .assert_error(400, "unsupported_mixed_sort");
    post("/db/_find", json!({"selector": {}, "frobnicate": true})).assert_error(400, "invalid_key");
    post("/nodb/_find", json!({"selector": {}})).assert_error(404, "not_found");
    post("/db/_index", json!({"index": {"fields": []}})).assert_error(400, "invalid_index");
    post(
        "/db/_index",
        json!({"index": {"fields": ["a"]}, "type": "text"}),
    )
    .assert_error(501, "index_not_implemented");
    post(
        "/db/_index",
        json!({"index": {"fields": ["a"]}, "ddoc": ""}),
    )
    .assert_error(400, "invalid_empty_string");
    n.get("/db/_find").assert_error(405, "method_not_allowed");
    let r = n.raw(
        "POST",
        "/db/_find",
        &[("Content-Type", "text/plain")],
        Some(b"{}"),
    );
    r.assert_error(415, "bad_content_type");
    let r = n.raw(
        "POST",
        "/db/_find",
        &[("Content-Type", "application/json")],
        Some(b"{\"selector\":"),
    );
    r.assert_error(400, "bad_request");
    // An index cannot go into a design document of another language.
    assert_eq!(
        n.put("/db/_design/lua", &json!({"language": "lua"})).status,
        201
    );
    post(
        "/db/_index",
        json!({"index": {"fields": ["a"]}, "ddoc": "lua"}),
    )
    .assert_error(400, "invalid_index");
    // Nothing changed: the data and the index list are as loaded.
    assert_eq!(n.get("/db").json()["doc_count"], N + 1);
    assert_eq!(n.get("/db/_index").json()["total_rows"], 1);
    let all = find(
        &n,
        json!({"selector": {"type": {"$exists": true}}, "limit": 1000}),
    );
    assert_eq!(all["docs"].as_array().unwrap().len(), N);
}

#[test]
fn a_huge_answer_ends_early_with_a_bookmark_to_go_on() {
    let (_d, n) = start("mango-huge");
    let big = "x".repeat(1 << 20);
    for batch in 0..8 {
        let docs: Vec<Value> = (0..10)
            .map(|i| json!({"_id": format!("big{:02}", batch * 10 + i), "blob": big}))
            .collect();
        let r = n.post("/db/_bulk_docs", &json!({ "docs": docs }));
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let mut seen = 0;
    let mut bookmark = Value::Null;
    let mut pages = 0;
    loop {
        let r = find(
            &n,
            json!({"selector": {"blob": {"$exists": true}}, "limit": 1000, "fields": ["_id", "blob"], "bookmark": bookmark}),
        );
        let docs = r["docs"].as_array().unwrap().len();
        if docs == 0 {
            break;
        }
        pages += 1;
        if pages == 1 {
            assert!(docs < 80, "the first answer stops at the size bound");
            assert!(
                r["warning"].as_str().unwrap().contains("ends early"),
                "{}",
                r["warning"]
            );
        }
        seen += docs;
        bookmark = r["bookmark"].clone();
        assert!(pages < 10);
    }
    assert_eq!(seen, 80, "the bookmark goes on where the answer stopped");
}
