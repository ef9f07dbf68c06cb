//! Tor end to end, on a private Tor network made from Debian's `tor` (see `tornet`): two nodes,
//! each an onion service, replicate both ways over their `.onion` httpkey URLs.

use serde_json::json;
use std::process::Command;
use thali_tests::tornet::{replicate_slow, round, wait_onion, OnionNode, PrivNet};
use thali_tests::{thali_bin, Client};

/// One network for every part: it takes ~30 s to bootstrap and 8 tor processes on 2 cores.
#[test]
fn tor_end_to_end() {
    thali_tests::require!(thali_tests::needs::Need::Tor);
    let net = PrivNet::start();
    eprintln!("private Tor network bootstrapped in {:?}", net.bootstrap);
    onion_nodes_replicate_both_ways_and_keep_their_address(&net);
    restricted_discovery_hides_the_service_from_unknown_peers(&net);
    an_invite_over_tor_pairs_and_syncs(&net);
}

/// `thali invite --via tor` puts the onion URL in the invite; joining dials it through arti and
/// the pair syncs over Tor. Prints the figures of the closing note.
fn an_invite_over_tor_pairs_and_syncs(net: &PrivNet) {
    use std::time::{Duration, Instant};
    let a = OnionNode::start("inv-tor-a", net);
    let b = OnionNode::start("inv-tor-b", net);
    let inv = a.node.post(
        "/_thali/invites",
        &json!({"db": "trip", "via": "tor", "name": "ann"}),
    );
    assert_eq!(inv.status, 200, "{}", inv.text());
    let uri = inv.json()["uri"].as_str().unwrap().to_string();
    assert!(uri.contains(".onion%3A6984"), "{uri}");
    assert_eq!(a.node.put("/trip", &json!({})).status, 201);
    assert_eq!(a.node.put("/trip/first", &json!({"v": 1})).status, 201);
    let started = Instant::now();
    let body = serde_json::to_vec(&json!({ "invite": uri })).unwrap();
    let r = thali_tests::try_request_within(
        b.node.addr,
        "POST",
        "/_thali/join",
        &[
            ("Authorization".into(), thali_tests::admin_auth()),
            ("Content-Type".into(), "application/json".into()),
        ],
        Some(&body),
        Duration::from_secs(300),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let joined = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    while b.node.get("/trip/first").status != 200 {
        assert!(
            Instant::now() < deadline,
            "the document did not arrive over Tor"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "invite over Tor: join answered after {:.1} s, first document replicated {:.1} s after join",
        joined.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    // And back, through the joiner's push replication.
    assert_eq!(b.node.put("/trip/second", &json!({"v": 2})).status, 201);
    let deadline = Instant::now() + Duration::from_secs(300);
    while a.node.get("/trip/second").status != 200 {
        assert!(
            Instant::now() < deadline,
            "the push over Tor did not arrive"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn onion_nodes_replicate_both_ways_and_keep_their_address(net: &PrivNet) {
    let r = round(net).unwrap_or_else(|e| panic!("onion round failed: {e}"));
    eprintln!("onion round: {r:?}");

    // The onion address survives a restart (the key is in DIR/tor/), `thali id` prints it, and
    // `GET /` shows the service's state.
    let mut a = OnionNode::start("onion-restart", net);
    let before = a.onion_url.clone();
    assert!(before.starts_with("httpkey://") && before.contains(".onion:6984/ed25519:"));
    let host = before["httpkey://".len()..].split(':').next().unwrap();
    assert_eq!(host.len(), 56 + ".onion".len(), "{host}");
    let status = a.tor_status();
    for field in [
        "state",
        "onion",
        "port",
        "bootstrap",
        "bootstrapped_after_s",
    ] {
        assert!(!status[field].is_null(), "{field} missing in {status}");
    }
    a.node.stop();
    let id = Command::new(thali_bin())
        .args(["id", "--data"])
        .arg(&a.dir.0)
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&id.stdout);
    assert!(id.contains(&before), "thali id while stopped: {id}");
    a.node.restart();
    assert_eq!(wait_onion(&a.node).1, before);

    // A node without --tor refuses onion URLs with a clear error, never resolving them.
    let dir = thali_tests::TempDir::new("no-tor");
    let plain = thali_tests::Node::start(&dir.0);
    let r = plain.post(
        "/_replicate",
        &json!({"source": format!("{before}db"), "target": "x", "create_target": true}),
    );
    assert!(r.status >= 400, "{}", r.text());
    assert!(r.text().contains("--tor"), "{}", r.text());
}

/// Restricted discovery: a service publishes its descriptor only for the peers some `_security`
/// names; any other node cannot even find it, until it is named.
fn restricted_discovery_hides_the_service_from_unknown_peers(net: &PrivNet) {
    let a = OnionNode::start_with("rd-a", net, &["--tor-restricted"]);
    let b = OnionNode::start("rd-b", net);
    let c = OnionNode::start("rd-c", net);
    a.allow("private", &b);
    assert_eq!(
        a.node.put("/private/doc", &json!({"secret": 1})).status,
        201
    );
    let listed = |n: u64| {
        thali_tests::mesh::wait_until("the service relaunched with the new key list", || {
            a.tor_status()["restricted_discovery"].as_u64() == Some(n)
        })
    };
    listed(2); // A itself and B
    let pull = |who: &OnionNode, retries: u32| {
        let t = std::time::Instant::now();
        let r = replicate_slow(
            &who.node,
            &json!({"source": a.onion("private"), "target": "copy", "create_target": true,
                    "retries_per_request": retries, "max_attempts": 1}),
        );
        eprintln!(
            "pull with {retries} retries: HTTP {} in {:?}",
            r.status,
            t.elapsed()
        );
        r
    };
    let r = pull(&b, 25);
    assert_eq!(
        r.status,
        200,
        "B is listed and should reach A: {}",
        r.text()
    );
    assert_eq!(r.json()["history"][0]["docs_written"], 1);

    // C is not listed: it cannot fetch (decrypt) A's descriptor.
    let r = pull(&c, 3);
    assert!(
        r.status >= 400,
        "C is not listed but reached A: {}",
        r.text()
    );
    eprintln!("unlisted peer: {} {}", r.status, r.text());

    // Named in a _security, C can find the service (and read, as a member).
    a.allow_all("private", &[&b, &c]);
    listed(3);
    let r = pull(&c, 25);
    assert_eq!(r.status, 200, "C is listed now: {}", r.text());
    assert_eq!(r.json()["history"][0]["docs_written"], 1);
}
