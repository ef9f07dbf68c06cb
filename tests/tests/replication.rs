//! The replicator between real nodes on loopback, over httpkey URLs (mutual TLS): one-shot and
//! continuous, push and pull, conflicts, deletions, attachments, resuming after restarts,
//! `_replicator` jobs, errors, and a proxy that cuts connections at random.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use thali_tests::mesh::{replicate, state, wait_until};
use thali_tests::{free_port, Client, Node, PeerNode};

fn written(result: &Value) -> u64 {
    result["history"][0]["docs_written"].as_u64().unwrap_or(0)
}

fn read(result: &Value) -> u64 {
    result["history"][0]["docs_read"].as_u64().unwrap_or(0)
}

fn put_docs(node: &Node, db: &str, prefix: &str, n: usize) {
    let docs: Vec<Value> = (0..n)
        .map(|i| json!({"_id": format!("{prefix}{i:05}"), "n": i, "text": "some small document"}))
        .collect();
    assert_eq!(
        node.post(&format!("/{db}/_bulk_docs"), &json!({ "docs": docs }))
            .status,
        201
    );
}

#[test]
fn one_shot_push_and_pull_over_httpkey_with_deletions_and_attachments() {
    let (a, b) = (PeerNode::start("rep-a"), PeerNode::start("rep-b"));
    let n = &a.node;
    n.put("/src", &json!({}));
    put_docs(n, "src", "d", 120);
    // An attachment, a deleted document and an edited one.
    let att: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let r = n.raw(
        "PUT",
        "/src/withatt/blob.bin",
        &[("Content-Type", "application/octet-stream")],
        Some(&att),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let rev = n.get("/src/d00001").json()["_rev"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(n.delete(&format!("/src/d00001?rev={rev}")).status, 200);
    let rev = n.get("/src/d00002").json()["_rev"]
        .as_str()
        .unwrap()
        .to_string();
    n.put("/src/d00002", &json!({"_rev": rev, "edited": true}));
    n.put("/src/_design/app", &json!({"views": {}}));

    b.allow("dst", &a);
    let res = replicate(n, json!({"source": "src", "target": b.url("dst")}));
    assert_eq!(written(&res), 121, "{res}");
    assert_eq!(
        res["history"][0]["doc_write_failures"], 1,
        "the design doc needs admin on B: {res}"
    );
    let sa = state(n, "src");
    let mut sb = state(&b.node, "dst");
    assert!(sb.remove("_design/app").is_none());
    let mut sa_nodesign = sa.clone();
    sa_nodesign.remove("_design/app");
    assert_eq!(sa_nodesign, sb);
    let got = b.node.raw("GET", "/dst/withatt/blob.bin", &[], None);
    assert_eq!(got.body, att);
    assert_eq!(b.node.get("/dst/d00001").status, 404);

    // A second run finds its checkpoint and reads nothing.
    let again = replicate(n, json!({"source": "src", "target": b.url("dst")}));
    assert_eq!(again["no_changes"], true, "{again}");

    // Pull back into a new database on A (create_target), edits on B included.
    put_docs(&b.node, "dst", "fromb", 30);
    let res = replicate(
        n,
        json!({"source": b.url("dst"), "target": "copy", "create_target": true}),
    );
    assert_eq!(written(&res), 151, "{res}");
    assert_eq!(state(n, "copy"), state(&b.node, "dst"));
    // The checkpoint is on both sides, in CouchDB's format.
    let base = res["_local_id"].as_str().map(str::to_string);
    assert!(base.is_none());
    let locals = n.get("/copy/_local_docs").json();
    let lid = locals["rows"][0]["id"].as_str().unwrap().to_string();
    let log = n.get(&format!("/copy/{lid}")).json();
    assert_eq!(log["replication_id_version"], 4);
    assert_eq!(log["history"][0]["docs_written"], 151);
    assert_eq!(log["session_id"], log["history"][0]["session_id"]);
}

#[test]
fn conflicts_converge_on_three_nodes() {
    let (a, b, c) = (
        PeerNode::start("conf-a"),
        PeerNode::start("conf-b"),
        PeerNode::start("conf-c"),
    );
    for (p, others) in [(&a, [&b, &c]), (&b, [&a, &c]), (&c, [&a, &b])] {
        p.node.put("/db", &json!({}));
        let sec =
            json!({"members": {"names": [others[0].key_id(), others[1].key_id()], "roles": []}});
        assert_eq!(p.node.put("/db/_security", &sec).status, 200);
    }
    put_docs(&a.node, "db", "doc", 20);
    replicate(&a.node, json!({"source": "db", "target": b.url("db")}));
    replicate(&a.node, json!({"source": "db", "target": c.url("db")}));
    // Concurrent edits of the same documents on every node, a delete on one of them.
    for (i, p) in [&a, &b, &c].iter().enumerate() {
        for d in 0..5 {
            let id = format!("doc{d:05}");
            let cur = p.node.get(&format!("/db/{id}")).json();
            let body = json!({"_rev": cur["_rev"], "by": i, "n": d});
            assert_eq!(p.node.put(&format!("/db/{id}"), &body).status, 201);
        }
    }
    let cur = c.node.get("/db/doc00009").json();
    c.node.delete(&format!(
        "/db/doc00009?rev={}",
        cur["_rev"].as_str().unwrap()
    ));
    // Each node pulls from the others (A and B by POST, C by pushing).
    replicate(&a.node, json!({"source": b.url("db"), "target": "db"}));
    replicate(&a.node, json!({"source": c.url("db"), "target": "db"}));
    replicate(&b.node, json!({"source": a.url("db"), "target": "db"}));
    replicate(&c.node, json!({"source": "db", "target": b.url("db")}));
    replicate(&c.node, json!({"source": a.url("db"), "target": "db"}));
    let (sa, sb, sc) = (
        state(&a.node, "db"),
        state(&b.node, "db"),
        state(&c.node, "db"),
    );
    assert_eq!(sa, sb);
    assert_eq!(sa, sc);
    let d0 = &sa["doc00000"];
    assert_eq!(d0["leaves"].as_array().unwrap().len(), 3, "{d0}");
    assert_eq!(
        d0["winner"]["conflicts"].as_array().unwrap().len(),
        2,
        "{d0}"
    );
    assert_eq!(sa["doc00009"]["winner"]["deleted"], true);
}

#[test]
fn continuous_push_and_pull_with_tasks_and_cancel() {
    let (a, b) = (PeerNode::start("cont-a"), PeerNode::start("cont-b"));
    a.node.put("/a", &json!({}));
    b.allow("b", &a);
    let push = json!({"source": "a", "target": b.url("b"), "continuous": true});
    let r = a.node.post("/_replicate", &push);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["_local_id"].as_str().unwrap().to_string();
    assert!(id.ends_with("+continuous"));
    let pull = json!({"source": b.url("b"), "target": "pulled", "continuous": true, "create_target": true});
    assert_eq!(a.node.post("/_replicate", &pull).status, 202);

    put_docs(&a.node, "a", "x", 50);
    wait_until("50 docs on B", || {
        b.node.get("/b").json()["doc_count"] == 50
    });
    wait_until("50 docs pulled back", || {
        a.node.get("/pulled").json()["doc_count"] == 50
    });
    let rev = a.node.get("/a/x00003").json()["_rev"]
        .as_str()
        .unwrap()
        .to_string();
    a.node.delete(&format!("/a/x00003?rev={rev}"));
    wait_until("the deletion on B", || {
        b.node.get("/b/x00003").status == 404
    });
    wait_until("the deletion pulled back", || {
        a.node.get("/pulled/x00003").status == 404
    });

    let tasks = a.node.get("/_active_tasks").json();
    let t = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["replication_id"] == json!(id))
        .expect("push task listed");
    assert_eq!(t["type"], "replication");
    assert_eq!(t["continuous"], true);
    assert_eq!(t["docs_written"], 51, "{t}");
    let jobs = a.node.get("/_scheduler/jobs").json();
    assert_eq!(jobs["total_rows"], 2, "{jobs}");
    assert_eq!(jobs["jobs"][0]["state"], "running");

    // Cancel the push: new documents stay on A.
    let cancel = json!({"source": "a", "target": b.url("b"), "continuous": true, "cancel": true});
    assert_eq!(a.node.post("/_replicate", &cancel).status, 200);
    wait_until("the task to go", || {
        a.node
            .get("/_active_tasks")
            .json()
            .as_array()
            .unwrap()
            .len()
            == 1
    });
    a.node.put("/a/late", &json!({}));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.node.get("/b/late").status, 404);
    assert_eq!(a.node.post("/_replicate", &cancel).status, 404);
}

