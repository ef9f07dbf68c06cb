//! Pairing: how two nodes come to trust each other without anyone copying keys by hand.
//!
//! By invite: the inviter's admin makes an invite (`create_invite`) for one database and level;
//! the joining node dials the URL in it over mutual TLS (TCP or onion) and shows the secret
//! (`join` → the inviter's `accept`). The inviter checks the secret against its stored hash,
//! marks the invite used (durably, before anything is granted), grants the joiner's TLS key the
//! level on the database and names it; the joiner grants the inviter the same and, unless told
//! not to, writes two continuous `_replicator` documents (push and pull), since it is the side
//! that can dial. Paired peers are kept by name (`peers`); `remove` revokes every grant of the
//! key and deletes the replications pairing made.
//!
//! State (invites, paired peers) is one node-meta record written durably on every change;
//! changes are serialised by one lock.

pub mod code;
pub mod invite;
pub mod lan;

use invite::InviteUri;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use thali_db::{Caller, DbError, Level, Node};
use thali_peer::{Dialer, HttpKeyUrl, Identity};

/// The boundary error: CouchDB's shape.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}: {reason}")]
pub struct PairError {
    pub status: u16,
    pub error: &'static str,
    pub reason: String,
}

impl PairError {
    fn new(status: u16, error: &'static str, reason: impl Into<String>) -> PairError {
        PairError {
            status,
            error,
            reason: reason.into(),
        }
    }
    fn bad(reason: impl Into<String>) -> PairError {
        PairError::new(400, "bad_request", reason)
    }
    fn forbidden(reason: impl Into<String>) -> PairError {
        PairError::new(403, "forbidden", reason)
    }
}

impl From<DbError> for PairError {
    fn from(e: DbError) -> PairError {
        PairError::new(e.status(), e.name(), e.reason())
    }
}

pub type PairResult<T> = Result<T, PairError>;

/// Failed pairing attempts allowed per key, and per address, per window. There is no budget
/// shared by everyone: throw-away keys from elsewhere can never spend a real guest's.
const FAILS_PER_KEY: usize = 5;
const FAILS_PER_ADDRESS: usize = 30;
/// Keys whose failures are remembered at once.
const MAX_TRACKED_KEYS: usize = 65_536;
const FAIL_WINDOW: Duration = Duration::from_secs(600);
/// Invites expire after an hour unless the admin says otherwise, and after 30 days at most.
const DEFAULT_EXPIRY: u64 = 3600;
const MAX_EXPIRY: u64 = 30 * 86400;
/// Invites kept after they were used, revoked or expired (for `thali invite list`).
const KEEP_SPENT: usize = 50;
const META_KEY: &str = "pairing";
/// The most read of the other node's answer to a pairing message (they are a few hundred bytes).
pub const MAX_MESSAGE: usize = 16 << 10;

