//! Benchmark: Mango `_find`, thali beside pouchdb-server (pouchdb-find over LevelDB) on the
//! same documents in the same run. Without an index first (`_all_docs` scans: an equality that
//! finds its 25 at once, and a range whose 25 matches lie spread over the whole database), then
//! with JSON indexes: builds timed from the first `_find` that uses the index (which builds it)
//! to its answer, and queries from one client: an equality and a range with a sort, as queries
//! per second and median latency. Both servers must return the same documents.
//!
//! Usage: `cargo run --release -p thali-tests --bin thali-bench-find [-- --docs N --queries Q]`
//! (needs `npm ci` in tests/interop, as `tests/run-all.sh` does).

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
        |i| json!({"_id": format!("d{i:08}"), "type": TYPES[i % 5], "n": (i * 7919) % 10_000, "m": (i * 7919) % 10_000, "kind": TYPES[i % 5], "title": "a small document to query"}),
    );
}

fn find(t: &Target, q: &Value) -> Value {
    let (st, v) = t.call("POST", "/bench/_find", Some(q));
    assert_eq!(st, 200, "{}: {v}", t.name);
    v
}

/// Creates the index and times it with the first query that uses it: thali builds at that
/// query, pouchdb-server while it answers `POST _index`.
fn build(t: &Target, fields: Value, q: &Value) -> f64 {
    let t0 = Instant::now();
    let (st, v) = t.call(
        "POST",
        "/bench/_index",
        Some(&json!({"index": {"fields": fields}})),
    );
    assert_eq!(st, 200, "{}: {v}", t.name);
    let v = find(t, q);
    assert!(
        v.get("warning").is_none(),
        "{}: index not used: {v}",
        t.name
    );
    t0.elapsed().as_secs_f64()
}

/// Queries per second and median latency (ms) of up to `q` runs (20 s at most).
fn run(t: &Target, body: &Value, q: usize) -> (f64, f64, Value) {
    let (mut ms, secs, last) = timed_runs(q, || find(t, body));
    let qps = ms.len() as f64 / secs;
    ms.sort_by(|a, b| a.total_cmp(b));
    (qps, ms[ms.len() / 2], last)
}

fn ids(v: &Value) -> Vec<String> {
    v["docs"]
        .as_array()
        .expect("docs")
        .iter()
        .map(|d| d["_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn main() {
    let n = arg_usize("--docs", 100_000);
    let queries = arg_usize("--queries", 500);
    let root = thali_tests::workspace_root();
    let eq = json!({"selector": {"type": "c"}, "limit": 25});
    let range = json!({"selector": {"n": {"$gte": 4000, "$lt": 4100}}, "sort": ["n"], "limit": 25});
    // The same on fields no index holds.
    let eq_scan = json!({"selector": {"kind": "c"}, "limit": 25});
    let range_scan = json!({"selector": {"m": {"$gte": 4000, "$lt": 4010}}, "limit": 25});
    println!("workload: {n} docs of ~100 B; index builds timed from POST _index to the first _find answer; up to {queries} queries each, one client");

    let mut results = Vec::new();
    let mut scans = Vec::new();
    let thali = start_thali(&root);
    let pouch = start_pouchdb_server(&root);
    for t in [&thali, &pouch] {
        insert(t, "bench", n);
        let (s_eq_qps, s_eq_p50, _) = run(t, &eq_scan, queries);
        let (s_r_qps, s_r_p50, s_r_v) = run(t, &range_scan, queries);
        let b_type = build(t, json!(["type"]), &eq);
        let b_n = build(t, json!(["n"]), &range);
        let (eq_qps, eq_p50, eq_v) = run(t, &eq, queries);
        let (r_qps, r_p50, r_v) = run(t, &range, queries);
        results.push((b_type, b_n, eq_qps, eq_p50, r_qps, r_p50, eq_v, r_v));
        scans.push((s_eq_qps, s_eq_p50, s_r_qps, s_r_p50, s_r_v));
    }
    let (ts, ps) = (&scans[0], &scans[1]);
    let (mut a, mut b) = (ids(&ts.4), ids(&ps.4));
    a.sort();
    b.sort();
    assert_eq!(a, b, "range scans differ");
    let (t, p) = (&results[0], &results[1]);
    assert_eq!(ids(&t.7), ids(&p.7), "range + sort answers differ");
    assert_eq!(ids(&t.7).len(), 25);
    let (mut te, mut pe) = (ids(&t.6), ids(&p.6));
    te.sort();
    pe.sort();
    assert_eq!(te.len(), 25);
    assert!(
        t.6["docs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["type"] == "c")
            && p.6["docs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["type"] == "c"),
        "equality answers wrong"
    );
    let rate = |s: f64| n as f64 / s;
    println!();
    println!("| index build, {n} docs | thali docs/s | pouchdb-server docs/s | ratio |");
    println!("|---|---|---|---|");
    for (what, a, b) in [("fields [type]", t.0, p.0), ("fields [n]", t.1, p.1)] {
        println!(
            "| {what} | {:.0} | {:.0} | {:.1}x |",
            rate(a),
            rate(b),
            b / a
        );
    }
    println!();
    println!("| _find, limit 25 | thali q/s | thali p50 ms | pouchdb-server q/s | pouchdb-server p50 ms | ratio (q/s) |");
    println!("|---|---|---|---|---|---|");
    for (what, tq, tm, pq, pm) in [
        ("no index: equality {kind: \"c\"}", ts.0, ts.1, ps.0, ps.1),
        ("no index: range m in [4000, 4010)", ts.2, ts.3, ps.2, ps.3),
        ("equality {type: \"c\"}", t.2, t.3, p.2, p.3),
        ("range n in [4000, 4100) sorted by n", t.4, t.5, p.4, p.5),
    ] {
        println!(
            "| {what} | {tq:.1} | {tm:.2} | {pq:.1} | {pm:.2} | {:.1}x |",
            tq / pq
        );
    }
}
