//! Attachments through replication with bounded memory, against real processes: a 1 GiB body
//! replicated node → node over httpkey (mutual TLS) with both nodes' peak resident memory
//! sampled; a large attachment pushed to pouchdb-server (npm) and pulled back into another
//! node; a replication whose connections are cut in the middle of the attachment stores
//! nothing, then completes once the network heals.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thali_tests::blobs::{download, upload, RssSampler};
use thali_tests::servers::{dir_bytes, rss_bytes, start_pouchdb_server};
use thali_tests::{admin_auth, try_request_within, workspace_root, Client, Node, PeerNode};

const MB: f64 = (1 << 20) as f64;

/// `POST /_replicate` that may take minutes; the answer.
fn replicate(n: &Node, body: Value) -> (u16, Value) {
    let h = vec![
        ("Authorization".to_string(), admin_auth()),
        ("Content-Type".to_string(), "application/json".to_string()),
    ];
    let body = serde_json::to_vec(&body).unwrap();
    let r = try_request_within(
        n.addr,
        "POST",
        "/_replicate",
        &h,
        Some(&body),
        Duration::from_secs(900),
    )
    .expect("POST /_replicate");
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

/// The attachment's metadata in the winning revision of `path`.
fn att_meta(n: &Node, path: &str, name: &str) -> Value {
    let d = n.get(path).json();
    d["_attachments"][name].clone()
}

/// A node idling after a first request, and its resident memory then.
fn idle_rss(n: &Node) -> u64 {
    let _ = n.get("/_all_dbs");
    std::thread::sleep(Duration::from_millis(500));
    rss_bytes(n.child.id())
}

#[test]
fn one_gigabyte_attachment_replicates_over_httpkey_with_bounded_memory() {
    const SIZE: u64 = 1 << 30;
    let (a, b) = (PeerNode::start("attrep-a"), PeerNode::start("attrep-b"));
    assert_eq!(a.node.put("/media", &json!({})).status, 201);
    b.allow("media", &a);
    let (r, digest) = upload(&a.node, "/media/video/movie.mp4", SIZE);
    assert_eq!(r.status, 201, "{}", r.text());
    let (idle_a, idle_b) = (idle_rss(&a.node), idle_rss(&b.node));
    let (sa, sb) = (
        RssSampler::start(a.node.child.id()),
        RssSampler::start(b.node.child.id()),
    );
    let started = Instant::now();
    let (status, v) = replicate(
        &a.node,
        json!({"source": "media", "target": b.url("media")}),
    );
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["history"][0]["docs_written"], 1, "{v}");
    let (peak_a, peak_b) = (sa.peak(), sb.peak());
    drop((sa, sb));
    let meta = att_meta(&b.node, "/media/video", "movie.mp4");
    assert_eq!(meta["digest"], json!(digest), "{meta}");
    assert_eq!(meta["length"], SIZE);
    assert_eq!(meta["content_type"], "video/mp4");
    // The bytes themselves, read back from the target.
    let (status, _, total, got) = download(&b.node, "/media/video/movie.mp4");
    assert_eq!((status, total, got.as_str()), (200, SIZE, digest.as_str()));
    println!(
        "1 GiB node → node over httpkey: {secs:.1} s ({:.0} MB/s); peak RSS above idle: \
         source {:.1} MB (idle {:.1}), target {:.1} MB (idle {:.1})",
        SIZE as f64 / MB / secs,
        peak_a.saturating_sub(idle_a) as f64 / MB,
        idle_a as f64 / MB,
        peak_b.saturating_sub(idle_b) as f64 / MB,
        idle_b as f64 / MB,
    );
    for (who, peak, idle) in [("source", peak_a, idle_a), ("target", peak_b, idle_b)] {
        assert!(
            peak.saturating_sub(idle) < 150 << 20,
            "{who} peak RSS {:.1} MB is more than 150 MB above idle ({:.1} MB)",
            peak as f64 / MB,
            idle as f64 / MB
        );
    }
}

