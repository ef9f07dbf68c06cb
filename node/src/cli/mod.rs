//! Command-line tools besides `serve`: `thali id`, `thali peer allow|deny|list`,
//! `thali replicate` and `thali migrate`. `peer` talks to the running node's local HTTP API (the
//! store allows one process per data directory); `replicate` does too when a node runs, and
//! replicates in-process when not; `migrate` needs the node stopped.

mod replicate;
pub use replicate::{replicate, ReplicateArgs};

use crate::db::{Level, Security};
use crate::peer::{parse_key_id, Identity};
use base64::Engine;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

type CliResult = Result<(), Box<dyn std::error::Error>>;

pub fn print_id(data: &Path, peers: &[String]) -> CliResult {
    std::fs::create_dir_all(data)?;
    let id = Identity::load_or_create(data)?;
    println!("{}", id.key_id());
    let mut urls: Vec<String> = peers
        .iter()
        .map(|p| format!("httpkey://{p}/{}/", id.key_id()))
        .collect();
    if urls.is_empty() {
        if let Ok(s) = std::fs::read_to_string(data.join("peer-urls")) {
            urls.extend(s.lines().filter(|l| !l.is_empty()).map(str::to_string));
        }
    }
    if let Some(addr) = crate::tor::last_address(data) {
        let url = format!("httpkey://{addr}/{}/", id.key_id());
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    if urls.is_empty() {
        println!("httpkey://<host>:<port>/{}/<db>   (start the node with --peer ADDR to listen for peers)", id.key_id());
    }
    for u in urls {
        println!("{u}");
    }
    Ok(())
}

pub enum PeerCommand {
    Allow {
        key: String,
        db: String,
        level: String,
    },
    Deny {
        key: String,
        db: String,
    },
    List {
        db: String,
    },
}

/// The running node's admin password: `THALI_ADMIN_PASSWORD`, else the generated one in `DIR`.
fn admin_password(data: &Path) -> Result<String, &'static str> {
    std::env::var("THALI_ADMIN_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .or_else(|| {
            std::fs::read_to_string(data.join("admin.password"))
                .ok()
                .map(|s| s.trim().to_string())
        })
        .ok_or(
            "no admin password: set THALI_ADMIN_PASSWORD or point --data at the node's directory",
        )
}

pub fn peer(data: &Path, node: SocketAddr, cmd: PeerCommand) -> CliResult {
    let password = admin_password(data)?;
    let db = match &cmd {
        PeerCommand::Allow { db, .. } | PeerCommand::Deny { db, .. } | PeerCommand::List { db } => {
            db.clone()
        }
    };
    crate::db::validate_db_name(&db).map_err(|e| e.reason())?;
    let path = format!("/{}/_security", db.replace('/', "%2F"));
    let (status, sec) =
        request(node, &password, "GET", &path, None, TIMEOUT).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("reading {path}: HTTP {status}: {sec}").into());
    }
    let mut sec = Security::stored(Some(sec));
    match cmd {
        PeerCommand::List { .. } => {
            for (name, level) in sec.grants() {
                println!("{}\t{name}", level.name());
            }
            return Ok(());
        }
        PeerCommand::Allow { key, level, .. } => {
            parse_key_id(&key)?;
            let l = Level::parse(&level)
                .ok_or_else(|| format!("level must be read, write or admin, not {level:?}"))?;
            sec.grant(&key, l);
            println!("{key} may now {level} {db}");
        }
        PeerCommand::Deny { key, .. } => {
            parse_key_id(&key)?;
            if !sec.revoke(&key) {
                println!("{key} had no access to {db}");
                return Ok(());
            }
            println!("{key} may no longer use {db}");
        }
    }
    let (status, body) = request(node, &password, "PUT", &path, Some(sec.as_value()), TIMEOUT)
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("writing {path}: HTTP {status}: {body}").into());
    }
    Ok(())
}

const TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));

/// A minimal HTTP/1.1 exchange with the local node (JSON in, JSON out).
fn request(
    node: SocketAddr,
    password: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Option<Duration>,
) -> Result<(u16, Value), Box<dyn std::error::Error + Send + Sync>> {
    let mut s = TcpStream::connect_timeout(&node, Duration::from_secs(5))
        .map_err(|e| format!("cannot reach the node at {node} (is it running?): {e}"))?;
    s.set_read_timeout(timeout)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("admin:{password}"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {node}\r\nConnection: close\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("malformed HTTP status line")?;
    Ok((
        status,
        serde_json::from_str(body.trim()).unwrap_or(Value::Null),
    ))
}

/// `thali migrate`: the node must be stopped (the engine's lock says so otherwise).
pub fn migrate(data: &Path, to: crate::store::Kind) -> CliResult {
    let started = std::time::Instant::now();
    let r = crate::store::migrate::migrate(data, to, crate::store::DEFAULT_CACHE)?;
    println!(
        "migrated {} from {} to {}: {} keyspaces, {} entries ({} bytes) copied and verified in {:.1} s",
        data.display(),
        r.from.map(|k| k.name()).unwrap_or("?"),
        to.name(),
        r.keyspaces,
        r.entries,
        r.bytes,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
