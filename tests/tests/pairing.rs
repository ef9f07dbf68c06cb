//! Pairing by invite between real nodes over mutual TLS on loopback: the invite grants both
//! ways and starts replication; wrong, replayed, expired and revoked invites grant nothing;
//! failed attempts are rate-limited; a removed peer loses its access and its replications; the
//! CLI (`thali invite`, `thali join`, `thali peer list|remove`) drives the same API.

use serde_json::{json, Value};
use std::process::Command;
use thali_node::peer::Identity;
use thali_tests::mesh::wait_until;
use thali_tests::{pairing_at, thali_bin, Client, PeerNode, PASSWORD};

fn invite(n: &PeerNode, body: Value) -> Value {
    let r = n.node.post("/_thali/invites", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn join(n: &PeerNode, uri: &Value) -> thali_tests::Resp {
    n.node.post("/_thali/join", &json!({ "invite": uri }))
}

fn secret_of(uri: &str) -> String {
    uri.split("secret=").nth(1).unwrap()[..32].to_string()
}

fn level_of(n: &PeerNode, db: &str, key: &str) -> Option<&'static str> {
    let sec = n.node.get(&format!("/{db}/_security")).json();
    for (section, level) in [
        ("admins", "admin"),
        ("members", "write"),
        ("readers", "read"),
    ] {
        if sec[section]["names"]
            .as_array()
            .is_some_and(|a| a.iter().any(|k| k == key))
        {
            return Some(level);
        }
    }
    None
}

#[test]
fn an_invite_pairs_both_ways_and_syncs() {
    let a = PeerNode::start("pair-a");
    let b = PeerNode::start("pair-b");
    let inv = invite(&a, json!({"db": "notes", "level": "write", "name": "ann"}));
    assert!(inv["uri"]
        .as_str()
        .unwrap()
        .starts_with("thali:join?url=httpkey"));
    assert_eq!(a.node.get("/_thali/invites").json()[0]["status"], "open");

    assert_eq!(a.node.put("/notes", &json!({})).status, 201);
    assert_eq!(a.node.put("/notes/from-a", &json!({"v": 1})).status, 201);
    let started = std::time::Instant::now();
    let r = join(&b, &inv["uri"]);
    assert_eq!(r.status, 200, "{}", r.text());
    let joined = started.elapsed();
    wait_until("the inviter's document on the joiner", || {
        b.node.get("/notes/from-a").status == 200
    });
    eprintln!(
        "invite over TCP: join answered after {:.3} s, first document replicated {:.3} s after join",
        joined.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let j = r.json();
    assert_eq!(j["name"], "ann");
    assert_eq!(j["key"], a.key_id());
    assert_eq!(j["replications"].as_array().unwrap().len(), 2);
    assert_eq!(level_of(&a, "notes", &b.key_id()), Some("write"));
    assert_eq!(level_of(&b, "notes", &a.key_id()), Some("write"));

    // Both directions flow through the joiner's continuous replications.
    assert_eq!(b.node.put("/notes/from-b", &json!({"v": 2})).status, 201);
    wait_until("both documents on both nodes", || {
        [&a, &b].iter().all(|n| {
            n.node.get("/notes/from-a").status == 200 && n.node.get("/notes/from-b").status == 200
        })
    });

    // Each side lists the other by name with its level.
    let pa = a.node.get("/_thali/paired").json();
    assert_eq!(pa[0]["key"], b.key_id());
    assert_eq!(pa[0]["dbs"]["notes"], "write");
    let pb = b.node.get("/_thali/paired").json();
    assert_eq!(pb[0]["name"], "ann");
    assert_eq!(pb[0]["dbs"]["notes"], "write");
    assert_eq!(pb[0]["replications"].as_array().unwrap().len(), 2);
    assert_eq!(a.node.get("/_thali/invites").json()[0]["status"], "used");

    // Replayed by the same node or by a third one: refused, nothing granted.
    let r = join(&b, &inv["uri"]);
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("already used"), "{}", r.text());
    let c = PeerNode::start("pair-c");
    join(&c, &inv["uri"]).assert_error(403, "forbidden");
    assert_eq!(level_of(&a, "notes", &c.key_id()), None);
    assert_eq!(c.node.get("/notes").status, 404);

    // Removing the peer revokes it and stops the replications pairing made.
    let r = b.node.delete("/_thali/paired/ann");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["revoked"], json!(["notes"]));
    assert_eq!(level_of(&b, "notes", &a.key_id()), None);
    for id in j["replications"].as_array().unwrap() {
        let id = id.as_str().unwrap();
        assert_eq!(b.node.get(&format!("/_replicator/{id}")).status, 404);
    }
    assert_eq!(b.node.get("/_thali/paired").json(), json!([]));
    // a's key now gets nothing on b.
    let r = a.client_of(&b).req("GET", "/notes", None);
    assert_eq!(r.status, 403, "{}", r.text());
    b.node
        .delete("/_thali/paired/ann")
        .assert_error(404, "not_found");
}