#[test]
fn large_attachment_through_pouchdb_server_and_back() {
    thali_tests::require!(thali_tests::needs::Need::PouchdbServer);
    // pouchdb-server holds an attachment whole in memory (and in a JavaScript string on its
    // way through), so the body here is large enough to be streamed by the node, chunked in
    // its store and sent as multipart, not a gigabyte.
    const SIZE: u64 = 48 << 20;
    let root = workspace_root();
    let ps = start_pouchdb_server(&root);
    let (a, b) = (PeerNode::start("attps-a"), PeerNode::start("attps-b"));
    assert_eq!(a.node.put("/media", &json!({})).status, 201);
    let (r, digest) = upload(&a.node, "/media/video/clip.bin", SIZE);
    assert_eq!(r.status, 201, "{}", r.text());
    let mut small = a.node.get("/media/video").json();
    small["title"] = json!("second revision, same attachment");
    assert_eq!(a.node.put("/media/video", &small).status, 201);
    let remote = format!("{}/media", ps.base);
    let (status, v) = replicate(
        &a.node,
        json!({"source": "media", "target": remote, "create_target": true}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["history"][0]["docs_written"], 1, "{v}");
    // pouchdb-server has the bytes: its own attachment GET, md5 compared.
    let ps_addr: std::net::SocketAddr = ps.base.trim_start_matches("http://").parse().unwrap();
    let r = thali_tests::request(ps_addr, "GET", "/media/video", &[], None);
    let d: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        d["_attachments"]["clip.bin"]["digest"],
        json!(digest),
        "{d}"
    );
    assert_eq!(d["title"], "second revision, same attachment");
    // And back, pulled from pouchdb-server into another node.
    let (status, v) = replicate(
        &b.node,
        json!({"source": remote, "target": "back", "create_target": true}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["history"][0]["docs_written"], 1, "{v}");
    let meta = att_meta(&b.node, "/back/video", "clip.bin");
    assert_eq!(meta["digest"], json!(digest), "{meta}");
    let (status, _, total, got) = download(&b.node, "/back/video/clip.bin");
    assert_eq!((status, total, got.as_str()), (200, SIZE, digest.as_str()));
    let back = b.node.get("/back/video?revs=true").json();
    assert_eq!(back["_rev"], a.node.get("/media/video").json()["_rev"]);
}

/// A TCP proxy that, while `cutting`, ends every connection once `budget` bytes went towards
/// the upstream (mid-attachment for a large body); otherwise it passes everything through.
struct CuttingProxy {
    port: u16,
    cutting: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
}

impl CuttingProxy {
    fn start(upstream: u16, budget: u64) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cutting = Arc::new(AtomicBool::new(true));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (flag, counter) = (cutting.clone(), cuts.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let cut = flag.load(Ordering::Relaxed);
                let pipe =
                    move |mut from: TcpStream,
                          mut to: TcpStream,
                          limit: Option<(u64, Arc<AtomicUsize>)>| {
                        std::thread::spawn(move || {
                            let mut buf = vec![0u8; 64 << 10];
                            let mut sent = 0u64;
                            loop {
                                let n = match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                sent += n as u64;
                                if let Some((budget, cuts)) = &limit {
                                    if sent >= *budget {
                                        cuts.fetch_add(1, Ordering::Relaxed);
                                        break;
                                    }
                                }
                            }
                            let _ = from.shutdown(Shutdown::Both);
                            let _ = to.shutdown(Shutdown::Both);
                        });
                    };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(client, server, cut.then(|| (budget, counter.clone())));
                pipe(s2, c2, None);
            }
        });
        CuttingProxy {
            port,
            cutting,
            cuts,
        }
    }
}

