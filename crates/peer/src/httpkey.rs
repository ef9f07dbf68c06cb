//! `httpkey://host:port/<key>/<db>[/…]` URLs (Thali's scheme): the authority says where to
//! connect, the key says who must answer there. Parsed strictly; every error says what is wrong.

use super::identity::{key_id, parse_key_id};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerKey {
    Ed25519([u8; 32]),
    /// Thali's original `rsapublickey:<exponent>.<modulus>` (decimal); parsed, never dialed.
    RsaLegacy {
        exponent: String,
        modulus: String,
    },
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerKey::Ed25519(k) => f.write_str(&key_id(k)),
            PeerKey::RsaLegacy { exponent, modulus } => {
                write!(f, "rsapublickey:{exponent}.{modulus}")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpKeyUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub key: PeerKey,
    /// The path after the key, percent-decoded per segment; the first segment is the database.
    pub segments: Vec<String>,
}

impl HttpKeyUrl {
    pub fn parse(s: &str) -> Result<HttpKeyUrl, String> {
        let err = |m: &str| format!("invalid httpkey URL {s:?}: {m}");
        let rest = s
            .get(..10)
            .filter(|p| p.eq_ignore_ascii_case("httpkey://"))
            .map(|_| &s[10..])
            .ok_or_else(|| err("it must start with httpkey://"))?;
        if s.contains('#') || s.contains('?') {
            return Err(err("query strings and fragments are not allowed"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("it contains whitespace or control characters"));
        }
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| err("the key segment is missing"))?;
        if authority.contains('@') {
            return Err(err(
                "user information is not allowed; the key is the credential",
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6
                .split_once("]:")
                .ok_or_else(|| err("an IPv6 host needs [address]:port"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| err("the IPv6 address is malformed"))?;
            (h.to_string(), p)
        } else {
            let (h, p) = authority
                .rsplit_once(':')
                .ok_or_else(|| err("the port is missing (host:port)"))?;
            let valid_host = !h.is_empty()
                && h.len() <= 253
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !valid_host {
                return Err(err(
                    "the host is empty or has characters a host name cannot have",
                ));
            }
            (h.to_ascii_lowercase(), p)
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| err("the port must be a number from 1 to 65535"))?;
        let (key_seg, path) = path.split_once('/').unwrap_or((path, ""));
        let key = if key_seg.starts_with("ed25519:") {
            PeerKey::Ed25519(parse_key_id(key_seg).map_err(|e| err(&e))?)
        } else if let Some(rsa) = key_seg.strip_prefix("rsapublickey:") {
            let (e, m) = rsa
                .split_once('.')
                .ok_or_else(|| err("rsapublickey needs <exponent>.<modulus>"))?;
            let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
            if !digits(e) || !digits(m) {
                return Err(err(
                    "rsapublickey exponent and modulus must be decimal integers",
                ));
            }
            PeerKey::RsaLegacy {
                exponent: e.into(),
                modulus: m.into(),
            }
        } else {
            return Err(err(
                "the first path segment must be the server key (ed25519:<base32>)",
            ));
        };
        let mut segments = Vec::new();
        for seg in path.split('/').filter(|p| !p.is_empty()) {
            let decoded = percent_encoding::percent_decode_str(seg)
                .decode_utf8()
                .map_err(|_| err("a path segment is not valid UTF-8 after percent-decoding"))?;
            segments.push(decoded.into_owned());
        }
        if let Some(db) = segments.first() {
            thali_db::validate_db_name(db).map_err(|e| err(&e.reason()))?;
        }
        Ok(HttpKeyUrl {
            host,
            port,
            key,
            segments,
        })
    }

    pub fn db(&self) -> Option<&str> {
        self.segments.first().map(String::as_str)
    }

    /// The HTTP path to request on the peer (`/db/...`), re-encoded per segment.
    pub fn path(&self) -> String {
        let mut p = String::new();
        for s in &self.segments {
            p.push('/');
            p.push_str(
                &percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string(),
            );
        }
        if p.is_empty() {
            p.push('/');
        }
        p
    }
}

impl fmt::Display for HttpKeyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let path = self.path();
        write!(
            f,
            "httpkey://{host}:{}/{}{}",
            self.port,
            self.key,
            if path == "/" { "/" } else { &path }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kid() -> String {
        key_id(&[7u8; 32])
    }

    #[test]
    fn parses_good_urls() {
        let u = HttpKeyUrl::parse(&format!("httpkey://127.0.0.1:9898/{}/notes", kid())).unwrap();
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, 9898);
        assert_eq!(u.key, PeerKey::Ed25519([7u8; 32]));
        assert_eq!(u.db(), Some("notes"));
        assert_eq!(
            u.to_string(),
            format!("httpkey://127.0.0.1:9898/{}/notes", kid())
        );
        let u = HttpKeyUrl::parse(&format!("httpkey://[::1]:1/{}/a%2Fb/doc", kid())).unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.segments, vec!["a/b", "doc"]);
        assert_eq!(u.path(), "/a%2Fb/doc");
        let u = HttpKeyUrl::parse(&format!("HTTPKEY://Example.onion:80/{}/", kid())).unwrap();
        assert_eq!(u.host, "example.onion");
        assert_eq!(u.db(), None);
        let u = HttpKeyUrl::parse(
            "httpkey://h:1/rsapublickey:65537.2291233291581867842215081600/addressbook",
        )
        .unwrap();
        assert!(matches!(u.key, PeerKey::RsaLegacy { .. }));
    }

    #[test]
    fn rejects_bad_urls_with_reasons() {
        let k = kid();
        let cases = [
            (format!("http://h:1/{k}/db"), "httpkey://"),
            (format!("httpkey://h/{k}/db"), "port"),
            (format!("httpkey://h:0/{k}/db"), "port"),
            (format!("httpkey://h:99999/{k}/db"), "port"),
            (format!("httpkey://:1/{k}/db"), "host"),
            (format!("httpkey://u:p@h:1/{k}/db"), "user"),
            (format!("httpkey://h_x:1/{k}/db"), "host"),
            ("httpkey://h:1".to_string(), "key segment"),
            ("httpkey://h:1/db".to_string(), "server key"),
            ("httpkey://h:1/ed25519:abc/db".to_string(), "52"),
            (
                "httpkey://h:1/rsapublickey:65537/db".to_string(),
                "exponent",
            ),
            ("httpkey://h:1/rsapublickey:x.1/db".to_string(), "decimal"),
            (format!("httpkey://h:1/{k}/Bad"), "lowercase"),
            (format!("httpkey://h:1/{k}/db?x=1"), "query"),
            (format!("httpkey://[zz]:1/{k}/db"), "IPv6"),
            (format!("httpkey://h:1/{k}/d b"), "whitespace"),
        ];
        for (url, why) in cases {
            let e = HttpKeyUrl::parse(&url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
