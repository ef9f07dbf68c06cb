//! Benchmark: what plugins cost. `_bulk_docs` inserts with no validator, with the `typed`
//! validator in Lua (`scripts/app/typed`), JavaScript (`scripts/app/typed-js`) and in WASM (`plugins/typed`, built for wasm32), and
//! `_changes` with the `by_type` filter in both languages against an unfiltered feed. One release
//! node, one run; prints docs/s.
//!
//! Usage: `cargo run --release -p thali-tests --bin thali-bench-plugins [-- --docs N]`
//! (needs the example plugin: `cargo build --release --target wasm32-unknown-unknown
//! --manifest-path plugins/Cargo.toml`).

use base64::Engine;
use serde_json::{json, Value};
use std::time::Instant;
use thali_tests::servers::{arg_usize, start_thali, Target};

fn insert(t: &Target, db: &str, n: usize) -> f64 {
    let batches: Vec<Value> = (0..n)
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|c| json!({"docs": c.iter().map(|i| json!({"_id": format!("d{i:08}"), "type": if i % 2 == 0 { "even" } else { "odd" }, "n": i})).collect::<Vec<_>>()}))
        .collect();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for half in batches.chunks(batches.len().div_ceil(2)) {
            s.spawn(move || {
                for b in half {
                    let (st, v) = t.call("POST", &format!("/{db}/_bulk_docs"), Some(b));
                    assert_eq!(st, 201, "{v}");
                    assert!(
                        v.as_array().unwrap().iter().all(|r| r["ok"] == true),
                        "{db}: {v}"
                    );
                }
            });
        }
    });
    n as f64 / t0.elapsed().as_secs_f64()
}

fn feed(t: &Target, db: &str, filter: &str, n: usize) -> f64 {
    let t0 = Instant::now();
    let (st, v) = t.call("GET", &format!("/{db}/_changes?{filter}"), None);
    assert_eq!(st, 200, "{v}");
    let rows = v["results"].as_array().unwrap().len();
    assert!(rows >= n / 2, "{db} {filter}: {rows} rows");
    (n + 1) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let n = arg_usize("--docs", 20_000);
    let root = thali_tests::workspace_root();
    let wasm = std::fs::read(root.join("plugins/target/wasm32-unknown-unknown/release/typed.wasm"))
        .expect("build plugins/ for wasm32 first (see the usage line)");
    let lua = |f: &str| std::fs::read_to_string(root.join("scripts/app/typed").join(f)).unwrap();
    let js = |f: &str| std::fs::read_to_string(root.join("scripts/app/typed-js").join(f)).unwrap();
    let t = start_thali(&root);
    let ddocs = [
        ("plain", None),
        (
            "lua",
            Some(
                json!({"language": "lua", "validate_doc_update": lua("validate_doc_update.lua"), "filters": {"by_type": lua("filters/by_type.lua")}}),
            ),
        ),
        (
            "javascript",
            Some(
                json!({"validate_doc_update": js("validate_doc_update.js"), "filters": {"by_type": js("filters/by_type.js")}}),
            ),
        ),
        (
            "wasm",
            Some(
                json!({"language": "wasm", "validate_doc_update": "validate", "filters": {"by_type": "by_type"},
            "_attachments": {"module.wasm": {"content_type": "application/wasm", "data": base64::engine::general_purpose::STANDARD.encode(&wasm)}}}),
            ),
        ),
    ];
    println!("workload: {n} docs via _bulk_docs (batches of 500, 2 clients), then the full _changes feed");
    let mut rows = Vec::new();
    for (db, ddoc) in &ddocs {
        assert!(t.call("PUT", &format!("/{db}"), None).0 < 300);
        if let Some(d) = ddoc {
            let (s, v) = t.call("PUT", &format!("/{db}/_design/typed"), Some(d));
            assert_eq!(s, 201, "{v}");
        }
        let ins = insert(&t, db, n);
        let filter = if ddoc.is_some() {
            "filter=typed/by_type&type=even"
        } else {
            ""
        };
        let f = feed(&t, db, filter, n);
        rows.push((db, ins, f));
    }
    let base = rows[0].1;
    println!();
    println!(
        "{:<12} {:>22} {:>10} {:>28}",
        "validator", "_bulk_docs (docs/s)", "vs none", "_changes scanned (docs/s)"
    );
    for (db, ins, f) in &rows {
        let label = if **db == "plain" { "none" } else { db };
        let feed_label = if **db == "plain" {
            "unfiltered"
        } else {
            "filter by_type"
        };
        println!(
            "{label:<12} {ins:>22.0} {:>9.2}x {f:>15.0} ({feed_label})",
            ins / base
        );
    }
}
