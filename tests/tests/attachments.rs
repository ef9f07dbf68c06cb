//! Attachments of any size with bounded memory, against the real binary: a 1 GiB body
//! (generated on the fly, never in the test's memory either) uploaded as a standalone
//! attachment, read back whole and by `Range`, its digest compared, the node's peak resident
//! memory sampled throughout; an upload cut in the middle stores nothing; chunked bodies inline
//! as base64 and through compaction.

use base64::Engine;
use serde_json::Value;
use std::time::{Duration, Instant};
use thali_tests::blobs::{download, generated, hang_up, start_upload, upload, RssSampler};
use thali_tests::servers::rss_bytes;
use thali_tests::{Client, Node, TempDir};

#[test]
fn one_gigabyte_attachment_with_bounded_memory() {
    const SIZE: u64 = 1 << 30;
    let dir = TempDir::new("att-big");
    let n = Node::start(&dir.0);
    assert_eq!(n.req("PUT", "/media", None).status, 201);
    // Idle after a first request on each path, so lazily built state is counted in "idle".
    assert_eq!(n.put("/media/warm", &serde_json::json!({})).status, 201);
    std::thread::sleep(Duration::from_millis(500));
    let pid = n.child.id();
    let idle = rss_bytes(pid);
    let sampler = RssSampler::start(pid);

    let started = Instant::now();
    let (r, digest) = upload(&n, "/media/video/movie.mp4", SIZE);
    assert_eq!(r.status, 201, "{}", r.text());
    let rev = r.json()["rev"].as_str().unwrap().to_string();
    let up = started.elapsed();

    let doc = n.get("/media/video").json();
    let att = &doc["_attachments"]["movie.mp4"];
    assert_eq!(att["digest"], Value::String(digest.clone()), "{doc}");
    assert_eq!(att["length"], SIZE);
    assert_eq!(att["content_type"], "video/mp4");
    assert_eq!(doc["_rev"], Value::String(rev));

    // Ranges: the middle, a suffix, an open end.
    for (range, start, len) in [
        ("bytes=500000000-500000999", 500_000_000u64, 1000usize),
        ("bytes=-100", SIZE - 100, 100),
        (
            &format!("bytes={}-", SIZE - 300_000) as &str,
            SIZE - 300_000,
            300_000,
        ),
    ] {
        let r = n.raw("GET", "/media/video/movie.mp4", &[("Range", range)], None);
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {}-{}/{SIZE}", start, start + len as u64 - 1).as_str())
        );
        assert!(r.body == generated(start, len), "wrong bytes for {range}");
    }

    let started = Instant::now();
    let (status, length, total, got) = download(&n, "/media/video/movie.mp4");
    let down = started.elapsed();
    assert_eq!((status, length, total), (200, Some(SIZE), SIZE));
    assert_eq!(
        got, digest,
        "downloaded bytes differ from the uploaded ones"
    );

    let peak = sampler.peak();
    drop(sampler);
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "1 GiB attachment: upload {:.1} s ({:.0} MB/s), download {:.1} s ({:.0} MB/s); RSS idle \
         {:.1} MB, peak {:.1} MB ({:.1} MB above idle)",
        up.as_secs_f64(),
        mb(SIZE) / up.as_secs_f64(),
        down.as_secs_f64(),
        mb(SIZE) / down.as_secs_f64(),
        mb(idle),
        mb(peak),
        mb(peak.saturating_sub(idle))
    );
    assert!(
        peak.saturating_sub(idle) < 150 << 20,
        "peak RSS {:.1} MB is more than 150 MB above idle ({:.1} MB)",
        mb(peak),
        mb(idle)
    );
}