#[test]
fn resumes_after_restarts_without_resending() {
    let (mut a, mut b) = (PeerNode::start("res-a"), PeerNode::start("res-b"));
    a.node.put("/a", &json!({}));
    b.allow("b", &a);
    put_docs(&a.node, "a", "r", 300);
    let body = json!({"source": "a", "target": b.url("b")});
    assert_eq!(written(&replicate(&a.node, body.clone())), 300);
    // Restart the target, add a few documents: only those travel.
    b.node.restart();
    put_docs(&a.node, "a", "s", 7);
    let res = replicate(&a.node, body.clone());
    assert_eq!((read(&res), written(&res)), (7, 7), "{res}");
    // Restart the source (kill -9: the checkpoint is in its store): the same holds.
    a.node.kill9();
    a.node.restart();
    put_docs(&a.node, "a", "t", 5);
    let res = replicate(&a.node, body.clone());
    assert_eq!((read(&res), written(&res)), (5, 5), "{res}");
    assert_eq!(b.node.get("/b").json()["doc_count"], 312);

    // Pull side: B pulls from A, A restarts, B pulls again and reads only the new ones.
    a.allow("a", &b);
    let pull = json!({"source": a.url("a"), "target": "mirror", "create_target": true});
    assert_eq!(written(&replicate(&b.node, pull.clone())), 312);
    a.node.restart();
    put_docs(&a.node, "a", "u", 3);
    let res = replicate(&b.node, pull);
    assert_eq!((read(&res), written(&res)), (3, 3), "{res}");
}

