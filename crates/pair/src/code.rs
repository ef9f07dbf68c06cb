//! Pairing by code, face to face. One device waits (`thali pair --wait`: the host opens a
//! window for one pairing); the other dials it over mutual TLS (`thali pair --with …`: the
//! guest). The two nodes run the commit-reveal exchange of `peer::pairing` bound to both TLS
//! keys, both show the same 6-digit code, and each user confirms on their own device. The host
//! answers the guest's confirmation only once its own user has decided; only when both said
//! yes does each node grant the other (and the guest, the side that can dial, writes the
//! replications). A declined code, a timeout, a key other than the session's, or a reveal that
//! does not match its commitment grants nothing, and counts as a failed attempt.
//!
//! Peer messages (`POST /_thali/pair`, `step`): `start` {db, level, commitment?} → {session,
//! nonce | commitment}; `reveal` {session, nonce} → {nonce?}; `confirm` {session, name?} →
//! waits for the host's user; `cancel` {session}.

use super::{add_peer, valid_name, PairError, PairResult, Pairing};
use rand::RngCore;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use thali_db::Level;
use thali_peer::pairing::{self, Commitment, Larger, Nonce, Role, Smaller, NONCE_LEN};
use thali_peer::{parse_key_id, HttpKeyUrl};

/// How long a host waits for a guest by default, and at most.
const DEFAULT_WINDOW: u64 = 120;
const MAX_WINDOW: u64 = 600;
/// How long a session may take from start to both decisions.
const SESSION_TTL: Duration = Duration::from_secs(180);
/// Guests one window holds at once (one session per key). A further guest replaces the oldest,
/// so guests that start and stall never keep a real one out.
const MAX_SESSIONS: usize = 8;

#[derive(Default)]
pub(super) struct Codes {
    host: Option<HostWindow>,
    /// Sessions this node started as a guest, by local id.
    outgoing: HashMap<String, Outgoing>,
}

/// The host's open window. Any number of guests may ask (the newest `MAX_SESSIONS`); the host's
/// user is shown each whose code is up, with its key and name, and says yes to the one whose
/// code matches the other device's. Declining one leaves the window open for the others.
struct HostWindow {
    until: Instant,
    /// The name the guest will know this node by.
    name: Option<String>,
    sessions: Vec<HostSession>,
}

impl HostWindow {
    fn session(&mut self, id: Option<&str>) -> Option<&mut HostSession> {
        self.sessions.iter_mut().find(|s| Some(s.id.as_str()) == id)
    }
}

enum Exchange {
    WaitReveal(Larger),
    WaitNonce(Smaller),
    Shown(u32),
    Failed(String),
    Done,
}

struct HostSession {
    id: String,
    peer: String,
    /// The name the guest gave itself (shown to the host's user beside its key).
    name: Option<String>,
    db: String,
    level: Level,
    exchange: Exchange,
    /// The host user's decision.
    local: Option<bool>,
    /// The guest confirmed (its user said yes).
    remote: bool,
    created: Instant,
}

struct Outgoing {
    remote: thali_replicate::client::Remote,
    key: String,
    session: String,
    url: String,
    db: String,
    level: Level,
    created: Instant,
}

/// A peer's message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub step: String,
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub db: Option<String>,
    #[serde(default)]
    pub level: Option<String>,
    #[serde(default)]
    pub commitment: Option<String>,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// The admin's request (`POST /_thali/pairing`, `action`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub action: String,
    #[serde(default)]
    pub session: Option<String>,
    /// `wait`: seconds to wait for a guest.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// `start`: an httpkey URL (no database) or the key (or its start) of a discovered node.
    #[serde(default)]
    pub with: Option<String>,
    #[serde(default)]
    pub db: Option<String>,
    #[serde(default)]
    pub level: Option<String>,
    /// The name to give the other device here.
    #[serde(default)]
    pub name: Option<String>,
    /// The name the other device will know this one by.
    #[serde(default)]
    pub as_name: Option<String>,
    /// `decide`: the user's answer.
    #[serde(default)]
    pub confirm: Option<bool>,
    #[serde(default)]
    pub replicate: Option<bool>,
}

