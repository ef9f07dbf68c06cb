//! `thali-soak [--seconds N] [--sample-secs S] [--clients C]`: mixed load on one node (A) with
//! two peers for N seconds (default 1800), sampling A's RSS, open file descriptors, threads,
//! disk size and request latency every S seconds (default 60).
//!
//! Load on A over loopback HTTP: document creates and updates, reads, view queries, writes a
//! validator refuses (403 expected), live `_changes` longpoll feeds. Peer B writes and pushes
//! to A continuously, A pushes to C continuously, both over mutual TLS (httpkey URLs, keys
//! granted in `_security`). A compacts at half time; C restarts every 90 s (a quarter of a
//! short run).
//! At the end: every request's outcome was the expected one, and A and C hold the same
//! documents at the same revisions (B's all among them). Exits 1 otherwise.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thali_tests::servers::{arg_usize, dir_bytes, rss_bytes};
use thali_tests::{admin_auth, try_request_within, Client, PeerNode};

const DB: &str = "soak";

#[derive(Default)]
struct Stats {
    /// Request latencies (µs) since the last sample.
    lat: Mutex<Vec<u64>>,
    requests: AtomicU64,
    errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl Stats {
    fn record(&self, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.lat.lock() {
            l.push(took.as_micros() as u64);
        }
    }
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.first_errors.lock() {
            if e.len() < 20 {
                e.push(what);
            }
        }
    }
}

/// One request to A as the admin; an unexpected status is an error.
fn call(
    a: &PeerNode,
    stats: &Stats,
    method: &str,
    path: &str,
    body: Option<&Value>,
    expect: &[u16],
) -> Option<Value> {
    let mut headers = vec![("Authorization".to_string(), admin_auth())];
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    if body.is_some() {
        headers.push(("Content-Type".into(), "application/json".into()));
    }
    let t = Instant::now();
    let r = try_request_within(
        a.node.addr,
        method,
        path,
        &headers,
        body.as_deref(),
        Duration::from_secs(30),
    );
    stats.record(t.elapsed());
    match r {
        Ok(r) if expect.contains(&r.status) => serde_json::from_slice(&r.body).ok(),
        Ok(r) => {
            stats.error(format!("{method} {path}: {} {}", r.status, r.text()));
            None
        }
        Err(e) => {
            stats.error(format!("{method} {path}: {e}"));
            None
        }
    }
}

struct Sample {
    at: f64,
    rss: u64,
    fds: u64,
    threads: u64,
    disk: u64,
    p50: u64,
    p99: u64,
    requests: u64,
}