#[test]
fn wrong_expired_and_revoked_invites_grant_nothing() {
    let a = PeerNode::start("pair-bad-a");
    let b = PeerNode::start("pair-bad-b");

    // A wrong secret.
    let inv = invite(&a, json!({"db": "d1"}));
    let uri = inv["uri"].as_str().unwrap();
    let s = secret_of(uri);
    let flipped = if &s[31..] == "0" { "1" } else { "0" };
    let wrong = uri.replace(&s, &format!("{}{flipped}", &s[..31]));
    assert_ne!(wrong, uri);
    let r = join(&b, &json!(wrong));
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("no such invite"), "{}", r.text());
    assert_eq!(level_of(&a, "d1", &b.key_id()), None);

    // An expired one.
    let inv = invite(&a, json!({"db": "d2", "expires": 1}));
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = join(&b, &inv["uri"]);
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("expired"), "{}", r.text());
    assert_eq!(a.node.get("/d2").status, 404);

    // A revoked one.
    let inv = invite(&a, json!({"db": "d3", "expires": "1h"}));
    let id = inv["id"].as_str().unwrap();
    assert_eq!(a.node.delete(&format!("/_thali/invites/{id}")).status, 200);
    join(&b, &inv["uri"]).assert_error(403, "forbidden");
    assert_eq!(a.node.get("/d3").status, 404);
    assert_eq!(b.node.get("/_thali/paired").json(), json!([]));
    assert_eq!(a.node.get("/_thali/paired").json(), json!([]));
    let statuses: Vec<Value> = a
        .node
        .get("/_thali/invites")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        vec![json!("open"), json!("expired"), json!("revoked")]
    );

    // Guessing is slowed down: after five failures a key is refused for a while, even with the
    // right secret, and other keys are not.
    let inv = invite(&a, json!({"db": "d4"}));
    let good = secret_of(inv["uri"].as_str().unwrap());
    let guesser = a.client(&Identity::generate().unwrap());
    for _ in 0..5 {
        let r = guesser.req(
            "POST",
            "/_thali/accept",
            Some(&json!({"secret": "00".repeat(16)})),
        );
        r.assert_error(403, "forbidden");
    }
    let r = guesser.req("POST", "/_thali/accept", Some(&json!({ "secret": good })));
    r.assert_error(429, "too_many_requests");
    let honest = Identity::generate().unwrap();
    let r = a
        .client(&honest)
        .req("POST", "/_thali/accept", Some(&json!({ "secret": good })));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(level_of(&a, "d4", &honest.key_id()), Some("write"));

    // Bad requests get CouchDB-shaped errors.
    a.node
        .post("/_thali/invites", &json!({"db": "Bad"}))
        .assert_error(400, "illegal_database_name");
    a.node
        .post("/_thali/invites", &json!({"db": "x", "level": "owner"}))
        .assert_error(400, "bad_request");
    a.node
        .post("/_thali/invites", &json!({"db": "x", "expires": "1y"}))
        .assert_error(400, "bad_request");
    a.node
        .post("/_thali/invites", &json!({"db": "x", "via": "tor"}))
        .assert_error(400, "bad_request");
    a.node
        .post("/_thali/join", &json!({"invite": "thali:join?url=x"}))
        .assert_error(400, "bad_request");
    a.node
        .post("/_thali/accept", &json!({ "secret": good }))
        .assert_error(400, "bad_request");
    let anon = thali_tests::request(a.node.addr, "POST", "/_thali/invites", &[], None);
    assert_eq!(anon.status, 401);
    // A peer cannot make invites or list them.
    let r = a
        .client(&honest)
        .req("POST", "/_thali/invites", Some(&json!({"db": "x"})));
    r.assert_error(403, "forbidden");
}

