//! Design-document plugins in JavaScript, Lua and WebAssembly through the real binary's HTTP API:
//! validation (accept, forbid, demand auth, userCtx/secObj), write-time compilation errors,
//! filters on `_changes` and in replication, design documents replicating and enforcing on a
//! second node, hostile plugins, and hot reload from a dev folder.

use base64::Engine;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use thali_node::peer::Identity;
use thali_tests::{Client, Node, PeerNode, TempDir};

fn script(rel: &str) -> String {
    let p = thali_tests::workspace_root().join("scripts").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The example plugin built for wasm32 by `tests/run-all.sh`.
fn typed_wasm() -> Vec<u8> {
    let p = thali_tests::workspace_root()
        .join("plugins/target/wasm32-unknown-unknown/release/typed.wasm");
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\nbuild it first: rustup target add wasm32-unknown-unknown && \
             cargo build --release --target wasm32-unknown-unknown --manifest-path plugins/Cargo.toml \
             (tests/run-all.sh does both)",
            p.display()
        )
    })
}

fn lua_typed() -> Value {
    json!({
        "language": "lua",
        "validate_doc_update": script("app/typed/validate_doc_update.lua"),
        "filters": {"by_type": script("app/typed/filters/by_type.lua")},
    })
}

fn js_typed() -> Value {
    json!({
        "validate_doc_update": script("app/typed-js/validate_doc_update.js"),
        "filters": {"by_type": script("app/typed-js/filters/by_type.js")},
    })
}

fn wasm_ddoc(module: &[u8], fields: Value) -> Value {
    let mut d = fields;
    d["language"] = json!("wasm");
    d["_attachments"] = json!({"module.wasm": {
        "content_type": "application/wasm",
        "data": base64::engine::general_purpose::STANDARD.encode(module),
    }});
    d
}

fn wasm_typed() -> Value {
    wasm_ddoc(
        &typed_wasm(),
        json!({"validate_doc_update": "validate", "filters": {"by_type": "by_type"}}),
    )
}

/// The typed rules, checked the same way for both languages.
fn check_typed_rules(lang: &str, ddoc: Value) {
    let p = PeerNode::start(&format!("typed-{lang}"));
    let n = &p.node;
    n.put("/app", &json!({}));
    let member = Identity::generate().unwrap();
    let sec = json!({"members": {"names": [member.key_id()], "roles": []}, "admins": {"names": [], "roles": []}});
    assert_eq!(n.put("/app/_security", &sec).status, 200);
    let r = n.put("/app/_design/typed", &ddoc);
    assert_eq!(r.status, 201, "{lang}: {}", r.text());

    // Accept, forbid (PUT, POST), with CouchDB's shapes.
    assert_eq!(
        n.put("/app/a", &json!({"type": "note"})).status,
        201,
        "{lang}"
    );
    let r = n.put("/app/b", &json!({"no": "type"}));
    r.assert_error(403, "forbidden");
    assert_eq!(
        r.json()["reason"],
        "documents need a string `type`",
        "{lang}"
    );
    n.post("/app", &json!({"type": "invoice", "amount": -1}))
        .assert_error(403, "forbidden");
    // Per document inside _bulk_docs, both modes.
    let res = n
        .post(
            "/app/_bulk_docs",
            &json!({"docs": [{"_id": "ok1", "type": "x"}, {"_id": "bad1"}]}),
        )
        .json();
    assert_eq!(res[0]["ok"], true, "{lang}: {res}");
    assert_eq!(res[1]["error"], "forbidden", "{lang}: {res}");
    let res = n
        .post(
            "/app/_bulk_docs",
            &json!({"new_edits": false, "docs": [{"_id": "r1", "_rev": "1-abc"}]}),
        )
        .json();
    assert_eq!(
        res[0]["error"], "forbidden",
        "replicated writes are validated too ({lang}): {res}"
    );
    // Demanding auth: a member (peer key) may not write config documents; the admin may.
    let c = p.client(&member);
    c.put("/app/cfg", &json!({"type": "config"}))
        .assert_error(401, "unauthorized");
    assert_eq!(c.put("/app/note", &json!({"type": "note"})).status, 201);
    assert_eq!(
        n.put("/app/cfg", &json!({"type": "config"})).status,
        201,
        "{lang}"
    );
    // A locked document can be neither edited nor deleted nor given an attachment.
    let rev = n
        .put("/app/locked", &json!({"type": "x", "locked": true}))
        .json()["rev"]
        .as_str()
        .unwrap()
        .to_string();
    n.put("/app/locked", &json!({"_rev": rev, "type": "x"}))
        .assert_error(403, "forbidden");
    n.delete(&format!("/app/locked?rev={rev}"))
        .assert_error(403, "forbidden");
    n.raw(
        "PUT",
        &format!("/app/locked/f.txt?rev={rev}"),
        &[("Content-Type", "text/plain")],
        Some(b"x"),
    )
    .assert_error(403, "forbidden");
    // Nothing refused was written.
    for id in ["b", "bad1", "r1"] {
        assert_eq!(n.get(&format!("/app/{id}")).status, 404, "{lang}: {id}");
    }
    // The filter, on _changes.
    let ch = n
        .get("/app/_changes?filter=typed/by_type&type=config")
        .json();
    let ids: Vec<&str> = ch["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cfg"], "{lang}: {ch}");
    n.get("/app/_changes?filter=typed/nope")
        .assert_error(404, "not_found");
}

