//! Benchmark: this node against pouchdb-server 4.2 (npm) on the same machine, same workload,
//! one run. Prints each figure for both servers and their ratio.
//!
//! Then this node's memory and disk: resident memory idle and after the workload (its databases
//! deleted), and the store's size after loading 100k documents, after deleting them and
//! compacting, and after deleting the database.
//!
//! Usage: `cargo run --release -p thali-tests --bin thali-bench [-- --quick] [--thali-only]
//! [--storage fjall|sled]` (needs `npm ci` in tests/interop and builds the release `thali`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use thali_tests::servers::{
    dir_bytes, pouchdb_replicate, rss_bytes, start_pouchdb_server, start_thali, Target,
};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn call(
    c: &HttpClient,
    t: &Target,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, Bytes) {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{}", t.base, path));
    if let Some(a) = &t.auth {
        b = b.header("Authorization", a);
    }
    if body.is_some() {
        b = b.header("Content-Type", "application/json");
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    let resp = c
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{} {method} {path}: {e:?}", t.name));
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, bytes)
}

fn doc(i: usize) -> Value {
    json!({
        "_id": format!("doc{i:08}"),
        "type": "measurement",
        "value": i,
        "name": format!("sensor-{}", i % 97),
        "tags": ["bench", "thali", format!("t{}", i % 13)],
        "payload": "x".repeat(120),
    })
}

/// A `_changes` answer: its rows validated as JSON, not kept.
#[derive(serde::Deserialize)]
struct Feed {
    results: Vec<serde::de::IgnoredAny>,
}

#[derive(Default, Clone)]
struct Figures {
    bulk_docs_per_s: f64,
    put_rps: f64,
    put_p50_ms: f64,
    put_p99_ms: f64,
    get_rps: f64,
    get_p50_ms: f64,
    get_p99_ms: f64,
    changes_rows_per_s: f64,
    repl_docs_per_s: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs `total` requests over `conc` workers; returns (req/s, p50 ms, p99 ms).
async fn load<F, Fut>(conc: usize, total: usize, f: F) -> (f64, f64, f64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = u16> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    return lat;
                }
                let t = Instant::now();
                let status = f(i).await;
                assert!(status < 300, "request {i} failed with {status}");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    (total as f64 / secs, pct(&mut all, 0.5), pct(&mut all, 0.99))
}

