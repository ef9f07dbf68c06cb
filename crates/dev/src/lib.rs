//! `thali serve --dev DIR`: a development folder whose files are design documents. The layout
//! is `DIR/<db>/<ddoc>/` with one file per function —
//!
//! ```text
//! validate_doc_update.lua   filters/<name>.lua   views/<name>/map.lua   views/<name>/reduce.lua
//! resolve_conflict.lua
//! ```
//!
//! — the same with `.js` files for JavaScript (plus `views/lib/<name>.js`, CommonJS modules),
//!
//! — or, for WASM, `manifest.json` (the design document's fields naming exports, e.g.
//! `{"validate_doc_update": "validate", "filters": {"mine": "mine"}}`) next to `module.wasm`
//! (or `module.wat`). Every save (debounced) upserts `_design/<ddoc>` in `<db>` through the
//! normal write path, so code that does not compile is refused and the previous version keeps
//! running; the error goes to the log. The design document's plugins are swapped atomically
//! after the write.

use base64::Engine;
use md5::{Digest, Md5};
use notify_debouncer_full::notify::RecursiveMode;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thali_db::{Caller, DocOptions, Node};
use tokio::sync::{mpsc, watch};

const DEBOUNCE: Duration = Duration::from_millis(150);

/// Syncs every design document folder now, then on every change until shutdown.
pub async fn run(node: Arc<Node>, dir: PathBuf, mut shutdown: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let handler = move |res: notify_debouncer_full::DebounceEventResult| match res {
        Ok(events) => {
            for e in events {
                for p in &e.paths {
                    let _ = tx.send(p.clone());
                }
            }
        }
        Err(errs) => {
            for e in errs {
                tracing::warn!(error = %e, "dev folder watcher");
            }
        }
    };
    let mut debouncer = match notify_debouncer_full::new_debouncer(DEBOUNCE, None, handler) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the dev folder");
            return;
        }
    };
    if let Err(e) = debouncer.watch(&dir, RecursiveMode::Recursive) {
        tracing::error!(dir = %dir.display(), error = %e, "cannot watch the dev folder");
        return;
    }
    tracing::info!(dir = %dir.display(), "watching the dev folder for design documents");
    for (db, ddoc) in folders(&dir) {
        sync(&node, &dir, &db, &ddoc).await;
    }
    loop {
        tokio::select! {
            p = rx.recv() => {
                let Some(p) = p else { return };
                // Collect what else arrived in the same burst; each folder syncs once.
                let mut touched = vec![p];
                while let Ok(p) = rx.try_recv() {
                    touched.push(p);
                }
                let mut seen = Vec::new();
                for p in touched {
                    if let Some(key) = owner(&dir, &p) {
                        if !seen.contains(&key) {
                            seen.push(key);
                        }
                    }
                }
                for (db, ddoc) in seen {
                    sync(&node, &dir, &db, &ddoc).await;
                }
            }
            _ = thali_sys::shutdown::cancelled(&mut shutdown) => return,
        }
    }
}

