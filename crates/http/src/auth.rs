//! Who is asking, and the one place that decides what they may do.
//!
//! - On the loopback listener a request is the local admin (basic auth) or anonymous.
//! - On the peer listener it is the key of the client certificate, whatever headers say.
//!
//! Every route is classified by what it needs (`Need`); peers get database access from the
//! database's `_security` object, read on every request so a change takes effect at once:
//! `admins.names` → admin, `members.names` → write, `readers.names` → read.

use super::error::{ApiError, ApiResult};
use super::routes::{Kind, Route};
use super::{AppState, HttpConfig, Req};
use axum::http::{header, Extensions, HeaderMap, Method};
use base64::Engine;
use serde_json::{json, Value};
pub use thali_db::Level;
use thali_peer::PeerKeyId;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The local admin, authenticated with basic auth on the loopback listener.
    Admin,
    /// A peer, by the key id of its client certificate.
    Peer(String),
    Anonymous,
}

/// What a route needs.
#[derive(Debug, PartialEq, Eq)]
enum Need {
    /// Anyone, peers included (`GET /`, `/_session`).
    Open,
    /// Anyone on the loopback listener (`/_up`).
    LoopbackOpen,
    /// Any peer key, known or not (showing an invite's secret), and the local admin.
    AnyPeer,
    /// The node's admin only (creating and deleting databases, server endpoints).
    NodeAdmin,
    Db(String, Level),
}

impl Principal {
    /// CouchDB's `userCtx` for this principal on `db`.
    pub fn user_ctx(&self, db: Option<&str>) -> Value {
        match self {
            Principal::Admin => json!({"db": db, "name": "admin", "roles": ["_admin"]}),
            Principal::Peer(k) => json!({"db": db, "name": k, "roles": []}),
            Principal::Anonymous => json!({"db": db, "name": null, "roles": []}),
        }
    }
}

/// Who is asking. A wrong Basic password counts against the source in `lockout`; a name
/// locked from the source is refused before its password is checked.
pub fn principal(
    headers: &HeaderMap,
    ext: &Extensions,
    state: &AppState,
    source: Option<std::net::IpAddr>,
) -> ApiResult<Principal> {
    let cfg = &state.config;
    if let Some(PeerKeyId(k)) = ext.get::<PeerKeyId>() {
        return Ok(Principal::Peer(k.clone()));
    }
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(match session_cookie(headers) {
            Some(t) if session_valid(state, &t) => Principal::Admin,
            _ => Principal::Anonymous,
        });
    };
    // The scheme name is case-insensitive (RFC 9110).
    let Some((scheme, b64)) = v.trim_start().split_once(' ') else {
        return Ok(Principal::Anonymous);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(Principal::Anonymous);
    }
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return Ok(Principal::Anonymous);
    };
    let Ok(s) = String::from_utf8(raw) else {
        return Ok(Principal::Anonymous);
    };
    let Some((name, pw)) = s.split_once(':') else {
        return Ok(Principal::Anonymous);
    };
    state.lockout.check(source, name)?;
    if name == "admin" && constant_time_eq(pw.as_bytes(), cfg.admin_password.as_bytes()) {
        return Ok(Principal::Admin);
    }
    state.lockout.failed(source, name);
    Ok(Principal::Anonymous)
}

/// Is this `AuthSession` cookie valid now: well signed, unexpired, and not logged out?
pub fn session_valid(state: &AppState, token: &str) -> bool {
    cookie::verify(&state.config, token).is_some() && !state.logged_out.contains(token)
}

