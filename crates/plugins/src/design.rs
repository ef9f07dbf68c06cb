//! Design documents as the plugin host reads them: which language, which functions (Lua source,
//! or names of exports of an attached WASM module), and the compiled result per database.

use super::{Func, PluginError};
use md5::{Digest, Md5};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use thali_doc::canonical;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    JavaScript,
    Lua,
    Wasm,
    /// Mango JSON indexes: native maps the `mango` module builds, no plugin code.
    Query,
}

impl Language {
    /// The language of this name, if the node runs it.
    pub fn named(name: &str) -> Option<Language> {
        match name {
            "javascript" => Some(Language::JavaScript),
            "lua" => Some(Language::Lua),
            "wasm" => Some(Language::Wasm),
            _ => None,
        }
    }
}

/// A design document's `language` (absent: JavaScript, CouchDB's default).
pub fn language_name(doc: &Map<String, Value>) -> &str {
    doc.get("language")
        .and_then(Value::as_str)
        .unwrap_or("javascript")
}

/// The code of one design document, before compilation.
pub struct Source {
    pub id: String,
    pub language: Language,
    pub validate: Option<String>,
    pub filters: BTreeMap<String, String>,
    /// name → (map, reduce); a reduce starting with `_` is a built-in.
    pub views: BTreeMap<String, (String, Option<String>)>,
    /// The design document's `options` (part of the view signature).
    pub options: Value,
    pub resolve_conflict: Option<String>,
    /// The WASM module's bytes (binary or WAT text).
    pub module: Option<Vec<u8>>,
    /// JavaScript: the CommonJS modules under `views.lib` (part of the view signature).
    pub lib: Value,
}

fn bad(id: &str, m: impl std::fmt::Display) -> PluginError {
    PluginError::Compile(format!("{id}: {m}"))
}

impl Source {
    /// `Ok(None)` for design documents without plugin code: no functions, or Mango indexes
    /// (`"language": "query"`, stored and replicated).
    pub fn parse(
        id: &str,
        doc: &Map<String, Value>,
        attachment: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Option<Source>, PluginError> {
        let language = match doc.get("language") {
            None | Some(Value::Null) => Language::JavaScript,
            Some(Value::String(l)) => match (Language::named(l), l.as_str()) {
                (Some(language), _) => language,
                (None, "query") => return Ok(None),
                (None, other) => {
                    return Err(bad(
                        id,
                        format!(
                            "unknown language {other:?} (thali runs \"javascript\", \"lua\" \
                             and \"wasm\")"
                        ),
                    ))
                }
            },
            Some(_) => return Err(bad(id, "language must be a string")),
        };
        let string = |field: &str, v: &Value| -> Result<String, PluginError> {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(id, format!("{field} must be a string")))
        };
        let mut src = Source {
            id: id.to_string(),
            language,
            validate: None,
            filters: BTreeMap::new(),
            views: BTreeMap::new(),
            resolve_conflict: None,
            module: None,
            options: doc.get("options").cloned().unwrap_or(Value::Null),
            lib: Value::Null,
        };
        if let Some(v) = doc.get("validate_doc_update") {
            src.validate = Some(string("validate_doc_update", v)?);
        }
        if let Some(v) = doc.get("resolve_conflict") {
            src.resolve_conflict = Some(string("resolve_conflict", v)?);
        }
        match doc.get("filters") {
            None => {}
            Some(Value::Object(f)) => {
                for (name, code) in f {
                    src.filters
                        .insert(name.clone(), string(&format!("filters.{name}"), code)?);
                }
            }
            Some(_) => return Err(bad(id, "filters must be an object")),
        }
        match doc.get("views") {
            None => {}
            Some(Value::Object(views)) => {
                for (name, v) in views {
                    if name == "lib" && language == Language::JavaScript {
                        // CommonJS modules for the maps, not a view (CouchDB).
                        src.lib = v.clone();
                        continue;
                    }
                    let map = v
                        .get("map")
                        .ok_or_else(|| bad(id, format!("views.{name} has no map")))?;
                    let map = string(&format!("views.{name}.map"), map)?;
                    let reduce = match v.get("reduce") {
                        None => None,
                        Some(r) => Some(string(&format!("views.{name}.reduce"), r)?),
                    };
                    if let Some(r) = reduce.as_deref().filter(|r| r.starts_with('_')) {
                        if !BUILTIN_REDUCES.iter().any(|b| r.starts_with(b)) {
                            return Err(bad(
                                id,
                                format!("views.{name}.reduce: unknown built-in reduce {r:?} (thali has {})", BUILTIN_REDUCES.join(", ")),
                            ));
                        }
                    }
                    src.views.insert(name.clone(), (map, reduce));
                }
            }
            Some(_) => return Err(bad(id, "views must be an object")),
        }
        if language == Language::JavaScript
            && src.validate.is_none()
            && src.filters.is_empty()
            && src.views.is_empty()
            && src.resolve_conflict.is_none()
        {
            // Data, or functions thali does not run (shows, lists, updates): nothing to start.
            return Ok(None);
        }
        if language == Language::Wasm {
            let name = match doc.get("module") {
                None => "module.wasm".to_string(),
                Some(v) => string("module", v)?,
            };
            src.module = Some(attachment(&name).ok_or_else(|| {
                bad(
                    id,
                    format!("the WASM module attachment {name:?} is missing"),
                )
            })?);
        }
        Ok(Some(src))
    }