/// `(db, ddoc)` folders under `dir`.
fn folders(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for db in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !db.path().is_dir() {
            continue;
        }
        for dd in std::fs::read_dir(db.path()).into_iter().flatten().flatten() {
            if dd.path().is_dir() {
                out.push((
                    db.file_name().to_string_lossy().into_owned(),
                    dd.file_name().to_string_lossy().into_owned(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// The `(db, ddoc)` folder a changed path belongs to.
fn owner(dir: &Path, p: &Path) -> Option<(String, String)> {
    let rel = p.strip_prefix(dir).ok()?;
    let mut parts = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let db = parts.next()?;
    let ddoc = parts.next()?;
    Some((db, ddoc))
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// The design document a folder describes, or why it cannot be built.
fn build(folder: &Path, ddoc: &str) -> Result<Map<String, Value>, String> {
    let mut d = Map::new();
    d.insert("_id".into(), json!(format!("_design/{ddoc}")));
    if let Some(manifest) = read(&folder.join("manifest.json")) {
        let m: Value =
            serde_json::from_str(&manifest).map_err(|e| format!("manifest.json: {e}"))?;
        let Value::Object(m) = m else {
            return Err("manifest.json must be an object".into());
        };
        d.extend(m);
        d.insert("language".into(), json!("wasm"));
        let name = d
            .get("module")
            .and_then(Value::as_str)
            .unwrap_or("module.wasm")
            .to_string();
        let bytes = std::fs::read(folder.join(&name))
            .or_else(|_| std::fs::read(folder.join(name.replace(".wasm", ".wat"))))
            .map_err(|e| format!("{name}: {e}"))?;
        d.insert("module".into(), json!(name));
        d.insert(
            "_attachments".into(),
            json!({ name: {
                "content_type": "application/wasm",
                "data": base64::engine::general_purpose::STANDARD.encode(bytes),
            }}),
        );
        return Ok(d);
    }
    // Lua unless the folder holds JavaScript (`.js` files, CouchDB's language).
    let (language, ext) = if holds_js(folder) {
        ("javascript", "js")
    } else {
        ("lua", "lua")
    };
    d.insert("language".into(), json!(language));
    for f in ["validate_doc_update", "resolve_conflict"] {
        if let Some(src) = read(&folder.join(format!("{f}.{ext}"))) {
            d.insert(f.into(), json!(src));
        }
    }
    let mut filters = Map::new();
    for e in std::fs::read_dir(folder.join("filters"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = e.path();
        if p.extension().is_some_and(|x| x == ext) {
            if let (Some(stem), Some(src)) = (p.file_stem(), read(&p)) {
                filters.insert(stem.to_string_lossy().into_owned(), json!(src));
            }
        }
    }
    if !filters.is_empty() {
        d.insert("filters".into(), Value::Object(filters));
    }
    let mut views = Map::new();
    for e in std::fs::read_dir(folder.join("views"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(map) = read(&e.path().join(format!("map.{ext}"))) {
            let mut v = Map::new();
            v.insert("map".into(), json!(map));
            if let Some(r) = read(&e.path().join(format!("reduce.{ext}"))) {
                // A built-in reduce is its name alone (`_count`, `_sum`, …).
                let r = if r.trim().starts_with('_') {
                    r.trim().to_string()
                } else {
                    r
                };
                v.insert("reduce".into(), json!(r));
            }
            views.insert(
                e.file_name().to_string_lossy().into_owned(),
                Value::Object(v),
            );
        } else if ext == "js" && e.file_name() == "lib" {
            // `views/lib/<name>.js`: CommonJS modules for the maps (`require('views/lib/<name>')`).
            let mut lib = Map::new();
            for m in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let p = m.path();
                if p.extension().is_some_and(|x| x == "js") {
                    if let (Some(stem), Some(src)) = (p.file_stem(), read(&p)) {
                        lib.insert(stem.to_string_lossy().into_owned(), json!(src));
                    }
                }
            }
            views.insert("lib".into(), Value::Object(lib));
        }
    }
    if !views.is_empty() {
        d.insert("views".into(), Value::Object(views));
    }
    Ok(d)
}

/// Whether a design document folder is written in JavaScript.
fn holds_js(folder: &Path) -> bool {
    let js = |p: &Path| p.extension().is_some_and(|x| x == "js");
    let any_js = |dir: &Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| js(&e.path()))
    };
    any_js(folder)
        || any_js(&folder.join("filters"))
        || std::fs::read_dir(folder.join("views"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| any_js(&e.path()))
}

/// What makes two versions the same code (attachment data compared by digest).
fn fingerprint(d: &Map<String, Value>) -> String {
    let mut d = d.clone();
    d.shift_remove("_id");
    d.shift_remove("_rev");
    if let Some(Value::Object(atts)) = d.get_mut("_attachments") {
        for a in atts.values_mut() {
            let digest = match a.get("data").and_then(Value::as_str) {
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map(|b| {
                        format!(
                            "md5-{}",
                            base64::engine::general_purpose::STANDARD.encode(Md5::digest(&b))
                        )
                    })
                    .unwrap_or_default(),
                None => a
                    .get("digest")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            };
            *a = json!(digest);
        }
    }
    // Member order differs between the built and the stored document (`_attachments` comes
    // last when a document is shown): compare the canonical text.
    thali_doc::canonical::to_string(&Value::Object(d))
}

async fn sync(node: &Arc<Node>, dir: &Path, db_name: &str, ddoc: &str) {
    let folder = dir.join(db_name).join(ddoc);
    if !folder.is_dir() {
        return;
    }
    let id = format!("_design/{ddoc}");
    let mut doc = match build(&folder, ddoc) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(db = db_name, ddoc = %id, error = %e, "dev folder: cannot build the design document; the previous version keeps running");
            return;
        }
    };
    let db = match node.db_or_create(db_name).await {
        Ok(db) => db,
        Err(e) => {
            tracing::error!(db = db_name, error = %e, "dev folder: cannot open the database");
            return;
        }
    };
    if let Ok(cur) = db.get_doc(&id, None, &DocOptions::default()) {
        if fingerprint(&cur.doc) == fingerprint(&doc) {
            return;
        }
        if let Some(rev) = cur.doc.get("_rev") {
            doc.insert("_rev".into(), rev.clone());
        }
    }
    match db
        .bulk_docs(vec![Value::Object(doc)], true, &Caller::node(db_name))
        .await
    {
        Ok(mut r) => match r.pop() {
            Some(Ok((_, rev))) => {
                tracing::info!(db = db_name, ddoc = %id, %rev, "dev folder: design document updated")
            }
            Some(Err((_, _, e))) => {
                tracing::error!(db = db_name, ddoc = %id, error = %e.reason(), "dev folder: design document refused; the previous version keeps running")
            }
            None => {}
        },
        Err(e) => tracing::error!(db = db_name, ddoc = %id, error = %e, "dev folder: write failed"),
    }
}