/// Is `Host` one the loopback API answers to: absent, an IP address (a rebinding page's origin
/// is a name, never an address), `localhost` or a name under it, or one the operator listed
/// (`--allowed-host`)? Syncthing's GUI defends against DNS rebinding the same way.
pub fn host_allowed(headers: &HeaderMap, cfg: &HttpConfig) -> bool {
    let Some(h) = headers.get(header::HOST) else {
        return true;
    };
    let Ok(h) = h.to_str() else {
        return false;
    };
    let h = h.trim().to_ascii_lowercase();
    let name = if let Some(v6) = h.strip_prefix('[') {
        return v6
            .split_once(']')
            .is_some_and(|(a, _)| a.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        h.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(h.as_str(), |(n, _)| n)
    };
    let name = name.trim_end_matches('.');
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || cfg
            .allowed_hosts
            .iter()
            .any(|a| a.trim_end_matches('.').eq_ignore_ascii_case(name))
}

/// The `AuthSession` cookie's value, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == "AuthSession")
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty())
}

/// Is `password` the admin's?
pub fn admin_password_ok(cfg: &HttpConfig, password: &str) -> bool {
    constant_time_eq(password.as_bytes(), cfg.admin_password.as_bytes())
}

/// `AuthSession` cookies, as CouchDB makes them: `base64url(name:hex expiry:hex mac)`, the MAC
/// (HMAC-SHA256) keyed by a secret of this process and the admin password, so a restart or a
/// new password ends every session.
pub mod cookie {
    use super::HttpConfig;
    use base64::Engine;
    use hmac::{Hmac, Mac};

    /// Seconds a session lasts (CouchDB's `chttpd_auth/timeout`); refreshed past half.
    pub const TIMEOUT: u64 = 600;

    fn mac(cfg: &HttpConfig, msg: &str) -> Vec<u8> {
        let mut key = cfg.cookie_secret.to_vec();
        key.extend_from_slice(cfg.admin_password.as_bytes());
        let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        m.update(msg.as_bytes());
        m.finalize().into_bytes().to_vec()
    }

    pub fn make(cfg: &HttpConfig, name: &str) -> String {
        let expires = thali_sys::clock::unix_now() + TIMEOUT;
        let msg = format!("{name}:{expires:X}");
        let token = format!("{msg}:{}", hex::encode(mac(cfg, &msg)));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    }

    /// The user name and expiry of a valid, unexpired cookie.
    pub fn verify(cfg: &HttpConfig, value: &str) -> Option<(String, u64)> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value.trim_end_matches('='))
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (msg, mac_hex) = s.rsplit_once(':')?;
        let (name, exp) = msg.split_once(':')?;
        let expires = u64::from_str_radix(exp, 16).ok()?;
        let given = hex::decode(mac_hex).ok()?;
        let ok = super::constant_time_eq(&given, &mac(cfg, msg));
        (ok && name == "admin" && expires > thali_sys::clock::unix_now())
            .then(|| (name.to_string(), expires))
    }

    /// Cookies ended by `DELETE /_session` before they expired: refused until then, so a
    /// logout ends the session on the node, not only in the browser.
    #[derive(Default)]
    pub struct LoggedOut(std::sync::Mutex<std::collections::HashMap<String, u64>>);

    impl LoggedOut {
        fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u64>> {
            thali_sys::sync::lock(&self.0)
        }

        pub fn add(&self, token: &str, expires: u64) {
            let now = thali_sys::clock::unix_now();
            let mut m = self.map();
            m.retain(|_, e| *e > now);
            // Every entry is a cookie this node signed and that is still valid: bounded by
            // the logins of one session timeout.
            m.insert(token.to_string(), expires);
        }

        pub fn contains(&self, token: &str) -> bool {
            self.map().contains_key(token)
        }
    }

    /// `Set-Cookie` for a new session, or (with `None`) one that ends it.
    pub fn header(value: Option<&str>) -> String {
        match value {
            Some(v) => format!(
                "AuthSession={v}; Version=1; Path=/; Max-Age={TIMEOUT}; HttpOnly; SameSite=Strict"
            ),
            None => "AuthSession=; Version=1; Path=/; Max-Age=0; HttpOnly; SameSite=Strict".into(),
        }
    }
}

/// Compares digests of the two, so neither the content nor the length of the secret shows in
/// the time taken.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    subtle::ConstantTimeEq::ct_eq(x.as_slice(), y.as_slice()).into()
}

