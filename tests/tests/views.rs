//! Views through the real binary, the same design in Lua (`scripts/app/views/`) and WASM
//! (`plugins/views`): every query parameter, the built-in and custom reduces, collation of mixed
//! keys, incremental updates (inserts, edits, deletions, replication), rebuilds after a design
//! change with `_view_cleanup`, failing maps and overflowing reduces, `_info`, and builds that
//! show progress while `stale` queries answer at once.

use base64::Engine;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use thali_tests::mesh::wait_until;
use thali_tests::{Client, Node, TempDir};

fn lua_view(name: &str, file: &str) -> String {
    let p =
        thali_tests::workspace_root().join(format!("scripts/app/views/views/{name}/{file}.lua"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn views_wasm() -> Vec<u8> {
    let p = thali_tests::workspace_root()
        .join("plugins/target/wasm32-unknown-unknown/release/views.wasm");
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\nbuild it first: cargo build --release --target wasm32-unknown-unknown \
             --manifest-path plugins/Cargo.toml (tests/run-all.sh does it)",
            p.display()
        )
    })
}

/// view name → (map, reduce): map names a Lua file / WASM export; a reduce starting with `_`
/// is a built-in, else a Lua file / WASM export.
const VIEWS: &[(&str, &str, Option<&str>)] = &[
    ("by_type", "by_type", Some("_sum")),
    ("count", "by_type", Some("_count")),
    ("stats", "by_type", Some("_stats")),
    ("distinct", "by_type", Some("_approx_count_distinct")),
    ("by_date", "by_date", Some("_sum")),
    ("pair", "pair", Some("_sum")),
    ("by_key", "by_key", None),
    ("linked", "linked", None),
    ("fragile", "fragile", None),
    ("custom", "by_type", Some("sum")),
    ("grow", "by_type", Some("grow")),
];

fn design(lang: &str) -> Value {
    let mut views = serde_json::Map::new();
    for (name, map, reduce) in VIEWS {
        let mut v = serde_json::Map::new();
        if lang == "lua" {
            v.insert("map".into(), json!(lua_view(map, "map")));
            if let Some(r) = reduce {
                let r = match *r {
                    "sum" => lua_view("custom", "reduce"),
                    "grow" => lua_view("grow", "reduce"),
                    b => b.to_string(),
                };
                v.insert("reduce".into(), json!(r));
            }
        } else {
            v.insert("map".into(), json!(map));
            if let Some(r) = reduce {
                v.insert("reduce".into(), json!(r));
            }
        }
        views.insert(name.to_string(), Value::Object(v));
    }
    let mut d = json!({"language": lang, "views": views});
    if lang == "wasm" {
        d["_attachments"] = json!({"module.wasm": {
            "content_type": "application/wasm",
            "data": base64::engine::general_purpose::STANDARD.encode(views_wasm()),
        }});
    }
    d
}

const TYPES: [&str; 3] = ["a", "b", "c"];

