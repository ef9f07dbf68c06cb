//! The node's metrics, one registry (`prometheus-client`) that every layer records into and
//! both `GET /_node/_local/_prometheus` (Prometheus text) and `GET /_node/_local/_stats`
//! (CouchDB's JSON shape) read. Names follow CouchDB 3 where it has one (`couchdb_httpd_…`,
//! `couchdb_database_reads`, …); the rest are `thali_…`. Counters get `_total` when
//! rendered, as OpenMetrics requires.
//!
//! Gauges that describe a moment (open databases, disk size, memory, Tor's state) are set by
//! whoever renders, just before rendering (`Gauges`), so nothing polls in the background.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// The methods and status codes CouchDB's `_stats` always lists.
pub const METHODS: [&str; 7] = ["COPY", "DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"];
pub const CODES: [u16; 19] = [
    200, 201, 202, 204, 206, 301, 304, 400, 401, 403, 404, 405, 406, 409, 412, 413, 415, 416, 500,
];

pub struct Metrics {
    registry: Registry,
    started: Instant,
    pub requests: Counter,
    pub methods: Family<MethodLabel, Counter>,
    pub codes: Family<CodeLabel, Counter>,
    pub request_time: Histogram,
    pub reads: Counter,
    pub writes: Counter,
    pub open_databases: Gauge,
    pub uptime: Gauge,
    pub repl_docs_read: Counter,
    pub repl_docs_written: Counter,
    pub repl_write_failures: Counter,
    pub repl_jobs: Gauge,
    pub plugin_errors: Counter,
    pub tor_reachable: Gauge,
    pub storage_bytes: Gauge,
    pub memory_bytes: Gauge,
    pub pairings: Counter,
    /// The counters of `METHODS` and `CODES`, taken from the families once, so a request
    /// in the dispatcher allocates no label.
    method_counters: Vec<(&'static str, Counter)>,
    code_counters: Vec<(u16, Counter)>,
    /// Request times kept for `_stats`' percentiles (the last 1000).
    recent: Mutex<std::collections::VecDeque<f64>>,
    /// The last plugin failures with what they concern (for the dashboard).
    plugin_events: Mutex<std::collections::VecDeque<Value>>,
    /// When each peer key last made a request (unix seconds; at most `MAX_PEERS_SEEN` keys).
    peers_seen: Mutex<std::collections::HashMap<String, u64>>,
}

const MAX_PEERS_SEEN: usize = 4096;

/// The node's metrics (created on first use).
pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Values of the moment, set just before rendering.
#[derive(Default)]
pub struct Gauges {
    pub open_databases: i64,
    pub storage_bytes: i64,
    pub replication_jobs: i64,
    /// `None` without `--tor`.
    pub tor_reachable: Option<bool>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            started: Instant::now(),
            requests: Counter::default(),
            methods: Family::default(),
            codes: Family::default(),
            request_time: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            reads: Counter::default(),
            writes: Counter::default(),
            open_databases: Gauge::default(),
            uptime: Gauge::default(),
            repl_docs_read: Counter::default(),
            repl_docs_written: Counter::default(),
            repl_write_failures: Counter::default(),
            repl_jobs: Gauge::default(),
            plugin_errors: Counter::default(),
            tor_reachable: Gauge::default(),
            storage_bytes: Gauge::default(),
            memory_bytes: Gauge::default(),
            pairings: Counter::default(),
            recent: Mutex::default(),
            plugin_events: Mutex::default(),
            peers_seen: Mutex::default(),
            method_counters: Vec::new(),
            code_counters: Vec::new(),
        };

