//! Identity, mutual TLS and per-database permissions, with real TLS connections on loopback.

use serde_json::{json, Value};
use thali_node::peer::Identity;
use thali_tests::{free_port, node_identity, Client, Node, PeerClient, PeerNode, TempDir};

fn status(r: &thali_tests::Resp) -> u16 {
    r.status
}

#[test]
fn permissions_per_key_and_database() {
    let p = PeerNode::start("perm");
    let n = &p.node;
    n.put("/shared", &json!({}));
    n.put("/other", &json!({}));
    let rev = n.put("/shared/doc", &json!({"v": 1})).json()["rev"]
        .as_str()
        .unwrap()
        .to_string();
    let (w, r, u, a) = (
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
    );
    let sec = json!({
        "admins": {"names": [a.key_id()], "roles": []},
        "members": {"names": [w.key_id()], "roles": []},
        "readers": {"names": [r.key_id()], "roles": []},
    });
    assert_eq!(n.put("/shared/_security", &sec).status, 200);
    let (cw, cr, cu, ca) = (p.client(&w), p.client(&r), p.client(&u), p.client(&a));

    // A write key reads and writes documents, but not design documents or _security.
    assert_eq!(cw.get("/shared/doc").json()["v"], 1);
    let wrev = cw.put("/shared/doc", &json!({"v": 2, "_rev": rev})).json()["rev"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(cw.post("/shared", &json!({"by": "w"})).status, 201);
    assert_eq!(
        status(&cw.post("/shared/_bulk_docs", &json!({"docs": [{"_id": "b1"}]}))),
        201
    );
    let mixed = cw
        .post(
            "/shared/_bulk_docs",
            &json!({"docs": [{"_id": "b2"}, {"_id": "_design/x"}]}),
        )
        .json();
    assert_eq!(mixed[0]["ok"], true);
    assert_eq!(mixed[1]["error"], "forbidden");
    assert_eq!(mixed[1]["id"], "_design/x");
    cw.put("/shared/_design/x", &json!({}))
        .assert_error(403, "forbidden");
    cw.put("/shared/_design%2Fx", &json!({}))
        .assert_error(403, "forbidden");
    cw.put("/shared/_security", &json!({}))
        .assert_error(403, "forbidden");
    cw.req("DELETE", "/shared", None)
        .assert_error(403, "forbidden");
    cw.put("/newdb", &json!({})).assert_error(403, "forbidden");
    cw.get("/other").assert_error(403, "forbidden");
    cw.get("/_all_dbs").assert_error(403, "forbidden");
    // The key is the principal: its userCtx names it.
    assert_eq!(cw.get("/_session").json()["userCtx"]["name"], w.key_id());

    // A read key can do everything a pulling replicator needs...
    assert_eq!(cr.get("/shared").status, 200);
    assert_eq!(cr.get("/shared/doc").json()["_rev"], wrev);
    assert_eq!(cr.get("/shared/_changes?style=all_docs").status, 200);
    assert_eq!(cr.get("/shared/_all_docs").status, 200);
    assert_eq!(
        cr.post(
            "/shared/_bulk_get?revs=true",
            &json!({"docs": [{"id": "doc"}]})
        )
        .status,
        200
    );
    assert_eq!(
        cr.post("/shared/_revs_diff", &json!({"doc": ["9-a"]}))
            .status,
        200
    );
    assert_eq!(
        cr.put("/shared/_local/checkpoint", &json!({"last_seq": 1}))
            .status,
        201
    );
    assert_eq!(cr.get("/shared/_local/checkpoint").status, 200);
    assert_eq!(
        cr.post("/shared/_ensure_full_commit", &json!({})).status,
        201
    );
    // ...and every write path answers 403.
    cr.put("/shared/doc", &json!({"_rev": wrev}))
        .assert_error(403, "forbidden");
    cr.post("/shared", &json!({}))
        .assert_error(403, "forbidden");
    cr.req("DELETE", &format!("/shared/doc?rev={wrev}"), None)
        .assert_error(403, "forbidden");
    cr.post("/shared/_bulk_docs", &json!({"docs": [{}]}))
        .assert_error(403, "forbidden");
    cr.put(&format!("/shared/doc/att?rev={wrev}"), &json!("x"))
        .assert_error(403, "forbidden");
    cr.req("DELETE", &format!("/shared/doc/att?rev={wrev}"), None)
        .assert_error(403, "forbidden");
    cr.put("/shared/_design/x", &json!({}))
        .assert_error(403, "forbidden");
    cr.put("/shared/_security", &json!({}))
        .assert_error(403, "forbidden");
    cr.get("/shared/_security").assert_error(403, "forbidden");
    cr.req("COPY", "/shared/doc", None)
        .assert_error(403, "forbidden");

    // An unknown key may only read GET /.
    assert_eq!(cu.get("/").status, 200);
    assert_eq!(cu.get("/").json()["couchdb"], "Welcome");
    for path in [
        "/shared",
        "/shared/doc",
        "/shared/_changes",
        "/shared/_all_docs",
        "/missing-db",
        "/_all_dbs",
        "/_up",
        "/_uuids",
    ] {
        let r = cu.get(path);
        assert!(r.status == 401 || r.status == 403, "{path}: {}", r.status);
        assert!(r.json()["reason"].is_string());
    }
    cu.put("/shared/x", &json!({}))
        .assert_error(403, "forbidden");
    cu.put("/mine", &json!({})).assert_error(403, "forbidden");
    // Peers cannot pose as the admin with basic auth: the certificate decides.
    let h = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("admin:{}", thali_tests::PASSWORD)
        )
    );
    let _ = h; // (the peer client sends no Authorization; the listener ignores it anyway)

    // An admin key writes design documents and _security.
    assert_eq!(
        ca.put("/shared/_design/app", &json!({"language": "lua"}))
            .status,
        201
    );
    assert_eq!(ca.get("/shared/_security").status, 200);

    // Removing a key from _security takes effect at once.
    let mut sec2 = sec.clone();
    sec2["readers"]["names"] = json!([]);
    assert_eq!(n.put("/shared/_security", &sec2).status, 200);
    cr.get("/shared/doc").assert_error(403, "forbidden");
    assert_eq!(cw.get("/shared/doc").status, 200);

    // The loopback listener still requires the admin password.
    thali_tests::request(n.addr, "GET", "/shared", &[], None).assert_error(401, "unauthorized");
}

