//! Conflict resolvers (`resolve_conflict` in Lua and WASM design documents) on real nodes:
//! three nodes in a continuous replication ring converge to identical trees with the merged
//! content and one revision per conflict; Lua and WASM write byte-identical resolutions; and a
//! missing, failing, slow, declining or refused resolver leaves the conflict as CouchDB would.

use base64::Engine;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use thali_tests::mesh::{state, wait_until};
use thali_tests::{Client, Node, PeerNode, TempDir};

fn lua_merge() -> Value {
    let p = thali_tests::workspace_root().join("scripts/app/merge/resolve_conflict.lua");
    let src = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    json!({"language": "lua", "resolve_conflict": src})
}

fn js_merge() -> Value {
    let p = thali_tests::workspace_root().join("scripts/app/merge-js/resolve_conflict.js");
    let src = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    json!({"resolve_conflict": src})
}

/// The example resolver built for wasm32 by `tests/run-all.sh`.
fn wasm_merge() -> Value {
    let p = thali_tests::workspace_root()
        .join("plugins/target/wasm32-unknown-unknown/release/merge.wasm");
    let module = std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\nbuild it first: cargo build --release --target wasm32-unknown-unknown \
             --manifest-path plugins/Cargo.toml (tests/run-all.sh does it)",
            p.display()
        )
    });
    json!({
        "language": "wasm",
        "resolve_conflict": "resolve",
        "_attachments": {"module.wasm": {
            "content_type": "application/wasm",
            "data": base64::engine::general_purpose::STANDARD.encode(module),
        }},
    })
}

fn lua_resolver(code: &str) -> Value {
    json!({"language": "lua", "resolve_conflict": code})
}

/// The resolver's `_active_tasks` entry for `db`, if it has a resolver.
fn resolver_task(node: &Node, db: &str) -> Option<Value> {
    let tasks = node.get("/_active_tasks").json();
    tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "conflict_resolution" && t["database"] == db)
        .cloned()
}

