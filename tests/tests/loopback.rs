//! What the loopback API defends against: a web page that rebinds its own name to 127.0.0.1
//! (`Host` is checked), password guessing (failures locked per source and name, as CouchDB's
//! `auth_lockout`), a logout that must end the session and its event stream on the node, an
//! `--http` address off loopback, and a password on the command line.

use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use thali_tests::{request, thali_bin, Client, Node, TempDir, PASSWORD};

fn with_host(n: &Node, host: &str, path: &str) -> thali_tests::Resp {
    let mut s = TcpStream::connect(n.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
        thali_tests::admin_auth()
    )
    .unwrap();
    thali_tests::read_response(&mut BufReader::new(s), false).unwrap()
}

#[test]
fn only_loopback_names_and_addresses_are_answered() {
    let dir = TempDir::new("host");
    let n = Node::start_with(&dir.0, &["--allowed-host", "thali.lan"]);
    let port = n.addr.port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("app.localhost:{port}"),
        format!("[::1]:{port}"),
        format!("thali.lan:{port}"),
        "10.1.2.3".to_string(),
    ] {
        assert_eq!(with_host(&n, &host, "/_all_dbs").status, 200, "{host}");
    }
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        "localhost.evil.example".to_string(),
        "127.0.0.1.nip.io".to_string(),
    ] {
        let r = with_host(&n, &host, "/_all_dbs");
        r.assert_error(403, "forbidden");
        assert!(r.text().contains("--allowed-host"), "{}", r.text());
        // The page itself and unauthenticated routes too: a rebinding page learns nothing.
        with_host(&n, &host, "/_thali/").assert_error(403, "forbidden");
    }
}

/// `POST /_session` with a JSON login.
fn login(n: &Node, name: &str, password: &str) -> thali_tests::Resp {
    let body = json!({ "name": name, "password": password }).to_string();
    request(
        n.addr,
        "POST",
        "/_session",
        &[("Content-Type".into(), "application/json".into())],
        Some(body.as_bytes()),
    )
}

fn basic(name: &str, pw: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{name}:{pw}"))
    )
}

#[test]
fn failed_logins_lock_the_name_from_that_source() {
    let dir = TempDir::new("lockout");
    let n = Node::start(&dir.0);
    let get = |auth: String| {
        request(
            n.addr,
            "GET",
            "/_all_dbs",
            &[("Authorization".into(), auth)],
            None,
        )
    };
    // Five wrong passwords are answered 401, then the name is locked: even the right one is
    // refused without being checked, for the lockout period.
    for _ in 0..5 {
        get(basic("admin", "guess")).assert_error(401, "unauthorized");
    }
    let started = Instant::now();
    for i in 0..1000 {
        let r = get(basic("admin", &format!("guess{i}")));
        r.assert_error(403, "forbidden");
    }
    println!(
        "1000 guesses refused in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let r = get(basic("admin", PASSWORD));
    r.assert_error(403, "forbidden");
    assert!(r.text().contains("locked"), "{}", r.text());
    // `POST /_session` is the same door.
    login(&n, "admin", PASSWORD).assert_error(403, "forbidden");
    // Another name from the same source is not locked; guesses through _session count too.
    for _ in 0..5 {
        login(&n, "bob", "x").assert_error(401, "unauthorized");
    }
    get(basic("bob", "x")).assert_error(403, "forbidden");
}

/// Reads server-sent events from `s` until `deadline`: the number of snapshots, and whether
/// the stream ended.
fn snapshots_until(r: &mut BufReader<TcpStream>, deadline: Instant) -> (usize, bool) {
    let mut n = 0;
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return (n, true),
            Ok(_) => n += usize::from(line.starts_with("event: snapshot")),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (n, true),
        }
    }
    (n, false)
}

fn open_events(n: &Node, cookie: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(n.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        s,
        "GET /_thali/events HTTP/1.1\r\nHost: {}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n",
        n.addr
    )
    .unwrap();
    BufReader::new(s)
}

#[test]
fn logout_ends_the_session_and_its_event_stream() {
    let dir = TempDir::new("logout");
    let n = Node::start(&dir.0);
    let r = login(&n, "admin", PASSWORD);
    assert_eq!(r.status, 200);
    let cookie = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let mut events = open_events(&n, &cookie);
    let (seen, ended) = snapshots_until(&mut events, Instant::now() + Duration::from_millis(2500));
    assert!(
        seen >= 1 && !ended,
        "the stream runs while logged in ({seen}, {ended})"
    );

    let r = request(
        n.addr,
        "DELETE",
        "/_session",
        &[("Cookie".into(), cookie.clone())],
        None,
    );
    assert_eq!(r.status, 200);
    // The cookie no longer works, and the stream ends within a snapshot or two.
    let r = request(
        n.addr,
        "GET",
        "/_all_dbs",
        &[("Cookie".into(), cookie.clone())],
        None,
    );
    assert_eq!(r.status, 401, "{}", r.text());
    let (_, ended) = snapshots_until(&mut events, Instant::now() + Duration::from_secs(5));
    assert!(ended, "the event stream went on after logout");
    // A new stream with the old cookie is refused.
    let r = request(
        n.addr,
        "GET",
        "/_thali/events?once=true",
        &[("Cookie".into(), cookie)],
        None,
    );
    assert_eq!(r.status, 401);
}

fn serve_output(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let dir = TempDir::new("serve-refused");
    let mut child = Command::new(thali_bin())
        .args(["serve", "--data"])
        .arg(&dir.0)
        .args(args)
        .envs(env.iter().copied())
        .env("THALI_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (true, "still running".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn http_off_loopback_needs_a_flag_that_names_the_risk() {
    let port = thali_tests::free_port();
    let (ok, err) = serve_output(&["--http", &format!("0.0.0.0:{port}")], &[]);
    assert!(!ok, "serve started on 0.0.0.0");
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("--insecure-http-on-network"), "{err}");
    // The flag is accepted (here on loopback: the test must not listen on a real network).
    let dir = TempDir::new("insecure-flag");
    let n = Node::start_with(&dir.0, &["--insecure-http-on-network"]);
    assert_eq!(n.get("/_up").status, 200);
}

#[test]
fn the_admin_password_can_come_from_a_file() {
    let dir = TempDir::new("pwfile");
    let file = dir.0.join("secret.txt");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let port = thali_tests::free_port();
    let mut child = Command::new(thali_bin())
        .args(["serve", "--data"])
        .arg(dir.0.join("data"))
        .args(["--http", &format!("127.0.0.1:{port}")])
        .arg("--admin-password-file")
        .arg(&file)
        .env_remove("THALI_ADMIN_PASSWORD")
        .env("THALI_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    thali_tests::wait_up(addr);
    let r = request(
        addr,
        "GET",
        "/_all_dbs",
        &[("Authorization".into(), basic("admin", "from-a-file"))],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let _ = child.kill();
    let _ = child.wait();
    // An empty file is refused, saying so.
    std::fs::write(&file, "\n").unwrap();
    let (ok, err) = serve_output(&["--admin-password-file", file.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("empty"), "{err}");
}
