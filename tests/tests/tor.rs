//! Tor end to end, on a private Tor network made from Debian's `tor` (see `tornet`): two nodes,
//! each an onion service, replicate both ways over their `.onion` httpkey URLs.

use serde_json::json;
use std::process::Command;
use thali_tests::tornet::{round, wait_onion, OnionNode, PrivNet};
use thali_tests::{thali_bin, Client};

#[test]
fn onion_nodes_replicate_both_ways_and_keep_their_address() {
    let net = PrivNet::start();
    eprintln!("private Tor network bootstrapped in {:?}", net.bootstrap);
    let r = round(&net).unwrap_or_else(|e| panic!("onion round failed: {e}"));
    eprintln!("onion round: {r:?}");

    // The onion address survives a restart (the key is in DIR/tor/), `thali id` prints it, and
    // `GET /` shows the service's state.
    let mut a = OnionNode::start("onion-restart", &net);
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