        r.register(
            "couchdb_httpd_requests",
            "HTTP requests",
            m.requests.clone(),
        );
        r.register(
            "couchdb_httpd_request_methods",
            "HTTP requests by method",
            m.methods.clone(),
        );
        r.register(
            "couchdb_httpd_status_codes",
            "HTTP answers by status code",
            m.codes.clone(),
        );
        r.register(
            "couchdb_request_time_seconds",
            "Time to the answer's headers",
            m.request_time.clone(),
        );
        r.register("couchdb_database_reads", "Documents read", m.reads.clone());
        r.register(
            "couchdb_database_writes",
            "Documents written",
            m.writes.clone(),
        );
        r.register(
            "couchdb_open_databases",
            "Databases open",
            m.open_databases.clone(),
        );
        r.register(
            "couchdb_uptime_seconds",
            "Seconds since the node started",
            m.uptime.clone(),
        );
        r.register(
            "thali_replication_docs_read",
            "Documents the replicator read from sources",
            m.repl_docs_read.clone(),
        );
        r.register(
            "thali_replication_docs_written",
            "Documents the replicator wrote to targets",
            m.repl_docs_written.clone(),
        );
        r.register(
            "thali_replication_doc_write_failures",
            "Documents a target refused",
            m.repl_write_failures.clone(),
        );
        r.register(
            "thali_replication_jobs",
            "Replication jobs running",
            m.repl_jobs.clone(),
        );
        r.register(
            "thali_plugin_errors",
            "Plugin calls that failed (threw, timed out, ran out of memory or CPU)",
            m.plugin_errors.clone(),
        );
        r.register(
            "thali_tor_reachable",
            "1 when the onion service is reachable, 0 otherwise (absent without --tor)",
            m.tor_reachable.clone(),
        );
        r.register(
            "thali_storage_bytes",
            "Bytes the store takes on disk",
            m.storage_bytes.clone(),
        );
        r.register(
            "thali_memory_bytes",
            "Resident memory of the node",
            m.memory_bytes.clone(),
        );
        r.register(
            "thali_pairings",
            "Peers paired (invites and codes)",
            m.pairings.clone(),
        );
        let method_counters = METHODS
            .iter()
            .map(|&method| {
                let label = MethodLabel {
                    method: method.to_string(),
                };
                (method, m.methods.get_or_create(&label).clone())
            })
            .collect();
        let code_counters = CODES
            .iter()
            .map(|&code| {
                let label = CodeLabel {
                    code: code.to_string(),
                };
                (code, m.codes.get_or_create(&label).clone())
            })
            .collect();
        Metrics {
            registry: r,
            method_counters,
            code_counters,
            ..m
        }
    }

    /// A plugin failure on a document (counted by the runtime already): kept, the last 50.
    pub fn plugin_failed(&self, db: &str, ddoc: &str, function: &str, doc: &str, error: &str) {
        if let Ok(mut q) = self.plugin_events.lock() {
            if q.len() >= 50 {
                q.pop_back();
            }
            q.push_front(
                json!({"at": crate::clock::unix_now(), "db": db, "ddoc": ddoc,
                                "function": function, "doc": doc, "error": error}),
            );
        }
    }

    /// The last plugin failures, newest first.
    pub fn plugin_error_events(&self) -> Vec<Value> {
        self.plugin_events
            .lock()
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// A request from a peer key.
    pub fn peer_seen(&self, key: &str) {
        if let Ok(mut m) = self.peers_seen.lock() {
            let now = crate::clock::unix_now();
            if let Some(t) = m.get_mut(key) {
                *t = now;
            } else if m.len() < MAX_PEERS_SEEN {
                m.insert(key.to_string(), now);
            }
        }
    }

    /// When `key` last made a request, if since the node started.
    pub fn peer_last_seen(&self, key: &str) -> Option<u64> {
        self.peers_seen.lock().ok()?.get(key).copied()
    }

    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// One answered request.
    pub fn request(&self, method: &str, status: u16, secs: f64) {
        self.requests.inc();
        match self.method_counters.iter().find(|(m, _)| *m == method) {
            Some((_, c)) => {
                c.inc();
            }
            None => {
                let label = MethodLabel {
                    method: method.to_string(),
                };
                self.methods.get_or_create(&label).inc();
            }
        }
        match self.code_counters.iter().find(|(c, _)| *c == status) {
            Some((_, c)) => {
                c.inc();
            }
            None => {
                let label = CodeLabel {
                    code: status.to_string(),
                };
                self.codes.get_or_create(&label).inc();
            }
        }
        self.request_time.observe(secs);
        if let Ok(mut r) = self.recent.lock() {
            if r.len() >= 1000 {
                r.pop_front();
            }
            r.push_back(secs);
        }
    }

    fn set(&self, g: &Gauges) {
        self.open_databases.set(g.open_databases);
        self.storage_bytes.set(g.storage_bytes);
        self.repl_jobs.set(g.replication_jobs);
        self.uptime.set(self.started.elapsed().as_secs() as i64);
        self.memory_bytes.set(resident_bytes() as i64);
        if let Some(t) = g.tor_reachable {
            self.tor_reachable.set(i64::from(t));
        }
    }

    /// Prometheus text exposition.
    pub fn prometheus(&self, g: &Gauges) -> String {
        self.set(g);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// CouchDB's `_stats` object: `{"couchdb": {"httpd": {"requests": {"value", "type", "desc"}}, …}}`.
    pub fn stats(&self, g: &Gauges) -> Value {
        self.set(g);
        let c = |v: u64, desc: &str| json!({"value": v, "type": "counter", "desc": desc});
        let gauge = |v: i64, desc: &str| json!({"value": v, "type": "gauge", "desc": desc});
        let mut methods = Map::new();
        for (m, n) in &self.method_counters {
            methods.insert(
                m.to_string(),
                c(n.get(), &format!("number of HTTP {m} requests")),
            );
        }
        let mut codes = Map::new();
        for (code, n) in &self.code_counters {
            let desc = format!("number of HTTP {code} responses");
            codes.insert(code.to_string(), c(n.get(), &desc));
        }
        json!({
            "couchdb": {
                "httpd": {"requests": c(self.requests.get(), "number of HTTP requests")},
                "httpd_request_methods": methods,
                "httpd_status_codes": codes,
                "database_reads": c(self.reads.get(), "number of times a document was read from a database"),
                "database_writes": c(self.writes.get(), "number of times a database was changed"),
                "open_databases": gauge(self.open_databases.get(), "number of open databases"),
                "request_time": {"value": self.request_time_summary(), "type": "histogram",
                                 "desc": "length of a request inside CouchDB without MochiWeb"},
            },
            "thali": {
                "replication": {
                    "docs_read": c(self.repl_docs_read.get(), "documents the replicator read"),
                    "docs_written": c(self.repl_docs_written.get(), "documents the replicator wrote"),
                    "doc_write_failures": c(self.repl_write_failures.get(), "documents a target refused"),
                    "jobs": gauge(self.repl_jobs.get(), "replication jobs running"),
                },
                "plugin_errors": c(self.plugin_errors.get(), "plugin calls that failed"),
                "pairings": c(self.pairings.get(), "peers paired"),
                "storage_bytes": gauge(self.storage_bytes.get(), "bytes on disk"),
                "memory_bytes": gauge(self.memory_bytes.get(), "resident memory"),
                "uptime_seconds": gauge(self.uptime.get(), "seconds since start"),
            }
        })
    }

    /// CouchDB's histogram summary (in milliseconds) over the recent requests.
    fn request_time_summary(&self) -> Value {
        let mut v: Vec<f64> = self
            .recent
            .lock()
            .map(|r| r.iter().map(|s| s * 1000.0).collect())
            .unwrap_or_default();
        if v.is_empty() {
            return json!({"min": 0, "max": 0, "arithmetic_mean": 0, "median": 0, "n": 0,
                          "percentile": []});
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        json!({"min": v[0], "max": v[v.len() - 1], "arithmetic_mean": mean, "median": at(0.5),
               "n": v.len(),
               "percentile": [[50, at(0.5)], [75, at(0.75)], [90, at(0.9)], [95, at(0.95)],
                              [99, at(0.99)], [999, at(0.999)]]})
    }
}

/// Resident memory from `/proc/self/statm` (0 where there is none).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        // SAFETY: sysconf only reads a system constant.
        .map(|pages| pages * (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64))
        .unwrap_or(0)
}
