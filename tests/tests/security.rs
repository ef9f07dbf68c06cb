//! Regression tests for the security review (issue 14): each of these failed before the fix.
//! Real nodes on loopback, real peers over mutual TLS, memory read from /proc.

use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};
use thali_node::peer::Identity;
use thali_tests::mesh::replicate;
use thali_tests::{thali_bin, Client, Node, PeerNode, TempDir};

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`), in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Peak resident memory of a process since the last `reset_peak`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    memory(pid, "VmHWM:")
}

fn rss(pid: u32) -> u64 {
    memory(pid, "VmRSS:")
}

/// Resets the peak (`VmHWM`) to the current resident size.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

const MB: u64 = 1 << 20;

#[test]
fn a_validator_that_refuses_everything_stays_removable() {
    let dir = TempDir::new("sec-guard");
    let n = Node::start(&dir.0);
    n.put("/g", &json!({}));
    let ddoc = json!({"language": "lua",
        "validate_doc_update": "function(doc) error({forbidden = 'no writes'}) end"});
    let rev = n.put("/g/_design/guard", &ddoc).json()["rev"]
        .as_str()
        .unwrap()
        .to_string();
    n.put("/g/x", &json!({"a": 1}))
        .assert_error(403, "forbidden");
    // Design documents are not passed to validators: the admin edits and deletes it.
    let rev = n
        .put(
            "/g/_design/guard",
            &json!({"_rev": rev, "language": "lua",
            "validate_doc_update": "function(doc) error({forbidden = 'still no'}) end"}),
        )
        .json()["rev"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(n.delete(&format!("/g/_design/guard?rev={rev}")).status, 200);
    assert_eq!(n.put("/g/x", &json!({"a": 1})).status, 201);
}

#[test]
fn a_backtracking_pattern_is_cut_at_the_time_limit_and_other_writes_go_on() {
    let dir = TempDir::new("sec-pattern");
    let n = Node::start(&dir.0);
    n.put("/p", &json!({}));
    let ddoc = json!({"language": "lua", "validate_doc_update":
        r#"function(doc) if doc.slow then string.find(("a"):rep(200), ("a-"):rep(4).."b") end end"#});
    assert_eq!(n.put("/p/_design/v", &ddoc).status, 201);
    let addr = n.addr;
    let started = Instant::now();
    let slow = std::thread::spawn(move || {
        let body = serde_json::to_vec(&json!({"slow": true})).unwrap();
        let h = vec![("Authorization".to_string(), thali_tests::admin_auth())];
        let r = thali_tests::request(addr, "PUT", "/p/slow", &h, Some(&body));
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    let fast = n.put("/p/fast", &json!({"slow": false}));
    let fast_done = started.elapsed();
    let (slow, slow_done) = slow.join().unwrap();
    eprintln!("backtracking validator answered after {slow_done:?}; the concurrent write after {fast_done:?}");
    assert_eq!(fast.status, 201, "{}", fast.text());
    assert_eq!(slow.status, 500, "{}", slow.text());
    let reason = slow.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("time limit") || reason.contains("CPU limit"),
        "{reason}"
    );
    // Not a speed check: before the fix this took 20 s; anything near that is a hang.
    assert!(slow_done < Duration::from_secs(10) && fast_done < Duration::from_secs(10));
    assert_eq!(n.get("/p/slow").status, 404);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_gzip_bomb_is_refused_without_memory_growth() {
    let dir = TempDir::new("sec-gzip");
    // Multipart parts stream (gunzipped) to disk, so the attachment limit bounds disk, not
    // memory; 256 MiB here so that the bomb is over it.
    let n = Node::start_with(&dir.0, &["--max-attachment-size", "268435456"]);
    n.put("/z", &json!({}));
    // 300 MB of zeros in ~300 KB, over the 256 MiB request and attachment limits.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..300 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 1 << 20);
    let pid = n.child.id();
    reset_peak(pid);
    let before = rss(pid);
    let mut body = b"--b\r\nContent-Type: application/json\r\n\r\n{\"_attachments\":{\"z.bin\":{\"follows\":true,\"content_type\":\"application/octet-stream\"}}}\r\n--b\r\nContent-Disposition: attachment; filename=\"z.bin\"\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
    body.extend_from_slice(&bomb);
    body.extend_from_slice(b"\r\n--b--");
    let r = n.raw(
        "PUT",
        "/z/bomb",
        &[("Content-Type", "multipart/related; boundary=\"b\"")],
        Some(&body),
    );
    r.assert_error(413, "attachment_too_large");
    // The same through inline JSON (`encoding: gzip`, as a replicating peer sends it).
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bomb);
    let r = n.put(
        "/z/bomb2",
        &json!({"_attachments": {"z.bin": {"content_type": "application/octet-stream", "encoding": "gzip", "data": b64}}}),
    );
    r.assert_error(413, "attachment_too_large");
    let growth = peak_rss(pid).saturating_sub(before);
    eprintln!("gzip bomb: peak memory grew by {} MB", growth / MB);
    assert!(growth < 100 * MB, "peak grew by {} MB", growth / MB);
    assert_eq!(n.get("/z/bomb").status, 404);
    // A small gzip attachment still decodes.
    let small = gzip(b"hello hello hello");
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &small);
    let r = n.put(
        "/z/ok",
        &json!({"_attachments": {"t.txt": {"content_type": "text/plain", "encoding": "gzip", "data": b64}}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(n.get("/z/ok/t.txt").text(), "hello hello hello");
}

#[test]
fn a_selector_with_the_smallest_integer_answers_normally() {
    let p = PeerNode::start("sec-mod");
    let n = &p.node;
    n.put("/s", &json!({}));
    let body = br#"{"_id": "min", "n": -9223372036854775808}"#;
    let r = n.raw(
        "PUT",
        "/s/min",
        &[("Content-Type", "application/json")],
        Some(body),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    n.put("/s/other", &json!({"n": 3}));
    let reader = Identity::generate().unwrap();
    n.put(
        "/s/_security",
        &json!({"readers": {"names": [reader.key_id()], "roles": []}}),
    );
    let c = p.client(&reader);
    for _ in 0..3 {
        let r = c.post(
            "/s/_changes?filter=_selector",
            &json!({"selector": {"n": {"$mod": [-1, 0]}}}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let ids: Vec<Value> = r.json()["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].clone())
            .collect();
        assert_eq!(ids, vec![json!("min"), json!("other")]);
    }
    assert_eq!(n.get("/_up").status, 200);
}

#[test]
fn bulk_get_of_a_large_attachment_repeated_stays_small_in_memory() {
    let p = PeerNode::start("sec-bulkget");
    let n = &p.node;
    n.put("/b", &json!({}));
    let att: Vec<u8> = (0..48 * MB as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let r = n.raw(
        "PUT",
        "/b/big/blob.bin",
        &[("Content-Type", "application/octet-stream")],
        Some(&att),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let reader = Identity::generate().unwrap();
    n.put(
        "/b/_security",
        &json!({"readers": {"names": [reader.key_id()], "roles": []}}),
    );
    let c = p.client(&reader);
    let pid = n.child.id();
    std::thread::sleep(Duration::from_millis(500));
    reset_peak(pid);
    let before = rss(pid);
    let req = br#"{"docs":[{"id":"big"},{"id":"big"},{"id":"big"},{"id":"big"}]}"#;
    assert!(req.len() <= 70);
    let r = c.raw(
        "POST",
        "/b/_bulk_get?attachments=true",
        &[("Content-Type", "application/json")],
        Some(req),
    );
    assert_eq!(r.status, 200);
    let growth = peak_rss(pid).saturating_sub(before);
    eprintln!(
        "_bulk_get: {} MB answer, peak memory grew by {} MB",
        r.body.len() as u64 / MB,
        growth / MB
    );
    let v = r.json();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "repeated items are answered once");
    let a = &results[0]["docs"][0]["ok"]["_attachments"]["blob.bin"];
    assert!(a.get("length").is_none(), "no length beside inline data");
    let data = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        a["data"].as_str().unwrap(),
    )
    .unwrap();
    assert!(data == att, "attachment bytes differ");
    assert!(growth < 100 * MB, "peak grew by {} MB", growth / MB);

    // GET with attachments=true and open_revs (JSON and multipart) stream the same bytes.
    let d = n.get("/b/big?attachments=true").json();
    assert_eq!(
        d["_attachments"]["blob.bin"]["data"]
            .as_str()
            .unwrap()
            .len(),
        att.len().div_ceil(3) * 4
    );
    let o = n.get("/b/big?open_revs=all&attachments=true").json();
    assert_eq!(o[0]["ok"]["_id"], "big");
    let m = n.raw(
        "GET",
        "/b/big?open_revs=all",
        &[("Accept", "multipart/mixed")],
        None,
    );
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .unwrap()
        .starts_with("multipart/mixed"));
    assert!(m.body.windows(att.len().min(64)).any(|w| w == &att[..64]));
    assert!(m.body.len() > att.len());

    // Too many items is CouchDB's 413.
    let many: Vec<Value> = (0..10_001)
        .map(|i| json!({"id": format!("d{i}")}))
        .collect();
    c.post("/b/_bulk_get", &json!({ "docs": many }))
        .assert_error(413, "max_bulk_get_count_exceeded");
}

/// Drives a client handshake to its end (and no further: `complete_io` would go on reading).
fn handshake(tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> bool {
    loop {
        while tls.conn.wants_write() {
            if tls.conn.write_tls(&mut tls.sock).is_err() {
                return false;
            }
        }
        if !tls.conn.is_handshaking() {
            return true;
        }
        match tls.conn.read_tls(&mut tls.sock) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if tls.conn.process_new_packets().is_err() {
            return false;
        }
    }
}

/// `n` TCP connections that never start TLS.
fn idle_connections(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect()
}

#[test]
fn idle_and_stranger_connections_do_not_starve_a_known_peer() {
    let (a, b) = (PeerNode::start("sec-conn-a"), PeerNode::start("sec-conn-b"));
    a.node.put("/src", &json!({}));
    let docs: Vec<Value> = (0..300)
        .map(|i| json!({"_id": format!("d{i:04}"), "n": i}))
        .collect();
    assert_eq!(
        a.node
            .post("/src/_bulk_docs", &json!({ "docs": docs }))
            .status,
        201
    );
    // B may only read A's database: it pulls.
    a.node.put(
        "/src/_security",
        &json!({"readers": {"names": [b.key_id()], "roles": []}}),
    );
    let t = Instant::now();
    // Strangers (each its own key, a valid certificate) that finish TLS and then send nothing:
    // before the fix they held every slot for 300 s.
    let strangers: Vec<_> = (0..600)
        .filter_map(|_| {
            let id = Identity::generate().unwrap();
            let cfg = thali_node::peer::tls::client_config(&id, a.key).ok()?;
            let name = rustls::pki_types::ServerName::try_from("thali.peer").ok()?;
            let conn = rustls::ClientConnection::new(cfg, name).ok()?;
            let tcp = TcpStream::connect(("127.0.0.1", a.port)).ok()?;
            tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            handshake(&mut tls).then_some(tls)
        })
        .collect();
    // Then connections that never start TLS.
    let idle = idle_connections(a.port, 600);
    assert!(idle.len() >= 590, "{} connections", idle.len());
    eprintln!(
        "{} idle strangers, {} idle TCP connections after {:?}",
        strangers.len(),
        idle.len(),
        t.elapsed()
    );
    // The known peer's very first request gets through, without retries.
    let direct = b.client_of(&a).try_req("GET", "/src", None);
    assert_eq!(direct.map(|r| r.status).map_err(|e| e.to_string()), Ok(200));
    b.node.put("/dst", &json!({}));
    let res = replicate(&b.node, json!({"source": a.url("src"), "target": "dst"}));
    eprintln!("replicated after {:?}", t.elapsed());
    assert_eq!(res["history"][0]["docs_written"], 300, "{res}");
    assert_eq!(b.node.get("/dst").json()["doc_count"], 300);
    // The checkpoint went to A in B's own `_local` space: a second pull resumes.
    let again = replicate(&b.node, json!({"source": a.url("src"), "target": "dst"}));
    assert_eq!(again["no_changes"], true, "{again}");
    drop(idle);
    drop(strangers);
}

#[test]
fn local_documents_are_bound_to_read_peers() {
    let p = PeerNode::start("sec-local");
    let n = &p.node;
    n.put("/l", &json!({}));
    let (r1, r2, w) = (
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
    );
    n.put(
        "/l/_security",
        &json!({"readers": {"names": [r1.key_id(), r2.key_id()], "roles": []},
                "members": {"names": [w.key_id()], "roles": []}}),
    );
    assert_eq!(
        n.put("/l/_local/chk", &json!({"owner": "admin"})).status,
        201
    );
    let (c1, c2, cw) = (p.client(&r1), p.client(&r2), p.client(&w));
    // A reader sees and writes only its own: the admin's checkpoint is out of reach.
    c1.get("/l/_local/chk").assert_error(404, "not_found");
    c1.req("DELETE", "/l/_local/chk?rev=0-1", None)
        .assert_error(404, "not_found");
    assert_eq!(c1.put("/l/_local/chk", &json!({"owner": "r1"})).status, 201);
    assert_eq!(c1.get("/l/_local/chk").json()["owner"], "r1");
    assert_eq!(c1.get("/l/_local/chk").json()["_id"], "_local/chk");
    c2.get("/l/_local/chk").assert_error(404, "not_found");
    assert_eq!(n.get("/l/_local/chk").json()["owner"], "admin");
    assert_eq!(cw.get("/l/_local/chk").json()["owner"], "admin");
    // Readers' documents are not listed, and are small and few.
    let listed = n.get("/l/_local_docs").json();
    assert_eq!(listed["rows"].as_array().unwrap().len(), 1, "{listed}");
    c1.get("/l/_local_docs").assert_error(403, "forbidden");
    let big = "x".repeat(300_000);
    c1.put("/l/_local/big", &json!({ "b": big }))
        .assert_error(413, "document_too_large");
    for i in 1..64 {
        assert_eq!(
            c1.put(&format!("/l/_local/c{i}"), &json!({})).status,
            201,
            "{i}"
        );
    }
    c1.put("/l/_local/one-more", &json!({}))
        .assert_error(403, "forbidden");
    // Writers reach every `_local` document, as in CouchDB.
    assert_eq!(cw.req("DELETE", "/l/_local/chk?rev=0-1", None).status, 200);
    // No id from outside names the readers' space.
    n.put("/l/_local/%00peer%2Fx", &json!({}))
        .assert_error(400, "illegal_docid");
}

#[test]
fn ids_paths_auth_and_files_are_checked() {
    let dir = TempDir::new("sec-misc");
    let n = Node::start(&dir.0);
    n.put("/d", &json!({}));
    // Document ids are checked on attachment routes too.
    n.raw(
        "PUT",
        "/d/_foo/att",
        &[("Content-Type", "text/plain")],
        Some(b"x"),
    )
    .assert_error(400, "illegal_docid");
    n.raw(
        "PUT",
        "/d/%5Ffoo/att",
        &[("Content-Type", "text/plain")],
        Some(b"x"),
    )
    .assert_error(400, "illegal_docid");
    assert_eq!(n.get("/d").json()["doc_count"], 0);
    // Invalid UTF-8 in a path is a 400, never a replacement character.
    assert_eq!(n.put("/d/%EF%BF%BD", &json!({})).status, 201);
    for path in ["/d/%FF", "/d/%FE", "/d/a%C3"] {
        n.put(path, &json!({})).assert_error(400, "bad_request");
        n.get(path).assert_error(400, "bad_request");
    }
    assert_eq!(n.get("/d").json()["doc_count"], 1);
    // Expansions of input are capped: nesting, and the item counts of bulk requests.
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
    n.raw(
        "PUT",
        "/d/deep",
        &[("Content-Type", "application/json")],
        Some(deep.as_bytes()),
    )
    .assert_error(400, "bad_request");
    let revs: Vec<String> = (0..100_001).map(|i| format!("1-{i:032x}")).collect();
    n.post("/d/_revs_diff", &json!({ "x": revs }))
        .assert_error(413, "too_large");
    // The Basic scheme is case-insensitive.
    let creds = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("admin:{}", thali_tests::PASSWORD),
    );
    for scheme in ["Basic", "basic", "BASIC", "bAsIc"] {
        let h = [("Authorization".to_string(), format!("{scheme} {creds}"))];
        assert_eq!(
            thali_tests::request(n.addr, "GET", "/_all_dbs", &h, None).status,
            200,
            "{scheme}"
        );
    }
    let wrong = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "admin:test-passwordx",
    );
    let h = [("Authorization".to_string(), format!("Basic {wrong}"))];
    assert_eq!(
        thali_tests::request(n.addr, "GET", "/_all_dbs", &h, None).status,
        401
    );
    // Revision ids are those of every other version (golden value).
    assert_eq!(
        n.put("/d/golden", &json!({"a": 1})).json()["rev"],
        "1-13cf90b4667798f88f0f9689b4dda143"
    );
    // The data directory is the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.0.clone()];
    let mut files = 0;
    while let Some(p) = stack.pop() {
        let meta = std::fs::metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
            files += 1;
        }
    }
    assert!(files > 3);
}

#[test]
fn command_output_into_a_closed_pipe_ends_quietly() {
    let dir = TempDir::new("sec-pipe");
    let mut cmd = format!(
        "'{}' id --data '{}'",
        thali_bin().display(),
        dir.0.display()
    );
    for i in 0..3000 {
        cmd.push_str(&format!(" --peer 127.0.0.1:{}", 1000 + i));
    }
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} 2>'{}/err' | head -1", dir.0.display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ed25519:"));
    let err = std::fs::read_to_string(dir.0.join("err")).unwrap();
    assert!(!err.contains("panicked"), "{err}");
}
