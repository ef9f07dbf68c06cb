//! What one writer or plugin author cannot do to others: share a JavaScript runtime with
//! another database, keep a changed module from taking effect, hold every other writer behind
//! a slow validator batch, plant the replicator's state fields, run an HTML attachment as the
//! admin's origin, stall the Mango planner, or keep the node from stopping on SIGTERM.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use thali_tests::mesh::wait_until;
use thali_tests::{Client, Node, TempDir};

fn rev(n: &Node, path: &str) -> Value {
    n.get(path).json()["_rev"].clone()
}

fn shop(rules: &str) -> Value {
    json!({
        "validate_doc_update": "function (newDoc, oldDoc, userCtx) { require('lib/rules').check(newDoc); }",
        "lib": {"rules": rules},
    })
}

#[test]
fn a_changed_module_takes_effect() {
    let dir = TempDir::new("module-change");
    let n = Node::start(&dir.0);
    n.put("/m", &json!({}));
    let strict =
        "exports.check = function (d) { if (d.price > 10) throw({forbidden: 'max 10'}); };";
    assert_eq!(n.put("/m/_design/shop", &shop(strict)).status, 201);
    let r = n.put("/m/a", &json!({"price": 20}));
    r.assert_error(403, "forbidden");
    assert_eq!(r.json()["reason"], "max 10");
    // Only the module changes; the validator's own code is the same.
    let lax = "exports.check = function (d) { if (d.price > 100) throw({forbidden: 'max 100'}); };";
    let mut ddoc = shop(lax);
    ddoc["_rev"] = rev(&n, "/m/_design/shop");
    assert_eq!(n.put("/m/_design/shop", &ddoc).status, 201);
    assert_eq!(n.put("/m/a", &json!({"price": 20})).status, 201);
    let r = n.put("/m/b", &json!({"price": 200}));
    assert_eq!(r.json()["reason"], "max 100");
}

#[test]
fn two_databases_with_the_same_code_run_their_own_modules() {
    let dir = TempDir::new("module-isolation");
    let n = Node::start(&dir.0);
    n.put("/victim", &json!({}));
    n.put("/attacker", &json!({}));
    let honest =
        "exports.check = function (d) { if (d.price > 10) throw({forbidden: 'too dear'}); };";
    // The attacker's module remembers every document it sees, in the runtime's globals.
    let spy = "exports.check = function (d) { var seen = globalThis.__seen || (globalThis.__seen = []); seen.push(d._id); if (d.leak) throw({forbidden: 'seen: ' + seen.join(',')}); };";
    assert_eq!(n.put("/victim/_design/shop", &shop(honest)).status, 201);
    assert_eq!(n.put("/attacker/_design/shop", &shop(spy)).status, 201);
    assert_eq!(
        n.put("/victim/secret-plan", &json!({"price": 5})).status,
        201
    );
    // The victim runs its own module...
    let r = n.put("/victim/dear", &json!({"price": 20}));
    r.assert_error(403, "forbidden");
    assert_eq!(r.json()["reason"], "too dear");
    // ...and the attacker's module never saw the victim's documents.
    assert_eq!(n.put("/attacker/a1", &json!({"price": 20})).status, 201);
    let r = n.put("/attacker/probe", &json!({"leak": true}));
    r.assert_error(403, "forbidden");
    let reason = r.json()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("a1"), "{reason}");
    assert!(
        !reason.contains("secret-plan"),
        "the attacker saw: {reason}"
    );
    // After a restart (compiled afresh in the other order) the same holds.
    let mut n = n;
    n.restart();
    assert_eq!(n.put("/attacker/a2", &json!({"price": 1})).status, 201);
    assert_eq!(n.put("/victim/secret-2", &json!({"price": 1})).status, 201);
    let r = n.put("/attacker/probe", &json!({"leak": true}));
    let reason = r.json()["reason"].as_str().unwrap().to_string();
    assert!(!reason.contains("secret"), "the attacker saw: {reason}");
}

