//! Servers for the benchmarks: a release `thali` with a peer listener, and pouchdb-server
//! (npm, from `tests/interop`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Target {
    pub name: &'static str,
    pub base: String,
    pub auth: Option<String>,
    pub child: Child,
    pub _dir: crate::TempDir,
    pub peer_port: u16,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_up(base: &str) {
    let addr: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    for _ in 0..600 {
        if let Ok(r) = crate::try_request(addr, "GET", "/", &[], None) {
            if r.status == 200 {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{base} did not come up");
}

pub fn start_thali(root: &std::path::Path) -> Target {
    // `--workspace`, not `-p thali-node`: the features then unify as in `cargo build
    // --workspace`, whose artifacts are reused instead of a second set being built.
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "--workspace", "--bin", "thali"])
        .current_dir(root)
        .status()
        .expect("cargo build");
    assert!(status.success());
    let dir = crate::TempDir::new("bench-thali");
    let port = crate::free_port();
    let peer_port = crate::free_port();
    let mut cmd = Command::new(root.join("target/release/thali"));
    cmd.args(["serve", "--data"])
        .arg(&dir.0)
        .args(["--http", &format!("127.0.0.1:{port}")])
        .args(["--peer", &format!("127.0.0.1:{peer_port}")])
        // The benchmarks measure throughput over the peer listener, not its per-key limit.
        .args(["--peer-rate", "0"]);
    // Every benchmark takes `--storage fjall|sled` (the node's default otherwise).
    if let Some(engine) = arg_str("--storage") {
        cmd.args(["--storage", &engine]);
    }
    let child = cmd
        .env("THALI_ADMIN_PASSWORD", crate::PASSWORD)
        .env("THALI_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn thali");
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&base);
    Target {
        name: "thali",
        base,
        auth: Some(crate::admin_auth()),
        child,
        _dir: dir,
        peer_port,
    }
}

pub fn start_pouchdb_server(root: &std::path::Path) -> Target {
    let bin = root.join("tests/interop/node_modules/pouchdb-server/bin/pouchdb-server");
    assert!(
        bin.exists(),
        "pouchdb-server missing: run `npm ci` in tests/interop"
    );
    let dir = crate::TempDir::new("bench-pouchdb-server");
    let port = crate::free_port();
    let child = Command::new("node")
        .arg(&bin)
        .args(["-p", &port.to_string(), "-o", "127.0.0.1", "-n", "-d"])
        .arg(&dir.0)
        .arg("-c")
        .arg(dir.0.join("config.json"))
        .current_dir(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pouchdb-server");
    let base = format!("http://127.0.0.1:{port}");
    wait_up(&base);
    Target {
        name: "pouchdb-server",
        base,
        auth: None,
        child,
        _dir: dir,
        peer_port: 0,
    }
}

impl Target {
    /// The node's peer key id.
    pub fn key(&self) -> String {
        crate::node_identity(&self._dir.0).key_id()
    }

    /// An httpkey URL of database `db` on this node's peer port.
    pub fn httpkey(&self, db: &str) -> String {
        format!("httpkey://127.0.0.1:{}/{}/{db}", self.peer_port, self.key())
    }

    /// Creates `db` (if missing) and lets `other`'s key read and write it.
    pub fn allow(&self, db: &str, other: &Target) {
        let _ = self.call("PUT", &format!("/{db}"), None);
        let sec = serde_json::json!({"members": {"names": [other.key()], "roles": []}});
        assert_eq!(
            self.call("PUT", &format!("/{db}/_security"), Some(&sec)).0,
            200
        );
    }

    /// A JSON request with this server's credentials (long timeout: replications run in it).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let addr: std::net::SocketAddr = self.base.trim_start_matches("http://").parse().unwrap();
        let mut h = vec![("Content-Type".to_string(), "application/json".to_string())];
        if let Some(a) = &self.auth {
            h.push(("Authorization".into(), a.clone()));
        }
        let body = body.map(|b| serde_json::to_vec(b).unwrap());
        let r = crate::try_request_within(
            addr,
            method,
            path,
            &h,
            body.as_deref(),
            Duration::from_secs(3600),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
        )
    }
}

/// PouchDB (npm) replicating `src` to `dst` (`tests/interop/bench-replicate.js`): its answer,
/// with `docs_written` and `ms`.
pub fn pouchdb_replicate(root: &std::path::Path, src: &str, dst: &str) -> serde_json::Value {
    pouchdb_replicate_batched(root, src, dst, 100)
}

/// `pouchdb_replicate` with PouchDB's `batch_size`.
pub fn pouchdb_replicate_batched(
    root: &std::path::Path,
    src: &str,
    dst: &str,
    batch: usize,
) -> serde_json::Value {
    let out = Command::new("node")
        .arg(root.join("tests/interop/bench-replicate.js"))
        .arg(src)
        .arg(dst)
        .arg(batch.to_string())
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("replication result")
}

/// The number after `--name` on the command line, or `default`.
/// The value after `name` on the command line, if any.
pub fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Resident memory of a process, in bytes (Linux `/proc`).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of every file under `p`.
pub fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub fn arg_usize(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} needs a number"))
        })
        .unwrap_or(default)
}

/// Runs `f` up to `q` times (fewer, at least 5, once 20 s have passed: a slow server would take
/// minutes): each run's milliseconds in run order, the seconds in all, and the last answer.
pub fn timed_runs(
    q: usize,
    mut f: impl FnMut() -> serde_json::Value,
) -> (Vec<f64>, f64, serde_json::Value) {
    let mut ms = Vec::with_capacity(q);
    let mut last = serde_json::Value::Null;
    let start = std::time::Instant::now();
    for i in 0..q {
        if i >= 5 && start.elapsed().as_secs() >= 20 {
            break;
        }
        let t0 = std::time::Instant::now();
        last = f();
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    (ms, start.elapsed().as_secs_f64(), last)
}

/// Creates `db` on `t` and loads documents `doc(0..n)` in `_bulk_docs` batches of 1000 from
/// two client threads.
pub fn load_docs(t: &Target, db: &str, n: usize, doc: impl Fn(usize) -> serde_json::Value) {
    assert!(t.call("PUT", &format!("/{db}"), None).0 < 300);
    let batches: Vec<serde_json::Value> = (0..n)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|c| serde_json::json!({"docs": c.iter().map(|i| doc(*i)).collect::<Vec<_>>()}))
        .collect();
    std::thread::scope(|s| {
        for half in batches.chunks(batches.len().div_ceil(2)) {
            s.spawn(move || {
                for b in half {
                    let (st, v) = t.call("POST", &format!("/{db}/_bulk_docs"), Some(b));
                    assert!(st == 201 || st == 200, "{v}");
                }
            });
        }
    });
}
