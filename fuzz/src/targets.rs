//! The targets. Pure ones call a parser and check what it promises (a parsed value prints and
//! parses back the same); HTTP ones send the bytes to the in-process node and check its answer
//! with `Harness::check`.

use crate::node::{harness, DB, DDOC_DB};
use crate::Target;
use axum::http::Method;
use futures_util::stream;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use thali_node::doc::parse::parse_doc;
use thali_node::doc::rev::Rev;
use thali_node::doc::selector::Selector;
use thali_node::mango::request::FindRequest;
use thali_node::peer::httpkey::HttpKeyUrl;

pub static ALL: &[Target] = &[
    Target {
        name: "doc",
        run: doc,
        seeds: doc_seeds,
        json: true,
    },
    Target {
        name: "rev",
        run: rev,
        seeds: rev_seeds,
        json: false,
    },
    Target {
        name: "httpkey",
        run: httpkey,
        seeds: httpkey_seeds,
        json: false,
    },
    Target {
        name: "selector",
        run: selector,
        seeds: find_seeds,
        json: true,
    },
    Target {
        name: "multipart",
        run: multipart,
        seeds: multipart_seeds,
        json: false,
    },
    Target {
        name: "put",
        run: put,
        seeds: doc_seeds,
        json: true,
    },
    Target {
        name: "bulk_docs",
        run: bulk_docs,
        seeds: bulk_docs_seeds,
        json: true,
    },
    Target {
        name: "bulk_get",
        run: bulk_get,
        seeds: bulk_get_seeds,
        json: true,
    },
    Target {
        name: "revs_diff",
        run: revs_diff,
        seeds: revs_diff_seeds,
        json: true,
    },
    Target {
        name: "find",
        run: find,
        seeds: find_seeds,
        json: true,
    },
    Target {
        name: "query",
        run: query,
        seeds: query_seeds,
        json: false,
    },
    Target {
        name: "since",
        run: since,
        seeds: since_seeds,
        json: false,
    },
    Target {
        name: "multipart_put",
        run: multipart_put,
        seeds: multipart_seeds,
        json: false,
    },
    Target {
        name: "design",
        run: design,
        seeds: design_seeds,
        json: true,
    },
    Target {
        name: "pair",
        run: pair,
        seeds: pair_seeds,
        json: true,
    },
];

fn strs(v: &[&str]) -> Vec<Vec<u8>> {
    v.iter().map(|s| s.as_bytes().to_vec()).collect()
}

// ---- pure targets -------------------------------------------------------------------------

/// A JSON document as a `PUT` or `_bulk_docs` carries it, `_revisions` and attachments included.
fn doc(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // Every number prints and parses back as the same number (correctly rounded parsing,
    // shortest round-trip printing).
    let again: Value = serde_json::from_str(&v.to_string()).expect("printed JSON parses");
    assert_eq!(again, v, "a value changed in a print and parse round trip");
    if let Ok(mut d) = parse_doc(v) {
        d.prepare(true);
        d.prepare(false);
        if let Some((start, ids)) = &d.revisions {
            assert!(
                *start as usize >= ids.len() || ids.is_empty(),
                "_revisions accepted with start {start} below its {} ids",
                ids.len()
            );
        }
    }
}

fn doc_seeds() -> Vec<Vec<u8>> {
    strs(&[
        r#"{"_id":"a","n":1}"#,
        r#"{"_id":"a","_rev":"2-b1","_revisions":{"start":2,"ids":["b1","a0"]},"x":[1,{"y":null}]}"#,
        r#"{"_id":"_design/d","views":{"v":{"map":"function(d){emit(1)}"}}}"#,
        r#"{"_id":"_local/x","_rev":"0-3","v":true}"#,
        r#"{"_id":"b","_deleted":true,"_rev":"1-967a00dff5e02add41819138abb3284d"}"#,
        r#"{"_id":"c","_attachments":{"a.txt":{"content_type":"text/plain","data":"aGk="},"b":{"stub":true,"digest":"md5-x","revpos":1},"c":{"follows":true,"length":3,"content_type":"x/y"}}}"#,
        r#"{"_id":"d","_conflicts":[],"_foo":1}"#,
        r#"{"_id":"","_rev":"a"}"#,
    ])
}

/// A revision string as found in `_rev`, `rev=`, `open_revs` and `If-Match`.
fn rev(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(r) = Rev::parse(s) {
        let again = Rev::parse(&r.to_string());
        assert_eq!(
            again.as_ref(),
            Some(&r),
            "{s:?} does not print back the same"
        );
    }
}

