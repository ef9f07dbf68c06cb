//! Inputs: byte-level mutations of seeds (AFL's havoc stages without the coverage feedback)
//! and structure-aware JSON built from the names CouchDB gives meaning to, so inputs get past
//! `serde_json` and reach the parsers' own rules.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{Map, Value};

/// Tokens that matter to the node's parsers: inserted whole by the mutator, used as member
/// names and values by the JSON generator.
pub const DICTIONARY: &[&str] = &[
    "_id",
    "_rev",
    "_revisions",
    "start",
    "ids",
    "_deleted",
    "_attachments",
    "_conflicts",
    "_local_seq",
    "_design/",
    "_local/",
    "data",
    "stub",
    "follows",
    "length",
    "digest",
    "content_type",
    "revpos",
    "encoding",
    "gzip",
    "md5-",
    "docs",
    "new_edits",
    "all_or_nothing",
    "open_revs",
    "revs",
    "atts_since",
    "selector",
    "fields",
    "sort",
    "limit",
    "skip",
    "use_index",
    "bookmark",
    "r",
    "execution_stats",
    "$and",
    "$or",
    "$nor",
    "$not",
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$exists",
    "$type",
    "$size",
    "$mod",
    "$regex",
    "$elemMatch",
    "$allMatch",
    "$keyMapMatch",
    "$all",
    "$beginsWith",
    "views",
    "map",
    "reduce",
    "_sum",
    "_count",
    "_stats",
    "_approx_count_distinct",
    "validate_doc_update",
    "filters",
    "language",
    "javascript",
    "lua",
    "wasm",
    "query",
    "options",
    "partial_filter_selector",
    "1-",
    "2-",
    "99999999999999999999",
    "-1",
    "0",
    "1e308",
    "-0",
    "null",
    "true",
    "{}",
    "[]",
    "\"\"",
    "\\u0000",
    "\\ud800",
    "\\uffff",
    "..",
    "%00",
    "%2F",
    "\r\n",
    "\r\n\r\n",
    "--",
    "Content-Type: application/json",
    "Content-Disposition: attachment; filename=\"a\"",
    "Content-Encoding: gzip",
    "\u{10FFFF}",
    "é",
    "now",
    "since",
    "descending",
    "startkey",
    "endkey",
    "key",
    "keys",
    "include_docs",
    "conflicts",
    "group_level",
    "inclusive_end",
];

/// Member names a generated object takes most of its names from.
const NAMES: &[&str] = &[
    "_id",
    "_rev",
    "_revisions",
    "_deleted",
    "_attachments",
    "docs",
    "new_edits",
    "selector",
    "fields",
    "sort",
    "limit",
    "skip",
    "use_index",
    "bookmark",
    "start",
    "ids",
    "id",
    "rev",
    "data",
    "stub",
    "follows",
    "length",
    "digest",
    "content_type",
    "revpos",
    "views",
    "map",
    "reduce",
    "validate_doc_update",
    "filters",
    "language",
    "n",
    "tags",
    "a.b",
    "$and",
    "$or",
    "$gt",
    "$lt",
    "$in",
    "$regex",
    "$elemMatch",
    "$exists",
    "$type",
    "$size",
    "$mod",
    "$not",
];