/// A database pairing may grant on: a valid name that is not a system database. `_replicator`,
/// `_users` and every other `_`-prefixed database are the node's own: a peer granted one could
/// run replications as this node or read its credentials.
pub fn pairable_db(db: &str) -> PairResult<()> {
    thali_db::validate_db_name(db)?;
    if db.starts_with('_') {
        return Err(PairError::forbidden(format!(
            "pairing never shares a system database ({db})"
        )));
    }
    Ok(())
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    invites: Vec<Invite>,
    peers: Vec<Peer>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Invite {
    id: String,
    secret_sha256: String,
    db: String,
    level: String,
    created: u64,
    expires: u64,
    #[serde(default)]
    used_by: Option<String>,
    #[serde(default)]
    used_at: Option<u64>,
    #[serde(default)]
    revoked: bool,
}

impl Invite {
    fn status(&self, now: u64) -> &'static str {
        if self.revoked {
            "revoked"
        } else if self.used_by.is_some() {
            "used"
        } else if now >= self.expires {
            "expired"
        } else {
            "open"
        }
    }
    fn public(&self, now: u64) -> Value {
        json!({"id": self.id, "db": self.db, "level": self.level, "created": self.created,
               "expires": self.expires, "status": self.status(now), "used_by": self.used_by,
               "used_at": self.used_at})
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Peer {
    name: String,
    key: String,
    /// Where the peer said it can be reached (may be empty: it dials us).
    urls: Vec<String>,
    /// Databases pairing granted on (levels are read from `_security`, the truth).
    dbs: Vec<String>,
    /// `_replicator` document ids pairing wrote.
    replications: Vec<String>,
    paired_at: u64,
    via: String,
}

/// Recent failures, to slow down guessing: per key, and per IP address (a key's failures count
/// against the address its last message came from; onion streams have none).
#[derive(Default)]
struct Failures {
    by_key: HashMap<String, VecDeque<Instant>>,
    by_addr: HashMap<IpAddr, VecDeque<Instant>>,
    /// The address each key was last seen from (entries go with the key's failures or at 4096).
    addr_of: HashMap<String, IpAddr>,
}

fn prune_map<K: Eq + std::hash::Hash>(m: &mut HashMap<K, VecDeque<Instant>>, now: Instant) {
    m.retain(|_, q| {
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > FAIL_WINDOW)
        {
            q.pop_front();
        }
        !q.is_empty()
    });
}

impl Failures {
    fn prune(&mut self, now: Instant) {
        prune_map(&mut self.by_key, now);
        prune_map(&mut self.by_addr, now);
    }

    /// May `key` (from `addr`) try now? Remembers the address for `record`.
    fn allowed(&mut self, key: &str, addr: Option<IpAddr>) -> bool {
        self.prune(Instant::now());
        if let Some(a) = addr {
            if self.addr_of.len() >= 4096 {
                let by_key = &self.by_key;
                self.addr_of.retain(|k, _| by_key.contains_key(k));
            }
            self.addr_of.insert(key.to_string(), a);
        }
        self.within(key)
    }

    /// Is `key` within its own budget and that of the address it last came from?
    fn within(&self, key: &str) -> bool {
        let under = |q: Option<&VecDeque<Instant>>, cap| q.is_none_or(|q| q.len() < cap);
        under(self.by_key.get(key), FAILS_PER_KEY)
            && self
                .addr_of
                .get(key)
                .is_none_or(|a| under(self.by_addr.get(a), FAILS_PER_ADDRESS))
    }

    fn record(&mut self, key: &str) {
        let now = Instant::now();
        // Keys are free to make (over Tor, with no address to budget), so the map is bounded:
        // past the cap it starts over, which costs a flooder's victims nothing but a reset.
        if self.by_key.len() >= MAX_TRACKED_KEYS && !self.by_key.contains_key(key) {
            self.by_key.clear();
            self.addr_of.clear();
        }
        self.by_key
            .entry(key.to_string())
            .or_default()
            .push_back(now);
        if let Some(a) = self.addr_of.get(key) {
            self.by_addr.entry(*a).or_default().push_back(now);
        }
    }
}

/// What the admin asks for in `POST /_thali/invites`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    pub db: String,
    #[serde(default)]
    pub level: Option<String>,
    /// Seconds, or a duration such as `1h`.
    #[serde(default)]
    pub expires: Option<Value>,
    /// `tcp` or `tor`; by default TCP when a peer listener runs, else Tor.
    #[serde(default)]
    pub via: Option<String>,
    /// The host peers should dial when the listener is bound to every address.
    #[serde(default)]
    pub host: Option<String>,
    /// The name the joiner will know this node by.
    #[serde(default)]
    pub name: Option<String>,
}

/// What the admin asks for in `POST /_thali/join`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub invite: String,
    /// The name to give the inviter here (default: the one the invite suggests).
    #[serde(default)]
    pub name: Option<String>,
    /// The name to give this node at the inviter.
    #[serde(default)]
    pub as_name: Option<String>,
    /// Write continuous push and pull replications (default true).
    #[serde(default)]
    pub replicate: Option<bool>,
}

