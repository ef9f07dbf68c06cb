//! Invites, the pure parts: the `thali:` URI that carries one, the secret's stored form, and
//! the durations people type (`--expires 1h`).
//!
//! `thali:join?url=<httpkey URL of the inviting node>&db=<db>&level=<level>&secret=<hex>&from=<name>`:
//! the URL pins the inviter's key, so the joining node knows whom it talks to before it shows
//! the secret; the secret (128 random bits, single use) proves to the inviter that this key is
//! the one it invited. The inviter keeps only the secret's SHA-256.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use thali_db::Level;
use thali_peer::HttpKeyUrl;

/// Bytes of randomness in an invite's secret.
pub const SECRET_LEN: usize = 16;

/// Everything but unreserved characters is escaped in a URI's query values.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InviteUri {
    /// The inviter's httpkey URL without a database (`httpkey://host:port/<key>/`).
    pub url: HttpKeyUrl,
    pub db: String,
    pub level: Level,
    /// Hex of `SECRET_LEN` random bytes.
    pub secret: String,
    /// The name the inviter suggests for itself.
    pub from: String,
}

impl InviteUri {
    pub fn to_uri(&self) -> String {
        let enc = |s: &str| utf8_percent_encode(s, QUERY_VALUE).to_string();
        format!(
            "thali:join?url={}&db={}&level={}&secret={}&from={}",
            enc(&self.url.to_string()),
            enc(&self.db),
            self.level.name(),
            self.secret,
            enc(&self.from)
        )
    }

    pub fn parse(s: &str) -> Result<InviteUri, String> {
        let s = s.trim();
        let query = s
            .strip_prefix("thali:join?")
            .ok_or("an invite starts with thali:join?")?;
        let (mut url, mut db, mut level, mut secret, mut from) = (None, None, None, None, None);
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| format!("the invite's {k} is not UTF-8"))?
                .into_owned();
            match k {
                "url" => url = Some(v),
                "db" => db = Some(v),
                "level" => level = Some(v),
                "secret" => secret = Some(v),
                "from" => from = Some(v),
                _ => {}
            }
        }
        let url = HttpKeyUrl::parse(&url.ok_or("the invite has no url")?)?;
        if !url.segments.is_empty() {
            return Err("the invite's url must name the node, not a database".into());
        }
        if !matches!(url.key, thali_peer::PeerKey::Ed25519(_)) {
            return Err("the invite's url must carry an ed25519 key".into());
        }
        let db = db.ok_or("the invite names no database")?;
        super::pairable_db(&db).map_err(|e| e.reason)?;
        let level = level.ok_or("the invite has no level")?;
        let level = Level::parse(&level).ok_or_else(|| format!("unknown level {level:?}"))?;
        let secret = secret.ok_or("the invite has no secret")?;
        if secret.len() != SECRET_LEN * 2 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the invite's secret is malformed".into());
        }
        Ok(InviteUri {
            url,
            db,
            level,
            secret: secret.to_ascii_lowercase(),
            from: from.unwrap_or_default(),
        })
    }
}

/// What the inviter stores instead of the secret.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(
        secret.trim().to_ascii_lowercase().as_bytes(),
    ))
}

/// Equal hex digests, compared without an early exit.
pub fn same_hash(a: &str, b: &str) -> bool {
    subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()).into()
}

/// `90`, `90s`, `15m`, `1h`, `7d` as seconds. Hand-written rather than `humantime`: an
/// invite's lifetime takes only these units (humantime also reads months and years).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, ""));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 15m, 1h, 7d)"))?;
    let mul = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(mul)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is not a usable duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InviteUri {
        let key = thali_peer::identity::key_id(&[7u8; 32]);
        InviteUri {
            url: HttpKeyUrl::parse(&format!("httpkey://127.0.0.1:4433/{key}/")).unwrap(),
            db: "notes/2024".into(),
            level: Level::Write,
            secret: "00112233445566778899aabbccddeeff".into(),
            from: "Ann's laptop".into(),
        }
    }

    #[test]
    fn invites_round_trip() {
        let i = sample();
        let uri = i.to_uri();
        assert!(uri.starts_with("thali:join?url=httpkey%3A%2F%2F127.0.0.1%3A4433%2Fed25519%3A"));
        assert!(!uri.contains(' '));
        assert_eq!(InviteUri::parse(&uri).unwrap(), i);
    }

    #[test]
    fn malformed_invites_are_refused() {
        let uri = sample().to_uri();
        for bad in [
            uri.replace("thali:join?", "thali:pair?"),
            uri.replace("secret=00", "secret=zz"),
            uri.replace("level=write", "level=owner"),
            uri.replace("db=notes", "db=Notes"),
            uri.replace("%2F&db", "%2Fother%2F&db"),
            uri.replace("url=httpkey", "url=https"),
        ] {
            assert!(InviteUri::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashes_and_durations() {
        let h = secret_hash("00112233445566778899AABBCCDDEEFF");
        assert!(same_hash(
            &h,
            &secret_hash("00112233445566778899aabbccddeeff")
        ));
        assert!(!same_hash(
            &h,
            &secret_hash("00112233445566778899aabbccddeefe")
        ));
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert_eq!(parse_duration("1h").unwrap(), 3600);
        assert_eq!(parse_duration("7d").unwrap(), 604800);
        for bad in ["", "h", "0s", "1y", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
