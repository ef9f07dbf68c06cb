//! `/_session` cookies on the loopback API: JSON and form logins, the cookie as a credential,
//! tampering, logout, and peers refused; and the dashboard's page and event stream.

use serde_json::{json, Value};
use thali_node::peer::Identity;
use thali_tests::{request, Client, PeerNode, PASSWORD};

fn login(n: &PeerNode, ctype: &str, body: &[u8]) -> thali_tests::Resp {
    request(
        n.node.addr,
        "POST",
        "/_session",
        &[("Content-Type".into(), ctype.into())],
        Some(body),
    )
}

fn cookie_of(r: &thali_tests::Resp) -> String {
    let h = r.header("set-cookie").expect("a Set-Cookie header");
    assert!(h.contains("HttpOnly") && h.contains("Path=/"), "{h}");
    h.split(';').next().unwrap().to_string()
}

fn with_cookie(n: &PeerNode, path: &str, cookie: &str) -> thali_tests::Resp {
    request(
        n.node.addr,
        "GET",
        path,
        &[("Cookie".into(), cookie.into())],
        None,
    )
}

#[test]
fn session_cookies() {
    let n = PeerNode::start("session");
    // Wrong password, wrong user: 401 and no cookie.
    let body = json!({"name": "admin", "password": "nope"}).to_string();
    let r = login(&n, "application/json", body.as_bytes());
    r.assert_error(401, "unauthorized");
    assert!(r.header("set-cookie").is_none());
    let body = json!({"name": "root", "password": PASSWORD}).to_string();
    login(&n, "application/json", body.as_bytes()).assert_error(401, "unauthorized");

    // JSON login: the cookie is a credential for admin routes.
    let body = json!({"name": "admin", "password": PASSWORD}).to_string();
    let r = login(&n, "application/json", body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["roles"], json!(["_admin"]));
    let c = cookie_of(&r);
    assert_eq!(with_cookie(&n, "/_all_dbs", &c).status, 200);
    let s = with_cookie(&n, "/_session", &c).json();
    assert_eq!(s["userCtx"]["name"], "admin");
    // Form login, as CouchDB's Fauxton and PouchDB's auth plugin send it.
    let r = login(
        &n,
        "application/x-www-form-urlencoded",
        format!("name=admin&password={PASSWORD}").as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // A tampered cookie is nobody.
    let (k, v) = c.split_once('=').unwrap();
    let mut bytes = v.as_bytes().to_vec();
    let i = bytes.len() / 2;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    let bad = format!("{k}={}", String::from_utf8(bytes).unwrap());
    assert_eq!(with_cookie(&n, "/_all_dbs", &bad).status, 401);
    assert_eq!(with_cookie(&n, "/_all_dbs", "AuthSession=").status, 401);

    // Logout clears the cookie.
    let r = request(
        n.node.addr,
        "DELETE",
        "/_session",
        &[("Cookie".into(), c.clone())],
        None,
    );
    assert_eq!(r.status, 200);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));

    // Peers are their keys: they may not test the admin password on the peer listener.
    let peer = n.client(&Identity::generate().unwrap());
    let r = peer.req(
        "POST",
        "/_session",
        Some(&json!({"name": "admin", "password": PASSWORD})),
    );
    r.assert_error(403, "forbidden");
    // And a cookie sent over the peer listener changes nothing.
    let r = peer.raw("GET", "/_all_dbs", &[("Cookie", &c)], None);
    assert_eq!(r.status, 403);
}

#[test]
fn the_dashboard_page_and_its_events() {
    let n = PeerNode::start("dashboard");
    let page = request(n.node.addr, "GET", "/_thali/", &[], None);
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("EventSource('/_thali/events')"));
    // The stream is the admin's.
    let anon = request(n.node.addr, "GET", "/_thali/events?once=true", &[], None);
    assert_eq!(anon.status, 401);
    assert_eq!(n.node.put("/shown", &json!({})).status, 201);
    let r = n.node.get("/_thali/events?once=true");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let data = r
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .expect("one snapshot");
    let s: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(s["node"]["key"], n.key_id());
    assert!(s["node"]["qr_svg"].as_str().unwrap().contains("<svg"));
    assert!(s["dbs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["name"] == "shown"));
    assert!(s["counters"]["requests"].as_u64().unwrap() >= 1);
}
