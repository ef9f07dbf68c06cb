//! Two devices on a LAN of their own: two network namespaces joined by a veth pair (created
//! here, as root, and removed at the end), a node in each with `serve --lan`. They find each
//! other over mDNS, the users pair by code with the real CLI (answering on its stdin), and a
//! document replicates. Nothing leaves the two namespaces. Prints the figures of the closing
//! note: time from `serve --lan` to the other node being listed, and pairing to first document.

use serde_json::{json, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thali_tests::{thali_bin, TempDir, PASSWORD};

/// A network namespace with one end of a veth pair; the pair goes with the first of them.
struct Ns {
    name: String,
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces, `10.77.<n>.1` and `.2` on a veth pair between them.
fn lan(n: u32) -> (Ns, Ns) {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the LAN test creates network namespaces and must run as root"
    );
    let tag = format!("{}", std::process::id() % 100000);
    let (a, b) = (format!("thali-a{tag}"), format!("thali-b{tag}"));
    let (va, vb) = (format!("tla{tag}"), format!("tlb{tag}"));
    ip(&["netns", "add", &a]);
    let na = Ns { name: a.clone() };
    ip(&["netns", "add", &b]);
    let nb = Ns { name: b.clone() };
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
    ip(&["link", "set", &va, "netns", &a]);
    ip(&["link", "set", &vb, "netns", &b]);
    for (ns, dev, addr) in [
        (&a, &va, format!("10.77.{n}.1/24")),
        (&b, &vb, format!("10.77.{n}.2/24")),
    ] {
        ip(&["-n", ns, "addr", "add", &addr, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    (na, nb)
}

/// Runs `f` on a thread that has entered namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        use std::os::fd::AsRawFd;
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
    .join()
    .unwrap()
}

fn try_admin(
    ns: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> std::io::Result<thali_tests::Resp> {
    let (method, path) = (method.to_string(), path.to_string());
    in_ns(ns, move || {
        let addr: SocketAddr = "127.0.0.1:5984".parse().unwrap();
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        let mut h = vec![("Authorization".to_string(), thali_tests::admin_auth())];
        if body.is_some() {
            h.push(("Content-Type".into(), "application/json".into()));
        }
        thali_tests::try_request(addr, &method, &path, &h, body.as_deref())
    })
}

fn admin(ns: &str, method: &str, path: &str, body: Option<Value>) -> thali_tests::Resp {
    try_admin(ns, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

struct NsNode {
    child: Child,
}

impl Drop for NsNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(ns: &str, data: &TempDir, peer: &str) -> NsNode {
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(thali_bin())
        .args([
            "serve",
            "--http",
            "127.0.0.1:5984",
            "--peer",
            peer,
            "--lan",
            "--lan-rotate",
            "2",
            "--data",
        ])
        .arg(&data.0)
        .env("THALI_ADMIN_PASSWORD", PASSWORD)
        .env(
            "THALI_LOG",
            std::env::var("LAN_LOG").unwrap_or("warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    NsNode { child }
}

fn cli_in(ns: &str, args: &[&str], answer: &str) -> std::process::Child {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(thali_bin())
        .args(args)
        .env("THALI_ADMIN_PASSWORD", PASSWORD)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(answer.as_bytes())
        .unwrap();
    c
}

fn finish(c: Child) -> String {
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn code_in(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Code: "))
        .unwrap_or_else(|| panic!("no code in {out}"))
        .to_string()
}

/// What a passive listener in `ns` hears for `secs`: (instance name, host, TXT entries,
/// addresses) of every resolved `_thali._tcp` announcement.
fn overheard(ns: &str, secs: u64) -> Vec<(String, String, usize, Vec<String>)> {
    in_ns(ns, move || {
        let d = mdns_sd::ServiceDaemon::new().unwrap();
        let rx = d.browse("_thali._tcp.local.").unwrap();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut out = Vec::new();
        while let Ok(ev) = rx.recv_deadline(deadline) {
            if let mdns_sd::ServiceEvent::ServiceResolved(r) = ev {
                let addrs = r
                    .addresses
                    .iter()
                    .map(|a| a.to_ip_addr().to_string())
                    .collect();
                out.push((
                    r.fullname.clone(),
                    r.host.clone(),
                    r.txt_properties.len(),
                    addrs,
                ));
            }
        }
        let _ = d.shutdown();
        out
    })
}

#[test]
fn two_devices_discover_each_other_pair_by_code_and_sync() {
    thali_tests::require!(thali_tests::needs::Need::Root);
    let (na, nb) = lan(1);
    let (da, db) = (TempDir::new("lan-a"), TempDir::new("lan-b"));
    let started = Instant::now();
    let _a = serve(&na.name, &da, "10.77.1.1:9898");
    let _b = serve(&nb.name, &db, "10.77.1.2:9898");
    let key_b = thali_tests::node_identity(&db.0).key_id();
    let key_a = thali_tests::node_identity(&da.0).key_id();

    // Each lists the other (and not itself), by key, at its LAN address.
    let deadline = Instant::now() + Duration::from_secs(60);
    let listed = loop {
        if let Ok(r) = try_admin(&na.name, "GET", "/_thali/peers", None) {
            if r.status == 200 && r.json().as_array().is_some_and(|a| !a.is_empty()) {
                break r.json();
            }
        }
        assert!(Instant::now() < deadline, "a did not discover b");
        std::thread::sleep(Duration::from_millis(100));
    };
    let seen_after = started.elapsed();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["key"], key_b.as_str());
    assert_eq!(listed[0]["addresses"], json!(["10.77.1.2:9898"]));
    assert_eq!(listed[0]["known"], false);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = admin(&nb.name, "GET", "/_thali/peers", None).json();
        if r.as_array().is_some_and(|a| a.len() == 1) {
            assert_eq!(r[0]["key"], key_a.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "b did not discover a");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "LAN discovery: the other node listed {:.2} s after both `serve --lan` were spawned (node's own figure: {} s)",
        seen_after.as_secs_f64(),
        listed[0]["listed_after_s"]
    );
    // `thali peer discover` shows it too.
    let out = finish(cli_in(&na.name, &["peer", "discover"], ""));
    assert!(
        out.contains(&key_b) && out.contains("10.77.1.2:9898") && out.contains("new"),
        "{out}"
    );

    // A passive listener hears random names that change (every 2 s here, 10 min by default),
    // no key and no TXT; the node still lists b once, by key.
    let heard: Vec<_> = overheard(&na.name, 7)
        .into_iter()
        .filter(|(.., addrs)| addrs.contains(&"10.77.1.2".to_string()))
        .collect();
    let names: std::collections::BTreeSet<&String> = heard.iter().map(|h| &h.0).collect();
    assert!(names.len() >= 2, "b's name did not change: {heard:?}");
    let b32 = &key_b["ed25519:".len()..];
    for (full, host, txt, _) in &heard {
        let label = full
            .strip_suffix("._thali._tcp.local.")
            .unwrap_or_else(|| panic!("{full}"));
        assert!(
            label.len() == 16 && label.bytes().all(|c| c.is_ascii_hexdigit()),
            "{full}"
        );
        assert_eq!(host, &format!("{label}.local."));
        assert_eq!(*txt, 0, "{full} carries TXT data");
        assert!(!full.contains(&b32[..8]) && !host.contains(&b32[..8]));
    }
    assert_eq!(
        admin(&na.name, "GET", "/_thali/peers", None)
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Pair by code: b waits, a asks by the start of b's key; both users answer yes.
    let waiting = cli_in(
        &nb.name,
        &["pair", "--wait", "--timeout", "60", "--as", "bob"],
        "y\n",
    );
    let short = &key_b["ed25519:".len().."ed25519:".len() + 10];
    let mut asked = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while asked.is_none() {
        // Until b's window is open.
        let c = cli_in(
            &na.name,
            &["pair", "--with", short, "--db", "notes", "--name", "bob"],
            "y\n",
        );
        let out = c.wait_with_output().unwrap();
        if out.status.success() {
            asked = Some(String::from_utf8_lossy(&out.stdout).to_string());
        } else {
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(err.contains("not waiting"), "{err}");
            assert!(Instant::now() < deadline, "b never waited");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let pairing_done = Instant::now();
    let asked = asked.unwrap();
    let hosted = finish(waiting);
    assert_eq!(code_in(&asked), code_in(&hosted), "{asked}\n{hosted}");
    assert!(asked.contains("paired with bob"), "{asked}");
    assert!(hosted.contains(&format!("paired with {key_a}")), "{hosted}");

    // They sync.
    assert_eq!(
        admin(&nb.name, "PUT", "/notes/hello", Some(json!({"from": "b"}))).status,
        201
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin(&na.name, "GET", "/notes/hello", None).status != 200 {
        assert!(Instant::now() < deadline, "the document did not replicate");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "pairing by code on the LAN: first document replicated {:.2} s after pairing",
        pairing_done.elapsed().as_secs_f64()
    );
    let listed = admin(&na.name, "GET", "/_thali/peers", None).json();
    assert_eq!(listed[0]["paired"], true);
    assert_eq!(listed[0]["name"], "bob");
}