/// The joiner's message to the inviter, over mutual TLS.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accept {
    pub secret: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub urls: Vec<String>,
}

pub struct Pairing {
    node: Arc<Node>,
    identity: Arc<Identity>,
    dialer: Arc<Dialer>,
    tor: Option<Arc<thali_tor::Tor>>,
    /// The peer listeners' bound addresses (set once they are up).
    listeners: RwLock<Vec<SocketAddr>>,
    /// Serialises every read-modify-write of the state.
    lock: tokio::sync::Mutex<()>,
    failures: Mutex<Failures>,
    /// Pairing by code: the window and sessions (`code.rs`), and a signal for their waiters.
    codes: Mutex<code::Codes>,
    changed: tokio::sync::Notify,
    /// What LAN discovery found (`lan.rs`).
    lan: Mutex<lan::Lan>,
}

fn short(key: &str) -> String {
    let k = key.strip_prefix("ed25519:").unwrap_or(key);
    format!("peer-{}", k.chars().take(8).collect::<String>())
}

fn valid_name(name: &str) -> PairResult<String> {
    let n = name.trim();
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.chars().any(|c| c.is_control() || c == '/')
        && !n.starts_with("ed25519:");
    if ok {
        Ok(n.to_string())
    } else {
        Err(PairError::bad(format!(
            "{name:?} is not a usable peer name (1 to 64 characters, no '/', no control characters)"
        )))
    }
}

impl Pairing {
    pub fn new(
        node: Arc<Node>,
        identity: Arc<Identity>,
        dialer: Arc<Dialer>,
        tor: Option<Arc<thali_tor::Tor>>,
    ) -> Arc<Pairing> {
        Arc::new(Pairing {
            node,
            identity,
            dialer,
            tor,
            listeners: RwLock::new(Vec::new()),
            lock: tokio::sync::Mutex::new(()),
            failures: Mutex::new(Failures::default()),
            codes: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            lan: Mutex::default(),
        })
    }

    pub fn set_listeners(&self, addrs: Vec<SocketAddr>) {
        if let Ok(mut l) = self.listeners.write() {
            *l = addrs;
        }
    }

    /// An httpkey URL of a node (no database), or the start of a discovered node's key.
    fn resolve_peer(&self, with: &str) -> PairResult<String> {
        if with.starts_with("httpkey://") {
            let u = HttpKeyUrl::parse(with).map_err(PairError::bad)?;
            if !u.segments.is_empty() {
                return Err(PairError::bad("give the node's URL, without a database"));
            }
            return Ok(u.to_string());
        }
        match self.discovered_url(with) {
            Some(Ok(u)) => Ok(u),
            Some(Err(e)) => Err(PairError::bad(e)),
            None => Err(PairError::new(
                404,
                "not_found",
                format!("no node nearby has a key starting with {with:?} (thali peer discover lists them)"),
            )),
        }
    }

    fn state(&self) -> PairResult<State> {
        Ok(self.node.meta(META_KEY)?.unwrap_or_default())
    }

    async fn save(&self, st: &State) -> PairResult<()> {
        Ok(self.node.set_meta(META_KEY, st).await?)
    }

    /// This node's httpkey URLs (no database): its peer listeners and onion service.
    pub fn urls(&self) -> Vec<String> {
        self.my_urls(None)
    }

    /// This node's httpkey URLs (no database) that a peer could dial.
    fn my_urls(&self, host: Option<&str>) -> Vec<String> {
        let key = self.identity.key_id();
        let mut urls = Vec::new();
        for a in self.listeners.read().map(|l| l.clone()).unwrap_or_default() {
            let h = match host {
                Some(h) => h.to_string(),
                None if a.ip().is_unspecified() => continue,
                None => a.ip().to_string(),
            };
            let h = if h.contains(':') { format!("[{h}]") } else { h };
            urls.push(format!("httpkey://{h}:{}/{key}/", a.port()));
        }
        if let Some(t) = &self.tor {
            if let Some(onion) = t.onion() {
                urls.push(format!("httpkey://{onion}:{}/{key}/", t.port()));
            }
        }
        urls
    }

