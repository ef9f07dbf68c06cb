//! Pairing against hostile parties, between real nodes on loopback: an inviter that names a
//! system database or answers with another level than its invite, strangers that send huge or
//! stalled bodies, and a hundred throw-away keys (from other loopback addresses) that spend
//! failure budgets and squat on a code-pairing window while a real join and a real code
//! pairing go through.

use serde_json::{json, Value};
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thali_node::peer::Identity;
use thali_tests::mesh::wait_until;
use thali_tests::servers::rss_bytes;
use thali_tests::{pairing_at, read_response, Client, PeerNode};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn level_of(n: &PeerNode, db: &str, key: &str) -> Option<&'static str> {
    let sec = n.node.get(&format!("/{db}/_security")).json();
    [
        ("admins", "admin"),
        ("members", "write"),
        ("readers", "read"),
    ]
    .into_iter()
    .find(|(section, _)| {
        sec[*section]["names"]
            .as_array()
            .is_some_and(|a| a.iter().any(|k| k == key))
    })
    .map(|(_, l)| l)
}

/// A TCP connection to `127.0.0.1:port` from the loopback address `src`.
fn tcp_from(src: IpAddr, port: u16) -> std::io::Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(src, 0))?;
        sock.connect(SocketAddr::from(([127, 0, 0, 1], port))).await
    })?;
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// Where a node's peer listener is and the key it must show.
#[derive(Clone, Copy)]
struct Listener {
    port: u16,
    key: [u8; 32],
}

fn listener(n: &PeerNode) -> Listener {
    Listener {
        port: n.port,
        key: n.key,
    }
}

/// A mutual-TLS connection to `node` from `src` as a fresh key.
fn stranger(node: Listener, src: IpAddr) -> std::io::Result<Tls> {
    let id = Identity::generate().unwrap();
    let cfg = thali_node::peer::tls::client_config(&id, node.key).unwrap();
    let name = rustls::pki_types::ServerName::try_from("thali.peer").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp_from(src, node.port)?);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// One JSON POST on `tls`: the status (0 when the connection failed).
fn post(tls: &mut Tls, path: &str, body: &Value) -> u16 {
    let b = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: thali\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    );
    if tls.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    read_response(&mut BufReader::new(tls), false).map_or(0, |r| r.status)
}

#[test]
fn pairing_never_touches_system_databases() {
    let a = PeerNode::start("sys-a");
    let b = PeerNode::start("sys-b");
    // The inviter refuses to make such an invite.
    for db in ["_replicator", "_users", "_dbs", "_global_changes"] {
        let r = a.node.post("/_thali/invites", &json!({ "db": db }));
        assert!(
            r.status == 403 || r.status == 400,
            "an invite for {db}: {}",
            r.text()
        );
        assert!(r.json()["reason"].is_string());
    }
    // A joiner refuses an invite that names one, before dialing (the invite stays unused).
    let inv = a
        .node
        .post("/_thali/invites", &json!({"db": "notes"}))
        .json();
    let uri = inv["uri"]
        .as_str()
        .unwrap()
        .replace("db=notes", "db=_replicator");
    let r = b.node.post("/_thali/join", &json!({ "invite": uri }));
    r.assert_error(400, "bad_request");
    assert!(r.text().contains("system database"), "{}", r.text());
    assert_eq!(a.node.get("/_thali/invites").json()[0]["status"], "open");
    for (n, other) in [(&a, &b), (&b, &a)] {
        let _ = n.node.put("/_replicator", &json!({}));
        assert_eq!(level_of(n, "_replicator", &other.key_id()), None);
        assert_eq!(n.node.get("/_thali/paired").json(), json!([]));
    }
    // Code pairing refuses them on both sides too.
    let r = b.node.post(
        "/_thali/pairing",
        &json!({"action": "start", "with": format!("httpkey://127.0.0.1:{}/{}/", a.port, a.key_id()), "db": "_users"}),
    );
    r.assert_error(403, "forbidden");
    let host = a.client(&Identity::generate().unwrap());
    let r = host.req(
        "POST",
        "/_thali/pair",
        Some(&json!({"step": "start", "db": "_replicator", "commitment": "00".repeat(32)})),
    );
    r.assert_error(403, "forbidden");
}

/// A fake inviter: a mutual-TLS server with its own key that answers every request with
/// `answer` (called with the request's body).
fn fake_inviter(
    id: Identity,
    answer: impl Fn(&str) -> Vec<u8> + Send + 'static,
) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cfg = thali_node::peer::tls::server_config(&id).unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut r = BufReader::new(&mut tls);
            let mut head = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            count.fetch_add(1, Ordering::SeqCst);
            let out = answer(&String::from_utf8_lossy(&body));
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                out.len()
            );
            let _ = tls.write_all(resp.as_bytes());
            for c in out.chunks(1 << 16) {
                if tls.write_all(c).is_err() {
                    break;
                }
            }
            let _ = tls.flush();
        }
    });
    (port, served)
}

