//! `thali replicate SOURCE TARGET`: runs a replication with a progress line and a summary.
//! With a node running on `--node` the replication runs there (`POST /_replicate`, progress
//! from `_active_tasks`); otherwise this process opens the data directory and runs it itself.

use super::admin_password;
use super::client::request;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thali_db::{Limits, Node};
use thali_peer::Identity;
use thali_replicate::{Replicator, Spec};

type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(clap::Args, Debug)]
pub struct ReplicateArgs {
    /// A database of this node, `http(s)://[user:pass@]host:port/db` or `httpkey://host:port/<key>/db`.
    pub source: String,
    /// Same forms as SOURCE.
    pub target: String,
    /// Keep replicating new changes until interrupted.
    #[arg(long)]
    pub continuous: bool,
    /// Create the target database if it does not exist.
    #[arg(long)]
    pub create_target: bool,
    /// Only these documents (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    pub doc_ids: Vec<String>,
    /// Only documents matching this Mango selector (JSON).
    #[arg(long)]
    pub selector: Option<String>,
    /// A filter function `ddoc/name` on the source.
    #[arg(long)]
    pub filter: Option<String>,
    /// Query parameters for the filter function (a JSON object).
    #[arg(long)]
    pub query_params: Option<String>,
    /// Start after this source sequence when there is no checkpoint yet.
    #[arg(long)]
    pub since_seq: Option<String>,
    /// Changes per batch.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    pub parallelism: usize,
    /// Data directory (admin password of the running node, or the store to use without one).
    #[arg(long, default_value = "./thali-data")]
    pub data: PathBuf,
    /// The running node's local HTTP API.
    #[arg(long, default_value = "127.0.0.1:5984")]
    pub node: SocketAddr,
}

impl ReplicateArgs {
    fn body(&self) -> Result<Value, Box<dyn std::error::Error>> {
        let mut b = json!({
            "source": self.source,
            "target": self.target,
            "continuous": self.continuous,
            "create_target": self.create_target,
            "worker_batch_size": self.batch_size,
            "worker_processes": self.parallelism,
        });
        if !self.doc_ids.is_empty() {
            b["doc_ids"] = json!(self.doc_ids);
        }
        if let Some(s) = &self.selector {
            b["selector"] = serde_json::from_str(s).map_err(|e| format!("--selector: {e}"))?;
        }
        if let Some(f) = &self.filter {
            b["filter"] = json!(f);
        }
        if let Some(q) = &self.query_params {
            b["query_params"] =
                serde_json::from_str(q).map_err(|e| format!("--query-params: {e}"))?;
        }
        if let Some(s) = &self.since_seq {
            b["since_seq"] = serde_json::from_str(s).unwrap_or_else(|_| json!(s));
        }
        Ok(b)
    }
}

/// Renders the progress line from `_active_tasks`-shaped figures.
struct Progress {
    started: Instant,
    tty: bool,
    last_print: Instant,
    last_written: u64,
    last_at: Instant,
    rate: f64,
}

impl Progress {
    fn new() -> Progress {
        let now = Instant::now();
        Progress {
            started: now,
            tty: std::io::stderr().is_terminal(),
            last_print: now,
            last_written: 0,
            last_at: now,
            rate: 0.0,
        }
    }

    fn show(&mut self, t: &Value) {
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        let written = n("docs_written");
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64();
        if dt >= 0.5 {
            let inst = written.saturating_sub(self.last_written) as f64 / dt;
            self.rate = if self.rate == 0.0 {
                inst
            } else {
                0.5 * self.rate + 0.5 * inst
            };
            self.last_written = written;
            self.last_at = now;
        }
        let line = format!(
            "{:>9} read {:>9} written {:>6} failed {:>8.0} docs/s {:>9} pending  [{}]",
            n("docs_read"),
            written,
            n("doc_write_failures"),
            self.rate,
            n("changes_pending"),
            t["state"].as_str().unwrap_or("running"),
        );
        if self.tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if now.duration_since(self.last_print) >= Duration::from_secs(2) {
            eprintln!("{line}");
            self.last_print = now;
        }
    }

    fn finish(&self, source: &str, target: &str, t: &Value, outcome: &Result<Value, String>) {
        if self.tty {
            eprintln!();
        }
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        let secs = self.started.elapsed().as_secs_f64();
        match outcome {
            Ok(r) => {
                let seq = &r["source_last_seq"];
                println!("Replication completed: {source} -> {target}");
                println!(
                    "  docs read {}, written {}, write failures {}, revisions checked {}, missing {}",
                    n("docs_read"),
                    n("docs_written"),
                    n("doc_write_failures"),
                    n("revisions_checked"),
                    n("missing_revisions_found"),
                );
                println!(
                    "  {:.1} s, {:.0} docs/s; checkpoint at source seq {seq}",
                    secs,
                    n("docs_written") as f64 / secs.max(1e-3)
                );
            }
            Err(e) => {
                println!("Replication failed: {source} -> {target}: {e}");
                println!(
                    "  docs read {}, written {}, write failures {} before it stopped",
                    n("docs_read"),
                    n("docs_written"),
                    n("doc_write_failures")
                );
            }
        }
    }
}