fn replicator_doc(node: &Node, id: &str) -> Value {
    node.get(&format!("/_replicator/{id}")).json()
}

#[test]
fn replicator_documents_are_persistent_jobs() {
    let (mut a, b) = (PeerNode::start("jobs-a"), PeerNode::start("jobs-b"));
    a.node.put("/a", &json!({}));
    b.allow("b", &a);
    put_docs(&a.node, "a", "j", 40);
    let doc = json!({"source": "a", "target": b.url("b"), "continuous": true});
    assert_eq!(a.node.put("/_replicator/push", &doc).status, 201);
    wait_until("the job to run", || {
        replicator_doc(&a.node, "push")["_replication_state"] == "running"
    });
    wait_until("40 docs on B", || {
        b.node.get("/b").json()["doc_count"] == 40
    });

    // One-shot and broken documents end in completed / failed, with figures or a reason.
    a.node.put(
        "/_replicator/once",
        &json!({"source": "a", "target": "a-copy", "create_target": true}),
    );
    a.node.put(
        "/_replicator/broken",
        &json!({"source": "nosuchdb", "target": "x"}),
    );
    a.node.put("/_replicator/bad", &json!({"source": "a"}));
    wait_until("once to complete", || {
        replicator_doc(&a.node, "once")["_replication_state"] == "completed"
    });
    assert_eq!(
        replicator_doc(&a.node, "once")["_replication_stats"]["docs_written"],
        40
    );
    wait_until("broken to fail", || {
        replicator_doc(&a.node, "broken")["_replication_state"] == "failed"
    });
    let reason = replicator_doc(&a.node, "broken")["_replication_state_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("nosuchdb"), "{reason}");
    wait_until("bad to fail", || {
        replicator_doc(&a.node, "bad")["_replication_state"] == "failed"
    });

    // The continuous job comes back after a restart and goes on from its checkpoint.
    a.node.restart();
    put_docs(&a.node, "a", "k", 10);
    wait_until("50 docs on B", || {
        b.node.get("/b").json()["doc_count"] == 50
    });
    let tasks = a.node.get("/_active_tasks").json();
    let t = &tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["doc_id"] == "push")
        .expect("push runs")
        .clone();
    assert_eq!(
        t["docs_written"], 10,
        "resumed, not restarted from zero: {t}"
    );
    // The completed one-shot does not run again.
    assert!(tasks
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["doc_id"] != "once"));
    assert_eq!(
        replicator_doc(&a.node, "once")["_replication_state"],
        "completed"
    );

    // Deleting the document stops the job.
    let rev = replicator_doc(&a.node, "push")["_rev"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        a.node
            .delete(&format!("/_replicator/push?rev={rev}"))
            .status,
        200
    );
    wait_until("the job to stop", || {
        a.node
            .get("/_active_tasks")
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    });
    a.node.put("/a/after-delete", &json!({}));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.node.get("/b/after-delete").status, 404);
}

