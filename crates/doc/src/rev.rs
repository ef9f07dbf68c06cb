//! Revision identifiers (`N-<id>`) and the deterministic revision hash.

use super::canonical::SortedMap;
use md5::{Digest, Md5};
use serde_json::{Map, Value};
use std::fmt;
use std::io::Write;

/// A revision `pos-id`. Ordered as CouchDB orders leaves: by position, then id bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rev {
    pub pos: u64,
    pub id: String,
}

impl Rev {
    pub fn new(pos: u64, id: impl Into<String>) -> Self {
        Rev { pos, id: id.into() }
    }

    /// Parses `N-id`. N must be >= 1; the id must be non-empty ASCII alphanumerics.
    /// 32-character hex ids are normalised to lower case, as CouchDB prints them.
    pub fn parse(s: &str) -> Option<Rev> {
        let (pos, id) = s.split_once('-')?;
        if pos.is_empty() || pos.len() > 19 || !pos.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let pos: u64 = pos.parse().ok()?;
        if pos == 0 || !valid_rev_id(id) {
            return None;
        }
        Some(Rev::new(pos, normalise_id(id)))
    }
}

/// A revision id as found in `_rev` or `_revisions.ids`. CouchDB takes any text after `N-`
/// (PouchDB's suite sends `3-totally_fake_rev` and expects a conflict, not a parse error);
/// printable ASCII without spaces, bounded, is what we keep.
pub fn valid_rev_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

pub fn normalise_id(id: &str) -> String {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        id.to_ascii_lowercase()
    } else {
        id.to_string()
    }
}

impl fmt::Display for Rev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.pos, self.id)
    }
}

/// The deterministic revision id: md5 over a canonical JSON form of the parent revision, the
/// deleted flag, the body (no `_` fields) and the attachments' names and digests. The same edit
/// on two peers gives the same revision, which is what lets conflict resolvers converge.
///
/// The body is written with sorted members (`canonical`), so member order does not change the id.
pub fn hash_rev(
    parent: Option<&Rev>,
    deleted: bool,
    body: &Map<String, Value>,
    atts: &[(&str, &str)],
) -> String {
    // Serialised straight into the hasher: a tuple is a JSON array, so the bytes are those of
    // `[parent, deleted, body, atts]` without copying the body or buffering its text.
    let mut hasher = HashWriter::default();
    let parent = parent.map(|r| r.to_string());
    // Writing into a hasher cannot fail, nor can serialising these types.
    let _ = serde_json::to_writer(&mut hasher, &(parent, deleted, SortedMap(body), atts));
    hex::encode(hasher.finish())
}

/// `hash_rev` of a revision without attachments, and the compact JSON length of its body, from
/// one serialisation of the body (done before the write lock, see `IncomingDoc::prepare`).
pub fn hash_rev_and_len(
    parent: Option<&Rev>,
    deleted: bool,
    body: &Map<String, Value>,
) -> (String, usize) {
    let mut hasher = HashWriter::default();
    let parent = parent.map(|r| r.to_string());
    // The bytes of `[parent, deleted, body, []]`, as `hash_rev` writes them.
    let _ = hasher.write_all(b"[");
    let _ = serde_json::to_writer(&mut hasher, &parent);
    let _ = hasher.write_all(if deleted { b",true," } else { b",false," });
    let before = hasher.len;
    let _ = serde_json::to_writer(&mut hasher, &SortedMap(body));
    let len = hasher.len - before;
    let _ = hasher.write_all(b",[]]");
    (hex::encode(hasher.finish()), len)
}

/// `io::Write` into an md5 hasher, buffered: serde_json writes a token at a time, and md5 is
/// cheaper fed in blocks.
struct HashWriter {
    md5: Md5,
    buf: Vec<u8>,
    /// Bytes written so far.
    len: usize,
}

impl Default for HashWriter {
    fn default() -> Self {
        HashWriter {
            md5: Md5::new(),
            buf: Vec::with_capacity(HASH_BUF),
            len: 0,
        }
    }
}

const HASH_BUF: usize = 4096;

