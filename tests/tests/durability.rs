//! kill -9 in the middle of acknowledged writes, a continuous replication and a view index
//! build, 50 times: after each restart every acknowledged write is there, every database opens
//! cleanly, and the index and the replica agree with the database.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thali_tests::{admin_auth, try_request, Client, Node, TempDir};

const CYCLES: usize = 50;

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = TempDir::new("durable");
    let mut node = Node::start(&dir.0);
    node.put("/db", &json!({}));
    let ddoc =
        json!({"language": "lua", "views": {"all": {"map": "function(doc) emit(doc._id, 1) end"}}});
    assert_eq!(node.put("/db/_design/v", &ddoc).status, 201);
    let job = json!({"source": "db", "target": "copy", "create_target": true, "continuous": true});
    assert_eq!(node.put("/_replicator/copy", &job).status, 201);
    // (doc id, rev) acknowledged with 201, across all rounds.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for round in 0..CYCLES {
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4 {
            let (addr, acked, stop) = (node.addr, acked.clone(), stop.clone());
            writers.push(std::thread::spawn(move || {
                let headers = vec![
                    ("Authorization".to_string(), admin_auth()),
                    ("Content-Type".to_string(), "application/json".to_string()),
                ];
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) && i < 100_000 {
                    i += 1;
                    let id = format!("r{round}-w{w}-{i}");
                    let (path, body) = if w == 0 {
                        // Bulk writes, several docs per request.
                        let docs: Vec<Value> = (0..5)
                            .map(|k| json!({"_id": format!("{id}-{k}"), "k": k}))
                            .collect();
                        ("/db/_bulk_docs".to_string(), json!({ "docs": docs }))
                    } else {
                        (format!("/db/{id}"), json!({"w": w, "i": i}))
                    };
                    let body = serde_json::to_vec(&body).unwrap();
                    let method = if w == 0 { "POST" } else { "PUT" };
                    match try_request(addr, method, &path, &headers, Some(&body)) {
                        Ok(r) if r.status == 201 => {
                            let j: Value = serde_json::from_slice(&r.body).unwrap();
                            let mut a = acked.lock().unwrap();
                            match j {
                                Value::Array(items) => {
                                    for it in items {
                                        a.push((
                                            it["id"].as_str().unwrap().into(),
                                            it["rev"].as_str().unwrap().into(),
                                        ));
                                    }
                                }
                                j => a.push((
                                    j["id"].as_str().unwrap().into(),
                                    j["rev"].as_str().unwrap().into(),
                                )),
                            }
                        }
                        // The node died under us: this write was never acknowledged.
                        _ => return,
                    }
                }
            }));
        }
        // A reader keeps the view index building while the writers run.
        {
            let (addr, stop) = (node.addr, stop.clone());
            writers.push(std::thread::spawn(move || {
                let headers = vec![("Authorization".to_string(), admin_auth())];
                for _ in 0..10_000 {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let path = "/db/_design/v/_view/all?limit=1";
                    if try_request(addr, "GET", path, &headers, None).is_err() {
                        return;
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(200 + 37 * (round % 13) as u64));
        node.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        node.restart();
        let info = node.get("/db").json();
        let acked = acked.lock().unwrap();
        assert!(
            acked.len() > 10 * (round + 1),
            "round {round}: too few writes to mean anything"
        );
        // Every acknowledged write is there, at the acknowledged revision.
        let all = node.get("/db/_all_docs").json();
        let rows = all["rows"].as_array().unwrap();
        let revs: HashMap<&str, &str> = rows
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap(),
                    r["value"]["rev"].as_str().unwrap(),
                )
            })
            .collect();
        for (id, rev) in acked.iter() {
            assert_eq!(
                revs.get(id.as_str()),
                Some(&rev.as_str()),
                "round {round}: acknowledged {id} lost"
            );
        }
        // The database is consistent: counts match what _all_docs and _changes see.
        assert_eq!(
            info["doc_count"].as_u64().unwrap() as usize,
            rows.len(),
            "round {round}"
        );
        let changes = node.get("/db/_changes").json();
        assert_eq!(changes["results"].as_array().unwrap().len(), rows.len());
        assert_eq!(changes["last_seq"], info["update_seq"]);
        // The index agrees with the documents (one row each, the design document aside).
        let view = node.get("/db/_design/v/_view/all?limit=0").json();
        assert_eq!(
            view["total_rows"].as_u64().unwrap() as usize,
            rows.len() - 1,
            "round {round}: {view}"
        );
        // The replica opens and holds no more than its source.
        let copy = node.get("/copy");
        assert_eq!(copy.status, 200, "round {round}");
        assert!(copy.json()["doc_count"].as_u64().unwrap() as usize <= rows.len());
        if round % 10 == 9 {
            eprintln!(
                "cycle {}: {} acknowledged writes verified, {} docs",
                round + 1,
                acked.len(),
                rows.len()
            );
        }
    }
    // The replication resumes after the last restart and catches up.
    let want = node.get("/db").json()["doc_count"].clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    while node.get("/copy").json()["doc_count"] != want {
        assert!(
            Instant::now() < deadline,
            "the replica never caught up with {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{CYCLES} kill -9 cycles, {} acknowledged writes checked after each, replica caught up at {want} docs",
        acked.lock().unwrap().len()
    );
}
