//! Black-box tests of the HTTP API against the real binary.

use serde_json::{json, Value};
use thali_tests::{request, Client, Node, TempDir, PASSWORD};

fn node() -> (TempDir, Node) {
    let dir = TempDir::new("api");
    let n = Node::start(&dir.0);
    (dir, n)
}

fn rev_of(r: &thali_tests::Resp) -> String {
    r.json()["rev"].as_str().unwrap().to_string()
}

#[test]
fn server_endpoints_and_auth() {
    let (_d, n) = node();
    // GET / and /_up are open; everything else needs the admin.
    let root = request(n.addr, "GET", "/", &[], None);
    assert_eq!(root.status, 200);
    let j = root.json();
    assert_eq!(j["couchdb"], "Welcome");
    assert_eq!(j["vendor"]["name"], "thali");
    let uuid = j["uuid"].as_str().unwrap().to_string();
    assert_eq!(uuid.len(), 32);
    assert_eq!(request(n.addr, "GET", "/_up", &[], None).status, 200);
    request(n.addr, "GET", "/_all_dbs", &[], None).assert_error(401, "unauthorized");
    request(n.addr, "PUT", "/x", &[], None).assert_error(401, "unauthorized");
    let bad = vec![(
        "Authorization".to_string(),
        "Basic YWRtaW46d3Jvbmc=".to_string(),
    )];
    request(n.addr, "GET", "/_all_dbs", &bad, None).assert_error(401, "unauthorized");
    // _session: a wrong login is 401 (a right one sets a cookie: tests/session.rs).
    request(n.addr, "POST", "/_session", &[], Some(b"name=a&password=b"))
        .assert_error(401, "unauthorized");
    assert_eq!(
        n.get("/_session").json()["userCtx"]["roles"],
        json!(["_admin"])
    );
    // The node creates `_replicator` on start, as CouchDB does.
    assert_eq!(n.get("/_all_dbs").json(), json!(["_replicator"]));
    let u = n.get("/_uuids?count=5").json();
    assert_eq!(u["uuids"].as_array().unwrap().len(), 5);
    n.get("/_uuids?count=5000").assert_error(400, "bad_request");
    n.get("/_uuids?count=x")
        .assert_error(400, "query_parse_error");
    n.post("/", &json!({}))
        .assert_error(405, "method_not_allowed");
    // The uuid is stable across restarts.
    let mut n = n;
    n.restart();
    assert_eq!(request(n.addr, "GET", "/", &[], None).json()["uuid"], uuid);
}

#[test]
fn generated_admin_password_is_private_and_printed_once() {
    let dir = TempDir::new("pw");
    let out = std::process::Command::new(thali_tests::thali_bin())
        .args(["serve", "--data"])
        .arg(&dir.0)
        .args(["--http", &format!("127.0.0.1:{}", thali_tests::free_port())])
        .env_remove("THALI_ADMIN_PASSWORD")
        .env("THALI_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = out.id();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let o = out.wait_with_output().unwrap();
    assert!(o.status.success());
    let file = dir.0.join("admin.password");
    let pw = std::fs::read_to_string(&file).unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains(pw.trim()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A node started on that directory accepts the saved password.
    let mut node = Node::start_with(&dir.0, &["--admin-password", pw.trim()]);
    let auth = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("admin:{}", pw.trim())
        )
    );
    let r = request(
        node.addr,
        "GET",
        "/_all_dbs",
        &[("Authorization".into(), auth)],
        None,
    );
    assert_eq!(r.status, 200);
    // The test password no longer works there.
    assert_ne!(pw.trim(), PASSWORD);
    node.stop();
}

