//! Metrics and CouchDB's node endpoints against the real binary: `/_node/_local/_prometheus`
//! parsed by a real exposition-format parser (`prometheus-parse`) and its counters seen to
//! move with requests, writes, replication and a failing plugin; `_stats` in CouchDB's shape;
//! `_system`, `_membership`, `_dbs_info`, `/_up`.

use serde_json::{json, Value};
use thali_tests::{Client, Node, TempDir};

/// Every sample of a scrape, `name{labels}` → value.
fn scrape(n: &Node) -> std::collections::HashMap<String, f64> {
    let r = n.get("/_node/_local/_prometheus");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let lines = r
        .text()
        .lines()
        .map(|l| Ok(l.to_string()))
        .collect::<Vec<_>>();
    let s = prometheus_parse::Scrape::parse(lines.into_iter()).expect("valid exposition format");
    assert!(!s.samples.is_empty());
    let mut out = std::collections::HashMap::new();
    for x in s.samples {
        let v = match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let mut labels: Vec<String> = x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let key = if labels.is_empty() {
            x.metric
        } else {
            format!("{}{{{}}}", x.metric, labels.join(","))
        };
        assert!(out.insert(key.clone(), v).is_none(), "{key} twice");
    }
    out
}

fn get(m: &std::collections::HashMap<String, f64>, k: &str) -> f64 {
    *m.get(k)
        .unwrap_or_else(|| panic!("no sample {k} in {:?}", m.keys()))
}

#[test]
fn counters_move_and_parse() {
    let dir = TempDir::new("metrics");
    let n = Node::start(&dir.0);
    let before = scrape(&n);
    assert_eq!(n.put("/m", &json!({})).status, 201);
    let docs: Vec<Value> = (0..10).map(|i| json!({"_id": format!("d{i}")})).collect();
    assert_eq!(
        n.post("/m/_bulk_docs", &json!({ "docs": docs })).status,
        201
    );
    for i in 0..5 {
        assert_eq!(n.get(&format!("/m/d{i}")).status, 200);
    }
    assert_eq!(n.get("/m/nothing").status, 404);
    let r = n.post(
        "/_replicate",
        &json!({"source": "m", "target": "copy", "create_target": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A validator that never returns: the plugin's time limit stops it, and that is an error.
    let ddoc = json!({"language": "lua",
                      "validate_doc_update": "function(doc) while true do end end"});
    assert_eq!(n.put("/m/_design/spin", &ddoc).status, 201);
    assert!(n.put("/m/stuck", &json!({})).status >= 400);

    let after = scrape(&n);
    let moved = |k: &str| get(&after, k) - before.get(k).copied().unwrap_or(0.0);
    assert!(moved("couchdb_httpd_requests_total") >= 12.0);
    assert!(moved("couchdb_httpd_request_methods_total{method=GET}") >= 6.0);
    assert!(moved("couchdb_httpd_status_codes_total{code=404}") >= 1.0);
    assert!(moved("couchdb_database_writes_total") >= 11.0);
    assert!(moved("couchdb_database_reads_total") >= 5.0);
    assert!(moved("thali_replication_docs_written_total") >= 10.0);
    assert!(moved("thali_plugin_errors_total") >= 1.0);
    assert!(get(&after, "couchdb_open_databases") >= 2.0);
    assert!(get(&after, "thali_memory_bytes") > 1e6);
    assert!(get(&after, "thali_storage_bytes") > 0.0);
    assert!(get(&after, "couchdb_request_time_seconds_count") >= 12.0);

    // `_stats` in CouchDB's shape, the same numbers.
    let s = n.get("/_node/_local/_stats").json();
    assert_eq!(s["couchdb"]["httpd"]["requests"]["type"], "counter");
    assert!(s["couchdb"]["httpd"]["requests"]["value"].as_u64().unwrap() >= 13);
    assert!(
        s["couchdb"]["httpd_status_codes"]["201"]["value"]
            .as_u64()
            .unwrap()
            >= 3
    );
    assert!(s["couchdb"]["database_writes"]["value"].as_u64().unwrap() >= 11);
    assert!(s["couchdb"]["request_time"]["value"]["n"].as_u64().unwrap() >= 13);
    assert!(
        s["thali"]["replication"]["docs_written"]["value"]
            .as_u64()
            .unwrap()
            >= 10
    );
    let part = n
        .get("/_node/_local/_stats/couchdb/httpd_request_methods/GET")
        .json();
    assert!(part["value"].as_u64().unwrap() >= 6, "{part}");
    n.get("/_node/_local/_stats/couchdb/nothing")
        .assert_error(404, "not_found");
    n.get("/_node/elsewhere@host/_stats")
        .assert_error(404, "not_found");
    assert_eq!(n.get("/_node/nonode@nohost/_stats").status, 200);
}

#[test]
fn node_endpoints_answer_as_couchdb() {
    let dir = TempDir::new("node-endpoints");
    let n = Node::start(&dir.0);
    assert_eq!(n.put("/a", &json!({})).status, 201);
    assert_eq!(n.put("/a/x", &json!({})).status, 201);

    let up = thali_tests::request(n.addr, "GET", "/_up", &[], None);
    assert_eq!(up.status, 200);
    assert_eq!(up.json(), json!({"status": "ok", "storage": "ok"}));
    assert_eq!(
        n.get("/_membership").json(),
        json!({"all_nodes": ["nonode@nohost"], "cluster_nodes": ["nonode@nohost"]})
    );
    let sys = n.get("/_node/_local/_system").json();
    assert!(
        sys["memory"]["resident"].as_u64().unwrap() > 1_000_000,
        "{sys}"
    );
    assert!(sys["threads"].as_u64().unwrap() >= 2);
    assert!(sys["open_files"].as_u64().unwrap() >= 3);

    let all = n.get("/_dbs_info").json();
    let a = all
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "a")
        .unwrap();
    assert_eq!(a["info"]["doc_count"], 1);
    let some = n
        .post("/_dbs_info", &json!({"keys": ["a", "missing"]}))
        .json();
    assert_eq!(some[0]["info"]["db_name"], "a");
    assert_eq!(some[1], json!({"key": "missing", "error": "not_found"}));
    n.post("/_dbs_info", &json!({"nokeys": 1}))
        .assert_error(400, "bad_request");
    // Admin only.
    let anon = thali_tests::request(n.addr, "GET", "/_node/_local/_prometheus", &[], None);
    assert_eq!(anon.status, 401);
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    let dir = TempDir::new("json-logs");
    let port = thali_tests::free_port();
    let mut child = std::process::Command::new(thali_tests::thali_bin())
        .args(["serve", "--http", &format!("127.0.0.1:{port}"), "--data"])
        .arg(&dir.0)
        .env("THALI_ADMIN_PASSWORD", thali_tests::PASSWORD)
        .env("THALI_LOG_FORMAT", "json")
        .env("THALI_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    while let Some(Ok(l)) = lines.next() {
        let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
        seen.push(v["fields"]["message"].as_str().unwrap_or("").to_string());
        if seen.iter().any(|m| m == "HTTP API listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.iter().any(|m| m == "node identity"), "{seen:?}");
}
