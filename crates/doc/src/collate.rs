//! CouchDB's view collation as bytes: `encode` maps a JSON key to a byte string whose plain
//! byte order is the collation order, so indexes are range scans of the store.
//!
//! Order (CouchDB's `couch_ejson_compare`): null < false < true < numbers < strings < arrays <
//! objects. Numbers by value; strings by the Unicode Collation Algorithm with the root locale at
//! tertiary strength (ICU's default, as CouchDB uses it: `a < A < aa < b`); arrays element by
//! element with a prefix first; objects member by member (key, then value), shorter first.
//!
//! Encoding: a tag byte per term; a number is 8 order-preserving bytes of its f64; a string is
//! its UCA sort key (which never holds a zero byte) and a 0 terminator; arrays and objects are
//! their members and a 0 terminator (lower than any tag, so a prefix sorts first). Every term is
//! self-delimiting, so `term_len` can walk an encoding (for `group_level`).

use icu_collator::options::CollatorOptions;
use icu_collator::CollatorBorrowed;
use serde_json::Value;
use std::sync::OnceLock;

const NULL: u8 = 0x10;
const FALSE: u8 = 0x20;
const TRUE: u8 = 0x30;
const NUMBER: u8 = 0x40;
const STRING: u8 = 0x50;
const ARRAY: u8 = 0x60;
const OBJECT: u8 = 0x70;
const END: u8 = 0x00;

/// Changes whenever the encoding (or the collation data behind it) changes; part of every
/// index signature, so such a change rebuilds indexes instead of misreading them.
pub const VERSION: &str = "thali-collate-1/icu_collator-2.4";

fn collator() -> Option<&'static CollatorBorrowed<'static>> {
    static C: OnceLock<Option<CollatorBorrowed<'static>>> = OnceLock::new();
    C.get_or_init(|| CollatorBorrowed::try_new(Default::default(), CollatorOptions::default()).ok())
        .as_ref()
}

/// The key's collation bytes.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    encode_into(v, &mut out);
    out
}

pub fn encode_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.push(NULL),
        Value::Bool(false) => out.push(FALSE),
        Value::Bool(true) => out.push(TRUE),
        Value::Number(n) => {
            out.push(NUMBER);
            out.extend_from_slice(&number_bytes(n.as_f64().unwrap_or(0.0)));
        }
        Value::String(s) => string_into(s, out),
        Value::Array(a) => {
            out.push(ARRAY);
            for e in a {
                encode_into(e, out);
            }
            out.push(END);
        }
        Value::Object(o) => {
            out.push(OBJECT);
            for (k, v) in o {
                string_into(k, out);
                encode_into(v, out);
            }
            out.push(END);
        }
    }
}

fn string_into(s: &str, out: &mut Vec<u8>) {
    out.push(STRING);
    match collator() {
        Some(c) => {
            let start = out.len();
            let _ = c.write_sort_key_to(s, out);
            // Sort keys hold no zero byte; make sure, as the terminator depends on it.
            for b in &mut out[start..] {
                if *b == 0 {
                    *b = 1;
                }
            }
        }
        // No collation data (cannot happen with compiled data): code point order, zero-free.
        None => out.extend(s.bytes().map(|b| b.max(1))),
    }
    out.push(END);
}

/// Compares two JSON values in the same order as their encodings, without encoding them
/// (Mango selectors compare document values this way).
pub fn cmp(a: &Value, b: &Value) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => NULL,
            Value::Bool(false) => FALSE,
            Value::Bool(true) => TRUE,
            Value::Number(_) => NUMBER,
            Value::String(_) => STRING,
            Value::Array(_) => ARRAY,
            Value::Object(_) => OBJECT,
        }
    }
    fn strings(x: &str, y: &str) -> Ordering {
        match collator() {
            Some(c) => c.compare(x, y),
            None => x.cmp(y),
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            number_bytes(x.as_f64().unwrap_or(0.0)).cmp(&number_bytes(y.as_f64().unwrap_or(0.0)))
        }
        (Value::String(x), Value::String(y)) => strings(x, y),
        (Value::Array(x), Value::Array(y)) => x
            .iter()
            .zip(y)
            .map(|(p, q)| cmp(p, q))
            .find(|o| o.is_ne())
            .unwrap_or_else(|| x.len().cmp(&y.len())),
        (Value::Object(x), Value::Object(y)) => x
            .iter()
            .zip(y)
            .map(|((kx, vx), (ky, vy))| strings(kx, ky).then_with(|| cmp(vx, vy)))
            .find(|o| o.is_ne())
            .unwrap_or_else(|| x.len().cmp(&y.len())),
        _ => rank(a).cmp(&rank(b)),
    }
}

/// f64 bits made to sort as unsigned bytes: flip the sign bit of positives, all bits of
/// negatives. `-0.0` is `0.0`.
fn number_bytes(f: f64) -> [u8; 8] {
    let f = if f == 0.0 { 0.0 } else { f };
    let bits = f.to_bits();
    let ordered = if bits >> 63 == 0 {
        bits | (1 << 63)
    } else {
        !bits
    };
    ordered.to_be_bytes()
}