fn invite_for(port: u16, key: &str, db: &str, level: &str) -> String {
    format!(
        "thali:join?url=httpkey%3A%2F%2F127.0.0.1%3A{port}%2F{}%2F&db={db}&level={level}&secret={}&from=evil",
        key.replace(':', "%3A"),
        "ab".repeat(16)
    )
}

#[test]
fn the_joiner_grants_the_invites_level_whatever_the_inviter_answers() {
    let b = PeerNode::start("hostile-inviter-b");

    // An answer that claims admin for a read invite: read is granted.
    let evil = Identity::generate().unwrap();
    let key = evil.key_id();
    let k = key.clone();
    let (port, _) = fake_inviter(evil, move |_| {
        json!({"ok": true, "key": k, "db": "shared", "level": "admin", "name": "evil"})
            .to_string()
            .into_bytes()
    });
    let r = b.node.post(
        "/_thali/join",
        &json!({"invite": invite_for(port, &key, "shared", "read"), "replicate": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["level"], "read");
    assert_eq!(level_of(&b, "shared", &key), Some("read"));

    // A 60 MB answer that is not an object: refused after reading a few KiB, nothing granted.
    let evil = Identity::generate().unwrap();
    let key = evil.key_id();
    let (port, _) = fake_inviter(evil, |_| {
        let mut big = b"\"".to_vec();
        big.resize(60 << 20, b'x');
        big.push(b'"');
        big
    });
    let before = rss_bytes(b.node.child.id());
    let r = b.node.post(
        "/_thali/join",
        &json!({"invite": invite_for(port, &key, "big", "write"), "replicate": false}),
    );
    r.assert_error(502, "bad_gateway");
    let grown = rss_bytes(b.node.child.id()).saturating_sub(before);
    assert!(grown < 30 << 20, "the joiner's RSS grew {grown} bytes");
    assert_eq!(b.node.get("/big").status, 404);

    // A small answer that is not an acceptance of this invite: nothing granted.
    for answer in [
        json!([1, 2, 3]),
        json!({"ok": false}),
        json!({"ok": true, "key": "ed25519:someone-else", "db": "other"}),
        json!({"ok": true, "db": "elsewhere"}),
    ] {
        let evil = Identity::generate().unwrap();
        let key = evil.key_id();
        let a = answer.clone();
        let (port, served) = fake_inviter(evil, move |_| a.to_string().into_bytes());
        let r = b.node.post(
            "/_thali/join",
            &json!({"invite": invite_for(port, &key, "other", "write"), "replicate": false}),
        );
        r.assert_error(502, "bad_gateway");
        assert_eq!(served.load(Ordering::SeqCst), 1, "{answer}");
        let _ = b.node.put("/other", &json!({}));
        assert_eq!(level_of(&b, "other", &key), None, "{answer}");
    }
    assert_eq!(
        b.node
            .get("/_thali/paired")
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Four other loopback addresses: what a hundred throw-away keys would come from.
fn attacker_addr(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 2 + (i % 4) as u8])
}

/// 64 strangers, each streaming a 200 MB body to a pairing route (chunked, so nothing says how
/// large until it arrives) until `stop`: the bytes each got out.
fn stream_bodies(node: Listener, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<usize>> {
    (0..64)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let Ok(mut s) = stranger(node, attacker_addr(i)) else {
                    return 0usize;
                };
                let path = if i % 2 == 0 { "/_thali/accept" } else { "/_thali/pair" };
                let head = format!(
                    "POST {path} HTTP/1.1\r\nHost: thali\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                );
                if s.write_all(head.as_bytes()).is_err() {
                    return 0;
                }
                let chunk = format!("10000\r\n{}\r\n", "x".repeat(1 << 16));
                let mut sent = 0usize;
                while sent < 200 << 20 && !stop.load(Ordering::Relaxed) {
                    if s.write_all(chunk.as_bytes()).is_err() {
                        break;
                    }
                    sent += 1 << 16;
                }
                sent
            })
        })
        .collect()
}

/// 64 strangers that announce a 200 MB body and stall after a few bytes.
fn stall_bodies(node: Listener) -> Vec<Tls> {
    (0..64)
        .filter_map(|i| {
            let mut s = stranger(node, attacker_addr(i)).ok()?;
            let head = "POST /_thali/accept HTTP/1.1\r\nHost: thali\r\nContent-Type: application/json\r\nContent-Length: 209715200\r\n\r\n{\"secret\":";
            let _ = s.write_all(head.as_bytes());
            Some(s)
        })
        .collect()
}

