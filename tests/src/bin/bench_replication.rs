//! Benchmark: node-to-node replication over httpkey URLs (mutual TLS) between two release
//! `thali` nodes, push and pull, beside PouchDB (npm) replicating between two databases of one
//! pouchdb-server, same documents, same run. Prints docs/s and the ratio.
//!
//! Usage: `cargo run --release -p thali-tests --bin thali-bench-replication [-- --docs N]`
//! (needs `npm ci` in tests/interop).

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use thali_tests::servers::{start_pouchdb_server, start_thali, Target};

fn addr(t: &Target) -> SocketAddr {
    t.base.trim_start_matches("http://").parse().unwrap()
}

fn call(t: &Target, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut h = vec![("Content-Type".to_string(), "application/json".to_string())];
    if let Some(a) = &t.auth {
        h.push(("Authorization".into(), a.clone()));
    }
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    let r = thali_tests::try_request_within(
        addr(t),
        method,
        path,
        &h,
        body.as_deref(),
        Duration::from_secs(3600),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn load(t: &Target, db: &str, n: usize) {
    assert!(call(t, "PUT", &format!("/{db}"), None).0 < 300);
    for start in (0..n).step_by(1000) {
        let docs: Vec<Value> = (start..(start + 1000).min(n))
            .map(|i| json!({"_id": format!("doc{i:08}"), "type": "reading", "n": i, "value": i as f64 * 0.5, "tags": ["a", "b"]}))
            .collect();
        let (s, v) = call(
            t,
            "POST",
            &format!("/{db}/_bulk_docs"),
            Some(&json!({ "docs": docs })),
        );
        assert_eq!(s, 201, "{v}");
    }
}

fn key(t: &Target) -> String {
    thali_tests::node_identity(&t._dir.0).key_id()
}

fn httpkey(t: &Target, db: &str) -> String {
    format!("httpkey://127.0.0.1:{}/{}/{db}", t.peer_port, key(t))
}

fn allow(t: &Target, db: &str, other: &Target) {
    let _ = call(t, "PUT", &format!("/{db}"), None);
    let sec = json!({"members": {"names": [key(other)], "roles": []}});
    assert_eq!(
        call(t, "PUT", &format!("/{db}/_security"), Some(&sec)).0,
        200
    );
}

/// Runs one replication on `on` and returns docs/s.
fn replicate(on: &Target, body: Value, n: usize) -> f64 {
    let t = Instant::now();
    let (s, v) = call(on, "POST", "/_replicate", Some(&body));
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
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--docs")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--docs N"))
        .unwrap_or(100_000);
    let root = thali_tests::workspace_root();
    println!("workload: {n} small documents (~120 B), replicated once");

    let (a, b) = (start_thali(&root), start_thali(&root));
    load(&a, "src", n);
    allow(&b, "dst", &a);
    allow(&a, "src", &b);
    let push = replicate(
        &a,
        json!({"source": "src", "target": httpkey(&b, "dst")}),
        n,
    );
    println!("thali push A -> B over httpkey: {push:.0} docs/s");
    let pull = replicate(
        &b,
        json!({"source": httpkey(&a, "src"), "target": "pulled", "create_target": true}),
        n,
    );
    println!("thali pull B <- A over httpkey: {pull:.0} docs/s");
    drop((a, b));

    let p = start_pouchdb_server(&root);
    load(&p, "src", n);
    let t = Instant::now();
    let out = Command::new("node")
        .arg(root.join("tests/interop/bench-replicate.js"))
        .arg(format!("{}/src", p.base))
        .arg(format!("{}/dst", p.base))
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("replication result");
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