/// A client configuration pinning `key`, before choosing its client certificate.
fn pinning(
    key: [u8; 32],
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    rustls::ClientConfig::builder_with_provider(thali_node::peer::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(
            thali_node::peer::tls::PinnedServer { expected: key },
        ))
}

#[test]
fn handshake_refusals() {
    let p = PeerNode::start("hs");
    let id = Identity::generate().unwrap();
    // A correct client completes the handshake.
    assert_eq!(p.client(&id).get("/").status, 200);

    // No client certificate: the handshake fails.
    let cfg = pinning(p.key).with_no_client_auth();
    let no_cert = PeerClient {
        config: std::sync::Arc::new(cfg),
        addr: format!("127.0.0.1:{}", p.port).parse().unwrap(),
    };
    assert!(
        no_cert.try_req("GET", "/", None).is_err(),
        "a client without a certificate got an answer"
    );

    // A certificate that is not self-signed (signed by another key) is refused.
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let leaf = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let cfg = pinning(p.key)
        .with_client_auth_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
                leaf_key.serialize_der(),
            )),
        )
        .unwrap();
    let chained = PeerClient {
        config: std::sync::Arc::new(cfg),
        addr: no_cert.addr,
    };
    assert!(
        chained.try_req("GET", "/", None).is_err(),
        "a CA-signed client certificate was accepted"
    );
    // The unit check gives the reason.
    let why =
        thali_node::peer::tls::self_signed_key(leaf.der(), rustls::pki_types::UnixTime::now())
            .unwrap_err();
    assert!(
        why.contains("not self-signed") || why.contains("own key"),
        "{why}"
    );

    // A client pinning another key refuses the server, saying why.
    let wrong = *Identity::generate().unwrap().public_key();
    let c = PeerClient::new(&id, wrong, no_cert.addr);
    let err = c.try_req("GET", "/", None).unwrap_err().to_string();
    assert!(err.contains("does not match the pinned key"), "{err}");

    // The async dialer (for the replicator) pins the same way and carries a request.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = thali_node::peer::HttpKeyUrl::parse(&p.url("x")).unwrap();
    let dialer = thali_node::peer::Dialer::new(std::sync::Arc::new(id), None);
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = dialer
            .httpkey(&url, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        assert!(String::from_utf8_lossy(&out).contains("Welcome"));
        let mut bad = url.clone();
        bad.key = thali_node::peer::PeerKey::Ed25519(wrong);
        let e = dialer
            .httpkey(&bad, std::time::Duration::from_secs(5))
            .await
            .err()
            .expect("a wrong pinned key must fail");
        assert!(e.contains("does not match the pinned key"), "{e}");
    });
}

