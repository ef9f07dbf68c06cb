//! Hostile peers, each bounded while a known peer goes on being served. A node with a peer
//! listener (`--request-timeout 5`, default `--peer-rate`) is attacked by a key it knows (read
//! access: the hardest case, a friend's device turned hostile) and by hostile replication
//! sources, while a good peer reads a document every 25 ms over a new mutual-TLS connection.
//! Each attack asserts its bound and prints the good peer's latency
//! (`cargo test --test hostile -- --nocapture` for the figures).

use serde_json::{json, Value};
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thali_node::peer::Identity;
use thali_tests::servers::rss_bytes;
use thali_tests::{read_response, Client, PeerClient, PeerNode};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A finished mutual-TLS connection to the node at `port` with key `key`, as `id`.
fn connect_to(id: &Identity, key: [u8; 32], port: u16) -> Option<Tls> {
    let cfg = thali_node::peer::tls::client_config(id, key).ok()?;
    let name = rustls::pki_types::ServerName::try_from("thali.peer").ok()?;
    let conn = rustls::ClientConnection::new(cfg, name).ok()?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).ok()?;
    }
    Some(tls)
}

fn connect(id: &Identity, node: &PeerNode) -> Option<Tls> {
    connect_to(id, node.key, node.port)
}

/// The good peer reading `/h/d` every 25 ms until stopped: latencies (ms) and failures.
struct Probe {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<f64>, Vec<String>)>,
}

impl Probe {
    fn start(good: PeerClient) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut lat, mut errors) = (Vec::new(), Vec::new());
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                match good.try_req("GET", "/h/d", None) {
                    Ok(r) if r.status == 200 => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Ok(r) => errors.push(format!("{} {}", r.status, r.text())),
                    Err(e) => errors.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            (lat, errors)
        });
        Probe { stop, handle }
    }

    /// Stops and prints the figures; the good peer must not have failed once.
    fn finish(self, attack: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut lat, errors) = self.handle.join().unwrap();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        println!(
            "{attack:<34} good peer: {:>4} requests, p50 {:>6.2} ms, p99 {:>7.2} ms, max {:>7.2} ms, {} failed",
            lat.len(),
            pct(0.5),
            pct(0.99),
            lat.last().copied().unwrap_or(0.0),
            errors.len()
        );
        assert!(
            errors.is_empty(),
            "{attack}: the good peer failed: {errors:?}"
        );
        assert!(!lat.is_empty(), "{attack}: the good peer made no request");
    }
}

fn setup() -> (PeerNode, Identity, Arc<Identity>) {
    let dir = thali_tests::TempDir::new("hostile");
    let port = thali_tests::free_port();
    let node = thali_tests::Node::start_with(
        &dir.0,
        &[
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--request-timeout",
            "5",
        ],
    );
    let key = *thali_tests::node_identity(&dir.0).public_key();
    let a = PeerNode {
        dir,
        node,
        port,
        key,
    };
    let (good, bad) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    a.node.put("/h", &json!({}));
    a.node.put(
        "/h/_security",
        &json!({"members": {"names": [good.key_id(), bad.key_id()], "roles": []}}),
    );
    assert_eq!(a.node.put("/h/d", &json!({"small": true})).status, 201);
    let big = "b".repeat(1 << 20);
    assert_eq!(a.node.put("/h/big", &json!({ "pad": big })).status, 201);
    (a, good, Arc::new(bad))
}

/// Lets the test process open thousands of connections.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