/// What a route needs, by kind and method. Which documents a caller may write (design
/// documents, `_local` namespaces) is decided below, in the write path (`db::Caller`).
fn classify(route: &Route, m: &Method) -> Need {
    use Kind::*;
    let read_method = matches!(*m, Method::GET | Method::HEAD);
    let db = |level| Need::Db(route.db.clone(), level);
    match route.kind {
        Root | Session => Need::Open,
        // The page itself holds no data; it logs in like any client.
        Up | Dashboard => Need::LoopbackOpen,
        AllDbs | Uuids | ActiveTasks | Replicate | SchedulerJobs => Need::NodeAdmin,
        Invites | Invite | Join | Paired | PairedPeer | Pairing | Nearby => Need::NodeAdmin,
        NodeStats | NodePrometheus | NodeSystem | NodeConfig | Membership | DbsInfo | Events => {
            Need::NodeAdmin
        }
        PairAccept | PairStep => Need::AnyPeer,
        Db if read_method => db(Level::Read),
        Db if *m == Method::POST => db(Level::Write),
        Db => Need::NodeAdmin,
        AllDocs | DesignDocs | BulkGet | RevsDiff | Changes | EnsureFullCommit | View
        | ViewInfo | Find | Explain => db(Level::Read),
        Index if read_method => db(Level::Read),
        // Indexes are design documents: the write path decides who may write those.
        Index | IndexDoc => db(Level::Write),
        // Readers keep their own checkpoints; the write path binds them to the reader's key.
        Local => db(Level::Read),
        LocalDocs => db(Level::Write),
        RevsLimit if read_method => db(Level::Read),
        RevsLimit | Security | Compact | ViewCleanup => db(Level::Admin),
        BulkDocs => db(Level::Write),
        Doc | DesignDoc | Attachment | DesignAttachment if read_method => db(Level::Read),
        Doc | DesignDoc | Attachment | DesignAttachment => db(Level::Write),
    }
}

/// The principal's level on `db` (the local admin has every level).
fn db_level(state: &AppState, principal: &Principal, db: &str) -> Option<Level> {
    match principal {
        Principal::Admin => Some(Level::Admin),
        Principal::Anonymous => None,
        Principal::Peer(key) => state.node.security_of(db).ok()?.level_of(key),
    }
}

/// The single authorization point for routes: every request passes here before its handler
/// runs. Returns the principal's level on the route's database, which travels with the
/// request's writes (`Req::caller`) so the write path decides per document. A path that names
/// no route answers its 400 only to an authenticated caller.
pub fn authorize(state: &AppState, r: &Req, route: Option<&Route>) -> ApiResult<Option<Level>> {
    let Some(route) = route else {
        return match r.principal {
            Principal::Anonymous => Err(ApiError::unauthorized()),
            _ => Ok(None),
        };
    };
    let need = classify(route, &r.method);
    match (&r.principal, need) {
        (Principal::Admin, _) => Ok(Some(Level::Admin)),
        (_, Need::Open) => Ok(None),
        (Principal::Peer(_), Need::AnyPeer) => Ok(None),
        (Principal::Anonymous, Need::LoopbackOpen) => Ok(None),
        (Principal::Anonymous, _) => Err(ApiError::unauthorized()),
        (Principal::Peer(_), Need::LoopbackOpen | Need::NodeAdmin) => Err(ApiError::new(
            403,
            "forbidden",
            "Only the node's admin may do this.",
        )),
        (p @ Principal::Peer(key), Need::Db(db, need)) => match db_level(state, p, &db) {
            Some(have) if have >= need => Ok(Some(have)),
            Some(_) => {
                tracing::debug!(%key, %db, ?need, "peer lacks the permission");
                Err(ApiError::new(
                    403,
                    "forbidden",
                    format!("Key {key} may not do this on database {db}."),
                ))
            }
            None => {
                tracing::debug!(%key, %db, "unknown peer key");
                Err(ApiError::new(
                    403,
                    "forbidden",
                    "You are not allowed to access this db.",
                ))
            }
        },
    }
}