#[test]
fn lua_validation_and_filters() {
    check_typed_rules("lua", lua_typed());
}

#[test]
fn javascript_validation_and_filters() {
    check_typed_rules("javascript", js_typed());
}

#[test]
fn wasm_validation_and_filters() {
    thali_tests::require!(thali_tests::needs::Need::WasmPlugins);
    check_typed_rules("wasm", wasm_typed());
}

#[test]
fn validators_see_user_ctx_sec_obj_and_old_doc() {
    let dir = TempDir::new("ctx");
    let n = Node::start(&dir.0);
    n.put("/db", &json!({}));
    n.put("/db/_security", &json!({"admins": {"names": ["ed25519:x"], "roles": []}, "members": {"names": [], "roles": []}}));
    let echo = r#"function(new, old, user, sec)
        if new.echo then error({forbidden = {new = new, old = old, user = user, sec = sec}}) end
      end"#;
    assert_eq!(
        n.put(
            "/db/_design/echo",
            &json!({"language": "lua", "validate_doc_update": echo})
        )
        .status,
        201
    );
    let rev = n.put("/db/d", &json!({"v": 1})).json()["rev"]
        .as_str()
        .unwrap()
        .to_string();
    let r = n.put(
        "/db/d",
        &json!({"_rev": rev, "echo": true, "list": [], "nested": {"a": null}}),
    );
    r.assert_error(403, "forbidden");
    let seen: Value = serde_json::from_str(r.json()["reason"].as_str().unwrap()).unwrap();
    assert_eq!(
        seen["user"],
        json!({"db": "db", "name": "admin", "roles": ["_admin"]})
    );
    assert_eq!(seen["sec"]["admins"]["names"], json!(["ed25519:x"]));
    assert_eq!(seen["old"]["v"], 1);
    assert_eq!(seen["old"]["_rev"], rev);
    assert_eq!(seen["new"]["_id"], "d");
    assert!(seen["new"]["_rev"].as_str().unwrap().starts_with("2-"));
    assert_eq!(seen["new"]["_revisions"]["start"], 2);
    assert_eq!(seen["new"]["list"], json!([]), "empty arrays stay arrays");
    // A JSON null inside a document reaches Lua and comes back as null.
    assert_eq!(seen["new"]["nested"], json!({"a": null}));
}