    pub async fn create_invite(&self, req: InviteRequest) -> PairResult<Value> {
        pairable_db(&req.db)?;
        let level = match req.level.as_deref() {
            None => Level::Write,
            Some(l) => Level::parse(l).ok_or_else(|| {
                PairError::bad(format!("level must be read, write or admin, not {l:?}"))
            })?,
        };
        let expires_in = match &req.expires {
            None | Some(Value::Null) => DEFAULT_EXPIRY,
            Some(Value::Number(n)) => n
                .as_u64()
                .filter(|&n| n > 0)
                .ok_or_else(|| PairError::bad("expires must be a positive number of seconds"))?,
            Some(Value::String(s)) => invite::parse_duration(s).map_err(PairError::bad)?,
            Some(_) => return Err(PairError::bad("expires must be seconds or a duration")),
        };
        if expires_in > MAX_EXPIRY {
            return Err(PairError::bad("an invite may last 30 days at most"));
        }
        let from = valid_name(req.name.as_deref().unwrap_or("thali"))?;
        let key = self.identity.key_id();
        let url = match req.via.as_deref() {
            Some("tor") => self.onion_url()?,
            Some("tcp") => self.tcp_url(req.host.as_deref())?,
            None => self
                .tcp_url(req.host.as_deref())
                .or_else(|e| self.onion_url().map_err(|_| e))?,
            Some(v) => return Err(PairError::bad(format!("via must be tcp or tor, not {v:?}"))),
        };
        let secret = thali_db::random_hex(invite::SECRET_LEN);
        let now = thali_sys::clock::unix_now();
        let inv = Invite {
            id: thali_db::random_hex(4),
            secret_sha256: invite::secret_hash(&secret),
            db: req.db.clone(),
            level: level.name().into(),
            created: now,
            expires: now + expires_in,
            used_by: None,
            used_at: None,
            revoked: false,
        };
        let uri = InviteUri {
            url: HttpKeyUrl::parse(&url).map_err(PairError::bad)?,
            db: req.db,
            level,
            secret,
            from,
        }
        .to_uri();
        let _g = self.lock.lock().await;
        let mut st = self.state()?;
        // Spent invites are kept only for a while, so the record stays small.
        let mut spent = st
            .invites
            .iter()
            .filter(|i| i.status(now) != "open")
            .count();
        st.invites.retain(|i| {
            let keep = i.status(now) == "open" || spent <= KEEP_SPENT;
            if !keep {
                spent -= 1;
            }
            keep
        });
        let out = json!({"ok": true, "id": inv.id, "uri": uri, "url": url, "db": inv.db,
                         "level": inv.level, "expires": inv.expires});
        tracing::info!(invite = %inv.id, db = %inv.db, level = %inv.level, %key, "invite created");
        st.invites.push(inv);
        self.save(&st).await?;
        Ok(out)
    }

    fn tcp_url(&self, host: Option<&str>) -> PairResult<String> {
        if let Some(h) = host {
            if h.is_empty() || h.contains('/') || h.contains('@') {
                return Err(PairError::bad(format!("{h:?} is not a host")));
            }
        }
        let listeners = self.listeners.read().map(|l| l.clone()).unwrap_or_default();
        if listeners.is_empty() {
            return Err(PairError::bad(
                "the node has no peer listener: start it with --peer ADDR (or --tor and via tor)",
            ));
        }
        self.my_urls(host)
            .into_iter()
            .find(|u| !u.contains(".onion:"))
            .ok_or_else(|| {
                PairError::bad(
                    "the peer listener listens on every address: say which host peers should dial (host)",
                )
            })
    }