impl HashWriter {
    fn finish(mut self) -> [u8; 16] {
        self.md5.update(&self.buf);
        self.md5.finalize().into()
    }
}

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.len += buf.len();
        if self.buf.len() + buf.len() > HASH_BUF {
            self.md5.update(&self.buf);
            self.buf.clear();
        }
        if buf.len() >= HASH_BUF {
            self.md5.update(buf);
        } else {
            self.buf.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of `v` serialised as compact JSON, without building the text.
pub fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_md5_of_the_canonical_array() {
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"b":[1,2.5,"x\"y"],"a":{"z":null,"k":true}}"#).unwrap();
        let parent = Rev::parse("2-abc").unwrap();
        let atts = [("f.txt", "md5-xyz")];
        // The bytes revision ids have always been hashed from: members sorted, whatever order
        // the body was written in.
        let canonical =
            r#"["2-abc",false,{"a":{"k":true,"z":null},"b":[1,2.5,"x\"y"]},[["f.txt","md5-xyz"]]]"#;
        let expected = hex::encode(Md5::digest(canonical.as_bytes()));
        assert_eq!(hash_rev(Some(&parent), false, &body, &atts), expected);
        let empty = serde_json::to_vec(&serde_json::json!([null, true, {}, []])).unwrap();
        assert_eq!(
            hash_rev(None, true, &Map::new(), &[]),
            hex::encode(Md5::digest(empty))
        );
        assert_eq!(json_len(&body), serde_json::to_vec(&body).unwrap().len());
    }

    #[test]
    fn one_pass_hash_and_length_match_the_separate_ones() {
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"b":[1,2.5,"x\"y\u00e9"],"a":{"z":null,"k":true}}"#).unwrap();
        let parent = Rev::parse("7-0123abcd").unwrap();
        for (p, deleted) in [(None, false), (Some(&parent), true), (Some(&parent), false)] {
            assert_eq!(
                hash_rev_and_len(p, deleted, &body),
                (hash_rev(p, deleted, &body, &[]), json_len(&body))
            );
        }
        assert_eq!(
            hash_rev_and_len(None, true, &Map::new()),
            (hash_rev(None, true, &Map::new(), &[]), 2)
        );
    }

    #[test]
    fn parse_and_print() {
        let r = Rev::parse("3-ABCDEF0123456789abcdef0123456789").unwrap();
        assert_eq!(r.pos, 3);
        assert_eq!(r.to_string(), "3-abcdef0123456789abcdef0123456789");
        assert!(Rev::parse("0-abc").is_none());
        assert!(Rev::parse("x-abc").is_none());
        assert!(Rev::parse("1-").is_none());
        assert!(Rev::parse("1-a b").is_none());
        assert!(Rev::parse("abc").is_none());
        assert_eq!(Rev::parse("2-xyz").unwrap().id, "xyz");
    }

    #[test]
    fn hash_is_deterministic_and_sensitive() {
        let mut body = Map::new();
        body.insert("a".into(), 1.into());
        let p = Rev::new(1, "aa");
        let h1 = hash_rev(Some(&p), false, &body, &[]);
        assert_eq!(h1, hash_rev(Some(&p), false, &body, &[]));
        assert_eq!(h1.len(), 32);
        assert_ne!(h1, hash_rev(Some(&p), true, &body, &[]));
        assert_ne!(h1, hash_rev(None, false, &body, &[]));
        assert_ne!(h1, hash_rev(Some(&p), false, &body, &[("x", "md5-1")]));
    }

    /// Revision ids must never change between versions: nodes on different versions have to
    /// give the same edit the same id to converge. These were computed independently (md5 of
    /// the canonical JSON `[parent, deleted, body, [[name, digest]…]]`).
    #[test]
    fn golden_revision_ids() {
        let body = |v: serde_json::Value| v.as_object().cloned().unwrap();
        let cases = [
            (
                None,
                false,
                body(serde_json::json!({"a": 1})),
                vec![],
                "13cf90b4667798f88f0f9689b4dda143",
            ),
            (
                Some(Rev::new(1, "967a00dff5e02add41819138abb3284d")),
                false,
                body(
                    serde_json::json!({"title": "hello", "tags": ["x", "y"], "n": {"z": null, "b": true}}),
                ),
                vec![],
                "ad5f45e6f2e2f1240d4314497f132145",
            ),
            (
                Some(Rev::new(2, "7051cbe5c8faecd085a3fa619e6e6337")),
                true,
                Map::new(),
                vec![],
                "64f26f21e710f1f063e4fb15eef9a5d1",
            ),
            (
                None,
                false,
                body(serde_json::json!({"text": "h\u{e9}llo \u{2603}"})),
                vec![("photo.jpg", "md5-XrY7u+Ae7tCTyyK7j1rNww==")],
                "0955aaa55ff5f2b719ee062ba9295626",
            ),
        ];
        for (parent, deleted, body, atts, want) in cases {
            assert_eq!(hash_rev(parent.as_ref(), deleted, &body, &atts), want);
        }
    }
}
