//! `DIR/thali.toml`: settings by flag name, layered file < environment < command line, and
//! `thali config check` reporting problems by line, zero and absurd limits among them.

use serde_json::json;
use std::process::{Child, Command, Stdio};
use thali_tests::{admin_auth, free_port, request, thali_bin, TempDir};

struct Running(Child, std::net::SocketAddr);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &TempDir, port: u16, env: &[(&str, &str)], args: &[&str]) -> Running {
    let child = Command::new(thali_bin())
        .args(["serve", "--data"])
        .arg(&dir.0)
        .args(args)
        .env("THALI_ADMIN_PASSWORD", thali_tests::PASSWORD)
        .env("THALI_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let running = Running(child, addr);
    thali_tests::wait_up(addr);
    running
}

/// `thali config check --file FILE`.
fn config_check(file: &std::path::Path) -> std::process::Output {
    Command::new(thali_bin())
        .args(["config", "check", "--file"])
        .arg(file)
        .output()
        .unwrap()
}

/// Status of a PUT of a document of about `size` bytes.
fn put_sized(addr: std::net::SocketAddr, id: &str, size: usize) -> u16 {
    let h = [("Authorization".to_string(), admin_auth())];
    request(addr, "PUT", "/c", &h, None);
    let body = serde_json::to_vec(&json!({ "x": "y".repeat(size) })).unwrap();
    let mut h = h.to_vec();
    h.push(("Content-Type".into(), "application/json".into()));
    request(addr, "PUT", &format!("/c/{id}"), &h, Some(&body)).status
}

#[test]
fn file_then_environment_then_flags() {
    let dir = TempDir::new("config");
    let port = free_port();
    std::fs::write(
        dir.0.join("thali.toml"),
        format!("# limits\nhttp = [\"127.0.0.1:{port}\"]\nmax-document-size = 1000\n"),
    )
    .unwrap();
    // The file alone: its port and its limit.
    {
        let n = serve(&dir, port, &[], &[]);
        assert_eq!(put_sized(n.1, "a", 1500), 413);
        assert_eq!(put_sized(n.1, "b", 500), 201);
    }
    // `_config` shows what is in force and changes the log filter live.
    {
        let n = serve(&dir, port, &[], &[]);
        let h = [("Authorization".to_string(), admin_auth())];
        let get = |p: &str| request(n.1, "GET", p, &h, None);
        assert_eq!(
            get("/_node/_local/_config/thali/max-document-size").json(),
            json!("1000")
        );
        assert_eq!(
            get("/_node/_local/_config/couchdb/max_document_size").json(),
            json!("1000")
        );
        assert_eq!(
            get("/_node/_local/_config/chttpd/port").json(),
            json!(port.to_string())
        );
        assert_eq!(
            get("/_node/_local/_config/admins").json(),
            json!({"admin": "-hidden-"})
        );
        get("/_node/_local/_config/thali/nothing").assert_error(404, "not_found");
        let mut hj = h.to_vec();
        hj.push(("Content-Type".into(), "application/json".into()));
        let r = request(
            n.1,
            "PUT",
            "/_node/_local/_config/log/level",
            &hj,
            Some(b"\"debug\""),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!("warn"));
        assert_eq!(
            get("/_node/_local/_config/log/level").json(),
            json!("debug")
        );
        let r = request(
            n.1,
            "PUT",
            "/_node/_local/_config/log/level",
            &hj,
            Some(b"\"=[\""),
        );
        r.assert_error(400, "bad_request");
        let r = request(
            n.1,
            "PUT",
            "/_node/_local/_config/couchdb/max_document_size",
            &hj,
            Some(b"\"5\""),
        );
        r.assert_error(400, "bad_request");
        assert!(r.text().contains("read at start"));
    }
    // The environment over the file.
    {
        let n = serve(&dir, port, &[("THALI_MAX_DOCUMENT_SIZE", "3000")], &[]);
        assert_eq!(put_sized(n.1, "c", 1500), 201);
    }
    // The command line over both.
    {
        let n = serve(
            &dir,
            port,
            &[("THALI_MAX_DOCUMENT_SIZE", "3000")],
            &["--max-document-size", "1200"],
        );
        assert_eq!(put_sized(n.1, "d", 1500), 413);
    }
}

#[test]
fn check_reports_problems_by_line() {
    let dir = TempDir::new("config-check");
    let file = dir.0.join("thali.toml");
    std::fs::write(
        &file,
        "peer = [\"127.0.0.1:1\"]\nbogus = 1\ntor-port = \"x\"\nlan = \"yes\"\nhttp = \"127.0.0.1:2\"\ndata = \"/elsewhere\"\n",
    )
    .unwrap();
    let out = Command::new(thali_bin())
        .args(["config", "check", "--data"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "line 2: unknown key \"bogus\"",
        "line 3: tor-port: invalid value 'x'",
        "line 4: lan is a switch",
        "line 6: \"data\" can only be given on the command line",
    ] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    // A single value where a list is allowed is fine (line 5 is not reported).
    assert!(!err.contains("line 5"), "{err}");
    // `serve` refuses to start on such a file, saying why.
    let out = Command::new(thali_bin())
        .args(["serve", "--data"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key \"bogus\""));
    // Syntax errors too.
    std::fs::write(&file, "peer = [\n").unwrap();
    let out = config_check(&file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line "));
    std::fs::write(
        &file,
        "max-dbs-open = 20\ncors-origin = [\"http://a\", \"http://b\"]\n",
    )
    .unwrap();
    let out = config_check(&file);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok, 2 settings"));
}

#[test]
fn config_check_refuses_zero_and_absurd_limits() {
    let dir = TempDir::new("limits");
    let file = dir.0.join("thali.toml");
    std::fs::write(
        &file,
        "max-request-size = 0\nplugin-cpu = 0\nplugin-timeout-ms = 0\nmax-dbs-open = 0\nrequest-timeout = 99999999\n",
    )
    .unwrap();
    let out = config_check(&file);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for line in 1..=5 {
        assert!(
            err.contains(&format!("line {line}:")),
            "line {line} not in {err}"
        );
    }
    assert!(err.contains("outside"), "{err}");
    std::fs::write(&file, "max-request-size = 1048576\nplugin-cpu = 1000000\n").unwrap();
    let out = config_check(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