#[test]
fn database_lifecycle() {
    let (_d, n) = node();
    n.get("/db").assert_error(404, "not_found");
    assert_eq!(n.put("/db", &json!({})).status, 201);
    n.put("/db", &json!({})).assert_error(412, "file_exists");
    n.put("/Bad", &json!({}))
        .assert_error(400, "illegal_database_name");
    n.put("/1db", &json!({}))
        .assert_error(400, "illegal_database_name");
    n.put("/_foo", &json!({}))
        .assert_error(400, "illegal_database_name");
    assert_eq!(
        n.put("/a%2Fb", &json!({})).status,
        201,
        "slashes are allowed, encoded"
    );
    assert_eq!(
        n.get("/_all_dbs").json(),
        json!(["_replicator", "a/b", "db"])
    );
    let info = n.get("/db/").json(); // trailing slash
    assert_eq!(info["db_name"], "db");
    assert_eq!(info["instance_start_time"], "0");
    assert_eq!(info["update_seq"], 0);
    assert_eq!(info["doc_count"], 0);
    let head = n.req("HEAD", "/db", None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(n.req("HEAD", "/nope", None).status, 404);
    n.delete("/db?rev=1-abc").assert_error(400, "bad_request");
    assert_eq!(n.delete("/db").status, 200);
    n.delete("/db").assert_error(404, "not_found");
    n.get("/db").assert_error(404, "not_found");
    // Recreated databases start empty.
    n.put("/db", &json!({}));
    assert_eq!(n.get("/db").json()["doc_count"], 0);
}

#[test]
fn document_crud_and_revisions() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    let r = n.put("/db/doc1", &json!({"a": 1}));
    assert_eq!(r.status, 201);
    assert!(r.header("etag").is_some());
    let rev1 = rev_of(&r);
    assert!(rev1.starts_with("1-") && rev1.len() == 34);
    // Deterministic: the same edit gives the same revision in another database.
    n.put("/db2", &json!({}));
    assert_eq!(rev_of(&n.put("/db2/doc1", &json!({"a": 1}))), rev1);
    // No rev on an existing doc, a wrong rev, a rev for a new doc: all 409.
    n.put("/db/doc1", &json!({"a": 2}))
        .assert_error(409, "conflict");
    n.put(
        "/db/doc1",
        &json!({"a": 2, "_rev": "1-0123456789abcdef0123456789abcdef"}),
    )
    .assert_error(409, "conflict");
    n.put(
        "/db/new",
        &json!({"_rev": "1-0123456789abcdef0123456789abcdef"}),
    )
    .assert_error(409, "conflict");
    let rev2 = rev_of(&n.put("/db/doc1", &json!({"a": 2, "_rev": rev1})));
    assert!(rev2.starts_with("2-"));
    // The old leaf is no longer editable.
    n.put("/db/doc1", &json!({"a": 3, "_rev": rev1}))
        .assert_error(409, "conflict");
    // rev via query string and If-Match
    let rev3 = rev_of(&n.put(&format!("/db/doc1?rev={rev2}"), &json!({"a": 3})));
    let rev4 = rev_of(&n.raw(
        "PUT",
        "/db/doc1",
        &[
            ("If-Match", &format!("\"{rev3}\"")),
            ("Content-Type", "application/json"),
        ],
        Some(br#"{"a":4}"#),
    ));
    let d = n.get("/db/doc1").json();
    assert_eq!(d["a"], 4);
    assert_eq!(d["_rev"], rev4);
    let d = n.get(&format!("/db/doc1?rev={rev1}")).json();
    assert_eq!(d["a"], 1);
    let d = n
        .get("/db/doc1?revs=true&revs_info=true&local_seq=true")
        .json();
    assert_eq!(d["_revisions"]["start"], 4);
    assert_eq!(d["_revisions"]["ids"].as_array().unwrap().len(), 4);
    assert_eq!(d["_revs_info"][0]["status"], "available");
    assert_eq!(d["_local_seq"], 4);
    // POST /db generates an id.
    let r = n.post("/db", &json!({"b": 1}));
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["id"].as_str().unwrap().len(), 32);
    // DELETE needs the current rev; then the doc is a tombstone.
    n.delete("/db/doc1").assert_error(409, "conflict");
    let del = n.delete(&format!("/db/doc1?rev={rev4}"));
    assert_eq!(del.status, 200);
    let drev = rev_of(&del);
    let g = n.get("/db/doc1");
    g.assert_error(404, "not_found");
    assert_eq!(g.json()["reason"], "deleted");
    n.get("/db/never").assert_error(404, "not_found");
    assert_eq!(n.get("/db/never").json()["reason"], "missing");
    let t = n.get(&format!("/db/doc1?rev={drev}")).json();
    assert_eq!(t["_deleted"], true);
    let info = n.get("/db").json();
    assert_eq!(info["doc_count"], 1);
    assert_eq!(info["doc_del_count"], 1);
    // Recreating a deleted document continues its branch.
    let re = rev_of(&n.put("/db/doc1", &json!({"again": true})));
    assert!(re.starts_with("6-"), "{re}");
    // COPY
    let c = n.raw("COPY", "/db/doc1", &[("Destination", "copied")], None);
    assert_eq!(c.status, 201);
    assert_eq!(n.get("/db/copied").json()["again"], true);
    // Design docs and ids with slashes.
    assert_eq!(
        n.put("/db/_design/foo%2Fbar", &json!({"views": {}})).status,
        201
    );
    assert_eq!(
        n.get("/db/_design/foo%2Fbar").json()["_id"],
        "_design/foo/bar"
    );
    assert_eq!(n.put("/db/a%2Fb", &json!({})).status, 201);
    assert_eq!(n.get("/db/a%2Fb").json()["_id"], "a/b");
    // Unknown query parameters are ignored.
    assert_eq!(n.get("/db/a%2Fb?_nonce=123").status, 200);
}