/// A random JSON value, at most `depth` levels deep, biased toward CouchDB's shapes.
pub fn json(rng: &mut StdRng, depth: u32) -> Value {
    let pick = if depth == 0 {
        rng.gen_range(0..6)
    } else {
        rng.gen_range(0..9)
    };
    match pick {
        0 => Value::Null,
        1 => Value::Bool(rng.gen()),
        2 => match rng.gen_range(0..4) {
            0 => Value::from(rng.gen_range(-3i64..40)),
            1 => Value::from(rng.gen::<i64>()),
            2 => Value::from(rng.gen::<u64>()),
            _ => serde_json::Number::from_f64(rng.gen::<f64>() * 1e6)
                .map(Value::Number)
                .unwrap_or(Value::Null),
        },
        3 => Value::String((*DICTIONARY.choose(rng).unwrap_or(&"")).to_string()),
        4 => Value::String(rev_like(rng)),
        5 => Value::String(text(rng)),
        6 => Value::Array(
            (0..rng.gen_range(0..5))
                .map(|_| json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.gen_range(0..6) {
                let name = if rng.gen_bool(0.8) {
                    (*NAMES.choose(rng).unwrap_or(&"x")).to_string()
                } else {
                    text(rng)
                };
                m.insert(name, json(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// `N-id` with N and the id from the edges of what is valid.
pub fn rev_like(rng: &mut StdRng) -> String {
    let pos = *[
        "0",
        "1",
        "2",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "",
        "01",
    ]
    .choose(rng)
    .unwrap_or(&"1");
    let id = match rng.gen_range(0..4) {
        0 => "967a00dff5e02add41819138abb3284d".to_string(),
        1 => "ABCDEF0123456789ABCDEF0123456789".to_string(),
        2 => text(rng),
        _ => "x".repeat(rng.gen_range(0..200)),
    };
    format!("{pos}-{id}")
}

/// Short text from a mix of ASCII, separators, controls and multi-byte characters.
pub fn text(rng: &mut StdRng) -> String {
    const CHARS: &[char] = &[
        'a',
        'b',
        'Z',
        '0',
        '9',
        '-',
        '_',
        '/',
        '.',
        '$',
        ' ',
        '"',
        '\\',
        '%',
        '?',
        '#',
        '@',
        ':',
        '[',
        ']',
        '\0',
        '\n',
        'é',
        'ß',
        '\u{FEFF}',
        '\u{10FFFF}',
        '日',
    ];
    (0..rng.gen_range(0..12))
        .map(|_| *CHARS.choose(rng).unwrap_or(&'a'))
        .collect()
}

/// One to eight havoc mutations of `input`: bit flips, interesting bytes, dictionary tokens,
/// deletions, duplications, and a splice with another seed.
pub fn mutate(rng: &mut StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.gen_range(1..=8) {
        let len = v.len();
        match rng.gen_range(0..9) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] = *[
                    0u8, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'[', b']', b',', b':', b'\\',
                ]
                .choose(rng)
                .unwrap_or(&0);
            }
            2 => {
                let tok = DICTIONARY.choose(rng).unwrap_or(&"").as_bytes();
                let i = rng.gen_range(0..=len);
                v.splice(i..i, tok.iter().copied());
            }
            3 if len > 0 => {
                let a = rng.gen_range(0..len);
                let b = (a + rng.gen_range(1..=16)).min(len);
                v.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.gen_range(0..len);
                let b = (a + rng.gen_range(1..=32)).min(len);
                let chunk = v[a..b].to_vec();
                let at = rng.gen_range(0..=v.len());
                v.splice(at..at, chunk);
            }
            5 if !other.is_empty() => {
                let cut = rng.gen_range(0..=len);
                let from = rng.gen_range(0..other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            6 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] = v[i].wrapping_add(rng.gen_range(1..=35));
            }
            7 => {
                // A digit run: numbers at the edges of every integer type.
                let n = *[
                    "0",
                    "-1",
                    "4294967296",
                    "18446744073709551616",
                    "1e400",
                    "-0.0",
                ]
                .choose(rng)
                .unwrap_or(&"0");
                let i = rng.gen_range(0..=len);
                v.splice(i..i, n.bytes());
            }
            _ => {
                if len > 1 {
                    let i = rng.gen_range(0..len);
                    v.truncate(i.max(1));
                }
            }
        }
    }
    // Bounded: the node's request limits are tested elsewhere; here the parsers are.
    v.truncate(64 << 10);
    v
}

/// A structure-aware mutation of a JSON seed: a random member or element replaced by a
/// generated value, removed, or joined by a new member, so the envelope (`{"docs": […]}`,
/// `{"selector": …}`) stays and the change lands inside it.
pub fn mutate_json(rng: &mut StdRng, seed: &Value) -> Value {
    let mut v = seed.clone();
    for _ in 0..rng.gen_range(1..=3) {
        let depth = rng.gen_range(0..4);
        edit_at(rng, &mut v, depth);
    }
    v
}

fn edit_at(rng: &mut StdRng, v: &mut Value, depth: u32) {
    let children = match v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if depth > 0 && children > 0 {
        let i = rng.gen_range(0..children);
        match v {
            Value::Object(m) => {
                if let Some((_, c)) = m.iter_mut().nth(i) {
                    return edit_at(rng, c, depth - 1);
                }
            }
            Value::Array(a) => return edit_at(rng, &mut a[i], depth - 1),
            _ => {}
        }
    }
    match (rng.gen_range(0..4), v) {
        (0, Value::Object(m)) if !m.is_empty() => {
            let i = rng.gen_range(0..m.len());
            if let Some(k) = m.keys().nth(i).cloned() {
                m.shift_remove(&k);
            }
        }
        (1, Value::Object(m)) => {
            let name = (*NAMES.choose(rng).unwrap_or(&"x")).to_string();
            m.insert(name, json(rng, 3));
        }
        (1, Value::Array(a)) => a.push(json(rng, 3)),
        (2, Value::Array(a)) if !a.is_empty() => {
            let i = rng.gen_range(0..a.len());
            let dup = a[i].clone();
            a.push(dup);
        }
        (_, v) => *v = json(rng, 3),
    }
}