/// Length of the term encoded at the start of `b` (0 when `b` is not an encoding).
pub fn term_len(b: &[u8]) -> usize {
    match b.first() {
        Some(&NULL | &FALSE | &TRUE) => 1,
        Some(&NUMBER) => 9.min(b.len()),
        Some(&STRING) => b[1..]
            .iter()
            .position(|&x| x == END)
            .map_or(b.len(), |p| p + 2),
        Some(&ARRAY) => {
            let mut i = 1;
            while i < b.len() && b[i] != END {
                let n = term_len(&b[i..]);
                if n == 0 {
                    return b.len();
                }
                i += n;
            }
            (i + 1).min(b.len())
        }
        Some(&OBJECT) => {
            let mut i = 1;
            while i < b.len() && b[i] != END {
                let k = term_len(&b[i..]);
                if k == 0 {
                    return b.len();
                }
                i += k;
                let v = term_len(&b[i..]);
                if v == 0 {
                    return b.len();
                }
                i += v;
            }
            (i + 1).min(b.len())
        }
        _ => 0,
    }
}

/// The encoding of a key cut to `level` elements when it is an array (CouchDB's
/// `group_level`); other keys are whole.
pub fn truncate(enc: &[u8], level: usize) -> Vec<u8> {
    if enc.first() != Some(&ARRAY) {
        return enc.to_vec();
    }
    let mut i = 1;
    for _ in 0..level {
        if i >= enc.len() || enc[i] == END {
            break;
        }
        i += term_len(&enc[i..]).max(1);
    }
    let mut out = enc[..i.min(enc.len())].to_vec();
    out.push(END);
    out
}

/// Cuts a JSON key the same way as `truncate`.
pub fn truncate_value(v: &Value, level: usize) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.iter().take(level).cloned().collect()),
        v => v.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sorted(mut keys: Vec<Value>) -> Vec<Value> {
        keys.sort_by_key(encode);
        keys
    }

    #[test]
    fn couchdb_type_order_and_values() {
        let expect = vec![
            json!(null),
            json!(false),
            json!(true),
            json!(-1e300),
            json!(-2),
            json!(-1.5),
            json!(0),
            json!(1),
            json!(2.5),
            json!(10),
            json!(1e300),
            json!("a"),
            json!("A"),
            json!("aa"),
            json!("b"),
            json!("B"),
            json!("ba"),
            json!([]),
            json!([null]),
            json!(["a"]),
            json!(["a", 1]),
            json!(["b"]),
            json!({}),
            json!({"a": 1}),
            json!({"a": 2}),
            json!({"a": 2, "b": 0}),
            json!({"b": 0}),
        ];
        let mut shuffled = expect.clone();
        shuffled.reverse();
        shuffled.rotate_left(7);
        assert_eq!(sorted(shuffled), expect);
        assert_eq!(encode(&json!(1)), encode(&json!(1.0)));
        assert_eq!(encode(&json!(-0.0)), encode(&json!(0)));
    }

    #[test]
    fn strings_follow_the_unicode_collation_algorithm() {
        // The start of CouchDB's documented ASCII order: punctuation, then digits, then
        // letters with lower case first; accents after the plain letter.
        let expect: Vec<Value> = [
            "_", "-", ",", ";", ":", "!", "?", ".", "'", "\"", "(", ")", "[", "]", "{", "}", "@",
            "*", "/", "\\", "&", "#", "%", "`", "^", "+", "<", "=", ">", "|", "~", "$", "0", "1",
            "9", "a", "A", "á", "b", "B", "z", "Z",
        ]
        .iter()
        .map(|s| json!(s))
        .collect();
        let mut rev = expect.clone();
        rev.reverse();
        assert_eq!(sorted(rev), expect);
        assert!(encode(&json!("éclair")) < encode(&json!("ezra")));
    }

    #[test]
    fn terms_are_self_delimiting_and_truncate_by_level() {
        for v in [
            json!(null),
            json!(12.5),
            json!("héllo"),
            json!([1, "a", [true, {"k": null}]]),
            json!({"x": [1, 2], "y": "z"}),
        ] {
            let e = encode(&v);
            let mut with_tail = e.clone();
            with_tail.extend_from_slice(b"docid");
            assert_eq!(term_len(&with_tail), e.len(), "{v}");
        }
        let k = json!(["2024", 3, 17, "x"]);
        assert_eq!(truncate(&encode(&k), 2), encode(&json!(["2024", 3])));
        assert_eq!(truncate(&encode(&k), 9), encode(&k));
        assert_eq!(truncate(&encode(&json!("s")), 1), encode(&json!("s")));
        assert_eq!(truncate_value(&k, 1), json!(["2024"]));
    }
}