    fn onion_url(&self) -> PairResult<String> {
        let t = self
            .tor
            .as_ref()
            .ok_or_else(|| PairError::bad("the node runs without --tor"))?;
        let onion = t.onion().ok_or_else(|| {
            PairError::new(
                503,
                "service_unavailable",
                "the onion service has no address yet",
            )
        })?;
        Ok(format!(
            "httpkey://{onion}:{}/{}/",
            t.port(),
            self.identity.key_id()
        ))
    }

    pub async fn invites(&self) -> PairResult<Value> {
        let now = thali_sys::clock::unix_now();
        let st = self.state()?;
        Ok(Value::Array(
            st.invites.iter().map(|i| i.public(now)).collect(),
        ))
    }

    pub async fn revoke_invite(&self, id: &str) -> PairResult<Value> {
        let _g = self.lock.lock().await;
        let mut st = self.state()?;
        let inv = st
            .invites
            .iter_mut()
            .find(|i| i.id == id)
            .ok_or_else(|| PairError::new(404, "not_found", format!("no invite {id}")))?;
        inv.revoked = true;
        self.save(&st).await?;
        tracing::info!(invite = %id, "invite revoked");
        Ok(json!({"ok": true, "id": id}))
    }

    /// The inviter's side: `key` (from the TLS session) shows a secret.
    pub async fn accept(&self, key: &str, msg: Accept) -> PairResult<Value> {
        self.limited(key)?;
        let fail = |e: PairError| {
            if let Ok(mut f) = self.failures.lock() {
                f.record(key);
            }
            tracing::warn!(peer = %key, reason = %e.reason, "pairing refused");
            e
        };
        if key == self.identity.key_id() {
            return Err(fail(PairError::forbidden("a node cannot pair with itself")));
        }
        let hash = invite::secret_hash(&msg.secret);
        let now = thali_sys::clock::unix_now();
        let _g = self.lock.lock().await;
        let mut st = self.state()?;
        let Some(inv) = st
            .invites
            .iter_mut()
            .find(|i| invite::same_hash(&i.secret_sha256, &hash))
        else {
            return Err(fail(PairError::forbidden("no such invite")));
        };
        match inv.status(now) {
            "open" => {}
            "used" => return Err(fail(PairError::forbidden("this invite was already used"))),
            "expired" => return Err(fail(PairError::forbidden("this invite has expired"))),
            _ => return Err(fail(PairError::forbidden("this invite was revoked"))),
        }
        // Spent before anything is granted: a crash here leaves it unusable, never reusable.
        inv.used_by = Some(key.to_string());
        inv.used_at = Some(now);
        let (db, level_name, id) = (inv.db.clone(), inv.level.clone(), inv.id.clone());
        self.save(&st).await?;
        let level = Level::parse(&level_name).unwrap_or(Level::Read);
        self.grant(&db, key, level).await?;
        let name = match msg.name.as_deref().map(valid_name) {
            Some(Ok(n)) => n,
            _ => short(key),
        };
        let urls: Vec<String> = msg
            .urls
            .into_iter()
            .filter(|u| HttpKeyUrl::parse(u).is_ok_and(|p| p.key.to_string() == key))
            .take(8)
            .collect();
        let name = add_peer(&mut st, name, key, urls, &db, Vec::new(), now, "invite");
        self.save(&st).await?;
        tracing::info!(invite = %id, peer = %key, %name, %db, level = %level_name, "paired by invite");
        thali_sys::metrics::get().pairings.inc();
        Ok(
            json!({"ok": true, "key": self.identity.key_id(), "db": db, "level": level_name,
                  "name": name}),
        )
    }

