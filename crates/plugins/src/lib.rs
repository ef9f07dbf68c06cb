//! The plugin host: design documents whose functions are JavaScript source (CouchDB's default
//! language), Lua source (`"language": "lua"`) or exports of a WebAssembly module attached to
//! the design document (`"language": "wasm"`).
//!
//! Plugins see JSON and return JSON, never internal types. Every call runs in a sandbox with a
//! CPU budget and a memory limit; a plugin that fails costs that one call a clear
//! `PluginError`, never the node. Compiled design documents are cached by a hash of their code
//! and each database holds an immutable set of them that is swapped as a whole when a design
//! document changes.

pub mod design;
mod js;
mod lua;
mod lua_pattern;
mod lua_strings;
mod wasm;

pub use design::{DbPlugins, DesignFns};

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sandbox limits, the same for every call.
#[derive(Clone, Debug)]
pub struct Limits {
    /// CPU per call: wasmtime fuel units, and Lua VM instructions.
    pub cpu: u64,
    /// Memory of one plugin instance (a WASM store or a Lua state), in bytes.
    pub memory: usize,
    /// Wall-clock backstop per call.
    pub timeout: Duration,
    /// Largest JSON output a call may return, in bytes.
    pub max_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu: 50_000_000,
            memory: 64 << 20,
            timeout: Duration::from_millis(500),
            max_output: 8 << 20,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum PluginError {
    /// The design document cannot be compiled or lacks something it names (400 at write time).
    #[error("{0}")]
    Compile(String),
    /// A call failed: trap, limit, error raised, malformed output.
    #[error("{0}")]
    Call(String),
    /// A Lua function threw a table (`error{forbidden = "…"}`): a validator's verdict.
    #[error("the plugin threw {0}")]
    Thrown(Value),
}

impl PluginError {
    /// The call was stopped by a sandbox limit (time, CPU, memory): every runtime words those
    /// "… limit exceeded". A function that hits one on a document will likely hit it on the
    /// next, so a view build stops there instead of spending the limit on every document.
    pub fn is_limit(&self) -> bool {
        matches!(self, PluginError::Call(m) if m.contains("limit exceeded"))
    }
}

/// One callable plugin function. Arguments and result are JSON; the arguments are CouchDB's,
/// in CouchDB's order (e.g. `newDoc, oldDoc, userCtx, secObj`).
pub trait PluginFn: Send + Sync {
    fn call(&self, args: &[Value]) -> Result<Value, PluginError>;
}

pub type Func = Arc<dyn PluginFn>;

/// What a compilation is cached by: the database, the parsed code, and the whole design
/// document but its revision (members a function can reach at run time, such as modules).
fn cache_key(db: &str, src: &design::Source, doc: &serde_json::Map<String, Value>) -> String {
    use md5::{Digest, Md5};
    let mut whole = doc.clone();
    whole.remove("_rev");
    whole.remove("_revisions");
    let material = serde_json::json!([db, src.hash(), Value::Object(whole)]);
    hex::encode(Md5::digest(
        thali_doc::canonical::to_string(&material).as_bytes(),
    ))
}

/// Compiles design documents and caches them by code hash.
pub struct Host {
    pub limits: Limits,
    /// Languages stored but not run (a relay's `--store-only-language`).
    store_only: Vec<String>,
    wasm: wasm::Runtime,
    cache: Mutex<HashMap<String, Arc<DesignFns>>>,
}

impl Host {
    pub fn new(limits: Limits, store_only: Vec<String>) -> Result<Arc<Host>, PluginError> {
        Ok(Arc::new(Host {
            wasm: wasm::Runtime::new(&limits)?,
            store_only,
            limits,
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// Compiles a design document of database `db` (`attachment` gives the bytes of an
    /// attachment by name), or returns this database's cached compilation of the same document.
    /// `Ok(None)`: it holds no functions.
    ///
    /// The cache key is the database and the whole design document (every member, so every
    /// CommonJS module `require` can reach, and the WASM module's bytes): a runtime and its
    /// globals belong to one database's design document and are never shared across databases.
    pub fn compile(
        &self,
        db: &str,
        id: &str,
        doc: &serde_json::Map<String, Value>,
        attachment: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Option<Arc<DesignFns>>, PluginError> {
        let language = design::language_name(doc);
        if self.store_only.iter().any(|l| l == language) {
            return Ok(None);
        }
        let Some(src) = design::Source::parse(id, doc, attachment)? else {
            return Ok(None);
        };
        let key = cache_key(db, &src, doc);
        if let Some(hit) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(Some(hit));
        }
        let fns = Arc::new(match src.language {
            design::Language::JavaScript => js::compile(&src, doc, &self.limits)?,
            design::Language::Lua => lua::compile(&src, &self.limits)?,
            design::Language::Wasm => self.wasm.compile(&src, &self.limits)?,
            // Mango indexes are built by `db` (`mango::index::compile`): no plugin code.
            design::Language::Query => return Ok(None),
        });
        if let Ok(mut c) = self.cache.lock() {
            // Old versions are dropped lazily: a bounded cache is enough for development loops.
            if c.len() > 256 {
                c.clear();
            }
            c.insert(key, fns.clone());
        }
        Ok(Some(fns))
    }
}