#[test]
fn bad_input_is_rejected_and_nothing_is_touched() {
    let dir = TempDir::new("bad");
    let n = Node::start_with(
        &dir.0,
        &[
            "--max-document-size",
            "1000",
            "--max-request-size",
            "100000",
        ],
    );
    n.put("/db", &json!({}));
    let rev = rev_of(&n.put("/db/keep", &json!({"v": 1})));
    let j = |b: &[u8]| {
        n.raw(
            "PUT",
            "/db/x",
            &[("Content-Type", "application/json")],
            Some(b),
        )
    };
    j(b"{not json").assert_error(400, "bad_request");
    j(b"[1,2]").assert_error(400, "bad_request");
    j(b"\xff\xfe").assert_error(400, "bad_request");
    n.put("/db/x", &json!({"_foo": 1}))
        .assert_error(400, "doc_validation");
    n.put("/db/x", &json!({"_rev": "nonsense"}))
        .assert_error(400, "bad_request");
    n.put("/db/_bad", &json!({}))
        .assert_error(400, "illegal_docid");
    n.post("/db", &json!({"_id": ""}))
        .assert_error(400, "illegal_docid");
    n.post("/db", &json!({"_id": 5}))
        .assert_error(400, "bad_request");
    n.put("/db/x", &json!({"_attachments": {"a": {"data": "***"}}}))
        .assert_error(400, "bad_request");
    n.put("/db/x", &json!({"_attachments": {"a": {"stub": true}}}))
        .assert_error(412, "missing_stub");
    n.put("/db/x", &json!({"big": "x".repeat(2000)}))
        .assert_error(413, "document_too_large");
    n.raw(
        "PUT",
        "/db/x",
        &[("Content-Type", "application/json")],
        Some(&vec![b' '; 200_000]),
    )
    .assert_error(413, "too_large");
    n.raw(
        "POST",
        "/db/_bulk_docs",
        &[("Content-Type", "text/plain")],
        Some(b"{\"docs\":[]}"),
    )
    .assert_error(415, "bad_content_type");
    n.raw("POST", "/db/_revs_diff", &[], Some(b"{}"))
        .assert_error(415, "bad_content_type");
    n.post("/db/_bulk_docs", &json!({"nodocs": 1}))
        .assert_error(400, "bad_request");
    n.post("/db/_bulk_docs", &json!({"docs": [], "new_edits": "yes"}))
        .assert_error(400, "bad_request");
    n.post("/db/_bulk_get", &json!({}))
        .assert_error(400, "bad_request");
    n.get("/db/_all_docs?limit=-1")
        .assert_error(400, "query_parse_error");
    n.get("/db/_all_docs?startkey=notjson")
        .assert_error(400, "query_parse_error");
    // An inverted range is no error for _all_docs (CouchDB and PouchDB's suite): no rows.
    let inverted = n.get("/db/_all_docs?startkey=%22b%22&endkey=%22a%22");
    assert_eq!(inverted.status, 200, "{}", inverted.text());
    assert_eq!(inverted.json()["rows"], json!([]));
    n.get("/db/_changes?since=abc")
        .assert_error(400, "bad_request");
    n.get("/db/_changes?feed=bogus")
        .assert_error(400, "bad_request");
    n.get("/db/keep?open_revs=[bad")
        .assert_error(400, "bad_request");
    n.get("/db/keep?rev=bad").assert_error(400, "bad_request");
    n.put("/db/_revs_limit", &json!("x"))
        .assert_error(400, "bad_request");
    n.put("/db/_security", &json!([1]))
        .assert_error(400, "bad_request");
    n.put("/db/_security", &json!({"admins": {"names": "x"}}))
        .assert_error(400, "bad_request");
    n.put("/db/keep/_att", &json!({}))
        .assert_error(400, "bad_request");
    // Garbage on the wire does not hurt the node either.
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(n.addr).unwrap();
    s.write_all(b"\x00\x01GARBAGE\r\n\r\n").unwrap();
    drop(s);
    // Nothing stored was touched and the node still serves.
    let d = n.get("/db/keep").json();
    assert_eq!(d["_rev"], rev);
    assert_eq!(d["v"], 1);
    let info = n.get("/db").json();
    assert_eq!(info["doc_count"], 1);
    assert_eq!(info["update_seq"], 1);
}

