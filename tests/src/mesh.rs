//! Helpers for tests with several nodes replicating: start a replication, wait for a state,
//! and the per-document state that must be identical on every node once they converge.

use crate::{Client, Node};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[track_caller]
pub fn replicate(node: &Node, body: Value) -> Value {
    let r = node.post("/_replicate", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["ok"], true, "{v}");
    v
}

#[track_caller]
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Every document's full revision tree (all leaves with their `_revisions` and bodies), its
/// winner and `_conflicts`: what must be identical on every node after replication.
pub fn state(node: &Node, db: &str) -> BTreeMap<String, Value> {
    let changes = node.get(&format!("/{db}/_changes?style=all_docs")).json();
    let mut out = BTreeMap::new();
    for row in changes["results"].as_array().unwrap() {
        let id = row["id"].as_str().unwrap();
        let enc = id.replace('/', "%2F");
        let r = node.raw(
            "GET",
            &format!("/{db}/{enc}?open_revs=all&revs=true"),
            &[("Accept", "application/json")],
            None,
        );
        let mut leaves: Vec<Value> = r.json().as_array().unwrap().clone();
        leaves.sort_by_key(|l| l["ok"]["_rev"].as_str().unwrap_or("").to_string());
        let winner = node.get(&format!("/{db}/{enc}?conflicts=true"));
        let winner = if winner.status == 200 {
            let w = winner.json();
            json!({"rev": w["_rev"], "conflicts": w["_conflicts"]})
        } else {
            json!({"deleted": row["deleted"]})
        };
        out.insert(id.to_string(), json!({"leaves": leaves, "winner": winner}));
    }
    out
}