/// A hundred throw-away keys guess invite secrets and squat on the code window: how many
/// guesses were refused with 429.
fn misbehave(node: Listener, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    let stop = stop.clone();
    std::thread::spawn(move || {
        let mut refused = 0;
        for i in 0..100 {
            let Ok(mut s) = stranger(node, attacker_addr(i)) else {
                continue;
            };
            for _ in 0..3 {
                let st = post(
                    &mut s,
                    "/_thali/accept",
                    &json!({"secret": "00".repeat(16)}),
                );
                refused += usize::from(st == 429);
            }
            post(
                &mut s,
                "/_thali/pair",
                &json!({"step": "start", "db": "squat", "commitment": "00".repeat(32), "name": "not you"}),
            );
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        refused
    })
}

/// The host waits for a guest, and its user says yes only to the device named `name` (the
/// one in front of them), no to every other: the answer to that decision.
fn host_accepting(
    addr: SocketAddr,
    name: &'static str,
) -> std::thread::JoinHandle<thali_tests::Resp> {
    std::thread::spawn(move || loop {
        let r = pairing_at(addr, &json!({"action": "wait", "timeout": 120}));
        if r.status != 200 {
            return r;
        }
        let v = r.json();
        let yes = v["name"] == name;
        let d = pairing_at(
            addr,
            &json!({"action": "decide", "session": v["session"], "confirm": yes}),
        );
        if yes {
            return d;
        }
    })
}

#[test]
fn strangers_stay_bounded_and_cannot_deny_pairing() {
    let a = PeerNode::start("deny-a");
    let b = PeerNode::start("deny-b");
    let c = PeerNode::start("deny-c");
    let pid = a.node.child.id();
    // Warm up the node the way the attack will use it, then take the idle figure.
    let mut w = stranger(listener(&a), attacker_addr(0)).unwrap();
    post(&mut w, "/_thali/accept", &json!({"secret": "00"}));
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_bytes(pid);

    // 64 strangers stream 200 MB bodies, 64 more announce 200 MB and stall.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let pushers = stream_bodies(listener(&a), &stop);
    let stalled = stall_bodies(listener(&a));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(pid) as usize, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Meanwhile a hundred throw-away keys guess invite secrets and squat on code windows.
    let misbehaving = misbehave(listener(&a), &stop);

    // The host opens its window while the squatters come; a real invite is made too.
    let inv = a
        .node
        .post("/_thali/invites", &json!({"db": "notes"}))
        .json();
    let waiting = host_accepting(a.node.addr, "laptop");
    let refused = misbehaving.join().unwrap();
    println!("throw-away keys refused with 429: {refused} of 300 guesses");
    assert!(
        refused > 0,
        "the per-address budget never refused a guesser"
    );

    // A real join goes through.
    let r = b.node.post(
        "/_thali/join",
        &json!({"invite": inv["uri"], "replicate": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(level_of(&a, "notes", &b.key_id()), Some("write"));

    // So does a real code pairing.
    let started = pairing_at(
        c.node.addr,
        &json!({"action": "start", "with": format!("httpkey://127.0.0.1:{}/{}/", a.port, a.key_id()),
               "db": "shared", "as_name": "laptop"}),
    );
    assert_eq!(started.status, 200, "{}", started.text());
    let confirmed = pairing_at(
        c.node.addr,
        &json!({"action": "confirm", "session": started.json()["session"], "replicate": false}),
    );
    assert_eq!(confirmed.status, 200, "{}", confirmed.text());
    let decided = waiting.join().unwrap();
    assert_eq!(decided.status, 200, "{}", decided.text());
    assert_eq!(decided.json()["paired"], true);
    wait_until("c's grant on a", || {
        level_of(&a, "shared", &c.key_id()) == Some("write")
    });

    stop.store(true, Ordering::Relaxed);
    let pushed: usize = pushers.into_iter().map(|p| p.join().unwrap()).sum();
    sampler.join().unwrap();
    drop(stalled);
    let peak = peak.load(Ordering::Relaxed) as u64;
    println!(
        "idle RSS {} MB, peak under attack {} MB; strangers pushed {} MB in all",
        idle >> 20,
        peak >> 20,
        pushed >> 20
    );
    assert!(
        peak <= idle + (50 << 20),
        "RSS rose from {} MB to {} MB",
        idle >> 20,
        peak >> 20
    );
}