/// `t00`…`t29`: type a/b/c by `n % 3`, a date `[2020 + n%2, 1 + n%3, 1 + n%5]`.
fn dataset(n: &Node, db: &str) {
    let mut docs: Vec<Value> = (0..30)
        .map(|i| {
            json!({"_id": format!("t{i:02}"), "type": TYPES[i % 3], "n": i,
                   "date": [2020 + i % 2, 1 + i % 3, 1 + i % 5]})
        })
        .collect();
    docs.push(json!({"_id": "l1", "link": "t05"}));
    docs.push(json!({"_id": "l2", "link": "nowhere"}));
    for (i, k) in mixed_keys().into_iter().rev().enumerate() {
        docs.push(json!({"_id": format!("k{i:02}"), "key": k}));
    }
    let r = n.post(&format!("/{db}/_bulk_docs"), &json!({ "docs": docs }));
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Keys in CouchDB's collation order.
fn mixed_keys() -> Vec<Value> {
    vec![
        json!(null),
        json!(false),
        json!(true),
        json!(-5),
        json!(0),
        json!(1.5),
        json!(2),
        json!("_"),
        json!("1"),
        json!("a"),
        json!("A"),
        json!("á"),
        json!("aa"),
        json!("b"),
        json!("B"),
        json!([]),
        json!(["a"]),
        json!(["a", 1]),
        json!(["b"]),
        json!({}),
        json!({"a": 1}),
        json!({"b": 0}),
    ]
}

fn q(n: &Node, db: &str, view: &str, params: &str) -> Value {
    let r = n.get(&format!("/{db}/_design/v/_view/{view}?{params}"));
    assert_eq!(r.status, 200, "{view}?{params}: {}", r.text());
    r.json()
}

fn ids(v: &Value) -> Vec<String> {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn of_type(t: usize) -> Vec<String> {
    (0..30)
        .filter(|i| i % 3 == t)
        .map(|i| format!("t{i:02}"))
        .collect()
}

fn sum_of(t: usize) -> i64 {
    (0..30).filter(|i| i % 3 == t).map(|i| i as i64).sum()
}

fn start(tag: &str) -> (TempDir, Node) {
    let dir = TempDir::new(tag);
    let n = Node::start(&dir.0);
    assert_eq!(n.put("/db", &json!({})).status, 201);
    (dir, n)
}

fn every_parameter_and_reduce(lang: &str) {
    let (_d, n) = start(&format!("views-{lang}"));
    dataset(&n, "db");
    let r = n.put("/db/_design/v", &design(lang));
    assert_eq!(r.status, 201, "{}", r.text());

    // Map rows: collated key, then doc id.
    let all = q(&n, "db", "by_type", "reduce=false");
    assert_eq!(all["total_rows"], 30);
    assert_eq!(all["offset"], 0);
    let expect: Vec<String> = (0..3).flat_map(of_type).collect();
    assert_eq!(ids(&all), expect);
    assert_eq!(all["rows"][0], json!({"id": "t00", "key": "a", "value": 0}));
    // key, keys (in the order given), ranges with and without inclusive_end.
    let b = q(&n, "db", "by_type", "reduce=false&key=%22b%22");
    assert_eq!((ids(&b), b["offset"].clone()), (of_type(1), json!(10)));
    let ca = q(
        &n,
        "db",
        "by_type",
        "reduce=false&keys=%5B%22c%22,%22a%22%5D",
    );
    assert_eq!(ids(&ca), [of_type(2), of_type(0)].concat());
    let r = q(
        &n,
        "db",
        "by_type",
        "reduce=false&startkey=%22b%22&endkey=%22c%22&inclusive_end=false",
    );
    assert_eq!(ids(&r), of_type(1));
    let r = q(
        &n,
        "db",
        "by_type",
        "reduce=false&start_key=%22b%22&end_key=%22c%22",
    );
    assert_eq!(ids(&r), [of_type(1), of_type(2)].concat());
    // Doc id bounds within a key.
    let base = "reduce=false&startkey=%22b%22&startkey_docid=t10&endkey=%22b%22&endkey_docid=t22";
    assert_eq!(
        ids(&q(&n, "db", "by_type", base)),
        ["t10", "t13", "t16", "t19", "t22"]
    );
    let excl = format!("{base}&inclusive_end=false");
    assert_eq!(
        ids(&q(&n, "db", "by_type", &excl)),
        ["t10", "t13", "t16", "t19"]
    );
    // Descending swaps the ends; limit and skip; offset counts from the top.
    let d = q(
        &n,
        "db",
        "by_type",
        "reduce=false&descending=true&limit=3&skip=2",
    );
    assert_eq!(
        (ids(&d), d["offset"].clone()),
        (
            vec!["t23".to_string(), "t20".into(), "t17".into()],
            json!(2)
        )
    );
    let d = q(
        &n,
        "db",
        "by_type",
        "reduce=false&descending=true&startkey=%22b%22&endkey=%22a%22",
    );
    let mut expect = [of_type(0), of_type(1)].concat();
    expect.reverse();
    assert_eq!(ids(&d), expect);
    assert_eq!(d["offset"], 10);
    let d = q(
        &n,
        "db",
        "by_type",
        "reduce=false&descending=true&startkey=%22b%22&endkey=%22a%22&inclusive_end=false",
    );
    let mut expect = of_type(1);
    expect.reverse();
    assert_eq!(ids(&d), expect);
    assert_eq!(
        q(&n, "db", "by_type", "reduce=false&limit=0")["rows"],
        json!([])
    );

    // Reduces: built-ins and custom, whole and grouped.
    assert_eq!(
        q(&n, "db", "by_type", "")["rows"],
        json!([{"key": null, "value": 435}])
    );
    let g = q(&n, "db", "by_type", "group=true");
    assert_eq!(
        g["rows"],
        json!([{"key": "a", "value": sum_of(0)}, {"key": "b", "value": sum_of(1)}, {"key": "c", "value": sum_of(2)}])
    );
    assert_eq!(
        q(&n, "db", "by_type", "group=true&descending=true&limit=1")["rows"],
        json!([{"key": "c", "value": sum_of(2)}])
    );
    assert_eq!(
        q(&n, "db", "by_type", "group=true&skip=1&limit=1")["rows"],
        json!([{"key": "b", "value": sum_of(1)}])
    );
    assert_eq!(
        q(
            &n,
            "db",
            "by_type",
            "group=true&keys=%5B%22c%22,%22zzz%22,%22a%22%5D"
        )["rows"],
        json!([{"key": "c", "value": sum_of(2)}, {"key": "a", "value": sum_of(0)}])
    );
    assert_eq!(q(&n, "db", "custom", "group=true")["rows"], g["rows"]);
    assert_eq!(
        q(&n, "db", "custom", "")["rows"],
        json!([{"key": null, "value": 435}])
    );
    assert_eq!(
        q(&n, "db", "count", "group=true")["rows"][1],
        json!({"key": "b", "value": 10})
    );
    assert_eq!(q(&n, "db", "count", "")["rows"][0]["value"], 30);
    let sumsqr: i64 = (0..30).filter(|i| i % 3 == 0).map(|i| i * i).sum();
    assert_eq!(
        q(&n, "db", "stats", "group=true&key=%22a%22")["rows"],
        json!([{"key": "a", "value": {"sum": sum_of(0), "count": 10, "min": 0, "max": 27, "sumsqr": sumsqr}}])
    );
    assert_eq!(q(&n, "db", "distinct", "")["rows"][0]["value"], 3);
    assert_eq!(
        q(&n, "db", "pair", "group=true&key=%22a%22")["rows"][0]["value"],
        json!([sum_of(0), 10])
    );
    // group_level on array keys.
    let even: i64 = (0..30).filter(|i| i % 2 == 0).sum();
    assert_eq!(
        q(&n, "db", "by_date", "group_level=1")["rows"],
        json!([{"key": [2020], "value": even}, {"key": [2021], "value": 435 - even}])
    );
    let l2 = q(&n, "db", "by_date", "group_level=2");
    assert_eq!(l2["rows"].as_array().unwrap().len(), 6);
    assert_eq!(l2["rows"][0]["key"], json!([2020, 1]));
    assert_eq!(
        q(&n, "db", "by_date", "group_level=0")["rows"],
        json!([{"key": null, "value": 435}])
    );
    let exact = q(&n, "db", "by_date", "group=true&startkey=%5B2021%5D");
    assert!(exact["rows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["key"][0] == 2021 && r["key"].as_array().unwrap().len() == 3));

    // include_docs, linked documents, conflicts, update_seq.
    let docs = q(
        &n,
        "db",
        "by_type",
        "reduce=false&key=%22a%22&limit=2&include_docs=true",
    );
    assert_eq!(docs["rows"][1]["doc"]["_id"], "t03");
    assert_eq!(docs["rows"][1]["doc"]["n"], 3);
    let linked = q(&n, "db", "linked", "include_docs=true");
    assert_eq!(linked["rows"][0]["doc"]["_id"], "t05");
    assert_eq!(linked["rows"][1]["doc"], Value::Null);
    let r = n.post(
        "/db/_bulk_docs",
        &json!({"new_edits": false, "docs": [
        {"_id": "t01", "_rev": "1-ffffffffffffffffffffffffffffffff", "type": "b", "n": 1}]}),
    );
    assert_eq!(r.status, 201);
    let c = q(
        &n,
        "db",
        "by_type",
        "reduce=false&key=%22b%22&limit=1&include_docs=true&conflicts=true",
    );
    assert_eq!(
        c["rows"][0]["doc"]["_conflicts"].as_array().unwrap().len(),
        1,
        "{c}"
    );
    let seq = n.get("/db").json()["update_seq"].clone();
    assert_eq!(
        q(&n, "db", "by_type", "reduce=false&limit=0&update_seq=true")["update_seq"],
        seq
    );
    assert_eq!(q(&n, "db", "by_type", "update_seq=true")["update_seq"], seq);

    // POST with keys and other parameters in the body.
    let r = n.post(
        "/db/_design/v/_view/by_type",
        &json!({"keys": ["c"], "reduce": false, "limit": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ids(&r.json()), ["t02", "t05"]);

    // Collation of mixed key types.
    let k = q(&n, "db", "by_key", "");
    let keys: Vec<Value> = k["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].clone())
        .collect();
    assert_eq!(keys, mixed_keys());
    let k = q(
        &n,
        "db",
        "by_key",
        "startkey=%22a%22&endkey=%22b%22&inclusive_end=false",
    );
    let keys: Vec<Value> = k["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].clone())
        .collect();
    assert_eq!(keys, [json!("a"), json!("A"), json!("á"), json!("aa")]);

    // stale / update: answered from the index as it is, or updated after answering.
    n.put("/db/late", &json!({"type": "a", "n": 100}));
    assert_eq!(
        q(&n, "db", "by_type", "reduce=false&stale=ok")["total_rows"],
        30
    );
    assert_eq!(
        q(&n, "db", "by_type", "reduce=false&update=false")["total_rows"],
        30
    );
    assert_eq!(
        q(&n, "db", "by_type", "reduce=false&update=lazy")["total_rows"],
        30
    );
    wait_until("the lazy update", || {
        q(&n, "db", "by_type", "reduce=false&stale=ok")["total_rows"] == 31
    });
    n.put("/db/later", &json!({"type": "a", "n": 101}));
    assert_eq!(
        q(&n, "db", "by_type", "reduce=false&stale=update_after")["total_rows"],
        31
    );
    assert_eq!(q(&n, "db", "by_type", "reduce=false")["total_rows"], 32);

    // A map that fails on one document skips that document only.
    let f = q(&n, "db", "fragile", "");
    assert_eq!(f["total_rows"], 31, "{f}");
    assert!(!ids(&f).contains(&"t13".to_string()));

    // _info.
    let info = n.get("/db/_design/v/_info").json();
    assert_eq!(info["name"], "v");
    assert_eq!(info["view_index"]["language"], lang);
    assert_eq!(
        info["view_index"]["update_seq"],
        n.get("/db").json()["update_seq"]
    );
    assert!(info["view_index"]["signature"].as_str().unwrap().len() == 32);
    assert_eq!(info["view_index"]["updater_running"], false);

    // Bad parameters: CouchDB's query_parse_error.
    for bad in [
        "by_key?reduce=true",
        "by_key?group=true",
        "by_type?include_docs=true",
        "by_type?keys=%5B%22a%22%5D",
        "by_type?key=%22a%22&keys=%5B%22a%22%5D",
        "by_type?startkey=%22c%22&endkey=%22a%22",
        "by_type?descending=true&startkey=%22a%22&endkey=%22c%22",
        "by_type?limit=-1",
        "by_type?skip=-1",
        "by_type?key=notjson",
        "by_type?stale=sometimes",
        "by_type?update=maybe",
        "by_type?group_level=x",
        "by_type?descending=perhaps",
    ] {
        n.get(&format!("/db/_design/v/_view/{bad}"))
            .assert_error(400, "query_parse_error");
    }
    n.get("/db/_design/v/_view/nope")
        .assert_error(404, "not_found");
    n.get("/db/_design/nope/_view/by_type")
        .assert_error(404, "not_found");
    // JavaScript (CouchDB's default language) runs.
    n.put(
        "/db/_design/js",
        &json!({"views": {"v": {"map": "function(doc){emit(1,1)}"}}}),
    );
    assert_eq!(n.get("/db/_design/js/_view/v").status, 200);
    n.put("/db2", &json!({}));
    n.get("/db2/_design/v/_view/by_type")
        .assert_error(404, "not_found");
}

#[test]
fn lua_views_answer_every_parameter() {
    every_parameter_and_reduce("lua");
}

#[test]
fn wasm_views_answer_every_parameter() {
    thali_tests::require!(thali_tests::needs::Need::WasmPlugins);
    every_parameter_and_reduce("wasm");
}

fn incremental(lang: &str) {
    let (_d, n) = start(&format!("views-inc-{lang}"));
    dataset(&n, "db");
    assert_eq!(n.put("/db/_design/v", &design(lang)).status, 201);
    assert_eq!(
        q(&n, "db", "by_type", "group=true")["rows"][0]["value"],
        sum_of(0)
    );
    // Insert, edit (type a → c), delete.
    n.put("/db/new", &json!({"type": "a", "n": 1000}));
    let t03 = n.get("/db/t03").json();
    n.put(
        "/db/t03",
        &json!({"_rev": t03["_rev"], "type": "c", "n": 3}),
    );
    let t06 = n.get("/db/t06").json();
    n.delete(&format!("/db/t06?rev={}", t06["_rev"].as_str().unwrap()));
    let g = q(&n, "db", "by_type", "group=true");
    assert_eq!(
        g["rows"][0],
        json!({"key": "a", "value": sum_of(0) + 1000 - 3 - 6})
    );
    assert_eq!(g["rows"][2], json!({"key": "c", "value": sum_of(2) + 3}));
    let rows = q(&n, "db", "by_type", "reduce=false&key=%22a%22");
    assert!(!ids(&rows).contains(&"t06".to_string()) && ids(&rows).contains(&"new".to_string()));
    assert_eq!(rows["total_rows"], 30);
    // Replication into the database updates the index too.
    let (_d2, other) = start(&format!("views-src-{lang}"));
    let docs: Vec<Value> = (0..1200)
        .map(|i| json!({"_id": format!("r{i:04}"), "type": "z", "n": i}))
        .collect();
    assert_eq!(
        other.post("/db/_bulk_docs", &json!({"docs": docs})).status,
        201
    );
    let r = n.post(
        "/_replicate",
        &json!({"source": format!("{}/db", other.url()), "target": "db"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let z = q(&n, "db", "by_type", "group=true&key=%22z%22");
    assert_eq!(z["rows"], json!([{"key": "z", "value": 1199 * 1200 / 2}]));
    // 1200 rows through a custom reduce: chunks of 500, then rereduce.
    assert_eq!(
        q(&n, "db", "custom", "key=%22z%22")["rows"][0]["value"],
        1199 * 1200 / 2
    );
    assert_eq!(
        q(&n, "db", "count", "key=%22z%22")["rows"][0]["value"],
        1200
    );
    // A reduce whose output keeps growing is refused.
    n.get("/db/_design/v/_view/grow?key=%22z%22")
        .assert_error(500, "reduce_overflow_error");
    assert_eq!(
        q(&n, "db", "grow", "key=%22z%22&reduce=false")["rows"]
            .as_array()
            .unwrap()
            .len(),
        1200
    );
}

#[test]
fn lua_views_update_incrementally() {
    incremental("lua");
}

#[test]
fn wasm_views_update_incrementally() {
    thali_tests::require!(thali_tests::needs::Need::WasmPlugins);
    incremental("wasm");
}

/// Keyspaces on disk (the engine keeps each in its own folder; a dropped one's folder goes).
fn keyspace_dirs(dir: &TempDir) -> usize {
    std::fs::read_dir(dir.0.join("fjall/keyspaces")).map_or(0, |d| d.count())
}

#[test]
fn a_changed_design_document_gets_a_new_index_and_cleanup_removes_the_old() {
    let (dir, n) = start("views-rebuild");
    dataset(&n, "db");
    let base = keyspace_dirs(&dir);
    let index_dirs = |dir: &TempDir| keyspace_dirs(dir) - base;
    assert_eq!(n.put("/db/_design/v", &design("lua")).status, 201);
    assert_eq!(q(&n, "db", "by_type", "")["rows"][0]["value"], 435);
    let sig1 = n.get("/db/_design/v/_info").json()["view_index"]["signature"].clone();
    // A validator change keeps the index (as in CouchDB); a view change makes a new one.
    let mut d = n.get("/db/_design/v").json();
    d["validate_doc_update"] = json!("function() end");
    assert_eq!(n.put("/db/_design/v", &d).status, 201);
    assert_eq!(
        n.get("/db/_design/v/_info").json()["view_index"]["signature"],
        sig1
    );
    let mut d = n.get("/db/_design/v").json();
    d["views"]["by_type"]["map"] =
        json!("function(doc) if doc.type then emit(doc.type, doc.n * 2) end end");
    assert_eq!(n.put("/db/_design/v", &d).status, 201);
    assert_eq!(q(&n, "db", "by_type", "")["rows"][0]["value"], 870);
    let sig2 = n.get("/db/_design/v/_info").json()["view_index"]["signature"].clone();
    assert_ne!(sig1, sig2);
    assert_eq!(index_dirs(&dir), 2);
    let r = n.post("/db/_view_cleanup", &json!({}));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(index_dirs(&dir), 1);
    assert_eq!(q(&n, "db", "by_type", "")["rows"][0]["value"], 870);
    // Deleting the design document leaves nothing in use.
    let rev = n.get("/db/_design/v").json()["_rev"]
        .as_str()
        .unwrap()
        .to_string();
    n.delete(&format!("/db/_design/v?rev={rev}"));
    n.post("/db/_view_cleanup", &json!({}));
    assert_eq!(index_dirs(&dir), 0);
    // Indexes survive a restart and resume from their sequence.
    assert_eq!(n.put("/db/_design/w", &design("lua")).status, 201);
    assert_eq!(
        n.get("/db/_design/w/_view/by_type").json()["rows"][0]["value"],
        435
    );
    let mut n = n;
    n.restart();
    n.put("/db/after", &json!({"type": "a", "n": 5}));
    let r = n.get("/db/_design/w/_view/by_type?stale=ok").json();
    assert_eq!(r["rows"][0]["value"], 435);
    assert_eq!(
        n.get("/db/_design/w/_view/by_type").json()["rows"][0]["value"],
        440
    );
}

#[test]
fn builds_show_progress_while_stale_queries_answer_at_once() {
    let (_d, n) = start("views-progress");
    let docs: Vec<Value> = (0..20_000)
        .map(|i| json!({"_id": format!("p{i:05}"), "type": TYPES[i % 3], "n": i}))
        .collect();
    assert_eq!(
        n.post("/db/_bulk_docs", &json!({ "docs": docs })).status,
        201
    );
    // A map that burns CPU, so the build lasts a few seconds.
    let slow = "function(doc) local x = 0 for i = 1, 20000 do x = x + i end emit(doc.type, 1) end";
    assert_eq!(
        n.put(
            "/db/_design/v",
            &json!({"language": "lua", "views": {"slow": {"map": slow, "reduce": "_count"}}})
        )
        .status,
        201
    );
    let addr = n.addr;
    let waiting = std::thread::spawn(move || {
        let r = thali_tests::request(
            addr,
            "GET",
            "/db/_design/v/_view/slow",
            &[("Authorization".into(), thali_tests::admin_auth())],
            None,
        );
        (r.status, r.json())
    });
    let mut seen_progress = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && !waiting.is_finished() {
        let tasks = n.get("/_active_tasks").json();
        if let Some(t) = tasks
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "indexer")
        {
            assert_eq!(t["design_document"], "_design/v");
            assert_eq!(t["total_changes"], 20_001);
            let info = n.get("/db/_design/v/_info").json();
            let stale = n
                .get("/db/_design/v/_view/slow?stale=ok&reduce=false&limit=0")
                .json();
            if t["changes_done"].as_u64().unwrap() > 0 && seen_progress.is_none() {
                seen_progress = Some((t.clone(), info, stale));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, result) = waiting.join().unwrap();
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["rows"], json!([{"key": null, "value": 20_000}]));
    let (task, info, stale) = seen_progress.expect("no indexer progress seen in _active_tasks");
    assert!(task["progress"].as_u64().unwrap() < 100, "{task}");
    assert_eq!(info["view_index"]["updater_running"], true);
    // A stale query answered during the build, from the part already indexed.
    assert!(stale["total_rows"].as_u64().unwrap() < 20_000, "{stale}");
    assert!(n
        .get("/_active_tasks")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["type"] != "indexer"));
}

/// A map that never returns is stopped by the time limit on the first document, and the build
/// stops there with the reason (CouchDB's os_process_error), instead of spending the limit on
/// each of the database's documents on every query. A map that throws skips that document.
#[test]
fn a_looping_map_stops_the_build_at_its_first_limit() {
    let dir = TempDir::new("views-loop");
    let n = Node::start(&dir.0);
    n.put("/db", &json!({}));
    let docs: Vec<Value> = (0..40)
        .map(|i| json!({"_id": format!("d{i:02}"), "i": i}))
        .collect();
    assert_eq!(
        n.post("/db/_bulk_docs", &json!({ "docs": docs })).status,
        201
    );
    let ddoc = json!({"language": "lua", "views": {
        "spin": {"map": "function(doc) while true do end end"}}});
    assert_eq!(n.put("/db/_design/l", &ddoc).status, 201);
    let t = Instant::now();
    let r = n.get("/db/_design/l/_view/spin");
    let took = t.elapsed();
    r.assert_error(500, "plugin_error");
    let reason = r.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("limit") && reason.contains("d00"),
        "{reason}"
    );
    // One document's limit (500 ms), not forty.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // Throwing is not a limit: that document is skipped and the build goes on.
    let ddoc = json!({"language": "lua", "views": {
        "odd": {"map": "function(doc) if doc.i % 2 == 0 then error('even') end emit(doc.i, nil) end"}}});
    assert_eq!(n.put("/db/_design/o", &ddoc).status, 201);
    let v = n.get("/db/_design/o/_view/odd").json();
    assert_eq!(v["total_rows"], 20, "{v}");
}
