//! Test harness: builds and starts the real `thali` binary on free loopback ports, and a small
//! HTTP/1.1 client that can send anything (malformed requests included).

pub mod blobs;
pub mod mesh;
pub mod needs;
pub mod servers;
pub mod tornet;

use base64::Engine;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "test-password";

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `thali` binary, built once per test process (`THALI_BIN` overrides).
pub fn thali_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("THALI_BIN") {
            return PathBuf::from(p);
        }
        let root = workspace_root();
        let mut cargo = Command::new(env!("CARGO"));
        // Variables `cargo test` sets for test binaries would make build scripts (ring's)
        // rerun and the nested build recompile; give it the environment of a plain shell.
        for (k, _) in std::env::vars() {
            if (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR")
                || k == "OUT_DIR"
                || k.starts_with("RUSTC")
            {
                cargo.env_remove(k);
            }
        }
        let status = cargo
            // The same selection as `tests/run-all.sh` builds (and `cargo test` resolves
            // features for): with `--bins` only, dev-dependencies drop out of feature
            // unification (proptest's `rustix`, shared with wasmtime) and half the dependency
            // tree would be compiled a second time.
            .args(["build", "-q", "--workspace", "--all-targets"])
            .current_dir(&root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building thali failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        target.join("debug").join("thali")
    })
    .clone()
}

/// Waits (30 s at most) until a node answers `GET /_up` at `addr`.
#[track_caller]
pub fn wait_up(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if try_request(addr, "GET", "/_up", &[], None).is_ok_and(|r| r.status == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("thali did not come up on {addr}");
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "thali-test-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Shorthands shared by the loopback (admin) and peer (mTLS) clients.
pub trait Client {
    fn req(&self, method: &str, path: &str, body: Option<&Value>) -> Resp;
    fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None)
    }
    fn put(&self, path: &str, body: &Value) -> Resp {
        self.req("PUT", path, Some(body))
    }
    fn post(&self, path: &str, body: &Value) -> Resp {
        self.req("POST", path, Some(body))
    }
    fn delete(&self, path: &str) -> Resp {
        self.req("DELETE", path, None)
    }
}

/// A running node.
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub extra_args: Vec<String>,
}

impl Node {
    pub fn start(data: &Path) -> Node {
        Self::start_with(data, &[])
    }

    pub fn start_with(data: &Path, extra: &[&str]) -> Node {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Self::spawn(data, addr, extra.iter().map(|s| s.to_string()).collect())
    }

    fn spawn(data: &Path, addr: SocketAddr, extra: Vec<String>) -> Node {
        // Tor test networks make arti warn about guards about once a second: noise here.
        let log = if extra.iter().any(|a| a.starts_with("--tor")) {
            "warn,tor_guardmgr=error,tor_circmgr=error,tor_netdir=error"
        } else {
            "warn"
        };
        let mut cmd = Command::new(thali_bin());
        cmd.arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--http")
            .arg(addr.to_string())
            .args(&extra)
            .env("THALI_ADMIN_PASSWORD", PASSWORD)
            .env("THALI_LOG", log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn thali");
        let node = Node {
            child,
            addr,
            data: data.to_path_buf(),
            extra_args: extra,
        };
        node.wait_up();
        node
    }

    fn wait_up(&self) {
        wait_up(self.addr);
    }

    /// Same data dir and address, new process.
    pub fn restart(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        let n = Node::spawn(&self.data.clone(), self.addr, self.extra_args.clone());
        *self = n;
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; panics if the node does not exit cleanly within 15 s.
    pub fn stop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "thali exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "thali did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://admin:{PASSWORD}@{}", self.addr)
    }

    /// A request with explicit headers and raw body (admin auth added).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        let mut h: Vec<(String, String)> = vec![("Authorization".into(), admin_auth())];
        h.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        request(self.addr, method, path, &h, body)
    }
}

impl Client for Node {
    /// An admin request with a JSON body.
    fn req(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        let body = body.map(|b| serde_json::to_vec(b).unwrap());
        let mut headers = vec![("Authorization".to_string(), admin_auth())];
        if body.is_some() {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        request(self.addr, method, path, &headers, body.as_deref())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn admin_auth() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{PASSWORD}"))
    )
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts the status and a CouchDB error body with the given `error`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, error: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        let j = self.json();
        assert_eq!(j["error"], error, "body: {j}");
        assert!(j["reason"].is_string(), "reason missing: {j}");
    }
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Resp {
    try_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    try_request_within(addr, method, path, headers, body, Duration::from_secs(60))
}

/// `try_request` with a chosen read timeout (long-running calls such as `POST /_replicate`).
pub fn try_request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    if let Some(b) = body {
        s.write_all(b)?;
    }
    read_response(&mut BufReader::new(s), method == "HEAD")
}