#[test]
fn hostile_peers_are_bounded_while_a_known_peer_is_served() {
    raise_fd_limit();
    let (a, good, bad) = setup();
    let pid = a.node.child.id();
    let idle_rss = rss_bytes(pid);
    let probe = Probe::start(a.client(&good));
    std::thread::sleep(Duration::from_secs(3));
    probe.finish("no attack (baseline)");

    // 1. A peer that never reads its answers: 20 connections, each with 30 pipelined requests
    //    for a 1 MiB document. The node's writes stall; after --request-timeout (5 s) it
    //    closes those connections instead of holding them and their buffers.
    let probe = Probe::start(a.client(&good));
    let mut stalled: Vec<Tls> = (0..20).filter_map(|_| connect(&bad, &a)).collect();
    assert_eq!(stalled.len(), 20);
    for c in &mut stalled {
        let reqs = "GET /h/big HTTP/1.1\r\nHost: p\r\n\r\n".repeat(30);
        let _ = c.write_all(reqs.as_bytes());
        let _ = c.flush();
    }
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    probe.finish("a peer that never reads (20 conns)");
    let peak = rss_bytes(pid);
    // Every one of them is closed by the node: reading drains what was buffered, then ends.
    let mut closed = 0;
    for mut c in stalled {
        c.sock
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            if total > 40 << 20 {
                break;
            }
        }
        if total < 30 << 20 {
            closed += 1;
        }
    }
    println!(
        "  {closed} of 20 non-reading connections closed by the node (stall limit 5 s), {:?} after the attack began; RSS {:.0} MB above idle",
        t.elapsed(),
        (peak.saturating_sub(idle_rss)) as f64 / 1e6
    );
    assert_eq!(
        closed, 20,
        "the node kept serving a peer that does not read"
    );

    // 2. A flood of tiny requests: 8 keep-alive connections pipelining GETs for 10 s. Past the
    //    key's rate (1000/s, 2000 burst) it gets 429 at once; the good peer is unaffected.
    let probe = Probe::start(a.client(&good));
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let (bad, stop) = (bad.clone(), stop.clone());
            let (key, port) = (a.key, a.port);
            std::thread::spawn(move || {
                let mut c = connect_to(&bad, key, port).expect("flood connection");
                let (mut ok, mut limited, mut other) = (0u64, 0u64, 0u64);
                let batch = "GET /h/d HTTP/1.1\r\nHost: p\r\n\r\n".repeat(100);
                while !stop.load(Ordering::Relaxed) {
                    if c.write_all(batch.as_bytes()).is_err() {
                        break;
                    }
                    let mut r = BufReader::new(&mut c);
                    for _ in 0..100 {
                        match read_response(&mut r, false) {
                            Ok(resp) if resp.status == 200 => ok += 1,
                            Ok(resp) if resp.status == 429 => limited += 1,
                            Ok(_) => other += 1,
                            Err(_) => return (ok, limited, other + 1),
                        }
                    }
                }
                (ok, limited, other)
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut limited, mut other) = (0, 0, 0);
    for f in flooders {
        let (o, l, x) = f.join().unwrap();
        ok += o;
        limited += l;
        other += x;
    }
    let secs = t.elapsed().as_secs_f64();
    probe.finish("a flood of tiny requests (8 conns)");
    println!(
        "  {} requests in {secs:.1} s ({:.0}/s): {ok} answered, {limited} refused with 429, {other} other",
        ok + limited + other,
        (ok + limited + other) as f64 / secs
    );
    assert!(limited > 0, "no request was rate limited");
    assert!(
        (ok as f64) <= 1000.0 * secs + 2000.0 + 100.0,
        "{ok} answered in {secs:.1} s: over the rate"
    );
    assert_eq!(other, 0);

    // 3. Thousands of live feeds from one key: it holds at most its share of the known slots
    //    ((512 - 64) / 4 = 112); the others are closed after the handshake.
    std::thread::sleep(Duration::from_secs(2)); // the bucket refills
    let probe = Probe::start(a.client(&good));
    let t = Instant::now();
    let mut feeds = Vec::new();
    for _ in 0..1000 {
        let Some(mut c) = connect(&bad, &a) else {
            continue;
        };
        let _ = c.write_all(
            b"GET /h/_changes?feed=continuous&heartbeat=5000 HTTP/1.1\r\nHost: p\r\n\r\n",
        );
        let _ = c.flush();
        feeds.push(c);
    }
    let mut live = 0;
    for c in &mut feeds {
        c.sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut head = [0u8; 12];
        if c.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200") {
            live += 1;
        }
    }
    probe.finish("1000 live feeds from one key");
    println!(
        "  {live} of {} feeds served ({:?}), RSS {:.0} MB above idle",
        feeds.len(),
        t.elapsed(),
        rss_bytes(pid).saturating_sub(idle_rss) as f64 / 1e6
    );
    assert!(live > 0 && live <= 112, "{live} feeds served");
    drop(feeds);

    // 4. Replication sources that answer slowly, with garbage, or without end. Each job
    //    fails or retries with a reason; the node stays small and serves the good peer.
    let sources = [
        ("slow", hostile_source(Mode::Slow)),
        ("garbage", hostile_source(Mode::Garbage)),
        ("endless", hostile_source(Mode::Endless)),
    ];
    let probe = Probe::start(a.client(&good));
    for (name, port) in &sources {
        a.node.put(&format!("/t-{name}"), &json!({}));
        let r = a.node.post(
            "/_replicator",
            &json!({"_id": format!("from-{name}"), "source": format!("http://127.0.0.1:{port}/db"), "target": format!("t-{name}"), "continuous": true}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
    std::thread::sleep(Duration::from_secs(12));
    probe.finish("3 hostile replication sources");
    let jobs: Value = a.node.get("/_scheduler/jobs").json();
    println!(
        "  jobs: {}; RSS {:.0} MB above idle",
        jobs["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|j| format!("{} {}", j["doc_id"], j["state"]))
            .collect::<Vec<_>>()
            .join(", "),
        rss_bytes(pid).saturating_sub(idle_rss) as f64 / 1e6
    );
    for (name, _) in &sources {
        assert_eq!(a.node.get(&format!("/t-{name}")).json()["doc_count"], 0);
    }
    assert!(rss_bytes(pid).saturating_sub(idle_rss) < 400 << 20);
}

#[derive(Clone, Copy)]
enum Mode {
    /// Headers, then a byte every second.
    Slow,
    /// 200 with a body that is not JSON.
    Garbage,
    /// A body that never ends, as fast as it is read.
    Endless,
}

/// A plain-HTTP server on loopback answering every request the hostile way.
fn hostile_source(mode: Mode) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let deadline = Instant::now() + Duration::from_secs(60);
                match mode {
                    Mode::Slow => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n");
                        while Instant::now() < deadline && s.write_all(b"{").is_ok() {
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                    Mode::Garbage => {
                        let body = b"\x00\xffnot json at all {{{ ]]]";
                        let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
                        let _ = s.write_all(body);
                    }
                    Mode::Endless => {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
                        let chunk = format!("{:x}\r\n{}\r\n", 65536, "[".repeat(65536));
                        while Instant::now() < deadline && s.write_all(chunk.as_bytes()).is_ok() {}
                    }
                }
            });
        }
    });
    port
}