pub async fn replicate(args: ReplicateArgs) -> CliResult {
    let body = args.body()?;
    let spec = Spec::parse(&body)?;
    let (source, target) = (spec.source.display(), spec.target.display());
    let reachable =
        std::net::TcpStream::connect_timeout(&args.node, Duration::from_secs(2)).is_ok();
    let (stats, outcome) = if reachable {
        via_node(&args, body, &spec).await?
    } else {
        in_process(&args, spec).await?
    };
    Progress::new().finish(&source, &target, &stats, &outcome);
    outcome.map(|_| ()).map_err(Into::into)
}

/// The replication runs in the node; we watch `_active_tasks` and cancel it on Ctrl-C.
async fn via_node(
    args: &ReplicateArgs,
    body: Value,
    spec: &Spec,
) -> Result<(Value, Result<Value, String>), Box<dyn std::error::Error>> {
    let password = admin_password(&args.data)?;
    let node = args.node;
    let (_, root) = {
        let p = password.clone();
        request(node, &p, "GET", "/", None, super::TIMEOUT)
            .await
            .map_err(|e| e.to_string())?
    };
    let rep_id = spec.full_id(root["uuid"].as_str().unwrap_or(""));
    let post = request(node, &password, "POST", "/_replicate", Some(&body), None);
    tokio::pin!(post);
    // A continuous replication's POST answers 202 and is done; the loop then only watches.
    let mut posted = false;
    let mut progress = Progress::new();
    let mut last = json!({});
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let outcome = loop {
        tokio::select! {
            r = &mut post, if !posted => {
                posted = true;
                let (status, v) = r.map_err(|e| e.to_string())?;
                if status == 202 {
                    // Continuous: it runs in the node; keep watching until Ctrl-C.
                    continue;
                }
                if status == 200 {
                    break Ok(v);
                }
                break Err(format!("HTTP {status}: {}: {}", v["error"].as_str().unwrap_or("?"), v["reason"].as_str().unwrap_or("")));
            }
            _ = tick.tick() => {
                if let Ok((200, tasks)) = request(node, &password, "GET", "/_active_tasks", None, super::TIMEOUT).await {
                    if let Some(t) = tasks.as_array().into_iter().flatten().find(|t| t["replication_id"] == json!(rep_id)) {
                        last = t.clone();
                        progress.show(&last);
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => {
                let cancel = json!({"cancel": true, "replication_id": rep_id});
                let _ = request(node, &password, "POST", "/_replicate", Some(&cancel), super::TIMEOUT).await;
                break Err("interrupted; the replication was stopped after a checkpoint".into());
            }
        }
    };
    if let Ok(v) = &outcome {
        if let Some(h) = v["history"].get(0) {
            last = json!({
                "docs_read": h["docs_read"],
                "docs_written": h["docs_written"],
                "doc_write_failures": h["doc_write_failures"],
                "revisions_checked": h["missing_checked"],
                "missing_revisions_found": h["missing_found"],
            });
        }
    }
    Ok((last, outcome))
}

/// No node running: open the data directory and replicate from this process.
async fn in_process(
    args: &ReplicateArgs,
    spec: Spec,
) -> Result<(Value, Result<Value, String>), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&args.data)?;
    let node = Node::open(&args.data, &Default::default(), Limits::default()).map_err(|e| {
        format!(
            "no node answers on {} and the data directory cannot be opened: {e}",
            args.node
        )
    })?;
    let identity = std::sync::Arc::new(Identity::load_or_create(&args.data)?);
    // No Tor here: an onion URL is refused with a message that says to use a `--tor` node.
    let rep = Replicator::new(node.clone(), thali_peer::Dialer::new(identity, None));
    let handle = rep.start(spec, None)?;
    let mut progress = Progress::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let wait = handle.wait();
    tokio::pin!(wait);
    let outcome = loop {
        tokio::select! {
            r = &mut wait => break r.map_err(|e| e.to_string()),
            _ = tick.tick() => {
                let mut t = handle.stats.info();
                t["state"] = json!(handle.stats.state().0.as_str());
                progress.show(&t);
            }
            _ = tokio::signal::ctrl_c() => {
                handle.cancel();
                let _ = handle.wait().await;
                break Err("interrupted; the replication was stopped after a checkpoint".into());
            }
        }
    };
    node.flush()?;
    Ok((handle.stats.info(), outcome))
}
