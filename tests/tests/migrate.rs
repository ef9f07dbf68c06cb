//! `thali migrate` both ways on a data directory holding conflicts, deletions, attachments,
//! `_local` documents, `_security` and a view index: the node answers the same afterwards.

use serde_json::{json, Value};
use std::process::Command;
use thali_tests::{thali_bin, Client, Node, TempDir};

/// Everything a client could see of the node's data, with sizes (engine-specific) removed.
fn snapshot(n: &Node) -> Value {
    let mut out = serde_json::Map::new();
    let mut info = n.get("/db").json();
    for k in ["sizes", "disk_size", "instance_start_time"] {
        info.as_object_mut().unwrap().remove(k);
    }
    out.insert("info".into(), info);
    for path in [
        "/_all_dbs",
        "/db/_all_docs?include_docs=true&conflicts=true&attachments=true",
        "/db/_changes?style=all_docs",
        "/db/_security",
        "/db/_local/checkpoint",
        "/db/_local_docs",
        "/db/c?revs=true&conflicts=true&deleted_conflicts=true&attachments=true",
        "/db/c?open_revs=all&revs=true",
        "/db/gone?rev=2-b",
        "/db/pic/photo.bin",
        "/db/_design/v/_view/by_type?reduce=false&update=false",
        "/db/_design/v/_view/by_type?group=true&update=false",
        "/db/_revs_limit",
    ] {
        let r = n.raw("GET", path, &[("Accept", "application/json")], None);
        out.insert(
            path.into(),
            json!([r.status, String::from_utf8_lossy(&r.body)]),
        );
    }
    Value::Object(out)
}

fn migrate(dir: &std::path::Path, to: &str) -> (bool, String) {
    let out = Command::new(thali_bin())
        .args(["migrate", "--data"])
        .arg(dir)
        .args(["--to", to])
        .env("THALI_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn migrate_both_ways_keeps_every_answer() {
    let dir = TempDir::new("migrate");
    let data = dir.0.join("data");
    let mut n = Node::start(&data);
    n.put("/db", &json!({}));
    for i in 0..30 {
        let t = ["a", "b", "c"][i % 3];
        let r = n.put(&format!("/db/d{i:02}"), &json!({"type": t, "n": i}));
        assert_eq!(r.status, 201);
    }
    // A conflict, a deleted conflict and a deleted document, written as a replicator would.
    let docs = json!({"new_edits": false, "docs": [
        {"_id": "c", "_rev": "1-a", "v": 1},
        {"_id": "c", "_rev": "2-b", "v": 2, "_revisions": {"start": 2, "ids": ["b", "a"]}},
        {"_id": "c", "_rev": "2-c", "v": 3, "_revisions": {"start": 2, "ids": ["c", "a"]}},
        {"_id": "c", "_rev": "2-d", "_deleted": true, "_revisions": {"start": 2, "ids": ["d", "a"]}},
        {"_id": "gone", "_rev": "1-a", "v": 1},
        {"_id": "gone", "_rev": "2-b", "_deleted": true, "_revisions": {"start": 2, "ids": ["b", "a"]}},
    ]});
    assert_eq!(n.post("/db/_bulk_docs", &docs).status, 201);
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let r = n.raw(
        "PUT",
        "/db/pic/photo.bin",
        &[("Content-Type", "application/octet-stream")],
        Some(&bytes),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        n.put("/db/_local/checkpoint", &json!({"last_seq": 17}))
            .status,
        201
    );
    assert_eq!(
        n.put(
            "/db/_security",
            &json!({"members": {"names": ["ed25519:x"], "roles": []}})
        )
        .status,
        200
    );
    n.put("/db/_revs_limit", &json!(77));
    let ddoc = json!({"language": "lua", "views": {"by_type": {
        "map": "function(doc) if doc.type then emit(doc.type, doc.n) end end",
        "reduce": "_sum"}}});
    assert_eq!(n.put("/db/_design/v", &ddoc).status, 201);
    assert_eq!(n.get("/db/_design/v/_view/by_type").status, 200);
    let mut before = snapshot(&n);
    assert_eq!(before["/db/pic/photo.bin"][0], 200);

    // A running node holds the store: migrating it is refused and changes nothing.
    let (ok, text) = migrate(&data, "sled");
    assert!(!ok, "{text}");
    assert_eq!(
        std::fs::read_to_string(data.join("engine")).unwrap(),
        "fjall"
    );
    n.stop();

    for (to, back) in [("sled", "fjall"), ("fjall", "sled")] {
        let (ok, text) = migrate(&data, to);
        assert!(ok, "{text}");
        assert!(text.contains("verified"), "{text}");
        assert_eq!(std::fs::read_to_string(data.join("engine")).unwrap(), to);
        assert!(!data.join(back).exists());
        // Asking the old engine by name is refused with the way out.
        let out = Command::new(thali_bin())
            .args(["serve", "--data"])
            .arg(&data)
            .args(["--storage", back, "--http", "127.0.0.1:0"])
            .env("THALI_ADMIN_PASSWORD", "x")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("thali migrate"));
        n.restart();
        let after = snapshot(&n);
        for (k, v) in before.as_object().unwrap() {
            assert_eq!(&after[k], v, "{k} differs after migrating to {to}");
        }
        // The migrated node keeps working: writes, the index, the sequence.
        let r = n.put("/db/new", &json!({"type": "a", "n": 100}));
        assert_eq!(r.status, 201);
        let q = n.get("/db/_design/v/_view/by_type?key=%22a%22").json();
        assert_eq!(
            q["rows"][0]["value"],
            json!((0..30).filter(|i| i % 3 == 0).sum::<i32>() + 100)
        );
        let doc = n.get("/db/new").json();
        assert_eq!(
            n.delete(&format!("/db/new?rev={}", doc["_rev"].as_str().unwrap()))
                .status,
            200
        );
        before = snapshot(&n);
        n.stop();
    }
}