#[test]
fn a_cut_upload_stores_nothing_and_a_retry_works() {
    let dir = TempDir::new("att-cut");
    let n = Node::start(&dir.0);
    assert_eq!(n.req("PUT", "/db", None).status, 201);
    let before = dir_size(&dir.0);
    let seq_before = n.get("/db").json()["update_seq"].clone();
    // Announce 64 MiB, send 8 MiB, hang up.
    let (s, _) = start_upload(&n, "/db/doc/part.bin", 64 << 20, 8 << 20);
    // Once the node has dealt with the short body, it has written no revision.
    hang_up(s);
    let r = n.get("/db/doc");
    assert_eq!(r.status, 404, "a cut upload wrote a revision: {}", r.text());
    let info = n.get("/db").json();
    assert_eq!(info["doc_count"], 0);
    assert_eq!(info["update_seq"], seq_before);
    // The clean retry.
    let (r, digest) = upload(&n, "/db/doc/part.bin", 8 << 20);
    assert_eq!(r.status, 201, "{}", r.text());
    let (status, _, total, got) = download(&n, "/db/doc/part.bin");
    assert_eq!((status, total, got), (200, 8 << 20, digest));
    // The cut upload's chunks went again: compaction leaves about one copy of the body.
    assert_eq!(n.post("/db/_compact", &serde_json::json!({})).status, 202);
    thali_tests::mesh::wait_until("compaction", || {
        n.get("/db").json()["compact_running"] == false
    });
    let after = dir_size(&dir.0);
    println!(
        "store grew by {:.1} MB for an 8 MiB body",
        (after.saturating_sub(before)) as f64 / 1e6
    );
}

fn dir_size(p: &std::path::Path) -> u64 {
    thali_tests::servers::dir_bytes(p)
}

#[test]
fn chunked_bodies_inline_in_json_and_through_compaction() {
    let dir = TempDir::new("att-inline");
    let n = Node::start(&dir.0);
    assert_eq!(n.req("PUT", "/db", None).status, 201);
    // Not a multiple of 3 nor of the chunk size: base64 carries bytes across chunks.
    let len = 700_001u64;
    let (r, digest) = upload(&n, "/db/doc/blob.bin", len);
    assert_eq!(r.status, 201, "{}", r.text());
    let check = |n: &Node| {
        let d = n.get("/db/doc?attachments=true").json();
        let a = &d["_attachments"]["blob.bin"];
        assert_eq!(a["digest"], Value::String(digest.clone()));
        assert!(
            a.get("length").is_none(),
            "CouchDB sends no length beside data: {a}"
        );
        let data = base64::engine::general_purpose::STANDARD
            .decode(a["data"].as_str().unwrap())
            .unwrap();
        assert!(data == generated(0, len as usize), "inline data differs");
        let (status, _, total, got) = download(n, "/db/doc/blob.bin");
        assert_eq!((status, total, got.as_str()), (200, len, digest.as_str()));
    };
    check(&n);
    // A second revision keeps the attachment as a stub; compaction copies the chunks.
    let d = n.get("/db/doc").json();
    let mut d2 = d.clone();
    d2["title"] = "second".into();
    assert_eq!(n.put("/db/doc", &d2).status, 201);
    assert_eq!(n.post("/db/_compact", &serde_json::json!({})).status, 202);
    thali_tests::mesh::wait_until("compaction", || {
        n.get("/db").json()["compact_running"] == false
    });
    check(&n);
}

