//! Benchmark: view index builds and queries, thali beside pouchdb-server (PouchDB's map/reduce
//! in JavaScript, LevelDB) on the same documents in the same run. Builds: a Lua map, a WASM map
//! (`plugins/views`), a Lua map with the built-in `_sum` reduce, and the JavaScript map itself
//! (QuickJS); each is timed from the
//! first query (which builds the index) to its answer. Then query latency, one client:
//! a key lookup, a whole-view reduce and a grouped reduce.
//!
//! Usage: `cargo run --release -p thali-tests --bin thali-bench-views [-- --docs N --queries Q]`
//! (needs `npm ci` in tests/interop and the wasm32 example plugins, as `tests/run-all.sh` does).

use base64::Engine;
use serde_json::{json, Value};
use std::time::Instant;
use thali_tests::servers::{
    arg_usize, load_docs, start_pouchdb_server, start_thali, timed_runs, Target,
};

const TYPES: [&str; 5] = ["a", "b", "c", "d", "e"];

fn insert(t: &Target, db: &str, n: usize) {
    load_docs(
        t,
        db,
        n,
        |i| json!({"_id": format!("d{i:08}"), "type": TYPES[i % 5], "n": i % 1000, "title": "a small document to index"}),
    );
}

/// Seconds for the first query of `view` (the index build) and its answer.
fn build(t: &Target, db: &str, ddoc: &str, view: &str, reduce: bool) -> (f64, Value) {
    let q = if reduce { "" } else { "?limit=1" };
    let t0 = Instant::now();
    let (st, v) = t.call(
        "GET",
        &format!("/{db}/_design/{ddoc}/_view/{view}{q}"),
        None,
    );
    assert_eq!(st, 200, "{}: {v}", t.name);
    (t0.elapsed().as_secs_f64(), v)
}

/// The first query's time (thali caches offsets and reduce results per index sequence, so
/// the first one pays the scan) and the median and 99th percentile of `q` queries (fewer, at
/// least 5, when they take over 20 s in all: pouchdb-server needs seconds per reduce of 100k
/// rows), in milliseconds.
fn latency(t: &Target, path: &str, q: usize) -> (f64, f64, f64, Value) {
    let (mut ms, _, last) = timed_runs(q, || {
        let (st, v) = t.call("GET", path, None);
        assert_eq!(st, 200, "{}: {v}", t.name);
        v
    });
    let first = ms[0];
    ms.sort_by(|a, b| a.total_cmp(b));
    let q = ms.len();
    (first, ms[q / 2], ms[(q * 99 / 100).min(q - 1)], last)
}

fn main() {
    let n = arg_usize("--docs", 100_000);
    let queries = arg_usize("--queries", 200);
    let root = thali_tests::workspace_root();
    let wasm = std::fs::read(root.join("plugins/target/wasm32-unknown-unknown/release/views.wasm"))
        .expect("build plugins/ for wasm32 first (see the usage line)");
    let lua_map = "function(doc) if doc.type then emit(doc.type, doc.n) end end";
    let js_map = "function (doc) { if (doc.type) emit(doc.type, doc.n); }";
    println!("workload: {n} docs of ~100 B; index builds timed from the first query; {queries} queries each, one client");

    let thali = start_thali(&root);
    insert(&thali, "bench", n);
    let put = |id: &str, d: Value| {
        let (s, v) = thali.call("PUT", &format!("/bench/_design/{id}"), Some(&d));
        assert_eq!(s, 201, "{v}");
    };
    put(
        "lua",
        json!({"language": "lua", "views": {"by_type": {"map": lua_map}}}),
    );
    put(
        "wasm",
        json!({"language": "wasm", "views": {"by_type": {"map": "by_type"}},
        "_attachments": {"module.wasm": {"content_type": "application/wasm",
            "data": base64::engine::general_purpose::STANDARD.encode(&wasm)}}}),
    );
    put(
        "sum",
        json!({"language": "lua", "views": {"by_type": {"map": lua_map, "reduce": "_sum"}}}),
    );
    put("js", json!({"views": {"by_type": {"map": js_map}}}));
    let (t_lua, v) = build(&thali, "bench", "lua", "by_type", false);
    assert_eq!(v["total_rows"], n);
    let (t_wasm, v) = build(&thali, "bench", "wasm", "by_type", false);
    assert_eq!(v["total_rows"], n);
    let (t_sum, thali_sum) = build(&thali, "bench", "sum", "by_type", true);
    let (t_js, v) = build(&thali, "bench", "js", "by_type", false);
    assert_eq!(v["total_rows"], n);

    let pouch = start_pouchdb_server(&root);
    insert(&pouch, "bench", n);
    for (id, d) in [
        ("map", json!({"views": {"by_type": {"map": js_map}}})),
        (
            "sum",
            json!({"views": {"by_type": {"map": js_map, "reduce": "_sum"}}}),
        ),
    ] {
        let (s, v) = pouch.call("PUT", &format!("/bench/_design/{id}"), Some(&d));
        assert_eq!(s, 201, "{v}");
    }
    let (p_map, v) = build(&pouch, "bench", "map", "by_type", false);
    assert_eq!(v["total_rows"], n);
    let (p_sum, pouch_sum) = build(&pouch, "bench", "sum", "by_type", true);
    assert_eq!(
        thali_sum["rows"], pouch_sum["rows"],
        "the two reduce results differ"
    );

    let rate = |s: f64| n as f64 / s;
    println!();
    println!("| index build, {n} docs | thali docs/s | pouchdb-server docs/s | ratio |");
    println!("|---|---|---|---|");
    for (what, t, p) in [
        ("Lua map (vs JS map)", t_lua, p_map),
        ("WASM map (vs JS map)", t_wasm, p_map),
        ("JavaScript map, QuickJS (vs JS map)", t_js, p_map),
        ("Lua map + _sum (vs JS map + _sum)", t_sum, p_sum),
    ] {
        println!(
            "| {what} | {:.0} | {:.0} | {:.1}x |",
            rate(t),
            rate(p),
            p / t
        );
    }

    let cases = [
        (
            "key lookup, limit 10",
            "/bench/_design/{d}/_view/by_type?key=%22c%22&limit=10&reduce=false",
        ),
        ("whole-view _sum", "/bench/_design/sum/_view/by_type"),
        (
            "grouped _sum",
            "/bench/_design/sum/_view/by_type?group=true",
        ),
    ];
    println!();
    println!("| query (up to {queries} runs, 20 s) | thali first / median / p99 ms | pouchdb-server first / median / p99 ms |");
    println!("|---|---|---|");
    for (what, path) in cases {
        let (tf, tm, t99, tv) = latency(&thali, &path.replace("{d}", "lua"), queries);
        let (pf, pm, p99, pv) = latency(&pouch, &path.replace("{d}", "map"), queries);
        assert_eq!(tv["rows"], pv["rows"], "{what}: results differ");
        println!("| {what} | {tf:.2} / {tm:.2} / {t99:.2} | {pf:.2} / {pm:.2} / {p99:.2} |");
    }
}