#[test]
fn identity_survives_restart_and_cli_manages_peers() {
    let mut p = PeerNode::start("cli");
    let data = p.node.data.clone();
    let out = std::process::Command::new(thali_tests::thali_bin())
        .args(["id", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let key_id = thali_node::peer::key_id(&p.key);
    assert_eq!(text.lines().next().unwrap(), key_id);
    assert!(
        text.contains(&format!("httpkey://127.0.0.1:{}/{key_id}/", p.port)),
        "{text}"
    );
    p.node.restart();
    assert_eq!(*node_identity(&data).public_key(), p.key);

    p.node.put("/notes", &json!({}));
    let friend = Identity::generate().unwrap();
    let peer_cmd = |args: &[&str]| {
        let o = std::process::Command::new(thali_tests::thali_bin())
            .arg("peer")
            .args(args)
            .arg("--data")
            .arg(&data)
            .args(["--node", &p.node.addr.to_string()])
            .env("THALI_ADMIN_PASSWORD", thali_tests::PASSWORD)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let c = p.client(&friend);
    c.get("/notes").assert_error(403, "forbidden");
    let (ok, msg) = peer_cmd(&[
        "allow",
        &friend.key_id(),
        "--db",
        "notes",
        "--level",
        "read",
    ]);
    assert!(ok, "{msg}");
    assert_eq!(c.get("/notes").status, 200);
    c.put("/notes/x", &json!({})).assert_error(403, "forbidden");
    let (ok, msg) = peer_cmd(&[
        "allow",
        &friend.key_id(),
        "--db",
        "notes",
        "--level",
        "write",
    ]);
    assert!(ok, "{msg}");
    assert_eq!(c.put("/notes/x", &json!({})).status, 201);
    let (ok, list) = peer_cmd(&["list", "--db", "notes"]);
    assert!(
        ok && list.contains(&format!("write\t{}", friend.key_id())),
        "{list}"
    );
    let (ok, msg) = peer_cmd(&["deny", &friend.key_id(), "--db", "notes"]);
    assert!(ok, "{msg}");
    c.get("/notes").assert_error(403, "forbidden");
    // Bad input gets a clear error.
    let (ok, msg) = peer_cmd(&["allow", "ed25519:nope", "--db", "notes"]);
    assert!(!ok && msg.contains("52"), "{msg}");
    let (ok, msg) = peer_cmd(&[
        "allow",
        &friend.key_id(),
        "--db",
        "notes",
        "--level",
        "owner",
    ]);
    assert!(!ok && msg.contains("read, write or admin"), "{msg}");
}

/// A small replicator over httpkey URLs: the CouchDB protocol steps, with mutual TLS on both
/// ends and the replicating key's permissions deciding what it may do.
fn replicate(id: &Identity, src_url: &str, dst_url: &str) -> usize {
    let (src, dst) = (
        PeerClient::for_url(id, src_url),
        PeerClient::for_url(id, dst_url),
    );
    let sdb = thali_node::peer::HttpKeyUrl::parse(src_url).unwrap().path();
    let ddb = thali_node::peer::HttpKeyUrl::parse(dst_url).unwrap().path();
    let cp_id = format!("_local/test-{}", thali_node::db::random_hex(4));
    let changes = src.get(&format!("{sdb}/_changes?style=all_docs")).json();
    let mut diff_req = serde_json::Map::new();
    for row in changes["results"].as_array().unwrap() {
        let revs: Vec<Value> = row["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["rev"].clone())
            .collect();
        diff_req.insert(row["id"].as_str().unwrap().to_string(), json!(revs));
    }
    let diff = dst
        .post(&format!("{ddb}/_revs_diff"), &Value::Object(diff_req))
        .json();
    let mut wanted = Vec::new();
    for (id, d) in diff.as_object().unwrap() {
        for rev in d["missing"].as_array().unwrap() {
            wanted.push(json!({"id": id, "rev": rev}));
        }
    }
    if wanted.is_empty() {
        return 0;
    }
    let got = src
        .post(
            &format!("{sdb}/_bulk_get?revs=true&latest=true"),
            &json!({ "docs": wanted }),
        )
        .json();
    let docs: Vec<Value> = got["results"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["docs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["ok"].clone())
        })
        .collect();
    let n = docs.len();
    let w = dst.post(
        &format!("{ddb}/_bulk_docs"),
        &json!({"docs": docs, "new_edits": false}),
    );
    assert_eq!(w.status, 201);
    assert_eq!(w.json(), json!([]), "write errors");
    // Checkpoints on both sides, as replicators keep them.
    let cp = json!({"last_seq": changes["last_seq"]});
    assert_eq!(src.put(&format!("{sdb}/{cp_id}"), &cp).status, 201);
    assert_eq!(dst.put(&format!("{ddb}/{cp_id}"), &cp).status, 201);
    n
}

#[test]
fn two_nodes_replicate_over_httpkey_urls() {
    let (a, b) = (PeerNode::start("ra"), PeerNode::start("rb"));
    let repl = Identity::generate().unwrap();
    for (p, db) in [(&a, "left"), (&b, "right")] {
        p.node.put(&format!("/{db}"), &json!({}));
        let sec = json!({"members": {"names": [repl.key_id()], "roles": []}});
        assert_eq!(p.node.put(&format!("/{db}/_security"), &sec).status, 200);
    }
    for i in 0..20 {
        a.node.put(&format!("/left/d{i}"), &json!({"i": i}));
    }
    let (ua, ub) = (a.url("left"), b.url("right"));
    assert_eq!(replicate(&repl, &ua, &ub), 20);
    assert_eq!(b.node.get("/right").json()["doc_count"], 20);
    // Edit the same document on both sides, replicate both ways: both converge.
    let r = a.node.get("/left/d3").json()["_rev"]
        .as_str()
        .unwrap()
        .to_string();
    a.node.put("/left/d3", &json!({"_rev": r, "side": "a"}));
    b.node.put("/right/d3", &json!({"_rev": r, "side": "b"}));
    replicate(&repl, &ua, &ub);
    replicate(&repl, &ub, &ua);
    let da = a.node.get("/left/d3?conflicts=true").json();
    let db_ = b.node.get("/right/d3?conflicts=true").json();
    assert_eq!(da["_rev"], db_["_rev"]);
    assert_eq!(da["side"], db_["side"]);
    assert_eq!(da["_conflicts"], db_["_conflicts"]);
    assert_eq!(da["_conflicts"].as_array().unwrap().len(), 1);
    // Nothing more to send.
    assert_eq!(replicate(&repl, &ua, &ub), 0);
    // A key with read only on the target cannot push.
    let reader = Identity::generate().unwrap();
    b.node.put(
        "/right/_security",
        &json!({"readers": {"names": [reader.key_id()]}}),
    );
    let dst = PeerClient::for_url(&reader, &ub);
    dst.post(
        "/right/_bulk_docs",
        &json!({"docs": [], "new_edits": false}),
    )
    .assert_error(403, "forbidden");
}

#[test]
fn peer_connections_are_capped() {
    let dir = TempDir::new("cap");
    let port = free_port();
    // 8 connections: one for keys no `_security` names, seven for known ones.
    let node = Node::start_with(
        &dir.0,
        &[
            "--peer",
            &format!("127.0.0.1:{port}"),
            "--max-peer-connections",
            "8",
        ],
    );
    let key = *node_identity(&dir.0).public_key();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (s1, s2, known) = (
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
    );
    node.put("/db", &json!({}));
    node.put(
        "/db/_security",
        &json!({"readers": {"names": [known.key_id()], "roles": []}}),
    );
    let (c1, c2, ck) = (
        PeerClient::new(&s1, key, addr),
        PeerClient::new(&s2, key, addr),
        PeerClient::new(&known, key, addr),
    );
    let open = |client: &PeerClient| -> std::io::Result<
        rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    > {
        let name = rustls::pki_types::ServerName::try_from("thali.peer").unwrap();
        let conn = rustls::ClientConnection::new(client.config.clone(), name)
            .map_err(std::io::Error::other)?;
        let tcp = std::net::TcpStream::connect(client.addr)?;
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(s)
    };
    let mut held = open(&c1).unwrap();
    // Give the server a moment to count it.
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The strangers' single slot is taken: a second stranger replaces the first (so stalled
    // strangers never keep a real guest out), whose connection the node closes.
    let r = c2
        .try_req("GET", "/", None)
        .expect("the newer stranger is served");
    assert_eq!(r.status, 200);
    let mut buf = [0u8; 64];
    let closed = match std::io::Read::read(&mut held, &mut buf) {
        Ok(0) | Err(_) => true,
        Ok(_) => false,
    };
    assert!(closed, "the older stranger kept its slot");
    // A key some `_security` names has slots of its own.
    assert_eq!(ck.get("/db").status, 200);
    drop(held);
    // The slot is usable again.
    let mut ok = false;
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if c2.try_req("GET", "/", None).is_ok_and(|r| r.status == 200) {
            ok = true;
            break;
        }
    }
    assert!(ok, "no connection accepted after one was closed");
}