#[test]
fn errors_are_couchdb_shaped_and_final() {
    let (a, b) = (PeerNode::start("err-a"), PeerNode::start("err-b"));
    a.node.put("/a", &json!({}));
    a.node
        .post("/_replicate", &json!({"source": "nosuch", "target": "a"}))
        .assert_error(404, "db_not_found");
    a.node
        .post("/_replicate", &json!({"source": "a", "target": "nosuch"}))
        .assert_error(404, "db_not_found");
    a.node
        .post("/_replicate", &json!({"source": "a"}))
        .assert_error(400, "bad_request");
    a.node
        .post(
            "/_replicate",
            &json!({"source": "a", "target": "ftp://x/y"}),
        )
        .assert_error(400, "bad_request");
    a.node
        .post(
            "/_replicate",
            &json!({"source": "a", "target": "b", "worker_batch_size": -1}),
        )
        .assert_error(400, "bad_request");
    // B does not know A's key: refused at once, no retries.
    b.node.put("/b", &json!({}));
    let t = Instant::now();
    a.node
        .post("/_replicate", &json!({"source": "a", "target": b.url("b")}))
        .assert_error(401, "unauthorized");
    assert!(t.elapsed() < Duration::from_secs(5));
    // Nobody listens: retried, then a clear failure.
    let dead = b.url_via(free_port(), "b");
    let r = a.node.post(
        "/_replicate",
        &json!({"source": dead, "target": "a", "retries_per_request": 1, "max_attempts": 2}),
    );
    r.assert_error(500, "replication_error");
    assert!(
        r.json()["reason"]
            .as_str()
            .unwrap()
            .contains("connecting to"),
        "{}",
        r.text()
    );
    // Only the local admin may replicate.
    let anon = thali_tests::request(
        a.node.addr,
        "POST",
        "/_replicate",
        &[("Content-Type".into(), "application/json".into())],
        Some(b"{}"),
    );
    anon.assert_error(401, "unauthorized");
}