#[test]
fn broken_design_documents_are_refused_at_write_time() {
    thali_tests::require!(thali_tests::needs::Need::WasmPlugins);
    let dir = TempDir::new("compile");
    let n = Node::start(&dir.0);
    n.put("/db", &json!({}));
    let r = n.put("/db/_design/bad", &json!({"language": "lua", "validate_doc_update": "function(new)\n  if new.x then\n    return {forbidden = 1\n  end\nend"}));
    r.assert_error(400, "compilation_error");
    let reason = r.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("_design/bad") && reason.contains(":4:"),
        "the line is named: {reason}"
    );
    n.put(
        "/db/_design/f",
        &json!({"language": "lua", "filters": {"x": "return 42"}}),
    )
    .assert_error(400, "compilation_error");
    n.put(
        "/db/_design/w",
        &wasm_ddoc(b"\0asm garbage", json!({"validate_doc_update": "v"})),
    )
    .assert_error(400, "compilation_error");
    let r = n.put(
        "/db/_design/w",
        &wasm_ddoc(
            &typed_wasm(),
            json!({"validate_doc_update": "missing_export"}),
        ),
    );
    r.assert_error(400, "compilation_error");
    assert!(r.json()["reason"]
        .as_str()
        .unwrap()
        .contains("missing_export"));
    n.put(
        "/db/_design/w",
        &json!({"language": "wasm", "validate_doc_update": "v"}),
    )
    .assert_error(400, "compilation_error");
    n.put("/db/_design/w", &json!({"language": "cobol"}))
        .assert_error(400, "compilation_error");
    // Imports beyond thali.log are refused.
    let wat = r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32))))"#;
    n.put("/db/_design/w", &wasm_ddoc(wat.as_bytes(), json!({})))
        .assert_error(400, "compilation_error");
    // Nothing was stored; JavaScript design documents (from CouchDB apps) compile and run.
    assert_eq!(n.get("/db").json()["doc_count"], 0);
    assert_eq!(
        n.put(
            "/db/_design/js",
            &json!({"language": "javascript", "views": {"v": {"map": "function(doc){}"}}})
        )
        .status,
        201
    );
    assert_eq!(n.put("/db/x", &json!({})).status, 201);
    n.put(
        "/db/_design/js2",
        &json!({"views": {"v": {"map": "function(doc){ emit(doc._id, }"}}}),
    )
    .assert_error(400, "compilation_error");
}

/// One module with a well-behaved and many hostile exports (WAT, compiled by wasmtime).
const HOSTILE_WAT: &str = r#"(module
  (import "thali" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "alloc") (param $len i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $len)))
    (block $ok
      (br_if $ok (i32.lt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
      (drop (memory.grow (i32.add (i32.div_u (local.get $len) (i32.const 65536)) (i32.const 1)))))
    (local.get $p))
  (func (export "thali_abi_version") (result i32) (i32.const 1))
  (data (i32.const 16) "null")
  (data (i32.const 32) "{\"forbidden\":\"wat says no\"}")
  (data (i32.const 100) "not json")
  (data (i32.const 120) "42")
  (data (i32.const 200) "hello from wat")
  (func (export "accept") (param i32 i32) (result i64)
    (call $log (i32.const 2) (i32.const 200) (i32.const 14))
    (i64.const 0x0000001000000004))
  (func (export "refuse") (param i32 i32) (result i64) (i64.const 0x000000200000001b))
  (func (export "spin") (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0))
  (func $rec (export "recurse") (param i32 i32) (result i64)
    (i64.add (call $rec (local.get 0) (local.get 1)) (i64.const 1)))
  (func (export "grow") (param i32 i32) (result i64)
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    (i64.const 0x0000001000000004))
  (func (export "trap") (param i32 i32) (result i64) unreachable)
  (func (export "garbage") (param i32 i32) (result i64) (i64.const 0x0000006400000008))
  (func (export "number") (param i32 i32) (result i64) (i64.const 0x0000007800000002))
  (func (export "huge") (param i32 i32) (result i64) (i64.const 0x0000000005f5e100))
  (func (export "outside") (param i32 i32) (result i64) (i64.const 0x7fff000000001000))
)"#;

const HOSTILE_LUA: [(&str, &str); 7] = [
    ("spin", "function() while true do end end"),
    ("recurse", "function() local function f(n) return f(n + 1) + 1 end return f(1) end"),
    ("grow", "function() local s = string.rep('x', 1 << 20) local t = {} for i = 1, 1e9 do t[i] = s .. i end end"),
    ("trap", "function() error('boom') end"),
    ("garbage", "function() return function() end end"),
    ("number", "function() return 42 end"),
    ("huge", "function() return {forbidden = string.rep('x', 20000000)} end"),
];