fn rev_seeds() -> Vec<Vec<u8>> {
    strs(&[
        "1-967a00dff5e02add41819138abb3284d",
        "2-ABCDEF0123456789ABCDEF0123456789",
        "3-totally_fake_rev",
        "0-1",
        "18446744073709551615-a",
        "-",
        "1-",
    ])
}

/// An httpkey URL as `_replicate`, `_replicator` documents, invites and `thali pair` take it.
fn httpkey(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(u) = HttpKeyUrl::parse(s) {
        let printed = u.to_string();
        let again = HttpKeyUrl::parse(&printed)
            .unwrap_or_else(|e| panic!("{s:?} parsed, but its printed form does not: {e}"));
        assert_eq!(again, u, "{s:?} does not print back the same ({printed:?})");
        let _ = u.db();
        let _ = u.path();
    }
}

fn httpkey_seeds() -> Vec<Vec<u8>> {
    strs(&[
        "httpkey://127.0.0.1:5985/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/notes",
        "httpkey://[::1]:443/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/a%2Fb/_design/x",
        "httpkey://abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz2345.onion:80/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/",
        "HTTPKEY://host/k",
        "httpkey://u@h:1/k/db",
    ])
}

/// A Mango request body: selector, sort, fields, paging; the selector then matches documents.
fn selector(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let docs = [
        json!({"_id": "a", "n": 1, "tags": ["x", "y"], "o": {"k": "v"}}),
        json!({"_id": "b", "n": "1", "tags": [], "o": null}),
        json!({}),
    ];
    if let Ok(r) = FindRequest::parse(&v) {
        let _ = r.sort_paths();
        let _ = r.descending();
    }
    let sel = v.get("selector").unwrap_or(&v);
    if let Ok(s) = Selector::parse(sel) {
        for d in &docs {
            let _ = s.matches(d);
        }
        let _ = s.conjuncts();
        let _ = s.requires(&[vec!["n".into()]]);
        let _ = s.is_constant(&["n".into()]);
    }
}

fn find_seeds() -> Vec<Vec<u8>> {
    strs(&[
        r#"{"selector":{"n":{"$gt":0}},"sort":[{"n":"asc"}],"fields":["_id","n"],"limit":2}"#,
        r#"{"selector":{"$or":[{"tags":{"$elemMatch":{"$eq":"x"}}},{"o.k":{"$regex":"^v"}}]}}"#,
        r#"{"selector":{"$not":{"n":{"$in":[1,2,"1"]}},"tags":{"$size":2}},"use_index":"by-n","bookmark":"nil"}"#,
        r#"{"selector":{"n":{"$mod":[2,1]},"_id":{"$beginsWith":"a"},"x":{"$exists":false}},"execution_stats":true,"skip":1}"#,
        r#"{"selector":{"$and":[{"n":{"$type":"number"}},{"tags":{"$all":["x"]}},{"o":{"$keyMapMatch":{"$eq":"k"}}}]}}"#,
    ])
}

