//! A private Tor network on loopback, made from Debian's `tor` by `tests/tor/privnet.sh`, and the
//! two-node onion replication round that the Tor test and `thali-tor-e2e` run on it.
//!
//! Shape: 3 directory authorities, 3 relays and 1 exit (all also HSDirs), plus one C-tor client
//! used only to tell when the network has bootstrapped. Every tor process exits by itself when
//! the process that started the network ends (`__OwningControllerProcess`), so a crashed test
//! leaves nothing running; [`PrivNet`]'s `Drop` stops them at once.

use crate::mesh::state;
use crate::{free_port, Client, Node, TempDir};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AUTHS: &str = "a0 a1 a2";
const RELAYS: &str = "r3 r4 r5";
const EXITS: &str = "e6";
const CLIENT: &str = "c7";
const ALL_RELAYS: usize = 7;

pub struct PrivNet {
    pub dir: TempDir,
    /// arti's configuration for this network (`thali serve --tor-network FILE`).
    pub arti_toml: PathBuf,
    /// From starting the tor processes until the consensus listed every relay and an arti
    /// client could bootstrap.
    pub bootstrap: Duration,
    tors: Vec<Child>,
}

/// `tor` and `tor-gencert`, or a panic that says how to install them.
fn tor_binaries() -> (PathBuf, PathBuf) {
    let find = |name: &str| {
        crate::needs::on_path(name).unwrap_or_else(|| {
            panic!("`{name}` not found: the Tor tests need Debian's tor package (apt-get install -y tor; tests/run-all.sh installs it)")
        })
    };
    (find("tor"), find("tor-gencert"))
}

/// A port offset (added to 15000/17000/18000/19000 by the generator) whose ports are all free.
fn free_offset() -> u16 {
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    let start = (std::process::id() % 40) as u16 * 20;
    (0..40)
        .map(|i| (start + i * 20) % 800)
        .find(|off| {
            (0..=ALL_RELAYS as u16).all(|i| {
                [15000, 17000, 18000, 19000]
                    .iter()
                    .all(|b| free(b + off + i))
            })
        })
        .expect("no free port range for the private Tor network")
}