pub fn read_response<R: BufRead>(r: &mut R, head: bool) -> std::io::Result<Resp> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if head {
    } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// A peer-side client: mutual TLS with its own identity, pinning the server's key. Each
/// request uses a new connection (so every request also pays a handshake).
pub struct PeerClient {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    pub addr: SocketAddr,
}

impl PeerClient {
    pub fn new(
        id: &thali_node::peer::Identity,
        server_key: [u8; 32],
        addr: SocketAddr,
    ) -> PeerClient {
        PeerClient {
            config: thali_node::peer::tls::client_config(id, server_key).unwrap(),
            addr,
        }
    }

    /// From an `httpkey://` URL.
    pub fn for_url(id: &thali_node::peer::Identity, url: &str) -> PeerClient {
        let u = thali_node::peer::HttpKeyUrl::parse(url).unwrap();
        let thali_node::peer::PeerKey::Ed25519(k) = u.key else {
            panic!("not an ed25519 url")
        };
        let addr = format!("{}:{}", u.host, u.port).parse().unwrap();
        PeerClient::new(id, k, addr)
    }

    pub fn try_req(&self, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<Resp> {
        let body = body.map(|b| serde_json::to_vec(b).unwrap());
        let ctype = [("Content-Type", "application/json")];
        let headers: &[(&str, &str)] = if body.is_some() { &ctype } else { &[] };
        self.try_raw(method, path, headers, body.as_deref())
    }

    /// A request with explicit headers and a raw body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        self.try_raw(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub fn try_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<Resp> {
        let name = rustls::pki_types::ServerName::try_from("thali.peer").unwrap();
        let conn = rustls::ClientConnection::new(self.config.clone(), name)
            .map_err(std::io::Error::other)?;
        let tcp = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        // Without it the request's last TLS record waits for the server's delayed ACK (40 ms).
        tcp.set_nodelay(true)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = &body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        tls.write_all(req.as_bytes())?;
        if let Some(b) = &body {
            tls.write_all(b)?;
        }
        tls.flush()?;
        read_response(&mut BufReader::new(tls), method == "HEAD")
    }
}

impl Client for PeerClient {
    fn req(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        self.try_req(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

/// The identity of a node started on `data` (the node created it on first start).
pub fn node_identity(data: &Path) -> thali_node::peer::Identity {
    thali_node::peer::Identity::load_or_create(data).unwrap()
}

/// A node with a mutual-TLS peer listener, and what other parties need to reach it.
pub struct PeerNode {
    pub dir: TempDir,
    pub node: Node,
    /// The peer listener's port.
    pub port: u16,
    /// The node's public key.
    pub key: [u8; 32],
}

impl PeerNode {
    pub fn start(tag: &str) -> PeerNode {
        let dir = TempDir::new(tag);
        let port = free_port();
        let node = Node::start_with(&dir.0, &["--peer", &format!("127.0.0.1:{port}")]);
        let key = *node_identity(&dir.0).public_key();
        PeerNode {
            dir,
            node,
            port,
            key,
        }
    }

    pub fn key_id(&self) -> String {
        thali_node::peer::key_id(&self.key)
    }

    /// A client with identity `id`, pinning this node's key.
    pub fn client(&self, id: &thali_node::peer::Identity) -> PeerClient {
        PeerClient::new(
            id,
            self.key,
            format!("127.0.0.1:{}", self.port).parse().unwrap(),
        )
    }

    pub fn url(&self, db: &str) -> String {
        self.url_via(self.port, db)
    }

    /// This node's URL for `db` through another port (a proxy in front of it).
    pub fn url_via(&self, port: u16, db: &str) -> String {
        format!("httpkey://127.0.0.1:{port}/{}/{db}", self.key_id())
    }

    /// A client with this node's own identity, pinning `other`'s key (what this node's
    /// replicator presents to `other`).
    pub fn client_of(&self, other: &PeerNode) -> PeerClient {
        other.client(&node_identity(&self.dir.0))
    }

    /// Creates `db` (if needed) and lets `other` write to it.
    pub fn allow(&self, db: &str, other: &PeerNode) {
        let _ = self.node.put(&format!("/{db}"), &serde_json::json!({}));
        let sec = serde_json::json!({"members": {"names": [other.key_id()], "roles": []}});
        assert_eq!(self.node.put(&format!("/{db}/_security"), &sec).status, 200);
    }
}

/// `POST /_thali/pairing` as the admin of the node at `addr` (waits as long as pairing may).
pub fn pairing_at(addr: SocketAddr, body: &Value) -> Resp {
    let b = serde_json::to_vec(body).unwrap();
    try_request_within(
        addr,
        "POST",
        "/_thali/pairing",
        &[
            ("Authorization".into(), admin_auth()),
            ("Content-Type".into(), "application/json".into()),
        ],
        Some(&b),
        Duration::from_secs(240),
    )
    .unwrap()
}