/// The multipart reader on a body cut into frames whose sizes the input's first byte picks.
fn multipart(data: &[u8]) {
    use thali_node::multipart::Reader;
    let Some((&frame, body)) = data.split_first() else {
        return;
    };
    let frame = usize::from(frame % 64) + 1;
    let frames: Vec<Result<bytes::Bytes, std::io::Error>> = body
        .chunks(frame)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let _ = thali_node::multipart::boundary("multipart/related; boundary=\"abc\"; x=y");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = Reader::new(stream::iter(frames), "abc");
        let mut seen = 0usize;
        // Each step consumes input or ends: more steps than bytes would be a loop.
        for _ in 0..body.len() + 8 {
            match r.next_part().await {
                Ok(Some(h)) => {
                    let _ = h.filename();
                    let _ = h.content_type();
                    match r.read_to_vec(1 << 20).await {
                        Ok(v) => seen += v.len(),
                        Err(_) => return,
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
        panic!(
            "the multipart reader did not finish a {}-byte body ({seen} read)",
            body.len()
        );
    });
}

fn multipart_seeds() -> Vec<Vec<u8>> {
    let doc = r#"{"_id":"m","_attachments":{"a.txt":{"follows":true,"length":5,"content_type":"text/plain"}}}"#;
    vec![
        format!("\x07--abc\r\nContent-Type: application/json\r\n\r\n{doc}\r\n--abc\r\nContent-Disposition: attachment; filename=\"a.txt\"\r\n\r\nhello\r\n--abc--").into_bytes(),
        format!("\x01preamble\r\n--abc\r\n\r\n{doc}\r\n--abc\r\n\r\nhello\r\n--abc--\r\nepilogue").into_bytes(),
        b"\x3f--abc\r\n\r\n--abc--".to_vec(),
        b"\x00--abc".to_vec(),
    ]
}

// ---- HTTP targets ---------------------------------------------------------------------------

fn post_json(path: &str, data: &[u8]) -> crate::node::Answer {
    harness().request(Method::POST, path, Some("application/json"), data.to_vec())
}

/// `PUT /fuzz/<prefix><n>` of `body`, alternately as an app (`new_edits` default) and as a
/// replicator (`new_edits=false`) sends it.
fn put_doc(prefix: &str, content_type: &str, body: &[u8], what: &str) {
    let h = harness();
    let n = h.next_input();
    let q = if n.is_multiple_of(2) {
        ""
    } else {
        "?new_edits=false"
    };
    let a = h.request(
        Method::PUT,
        &format!("/{DB}/{prefix}{n}{q}"),
        Some(content_type),
        body.to_vec(),
    );
    h.check(what, &a);
}

fn put(data: &[u8]) {
    put_doc("d", "application/json", data, "PUT doc");
}

/// Pairing messages from strangers' keys (`/_thali/accept`, `/_thali/pair`) to a node whose
/// code-pairing window is open: refused, limited or answered, never more.
fn pair(data: &[u8]) {
    let h = harness();
    let n = h.next_input();
    let path = if n.is_multiple_of(4) {
        "/_thali/accept"
    } else {
        "/_thali/pair"
    };
    // Every other message to `/_thali/pair` is a well-formed `start` whose values come from
    // the input, so the session paths are reached as often as the parsers' refusals.
    let body = if path == "/_thali/pair" && n.is_multiple_of(2) {
        start_from(data)
    } else {
        data.to_vec()
    };
    let a = h.post_as_stranger(n, path, body);
    h.check(path, &a);
}

fn start_from(data: &[u8]) -> Vec<u8> {
    let db: String = data
        .iter()
        .take(24)
        .map(|b| char::from(b'a' + b % 26))
        .collect();
    let level = ["read", "write", "admin", "owner"][data.len() % 4];
    let commitment: String = (0..32)
        .map(|i| {
            format!(
                "{:02x}",
                data.get(i % data.len().max(1)).copied().unwrap_or(0)
            )
        })
        .collect();
    json!({"step": "start", "db": if db.is_empty() { "d".into() } else { db },
           "level": level, "name": String::from_utf8_lossy(&data[..data.len().min(80)]),
           "commitment": commitment})
    .to_string()
    .into_bytes()
}

fn pair_seeds() -> Vec<Vec<u8>> {
    strs(&[
        r#"{"secret":"00112233445566778899aabbccddeeff","name":"desk","urls":["httpkey://127.0.0.1:1/ed25519:aaaa/"]}"#,
        r#"{"step":"start","db":"shared","level":"write","name":"laptop","commitment":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
        r#"{"step":"start","db":"shared","level":"read"}"#,
        r#"{"step":"start","db":"notes","commitment":"1111111111111111111111111111111111111111111111111111111111111111"}"#,
        r#"{"step":"start","db":"a-b_c$d","level":"admin","commitment":"abababababababababababababababababababababababababababababababab"}"#,
        r#"{"step":"start","db":"photos","level":"read","name":"x","commitment":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}"#,
        r#"{"commitment":"fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210","step":"start","db":"p"}"#,
        r#"{"step":"start","db":"_replicator","level":"admin"}"#,
        r#"{"step":"reveal","session":"0011223344556677","nonce":"00112233445566778899aabbccddeeff"}"#,
        r#"{"step":"cancel","session":"0011223344556677"}"#,
        r#"{"step":"confirm","session":"x","name":"a"}"#,
    ])
}

fn bulk_docs(data: &[u8]) {
    let h = harness();
    h.next_input();
    let a = post_json(&format!("/{DB}/_bulk_docs"), data);
    h.check("_bulk_docs", &a);
}

fn bulk_docs_seeds() -> Vec<Vec<u8>> {
    strs(&[
        r#"{"docs":[{"_id":"x","v":1},{"_id":"a","_rev":"2-b1","_deleted":true},{"v":2}]}"#,
        r#"{"new_edits":false,"docs":[{"_id":"a","_rev":"3-cc","_revisions":{"start":3,"ids":["cc","b1","967a00dff5e02add41819138abb3284d"]}}]}"#,
        r#"{"all_or_nothing":true,"docs":[{"_id":"c","_rev":"1-d","_attachments":{"t.txt":{"stub":true}}}]}"#,
        r#"{"docs":[{"_id":"_local/ck","v":1},{"_id":"_design/z","views":{"q":{"map":"function(d){emit(d.v)}"}}}]}"#,
    ])
}

fn bulk_get(data: &[u8]) {
    let h = harness();
    let n = h.next_input();
    let (q, accept) = match n % 3 {
        0 => ("?revs=true", "application/json"),
        1 => ("?revs=true&attachments=true", "multipart/mixed"),
        _ => ("?latest=true", "application/json"),
    };
    let a = h.send(
        Method::POST,
        &format!("/{DB}/_bulk_get{q}"),
        &[("content-type", "application/json"), ("accept", accept)],
        data.to_vec(),
    );
    // A multipart answer is not JSON; its status is what can go wrong.
    if accept != "application/json" && a.status.is_success() {
        return;
    }
    h.check("_bulk_get", &a);
}

fn bulk_get_seeds() -> Vec<Vec<u8>> {
    strs(&[
        r#"{"docs":[{"id":"a"},{"id":"a","rev":"2-b1"},{"id":"c","atts_since":["1-d"]},{"id":"nope"}]}"#,
        r#"{"docs":[{"id":"b","rev":"1-c"},{"id":"_design/v"},{"id":"a","rev":"9-zz"}]}"#,
        r#"{"docs":[{"rev":"1-x"},{"id":5}]}"#,
    ])
}

fn revs_diff(data: &[u8]) {
    let h = harness();
    h.next_input();
    for path in ["_revs_diff", "_missing_revs"] {
        let a = post_json(&format!("/{DB}/{path}"), data);
        h.check(path, &a);
    }
}

fn revs_diff_seeds() -> Vec<Vec<u8>> {
    strs(&[
        r#"{"a":["2-b1","3-zz","1-967a00dff5e02add41819138abb3284d"],"new":["1-x"]}"#,
        r#"{"b":["1-c"],"c":[]}"#,
    ])
}

fn find(data: &[u8]) {
    let h = harness();
    h.next_input();
    for path in ["_find", "_explain"] {
        let a = post_json(&format!("/{DB}/{path}"), data);
        h.check(path, &a);
    }
}

/// A query string on the routes that take one (feeds that wait are the `since` target's).
fn query(data: &[u8]) {
    let Some((&route, q)) = data.split_first() else {
        return;
    };
    let h = harness();
    h.next_input();
    let path = match route % 8 {
        0 => "_all_docs",
        1 => "_design/v/_view/v",
        2 => "_design/l/_view/l",
        3 => "a",
        4 => "c/t.txt",
        5 => "_design_docs",
        6 => "_local_docs",
        _ => "_design/v/_info",
    };
    // As a client could send it: anything a URI's query may hold, the rest percent-encoded.
    let q: String = String::from_utf8_lossy(q)
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '#' {
                c.to_string()
            } else {
                utf8_percent_encode(&c.to_string(), NON_ALPHANUMERIC).to_string()
            }
        })
        .collect();
    let a = h.request(Method::GET, &format!("/{DB}/{path}?{q}"), None, Vec::new());
    if path == "c/t.txt" && a.status.is_success() {
        return;
    }
    h.check(path, &a);
}