impl PrivNet {
    /// Generates and starts the network and waits (up to 4 minutes) until a C-tor client has
    /// bootstrapped, the consensus lists every relay and arti accepts it (up to 8 minutes).
    pub fn start() -> PrivNet {
        let (tor, gencert) = tor_binaries();
        let dir = TempDir::new("tornet");
        let net = dir.0.join("net");
        let script = crate::workspace_root().join("tests/tor/privnet.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&net)
            .env("TOR", &tor)
            .env("GENCERT", &gencert)
            .env("PORTOFF", free_offset().to_string())
            .env("AUTHS", AUTHS)
            .env("RELAYS", RELAYS)
            .env("EXITS", EXITS)
            .env("CLIENT", CLIENT)
            .env("HS", "h8")
            .env("OWNER_PID", std::process::id().to_string())
            .output()
            .expect("run tests/tor/privnet.sh");
        assert!(
            out.status.success(),
            "privnet.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let started = Instant::now();
        let mut net_handle = PrivNet {
            arti_toml: net.join("arti-net.toml"),
            bootstrap: Duration::ZERO,
            tors: Vec::new(),
            dir,
        };
        let names = AUTHS
            .split(' ')
            .chain(RELAYS.split(' '))
            .chain(EXITS.split(' '))
            .chain([CLIENT]);
        for name in names {
            let child = Command::new(&tor)
                .arg("-f")
                .arg(net.join(name).join("torrc"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start tor");
            net_handle.tors.push(child);
        }
        let client = net.join(CLIENT);
        let deadline = started + Duration::from_secs(240);
        loop {
            if Self::bootstrapped(&client) {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(client.join("notice.log")).unwrap_or_default();
                panic!(
                    "the private Tor network did not bootstrap in 4 minutes; client log:\n{}",
                    &log[log.len().saturating_sub(3000)..]
                );
            }
            for t in &mut net_handle.tors {
                if let Ok(Some(status)) = t.try_wait() {
                    panic!(
                        "a tor process exited early ({status}); logs in {}",
                        net.display()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // On a network this young arti may still refuse every consensus for a minute or two
        // (C tor is satisfied earlier): wait until a throwaway node's arti has bootstrapped.
        let probe_dir = TempDir::new("tornet-probe");
        let probe = Node::start_with(
            &probe_dir.0,
            &["--tor-network", net_handle.arti_toml.to_str().unwrap()],
        );
        loop {
            let tor = probe.get("/").json()["tor"].clone();
            if tor["bootstrapped_after_s"].is_number() {
                break;
            }
            assert!(
                Instant::now() < started + Duration::from_secs(480),
                "arti did not bootstrap on the private network in 8 minutes: {tor}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        drop(probe);
        net_handle.bootstrap = started.elapsed();
        net_handle
    }

    fn bootstrapped(client: &Path) -> bool {
        let log = std::fs::read_to_string(client.join("notice.log")).unwrap_or_default();
        if !log.contains("Bootstrapped 100%") {
            return false;
        }
        // The first consensuses list only some relays; with fewer, onion circuits fail.
        let consensus =
            std::fs::read_to_string(client.join("cached-microdesc-consensus")).unwrap_or_default();
        consensus.lines().filter(|l| l.starts_with("r ")).count() >= ALL_RELAYS
    }
}

impl Drop for PrivNet {
    fn drop(&mut self) {
        for t in &mut self.tors {
            let _ = t.kill();
        }
        for t in &mut self.tors {
            let _ = t.wait();
        }
    }
}

/// A node that is an onion service on `net` (and has a TCP peer listener too, to compare).
pub struct OnionNode {
    pub dir: TempDir,
    pub node: Node,
    pub tcp_port: u16,
    pub key_id: String,
    /// `httpkey://<onion>:6984/<key>/`
    pub onion_url: String,
    /// From spawning `thali serve` until the onion address was known.
    pub launched: Duration,
    pub spawned_at: Instant,
}

impl OnionNode {
    pub fn start(tag: &str, net: &PrivNet) -> OnionNode {
        Self::start_with(tag, net, &[])
    }

    pub fn start_with(tag: &str, net: &PrivNet, extra: &[&str]) -> OnionNode {
        let dir = TempDir::new(tag);
        let tcp_port = free_port();
        let spawned_at = Instant::now();
        let peer = format!("127.0.0.1:{tcp_port}");
        let mut args = vec![
            "--peer",
            &peer,
            "--tor-network",
            net.arti_toml.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let node = Node::start_with(&dir.0, &args);
        let (key_id, onion_url) = wait_onion(&node);
        OnionNode {
            dir,
            node,
            tcp_port,
            key_id,
            onion_url,
            launched: spawned_at.elapsed(),
            spawned_at,
        }
    }

    pub fn onion(&self, db: &str) -> String {
        format!("{}{db}", self.onion_url)
    }

    pub fn tcp(&self, db: &str) -> String {
        format!("httpkey://127.0.0.1:{}/{}/{db}", self.tcp_port, self.key_id)
    }

    /// Creates `db` (if needed) and lets `other` write to it.
    pub fn allow(&self, db: &str, other: &OnionNode) {
        self.allow_all(db, &[other]);
    }

    /// Creates `db` (if needed) and lets exactly `others` write to it.
    pub fn allow_all(&self, db: &str, others: &[&OnionNode]) {
        let _ = self.node.put(&format!("/{db}"), &json!({}));
        let names: Vec<&str> = others.iter().map(|o| o.key_id.as_str()).collect();
        let sec = json!({"members": {"names": names, "roles": []}});
        assert_eq!(self.node.put(&format!("/{db}/_security"), &sec).status, 200);
    }

    pub fn tor_status(&self) -> Value {
        self.node.get("/").json()["tor"].clone()
    }
}

/// Waits for `GET /` to show the node's onion httpkey URL; returns (key id, URL).
pub fn wait_onion(node: &Node) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = node.get("/").json();
        if let Some(url) = info["tor"]["url"].as_str() {
            return (info["key"].as_str().unwrap().to_string(), url.to_string());
        }
        assert!(
            info["tor"]["state"] != "failed",
            "the onion service failed: {}",
            info["tor"]
        );
        assert!(
            Instant::now() < deadline,
            "no onion address after 2 minutes: {}",
            info["tor"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one round measured.
#[derive(Debug, Default)]
pub struct Round {
    /// `thali serve` of A until B's first pull from A's onion URL finished.
    pub a_reachable: Duration,
    pub b_reachable: Duration,
    /// arti's own view: the service's first `Running` state, seconds after start.
    pub a_arti_reachable: Option<f64>,
    pub converged: Duration,
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!(
        "timed out after {}s waiting for {what}",
        limit.as_secs()
    ))
}

/// `POST /_replicate` that may take minutes: onion requests retry patiently.
pub fn replicate_slow(node: &Node, body: &Value) -> crate::Resp {
    let headers = [
        ("Authorization".to_string(), crate::admin_auth()),
        ("Content-Type".to_string(), "application/json".to_string()),
    ];
    let body = serde_json::to_vec(body).unwrap();
    crate::try_request_within(
        node.addr,
        "POST",
        "/_replicate",
        &headers,
        Some(&body),
        Duration::from_secs(900),
    )
    .unwrap_or_else(|e| panic!("POST /_replicate: {e}"))
}

/// A one-shot replication through `node`'s `_replicate`; Err with the answer if it failed.
fn one_shot(node: &Node, source: &str, target: &str) -> Result<Value, String> {
    let r = replicate_slow(node, &json!({"source": source, "target": target}));
    let v = r.json();
    if r.status == 200 && v["ok"] == true {
        Ok(v)
    } else {
        Err(format!(
            "replication {source} -> {target}: {} {v}",
            r.status
        ))
    }
}

fn doc_rev(node: &Node, db: &str, id: &str) -> String {
    node.get(&format!("/{db}/{id}")).json()["_rev"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The end-to-end round: two onion nodes replicate one database both ways over their `.onion`
/// httpkey URLs (one-shot, then a continuous `_replicate` one way and a `_replicator` document
/// the other way), a document edited on both sides converges to the same winner and conflict
/// on both, and later edits flow both ways.
pub fn round(net: &PrivNet) -> Result<Round, String> {
    let a = OnionNode::start("onion-a", net);
    let b = OnionNode::start("onion-b", net);
    let db = "shared";
    a.allow(db, &b);
    b.allow(db, &a);
    let docs: Vec<Value> = (0..50)
        .map(|i| json!({"_id": format!("a{i:03}"), "n": i, "from": "a"}))
        .collect();
    let r = a
        .node
        .post(&format!("/{db}/_bulk_docs"), &json!({ "docs": docs }));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        b.node
            .put(&format!("/{db}/b-only"), &json!({"from": "b"}))
            .status,
        201
    );
    let mut out = Round::default();

    // B pulls from A's onion URL, A pulls from B's: the first contact in each direction.
    one_shot(&b.node, &a.onion(db), db)?;
    out.a_reachable = a.spawned_at.elapsed();
    one_shot(&a.node, &b.onion(db), db)?;
    out.b_reachable = b.spawned_at.elapsed();
    out.a_arti_reachable = a.tor_status()["first_reachable_after_s"].as_f64();
    let count = |n: &Node| n.get(&format!("/{db}")).json()["doc_count"].as_u64();
    if count(&a.node) != Some(51) || count(&b.node) != Some(51) {
        return Err(format!(
            "after one-shot pulls: A has {:?} documents, B {:?}, expected 51",
            count(&a.node),
            count(&b.node)
        ));
    }

    // The same document edited on both sides, then continuous replication both ways.
    let rev = doc_rev(&a.node, db, "a000");
    let put = |n: &Node, body: Value| n.put(&format!("/{db}/a000"), &body).status;
    if put(&a.node, json!({"_rev": rev, "edited_on": "a"})) != 201
        || put(&b.node, json!({"_rev": rev, "edited_on": "b"})) != 201
    {
        return Err("editing a000 on both sides failed".into());
    }
    let started = Instant::now();
    let r = a.node.post(
        "/_replicate",
        &json!({"source": db, "target": b.onion(db), "continuous": true}),
    );
    if r.status != 202 {
        return Err(format!("starting the continuous replication: {}", r.text()));
    }
    let r = b.node.put(
        "/_replicator/b-to-a",
        &json!({"source": db, "target": a.onion(db), "continuous": true}),
    );
    if r.status != 201 {
        return Err(format!("creating the _replicator document: {}", r.text()));
    }
    let converged = |want: &dyn Fn(&Value) -> bool| {
        let (sa, sb) = (state(&a.node, db), state(&b.node, db));
        sa == sb && sa.get("a000").is_some_and(want)
    };
    let conflicted = |s: &Value| {
        s["leaves"].as_array().map(Vec::len) == Some(2)
            && s["winner"]["conflicts"].as_array().map(Vec::len) == Some(1)
    };
    wait_for(
        "A and B to converge on the conflicted a000",
        Duration::from_secs(300),
        || converged(&conflicted),
    )?;
    out.converged = started.elapsed();

    // A later edit on each side reaches the other through the continuous jobs.
    let winner = b.node.get(&format!("/{db}/a000?conflicts=true")).json();
    let mut body = winner.clone();
    body.as_object_mut().map(|o| o.remove("_conflicts"));
    body["resolved_on"] = json!("b");
    if b.node.put(&format!("/{db}/a000"), &body).status != 201 {
        return Err("resolving a000 on B failed".into());
    }
    let loser = winner["_conflicts"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if b.node.delete(&format!("/{db}/a000?rev={loser}")).status != 200 {
        return Err("deleting the losing revision on B failed".into());
    }
    assert_eq!(
        a.node
            .put(&format!("/{db}/late-a"), &json!({"from": "a"}))
            .status,
        201
    );
    let clean = |s: &Value| s["winner"]["conflicts"].is_null() && s["winner"]["rev"].is_string();
    wait_for(
        "the resolution (from B) and a new document (from A) on both nodes",
        Duration::from_secs(300),
        || converged(&clean) && count(&b.node) == Some(52),
    )?;
    let a000 = a.node.get(&format!("/{db}/a000")).json();
    if a000["resolved_on"] != "b" {
        return Err(format!("A's a000 is not B's resolution: {a000}"));
    }
    Ok(out)
}
