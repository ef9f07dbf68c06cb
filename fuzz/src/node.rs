//! An in-process node for the HTTP targets: the real router, store (fjall on disk in a
//! temporary directory), replicator and plugin runtimes, called without sockets so a target
//! runs hundreds of inputs a second. One per process, made on first use.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use thali_node::db::{Limits, Node};
use thali_node::http::{AppState, HttpConfig};
use tower::ServiceExt;

/// The database every HTTP target works on.
pub const DB: &str = "fuzz";
/// The database the design-document target replicates into: a hostile validator there cannot
/// refuse the other targets' writes.
pub const DDOC_DB: &str = "fuzz-ddoc";
/// Longest a request may take before the input counts as a hang.
const HANG: Duration = Duration::from_secs(20);
/// Inputs after which the database is deleted and made again, so it stays small.
const RECYCLE_EVERY: u64 = 3000;

/// Answers by status class (1xx … 5xx) since the process started: a run whose inputs never
/// get a 2xx is not exercising the write and read paths.
pub static STATUS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

thread_local! {
    /// Off while the harness makes its own checks, so `STATUS` counts the targets' requests.
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

pub fn status_counts() -> [u64; 6] {
    std::array::from_fn(|i| STATUS[i].load(Ordering::Relaxed))
}

pub struct Harness {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    auth: String,
    dir: PathBuf,
    inputs: AtomicU64,
    /// Keys the pairing target sends as (strangers to the node), one per input in turn.
    strangers: Vec<String>,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

pub fn harness() -> &'static Harness {
    HARNESS.get_or_init(Harness::start)
}

/// Removes the node's directory, if one was made; for the end of the process (the store is
/// still open, which Linux allows).
pub fn cleanup() {
    if let Some(h) = HARNESS.get() {
        let _ = std::fs::remove_dir_all(&h.dir);
    }
}

/// What a request answered.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

impl Harness {
    fn start() -> Harness {
        let dir = std::env::temp_dir().join(format!("thali-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory for the fuzz node");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let app = rt.block_on(async {
            let limits = Limits {
                plugins: thali_node::plugins::Limits {
                    timeout: Duration::from_millis(500),
                    ..Default::default()
                },
                ..Limits::default()
            };
            let node = Node::open(&dir, &Default::default(), limits).expect("open the fuzz node");
            let identity =
                Arc::new(thali_node::peer::Identity::generate().expect("a node identity"));
            let dialer = thali_node::peer::Dialer::new(identity.clone(), None);
            let replicator = thali_node::replicate::Replicator::new(node.clone(), dialer.clone());
            let pairing =
                thali_node::pair::Pairing::new(node.clone(), identity.clone(), dialer, None);
            // A code-pairing window that stays open, so pairing messages reach its sessions.
            let host = pairing.clone();
            tokio::spawn(async move {
                loop {
                    let wait = thali_node::pair::code::Action {
                        action: "wait".into(),
                        timeout: Some(600),
                        ..Default::default()
                    };
                    let _ = host.action(wait).await;
                }
            });
            // This node never shuts down; a dropped sender would read as shutdown to feeds.
            let (tx, shutdown) = tokio::sync::watch::channel(false);
            std::mem::forget(tx);
            thali_node::http::router(AppState {
                node,
                config: Arc::new(HttpConfig {
                    admin_password: "fuzz".into(),
                    cors_origins: Vec::new(),
                    max_request_size: 4 << 20,
                    body_timeout: Duration::from_secs(10),
                    cookie_secret: [7; 32],
                    allowed_hosts: Vec::new(),
                }),
                lockout: Default::default(),
                logged_out: Default::default(),
                shutdown,
                replicator,
                key_id: identity.key_id().into(),
                tor: None,
                pairing,
                settings: Arc::new(serde_json::json!({})),
            })
        });
        let h = Harness {
            rt,
            app,
            auth: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("admin:fuzz")
            ),
            dir,
            inputs: AtomicU64::new(0),
            // Many keys, so the per-key failure budget limits some inputs, not all of them.
            strangers: (0u32..65_536)
                .map(|i| {
                    let mut k = [7u8; 32];
                    k[..4].copy_from_slice(&i.to_be_bytes());
                    thali_node::peer::key_id(&k)
                })
                .collect(),
        };
        h.fill();
        h
    }

    /// The database the targets start from: documents with conflicts, deletions and
    /// attachments, a JavaScript view and validator, a Lua view, a Mango index.
    fn fill(&self) {
        let _ = self.request(Method::DELETE, &format!("/{DB}"), None, Vec::new());
        let _ = self.request(Method::DELETE, &format!("/{DDOC_DB}"), None, Vec::new());
        let created = self.request(Method::PUT, &format!("/{DB}"), None, Vec::new());
        assert!(created.status.is_success(), "create the fuzz database");
        let created = self.request(Method::PUT, &format!("/{DDOC_DB}"), None, Vec::new());
        assert!(created.status.is_success(), "create the fuzz database");
        let docs = serde_json::json!({"new_edits": false, "docs": [
            {"_id": "a", "_rev": "2-7051cbe5c8faecd085a3fa619e6e6337", "n": 1,
             "_revisions": {"start": 2, "ids": ["7051cbe5c8faecd085a3fa619e6e6337", "967a00dff5e02add41819138abb3284d"]}},
            {"_id": "a", "_rev": "2-b1", "n": 2, "_revisions": {"start": 2, "ids": ["b1", "967a00dff5e02add41819138abb3284d"]}},
            {"_id": "b", "_rev": "1-c", "_deleted": true},
            {"_id": "c", "_rev": "1-d", "tags": ["x", "y"], "nested": {"k": [1, 2, {"z": null}]},
             "_attachments": {"t.txt": {"content_type": "text/plain", "data": "aGVsbG8="}}},
            {"_id": "_design/v", "_rev": "1-e", "language": "javascript",
             "views": {"v": {"map": "function(doc){ if (doc.n) emit(doc.n, doc._id); }", "reduce": "_count"}},
             "validate_doc_update": "function(n, o, u){ if (n.forbid) throw({forbidden: 'no'}); }",
             "filters": {"f": "function(doc, req){ return !!doc.n; }"}},
            {"_id": "_design/l", "_rev": "1-f", "language": "lua",
             "views": {"l": {"map": "function(doc) if doc.tags then emit(doc.tags[1], 1) end end"}}},
        ]});
        let ok = self.request(
            Method::POST,
            &format!("/{DB}/_bulk_docs"),
            Some("application/json"),
            docs.to_string().into_bytes(),
        );
        assert!(
            ok.status.is_success(),
            "fill the fuzz database: {:?}",
            ok.body
        );
        let index = self.request(
            Method::POST,
            &format!("/{DB}/_index"),
            Some("application/json"),
            br#"{"index": {"fields": ["n"]}, "name": "by-n"}"#.to_vec(),
        );
        assert!(index.status.is_success(), "a Mango index: {:?}", index.body);
    }

    /// A number for ids no earlier input used; every `RECYCLE_EVERY` inputs the database
    /// starts over so it stays small however long the run.
    pub fn next_input(&self) -> u64 {
        let n = self.inputs.fetch_add(1, Ordering::Relaxed);
        if n > 0 && n.is_multiple_of(RECYCLE_EVERY) {
            self.fill();
        }
        n
    }

    /// Sends one request as the local admin and waits for the whole answer. A request that
    /// takes longer than `HANG` is a finding.
    pub fn request(
        &self,
        method: Method,
        uri: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Answer {
        let headers: &[(&str, &str)] = match content_type {
            Some(ct) => &[("content-type", ct)],
            None => &[],
        };
        self.send(method, uri, headers, body)
    }

    /// A JSON `POST` from a key no `_security` names, as the peer listener hands it on.
    pub fn post_as_stranger(&self, n: u64, uri: &str, body: Vec<u8>) -> Answer {
        let key = self.strangers[(n as usize) % self.strangers.len()].clone();
        self.send_as(
            Method::POST,
            uri,
            &[("content-type", "application/json")],
            body,
            Some(key),
        )
    }

    /// As `request`, with any headers.
    pub fn send(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        self.send_as(method, uri, headers, body, None)
    }

    /// As `send`; with `peer`, the request comes from that key over the peer listener.
    fn send_as(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        peer: Option<String>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        match peer {
            Some(k) => {
                req = req
                    .extension(thali_node::peer::PeerKeyId(k))
                    .extension(thali_node::peer::Stranger);
            }
            None => req = req.header("authorization", &self.auth),
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match req.body(Body::from(body)) {
            Ok(r) => r,
            // Not a request hyper would let through (the URI or a header is not valid).
            Err(_) => {
                return Answer {
                    status: StatusCode::BAD_REQUEST,
                    body: Bytes::from_static(br#"{"error":"bad_request","reason":"not HTTP"}"#),
                }
            }
        };
        let app = self.app.clone();
        let uri = uri.to_string();
        self.rt.block_on(async move {
            let work = async move {
                let res = app.oneshot(req).await.expect("the router is infallible");
                let status = res.status();
                let body = res.into_body().collect().await.map(|b| b.to_bytes());
                (status, body)
            };
            match tokio::time::timeout(HANG, work).await {
                Ok((status, Ok(body))) => {
                    if COUNTING.with(|c| c.get()) {
                        STATUS[usize::from(status.as_u16() / 100).min(5)]
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Answer { status, body }
                }
                Ok((status, Err(e))) => panic!("{uri}: the answer ({status}) broke off: {e}"),
                Err(_) => panic!("{uri}: no complete answer within {HANG:?} (hang)"),
            }
        })
    }

    /// The node's promises about any answer: no 5xx, errors shaped `{"error", "reason"}`, and
    /// the database still answers.
    pub fn check(&self, what: &str, a: &Answer) {
        self.check_allowing(what, a, false)
    }

    /// As `check`; `plugin_5xx` allows a 5xx that names a failed design-document function
    /// (CouchDB answers 500 when a validator throws something other than forbidden).
    pub fn check_allowing(&self, what: &str, a: &Answer, plugin_5xx: bool) {
        if a.status.is_server_error() && !plugin_5xx {
            panic!(
                "{what}: answered {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
        if a.status.is_client_error() || a.status.is_server_error() {
            let shaped = a.json().is_some_and(|v| {
                v.get("error").is_some_and(|e| e.is_string())
                    && v.get("reason").is_some_and(|r| r.is_string())
            });
            assert!(
                shaped,
                "{what}: error {} is not CouchDB-shaped: {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
        let info =
            self.uncounted(|| self.request(Method::GET, &format!("/{DB}"), None, Vec::new()));
        assert_eq!(
            info.status,
            StatusCode::OK,
            "{what}: the database stopped answering: {}",
            String::from_utf8_lossy(&info.body)
        );
    }

    fn uncounted<T>(&self, f: impl FnOnce() -> T) -> T {
        COUNTING.with(|c| c.set(false));
        let out = f();
        COUNTING.with(|c| c.set(true));
        out
    }
}