fn query_seeds() -> Vec<Vec<u8>> {
    strs(&[
        "\x00include_docs=true&conflicts=true&startkey=\"a\"&endkey=\"z\"&limit=2&skip=1",
        "\x01reduce=true&group_level=1&stale=ok&update=lazy",
        "\x01keys=[1,2,\"a\"]&descending=true&inclusive_end=false&reduce=false",
        "\x02startkey_docid=a&key=\"x\"&update_seq=true",
        "\x03revs=true&revs_info=true&open_revs=[\"2-b1\",\"9-x\"]&latest=true&local_seq=true&attachments=true&atts_since=[\"1-a\"]",
        "\x04rev=1-d",
        "\x05limit=-1&start_key=%22_design%2F%22",
        "\x03open_revs=all&rev=2-b1&meta=true",
    ])
}

/// `_changes` with a fuzzed `since` (and `last-event-id`), other parameters from what feeds
/// take, `feed=normal` so the answer ends.
fn since(data: &[u8]) {
    let h = harness();
    let n = h.next_input();
    let s = utf8_percent_encode(&String::from_utf8_lossy(data), NON_ALPHANUMERIC).to_string();
    let extra = [
        "",
        "&style=all_docs",
        "&include_docs=true&conflicts=true",
        "&filter=v/f",
        "&filter=_view&view=v/v",
        "&filter=_doc_ids&doc_ids=[\"a\"]",
        "&descending=true&limit=1",
        "&filter=_selector",
    ][(n % 8) as usize];
    let a = h.request(
        Method::GET,
        &format!("/{DB}/_changes?feed=normal&since={s}{extra}"),
        None,
        Vec::new(),
    );
    h.check("_changes since", &a);
    let a = h.send(
        Method::GET,
        &format!("/{DB}/_changes?feed=normal"),
        &[(
            "last-event-id",
            &String::from_utf8_lossy(data).replace(['\r', '\n'], ""),
        )],
        Vec::new(),
    );
    h.check("_changes last-event-id", &a);
}