    /// Identifies a design document's view index: the view code (and the module, for WASM),
    /// the options and the collation version. Other fields (validators, filters) can change
    /// without a rebuild, as in CouchDB. `None` without views.
    pub fn view_signature(&self) -> Option<String> {
        if self.views.is_empty() {
            return None;
        }
        let module = match self.language {
            Language::Wasm => self.module.as_ref().map(|m| hex::encode(Md5::digest(m))),
            Language::Lua | Language::JavaScript | Language::Query => None,
        };
        let mut material = json!([
            thali_doc::collate::VERSION,
            format!("{:?}", self.language),
            self.views,
            self.options,
            module,
        ]);
        if !self.lib.is_null() {
            // Only when present, so the signatures of existing Lua and WASM indexes stay.
            if let Value::Array(a) = &mut material {
                a.push(self.lib.clone());
            }
        }
        Some(hex::encode(Md5::digest(
            canonical::to_string(&material).as_bytes(),
        )))
    }

    /// Identifies the code: the same hash means the same compiled plugin.
    pub fn hash(&self) -> String {
        let module = self.module.as_ref().map(|m| hex::encode(Md5::digest(m)));
        let material = json!([
            self.id,
            format!("{:?}", self.language),
            self.validate,
            self.filters,
            self.views,
            self.resolve_conflict,
            module,
            self.options,
            self.lib,
        ]);
        hex::encode(Md5::digest(canonical::to_string(&material).as_bytes()))
    }
}

/// The built-in reduces (CouchDB matches them by prefix).
pub const BUILTIN_REDUCES: [&str; 4] = ["_count", "_sum", "_stats", "_approx_count_distinct"];

/// A view's reduce: a built-in by name, or a plugin function `(keys, values, rereduce)`.
#[derive(Clone)]
pub enum Reduce {
    Builtin(String),
    Func(Func),
}

/// A compiled view: `map([doc])` returns the emitted `[[key, value], …]`.
#[derive(Clone)]
pub struct ViewFns {
    pub map: Func,
    pub reduce: Option<Reduce>,
}

/// A compiled design document.
pub struct DesignFns {
    pub id: String,
    pub validate: Option<Func>,
    pub filters: HashMap<String, Func>,
    pub views: BTreeMap<String, ViewFns>,
    /// The view index signature (`Source::view_signature`).
    pub view_sig: Option<String>,
    pub language: Language,
    pub resolve_conflict: Option<Func>,
    /// Hash of the code, for replication ids and index signatures.
    pub code_hash: String,
}