/// Waits until the resolver of `db` has looked at every change up to the database's current
/// sequence: what it left alone then, it left alone for good.
fn resolver_caught_up(node: &Node, db: &str) -> Value {
    let target = node.get(&format!("/{db}")).json()["update_seq"]
        .as_u64()
        .unwrap();
    for _ in 0..600 {
        if let Some(t) = resolver_task(node, db) {
            if t["checked_seq"].as_u64().unwrap_or(0) >= target {
                return t;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the resolver of {db} did not reach sequence {target} within 30 s");
}

fn counter(node: &Node, db: &str, name: &str) -> u64 {
    resolver_task(node, db).map_or(0, |t| t[name].as_u64().unwrap())
}

fn conflicts(node: &Node, path: &str) -> usize {
    let d = node.get(&format!("{path}?conflicts=true")).json();
    d["_conflicts"].as_array().map_or(0, Vec::len)
}

/// Rewrites `doc` on `node` (GET, change, PUT), again on a 409 from a replicated revision
/// arriving in between. Returns the new revision.
fn edit(node: &Node, path: &str, change: impl Fn(&mut Value)) -> String {
    for _ in 0..50 {
        let mut d = node.get(path).json();
        change(&mut d);
        let r = node.put(path, &d);
        if r.status == 201 {
            return r.json()["rev"].as_str().unwrap().to_string();
        }
        assert_eq!(r.status, 409, "{}", r.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{path}: kept conflicting");
}

fn push_tag(d: &mut Value, tag: &str) {
    d["tags"].as_array_mut().unwrap().push(json!(tag));
}

/// Three nodes in a ring (A → B → C → A, continuous), every document edited on all three.
fn ring_converges(ddoc: Value, tag: &str) {
    let nodes = [
        PeerNode::start(&format!("{tag}-a")),
        PeerNode::start(&format!("{tag}-b")),
        PeerNode::start(&format!("{tag}-c")),
    ];
    const DOCS: usize = 5;
    for (i, p) in nodes.iter().enumerate() {
        let others: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| nodes[j].key_id())
            .collect();
        assert_eq!(p.node.put("/ring", &json!({})).status, 201);
        let sec = json!({"members": {"names": others, "roles": []}});
        assert_eq!(p.node.put("/ring/_security", &sec).status, 200);
        // The same design document on every node is the same revision (deterministic ids).
        let r = p.node.put("/ring/_design/merge", &ddoc);
        assert_eq!(r.status, 201, "{}", r.text());
        for d in 0..DOCS {
            let doc = json!({"title": "first", "tags": ["base"], "count": 0});
            assert_eq!(p.node.put(&format!("/ring/d{d}"), &doc).status, 201);
        }
    }
    // Round 1: every node edits every document before replication starts.
    let mut made: BTreeSet<String> = BTreeSet::new();
    for d in 0..DOCS {
        made.insert(
            nodes[0].node.get(&format!("/ring/d{d}")).json()["_rev"]
                .as_str()
                .unwrap()
                .into(),
        );
    }
    for (i, p) in nodes.iter().enumerate() {
        for d in 0..DOCS {
            made.insert(edit(&p.node, &format!("/ring/d{d}"), |doc| {
                push_tag(doc, &format!("from-{i}"));
                doc["count"] = json!(10 * (i + 1) + d);
                doc["title"] = json!(format!("edited on {i}"));
            }));
        }
    }
    for i in 0..3 {
        let next = &nodes[(i + 1) % 3];
        let body = json!({"source": "ring", "target": next.url("ring"), "continuous": true});
        assert_eq!(nodes[i].node.post("/_replicate", &body).status, 202);
    }
    let expect_tags = |d: usize| -> Value {
        let mut t = vec!["base".to_string()];
        t.extend((0..3).map(|i| format!("from-{i}")));
        if d < 2 {
            t.extend((0..3).map(|i| format!("round2-{i}")));
        }
        t.sort();
        json!(t)
    };
    let settled = |round2: bool| {
        let states: Vec<_> = nodes.iter().map(|p| state(&p.node, "ring")).collect();
        states[0] == states[1]
            && states[1] == states[2]
            && (0..DOCS).all(|d| {
                let doc = nodes[0]
                    .node
                    .get(&format!("/ring/d{d}?conflicts=true"))
                    .json();
                doc.get("_conflicts").is_none()
                    && (!round2 || d >= 2 || doc["tags"] == expect_tags(d))
                    && (round2 || doc["tags"].as_array().unwrap().len() == 4)
            })
    };
    wait_until("round 1 to converge", || settled(false));
    // Round 2: edits while the ring runs.
    for (i, p) in nodes.iter().enumerate() {
        for d in 0..2 {
            made.insert(edit(&p.node, &format!("/ring/d{d}"), |doc| {
                push_tag(doc, &format!("round2-{i}"));
                doc["count"] = json!(100 + i);
            }));
        }
    }
    wait_until("round 2 to converge", || settled(true));

    // The merged content the resolver defines, on every node.
    for p in &nodes {
        for d in 0..DOCS {
            let doc = p.node.get(&format!("/ring/d{d}")).json();
            assert_eq!(doc["tags"], expect_tags(d), "{doc}");
            let max = if d < 2 { 102 } else { 30 + d };
            assert_eq!(doc["count"], json!(max), "{doc}");
        }
    }
    // Settled means settled: no resolver ping-pong keeps the sequences moving.
    let seqs = |_: ()| -> Vec<u64> {
        nodes
            .iter()
            .map(|p| p.node.get("/ring").json()["update_seq"].as_u64().unwrap())
            .collect()
    };
    let before = seqs(());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(before, seqs(()), "sequences still moving after convergence");

    // One revision per conflict: every node that met the same conflict (the same live leaves)
    // wrote the same revision, and the trees hold exactly the revisions the nodes reported.
    let mut by_conflict: BTreeMap<(String, Vec<String>), BTreeSet<String>> = BTreeMap::new();
    let mut performed = 0;
    for p in &nodes {
        let task = resolver_task(&p.node, "ring").expect("resolver task");
        assert_eq!(task["failed"], 0, "{task}");
        performed += task["resolved"].as_u64().unwrap();
        for r in task["recent"].as_array().unwrap() {
            let mut leaves: Vec<String> = r["leaves"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap().to_string())
                .collect();
            leaves.sort();
            by_conflict
                .entry((r["id"].as_str().unwrap().to_string(), leaves))
                .or_default()
                .insert(r["rev"].as_str().unwrap().to_string());
        }
    }
    for (conflict, revs) in &by_conflict {
        assert_eq!(revs.len(), 1, "{conflict:?} resolved differently: {revs:?}");
    }
    let reported: BTreeSet<String> = by_conflict.values().flatten().cloned().collect();
    let final_state = state(&nodes[0].node, "ring");
    let mut in_trees = BTreeSet::new();
    for (id, s) in &final_state {
        if id.starts_with("_design/") {
            continue;
        }
        for leaf in s["leaves"].as_array().unwrap() {
            let ok = &leaf["ok"];
            let revs = &ok["_revisions"];
            let start = revs["start"].as_u64().unwrap();
            for (k, rid) in revs["ids"].as_array().unwrap().iter().enumerate() {
                let rev = format!("{}-{}", start - k as u64, rid.as_str().unwrap());
                let tombstone = k == 0 && ok["_deleted"] == true;
                if !tombstone && !made.contains(&rev) {
                    in_trees.insert(rev);
                }
            }
        }
    }
    assert_eq!(
        in_trees, reported,
        "resolution revisions in the trees vs reported"
    );
    assert!(by_conflict.len() >= DOCS, "{by_conflict:?}");
    eprintln!(
        "{tag}: {} conflicts, {} resolution revisions, {performed} resolutions run on 3 nodes",
        by_conflict.len(),
        reported.len()
    );
}

#[test]
fn a_ring_of_three_converges_with_a_lua_resolver() {
    ring_converges(lua_merge(), "ring-lua");
}

#[test]
fn a_ring_of_three_converges_with_a_wasm_resolver() {
    thali_tests::require!(thali_tests::needs::Need::WasmPlugins);
    ring_converges(wasm_merge(), "ring-wasm");
}

/// Two branches of `id` (roots `1-aaa…` and `1-bbb…`) written as replication would.
fn conflict(node: &Node, db: &str, id: &str, a: Value, b: Value) {
    let mut docs = Vec::new();
    for (c, mut body) in [('a', a), ('b', b)] {
        body["_id"] = json!(id);
        body["_rev"] = json!(format!("1-{}", c.to_string().repeat(32)));
        docs.push(body);
    }
    let r = node.post(
        &format!("/{db}/_bulk_docs"),
        &json!({"docs": docs, "new_edits": false}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn lua_wasm_and_javascript_write_byte_identical_resolutions() {
    thali_tests::require!(thali_tests::needs::Need::WasmPlugins);
    let (da, db, dc) = (
        TempDir::new("res-lua"),
        TempDir::new("res-wasm"),
        TempDir::new("res-js"),
    );
    let (na, nb, nc) = (Node::start(&da.0), Node::start(&db.0), Node::start(&dc.0));
    for (n, ddoc) in [(&na, lua_merge()), (&nb, wasm_merge()), (&nc, js_merge())] {
        n.put("/db", &json!({}));
        for i in 0..20 {
            conflict(
                n,
                "db",
                &format!("doc{i}"),
                json!({"tags": ["x", format!("a{i}")], "count": i, "note": "a"}),
                json!({"tags": [format!("b{i}"), "x"], "count": 7, "nested": {"k": [1, 2.5, null]}}),
            );
        }
        conflict(
            n,
            "db",
            "fin",
            json!({"v": 1, "final": true}),
            json!({"v": 2}),
        );
        conflict(
            n,
            "db",
            "old",
            json!({"v": 1}),
            json!({"v": 2, "obsolete": true}),
        );
        assert_eq!(n.put("/db/_design/merge", &ddoc).status, 201);
    }
    for n in [&na, &nb, &nc] {
        wait_until("conflicts resolved", || {
            (0..20).all(|i| conflicts(n, &format!("/db/doc{i}")) == 0)
                && conflicts(n, "/db/fin") == 0
                && n.get("/db/old").status == 404
        });
    }
    let docs_only = |n: &Node| {
        let mut s = state(n, "db");
        s.retain(|id, _| !id.starts_with("_design/"));
        s
    };
    assert_eq!(docs_only(&na), docs_only(&nb));
    assert_eq!(
        docs_only(&na),
        docs_only(&nc),
        "JavaScript resolves as Lua does"
    );
    let d3 = na.get("/db/doc3").json();
    assert_eq!(d3["tags"], json!(["a3", "b3", "x"]));
    assert_eq!(d3["count"], 7);
    // The winner is branch b (`1-bbb…` sorts higher): its other fields are kept.
    assert_eq!(d3["nested"], json!({"k": [1, 2.5, null]}));
    assert!(d3["_rev"].as_str().unwrap().starts_with("2-"));
    // Picking one: the final version, as it was.
    let fin = na.get("/db/fin").json();
    assert_eq!(
        (fin["v"].clone(), fin["final"].clone()),
        (json!(1), json!(true))
    );
    // Deleting: every leaf is a tombstone.
    let leaves = na
        .raw(
            "GET",
            "/db/old?open_revs=all",
            &[("Accept", "application/json")],
            None,
        )
        .json();
    assert!(
        leaves
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["ok"]["_deleted"] == true),
        "{leaves}"
    );
    assert_eq!(counter(&na, "db", "resolved"), 22);
    assert_eq!(counter(&nb, "db", "resolved"), 22);
    assert_eq!(counter(&nc, "db", "resolved"), 22);
}

#[test]
fn failing_resolvers_leave_conflicts_as_couchdb_does() {
    let dir = TempDir::new("res-fail");
    let n = Node::start_with(&dir.0, &["--plugin-timeout-ms", "200"]);
    n.put("/db", &json!({}));
    conflict(
        &n,
        "db",
        "c",
        json!({"tags": ["a"]}),
        json!({"tags": ["b"]}),
    );
    // No resolver: CouchDB's conflict, and no resolver task.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(conflicts(&n, "/db/c"), 1);
    assert!(resolver_task(&n, "db").is_none());

    // Each broken resolver is tried on the conflict (new code rescans the database), counted as
    // failed, and leaves it; the node keeps answering.
    let broken = [
        ("throws", "function(docs) error('boom') end"),
        ("loops", "function(docs) while true do end end"),
        ("returns garbage", "function(docs) return 42 end"),
        ("adds an attachment", "function(docs) return {_attachments = {x = {content_type = 'text/plain', data = 'eA=='}}} end"),
        ("bad field", "function(docs) return {_bogus = 1} end"),
    ];
    for (i, (what, code)) in broken.iter().enumerate() {
        let cur = n.get("/db/_design/r");
        let mut ddoc = lua_resolver(code);
        if cur.status == 200 {
            ddoc["_rev"] = cur.json()["_rev"].clone();
        }
        assert_eq!(n.put("/db/_design/r", &ddoc).status, 201, "{what}");
        wait_until(what, || counter(&n, "db", "failed") == i as u64 + 1);
        assert_eq!(conflicts(&n, "/db/c"), 1, "{what}");
        assert_eq!(n.get("/db").status, 200);
    }
    // Declining (null) is not a failure.
    let rev = n.get("/db/_design/r").json()["_rev"].clone();
    let mut ddoc = lua_resolver("function(docs) return nil end");
    ddoc["_rev"] = rev;
    assert_eq!(n.put("/db/_design/r", &ddoc).status, 201);
    wait_until("declined", || counter(&n, "db", "declined") == 1);
    assert_eq!(conflicts(&n, "/db/c"), 1);

    // A validator that refuses deletions refuses the tombstones: the resolution is written
    // all or nothing, so neither the merge nor any tombstone lands.
    let validator = json!({"language": "lua",
        "validate_doc_update": "function(new) if new._deleted then error({forbidden = 'no deletions'}) end end"});
    assert_eq!(n.put("/db/_design/v", &validator).status, 201);
    let rev = n.get("/db/_design/r").json()["_rev"].clone();
    let mut ddoc = lua_merge();
    ddoc["_rev"] = rev;
    let seq = n.get("/db").json()["update_seq"].as_u64().unwrap();
    assert_eq!(n.put("/db/_design/r", &ddoc).status, 201);
    wait_until("refused resolution", || counter(&n, "db", "failed") == 6);
    assert_eq!(conflicts(&n, "/db/c"), 1);
    assert_eq!(n.get("/db").json()["update_seq"].as_u64().unwrap(), seq + 1);

    // Without that validator the same resolver merges it, keeping the winner's attachment.
    // (The validator refuses its own deletion, so it is replaced by an empty design document;
    // changed code makes the resolver look at every conflict again.)
    let v = n.get("/db/_design/v").json();
    let r = n.put("/db/_design/v", &json!({"_rev": v["_rev"]}));
    assert_eq!(r.status, 201, "{}", r.text());
    wait_until("resolved", || conflicts(&n, "/db/c") == 0);
    let c = n.get("/db/c").json();
    assert_eq!(c["tags"], json!(["a", "b"]));
    let att = json!({"tags": ["p"], "_attachments": {"a.txt": {"content_type": "text/plain", "data": "aGVsbG8="}}});
    conflict(&n, "db", "att", json!({"tags": ["q"]}), att);
    wait_until("attachment doc resolved", || conflicts(&n, "/db/att") == 0);
    assert_eq!(n.get("/db/att/a.txt").body, b"hello");
    assert_eq!(n.get("/db/att").json()["tags"], json!(["p", "q"]));

    // Design documents are never merged by a resolver.
    conflict(
        &n,
        "db",
        "_design/js",
        json!({"language": "javascript", "x": 1}),
        json!({"language": "javascript", "x": 2}),
    );
    let task = resolver_caught_up(&n, "db");
    assert_eq!(conflicts(&n, "/db/_design/js"), 1);
    assert_eq!(task["design_document"], "_design/r");
    assert_eq!(task["resolved"], 2, "{task}");
}