fn since_seeds() -> Vec<Vec<u8>> {
    strs(&[
        "0",
        "now",
        "3",
        "\"2-g1AAAA\"",
        "-1",
        "18446744073709551616",
        "1e3",
        "",
    ])
}

/// A document `PUT` as `multipart/related`, as CouchDB's replicator sends attachments.
fn multipart_put(data: &[u8]) {
    if let Some((_, body)) = data.split_first() {
        put_doc(
            "m",
            "multipart/related; boundary=\"abc\"",
            body,
            "multipart PUT",
        );
    }
}

/// A design document as it arrives by replication (`new_edits=false`): stored, compiled,
/// then asked to validate a write and answer its views. The database is its own so a hostile
/// validator cannot refuse the other targets' writes.
fn design(data: &[u8]) {
    let Ok(Value::Object(mut d)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let h = harness();
    let n = h.next_input();
    let id = format!("_design/fz{n}");
    d.insert("_id".into(), Value::String(id.clone()));
    d.insert("_rev".into(), Value::String("1-abc".into()));
    d.remove("_revisions");
    let body = json!({"new_edits": false, "docs": [Value::Object(d.clone())]});
    let a = post_json(
        &format!("/{DDOC_DB}/_bulk_docs"),
        body.to_string().as_bytes(),
    );
    h.check("design doc by replication", &a);
    let write = h.request(
        Method::PUT,
        &format!("/{DDOC_DB}/w{n}"),
        Some("application/json"),
        br#"{"n":1,"tags":["x"]}"#.to_vec(),
    );
    h.check_allowing("a write the design doc validates", &write, true);
    let views: Vec<String> = d
        .get("views")
        .and_then(Value::as_object)
        .map(|v| v.keys().take(2).cloned().collect())
        .unwrap_or_default();
    for v in views {
        let v = utf8_percent_encode(&v, NON_ALPHANUMERIC);
        let a = h.request(
            Method::GET,
            &format!("/{DDOC_DB}/{id}/_view/{v}?limit=3"),
            None,
            Vec::new(),
        );
        h.check_allowing("its view", &a, true);
    }
    let a = h.request(
        Method::DELETE,
        &format!("/{DDOC_DB}/{id}?rev=1-abc"),
        None,
        Vec::new(),
    );
    h.check("removing it", &a);
}

fn design_seeds() -> Vec<Vec<u8>> {
    strs(&[
        r#"{"language":"javascript","views":{"v":{"map":"function(d){emit(d.n, null)}","reduce":"_sum"}},"validate_doc_update":"function(n,o,u){ if(!n.n) throw({forbidden:'n'}) }"}"#,
        r#"{"language":"lua","views":{"l":{"map":"function(d) emit(d.n, 1) end","reduce":"_count"}},"validate_doc_update":"function(n,o,u) if n.x then error({forbidden='x'}) end end"}"#,
        r#"{"language":"javascript","views":{"loop":{"map":"function(d){ while(true){} }"}}}"#,
        r#"{"language":"javascript","validate_doc_update":"function(){ throw new Error('boom') }"}"#,
        r#"{"language":"query","views":{"q":{"map":{"fields":{"n":"asc"}},"reduce":"_count","options":{"def":{"fields":["n"]}}}}}"#,
        r#"{"language":"wasm","views":{"w":{"map":"not a module"}}}"#,
        r#"{"filters":{"f":"function(d){return true}"},"updates":{"u":"x"},"shows":{"s":"y"}}"#,
    ])
}