async fn run(
    t: Arc<Target>,
    root: &std::path::Path,
    n_docs: usize,
    n_put: usize,
    n_get: usize,
) -> Figures {
    let c: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let mut fig = Figures::default();
    assert!(call(&c, &t, "PUT", "/bench", None).await.0 < 300);
    assert!(call(&c, &t, "PUT", "/bench_put", None).await.0 < 300);

    // 1. _bulk_docs: batches of 500, two clients.
    let batches: Vec<Vec<u8>> = (0..n_docs)
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|ch| {
            serde_json::to_vec(&json!({"docs": ch.iter().map(|&i| doc(i)).collect::<Vec<_>>()}))
                .unwrap()
        })
        .collect();
    let batches = Arc::new(batches);
    let nb = batches.len();
    let (cc, tt, bb) = (c.clone(), t.clone(), batches.clone());
    let start = Instant::now();
    load(2, nb, move |i| {
        let (c, t, b) = (cc.clone(), tt.clone(), bb.clone());
        async move {
            call(&c, &t, "POST", "/bench/_bulk_docs", Some(b[i].clone()))
                .await
                .0
        }
    })
    .await;
    fig.bulk_docs_per_s = n_docs as f64 / start.elapsed().as_secs_f64();

    // 2. Concurrent single-document PUTs (new docs) and GETs (random existing docs).
    let (cc, tt) = (c.clone(), t.clone());
    let (rps, p50, p99) = load(32, n_put, move |i| {
        let (c, t) = (cc.clone(), tt.clone());
        async move {
            let body = serde_json::to_vec(&doc(i)).unwrap();
            call(&c, &t, "PUT", &format!("/bench_put/p{i:08}"), Some(body))
                .await
                .0
        }
    })
    .await;
    (fig.put_rps, fig.put_p50_ms, fig.put_p99_ms) = (rps, p50, p99);
    let (cc, tt) = (c.clone(), t.clone());
    let (rps, p50, p99) = load(32, n_get, move |i| {
        let (c, t) = (cc.clone(), tt.clone());
        let id = (i.wrapping_mul(2654435761)) % n_docs;
        async move {
            call(&c, &t, "GET", &format!("/bench/doc{id:08}"), None)
                .await
                .0
        }
    })
    .await;
    (fig.get_rps, fig.get_p50_ms, fig.get_p99_ms) = (rps, p50, p99);

    // 3. The full _changes feed, three times.
    let start = Instant::now();
    for _ in 0..3 {
        let (s, body) = call(&c, &t, "GET", "/bench/_changes?style=all_docs", None).await;
        assert_eq!(s, 200);
        // Checked as JSON and counted, without building a tree the server is not asked for.
        let feed: Feed = serde_json::from_slice(&body).unwrap();
        assert_eq!(feed.results.len(), n_docs, "{}: full feed", t.name);
    }
    fig.changes_rows_per_s = (3 * n_docs) as f64 / start.elapsed().as_secs_f64();

    // 4. PouchDB (npm) replicating bench -> bench_copy on the same server.
    let auth = if t.auth.is_some() {
        format!("admin:{}@", thali_tests::PASSWORD)
    } else {
        String::new()
    };
    let host = t.base.trim_start_matches("http://");
    let r = pouchdb_replicate(
        root,
        &format!("http://{auth}{host}/bench"),
        &format!("http://{auth}{host}/bench_copy"),
    );
    assert_eq!(r["docs_written"].as_u64().unwrap() as usize, n_docs);
    fig.repl_docs_per_s = n_docs as f64 / (r["ms"].as_f64().unwrap() / 1000.0);
    fig
}

const MB: f64 = 1024.0 * 1024.0;