/// A TCP proxy that misbehaves: it is slow now and then, cuts every connection after a random number of
/// bytes (2 KB .. 130 KB) (mid-request or mid-response, TLS or not), and with `fail_5xx` answers some new
/// connections with a 503 instead of forwarding them. Runs until the test ends.
struct FaultyProxy {
    port: u16,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

impl FaultyProxy {
    fn start(upstream: u16, fail_5xx: bool, seed: u64) -> FaultyProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let counter = cuts.clone();
        std::thread::spawn(move || {
            let mut rng = seed | 1;
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let roll = xorshift(&mut rng) % 6;
                if fail_5xx && roll == 0 {
                    let body = r#"{"error":"unavailable","reason":"injected by the test proxy"}"#;
                    let mut buf = [0u8; 4096];
                    let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = client.read(&mut buf);
                    let _ = write!(client, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                // Every connection dies after 2 KB .. 130 KB have gone through.
                let budget = 2048 + xorshift(&mut rng) % (128 << 10);
                // Bytes in both directions count against the one budget.
                let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    let (total, counter) = (total.clone(), counter.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        let mut rng = budget | 1;
                        loop {
                            // A slow peer too: now and then a chunk waits.
                            if xorshift(&mut rng).is_multiple_of(16) {
                                std::thread::sleep(Duration::from_millis(30));
                            }
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n as u64,
                            };
                            let before = total.fetch_add(n, Ordering::Relaxed);
                            let allowed = budget.saturating_sub(before).min(n) as usize;
                            if to.write_all(&buf[..allowed]).is_err() {
                                break;
                            }
                            if before + n >= budget {
                                if before < budget {
                                    counter.fetch_add(1, Ordering::Relaxed);
                                }
                                break;
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(client, server);
                pipe(s2, c2);
            }
        });
        FaultyProxy { port, cuts }
    }
}

#[test]
fn replication_through_a_faulty_proxy_converges() {
    let (a, b) = (PeerNode::start("fault-a"), PeerNode::start("fault-b"));
    a.node.put("/a", &json!({}));
    b.allow("b", &a);
    put_docs(&a.node, "a", "f", 1500);
    let att: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    for i in 0..5 {
        let r = a.node.raw(
            "PUT",
            &format!("/a/att{i}/data.bin"),
            &[("Content-Type", "application/octet-stream")],
            Some(&att),
        );
        assert_eq!(r.status, 201);
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("faulty proxy seed: {seed}");
    // Push over mutual TLS through connection cuts.
    let cut = FaultyProxy::start(b.port, false, seed);
    let opts = json!({"worker_batch_size": 200, "max_attempts": 100});
    let mut body = json!({"source": "a", "target": b.url_via(cut.port, "b")});
    body.as_object_mut()
        .unwrap()
        .extend(opts.as_object().unwrap().clone());
    let t = Instant::now();
    replicate(&a.node, body);
    eprintln!("push through the proxy took {:?}", t.elapsed());
    let cuts = cut.cuts.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("connections cut during the push: {cuts}");
    assert!(cuts > 0, "the proxy never cut anything");
    assert_eq!(state(&a.node, "a"), state(&b.node, "b"));

    // Pull over plain HTTP (B's loopback API with its admin password) through cuts and 503s.
    b.node.put("/b/extra", &json!({"v": 1}));
    let flaky = FaultyProxy::start(b.node.addr.port(), true, seed ^ 0x5555);
    let src = format!(
        "http://admin:{}@127.0.0.1:{}/b",
        thali_tests::PASSWORD,
        flaky.port
    );
    let mut body = json!({"source": src, "target": "pulled", "create_target": true});
    body.as_object_mut()
        .unwrap()
        .extend(opts.as_object().unwrap().clone());
    let t = Instant::now();
    let res = replicate(&a.node, body);
    eprintln!("pull through the flaky proxy took {:?}", t.elapsed());
    assert_eq!(res["history"][0]["doc_write_failures"], 0);
    assert_eq!(state(&a.node, "pulled"), state(&b.node, "b"));
}

#[test]
fn filtered_replication_by_doc_ids_and_selector() {
    let (a, b) = (PeerNode::start("filt-a"), PeerNode::start("filt-b"));
    a.node.put("/a", &json!({}));
    b.allow("b", &a);
    let docs: Vec<Value> = (0..40)
        .map(|i| json!({"_id": format!("f{i:02}"), "kind": if i % 4 == 0 { "keep" } else { "skip" }, "n": i}))
        .collect();
    a.node.post("/a/_bulk_docs", &json!({ "docs": docs }));
    // doc_ids, pushed.
    let res = replicate(
        &a.node,
        json!({"source": "a", "target": b.url("b"), "doc_ids": ["f01", "f02", "nope"]}),
    );
    assert_eq!(written(&res), 2, "{res}");
    // A selector evaluated by the remote source (B's _changes?filter=_selector), pulled.
    let sel = json!({"kind": "keep", "n": {"$gte": 8}});
    b.node.post("/b/_bulk_docs", &json!({"docs": [{"_id": "g1", "kind": "keep", "n": 9}, {"_id": "g2", "kind": "keep", "n": 1}]}));
    let res = replicate(
        &a.node,
        json!({"source": b.url("b"), "target": "sel-pull", "create_target": true, "selector": sel}),
    );
    assert_eq!(written(&res), 1, "only g1 matches on B: {res}");
    // The same selector on a local source, pushed.
    let res = replicate(
        &a.node,
        json!({"source": "a", "target": "sel-local", "create_target": true, "selector": sel}),
    );
    assert_eq!(written(&res), 8, "f08, f12, … f36: {res}");
    let ids: Vec<String> = a.node.get("/sel-local/_all_docs").json()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.first().map(String::as_str), Some("f08"));
    // `$regex` is evaluated (linear-time engine): ids f00, f04 … f36 whose kind matches.
    let res = replicate(
        &a.node,
        json!({"source": "a", "target": "sel-re", "create_target": true, "selector": {"kind": {"$regex": "^ke+p$"}, "n": {"$lt": 10}}}),
    );
    assert_eq!(written(&res), 3, "f00, f04, f08: {res}");
    // A selector the node cannot evaluate is refused up front.
    a.node
        .post(
            "/_replicate",
            &json!({"source": "a", "target": "x", "selector": {"n": {"$bogus": "1"}}}),
        )
        .assert_error(400, "bad_request");
}

/// An HTTP proxy in front of a node's loopback API that plays an older CouchDB: it answers 404
/// to `_bulk_get`, so the replicator must fetch through `open_revs`. One request per
/// connection (it forwards with `Connection: close`).
fn no_bulk_get_proxy(upstream: u16) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let refused = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = refused.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if !line.to_ascii_lowercase().starts_with("connection:") {
                        head.push_str(&line);
                    }
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let mut client = client;
                if head.lines().next().unwrap_or("").contains("/_bulk_get") {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let b = r#"{"error":"not_found","reason":"missing"}"#;
                    let _ = write!(client, "HTTP/1.1 404 Object Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len());
                    return;
                }
                let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                let _ = up.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes());
                let _ = up.write_all(&body);
                let _ = std::io::copy(&mut up, &mut client);
            });
        }
    });
    (port, refused)
}