    /// Gives `key` exactly `level` on `db` (created if missing). Every grant pairing makes
    /// passes here, so no path can grant on a system database.
    async fn grant(&self, db: &str, key: &str, level: Level) -> PairResult<()> {
        pairable_db(db)?;
        let d = self.node.db_or_create(db).await?;
        let mut sec = d.security()?;
        if sec.level_of(key) != Some(level) {
            sec.grant(key, level);
            d.set_security(sec.as_value().clone()).await?;
        }
        Ok(())
    }

    /// The joiner's side: dial the inviter, show the secret, then grant and replicate here.
    pub async fn join(&self, req: JoinRequest) -> PairResult<Value> {
        let inv = InviteUri::parse(&req.invite).map_err(PairError::bad)?;
        let their_key = inv.url.key.to_string();
        if their_key == self.identity.key_id() {
            return Err(PairError::bad("this invite was made by this node"));
        }
        let name = valid_name(req.name.as_deref().filter(|n| !n.is_empty()).unwrap_or(
            if inv.from.is_empty() || inv.from == "thali" {
                ""
            } else {
                &inv.from
            },
        ))
        .unwrap_or_else(|_| short(&their_key));
        let (remote, db_url) = remote_for(&self.dialer, &inv.url.to_string(), &inv.db)?;
        let msg = Accept {
            secret: inv.secret.clone(),
            name: req.as_name.clone(),
            urls: self.my_urls(None),
        };
        let started = Instant::now();
        let answer = ask(
            &remote,
            "/_thali/accept",
            &msg,
            Duration::from_secs(60),
            "the inviting node",
        )
        .await?;
        check_accepted(&answer, &their_key, &inv.db)?;
        // The invite this node holds names the level; the answer never raises (or lowers) it.
        let level = inv.level;
        if answer.get("level").and_then(Value::as_str) != Some(level.name()) {
            tracing::warn!(peer = %their_key, answered = %answer["level"], invited = level.name(),
                           "the inviter answered another level; granting the invite's");
        }
        self.grant(&inv.db, &their_key, level).await?;
        let mut replications = Vec::new();
        if req.replicate.unwrap_or(true) {
            replications = self
                .write_replications(&inv.db, &db_url, &their_key)
                .await?;
        }
        let now = thali_sys::clock::unix_now();
        let _g = self.lock.lock().await;
        let mut st = self.state()?;
        let name = add_peer(
            &mut st,
            name,
            &their_key,
            vec![inv.url.to_string()],
            &inv.db,
            replications.clone(),
            now,
            "invite",
        );
        self.save(&st).await?;
        tracing::info!(peer = %their_key, %name, db = %inv.db, level = level.name(),
                       ms = started.elapsed().as_millis() as u64, "joined by invite");
        Ok(
            json!({"ok": true, "name": name, "key": their_key, "db": inv.db,
                  "level": level.name(), "replications": replications,
                  "known_here_as": answer["name"].as_str().and_then(|n| valid_name(n).ok())}),
        )
    }

    /// Continuous push and pull between local `db` and the peer's copy.
    async fn write_replications(&self, db: &str, url: &str, key: &str) -> PairResult<Vec<String>> {
        pairable_db(db)?;
        let rdb = self.node.db_or_create("_replicator").await?;
        let mut ids = Vec::new();
        let mut docs = Vec::new();
        for (dir, source, target) in [("push", db, url), ("pull", url, db)] {
            let id = format!(
                "thali-pair-{}-{db}-{dir}",
                short(key).trim_start_matches("peer-")
            );
            let mut doc = json!({"_id": id, "source": source, "target": target,
                                 "continuous": true, "create_target": false});
            if let Ok(cur) = rdb.get_doc(&id, None, &Default::default()) {
                if let Some(rev) = cur.doc.get("_rev") {
                    doc["_rev"] = rev.clone();
                }
            }
            docs.push(doc);
            ids.push(id);
        }
        for r in rdb
            .bulk_docs(docs, true, &Caller::node("_replicator"))
            .await?
        {
            if let Err((id, _, e)) = r {
                return Err(PairError::new(
                    e.status(),
                    e.name(),
                    format!(
                        "writing replication {}: {}",
                        id.unwrap_or_default(),
                        e.reason()
                    ),
                ));
            }
        }
        Ok(ids)
    }