#[test]
fn bulk_docs_both_modes_and_conflicts() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    let r = n.post(
        "/db/_bulk_docs",
        &json!({"docs": [{"_id": "a", "v": 1}, {"_id": "b"}, {"_id": "a", "v": 2}]}),
    );
    assert_eq!(r.status, 201);
    let res = r.json();
    assert_eq!(res[0]["ok"], true);
    assert_eq!(res[1]["ok"], true);
    assert_eq!(res[2]["error"], "conflict");
    // A conflict row names the document but no revision (CouchDB, PouchDB's #6039).
    assert_eq!(res[2]["id"], "a");
    assert!(res[2].get("rev").is_none(), "{res}");
    // A document that does not parse fails the whole request, as in CouchDB: nothing written.
    let seq = n.get("/db").json()["update_seq"].clone();
    n.post(
        "/db/_bulk_docs",
        &json!({"docs": [{"_id": "c"}, {"_foo": 1}]}),
    )
    .assert_error(400, "doc_validation");
    n.post(
        "/db/_bulk_docs",
        &json!({"docs": [{"_id": "c"}, {"_id": "_bad"}]}),
    )
    .assert_error(400, "illegal_docid");
    n.post(
        "/db/_bulk_docs",
        &json!({"new_edits": false, "docs": [{"_id": "nohistory"}]}),
    )
    .assert_error(400, "bad_request");
    assert_eq!(n.get("/db").json()["update_seq"], seq);
    let a1 = res[0]["rev"].as_str().unwrap().to_string();
    // Replicated writes: errors only, and conflicts become branches.
    let r = n.post(
        "/db/_bulk_docs",
        &json!({"new_edits": false, "docs": [
            {"_id": "a", "_rev": "2-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "_revisions": {"start": 2, "ids": ["bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", a1.split('-').nth(1).unwrap()]}, "v": "b"},
            {"_id": "a", "_rev": "2-cccccccccccccccccccccccccccccccc", "_revisions": {"start": 2, "ids": ["cccccccccccccccccccccccccccccccc", a1.split('-').nth(1).unwrap()]}, "v": "c"},
            {"_id": "a", "_rev": "3-dddddddddddddddddddddddddddddddd", "_revisions": {"start": 3, "ids": ["dddddddddddddddddddddddddddddddd", "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"]}, "_deleted": true}
        ]}),
    );
    assert_eq!(r.status, 201);
    let errs = r.json();
    assert_eq!(errs, json!([]));
    let d = n.get("/db/a?conflicts=true&deleted_conflicts=true").json();
    // Winner: highest non-deleted (pos, id).
    assert_eq!(d["_rev"], "2-cccccccccccccccccccccccccccccccc");
    assert_eq!(
        d["_conflicts"],
        json!(["2-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"])
    );
    assert_eq!(
        d["_deleted_conflicts"],
        json!(["3-dddddddddddddddddddddddddddddddd"])
    );
    // Replaying the same replicated docs is a no-op.
    let seq = n.get("/db").json()["update_seq"].clone();
    n.post("/db/_bulk_docs", &json!({"new_edits": false, "docs": [{"_id": "a", "_rev": "2-cccccccccccccccccccccccccccccccc"}]}));
    assert_eq!(n.get("/db").json()["update_seq"], seq);
    // open_revs=all lists every leaf; a list returns ok/missing entries.
    let all = n.get("/db/a?open_revs=all").json();
    assert_eq!(all.as_array().unwrap().len(), 3);
    let some = n
        .get("/db/a?open_revs=%5B%222-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb%22,%229-ffff%22%5D")
        .json();
    assert_eq!(some[0]["ok"]["v"], "b");
    assert_eq!(some[1]["missing"], "9-ffff");
    // latest=true swaps an ancestor for its leaves.
    let latest = n
        .get(&format!("/db/a?open_revs=%5B%22{a1}%22%5D&latest=true"))
        .json();
    assert_eq!(latest.as_array().unwrap().len(), 2, "{latest}");
    // Resolving: delete the loser, the winner stays.
    let r = n.delete("/db/a?rev=2-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
    assert_eq!(r.status, 200);
    let d = n.get("/db/a?conflicts=true").json();
    assert!(d.get("_conflicts").is_none());
    // _revs_diff
    let diff = n.post("/db/_revs_diff", &json!({"a": ["2-cccccccccccccccccccccccccccccccc", "3-ffff", "2-eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"], "zz": ["1-a"]})).json();
    assert_eq!(diff["a"]["missing"], json!(["3-ffff"]));
    assert!(diff["a"]["possible_ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r == "2-cccccccccccccccccccccccccccccccc"));
    assert_eq!(diff["zz"]["missing"], json!(["1-a"]));
    assert!(diff["zz"].get("possible_ancestors").is_none());
    // _bulk_get: one result per item, in order.
    let bg = n.post(
        "/db/_bulk_get?revs=true",
        &json!({"docs": [{"id": "a", "rev": "2-cccccccccccccccccccccccccccccccc"}, {"id": "missing"}, {"id": "a", "rev": "7-abc"}, {"id": "b"}]}),
    ).json();
    let res = bg["results"].as_array().unwrap();
    assert_eq!(res.len(), 4);
    assert_eq!(res[0]["docs"][0]["ok"]["_revisions"]["start"], 2);
    assert_eq!(res[1]["docs"][0]["error"]["error"], "not_found");
    assert_eq!(res[2]["docs"][0]["error"]["rev"], "7-abc");
    assert_eq!(res[3]["id"], "b");
}

#[test]
fn revs_limit_stems_history() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    assert_eq!(n.get("/db/_revs_limit").json(), json!(1000));
    assert_eq!(n.put("/db/_revs_limit", &json!(3)).status, 200);
    assert_eq!(n.get("/db/_revs_limit").json(), json!(3));
    let mut rev = rev_of(&n.put("/db/d", &json!({"i": 0})));
    for i in 1..10 {
        rev = rev_of(&n.put("/db/d", &json!({"i": i, "_rev": rev})));
    }
    let d = n.get("/db/d?revs=true").json();
    assert_eq!(d["_revisions"]["start"], 10);
    assert_eq!(d["_revisions"]["ids"].as_array().unwrap().len(), 3);
    // Stemmed revisions are gone; with a limit of 1 every update drops its parent.
    n.get("/db/d?rev=...").assert_error(400, "bad_request");
    assert_eq!(n.put("/db/_revs_limit", &json!(1)).status, 200);
    let old = rev.clone();
    for i in 10..13 {
        rev = rev_of(&n.put("/db/d", &json!({"i": i, "_rev": rev})));
    }
    let d = n.get("/db/d?revs=true").json();
    assert_eq!(d["i"], 12);
    assert_eq!(d["_revisions"]["ids"].as_array().unwrap().len(), 1);
    n.get(&format!("/db/d?rev={old}"))
        .assert_error(404, "not_found");
}

#[test]
fn attachments() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let r = n.raw(
        "PUT",
        "/db/d/file.bin",
        &[("Content-Type", "application/x-thing")],
        Some(&bytes),
    );
    assert_eq!(r.status, 201);
    let rev1 = rev_of(&r);
    let g = n.get("/db/d/file.bin");
    assert_eq!(g.status, 200);
    assert_eq!(g.header("content-type"), Some("application/x-thing"));
    assert_eq!(g.body, bytes);
    // Range
    let part = n.raw("GET", "/db/d/file.bin", &[("Range", "bytes=10-19")], None);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, bytes[10..20]);
    // Stub in the doc, with the md5 digest.
    let d = n.get("/db/d").json();
    let stub = &d["_attachments"]["file.bin"];
    assert_eq!(stub["stub"], true);
    assert_eq!(stub["length"], 300_000);
    assert!(stub["digest"].as_str().unwrap().starts_with("md5-"));
    assert_eq!(stub["revpos"], 1);
    // Inline base64 on write and read; a stub keeps the earlier attachment.
    let rev2 = rev_of(&n.put(
        "/db/d",
        &json!({"_rev": rev1, "x": 1, "_attachments": {"file.bin": {"stub": true}, "t.txt": {"content_type": "text/plain", "data": "aGVsbG8="}}}),
    ));
    let d = n.get("/db/d?attachments=true").json();
    assert_eq!(d["_attachments"]["t.txt"]["data"], "aGVsbG8=");
    assert_eq!(
        d["_attachments"]["t.txt"]["digest"],
        "md5-XUFAKrxLKna5cZ2REBfFkg=="
    );
    assert_eq!(d["_attachments"]["file.bin"]["revpos"], 1);
    // atts_since: only attachments newer than the given revision carry data.
    let d = n
        .get(&format!("/db/d?atts_since=%5B%22{rev1}%22%5D"))
        .json();
    assert!(d["_attachments"]["t.txt"]["data"].is_string());
    assert_eq!(d["_attachments"]["file.bin"]["stub"], true);
    // Old revision's attachment via ?rev=
    assert_eq!(
        n.get(&format!("/db/d/file.bin?rev={rev1}")).body.len(),
        300_000
    );
    // Delete one attachment.
    let rev3 = rev_of(&n.delete(&format!("/db/d/t.txt?rev={rev2}")));
    n.get("/db/d/t.txt").assert_error(404, "not_found");
    n.delete(&format!("/db/d/nope?rev={rev3}"))
        .assert_error(404, "not_found");
    n.delete("/db/d/file.bin").assert_error(409, "conflict");
    // Names starting with _ are reserved.
    n.put("/db/e", &json!({"_attachments": {"_x": {"data": ""}}}))
        .assert_error(400, "bad_request");
    // multipart/related PUT, as CouchDB's replicator sends.
    let body = b"--abc\r\nContent-Type: application/json\r\n\r\n{\"_id\":\"m\",\"_rev\":\"1-1234\",\"_attachments\":{\"a.txt\":{\"follows\":true,\"content_type\":\"text/plain\",\"length\":5}}}\r\n--abc\r\nContent-Disposition: attachment; filename=\"a.txt\"\r\n\r\nhello\r\n--abc--";
    let r = n.raw(
        "PUT",
        "/db/m?new_edits=false",
        &[("Content-Type", "multipart/related; boundary=\"abc\"")],
        Some(body),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(n.get("/db/m/a.txt").body, b"hello");
    // open_revs as multipart/mixed carries the attachment bytes.
    let mm = n.raw(
        "GET",
        "/db/m?open_revs=all",
        &[("Accept", "multipart/mixed")],
        None,
    );
    assert!(mm
        .header("content-type")
        .unwrap()
        .starts_with("multipart/mixed"));
    let t = mm.text();
    assert!(t.contains("\"follows\":true") && t.contains("hello"), "{t}");
    // _bulk_get as multipart/mixed: a nested multipart/related part per revision with
    // attachment bodies, JSON for one without, an error part for a missing one.
    n.put("/db/plain", &json!({"x": 1}));
    let req = json!({"docs": [{"id": "m"}, {"id": "plain"}, {"id": "gone"}]});
    let mm = n.raw(
        "POST",
        "/db/_bulk_get?revs=true&attachments=true",
        &[
            ("Accept", "multipart/mixed"),
            ("Content-Type", "application/json"),
        ],
        Some(req.to_string().as_bytes()),
    );
    assert_eq!(mm.status, 200, "{}", mm.text());
    let parts = mixed_parts(&mm);
    assert_eq!(parts.len(), 3, "{}", mm.text());
    let (h, body) = &parts[0];
    assert!(
        h.contains("X-Doc-Id: m\r\n") && h.contains("X-Rev-Id: 1-1234"),
        "{h}"
    );
    assert!(
        h.contains("Content-Type: multipart/related; boundary="),
        "{h}"
    );
    assert!(body.contains("\"follows\":true") && body.contains("\r\n\r\nhello\r\n"));
    assert!(body.contains("\"_revisions\""), "{body}");
    let (h, body) = &parts[1];
    assert!(
        h.contains("X-Doc-Id: plain") && h.contains("application/json"),
        "{h}"
    );
    assert_eq!(serde_json::from_str::<Value>(body).unwrap()["x"], 1);
    let (h, body) = &parts[2];
    assert!(h.contains("error=\"true\""), "{h}");
    let e: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (e["id"].as_str(), e["error"].as_str()),
        (Some("gone"), Some("not_found"))
    );
}