#[test]
fn peers_without_bulk_get_are_read_through_open_revs() {
    let (a, b) = (PeerNode::start("obg-a"), PeerNode::start("obg-b"));
    b.node.put("/old", &json!({}));
    put_docs(&b.node, "old", "o", 30);
    let att: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
    let rev = b.node.get("/old/o00003").json()["_rev"]
        .as_str()
        .unwrap()
        .to_string();
    let put = b.node.raw(
        "PUT",
        &format!("/old/o00003/a.bin?rev={rev}"),
        &[("Content-Type", "application/octet-stream")],
        Some(&att),
    );
    assert_eq!(put.status, 201, "{}", put.text());
    // A conflict: two branches of one document.
    b.node.post(
        "/old/_bulk_docs",
        &json!({"new_edits": false, "docs": [
        {"_id": "c", "_rev": "1-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "v": 1},
        {"_id": "c", "_rev": "1-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "v": 2}]}),
    );
    let (port, refused) = no_bulk_get_proxy(b.node.addr.port());
    let src = format!(
        "http://admin:{}@127.0.0.1:{port}/old",
        thali_tests::PASSWORD
    );
    let res = replicate(
        &a.node,
        json!({"source": src, "target": "new", "create_target": true}),
    );
    assert!(refused.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(written(&res), 32, "{res}");
    assert_eq!(state(&a.node, "new"), state(&b.node, "old"));
    assert_eq!(a.node.raw("GET", "/new/o00003/a.bin", &[], None).body, att);
}

#[test]
fn the_command_line_replicates_with_a_summary() {
    let (mut a, b) = (PeerNode::start("cli-a"), PeerNode::start("cli-b"));
    a.node.put("/src", &json!({}));
    put_docs(&a.node, "src", "c", 25);
    b.allow("dst", &a);
    let run = |node: &Node, args: &[&str]| {
        let out = std::process::Command::new(thali_tests::thali_bin())
            .arg("replicate")
            .args(args)
            .args([
                "--data",
                node.data.to_str().unwrap(),
                "--node",
                &node.addr.to_string(),
            ])
            .env("THALI_ADMIN_PASSWORD", thali_tests::PASSWORD)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Through the running node.
    let (ok, out, err) = run(&a.node, &["src", &b.url("dst")]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("Replication completed: src -> httpkey://"),
        "{out}"
    );
    assert!(
        out.contains("docs read 25, written 25, write failures 0"),
        "{out}"
    );
    // With the node stopped, in-process on its data directory (same identity, same checkpoint).
    a.node.stop();
    put_docs(&b.node, "dst", "fromb", 4);
    let (ok, out, err) = run(&a.node, &[&b.url("dst"), "src"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("docs read 4, written 4"), "{out}");
    // A failure says why and exits non-zero.
    let (ok, out, _) = run(&a.node, &["nosuch", "src"]);
    assert!(!ok);
    assert!(
        out.contains("Replication failed") && out.contains("nosuch"),
        "{out}"
    );
    a.node.restart();
    assert_eq!(a.node.get("/src").json()["doc_count"], 29);
}

#[test]
fn continuous_job_rides_out_a_peer_outage() {
    let (a, mut b) = (PeerNode::start("out-a"), PeerNode::start("out-b"));
    a.node.put("/a", &json!({}));
    b.allow("b", &a);
    let body =
        json!({"source": "a", "target": b.url("b"), "continuous": true, "retries_per_request": 1});
    assert_eq!(a.node.post("/_replicate", &body).status, 202);
    put_docs(&a.node, "a", "before", 10);
    wait_until("10 docs on B", || {
        b.node.get("/b").json()["doc_count"] == 10
    });
    // B disappears; A keeps writing; the job reports it is crashing and retries.
    b.node.kill9();
    put_docs(&a.node, "a", "during", 20);
    wait_until("the job to report the outage", || {
        let jobs = a.node.get("/_scheduler/jobs").json();
        jobs["jobs"][0]["state"] == "crashing" && jobs["jobs"][0]["info"]["error"].is_string()
    });
    // B comes back on the same address: everything arrives, nothing twice.
    b.node.restart();
    wait_until("30 docs on B", || {
        b.node.get("/b").json()["doc_count"] == 30
    });
    wait_until("the job to run again", || {
        a.node.get("/_scheduler/jobs").json()["jobs"][0]["state"] == "running"
    });
    assert_eq!(state(&a.node, "a"), state(&b.node, "b"));
}