    /// Paired peers with their levels per database and their replications' states.
    pub async fn peers(&self) -> PairResult<Value> {
        let st = self.state()?;
        let dbs = self.node.all_dbs();
        let rdb = self.node.db("_replicator").await.ok();
        let mut out = Vec::new();
        for p in &st.peers {
            let mut levels = serde_json::Map::new();
            for db in &dbs {
                if let Some(l) = self
                    .node
                    .security_of(db)
                    .ok()
                    .and_then(|s| s.level_of(&p.key))
                {
                    levels.insert(db.clone(), json!(l.name()));
                }
            }
            let reps: Vec<Value> = p
                .replications
                .iter()
                .filter_map(|id| {
                    let doc = rdb
                        .as_ref()?
                        .get_doc(id, None, &Default::default())
                        .ok()?
                        .doc;
                    let v = Value::Object(doc);
                    Some(
                        json!({"id": id, "source": v["source"], "target": v["target"],
                                "state": v["_replication_state"],
                                "state_time": v["_replication_state_time"],
                                "stats": v["_replication_stats"]}),
                    )
                })
                .collect();
            out.push(
                json!({"name": p.name, "key": p.key, "dbs": levels, "urls": p.urls,
                            "paired_at": p.paired_at, "via": p.via, "replications": reps}),
            );
        }
        Ok(Value::Array(out))
    }

    /// Revokes every grant of a paired peer (by name or key) and deletes the replications
    /// pairing wrote for it.
    pub async fn remove(&self, who: &str) -> PairResult<Value> {
        let _g = self.lock.lock().await;
        let mut st = self.state()?;
        let i = st
            .peers
            .iter()
            .position(|p| p.name == who || p.key == who)
            .ok_or_else(|| PairError::new(404, "not_found", format!("no paired peer {who:?}")))?;
        let p = st.peers.remove(i);
        let mut revoked = Vec::new();
        for db in self.node.all_dbs() {
            let Ok(d) = self.node.db(&db).await else {
                continue;
            };
            let mut sec = d.security()?;
            if sec.revoke(&p.key) {
                d.set_security(sec.as_value().clone()).await?;
                revoked.push(db);
            }
        }
        let mut stopped = Vec::new();
        if let Ok(rdb) = self.node.db("_replicator").await {
            for id in &p.replications {
                let Ok(cur) = rdb.get_doc(id, None, &Default::default()) else {
                    continue;
                };
                let del = json!({"_id": id, "_rev": cur.doc.get("_rev"), "_deleted": true});
                if let Some(Ok(_)) = rdb
                    .bulk_docs(vec![del], true, &Caller::node("_replicator"))
                    .await?
                    .into_iter()
                    .next()
                {
                    stopped.push(id.clone());
                }
            }
        }
        self.save(&st).await?;
        tracing::info!(peer = %p.key, name = %p.name, ?revoked, "peer removed");
        Ok(
            json!({"ok": true, "name": p.name, "key": p.key, "revoked": revoked,
                  "replications_removed": stopped}),
        )
    }
}

/// A client for another node's `/_thali/…` routes and its copy of `db`; the URL pins its key.
fn remote_for(
    dialer: &std::sync::Arc<Dialer>,
    node_url: &str,
    db: &str,
) -> PairResult<(thali_replicate::client::Remote, String)> {
    let db_url = format!("{node_url}{}", enc(db));
    let remote = thali_replicate::client::Remote::new(
        &db_url,
        &serde_json::Map::new(),
        dialer.clone(),
        None,
        db_url.clone(),
    )
    .map_err(|e| PairError::bad(e.to_string()))?
    .with_answer_limit(MAX_MESSAGE);
    Ok((remote, db_url))
}