fn cli(args: &[&str]) -> String {
    let out = Command::new(thali_bin())
        .args(args)
        .env("THALI_ADMIN_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "thali {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_cli_invites_joins_lists_and_removes() {
    let a = PeerNode::start("pair-cli-a");
    let b = PeerNode::start("pair-cli-b");
    let (na, nb) = (a.node.addr.to_string(), b.node.addr.to_string());
    let out = cli(&[
        "invite",
        "--db",
        "photos",
        "--level",
        "read",
        "--expires",
        "10m",
        "--name",
        "desk",
        "--node",
        &na,
    ]);
    let uri = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("thali join '"))
        .expect("the join command")
        .trim_end_matches('\'')
        .to_string();
    // The QR code is drawn with half blocks.
    assert!(out.contains('▀') || out.contains('▄'), "{out}");
    assert!(cli(&["invite", "list", "--node", &na]).contains("\topen\tphotos\tread"));

    let out = cli(&["join", &uri, "--as", "laptop", "--node", &nb]);
    assert!(out.contains("paired with desk"), "{out}");
    assert_eq!(level_of(&a, "photos", &b.key_id()), Some("read"));
    assert_eq!(level_of(&b, "photos", &a.key_id()), Some("read"));
    let list = cli(&["peer", "list", "--node", &na]);
    assert!(
        list.contains(&format!("laptop\t{}\tphotos:read", b.key_id())),
        "{list}"
    );
    let list = cli(&["peer", "list", "--node", &nb]);
    assert!(
        list.contains(&format!("desk\t{}\tphotos:read", a.key_id())),
        "{list}"
    );

    // A replayed invite fails with the inviter's reason.
    let out = Command::new(thali_bin())
        .args(["join", &uri, "--node", &nb])
        .env("THALI_ADMIN_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already used"));

    let out = cli(&["peer", "remove", "laptop", "--node", &na]);
    assert!(out.contains("access revoked on photos"), "{out}");
    assert_eq!(level_of(&a, "photos", &b.key_id()), None);
}

fn pairing(n: &PeerNode, body: Value) -> thali_tests::Resp {
    pairing_at(n.node.addr, &body)
}

/// The node's own URL without a database.
fn base_url(n: &PeerNode) -> String {
    format!("httpkey://127.0.0.1:{}/{}/", n.port, n.key_id())
}

/// `host` waits in a thread; the answer arrives once a guest's code is there.
fn wait_in_thread(host: &PeerNode, timeout: u64) -> std::thread::JoinHandle<thali_tests::Resp> {
    let addr = host.node.addr;
    std::thread::spawn(move || pairing_at(addr, &json!({"action": "wait", "timeout": timeout})))
}

/// Until `host` is waiting (its window is open): a throwaway key starts a session there and
/// cancels it.
fn until_waiting(host: &PeerNode) {
    let probe = host.client(&Identity::generate().unwrap());
    wait_until("the host's window", || {
        let start = json!({"step": "start", "db": "zz-probe", "commitment": "00".repeat(32)});
        let r = probe.req("POST", "/_thali/pair", Some(&start));
        if r.status != 200 {
            return false;
        }
        let cancel = json!({"step": "cancel", "session": r.json()["session"]});
        assert_eq!(probe.req("POST", "/_thali/pair", Some(&cancel)).status, 200);
        true
    });
}

#[test]
fn pairing_by_code_needs_both_users_and_the_right_keys() {
    let a = PeerNode::start("code-a");
    let b = PeerNode::start("code-b");

    // Nobody waiting: refused.
    let r = pairing(
        &a,
        json!({"action": "start", "with": base_url(&b), "db": "shared"}),
    );
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("not waiting"), "{}", r.text());

    // Both users confirm the same code: paired, granted both ways, syncing.
    let waiting = wait_in_thread(&b, 60);
    until_waiting(&b);
    let started = pairing(
        &a,
        json!({"action": "start", "with": base_url(&b), "db": "shared"}),
    );
    assert_eq!(started.status, 200, "{}", started.text());
    let shown = waiting.join().unwrap();
    assert_eq!(shown.status, 200, "{}", shown.text());
    let (sa, sb) = (started.json(), shown.json());
    assert_eq!(sa["code"], sb["code"]);
    assert_eq!(sa["code"].as_str().unwrap().len(), 6);
    assert_eq!(sb["key"], a.key_id());
    assert_eq!(sb["db"], "shared");
    let baddr = b.node.addr;
    let bs = sb["session"].clone();
    let decided = std::thread::spawn(move || {
        pairing_at(
            baddr,
            &json!({"action": "decide", "session": bs, "confirm": true}),
        )
    });
    let confirmed = pairing(
        &a,
        json!({"action": "confirm", "session": sa["session"], "as_name": "desk"}),
    );
    assert_eq!(confirmed.status, 200, "{}", confirmed.text());
    let d = decided.join().unwrap();
    assert_eq!(d.status, 200, "{}", d.text());
    assert_eq!(d.json()["paired"], true);
    assert_eq!(level_of(&a, "shared", &b.key_id()), Some("write"));
    assert_eq!(level_of(&b, "shared", &a.key_id()), Some("write"));
    assert_eq!(b.node.get("/_thali/paired").json()[0]["name"], "desk");
    assert_eq!(b.node.put("/shared/doc", &json!({"v": 1})).status, 201);
    wait_until("b's document on a", || {
        a.node.get("/shared/doc").status == 200
    });

    // The host's user declines: nothing granted on either side.
    let c = PeerNode::start("code-c");
    let waiting = wait_in_thread(&b, 60);
    until_waiting(&b);
    let started = pairing(
        &c,
        json!({"action": "start", "with": base_url(&b), "db": "other"}),
    );
    assert_eq!(started.status, 200, "{}", started.text());
    let shown = waiting.join().unwrap().json();
    // A third key cannot take over the session; starting its own leaves this one alone (a
    // window is not owned by whoever asks first).
    let d = b.client(&Identity::generate().unwrap());
    let r = d.req(
        "POST",
        "/_thali/pair",
        Some(&json!({"step": "confirm", "session": shown["session"]})),
    );
    r.assert_error(404, "not_found");
    let r = d.req(
        "POST",
        "/_thali/pair",
        Some(&json!({"step": "start", "db": "other", "commitment": "00".repeat(32)})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.json()["session"], shown["session"]);
    let r = pairing(
        &b,
        json!({"action": "decide", "session": shown["session"], "confirm": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["paired"], false);
    let r = pairing(
        &c,
        json!({"action": "confirm", "session": started.json()["session"]}),
    );
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("declined"), "{}", r.text());
    assert_eq!(b.node.get("/other").status, 404);
    assert_eq!(c.node.get("/other").status, 404);
    assert_eq!(c.node.get("/_thali/paired").json(), json!([]));

    // A guest whose revealed value does not match its commitment gets nothing.
    let bkey = b.key;
    let cheat = loop {
        let id = Identity::generate().unwrap();
        if id.public_key().as_slice() < bkey.as_slice() {
            break id; // the smaller key commits first
        }
    };
    let waiting = wait_in_thread(&b, 5);
    until_waiting(&b);
    let cl = b.client(&cheat);
    let r = cl.req(
        "POST",
        "/_thali/pair",
        Some(&json!({"step": "start", "db": "x", "commitment": "11".repeat(32)})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let s = r.json()["session"].clone();
    let r = cl.req(
        "POST",
        "/_thali/pair",
        Some(&json!({"step": "reveal", "session": s, "nonce": "22".repeat(16)})),
    );
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("commitment"), "{}", r.text());
    let r = cl.req(
        "POST",
        "/_thali/pair",
        Some(&json!({"step": "confirm", "session": s})),
    );
    r.assert_error(403, "forbidden");
    waiting.join().unwrap().assert_error(408, "request_timeout");
    assert_eq!(b.node.get("/x").status, 404);

    // A window nobody uses closes by itself.
    pairing(&b, json!({"action": "wait", "timeout": 1})).assert_error(408, "request_timeout");
}