fn hostile_case(n: &Node, db: &str, ddoc: Value, what: &str) {
    n.put(&format!("/{db}"), &json!({}));
    let r = n.put(&format!("/{db}/_design/h"), &ddoc);
    assert_eq!(r.status, 201, "{what}: {}", r.text());
    let t = Instant::now();
    let r = n.put(&format!("/{db}/doc"), &json!({"type": "x"}));
    let took = t.elapsed();
    eprintln!("hostile {what}: {} in {took:?}", r.text().trim());
    r.assert_error(500, "plugin_error");
    let reason = r.json()["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("_design/h"),
        "{what}: the design document is named: {reason}"
    );
    assert!(took < Duration::from_secs(5), "{what} took {took:?}");
    assert_eq!(
        n.get(&format!("/{db}/doc")).status,
        404,
        "{what}: nothing written"
    );
    // The node still answers and writes elsewhere.
    assert_eq!(n.get("/_up").status, 200);
    assert_eq!(n.put(&format!("/ok-{db}"), &json!({})).status, 201);
    assert_eq!(n.put(&format!("/ok-{db}/d"), &json!({})).status, 201);
}

#[test]
fn hostile_wasm_plugins_fail_one_call() {
    let dir = TempDir::new("hostile-wasm");
    let n = Node::start(&dir.0);
    n.put("/fine", &json!({}));
    n.put(
        "/fine/_design/h",
        &wasm_ddoc(
            HOSTILE_WAT.as_bytes(),
            json!({"validate_doc_update": "accept"}),
        ),
    );
    assert_eq!(n.put("/fine/doc", &json!({})).status, 201);
    n.put("/no", &json!({}));
    n.put(
        "/no/_design/h",
        &wasm_ddoc(
            HOSTILE_WAT.as_bytes(),
            json!({"validate_doc_update": "refuse"}),
        ),
    );
    let r = n.put("/no/doc", &json!({}));
    r.assert_error(403, "forbidden");
    assert_eq!(r.json()["reason"], "wat says no");
    for what in [
        "spin", "recurse", "grow", "trap", "garbage", "number", "huge", "outside",
    ] {
        hostile_case(
            &n,
            &format!("w-{what}"),
            wasm_ddoc(HOSTILE_WAT.as_bytes(), json!({"validate_doc_update": what})),
            what,
        );
    }
}

#[test]
fn hostile_lua_plugins_fail_one_call() {
    let dir = TempDir::new("hostile-lua");
    let n = Node::start(&dir.0);
    for (what, code) in HOSTILE_LUA {
        hostile_case(
            &n,
            &format!("l-{what}"),
            json!({"language": "lua", "validate_doc_update": code}),
            what,
        );
    }
    // The sandbox: no io, os, load, require or randomness.
    n.put("/sandbox", &json!({}));
    let probe = r#"function(new)
        local seen = {}
        for _, name in ipairs({"io", "os", "load", "loadfile", "dofile", "require", "debug", "package", "collectgarbage"}) do
          if _G[name] ~= nil then table.insert(seen, name) end
        end
        if math.random ~= nil then table.insert(seen, "math.random") end
        if #seen > 0 then return {forbidden = table.concat(seen, ",")} end
      end"#;
    assert_eq!(
        n.put(
            "/sandbox/_design/p",
            &json!({"language": "lua", "validate_doc_update": probe})
        )
        .status,
        201
    );
    let r = n.put("/sandbox/doc", &json!({}));
    assert_eq!(r.status, 201, "globals left in the sandbox: {}", r.text());
}