/// What `validate_doc_update` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Forbidden(String),
    Unauthorized(String),
}

fn reason(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// CouchDB's rules: anything but `{"forbidden": …}` / `{"unauthorized": …}` accepts, provided
/// it is "nothing" (null, true, an empty object); other values are a broken validator.
pub fn verdict(v: &Value) -> Result<Verdict, String> {
    match v {
        Value::Null | Value::Bool(true) => Ok(Verdict::Accept),
        Value::Number(n) if n.as_u64() == Some(1) => Ok(Verdict::Accept),
        Value::Object(o) if o.is_empty() => Ok(Verdict::Accept),
        Value::Object(o) => {
            if let Some(r) = o.get("forbidden") {
                Ok(Verdict::Forbidden(reason(r)))
            } else if let Some(r) = o.get("unauthorized") {
                Ok(Verdict::Unauthorized(reason(r)))
            } else {
                Err(format!("validate_doc_update returned {v}; expected nothing, true, or {{\"forbidden\"|\"unauthorized\": reason}}"))
            }
        }
        v => Err(format!(
            "validate_doc_update returned {}; expected nothing, true, or {{\"forbidden\"|\"unauthorized\": reason}}",
            short(v)
        )),
    }
}

/// A value for error messages, cut short.
pub fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(120).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

/// A view's map as a `_changes` filter (`filter=_view`): a document passes when the map emits
/// at least one row for it; a map that fails on it lets it pass not.
pub fn view_filter(map: Func) -> Func {
    struct ViewFilter(Func);
    impl super::PluginFn for ViewFilter {
        fn call(&self, args: &[Value]) -> Result<Value, PluginError> {
            let rows = self.0.call(&args[..args.len().min(1)]);
            Ok(Value::Bool(
                matches!(rows, Ok(Value::Array(r)) if !r.is_empty()),
            ))
        }
    }
    Arc::new(ViewFilter(map))
}

/// The compiled design documents of one database, swapped as a whole.
#[derive(Default)]
pub struct DbPlugins {
    pub ddocs: Vec<Arc<DesignFns>>,
}

impl DbPlugins {
    pub fn has_validators(&self) -> bool {
        self.ddocs.iter().any(|d| d.validate.is_some())
    }

    pub fn validators(&self) -> impl Iterator<Item = (&str, &Func)> {
        self.ddocs
            .iter()
            .filter_map(|d| d.validate.as_ref().map(|f| (d.id.as_str(), f)))
    }

    pub fn ddoc(&self, id: &str) -> Option<&Arc<DesignFns>> {
        self.ddocs.iter().find(|d| d.id == id)
    }

    /// `ddoc/name` → the filter.
    pub fn filter(&self, spec: &str) -> Option<(&Arc<DesignFns>, &Func)> {
        let (ddoc, name) = spec.split_once('/')?;
        let d = self.ddoc(&format!("_design/{ddoc}"))?;
        d.filters.get(name).map(|f| (d, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(verdict(&json!(null)), Ok(Verdict::Accept));
        assert_eq!(verdict(&json!(true)), Ok(Verdict::Accept));
        assert_eq!(verdict(&json!({})), Ok(Verdict::Accept));
        assert_eq!(
            verdict(&json!({"forbidden": "no"})),
            Ok(Verdict::Forbidden("no".into()))
        );
        assert_eq!(
            verdict(&json!({"unauthorized": "who"})),
            Ok(Verdict::Unauthorized("who".into()))
        );
        assert!(verdict(&json!(42)).is_err());
        assert!(verdict(&json!({"x": 1})).is_err());
        assert!(verdict(&json!("x".repeat(1000))).unwrap_err().len() < 300);
    }
}