/// POSTs `body` to `path` on the other node: its JSON answer, or its refusal (403, or 429 when
/// it limits this node) naming `who` refused.
async fn ask<B: Serialize + ?Sized>(
    remote: &thali_replicate::client::Remote,
    path: &str,
    body: &B,
    timeout: Duration,
    who: &str,
) -> PairResult<Value> {
    let r = remote
        .request_path(axum::http::Method::POST, path, Some(body), timeout)
        .await
        .map_err(|e| PairError::new(502, "bad_gateway", format!("cannot reach {who}: {e}")))?;
    if r.status != 200 {
        let limited = r.status == 429;
        return Err(PairError::new(
            if limited { 429 } else { 403 },
            if limited {
                "too_many_requests"
            } else {
                "forbidden"
            },
            format!("{who} refused: {}", r.describe()),
        ));
    }
    match r.json() {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(PairError::new(
            502,
            "bad_gateway",
            format!("{who} answered something other than a JSON object"),
        )),
        Err(e) => Err(PairError::new(502, "bad_gateway", e.to_string())),
    }
}

/// An inviter's answer to `/_thali/accept` is taken as acceptance only when it says so for
/// this invite: `ok: true`, its own key, the invite's database.
fn check_accepted(answer: &Value, their_key: &str, db: &str) -> PairResult<()> {
    let bad = |what: &str| {
        PairError::new(
            502,
            "bad_gateway",
            format!("the inviting node's answer is not an acceptance: {what}"),
        )
    };
    if answer.get("ok") != Some(&Value::Bool(true)) {
        return Err(bad("no \"ok\": true"));
    }
    if answer.get("key").and_then(Value::as_str) != Some(their_key) {
        return Err(bad("it names another key"));
    }
    if answer.get("db").and_then(Value::as_str) != Some(db) {
        return Err(bad("it names another database"));
    }
    Ok(())
}

/// Records (or updates) a paired peer; a new peer whose name is taken gets `-2`, `-3`….
#[allow(clippy::too_many_arguments)]
fn add_peer(
    st: &mut State,
    name: String,
    key: &str,
    urls: Vec<String>,
    db: &str,
    replications: Vec<String>,
    now: u64,
    via: &str,
) -> String {
    if let Some(p) = st.peers.iter_mut().find(|p| p.key == key) {
        if !p.dbs.iter().any(|d| d == db) {
            p.dbs.push(db.to_string());
        }
        for u in urls {
            if !p.urls.contains(&u) {
                p.urls.push(u);
            }
        }
        for r in replications {
            if !p.replications.contains(&r) {
                p.replications.push(r);
            }
        }
        return p.name.clone();
    }
    let mut unique = name.clone();
    let mut n = 2;
    while st.peers.iter().any(|p| p.name == unique) {
        unique = format!("{name}-{n}");
        n += 1;
    }
    st.peers.push(Peer {
        name: unique.clone(),
        key: key.to_string(),
        urls,
        dbs: vec![db.to_string()],
        replications,
        paired_at: now,
        via: via.to_string(),
    });
    unique
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn budgets_are_per_key_and_per_address_never_global() {
        let mut f = Failures::default();
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 1].into();
        // A key's own budget.
        for _ in 0..FAILS_PER_KEY {
            assert!(f.allowed("k", Some(a)));
            f.record("k");
        }
        assert!(!f.allowed("k", Some(a)));
        // Throw-away keys from one address spend that address's budget only.
        for i in 0..FAILS_PER_ADDRESS {
            let k = format!("throwaway{i}");
            if f.allowed(&k, Some(a)) {
                f.record(&k);
            }
        }
        assert!(!f.allowed("fresh", Some(a)));
        assert!(f.allowed("guest", Some(b)));
        assert!(f.allowed("guest", None));
    }
}
