//! Numbers come back exactly as sent. A property test: random doubles (random bit patterns, so
//! huge and tiny exponents and subnormals too), decimal fractions of the kind that rounded
//! wrongly before (`0.09607329185604753`), 64-bit integers and their edges are written in
//! their shortest round-trip form and must come back byte for byte through `PUT`/`GET`,
//! `_bulk_docs`/`_all_docs`, a replication to another thali node and back, and a replication
//! to pouchdb-server (PouchDB parses and prints JSON numbers itself) and back; through a
//! JavaScript view they keep their value. Other spellings (`1E5`, `0.10`, `1.5e+300`) keep
//! their value. The seed is printed; `THALI_NUMBERS_SEED=N` repeats a run.

use serde_json::{json, Value};
use thali_tests::mesh::{replicate, wait_until};
use thali_tests::servers::start_pouchdb_server;
use thali_tests::{workspace_root, Client, Node, TempDir};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `n` numbers as JSON text, in the shortest form that reads back as the same number.
fn numbers(seed: u64, n: usize) -> Vec<String> {
    let mut rng = Rng(seed | 1);
    let mut out: Vec<String> = [
        "0.09607329185604753",
        "1.7976931348623157e+308",
        "5e-324",
        "2.2250738585072014e-308",
        "1e+300",
        "1e-300",
        "9007199254740993",
        "-9223372036854775808",
        "9223372036854775807",
        "18446744073709551615",
        "0.1",
        "-0.0",
        "123456789.12345679",
        "2.0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    while out.len() < n {
        let r = rng.next();
        let text = match r % 4 {
            // Any finite double, by its bits.
            0 => {
                let f = f64::from_bits(rng.next());
                if !f.is_finite() {
                    continue;
                }
                serde_json::to_string(&f).unwrap()
            }
            // A decimal fraction such as JavaScript's Math.random gives.
            1 => serde_json::to_string(&((rng.next() >> 11) as f64 / (1u64 << 53) as f64)).unwrap(),
            2 => (rng.next() as i64).to_string(),
            _ => rng.next().to_string(),
        };
        out.push(text);
    }
    out
}

fn doc_text(id: &str, nums: &[String]) -> String {
    format!("{{\"_id\":\"{id}\",\"v\":[{}]}}", nums.join(","))
}

/// The `"v":[…]` array of a document as the node printed it.
fn array_text(body: &str) -> &str {
    let start = body.find("\"v\":[").expect("a v member") + 5;
    let end = start + body[start..].find(']').expect("the end of v");
    &body[start..end]
}

#[track_caller]
fn assert_same(what: &str, sent: &[String], got: &str) {
    let got: Vec<&str> = got.split(',').collect();
    assert_eq!(got.len(), sent.len(), "{what}: count");
    let changed: Vec<String> = sent
        .iter()
        .zip(&got)
        .filter(|(a, b)| a.as_str() != **b)
        .map(|(a, b)| format!("{a} -> {b}"))
        .take(10)
        .collect();
    assert!(
        changed.is_empty(),
        "{what}: numbers changed (first {}): {changed:?}",
        changed.len()
    );
}

fn get_text(node: &Node, path: &str) -> String {
    let r = node.raw("GET", path, &[], None);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.text()
}

fn put_text(node: &Node, path: &str, body: &str) {
    let r = node.raw(
        "PUT",
        path,
        &[("Content-Type", "application/json")],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 201, "{path}: {}", r.text());
}

/// A number that went through JavaScript (a view, PouchDB) keeps its value: every double does,
/// and so does every integer JavaScript can hold (below 2^53); JavaScript prints -0 as 0.
#[track_caller]
fn assert_same_value(what: &str, sent: &str, got: f64) {
    let want: f64 = sent.parse().unwrap();
    let is_double = sent.contains(['.', 'e']);
    if is_double || want.abs() < 9007199254740992.0 {
        assert!(
            want.to_bits() == got.to_bits() || (want == 0.0 && got == 0.0),
            "{what}: {sent} came back as {got}"
        );
    }
}