/// Waits until `db` reports no compaction running (bounded).
async fn compacted(c: &HttpClient, t: &Target, db: &str) {
    for _ in 0..1200 {
        let (_, b) = call(c, t, "GET", &format!("/{db}"), None).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        if v["compact_running"] == false {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{db}: compaction did not finish");
}

/// The node's memory after the workload and the store's disk use through a load / delete /
/// compact / drop cycle of `n` documents. Prints as it goes.
async fn memory_and_disk(t: Arc<Target>, idle_rss: u64, n: usize) {
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let pid = t.child.id();
    for db in ["bench", "bench_put", "bench_copy"] {
        let _ = call(&c, &t, "DELETE", &format!("/{db}"), None).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after_rss = rss_bytes(pid);
    let disk = |what: &str| {
        println!(
            "  store on disk {what:<38} {:>8.1} MB",
            dir_bytes(&t._dir.0) as f64 / MB
        )
    };
    println!();
    println!(
        "thali memory (RSS): idle {:.1} MB, after the workload with its databases deleted {:.1} MB",
        idle_rss as f64 / MB,
        after_rss as f64 / MB
    );
    disk("with the workload's databases deleted");
    assert!(call(&c, &t, "PUT", "/disk", None).await.0 < 300);
    let mut revs = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let docs: Vec<Value> = (start..(start + 1000).min(n)).map(doc).collect();
        let body = serde_json::to_vec(&json!({ "docs": docs })).unwrap();
        let (s, b) = call(&c, &t, "POST", "/disk/_bulk_docs", Some(body)).await;
        assert_eq!(s, 201);
        let v: Value = serde_json::from_slice(&b).unwrap();
        revs.extend(
            v.as_array()
                .unwrap()
                .iter()
                .map(|r| r["rev"].as_str().unwrap().to_string()),
        );
    }
    disk(&format!("after loading {n} docs"));
    println!("  RSS after loading: {:.1} MB", rss_bytes(pid) as f64 / MB);
    for start in (0..n).step_by(1000) {
        let docs: Vec<Value> = (start..(start + 1000).min(n))
            .map(|i| json!({"_id": format!("doc{i:08}"), "_rev": revs[i], "_deleted": true}))
            .collect();
        let body = serde_json::to_vec(&json!({ "docs": docs })).unwrap();
        assert_eq!(
            call(&c, &t, "POST", "/disk/_bulk_docs", Some(body)).await.0,
            201
        );
    }
    disk("after deleting them");
    assert_eq!(
        call(&c, &t, "POST", "/disk/_compact", Some(b"{}".to_vec()))
            .await
            .0,
        202
    );
    compacted(&c, &t, "disk").await;
    disk("after compacting");
    assert!(call(&c, &t, "DELETE", "/disk", None).await.0 < 300);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    disk("after deleting the database");
    println!("  RSS at the end: {:.1} MB", rss_bytes(pid) as f64 / MB);
}

fn nodelay(s: std::net::TcpStream) -> std::net::TcpStream {
    s.set_nodelay(true).unwrap();
    s
}

/// A keep-alive HTTP/1.1 connection over any stream.
struct KeepAlive<S: std::io::Read + std::io::Write> {
    stream: std::io::BufReader<S>,
    auth: Option<String>,
}

impl<S: std::io::Read + std::io::Write> KeepAlive<S> {
    fn get(&mut self, path: &str) -> u16 {
        let auth = self
            .auth
            .as_ref()
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        // One write per request: several small ones would meet Nagle and delayed ACKs.
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n{auth}\r\n");
        self.stream.get_mut().write_all(req.as_bytes()).unwrap();
        self.stream.get_mut().flush().unwrap();
        thali_tests::read_response(&mut self.stream, false)
            .unwrap()
            .status
    }
}

/// Peer listener vs loopback listener: requests/s with keep-alive connections, and with a new
/// connection per request (which adds the TCP, and for peers the TLS 1.3, handshake).
fn peer_vs_loopback(t: &Target, n_docs: usize, quick: bool) -> [(f64, f64); 2] {
    let id = Arc::new(thali_node::peer::Identity::generate().unwrap());
    let server_key = *thali_tests::node_identity(&t._dir.0).public_key();
    let base: std::net::SocketAddr = t.base.trim_start_matches("http://").parse().unwrap();
    let peer: std::net::SocketAddr = format!("127.0.0.1:{}", t.peer_port).parse().unwrap();
    let sec = json!({"members": {"names": [id.key_id()], "roles": []}});
    let h = vec![
        ("Authorization".to_string(), thali_tests::admin_auth()),
        ("Content-Type".to_string(), "application/json".to_string()),
    ];
    assert_eq!(
        thali_tests::request(
            base,
            "PUT",
            "/bench/_security",
            &h,
            Some(sec.to_string().as_bytes())
        )
        .status,
        200
    );
    let (threads, per_keep, per_new) = if quick { (4, 500, 100) } else { (8, 2500, 300) };
    let path = move |i: usize| format!("/bench/doc{:08}", (i * 7919) % n_docs);
    let run = |peer_side: bool, keep: bool| -> f64 {
        let start = Instant::now();
        let per = if keep { per_keep } else { per_new };
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let client = thali_tests::PeerClient::new(&id, server_key, peer);
                    let connect_plain = || KeepAlive {
                        stream: std::io::BufReader::new(nodelay(
                            std::net::TcpStream::connect(base).unwrap(),
                        )),
                        auth: Some(thali_tests::admin_auth()),
                    };
                    let connect_tls = || {
                        let name = rustls::pki_types::ServerName::try_from("thali.peer").unwrap();
                        let conn =
                            rustls::ClientConnection::new(client.config.clone(), name).unwrap();
                        KeepAlive {
                            stream: std::io::BufReader::new(rustls::StreamOwned::new(
                                conn,
                                nodelay(std::net::TcpStream::connect(peer).unwrap()),
                            )),
                            auth: None,
                        }
                    };
                    match (peer_side, keep) {
                        (false, true) => {
                            let mut c = connect_plain();
                            (0..per).for_each(|i| assert_eq!(c.get(&path(i)), 200));
                        }
                        (true, true) => {
                            let mut c = connect_tls();
                            (0..per).for_each(|i| assert_eq!(c.get(&path(i)), 200));
                        }
                        (false, false) => {
                            (0..per).for_each(|i| assert_eq!(connect_plain().get(&path(i)), 200))
                        }
                        (true, false) => {
                            (0..per).for_each(|i| assert_eq!(connect_tls().get(&path(i)), 200))
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        (threads * per) as f64 / start.elapsed().as_secs_f64()
    };
    [
        (run(false, true), run(true, true)),
        (run(false, false), run(true, false)),
    ]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // Profiling aid: run only this node's half.
    let thali_only = std::env::args().any(|a| a == "--thali-only");
    let (n_docs, n_put, n_get) = if quick {
        (2_000, 1_000, 2_000)
    } else {
        (20_000, 5_000, 20_000)
    };
    let root: PathBuf = thali_tests::workspace_root();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("workload: {n_docs} docs via _bulk_docs, {n_put} PUTs and {n_get} GETs by 32 clients, full _changes x3, PouchDB replication of {n_docs} docs");
    let thali = Arc::new(start_thali(&root));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let idle_rss = rss_bytes(thali.child.id());
    let a = rt.block_on(run(thali.clone(), &root, n_docs, n_put, n_get));
    let [keep, fresh] = peer_vs_loopback(&thali, n_docs, quick);
    rt.block_on(memory_and_disk(
        thali.clone(),
        idle_rss,
        if quick { 10_000 } else { 100_000 },
    ));
    drop(thali);
    if thali_only {
        println!(
            "thali only: {:#?}",
            (
                a.bulk_docs_per_s,
                a.put_rps,
                a.put_p50_ms,
                a.put_p99_ms,
                a.get_rps,
                a.changes_rows_per_s,
                a.repl_docs_per_s,
                keep,
                fresh
            )
        );
        return;
    }
    let pouch = Arc::new(start_pouchdb_server(&root));
    let b = rt.block_on(run(pouch.clone(), &root, n_docs, n_put, n_get));
    drop(pouch);
    println!();
    println!(
        "{:<34} {:>14} {:>16} {:>8}",
        "figure", "thali", "pouchdb-server", "ratio"
    );
    let row = |name: &str, x: f64, y: f64, higher_better: bool| {
        let ratio = if higher_better { x / y } else { y / x };
        println!("{name:<34} {x:>14.1} {y:>16.1} {ratio:>7.1}x");
    };
    row(
        "_bulk_docs inserts (docs/s)",
        a.bulk_docs_per_s,
        b.bulk_docs_per_s,
        true,
    );
    row("PUT, 32 clients (req/s)", a.put_rps, b.put_rps, true);
    row("PUT p50 (ms)", a.put_p50_ms, b.put_p50_ms, false);
    row("PUT p99 (ms)", a.put_p99_ms, b.put_p99_ms, false);
    row("GET, 32 clients (req/s)", a.get_rps, b.get_rps, true);
    row("GET p50 (ms)", a.get_p50_ms, b.get_p50_ms, false);
    row("GET p99 (ms)", a.get_p99_ms, b.get_p99_ms, false);
    row(
        "full _changes (rows/s)",
        a.changes_rows_per_s,
        b.changes_rows_per_s,
        true,
    );
    row(
        "PouchDB replication (docs/s)",
        a.repl_docs_per_s,
        b.repl_docs_per_s,
        true,
    );
    println!("(ratio: how many times better thali is; for latencies, pouchdb-server's / thali's)");
    println!();
    println!(
        "{:<34} {:>14} {:>16} {:>8}",
        "thali GET of one doc (req/s)", "loopback", "peer (mTLS)", "peer/lb"
    );
    println!(
        "{:<34} {:>14.1} {:>16.1} {:>7.2}x",
        "keep-alive connections",
        keep.0,
        keep.1,
        keep.1 / keep.0
    );
    println!(
        "{:<34} {:>14.1} {:>16.1} {:>7.2}x",
        "new connection per request",
        fresh.0,
        fresh.1,
        fresh.1 / fresh.0
    );
}