#[test]
fn a_replication_cut_mid_attachment_stores_nothing_then_completes() {
    const SIZE: u64 = 40 << 20;
    let (a, b) = (PeerNode::start("attcut-a"), PeerNode::start("attcut-b"));
    assert_eq!(a.node.put("/media", &json!({})).status, 201);
    b.allow("media", &a);
    let (r, digest) = upload(&a.node, "/media/video/clip.bin", SIZE);
    assert_eq!(r.status, 201, "{}", r.text());
    let before = dir_bytes(&b.dir.0);
    // Every connection to the target dies after 12 MiB: the push can never finish.
    let proxy = CuttingProxy::start(b.port, 12 << 20);
    let target = b.url_via(proxy.port, "media");
    let (status, v) = replicate(
        &a.node,
        json!({"source": "media", "target": target, "max_attempts": 1, "retries_per_request": 1}),
    );
    assert_ne!(
        status, 200,
        "a replication through a cutting proxy succeeded: {v}"
    );
    assert!(
        proxy.cuts.load(Ordering::Relaxed) >= 1,
        "the proxy cut nothing"
    );
    assert_eq!(
        b.node.get("/media/video").status,
        404,
        "a cut transfer wrote a revision"
    );
    let info = b.node.get("/media").json();
    assert_eq!(info["doc_count"], 0, "{info}");
    // The received chunks of the cut bodies were deleted again; the journal still holds
    // their bytes until it rotates, so the size is reported, not asserted.
    let grown = dir_bytes(&b.dir.0).saturating_sub(before);
    // The network heals: the same replication completes, the bytes intact.
    proxy.cutting.store(false, Ordering::Relaxed);
    let (status, v) = replicate(&a.node, json!({"source": "media", "target": target}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["history"][0]["docs_written"], 1, "{v}");
    let (status, _, total, got) = download(&b.node, "/media/video/clip.bin");
    assert_eq!((status, total, got.as_str()), (200, SIZE, digest.as_str()));
    println!(
        "cut replication: {} connections cut; the target's files grew {:.1} MB (journal) before the retry",
        proxy.cuts.load(Ordering::Relaxed),
        grown as f64 / MB
    );
}

#[test]
fn pulled_revisions_bring_only_the_attachments_the_target_lacks() {
    let (a, b) = (PeerNode::start("attpull-a"), PeerNode::start("attpull-b"));
    assert_eq!(a.node.put("/media", &json!({})).status, 201);
    a.allow("media", &b);
    let (r, first) = upload(&a.node, "/media/album/one.bin", 3 << 20);
    assert_eq!(r.status, 201, "{}", r.text());
    let pull = json!({"source": a.url("media"), "target": "media", "create_target": true});
    let (status, v) = replicate(&b.node, pull.clone());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["history"][0]["docs_written"], 1, "{v}");
    // A second large attachment and a small one on a later revision: the pull brings those,
    // the first stays a stub the target resolves from its own ancestor.
    let rev = a.node.get("/media/album").json()["_rev"]
        .as_str()
        .unwrap()
        .to_string();
    let body = thali_tests::blobs::generated(7, 2 << 20);
    let r = a.node.raw(
        "PUT",
        &format!("/media/album/two.bin?rev={rev}"),
        &[("Content-Type", "application/octet-stream")],
        Some(&body),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let rev = r.json()["rev"].as_str().unwrap().to_string();
    let r = a.node.raw(
        "PUT",
        &format!("/media/album/note.txt?rev={rev}"),
        &[("Content-Type", "text/plain")],
        Some(b"small"),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let (status, v) = replicate(&b.node, pull);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["history"][0]["docs_written"], 1, "{v}");
    let src = a.node.get("/media/album").json();
    let dst = b.node.get("/media/album").json();
    assert_eq!(src["_rev"], dst["_rev"]);
    assert_eq!(src["_attachments"], dst["_attachments"]);
    for (name, len) in [
        ("one.bin", 3u64 << 20),
        ("two.bin", 2 << 20),
        ("note.txt", 5),
    ] {
        let (status, _, total, got) = download(&b.node, &format!("/media/album/{name}"));
        assert_eq!((status, total), (200, len), "{name}");
        assert_eq!(json!(got), src["_attachments"][name]["digest"], "{name}");
    }
    assert_eq!(dst["_attachments"]["one.bin"]["digest"], json!(first));
}