#[test]
fn a_slow_validator_batch_lets_other_writers_in() {
    let dir = TempDir::new("fairness");
    let n = Node::start(&dir.0);
    n.put("/f", &json!({}));
    let ddoc = json!({"validate_doc_update":
        "function (newDoc) { var x = 0; for (var i = 0; i < (newDoc.spin || 0); i++) { x += i % 7; } }"});
    assert_eq!(n.put("/f/_design/slow", &ddoc).status, 201);
    // Calibrate: a document that costs about 150 ms to validate (well under the 500 ms limit).
    let mut spin = 200_000u64;
    loop {
        let t = Instant::now();
        assert_eq!(n.post("/f", &json!({ "spin": spin })).status, 201);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if ms > 60.0 || spin > 100_000_000 {
            spin = (spin as f64 * 150.0 / ms.max(1.0)) as u64;
            break;
        }
        spin *= 4;
    }
    let docs: Vec<Value> = (0..40)
        .map(|i| json!({"_id": format!("s{i}"), "spin": spin}))
        .collect();
    let addr = n.addr;
    let batch = std::thread::spawn(move || {
        let t = Instant::now();
        let body = serde_json::to_vec(&json!({ "docs": docs })).unwrap();
        let r = thali_tests::request(
            addr,
            "POST",
            "/f/_bulk_docs",
            &[
                ("Authorization".into(), thali_tests::admin_auth()),
                ("Content-Type".into(), "application/json".into()),
            ],
            Some(&body),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        t.elapsed()
    });
    // Once the batch is being applied, another client's single write.
    wait_until("the batch's first documents", || {
        n.get("/f/s0").status == 200
    });
    let t = Instant::now();
    assert_eq!(n.put("/f/quick", &json!({"spin": 0})).status, 201);
    let quick = t.elapsed();
    let whole = batch.join().unwrap();
    println!(
        "a single write during a 40-document slow batch: {:.0} ms (the batch took {:.1} s)",
        quick.as_secs_f64() * 1e3,
        whole.as_secs_f64()
    );
    // It went in between the batch's slices, not after the whole batch.
    let quick_seq = n.get("/f/quick?local_seq=true").json()["_local_seq"]
        .as_u64()
        .unwrap();
    let last_seq = n.get("/f/s39?local_seq=true").json()["_local_seq"]
        .as_u64()
        .unwrap();
    assert!(
        quick_seq < last_seq,
        "the single write waited for the whole batch ({quick_seq} after {last_seq}; {quick:?})"
    );
}

#[test]
fn replicator_state_fields_are_the_nodes_alone() {
    let dir = TempDir::new("repl-fields");
    let n = Node::start(&dir.0);
    n.put("/_replicator", &json!({}));
    let hostile = "<img src=x onerror=alert(1)>";
    let r = n.put(
        "/_replicator/planted",
        &json!({"source": "nowhere-a", "target": "nowhere-b",
                "_replication_state": "completed",
                "_replication_state_reason": hostile,
                "_replication_stats": {"docs_written": hostile}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // What was stored carries none of them; what the node writes later is its own.
    wait_until("the node's own state", || {
        let d = n.get("/_replicator/planted").json();
        d["_replication_state"] != "completed" && d.get("_replication_state").is_some()
    });
    let d = n.get("/_replicator/planted").json();
    assert!(!d.to_string().contains("onerror"), "{d}");
    assert!(!d["_replication_stats"]["docs_written"].is_string(), "{d}");
    // Replicated in, the same.
    let r = n.post(
        "/_replicator/_bulk_docs",
        &json!({"new_edits": false, "docs": [{"_id": "r2", "_rev": "1-abc", "source": "x", "target": "y",
                "_replication_state": "completed", "_replication_stats": {"docs_written": hostile}}]}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let d = n.get("/_replicator/r2?rev=1-abc").json();
    assert!(!d.to_string().contains("onerror"), "{d}");
}

#[test]
fn attachments_are_served_sandboxed() {
    let dir = TempDir::new("att-sandbox");
    let n = Node::start(&dir.0);
    n.put("/a", &json!({}));
    let html = b"<script>fetch('/_all_dbs').then(r => r.text()).then(alert)</script>";
    let r = n.raw(
        "PUT",
        "/a/page/index.html",
        &[("Content-Type", "text/html")],
        Some(html),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = n.raw("GET", "/a/page/index.html", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html"));
    assert_eq!(r.header("content-security-policy"), Some("sandbox"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

#[test]
fn the_mango_planner_is_bounded() {
    let dir = TempDir::new("planner");
    let n = Node::start(&dir.0);
    n.put("/q", &json!({}));
    // Indexes name a bounded number of fields.
    let many: Vec<String> = (0..400).map(|i| format!("f{i}")).collect();
    n.post("/q/_index", &json!({"index": {"fields": many}}))
        .assert_error(400, "invalid_index");
    let ok: Vec<String> = (0..60).map(|i| format!("f{i}")).collect();
    assert_eq!(
        n.post("/q/_index", &json!({"index": {"fields": ok}}))
            .status,
        200
    );
    // Selectors are bounded in size and depth.
    let wide: Vec<Value> = (0..30_000).map(|i| json!({ "f0": i })).collect();
    n.post("/q/_find", &json!({"selector": {"$or": wide}}))
        .assert_error(400, "invalid_selector");
    // 40 `$and`s are 80 JSON levels: past the selector's 64, within what JSON parsing takes.
    let mut deep = json!({"f0": 1});
    for _ in 0..40 {
        deep = json!({ "$and": [deep] });
    }
    n.post("/q/_find", &json!({ "selector": deep }))
        .assert_error(400, "invalid_selector");
    // 8,000 $or branches against a 60-field index plan at once (linear in the selector).
    let wide: Vec<Value> = (0..8_000).map(|i| json!({ "f0": i, "f1": i })).collect();
    let t = Instant::now();
    let r = n.post("/q/_explain", &json!({"selector": {"$or": wide}}));
    assert_eq!(r.status, 200, "{}", r.text());
    println!(
        "_explain of 8000 $or branches: {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}

#[test]
fn sigterm_stops_the_node_during_heavy_work() {
    let dir = TempDir::new("sigterm");
    let mut n = Node::start(&dir.0);
    n.put("/h", &json!({}));
    // A design document with a 5,000-field index (as one could arrive by replication) and a
    // view whose map is slow: both keep blocking threads busy.
    let fields: Vec<Value> = (0..5000)
        .map(|i| json!({ format!("f{i}"): "asc" }))
        .collect();
    let names: Vec<String> = (0..5000).map(|i| format!("f{i}")).collect();
    let mut field_map = serde_json::Map::new();
    for f in &names {
        field_map.insert(f.clone(), json!("asc"));
    }
    let r = n.put(
        "/h/_design/wide",
        &json!({"language": "query", "views": {"wide": {"map": {"fields": field_map}, "reduce": "_count",
               "options": {"def": {"fields": fields}}}}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = n.put(
        "/h/_design/slow",
        &json!({"views": {"v": {"map": "function (doc) { var x = 0; for (var i = 0; i < 2000000; i++) { x += i % 3; } emit(doc._id, x); }"}}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let docs: Vec<Value> = (0..300)
        .map(|i| json!({"_id": format!("d{i:03}"), "f0": i}))
        .collect();
    assert_eq!(
        n.post("/h/_bulk_docs", &json!({ "docs": docs })).status,
        201
    );
    let addr = n.addr;
    let heavy = |path: &'static str, body: Option<Value>| {
        std::thread::spawn(move || {
            let body = body.map(|b| serde_json::to_vec(&b).unwrap());
            let _ = thali_tests::try_request_within(
                addr,
                if body.is_some() { "POST" } else { "GET" },
                path,
                &[
                    ("Authorization".into(), thali_tests::admin_auth()),
                    ("Content-Type".into(), "application/json".into()),
                ],
                body.as_deref(),
                Duration::from_secs(60),
            );
        })
    };
    let wide: Vec<Value> = (0..6000).map(|i| json!({ "f0": i, "f1": i })).collect();
    let explain = heavy("/h/_explain", Some(json!({"selector": {"$or": wide}})));
    let view = heavy("/h/_design/slow/_view/v?limit=1", None);
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    n.stop();
    let took = t.elapsed();
    println!("stopped {:.1} s after SIGTERM", took.as_secs_f64());
    assert!(
        took < Duration::from_secs(10),
        "the node took {took:?} to stop"
    );
    let _ = explain.join();
    let _ = view.join();
    // It restarts on the same data (the store's lock was released) and answers.
    n.restart();
    assert_eq!(n.get("/h/d000").status, 200);
}