/// The (headers, body) of each part of a `multipart/mixed` answer.
fn mixed_parts(r: &thali_tests::Resp) -> Vec<(String, String)> {
    let ctype = r.header("content-type").unwrap().to_string();
    assert!(ctype.starts_with("multipart/mixed"), "{ctype}");
    let boundary = ctype.split("boundary=").nth(1).unwrap().trim_matches('"');
    let text = r.text();
    let body = text
        .strip_suffix(&format!("--{boundary}--"))
        .unwrap_or_else(|| panic!("no closing boundary: {text}"));
    body.split(&format!("--{boundary}\r\n"))
        .skip(1)
        .map(|p| {
            let (h, b) = p.split_once("\r\n\r\n").unwrap();
            (h.to_string(), b.trim_end_matches("\r\n").to_string())
        })
        .collect()
}

#[test]
fn local_docs() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    let r = n.put("/db/_local/cp%3D%3D", &json!({"last_seq": 1}));
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["rev"], "0-1");
    assert_eq!(r.json()["id"], "_local/cp==");
    n.put("/db/_local/cp%3D%3D", &json!({"last_seq": 2}))
        .assert_error(409, "conflict");
    assert_eq!(
        n.put(
            "/db/_local/cp%3D%3D",
            &json!({"last_seq": 2, "_rev": "0-1"})
        )
        .json()["rev"],
        "0-2"
    );
    let d = n.get("/db/_local/cp%3D%3D").json();
    assert_eq!(d["last_seq"], 2);
    assert_eq!(d["_rev"], "0-2");
    // Not in _changes, _all_docs or the doc count.
    assert_eq!(n.get("/db/_changes").json()["results"], json!([]));
    assert_eq!(n.get("/db/_all_docs").json()["rows"], json!([]));
    assert_eq!(n.get("/db").json()["doc_count"], 0);
    assert_eq!(
        n.get("/db/_local_docs").json()["rows"][0]["id"],
        "_local/cp=="
    );
    // CouchDB ignores `_attachments` and `_revisions` on `_local` documents (PouchDB's suite),
    // and attachment paths under `_local/` are refused.
    let r = n.put(
        "/db/_local/x",
        &json!({"_attachments": {"a": {"data": ""}}, "_revisions": {"start": 0, "ids": ["1"]}, "k": 1}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let x = n.get("/db/_local/x?attachments=true").json();
    assert_eq!(x["k"], 1);
    assert!(
        x.get("_attachments").is_none() && x.get("_revisions").is_none(),
        "{x}"
    );
    n.get("/db/_local/x/a").assert_error(400, "bad_request");
    let del = n.delete("/db/_local/cp%3D%3D?rev=0-2");
    assert_eq!(del.json()["rev"], "0-0");
    n.get("/db/_local/cp%3D%3D").assert_error(404, "not_found");
    assert_eq!(
        n.put("/db/_local/cp%3D%3D", &json!({})).json()["rev"],
        "0-1"
    );
}

#[test]
fn all_docs_queries() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    let docs: Vec<Value> = ["c", "a", "e", "b", "d"]
        .iter()
        .map(|i| json!({"_id": i, "v": i}))
        .collect();
    n.post("/db/_bulk_docs", &json!({ "docs": docs }));
    let r = n.get("/db/d").json()["_rev"].as_str().unwrap().to_string();
    n.delete(&format!("/db/d?rev={r}"));
    let ids = |v: &Value| -> Vec<String> {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let all = n.get("/db/_all_docs").json();
    assert_eq!(all["total_rows"], 4);
    assert_eq!(ids(&all), ["a", "b", "c", "e"]);
    assert_eq!(
        ids(&n.get("/db/_all_docs?descending=true").json()),
        ["e", "c", "b", "a"]
    );
    assert_eq!(
        ids(&n
            .get("/db/_all_docs?startkey=%22b%22&endkey=%22c%22")
            .json()),
        ["b", "c"]
    );
    assert_eq!(
        ids(&n
            .get("/db/_all_docs?start_key=%22b%22&end_key=%22c%22&inclusive_end=false")
            .json()),
        ["b"]
    );
    assert_eq!(
        ids(&n
            .get("/db/_all_docs?startkey=%22c%22&endkey=%22a%22&descending=true")
            .json()),
        ["c", "b", "a"]
    );
    let page = n.get("/db/_all_docs?limit=2&skip=1").json();
    assert_eq!(ids(&page), ["b", "c"]);
    assert_eq!(page["offset"], 1);
    assert_eq!(ids(&n.get("/db/_all_docs?key=%22e%22").json()), ["e"]);
    let inc = n
        .get("/db/_all_docs?include_docs=true&limit=1&update_seq=true")
        .json();
    assert_eq!(inc["rows"][0]["doc"]["v"], "a");
    assert!(inc["update_seq"].is_number());
    let keys = n
        .post(
            "/db/_all_docs?include_docs=true",
            &json!({"keys": ["e", "d", "zz"]}),
        )
        .json();
    let rows = keys["rows"].as_array().unwrap();
    assert_eq!(rows[0]["doc"]["v"], "e");
    assert_eq!(rows[1]["value"]["deleted"], true);
    assert_eq!(rows[1]["doc"], Value::Null);
    assert_eq!(rows[2]["error"], "not_found");
    let keys = n.get("/db/_all_docs?keys=%5B%22b%22,%22a%22%5D").json();
    assert_eq!(ids(&keys), ["b", "a"]);
}

#[test]
fn changes_feeds() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    for i in 0..5 {
        n.put(&format!("/db/d{i}"), &json!({"i": i}));
    }
    n.put("/db/_design/x", &json!({}));
    let c = n.get("/db/_changes").json();
    assert_eq!(c["results"].as_array().unwrap().len(), 6);
    assert_eq!(c["last_seq"], 6);
    let c = n.get("/db/_changes?since=2&limit=2").json();
    let res = c["results"].as_array().unwrap();
    assert_eq!(res.len(), 2);
    assert_eq!(res[0]["seq"], 3);
    assert_eq!(c["last_seq"], 4);
    assert_eq!(c["pending"], 2);
    let c = n.get("/db/_changes?descending=true&limit=1").json();
    assert_eq!(c["results"][0]["id"], "_design/x");
    let c = n.get("/db/_changes?include_docs=true&since=4").json();
    assert_eq!(c["results"][0]["doc"]["i"], 4);
    assert_eq!(
        n.get("/db/_changes?filter=_design").json()["results"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let c = n
        .post(
            "/db/_changes?filter=_doc_ids",
            &json!({"doc_ids": ["d1", "d3"]}),
        )
        .json();
    assert_eq!(c["results"].as_array().unwrap().len(), 2);
    let c = n
        .get("/db/_changes?filter=_doc_ids&doc_ids=%5B%22d2%22%5D")
        .json();
    assert_eq!(c["results"][0]["id"], "d2");
    // An update moves the document to the end of the feed; style=all_docs lists conflicts.
    n.post("/db/_bulk_docs", &json!({"new_edits": false, "docs": [{"_id": "d0", "_rev": "1-ffffffffffffffffffffffffffffffff"}]}));
    let c = n.get("/db/_changes?since=6&style=all_docs").json();
    assert_eq!(c["results"][0]["id"], "d0");
    assert_eq!(c["results"][0]["changes"].as_array().unwrap().len(), 2);
    assert_eq!(c["results"][0]["seq"], 7);
    let c = n.get("/db/_changes").json();
    assert_eq!(c["results"].as_array().unwrap().len(), 6);
    // Deleted docs are flagged.
    let r = n.get("/db/d1").json()["_rev"].as_str().unwrap().to_string();
    n.delete(&format!("/db/d1?rev={r}"));
    let c = n.get("/db/_changes?since=7").json();
    assert_eq!(c["results"][0]["deleted"], true);

    // since=now returns nothing; longpoll with timeout returns empty results.
    assert_eq!(n.get("/db/_changes?since=now").json()["results"], json!([]));
    let lp = n
        .get("/db/_changes?feed=longpoll&since=now&timeout=300")
        .json();
    assert_eq!(lp["results"], json!([]));
    assert_eq!(lp["last_seq"], 8);
    // longpoll returns as soon as a change arrives.
    let addr = n.addr;
    let t = std::thread::spawn(move || {
        thali_tests::request(
            addr,
            "GET",
            "/db/_changes?feed=longpoll&since=8&heartbeat=100",
            &[("Authorization".into(), thali_tests::admin_auth())],
            None,
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    n.put("/db/late", &json!({}));
    let r = t.join().unwrap();
    let txt = r.text();
    assert!(
        txt.starts_with('\n'),
        "heartbeat newlines expected before the result: {txt:?}"
    );
    let lp: Value = serde_json::from_str(txt.trim()).unwrap();
    assert_eq!(lp["results"][0]["id"], "late");
    // continuous with timeout: one line per change, then last_seq.
    let cont = n
        .get("/db/_changes?feed=continuous&timeout=300&since=7")
        .text();
    let lines: Vec<Value> = cont
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["last_seq"], 9);
    // continuous with limit ends by itself.
    let cont = n.get("/db/_changes?feed=continuous&limit=2").text();
    assert_eq!(cont.lines().count(), 3);
    // eventsource
    let es = n
        .get("/db/_changes?feed=eventsource&timeout=300&since=8")
        .text();
    assert!(es.contains("data: {") && es.contains("id: 9"), "{es}");
}

#[test]
fn security_compaction_ensure_full_commit_and_cors() {
    let dir = TempDir::new("misc");
    let n = Node::start_with(&dir.0, &["--cors-origin", "http://app.example"]);
    n.put("/db", &json!({}));
    assert_eq!(n.get("/db/_security").json(), json!({}));
    let sec = json!({"admins": {"names": ["k1"], "roles": []}, "members": {"names": ["k2"], "roles": []}});
    assert_eq!(n.put("/db/_security", &sec).status, 200);
    assert_eq!(n.get("/db/_security").json(), sec);
    let efc = n.post("/db/_ensure_full_commit", &json!({}));
    assert_eq!(efc.status, 201);
    assert_eq!(efc.json()["instance_start_time"], "0");
    // Compaction drops old revision bodies and unreferenced attachment blobs.
    let rev1 = rev_of(&n.put(
        "/db/d",
        &json!({"big": "x".repeat(10_000), "_attachments": {"a": {"data": "aGVsbG8="}}}),
    ));
    let rev2 = rev_of(&n.put("/db/d", &json!({"_rev": rev1, "small": 1})));
    assert_eq!(n.get(&format!("/db/d?rev={rev1}")).status, 200);
    let c = n.post("/db/_compact", &json!({}));
    assert_eq!(c.status, 202);
    for _ in 0..100 {
        if n.get("/db").json()["compact_running"] == false {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    n.get(&format!("/db/d?rev={rev1}"))
        .assert_error(404, "not_found");
    let info = n.get("/db/d?revs_info=true").json();
    assert_eq!(info["_revs_info"][1]["status"], "missing");
    assert_eq!(info["_rev"], rev2);
    n.get(&format!("/db/d/a?rev={rev1}"))
        .assert_error(404, "not_found");
    // CORS: allowed origin gets headers, others do not; preflight needs no auth.
    let pre = thali_tests::request(
        n.addr,
        "OPTIONS",
        "/db",
        &[
            ("Origin".into(), "http://app.example".into()),
            ("Access-Control-Request-Method".into(), "PUT".into()),
        ],
        None,
    );
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    assert!(pre
        .header("access-control-allow-methods")
        .unwrap()
        .contains("PUT"));
    let r = n.raw("GET", "/db", &[("Origin", "http://app.example")], None);
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let r = n.raw("GET", "/db", &[("Origin", "http://evil.example")], None);
    assert!(r.header("access-control-allow-origin").is_none());
}

#[test]
fn ipv6_loopback_and_clean_shutdown() {
    let dir = TempDir::new("v6");
    let port = thali_tests::free_port();
    let mut n = Node::start_with(&dir.0, &["--http", &format!("[::1]:{port}")]);
    let v6: std::net::SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let r = request(v6, "GET", "/", &[], None);
    assert_eq!(r.status, 200);
    // A live continuous feed does not keep the node from stopping on SIGTERM.
    let addr = n.addr;
    n.put("/db", &json!({}));
    let feed = std::thread::spawn(move || {
        thali_tests::try_request(
            addr,
            "GET",
            "/db/_changes?feed=continuous&heartbeat=200",
            &[("Authorization".into(), thali_tests::admin_auth())],
            None,
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    n.stop();
    let _ = feed.join();
}

#[test]
fn compaction_returns_space_to_the_file_system() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    let mut revs = std::collections::HashMap::new();
    for round in 0..8 {
        let docs: Vec<Value> = (0..40)
            .map(|i| {
                let mut d =
                    json!({"_id": format!("d{i}"), "big": format!("{round}").repeat(20_000)});
                if let Some(r) = revs.get(&i) {
                    d["_rev"] = json!(r);
                }
                d
            })
            .collect();
        let res = n.post("/db/_bulk_docs", &json!({ "docs": docs })).json();
        for (i, r) in res.as_array().unwrap().iter().enumerate() {
            revs.insert(i, r["rev"].as_str().unwrap().to_string());
        }
    }
    let before = n.get("/db").json()["sizes"]["file"].as_u64().unwrap();
    assert_eq!(n.post("/db/_compact", &json!({})).status, 202);
    for _ in 0..200 {
        if n.get("/db").json()["compact_running"] == false {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let info = n.get("/db").json();
    let after = info["sizes"]["file"].as_u64().unwrap();
    // Seven of eight revisions of every body are gone.
    assert!(after * 3 < before, "file size {before} -> {after}");
    assert_eq!(info["doc_count"], 40);
    let d = n.get("/db/d7").json();
    assert_eq!(d["big"].as_str().unwrap().len(), 20_000);
    assert!(d["big"].as_str().unwrap().starts_with('7'));
    // The compacted database keeps working and survives a restart.
    let r = n.put("/db/d7", &json!({"_rev": d["_rev"], "small": true}));
    assert_eq!(r.status, 201);
    let mut n = n;
    n.restart();
    assert_eq!(n.get("/db/d7").json()["small"], true);
    assert_eq!(
        n.get("/db/_changes").json()["results"]
            .as_array()
            .unwrap()
            .len(),
        40
    );
    assert_eq!(n.get("/db").json()["doc_count"], 40);
}

#[test]
fn writes_during_compaction_are_kept() {
    let (_d, n) = node();
    n.put("/db", &json!({}));
    let docs: Vec<Value> = (0..3000)
        .map(|i| json!({"_id": format!("d{i:05}"), "pad": "x".repeat(2000)}))
        .collect();
    let res = n.post("/db/_bulk_docs", &json!({ "docs": docs })).json();
    let mut revs: Vec<String> = res
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rev"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(n.post("/db/_compact", &json!({})).status, 202);
    // Write while the copy runs: updates of copied docs and new docs.
    let mut acked = Vec::new();
    for (i, rev) in revs.iter_mut().enumerate().take(150) {
        let r = n.put(&format!("/db/d{i:05}"), &json!({"_rev": rev, "updated": i}));
        assert_eq!(r.status, 201, "{}", r.text());
        *rev = rev_of(&r);
        acked.push((format!("d{i:05}"), rev.clone()));
        let r = n.put(&format!("/db/new{i}"), &json!({"n": i}));
        acked.push((format!("new{i}"), rev_of(&r)));
    }
    let r = n.put("/db/_local/cp", &json!({"seq": 1}));
    assert_eq!(r.status, 201);
    for _ in 0..400 {
        if n.get("/db").json()["compact_running"] == false {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let check = |n: &Node| {
        for (id, rev) in &acked {
            let d = n.get(&format!("/db/{id}")).json();
            assert_eq!(d["_rev"], rev.as_str(), "{id}");
        }
        let info = n.get("/db").json();
        assert_eq!(info["doc_count"], 3150);
        let ch = n.get("/db/_changes").json();
        assert_eq!(ch["results"].as_array().unwrap().len(), 3150);
        assert_eq!(ch["last_seq"], info["update_seq"]);
        assert_eq!(n.get("/db/_local/cp").json()["seq"], 1);
    };
    check(&n);
    let mut n = n;
    n.restart();
    check(&n);
}

#[test]
fn slow_request_bodies_time_out() {
    let dir = TempDir::new("slow");
    let n = Node::start_with(&dir.0, &["--request-timeout", "1"]);
    n.put("/db", &json!({}));
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(n.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "PUT /db/slow HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"a\":",
        thali_tests::admin_auth()
    );
    s.write_all(head.as_bytes()).unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 512];
    let k = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..k]).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Nothing was written and the node still serves.
    n.get("/db/slow").assert_error(404, "not_found");
    assert_eq!(n.get("/db").json()["doc_count"], 0);
}
