//! Benchmark: replication of documents with large attachments (default 200 × 5 MB) between two
//! release `thali` nodes over httpkey (mutual TLS), push and pull, with each node's peak
//! resident memory; beside PouchDB (npm) replicating the same documents between two databases
//! of one pouchdb-server, same run. Prints MB/s and peak RSS.
//!
//! Usage: `cargo run --release -p thali-tests --bin thali-bench-attachments [-- --docs N]
//! [--mb M] [--thali-only]` (needs `npm ci` in tests/interop).

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use thali_tests::blobs::{generated, RssSampler};
use thali_tests::servers::{
    arg_usize, pouchdb_replicate_batched, rss_bytes, start_pouchdb_server, start_thali, Target,
};

/// `n` documents, each with one attachment of `size` bytes (different bytes per document).
fn load(t: &Target, db: &str, n: usize, size: usize) {
    assert!(t.call("PUT", &format!("/{db}"), None).0 < 300);
    let addr: std::net::SocketAddr = t.base.trim_start_matches("http://").parse().unwrap();
    let mut h = vec![(
        "Content-Type".to_string(),
        "application/octet-stream".to_string(),
    )];
    if let Some(a) = &t.auth {
        h.push(("Authorization".into(), a.clone()));
    }
    for i in 0..n {
        let body = generated((i * size) as u64, size);
        let r = thali_tests::try_request_within(
            addr,
            "PUT",
            &format!("/{db}/doc{i:05}/video.bin"),
            &h,
            Some(&body),
            Duration::from_secs(600),
        )
        .expect("attachment PUT");
        assert!(r.status < 300, "{}", String::from_utf8_lossy(&r.body));
    }
}

const MB: f64 = 1e6;

struct Run {
    mb_s: f64,
    /// Peak RSS above idle, per process sampled, in MB.
    peaks: Vec<f64>,
}

/// Runs `f` while sampling the resident memory of `pids`.
fn sampled(pids: &[u32], bytes: f64, f: impl FnOnce() -> f64) -> Run {
    let idle: Vec<u64> = pids.iter().map(|p| rss_bytes(*p)).collect();
    let samplers: Vec<RssSampler> = pids.iter().map(|p| RssSampler::start(*p)).collect();
    let secs = f();
    let peaks = samplers
        .iter()
        .zip(&idle)
        .map(|(s, i)| s.peak().saturating_sub(*i) as f64 / MB)
        .collect();
    Run {
        mb_s: bytes / MB / secs,
        peaks,
    }
}

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
    secs
}

fn main() {
    let n = arg_usize("--docs", 200);
    let size = arg_usize("--mb", 5) * 1_000_000;
    let bytes = (n * size) as f64;
    let root = thali_tests::workspace_root();
    println!(
        "workload: {n} documents with one {} MB attachment each ({:.0} MB), replicated once",
        size / 1_000_000,
        bytes / MB
    );

    let (a, b) = (start_thali(&root), start_thali(&root));
    load(&a, "src", n, size);
    b.allow("dst", &a);
    a.allow("src", &b);
    let pids = [a.child.id(), b.child.id()];
    let push = sampled(&pids, bytes, || {
        replicate(&a, json!({"source": "src", "target": b.httpkey("dst")}), n)
    });
    println!(
        "thali push A -> B over httpkey: {:.1} MB/s; peak RSS above idle A {:.1} MB, B {:.1} MB",
        push.mb_s, push.peaks[0], push.peaks[1]
    );
    let pull = sampled(&pids, bytes, || {
        replicate(
            &b,
            json!({"source": a.httpkey("src"), "target": "pulled", "create_target": true}),
            n,
        )
    });
    println!(
        "thali pull B <- A over httpkey: {:.1} MB/s; peak RSS above idle A {:.1} MB, B {:.1} MB",
        pull.mb_s, pull.peaks[0], pull.peaks[1]
    );
    let (ra, rb) = (rss_bytes(a.child.id()), rss_bytes(b.child.id()));
    drop((a, b));
    if std::env::args().any(|a| a == "--thali-only") {
        return;
    }

    let p = start_pouchdb_server(&root);
    load(&p, "src", n, size);
    // PouchDB moves attachments inline as base64 in its batches; 10 per batch keeps a batch
    // (~70 MB of JSON) within what node handles.
    let pouch = sampled(&[p.child.id()], bytes, || {
        let r = pouchdb_replicate_batched(
            &root,
            &format!("{}/src", p.base),
            &format!("{}/dst", p.base),
            10,
        );
        assert_eq!(r["docs_written"].as_u64(), Some(n as u64), "{r}");
        r["ms"].as_f64().unwrap() / 1000.0
    });
    println!(
        "PouchDB replicating on pouchdb-server: {:.1} MB/s; pouchdb-server peak RSS above idle {:.1} MB",
        pouch.mb_s, pouch.peaks[0]
    );
    println!();
    println!(
        "{:<44} {:>8} {:>7} {:>22}",
        format!("{n} x {} MB attachments", size / 1_000_000),
        "MB/s",
        "ratio",
        "peak RSS above idle"
    );
    let row = |name: &str, r: &Run, mem: String| {
        println!(
            "{:<44} {:>8.1} {:>6.1}x {:>22}",
            name,
            r.mb_s,
            r.mb_s / pouch.mb_s,
            mem
        );
    };
    row(
        "thali -> thali, push over httpkey (mTLS)",
        &push,
        format!("{:.0} / {:.0} MB", push.peaks[0], push.peaks[1]),
    );
    row(
        "thali <- thali, pull over httpkey (mTLS)",
        &pull,
        format!("{:.0} / {:.0} MB", pull.peaks[0], pull.peaks[1]),
    );
    row(
        "PouchDB, pouchdb-server db -> db",
        &pouch,
        format!("{:.0} MB (server)", pouch.peaks[0]),
    );
    println!(
        "thali RSS after both runs: A {:.0} MB, B {:.0} MB",
        ra as f64 / MB,
        rb as f64 / MB
    );
}
