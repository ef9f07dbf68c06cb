//! Command-line tools besides `serve`: `thali id`, `thali peer allow|deny|list`,
//! `thali replicate` and `thali migrate`. `peer` talks to the running node's local HTTP API (the
//! store allows one process per data directory); `replicate` does too when a node runs, and
//! replicates in-process when not; `migrate` needs the node stopped.

mod client;
mod replicate;
pub use replicate::{replicate, ReplicateArgs};

use client::request_blocking as request;
use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use thali_db::{Level, Security};
use thali_peer::{parse_key_id, Identity};

type CliResult = Result<(), Box<dyn std::error::Error>>;

/// Where the running node is, for commands that go through its local API.
#[derive(clap::Args, Clone, Debug)]
pub struct NodeArgs {
    /// Data directory of the node (for its admin password).
    #[arg(long, global = true, default_value = "./thali-data")]
    pub data: std::path::PathBuf,
    /// The node's local HTTP API.
    #[arg(long, global = true, default_value = "127.0.0.1:5984")]
    pub node: SocketAddr,
}

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
    if let Some(addr) = thali_tor::last_address(data) {
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
    /// With a database: the keys allowed on it; without: the paired peers.
    List {
        db: Option<String>,
    },
    /// Revokes a paired peer everywhere and deletes the replications pairing made for it.
    Remove {
        name: String,
    },
    /// The nodes found nearby by `serve --lan`.
    Discover,
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
        PeerCommand::Allow { db, .. }
        | PeerCommand::Deny { db, .. }
        | PeerCommand::List { db: Some(db) } => db.clone(),
        PeerCommand::List { db: None } => return paired_peers(node, &password),
        PeerCommand::Discover => return discover(node, &password),
        PeerCommand::Remove { name } => {
            let path = format!("/_thali/paired/{}", enc(name));
            let v = call(node, &password, "DELETE", &path, None)?;
            println!(
                "removed {} ({}): access revoked on {}; {} replication(s) deleted",
                v["name"].as_str().unwrap_or(name),
                v["key"].as_str().unwrap_or("?"),
                list(&v["revoked"]),
                v["replications_removed"].as_array().map_or(0, Vec::len)
            );
            return Ok(());
        }
    };
    thali_db::validate_db_name(&db).map_err(|e| e.reason())?;
    let path = format!("/{}/_security", db.replace('/', "%2F"));
    let (status, sec) =
        request(node, &password, "GET", &path, None, TIMEOUT).map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("reading {path}: HTTP {status}: {sec}").into());
    }
    let mut sec = Security::stored(Some(sec));
    match cmd {
        PeerCommand::List { .. } | PeerCommand::Remove { .. } | PeerCommand::Discover => {
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

/// `thali migrate`: the node must be stopped (the engine's lock says so otherwise).
pub fn migrate(data: &Path, to: thali_store::Kind) -> CliResult {
    let started = std::time::Instant::now();
    let r = thali_store::migrate::migrate(data, to, thali_store::DEFAULT_CACHE)?;
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

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A JSON array of strings as `a, b` (or `nothing`).
fn list(v: &Value) -> String {
    let items: Vec<&str> = v
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "nothing".into()
    } else {
        items.join(", ")
    }
}

/// One admin call that must answer 200, its error shown as the node worded it.
fn call(
    node: SocketAddr,
    password: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, Box<dyn std::error::Error>> {
    // Joining over Tor may take minutes (circuits, retries).
    let (status, v) = request(
        node,
        password,
        method,
        path,
        body,
        Some(Duration::from_secs(600)),
    )
    .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!(
            "{}: {}",
            v["error"].as_str().unwrap_or("error"),
            v["reason"].as_str().unwrap_or(&format!("HTTP {status}"))
        )
        .into());
    }
    Ok(v)
}

fn paired_peers(node: SocketAddr, password: &str) -> CliResult {
    let v = call(node, password, "GET", "/_thali/paired", None)?;
    let peers = v.as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        println!("no paired peers (thali invite / thali join pair one)");
    }
    for p in peers {
        let dbs: Vec<String> = p["dbs"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(d, l)| format!("{d}:{}", l.as_str().unwrap_or("?")))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{}\t{}\t{}",
            p["name"].as_str().unwrap_or("?"),
            p["key"].as_str().unwrap_or("?"),
            if dbs.is_empty() {
                "no access".into()
            } else {
                dbs.join(" ")
            }
        );
        for r in p["replications"].as_array().into_iter().flatten() {
            let state = r["state"].as_str().unwrap_or("starting");
            let docs = r["stats"]["docs_written"].as_u64().unwrap_or(0);
            let when = r["state_time"].as_str().unwrap_or("");
            println!(
                "\t{}: {state}, {docs} docs written {when}",
                r["id"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

pub struct InviteArgs {
    pub db: String,
    pub level: String,
    pub expires: String,
    pub via: Option<String>,
    pub host: Option<String>,
    pub name: Option<String>,
}

pub enum InviteCommand {
    Create(InviteArgs),
    List,
    Revoke { id: String },
}

pub fn invite(data: &Path, node: SocketAddr, cmd: InviteCommand) -> CliResult {
    let password = admin_password(data)?;
    match cmd {
        InviteCommand::Create(a) => {
            let body = serde_json::json!({"db": a.db, "level": a.level, "expires": a.expires,
                                          "via": a.via, "host": a.host, "name": a.name});
            let v = call(node, &password, "POST", "/_thali/invites", Some(&body))?;
            let uri = v["uri"].as_str().unwrap_or_default();
            println!(
                "Invite {} for {} ({} access), single use, until {} (unix time). On the other device run:\n\n  thali join '{uri}'\n",
                v["id"].as_str().unwrap_or("?"),
                a.db,
                a.level,
                v["expires"]
            );
            match qrcode::QrCode::new(uri.as_bytes()) {
                Ok(qr) => println!(
                    "{}",
                    qr.render::<qrcode::render::unicode::Dense1x2>()
                        .dark_color(qrcode::render::unicode::Dense1x2::Light)
                        .light_color(qrcode::render::unicode::Dense1x2::Dark)
                        .build()
                ),
                Err(e) => println!("(no QR code: {e})"),
            }
        }
        InviteCommand::List => {
            let v = call(node, &password, "GET", "/_thali/invites", None)?;
            for i in v.as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}\texpires {}{}",
                    i["id"].as_str().unwrap_or("?"),
                    i["status"].as_str().unwrap_or("?"),
                    i["db"].as_str().unwrap_or("?"),
                    i["level"].as_str().unwrap_or("?"),
                    i["expires"],
                    i["used_by"]
                        .as_str()
                        .map(|k| format!("\tused by {k}"))
                        .unwrap_or_default()
                );
            }
        }
        InviteCommand::Revoke { id } => {
            call(
                node,
                &password,
                "DELETE",
                &format!("/_thali/invites/{}", enc(&id)),
                None,
            )?;
            println!("invite {id} revoked");
        }
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct JoinArgs {
    /// The `thali:join?…` URI `thali invite` printed.
    pub invite: String,
    /// The name to know the inviting device by (default: the one in the invite).
    #[arg(long)]
    pub name: Option<String>,
    /// The name the inviting device will know this one by.
    #[arg(long = "as")]
    pub as_name: Option<String>,
    /// Pair without setting up replication.
    #[arg(long)]
    pub no_replicate: bool,
}

/// `thali join`: the running node dials the inviter and pairs.
pub fn join(data: &Path, node: SocketAddr, a: JoinArgs) -> CliResult {
    let password = admin_password(data)?;
    let started = std::time::Instant::now();
    let body = serde_json::json!({"invite": a.invite, "name": a.name, "as_name": a.as_name,
                                  "replicate": !a.no_replicate});
    let v = call(node, &password, "POST", "/_thali/join", Some(&body))?;
    println!(
        "paired with {} ({}) in {:.1} s: {} access to {} both ways{}",
        v["name"].as_str().unwrap_or("?"),
        v["key"].as_str().unwrap_or("?"),
        started.elapsed().as_secs_f64(),
        v["level"].as_str().unwrap_or("?"),
        v["db"].as_str().unwrap_or("?"),
        if a.no_replicate {
            String::new()
        } else {
            format!("; continuous replication: {}", list(&v["replications"]))
        }
    );
    Ok(())
}

fn discover(node: SocketAddr, password: &str) -> CliResult {
    let v = call(node, password, "GET", "/_thali/peers", None)?;
    let nodes = v.as_array().cloned().unwrap_or_default();
    if nodes.is_empty() {
        println!("no node found nearby yet");
    }
    for n in nodes {
        let state = match (n["name"].as_str(), n["known"].as_bool()) {
            (Some(name), _) => format!("paired as {name}"),
            (None, Some(true)) => "known".to_string(),
            _ => "new".to_string(),
        };
        println!(
            "{}\t{}\t{}\tlast seen {}",
            n["key"].as_str().unwrap_or("?"),
            list(&n["addresses"]),
            state,
            n["last_seen"]
        );
    }
    Ok(())
}

/// Reads a yes/no answer from the terminal (anything but y/yes is no).
fn ask(question: &str) -> bool {
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        return false;
    }
    matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

fn show_code(code: &str) -> String {
    if code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()) {
        format!("{} {}", &code[..3], &code[3..])
    } else {
        code.to_string()
    }
}

pub enum PairCommand {
    /// Wait for another device to ask.
    Wait {
        timeout: u64,
        as_name: Option<String>,
    },
    /// Ask a device (an httpkey URL, or the start of a discovered key).
    With {
        with: String,
        db: String,
        level: String,
        name: Option<String>,
        as_name: Option<String>,
        no_replicate: bool,
    },
}

/// The host's side of `thali pair --wait`. Several devices may ask; the user says yes only to
/// the one showing the same code, and a declined one leaves the window open for the next.
fn wait_for_guest(
    timeout: u64,
    as_name: Option<String>,
    post: &dyn Fn(Value) -> Result<Value, Box<dyn std::error::Error>>,
) -> CliResult {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    loop {
        let left = until
            .saturating_duration_since(std::time::Instant::now())
            .as_secs();
        let v = post(
            serde_json::json!({"action": "wait", "timeout": left.max(1), "as_name": as_name}),
        )?;
        let session = v["session"].clone();
        println!(
            "{} ({}) asks to pair: {} access to {}.\nCode: {}",
            v["name"].as_str().unwrap_or("no name given"),
            v["key"].as_str().unwrap_or("?"),
            v["level"].as_str().unwrap_or("?"),
            v["db"].as_str().unwrap_or("?"),
            show_code(v["code"].as_str().unwrap_or("?"))
        );
        let yes = ask("Does the other device show the same code?");
        let v = post(serde_json::json!({"action": "decide", "session": session, "confirm": yes}))?;
        if v["paired"] == true {
            println!("paired with {}", v["key"].as_str().unwrap_or("?"));
            return Ok(());
        }
        println!("not paired with that device; still waiting for another");
    }
}

/// `thali pair`: both users see a 6-digit code and confirm it on their own device.
pub fn pair(data: &Path, node: SocketAddr, cmd: PairCommand) -> CliResult {
    let password = admin_password(data)?;
    let post = |body: Value| call(node, &password, "POST", "/_thali/pairing", Some(&body));
    match cmd {
        PairCommand::Wait { timeout, as_name } => {
            println!("waiting up to {timeout} s for a device to pair (thali pair --with on the other one)…");
            wait_for_guest(timeout, as_name, &post)?;
        }
        PairCommand::With {
            with,
            db,
            level,
            name,
            as_name,
            no_replicate,
        } => {
            let v = post(
                serde_json::json!({"action": "start", "with": with, "db": db,
                                             "level": level}),
            )?;
            let session = v["session"].clone();
            println!(
                "pairing with {} for {} access to {}.\nCode: {}",
                v["key"].as_str().unwrap_or("?"),
                level,
                db,
                show_code(v["code"].as_str().unwrap_or("?"))
            );
            if !ask("Does the other device show the same code?") {
                post(serde_json::json!({"action": "cancel", "session": session}))?;
                println!("not paired");
                return Ok(());
            }
            println!("waiting for the other device's user to confirm…");
            let v = post(
                serde_json::json!({"action": "confirm", "session": session, "name": name,
                                             "as_name": as_name, "replicate": !no_replicate}),
            )?;
            println!(
                "paired with {} ({}): {} access to {} both ways{}",
                v["name"].as_str().unwrap_or("?"),
                v["key"].as_str().unwrap_or("?"),
                v["level"].as_str().unwrap_or("?"),
                v["db"].as_str().unwrap_or("?"),
                if no_replicate {
                    String::new()
                } else {
                    format!("; continuous replication: {}", list(&v["replications"]))
                }
            );
        }
    }
    Ok(())
}
