//! Benchmark: node-to-node replication over httpkey URLs (mutual TLS) between two release
//! `thali` nodes, push and pull, beside PouchDB (npm) replicating between two databases of one
//! pouchdb-server, same documents, same run. Prints docs/s and the ratio.
//!
//! Usage: `cargo run --release -p thali-tests --bin thali-bench-replication [-- --docs N]
//! [--thali-only]`
//! (needs `npm ci` in tests/interop).

use serde_json::{json, Value};
use std::time::Instant;
use thali_tests::servers::{
    arg_usize, pouchdb_replicate, start_pouchdb_server, start_thali, Target,
};

fn load(t: &Target, db: &str, n: usize) {
    assert!(t.call("PUT", &format!("/{db}"), None).0 < 300);
    for start in (0..n).step_by(1000) {
        let docs: Vec<Value> = (start..(start + 1000).min(n))
            .map(|i| json!({"_id": format!("doc{i:08}"), "type": "reading", "n": i, "value": i as f64 * 0.5, "tags": ["a", "b"]}))
            .collect();
        let (s, v) = t.call(
            "POST",
            &format!("/{db}/_bulk_docs"),
            Some(&json!({ "docs": docs })),
        );
        assert_eq!(s, 201, "{v}");
    }
}

/// Runs one replication on `on` and returns docs/s.
fn replicate(on: &Target, body: Value, n: usize) -> f64 {
    let t = Instant::now();
    let (s, v) = on.call("POST", "/_replicate", Some(&body));
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["history"][0]["docs_written"].as_u64(),
        Some(n as u64),
        "{v}"
    );
    n as f64 / secs
}

fn main() {
    let n = arg_usize("--docs", 100_000);
    let root = thali_tests::workspace_root();
    println!("workload: {n} small documents (~120 B), replicated once");

    let (a, b) = (start_thali(&root), start_thali(&root));
    load(&a, "src", n);
    b.allow("dst", &a);
    a.allow("src", &b);
    let push = replicate(&a, json!({"source": "src", "target": b.httpkey("dst")}), n);
    println!("thali push A -> B over httpkey: {push:.0} docs/s");
    let pull = replicate(
        &b,
        json!({"source": a.httpkey("src"), "target": "pulled", "create_target": true}),
        n,
    );
    println!("thali pull B <- A over httpkey: {pull:.0} docs/s");
    drop((a, b));
    if std::env::args().any(|a| a == "--thali-only") {
        return;
    }

    let p = start_pouchdb_server(&root);
    load(&p, "src", n);
    let t = Instant::now();
    let r = pouchdb_replicate(
        &root,
        &format!("{}/src", p.base),
        &format!("{}/dst", p.base),
    );
    assert_eq!(r["docs_written"].as_u64(), Some(n as u64), "{r}");
    let pouch = n as f64 / (r["ms"].as_f64().unwrap() / 1000.0);
    println!(
        "PouchDB replicating on pouchdb-server: {pouch:.0} docs/s ({:.1} s wall)",
        t.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "{:<44} {:>12} {:>8}",
        "replication of {n} docs", "docs/s", "ratio"
    );
    println!(
        "{:<44} {:>12.0} {:>7.1}x",
        "thali -> thali, push over httpkey (mTLS)",
        push,
        push / pouch
    );
    println!(
        "{:<44} {:>12.0} {:>7.1}x",
        "thali <- thali, pull over httpkey (mTLS)",
        pull,
        pull / pouch
    );
    println!(
        "{:<44} {:>12.0} {:>7.1}x",
        "PouchDB, pouchdb-server db -> db", pouch, 1.0
    );
}