/// A `multipart/related` document body: the JSON, then each (name, bytes) part.
fn related(boundary: &str, doc: &Value, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out =
        format!("--{boundary}\r\nContent-Type: application/json\r\n\r\n{doc}\r\n").into_bytes();
    for (name, bytes) in parts {
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                bytes.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--").as_bytes());
    out
}

fn md5_digest(b: &[u8]) -> String {
    use md5::{Digest, Md5};
    format!(
        "md5-{}",
        base64::engine::general_purpose::STANDARD.encode(Md5::digest(b))
    )
}

#[test]
fn multipart_documents_stream_in_and_out_and_bad_ones_store_nothing() {
    use std::io::Write;
    let dir = TempDir::new("att-multipart");
    let n = Node::start(&dir.0);
    assert_eq!(n.req("PUT", "/db", None).status, 201);
    let ctype = [("Content-Type", "multipart/related; boundary=\"bnd\"")];
    let big = generated(0, 3 << 20);
    let small = b"hello".to_vec();
    // A replicated revision with two attachments, one large (chunked in the store).
    let doc = serde_json::json!({
        "_id": "m", "_rev": "2-bbb", "_revisions": {"start": 2, "ids": ["bbb", "aaa"]},
        "title": "multipart",
        "_attachments": {
            "big.bin": {"follows": true, "content_type": "application/octet-stream",
                        "length": big.len(), "digest": md5_digest(&big), "revpos": 1},
            "small.txt": {"follows": true, "content_type": "text/plain",
                          "length": small.len(), "revpos": 2}
        }
    });
    let body = related("bnd", &doc, &[("big.bin", &big), ("small.txt", &small)]);
    let r = n.raw("PUT", "/db/m?new_edits=false", &ctype, Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    let got = n.get("/db/m").json();
    assert_eq!(got["_rev"], "2-bbb");
    assert_eq!(got["_attachments"]["big.bin"]["revpos"], 1, "{got}");
    assert_eq!(
        got["_attachments"]["big.bin"]["digest"],
        Value::String(md5_digest(&big))
    );
    assert_eq!(got["_attachments"]["small.txt"]["length"], 5);
    let (status, _, total, digest) = download(&n, "/db/m/big.bin");
    assert_eq!(
        (status, total, digest),
        (200, big.len() as u64, md5_digest(&big))
    );

    // Read back as multipart/related: the JSON first, then the bodies in order.
    let r = n.raw(
        "GET",
        "/db/m?attachments=true",
        &[("Accept", "multipart/related")],
        None,
    );
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap().to_string();
    assert!(ct.starts_with("multipart/related"), "{ct}");
    let text_start = String::from_utf8_lossy(&r.body[..400]).to_string();
    assert!(text_start.contains("\"follows\":true"), "{text_start}");
    assert!(
        r.body
            .windows(big.len().min(4096))
            .any(|w| w == &big[..4096]),
        "the large body is not in the multipart answer"
    );
    assert!(r.body.windows(5).any(|w| w == b"hello"));

    // A body that does not match its digest is refused and stores nothing.
    let seq = n.get("/db").json()["update_seq"].clone();
    let mut bad = doc.clone();
    bad["_id"] = "bad".into();
    let mut corrupt = big.clone();
    corrupt[1_000_000] ^= 1;
    let body = related("bnd", &bad, &[("big.bin", &corrupt), ("small.txt", &small)]);
    let r = n.raw("PUT", "/db/bad?new_edits=false", &ctype, Some(&body));
    r.assert_error(400, "bad_request");
    // A length that does not match.
    let body = related(
        "bnd",
        &bad,
        &[("big.bin", &big[..1000]), ("small.txt", &small)],
    );
    let r = n.raw("PUT", "/db/bad?new_edits=false", &ctype, Some(&body));
    r.assert_error(400, "bad_request");
    // More parts than attachments that follow.
    let body = related(
        "bnd",
        &bad,
        &[("big.bin", &big), ("small.txt", &small), ("x", b"x")],
    );
    let r = n.raw("PUT", "/db/bad?new_edits=false", &ctype, Some(&body));
    r.assert_error(400, "bad_request");
    // A body cut in the middle of the large part.
    let body = related("bnd", &bad, &[("big.bin", &big), ("small.txt", &small)]);
    let mut s = std::net::TcpStream::connect(n.addr).unwrap();
    let head = format!(
        "PUT /db/bad?new_edits=false HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\
         Content-Type: multipart/related; boundary=\"bnd\"\r\nContent-Length: {}\r\n\r\n",
        thali_tests::admin_auth(),
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body[..2 << 20]).unwrap();
    hang_up(s);
    assert_eq!(n.get("/db/bad").status, 404);
    assert_eq!(n.get("/db").json()["update_seq"], seq);

    // A gzip-compressed part (CouchDB's replicator sends stored-compressed ones so).
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&big).unwrap();
    let gz = gz.finish().unwrap();
    let doc = serde_json::json!({
        "_id": "z",
        "_attachments": {"big.bin": {"follows": true, "content_type": "text/plain",
                                     "encoding": "gzip", "length": big.len()}}
    });
    let body = related("bnd", &doc, &[("big.bin", &gz)]);
    let r = n.raw("PUT", "/db/z", &ctype, Some(&body));
    assert_eq!(r.status, 201, "{}", r.text());
    let (status, _, total, digest) = download(&n, "/db/z/big.bin");
    assert_eq!(
        (status, total, digest),
        (200, big.len() as u64, md5_digest(&big))
    );
}