fn proc_count(pid: u32, what: &str) -> u64 {
    match what {
        "fds" => std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0),
        _ => std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Threads:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0),
    }
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Least-squares slope of `y` over `x` (per unit of x).
fn slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if x.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let num: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let den: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// id → winning rev of every document (design documents included).
fn revs(node: &thali_tests::Node) -> BTreeMap<String, String> {
    let all = node.get(&format!("/{DB}/_all_docs")).json();
    all["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or("").to_string(),
                r["value"]["rev"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn main() {
    let seconds = arg_usize("--seconds", 1800) as u64;
    let sample = arg_usize("--sample-secs", 60) as u64;
    let clients = arg_usize("--clients", 4);
    let (a, b, mut c) = (
        PeerNode::start("soak-a"),
        PeerNode::start("soak-b"),
        PeerNode::start("soak-c"),
    );
    a.allow(DB, &b);
    // A pushes its design document too, which takes admin on C.
    let _ = c.node.put(&format!("/{DB}"), &json!({}));
    let sec = json!({"admins": {"names": [a.key_id()], "roles": []}});
    assert_eq!(c.node.put(&format!("/{DB}/_security"), &sec).status, 200);
    let _ = b.node.put(&format!("/{DB}"), &json!({}));
    let ddoc = json!({
        "views": {"by_n": {"map": "function(doc){ if (doc.n !== undefined) emit(doc.n, null); }", "reduce": "_count"}},
        "validate_doc_update": "function(doc){ if (doc.bad) throw({forbidden: 'bad documents are refused'}); }"
    });
    assert_eq!(a.node.put(&format!("/{DB}/_design/s"), &ddoc).status, 201);
    for (from, to, id) in [(&b, a.url(DB), "in"), (&a, c.url(DB), "out")] {
        let r = from.node.post(
            "/_replicator",
            &json!({"_id": id, "source": DB, "target": to, "continuous": true}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }

    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let a = Arc::new(a);
    let b = Arc::new(b);
    let mut handles = Vec::new();
    // App clients on A.
    for t in 0..clients {
        let (a, stats, stop) = (a.clone(), stats.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut revs: BTreeMap<String, String> = BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("c{t}-{}", i % 500);
                match i % 10 {
                    0..=3 => {
                        let mut body =
                            json!({"n": i, "by": t, "pad": "p".repeat((i % 7 * 300) as usize)});
                        if let Some(r) = revs.get(&id) {
                            body["_rev"] = json!(r);
                        }
                        let r = call(
                            &a,
                            &stats,
                            "PUT",
                            &format!("/{DB}/{id}"),
                            Some(&body),
                            &[201],
                        );
                        if let Some(rev) = r.and_then(|v| v["rev"].as_str().map(String::from)) {
                            revs.insert(id, rev);
                        }
                    }
                    4..=6 => {
                        let expect: &[u16] = if revs.contains_key(&id) {
                            &[200]
                        } else {
                            &[200, 404]
                        };
                        call(&a, &stats, "GET", &format!("/{DB}/{id}"), None, expect);
                    }
                    7 => {
                        call(
                            &a,
                            &stats,
                            "GET",
                            &format!("/{DB}/_design/s/_view/by_n?limit=20&reduce=false"),
                            None,
                            &[200],
                        );
                    }
                    8 => {
                        let bad = json!({"bad": true});
                        call(
                            &a,
                            &stats,
                            "PUT",
                            &format!("/{DB}/bad{t}-{i}"),
                            Some(&bad),
                            &[403],
                        );
                    }
                    _ => {
                        call(
                            &a,
                            &stats,
                            "GET",
                            &format!("/{DB}/_design/s/_view/by_n"),
                            None,
                            &[200],
                        );
                    }
                }
            }
        }));
    }
    // Live `_changes` feeds on A.
    for _ in 0..2 {
        let (a, stats, stop) = (a.clone(), stats.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut since = json!("now");
            while !stop.load(Ordering::Relaxed) {
                let since_s = since
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| since.to_string());
                let path =
                    format!("/{DB}/_changes?feed=longpoll&timeout=2000&limit=200&since={since_s}");
                if let Some(v) = call(&a, &stats, "GET", &path, None, &[200]) {
                    since = v["last_seq"].clone();
                }
            }
        }));
    }
    // Writes on B, replicated into A.
    {
        let (b, stats, stop) = (b.clone(), stats.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = b.node.req(
                    "PUT",
                    &format!("/{DB}/b{i}"),
                    Some(&json!({"n": i, "from": "b"})),
                );
                if r.status != 201 {
                    stats.error(format!("PUT on B: {} {}", r.status, r.text()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }

    let pid = a.node.child.id();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut samples: Vec<Sample> = Vec::new();
    let mut compacted = false;
    let mut last_restart = Instant::now();
    // Every 90 s; in a short run often enough to happen at least twice.
    let restart_every = Duration::from_secs((seconds / 4).clamp(10, 90));
    println!(
        "{:>6} {:>8} {:>5} {:>7} {:>9} {:>8} {:>8} {:>9}",
        "t (s)", "RSS MB", "fds", "threads", "disk MB", "p50 ms", "p99 ms", "requests"
    );
    let mut next_sample = start + Duration::from_secs(sample);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250));
        if !compacted && start.elapsed() >= Duration::from_secs(seconds / 2) {
            compacted = true;
            call(
                &a,
                &stats,
                "POST",
                &format!("/{DB}/_compact"),
                Some(&json!({})),
                &[202],
            );
        }
        if last_restart.elapsed() >= restart_every {
            last_restart = Instant::now();
            c.node.stop();
            c.node.restart();
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(sample);
            let mut lat = std::mem::take(&mut *stats.lat.lock().unwrap());
            let s = Sample {
                at: start.elapsed().as_secs_f64(),
                rss: rss_bytes(pid),
                fds: proc_count(pid, "fds"),
                threads: proc_count(pid, "threads"),
                disk: dir_bytes(&a.dir.0),
                p50: percentile(&mut lat, 0.5),
                p99: percentile(&mut lat, 0.99),
                requests: stats.requests.load(Ordering::Relaxed),
            };
            println!(
                "{:>6.0} {:>8.1} {:>5} {:>7} {:>9.1} {:>8.2} {:>8.2} {:>9}",
                s.at,
                s.rss as f64 / 1e6,
                s.fds,
                s.threads,
                s.disk as f64 / 1e6,
                s.p50 as f64 / 1000.0,
                s.p99 as f64 / 1000.0,
                s.requests
            );
            samples.push(s);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }

    // Converged: A and C equal, B's documents all in A.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut ra, mut rc);
    loop {
        ra = revs(&a.node);
        rc = revs(&c.node);
        let rb = revs(&b.node);
        let b_in_a = rb.iter().all(|(k, v)| ra.get(k) == Some(v));
        if (ra == rc && b_in_a) || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let identical = ra == rc;
    let errors = stats.errors.load(Ordering::Relaxed);
    let x: Vec<f64> = samples.iter().map(|s| s.at / 3600.0).collect();
    let per_hour =
        |f: &dyn Fn(&Sample) -> f64| slope(&x, &samples.iter().map(f).collect::<Vec<_>>());
    if let (Some(f), Some(l)) = (samples.first(), samples.last()) {
        for (name, s) in [("first:", f), ("last: ", l)] {
            println!(
                "{name} RSS {:.1} MB, {} fds, {} threads, disk {:.1} MB, p50 {:.2} ms, p99 {:.2} ms",
                s.rss as f64 / 1e6,
                s.fds,
                s.threads,
                s.disk as f64 / 1e6,
                s.p50 as f64 / 1e3,
                s.p99 as f64 / 1e3
            );
        }
        println!(
            "slope per hour: RSS {:+.1} MB, fds {:+.1}, threads {:+.1}, disk {:+.1} MB, p99 {:+.2} ms",
            per_hour(&|s| s.rss as f64 / 1e6),
            per_hour(&|s| s.fds as f64),
            per_hour(&|s| s.threads as f64),
            per_hour(&|s| s.disk as f64 / 1e6),
            per_hour(&|s| s.p99 as f64 / 1e3),
        );
    }
    println!(
        "{} requests, {errors} unexpected answers; A has {} documents, C {}: {}",
        stats.requests.load(Ordering::Relaxed),
        ra.len(),
        rc.len(),
        if identical { "identical" } else { "DIFFERENT" }
    );
    for e in stats.first_errors.lock().unwrap().iter() {
        println!("  error: {e}");
    }
    if !identical {
        let only_a: Vec<_> = ra
            .iter()
            .filter(|(k, v)| rc.get(*k) != Some(v))
            .take(5)
            .collect();
        let only_c: Vec<_> = rc
            .iter()
            .filter(|(k, v)| ra.get(*k) != Some(v))
            .take(5)
            .collect();
        println!("  A, not C: {only_a:?}\n  C, not A: {only_c:?}");
    }
    let failed = errors > 0 || !identical || samples.is_empty();
    // The nodes stop with their handles (process::exit would leave them running).
    drop(c);
    drop(a);
    drop(b);
    if failed {
        std::process::exit(1);
    }
}
