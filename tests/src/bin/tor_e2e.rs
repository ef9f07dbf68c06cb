//! `thali-tor-e2e [--runs N] [--docs N]`: builds a private Tor network, runs the two-node onion
//! replication round N times (each with two fresh nodes, so fresh onion services) and prints how
//! many passed with their timings, then compares one-shot replication throughput over Tor with
//! the same replication over TCP.

use serde_json::json;
use std::time::{Duration, Instant};
use thali_tests::tornet::{replicate_slow, round, OnionNode, PrivNet};
use thali_tests::Client;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runs = arg("--runs", 10);
    let docs = arg("--docs", 2000);
    let net = PrivNet::start();
    println!(
        "private Tor network bootstrapped in {:.1}s",
        net.bootstrap.as_secs_f64()
    );
    let mut passed = 0;
    for i in 1..=runs {
        let t = Instant::now();
        match round(&net) {
            Ok(r) => {
                passed += 1;
                println!(
                    "run {i:2}: ok in {:5.1}s  A reachable (first pull done) {:5.2}s after serve, B {:5.2}s; arti says Running at {}; converged {:5.2}s",
                    t.elapsed().as_secs_f64(),
                    r.a_reachable.as_secs_f64(),
                    r.b_reachable.as_secs_f64(),
                    r.a_arti_reachable.map(|s| format!("{s:.2}s")).unwrap_or("-".into()),
                    r.converged.as_secs_f64(),
                );
            }
            Err(e) => println!(
                "run {i:2}: FAILED after {:.1}s: {e}",
                t.elapsed().as_secs_f64()
            ),
        }
    }
    println!("{passed}/{runs} runs passed");

    // Throughput: B pulls the same database from A over TCP and over Tor.
    let a = OnionNode::start("tp-a", &net);
    let b = OnionNode::start("tp-b", &net);
    a.allow("bulk", &b);
    let body = "x".repeat(900);
    for chunk in 0..docs.div_ceil(500) {
        let batch: Vec<_> = (chunk * 500..((chunk + 1) * 500).min(docs))
            .map(|i| json!({"_id": format!("d{i:06}"), "n": i, "pad": body}))
            .collect();
        assert_eq!(
            a.node
                .post("/bulk/_bulk_docs", &json!({"docs": batch}))
                .status,
            201
        );
    }
    let pull = |source: String, target: &str| -> Duration {
        let t = Instant::now();
        let r = replicate_slow(
            &b.node,
            &json!({"source": source, "target": target, "create_target": true}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["history"][0]["docs_written"], docs, "{}", r.text());
        t.elapsed()
    };
    // Warm the onion path first (descriptor fetch and circuits are a one-time cost).
    let _ = replicate_slow(
        &b.node,
        &json!({"source": a.onion("bulk"), "target": "warm", "create_target": true, "doc_ids": ["d000000"]}),
    );
    let tcp = pull(a.tcp("bulk"), "viatcp");
    let tor = pull(a.onion("bulk"), "viator");
    let rate = |d: Duration| docs as f64 / d.as_secs_f64();
    println!(
        "one-shot pull of {docs} docs (~1 KB): TCP {:.2}s = {:.0} docs/s; Tor {:.2}s = {:.0} docs/s; Tor/TCP {:.2}",
        tcp.as_secs_f64(),
        rate(tcp),
        tor.as_secs_f64(),
        rate(tor),
        rate(tor) / rate(tcp)
    );
}