#[test]
fn filters_in_replication_and_design_documents_replicate_and_enforce() {
    thali_tests::require!(thali_tests::needs::Need::WasmPlugins);
    let (a, b) = (PeerNode::start("prep-a"), PeerNode::start("prep-b"));
    a.node.put("/app", &json!({}));
    a.node.put("/app/_design/typed", &lua_typed());
    a.node.put("/app/_design/wtyped", &wasm_typed());
    let docs: Vec<Value> = (0..20)
        .map(
            |i| json!({"_id": format!("d{i:02}"), "type": if i % 2 == 0 { "even" } else { "odd" }}),
        )
        .collect();
    assert_eq!(
        a.node
            .post("/app/_bulk_docs", &json!({ "docs": docs }))
            .status,
        201
    );
    // Filtered replication from a local source, Lua and WASM filters.
    for f in ["typed/by_type", "wtyped/by_type"] {
        let target = format!("evens-{}", f.split('/').next().unwrap());
        let r = a.node.post("/_replicate", &json!({"source": "app", "target": target, "create_target": true, "filter": f, "query_params": {"type": "even"}}));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["history"][0]["docs_written"],
            10,
            "{f}: {}",
            r.text()
        );
    }
    // B's admin level for A's key: the design documents replicate to B and enforce there.
    b.node.put("/app", &json!({}));
    let sec = json!({"admins": {"names": [a.key_id()], "roles": []}});
    assert_eq!(b.node.put("/app/_security", &sec).status, 200);
    let r = a.node.post(
        "/_replicate",
        &json!({"source": "app", "target": b.url("app")}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["history"][0]["doc_write_failures"],
        0,
        "{}",
        r.text()
    );
    b.node
        .put("/app/untyped", &json!({}))
        .assert_error(403, "forbidden");
    assert_eq!(b.node.put("/app/typed", &json!({"type": "t"})).status, 201);
    // Filtered pull from B (the filter runs on B, a remote source).
    let r = a.node.post("/_replicate", &json!({"source": b.url("app"), "target": "odds", "create_target": true, "filter": "wtyped/by_type", "query_params": {"type": "odd"}}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["history"][0]["docs_written"], 10, "{}", r.text());
}

#[test]
fn dev_folder_hot_reload() {
    let dir = TempDir::new("dev");
    let devdir = dir.0.join("dev");
    let folder = devdir.join("app").join("rules");
    std::fs::create_dir_all(folder.join("filters")).unwrap();
    std::fs::write(
        folder.join("validate_doc_update.lua"),
        "function(new) if new.v == 1 then return {forbidden = 'one'} end end",
    )
    .unwrap();
    std::fs::write(
        folder.join("filters").join("all.lua"),
        "function() return true end",
    )
    .unwrap();
    let data = dir.0.join("data");
    let n = Node::start_with(&data, &["--dev", devdir.to_str().unwrap()]);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if f() {
                return t.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}");
    };
    wait("the design document", &|| {
        n.get("/app/_design/rules").status == 200
    });
    n.put("/app/a", &json!({"v": 1}))
        .assert_error(403, "forbidden");
    // Change the file: the new rule is live within two seconds.
    std::fs::write(
        folder.join("validate_doc_update.lua"),
        "function(new) if new.v == 2 then return {forbidden = 'two'} end end",
    )
    .unwrap();
    let took = wait("the new validator", &|| {
        n.post("/app", &json!({"v": 2})).status == 403
    });
    eprintln!("hot reload took {took:?}");
    assert!(took < Duration::from_secs(2), "reloaded after {took:?}");
    assert_eq!(n.put("/app/a", &json!({"v": 1})).status, 201);
    // A broken edit keeps the previous version serving.
    let rev = n.get("/app/_design/rules").json()["_rev"].clone();
    std::fs::write(
        folder.join("validate_doc_update.lua"),
        "function(new) if new.v == then end",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(n.get("/app/_design/rules").json()["_rev"], rev);
    n.put("/app/b", &json!({"v": 2}))
        .assert_error(403, "forbidden");
    // A WASM design document from the same folder layout (manifest + module).
    let wfolder = devdir.join("app").join("wrules");
    std::fs::create_dir_all(&wfolder).unwrap();
    std::fs::write(wfolder.join("module.wat"), HOSTILE_WAT).unwrap();
    std::fs::write(
        wfolder.join("manifest.json"),
        r#"{"validate_doc_update": "refuse"}"#,
    )
    .unwrap();
    wait("the WASM design document", &|| {
        n.get("/app/_design/wrules").status == 200
    });
    n.put("/app/c", &json!({})).assert_error(403, "forbidden");
}