fn nonce() -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

fn hex_array<const N: usize>(s: Option<&str>, what: &str) -> PairResult<[u8; N]> {
    hex::decode(s.unwrap_or(""))
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| PairError::bad(format!("{what} must be {N} bytes in hex")))
}

fn not_found() -> PairError {
    PairError::new(404, "not_found", "no such pairing session")
}

impl Pairing {
    fn codes(&self) -> std::sync::MutexGuard<'_, Codes> {
        thali_sys::sync::lock(&self.codes)
    }

    /// A peer's pairing message may be read: its key and address are within their failure
    /// budgets (checked before the body is read; the address is remembered for `failed`).
    pub fn admit(&self, key: &str, addr: Option<std::net::IpAddr>) -> PairResult<()> {
        let ok = self
            .failures
            .lock()
            .map(|mut f| f.allowed(key, addr))
            .unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(PairError::new(
                429,
                "too_many_requests",
                "too many failed pairing attempts from this key or address; try again later",
            ))
        }
    }

    /// `admit` again inside a step, with the address the message came from already known.
    pub(super) fn limited(&self, key: &str) -> PairResult<()> {
        self.admit(key, None)
    }

    fn failed(&self, key: &str, e: PairError) -> PairError {
        if let Ok(mut f) = self.failures.lock() {
            f.record(key);
        }
        tracing::warn!(peer = %key, reason = %e.reason, "pairing refused");
        self.changed.notify_waiters();
        e
    }

    /// A guest's message, from `key` (its TLS key).
    pub async fn peer_step(&self, key: &str, msg: Step) -> PairResult<Value> {
        self.limited(key)?;
        match msg.step.as_str() {
            "start" => self.host_start(key, msg),
            "reveal" => self.host_reveal(key, msg),
            "confirm" => self.host_confirm(key, msg).await,
            "cancel" => {
                let mut c = self.codes();
                let s = c
                    .host
                    .as_mut()
                    .and_then(|w| w.session(msg.session.as_deref()))
                    .filter(|s| s.peer == key)
                    .ok_or_else(not_found)?;
                s.exchange = Exchange::Failed("the other device cancelled".into());
                drop(c);
                self.changed.notify_waiters();
                Ok(json!({"ok": true}))
            }
            other => Err(PairError::bad(format!("unknown pairing step {other:?}"))),
        }
    }

    fn host_start(&self, key: &str, msg: Step) -> PairResult<Value> {
        let db = msg.db.clone().unwrap_or_default();
        super::pairable_db(&db)?;
        let level = Level::parse(msg.level.as_deref().unwrap_or("write"))
            .ok_or_else(|| PairError::bad("level must be read, write or admin"))?;
        let theirs = parse_key_id(key).map_err(PairError::bad)?;
        let mine = *self.identity.public_key();
        let role = pairing::role(&mine, &theirs)
            .map_err(|e| self.failed(key, PairError::forbidden(e.to_string())))?;
        let mut c = self.codes();
        let now = Instant::now();
        let w = c
            .host
            .as_mut()
            .filter(|w| w.until > now)
            .ok_or_else(|| PairError::forbidden("this device is not waiting to pair"))?;
        // Finished sessions and this key's earlier one go; at the cap, the oldest goes.
        w.sessions.retain(|s| {
            !matches!(s.exchange, Exchange::Failed(_) | Exchange::Done)
                && now.duration_since(s.created) < SESSION_TTL
                && s.peer != key
        });
        if w.sessions.len() >= MAX_SESSIONS {
            // A real guest's exchange finishes in milliseconds and its code is then shown:
            // those stay; the oldest session still short of a code goes first.
            let i = w
                .sessions
                .iter()
                .position(|s| !matches!(s.exchange, Exchange::Shown(_)))
                .unwrap_or(0);
            let old = w.sessions.remove(i);
            tracing::info!(peer = %old.peer, "pairing session dropped for a newer guest");
        }
        let id = thali_db::random_hex(8);
        let rn = nonce();
        let (exchange, reply) = match role {
            Role::Larger => {
                let c: Commitment = hex_array(msg.commitment.as_deref(), "commitment")?;
                let (l, rn) = Larger::on_commitment(&mine, &theirs, c, rn);
                (
                    Exchange::WaitReveal(l),
                    json!({"session": id, "nonce": hex::encode(rn)}),
                )
            }
            Role::Smaller => {
                let (s, c) = Smaller::start(&mine, &theirs, rn);
                (
                    Exchange::WaitNonce(s),
                    json!({"session": id, "commitment": hex::encode(c)}),
                )
            }
        };
        w.sessions.push(HostSession {
            id,
            peer: key.to_string(),
            name: msg.name.as_deref().and_then(|n| valid_name(n).ok()),
            db,
            level,
            exchange,
            local: None,
            remote: false,
            created: now,
        });
        drop(c);
        self.changed.notify_waiters();
        Ok(reply)
    }

    fn host_reveal(&self, key: &str, msg: Step) -> PairResult<Value> {
        let n: Nonce = hex_array(msg.nonce.as_deref(), "nonce")?;
        let mut c = self.codes();
        let Some(s) = c
            .host
            .as_mut()
            .and_then(|w| w.session(msg.session.as_deref()))
        else {
            return Err(not_found());
        };
        if s.peer != key {
            drop(c);
            return Err(self.failed(
                key,
                PairError::forbidden("this session belongs to another key"),
            ));
        }
        let ex = std::mem::replace(&mut s.exchange, Exchange::Done);
        let (next, reply) = match ex {
            Exchange::WaitReveal(l) => match l.on_reveal(&n) {
                Ok(code) => (Exchange::Shown(code), json!({"ok": true})),
                Err(e) => {
                    s.exchange = Exchange::Failed(e.to_string());
                    drop(c);
                    return Err(self.failed(key, PairError::forbidden(e.to_string())));
                }
            },
            Exchange::WaitNonce(sm) => {
                let (rn, code) = sm.on_nonce(&n);
                (
                    Exchange::Shown(code),
                    json!({"ok": true, "nonce": hex::encode(rn)}),
                )
            }
            other => {
                s.exchange = other;
                return Err(PairError::new(
                    409,
                    "conflict",
                    "this step was already taken",
                ));
            }
        };
        s.exchange = next;
        drop(c);
        self.changed.notify_waiters();
        Ok(reply)
    }

    /// Waits for `f` to answer `Some` on the state, waking on every change, until `deadline`.
    async fn wait_for<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut(&mut Codes) -> Option<T>,
    ) -> Option<T> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(v) = f(&mut self.codes()) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            // Also wake now and then: a timeout is a change nobody signals.
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changed).await;
        }
    }

    async fn host_confirm(&self, key: &str, msg: Step) -> PairResult<Value> {
        let sid = msg.session.clone().unwrap_or_default();
        let created = {
            let mut c = self.codes();
            let s = c
                .host
                .as_mut()
                .and_then(|w| w.session(Some(&sid)))
                .filter(|s| s.peer == key)
                .ok_or_else(not_found)?;
            match &s.exchange {
                Exchange::Shown(_) => {}
                Exchange::Failed(r) => return Err(PairError::forbidden(r.clone())),
                _ => {
                    return Err(PairError::new(
                        409,
                        "conflict",
                        "no code was shown in this session",
                    ))
                }
            }
            s.remote = true;
            s.created
        };
        self.changed.notify_waiters();
        // The host's user decides; the guest waits for it.
        let decided = self
            .wait_for(created + SESSION_TTL, |c| {
                let s = c.host.as_mut()?.session(Some(&sid))?;
                match (&s.exchange, s.local) {
                    (Exchange::Failed(r), _) => Some(Err(r.clone())),
                    (_, Some(d)) => Some(Ok((d, s.db.clone(), s.level))),
                    _ => None,
                }
            })
            .await;
        let (db, level) = match decided {
            Some(Ok((true, db, level))) => (db, level),
            Some(Ok((false, ..))) => {
                return Err(self.failed(
                    key,
                    PairError::forbidden("the other device's user declined the code"),
                ))
            }
            Some(Err(r)) => return Err(PairError::forbidden(r)),
            None => {
                return Err(self.failed(
                    key,
                    PairError::new(
                        408,
                        "request_timeout",
                        "the other device's user did not decide in time",
                    ),
                ))
            }
        };
        self.grant(&db, key, level).await?;
        let now = thali_sys::clock::unix_now();
        let host_name = {
            let mut c = self.codes();
            let w = c.host.as_mut();
            let n = w.as_ref().and_then(|w| w.name.clone());
            if let Some(s) = w.and_then(|w| w.session(Some(&sid))) {
                s.exchange = Exchange::Done;
            }
            n
        };
        self.changed.notify_waiters();
        let _g = self.lock.lock().await;
        let mut st = self.state()?;
        let name = msg
            .name
            .as_deref()
            .and_then(|n| valid_name(n).ok())
            .unwrap_or_else(|| super::short(key));
        let name = add_peer(&mut st, name, key, Vec::new(), &db, Vec::new(), now, "code");
        self.save(&st).await?;
        tracing::info!(peer = %key, %name, %db, level = level.name(), "paired by code");
        thali_sys::metrics::get().pairings.inc();
        Ok(
            json!({"ok": true, "key": self.identity.key_id(), "db": db, "level": level.name(),
                  "name": host_name}),
        )
    }

    /// The admin's side of both roles.
    pub async fn action(&self, a: Action) -> PairResult<Value> {
        match a.action.as_str() {
            "wait" => self.host_wait(a).await,
            "decide" => self.host_decide(a).await,
            "start" => self.guest_start(a).await,
            "confirm" => self.guest_confirm(a).await,
            "cancel" => self.guest_cancel(a).await,
            other => Err(PairError::bad(format!(
                "action must be wait, decide, start, confirm or cancel, not {other:?}"
            ))),
        }
    }

    /// Opens the window and waits until a guest's code is there to show.
    async fn host_wait(&self, a: Action) -> PairResult<Value> {
        let secs = a.timeout.unwrap_or(DEFAULT_WINDOW);
        if secs == 0 || secs > MAX_WINDOW {
            return Err(PairError::bad(format!(
                "timeout must be 1 to {MAX_WINDOW} seconds"
            )));
        }
        let name = a.as_name.as_deref().map(valid_name).transpose()?;
        let until = Instant::now() + Duration::from_secs(secs);
        {
            // Waiting again (after declining a code) keeps the guests already asking.
            let mut c = self.codes();
            match c.host.as_mut().filter(|w| w.until > Instant::now()) {
                Some(w) => {
                    w.until = until;
                    w.name = name;
                }
                None => {
                    c.host = Some(HostWindow {
                        until,
                        name,
                        sessions: Vec::new(),
                    })
                }
            }
        }
        tracing::info!(seconds = secs, "waiting for a device to pair");
        let shown = self
            .wait_for(until, |c| {
                let s = c
                    .host
                    .as_ref()?
                    .sessions
                    .iter()
                    .find(|s| matches!(s.exchange, Exchange::Shown(_)) && s.local.is_none())?;
                match s.exchange {
                    Exchange::Shown(code) => Some(json!({
                        "session": s.id, "key": s.peer, "name": s.name, "db": s.db,
                        "level": s.level.name(), "code": pairing::show(code)})),
                    _ => None,
                }
            })
            .await;
        shown.ok_or_else(|| {
            self.codes().host = None;
            PairError::new(408, "request_timeout", "no device asked to pair in time")
        })
    }

    /// The host's user answered; with yes, waits until the guest confirmed and was granted.
    async fn host_decide(&self, a: Action) -> PairResult<Value> {
        let sid = a.session.clone().unwrap_or_default();
        let yes = a
            .confirm
            .ok_or_else(|| PairError::bad("say confirm: true or false"))?;
        let (created, key) = {
            let mut c = self.codes();
            let Some(w) = c.host.as_mut() else {
                return Err(not_found());
            };
            let s = w.session(Some(&sid)).ok_or_else(not_found)?;
            if !matches!(s.exchange, Exchange::Shown(_)) {
                return Err(PairError::new(
                    409,
                    "conflict",
                    "no code is being shown in this session",
                ));
            }
            s.local = Some(yes);
            if !yes {
                // The guest's confirmation (now or later) learns why. The window stays open:
                // the real guest may be the next one shown.
                s.exchange = Exchange::Failed("the other device's user declined the code".into());
            }
            (s.created, s.peer.clone())
        };
        self.changed.notify_waiters();
        if !yes {
            if let Ok(mut f) = self.failures.lock() {
                f.record(&key);
            }
            return Ok(json!({"ok": true, "paired": false}));
        }
        let done = self
            .wait_for(created + SESSION_TTL, |c| {
                let s = c.host.as_mut()?.session(Some(&sid))?;
                match &s.exchange {
                    Exchange::Done => Some(Ok(())),
                    Exchange::Failed(r) => Some(Err(r.clone())),
                    _ => None,
                }
            })
            .await;
        self.codes().host = None;
        match done {
            Some(Ok(())) => Ok(json!({"ok": true, "paired": true, "key": key})),
            Some(Err(r)) => Err(PairError::forbidden(r)),
            None => Err(PairError::new(
                408,
                "request_timeout",
                "the other device did not confirm in time",
            )),
        }
    }

    /// Dials the host, runs the exchange, and returns the code to show.
    async fn guest_start(&self, a: Action) -> PairResult<Value> {
        let db =
            a.db.clone()
                .ok_or_else(|| PairError::bad("say which database to share (db)"))?;
        super::pairable_db(&db)?;
        let level = Level::parse(a.level.as_deref().unwrap_or("write"))
            .ok_or_else(|| PairError::bad("level must be read, write or admin"))?;
        let with = a
            .with
            .clone()
            .ok_or_else(|| PairError::bad("say which device to pair with (with)"))?;
        let url = self.resolve_peer(&with)?;
        let parsed = HttpKeyUrl::parse(&url).map_err(PairError::bad)?;
        let key = parsed.key.to_string();
        let theirs = parse_key_id(&key).map_err(PairError::bad)?;
        let mine = *self.identity.public_key();
        let role = pairing::role(&mine, &theirs).map_err(|e| PairError::bad(e.to_string()))?;
        let (remote, _) = super::remote_for(&self.dialer, &url, &db)?;
        let send = |body: Value| {
            let remote = &remote;
            async move {
                super::ask(
                    remote,
                    "/_thali/pair",
                    &body,
                    Duration::from_secs(60),
                    "the other device",
                )
                .await
            }
        };
        let (session, code) = match role {
            Role::Smaller => {
                let (sm, c) = Smaller::start(&mine, &theirs, nonce());
                let r = send(
                    json!({"step": "start", "db": db, "level": level.name(), "name": a.as_name,
                                    "commitment": hex::encode(c)}),
                )
                .await?;
                let session = r["session"].as_str().unwrap_or_default().to_string();
                let rn_large: Nonce = hex_array(r["nonce"].as_str(), "the host's nonce")?;
                let (rn_small, code) = sm.on_nonce(&rn_large);
                send(json!({"step": "reveal", "session": session, "nonce": hex::encode(rn_small)}))
                    .await?;
                (session, code)
            }
            Role::Larger => {
                let r = send(
                    json!({"step": "start", "db": db, "level": level.name(), "name": a.as_name}),
                )
                .await?;
                let session = r["session"].as_str().unwrap_or_default().to_string();
                let c: Commitment = hex_array(r["commitment"].as_str(), "the host's commitment")?;
                let (l, rn) = Larger::on_commitment(&mine, &theirs, c, nonce());
                let r =
                    send(json!({"step": "reveal", "session": session, "nonce": hex::encode(rn)}))
                        .await?;
                let rn_small: Nonce = hex_array(r["nonce"].as_str(), "the host's nonce")?;
                let code = l
                    .on_reveal(&rn_small)
                    .map_err(|e| PairError::forbidden(format!("the other device cheated: {e}")))?;
                (session, code)
            }
        };
        let id = thali_db::random_hex(8);
        let mut c = self.codes();
        c.outgoing.retain(|_, o| o.created.elapsed() < SESSION_TTL);
        c.outgoing.insert(
            id.clone(),
            Outgoing {
                remote,
                key: key.clone(),
                session,
                url: url.clone(),
                db: db.clone(),
                level,
                created: Instant::now(),
            },
        );
        Ok(
            json!({"session": id, "key": key, "db": db, "level": level.name(),
                  "code": pairing::show(code)}),
        )
    }

    fn take_outgoing(&self, a: &Action) -> PairResult<Outgoing> {
        self.codes()
            .outgoing
            .remove(a.session.as_deref().unwrap_or(""))
            .filter(|o| o.created.elapsed() < SESSION_TTL)
            .ok_or_else(not_found)
    }

    /// The guest's user said yes: the host's answer decides; then grant and replicate here.
    async fn guest_confirm(&self, a: Action) -> PairResult<Value> {
        let o = self.take_outgoing(&a)?;
        let confirm = json!({"step": "confirm", "session": o.session, "name": a.as_name});
        let answer = super::ask(
            &o.remote,
            "/_thali/pair",
            &confirm,
            SESSION_TTL + Duration::from_secs(10),
            "the other device",
        )
        .await?;
        self.grant(&o.db, &o.key, o.level).await?;
        let replications = if a.replicate.unwrap_or(true) {
            let db_url = format!("{}{}", o.url, super::enc(&o.db));
            self.write_replications(&o.db, &db_url, &o.key).await?
        } else {
            Vec::new()
        };
        let name = a
            .name
            .as_deref()
            .or(answer["name"].as_str())
            .and_then(|n| valid_name(n).ok())
            .unwrap_or_else(|| super::short(&o.key));
        let _g = self.lock.lock().await;
        let mut st = self.state()?;
        let now = thali_sys::clock::unix_now();
        let name = add_peer(
            &mut st,
            name,
            &o.key,
            vec![o.url.clone()],
            &o.db,
            replications.clone(),
            now,
            "code",
        );
        self.save(&st).await?;
        tracing::info!(peer = %o.key, %name, db = %o.db, "paired by code");
        Ok(
            json!({"ok": true, "name": name, "key": o.key, "db": o.db, "level": o.level.name(),
                  "replications": replications}),
        )
    }

    async fn guest_cancel(&self, a: Action) -> PairResult<Value> {
        let o = self.take_outgoing(&a)?;
        let cancel = json!({"step": "cancel", "session": o.session});
        // Best effort: the host's window times out by itself anyway.
        let _ = super::ask(
            &o.remote,
            "/_thali/pair",
            &cancel,
            Duration::from_secs(30),
            "",
        )
        .await;
        Ok(json!({"ok": true, "paired": false}))
    }
}
