//! kill -9 in the middle of a stream of acknowledged writes: after a restart every acknowledged
//! write is there and the database opens cleanly.

use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thali_tests::{admin_auth, try_request, Client, Node, TempDir};

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = TempDir::new("durable");
    let mut node = Node::start(&dir.0);
    node.put("/db", &json!({}));
    // (doc id, rev) acknowledged with 201, across all rounds.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for round in 0..5 {
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
        std::thread::sleep(Duration::from_millis(300 + 170 * round as u64));
        node.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        node.restart();
        let info = node.get("/db").json();
        let acked = acked.lock().unwrap();
        assert!(
            acked.len() > 10,
            "round {round}: too few writes to mean anything"
        );
        for (id, rev) in acked.iter() {
            let r = node.get(&format!("/db/{id}"));
            assert_eq!(r.status, 200, "round {round}: acknowledged {id} lost");
            assert_eq!(r.json()["_rev"], rev.as_str());
        }
        // The database is consistent: counts match what _all_docs and _changes see.
        let all = node.get("/db/_all_docs").json();
        let rows = all["rows"].as_array().unwrap().len();
        assert_eq!(
            info["doc_count"].as_u64().unwrap() as usize,
            rows,
            "round {round}"
        );
        let changes = node.get("/db/_changes").json();
        assert_eq!(changes["results"].as_array().unwrap().len(), rows);
        assert_eq!(changes["last_seq"], info["update_seq"]);
        eprintln!(
            "round {round}: {} acknowledged writes verified, {rows} docs",
            acked.len()
        );
    }
}