fn bulk_docs_and_all_docs(node: &Node, nums: &[String]) {
    let chunks: Vec<&[String]> = nums.chunks(500).collect();
    let docs: Vec<String> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| doc_text(&format!("b{i:02}"), c))
        .collect();
    let body = format!("{{\"docs\":[{}]}}", docs.join(","));
    let r = node.raw(
        "POST",
        "/n/_bulk_docs",
        &[("Content-Type", "application/json")],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let all = get_text(
        node,
        "/n/_all_docs?include_docs=true&startkey=%22b%22&endkey=%22c%22",
    );
    let mut rest = all.as_str();
    for (i, c) in chunks.iter().enumerate() {
        let at = rest
            .find(&format!("\"_id\":\"b{i:02}\""))
            .unwrap_or_else(|| panic!("b{i:02} in _all_docs"));
        rest = &rest[at..];
        assert_same(
            &format!("_bulk_docs/_all_docs b{i:02}"),
            c,
            array_text(rest),
        );
    }
}

/// A JavaScript view keeps every value (CouchDB's views do the same).
fn through_a_view(node: &Node, nums: &[String]) {
    node.put(
        "/n/_design/v",
        &json!({"views": {"each": {"map": "function (doc) { if (doc._id === 'doc') doc.v.forEach(function (x, i) { emit(i, x); }); }"}}}),
    );
    let rows = node.get("/n/_design/v/_view/each").json();
    let rows = rows["rows"].as_array().expect("view rows");
    assert_eq!(rows.len(), nums.len());
    for (sent, row) in nums.iter().zip(rows) {
        assert_same_value("view", sent, row["value"].as_f64().unwrap());
    }
}

fn to_another_node_and_back(node: &Node, nums: &[String]) {
    let dir_b = TempDir::new("numbers-b");
    let b = Node::start(&dir_b.0);
    replicate(
        node,
        json!({"source": "n", "target": format!("{}/n", b.url()), "create_target": true}),
    );
    assert_same(
        "on the other node",
        nums,
        array_text(&get_text(&b, "/n/doc")),
    );
    replicate(
        &b,
        json!({"source": "n", "target": format!("{}/back", node.url()), "create_target": true}),
    );
    assert_same(
        "back from the other node",
        nums,
        array_text(&get_text(node, "/back/doc")),
    );
}

/// To pouchdb-server (PouchDB's own JSON) and back: JavaScript spells `1e21` as `1e+21`, so
/// values are compared, not text.
fn to_pouchdb_server_and_back(node: &Node, nums: &[String]) {
    let pouch = start_pouchdb_server(&workspace_root());
    replicate(
        node,
        json!({"source": "n", "target": format!("{}/n", pouch.base), "create_target": true, "doc_ids": ["doc"]}),
    );
    replicate(
        node,
        json!({"source": format!("{}/n", pouch.base), "target": "frompouch", "create_target": true}),
    );
    wait_until("the document back from pouchdb-server", || {
        node.get("/frompouch/doc").status == 200
    });
    let back = get_text(node, "/frompouch/doc");
    for (sent, got) in nums.iter().zip(array_text(&back).split(',')) {
        assert_same_value("via pouchdb-server", sent, got.parse().unwrap());
    }
}

#[test]
fn numbers_survive_every_path_byte_for_byte() {
    thali_tests::require!(thali_tests::needs::Need::PouchdbServer);
    let seed = std::env::var("THALI_NUMBERS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("THALI_NUMBERS_SEED={seed}");
    let nums = numbers(seed, 5000);
    let dir = TempDir::new("numbers");
    let node = Node::start(&dir.0);
    node.put("/n", &json!({}));
    put_text(&node, "/n/doc", &doc_text("doc", &nums));
    assert_same("PUT/GET", &nums, array_text(&get_text(&node, "/n/doc")));
    bulk_docs_and_all_docs(&node, &nums);
    through_a_view(&node, &nums);
    to_another_node_and_back(&node, &nums);
    to_pouchdb_server_and_back(&node, &nums);
}

#[test]
fn other_spellings_keep_their_value() {
    let dir = TempDir::new("numbers-spellings");
    let node = Node::start(&dir.0);
    node.put("/s", &json!({}));
    let spellings: [(&str, f64); 6] = [
        ("1E5", 1e5),
        ("0.10", 0.1),
        ("1.5e+300", 1.5e300),
        ("2.5E-310", 2.5e-310),
        ("0.096073291856047530", 0.09607329185604753),
        ("100000000000000000000000", 1e23),
    ];
    let list: Vec<&str> = spellings.iter().map(|(s, _)| *s).collect();
    put_text(&node, "/s/d", &format!("{{\"v\":[{}]}}", list.join(",")));
    let v: Value = node.get("/s/d").json();
    for ((s, want), got) in spellings.iter().zip(v["v"].as_array().unwrap()) {
        assert_eq!(
            got.as_f64().unwrap().to_bits(),
            want.to_bits(),
            "{s} came back as {got}"
        );
    }
}
