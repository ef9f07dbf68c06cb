//! JSON indexes: design documents with `"language": "query"`, as CouchDB stores them —
//! `views.<name> = {"map": {"fields": {"f": "asc"}, "partial_filter_selector": …},
//! "reduce": "_count", "options": {"def": {"fields": ["f"]}}}` — so they replicate to and from
//! CouchDB unchanged. Each view compiles to a native map that emits `[[values of the fields],
//! null]` for a document that has every field (and passes the partial filter).

use super::MangoError;
use md5::{Digest, Md5};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use thali_doc::canonical;
use thali_doc::selector::{get_path, parse_field, Selector};
use thali_plugins::design::{DesignFns, Language, Reduce, ViewFns};
use thali_plugins::{PluginError, PluginFn};

/// One column of an index: the field as written (`a.b`), its path, its direction.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    pub name: String,
    pub path: Vec<String>,
    pub desc: bool,
}

/// One JSON index.
#[derive(Clone, Debug)]
pub struct IndexDef {
    /// `_design/<ddoc>`.
    pub ddoc: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub partial: Option<Selector>,
}

impl IndexDef {
    pub fn paths(&self) -> Vec<Vec<String>> {
        self.columns.iter().map(|c| c.path.clone()).collect()
    }

    /// `def` as `_index` lists it: `{"fields": [{"f": "asc"}], "partial_filter_selector": …}`.
    pub fn def_json(&self) -> Value {
        let mut def = Map::new();
        def.insert("fields".into(), fields_json(&self.columns));
        if let Some(p) = &self.partial {
            def.insert("partial_filter_selector".into(), p.json().clone());
        }
        Value::Object(def)
    }

    /// The entry `GET /db/_index` lists.
    pub fn json(&self) -> Value {
        json!({
            "ddoc": self.ddoc,
            "name": self.name,
            "type": "json",
            "partitioned": false,
            "def": self.def_json(),
        })
    }

    /// The design document's view entry for this index (CouchDB's layout).
    fn view_json(&self) -> Value {
        let mut map = Map::new();
        let mut fields = Map::new();
        for c in &self.columns {
            fields.insert(c.name.clone(), json!(if c.desc { "desc" } else { "asc" }));
        }
        map.insert("fields".into(), Value::Object(fields));
        if let Some(p) = &self.partial {
            map.insert("partial_filter_selector".into(), p.json().clone());
        }
        json!({"map": map, "reduce": "_count", "options": {"def": self.def_json()}})
    }
}

fn fields_json(cols: &[Column]) -> Value {
    Value::Array(
        cols.iter()
            .map(|c| json!({ c.name.clone(): if c.desc { "desc" } else { "asc" } }))
            .collect(),
    )
}

/// The JSON indexes a `"language": "query"` design document defines. Views that are not valid
/// index definitions are left out, as CouchDB does: they are stored and replicated, never used.
pub fn from_ddoc(id: &str, doc: &Map<String, Value>) -> Vec<IndexDef> {
    let Some(Value::Object(views)) = doc.get("views") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, v) in views {
        let Some(Value::Object(map)) = v.get("map") else {
            continue;
        };
        let Some(Value::Object(fields)) = map.get("fields") else {
            continue;
        };
        let columns: Option<Vec<Column>> = fields
            .iter()
            .map(|(f, dir)| {
                Some(Column {
                    name: f.clone(),
                    path: parse_field(f),
                    desc: match dir.as_str() {
                        Some("asc") | None => false,
                        Some("desc") => true,
                        Some(_) => return None,
                    },
                })
            })
            .collect();
        let Some(columns) = columns.filter(|c| !c.is_empty()) else {
            continue;
        };
        let partial = match map
            .get("partial_filter_selector")
            .or_else(|| map.get("selector"))
        {
            None => None,
            Some(s) if s.as_object().is_some_and(Map::is_empty) => None,
            Some(s) => match Selector::parse(s) {
                Ok(s) => Some(s),
                Err(_) => continue,
            },
        };
        out.push(IndexDef {
            ddoc: id.to_string(),
            name: name.clone(),
            columns,
            partial,
        });
    }
    out
}

/// A `POST /db/_index` request, checked.
#[derive(Debug)]
pub struct NewIndex {
    pub def: IndexDef,
}

/// Most fields one index names (planning cost grows with them; CouchDB's real indexes name a few).
pub const MAX_FIELDS: usize = 64;

/// Parses `{"index": {"fields": […], "partial_filter_selector": …}, "ddoc", "name", "type"}`.
pub fn parse_create(body: &Value) -> Result<NewIndex, MangoError> {
    let Value::Object(b) = body else {
        return Err(MangoError::bad(
            "bad_request",
            "Request body must be a JSON object",
        ));
    };
    for k in b.keys() {
        if !matches!(
            k.as_str(),
            "index" | "ddoc" | "name" | "type" | "w" | "partitioned"
        ) {
            return Err(MangoError::bad(
                "invalid_key",
                format!("Invalid key {k} for this request."),
            ));
        }
    }
    let index = b
        .get("index")
        .ok_or_else(|| MangoError::bad("missing_required_key", "Missing required key: index"))?;
    match b.get("type").map(|t| t.as_str()) {
        None | Some(Some("json")) => {}
        Some(Some(t @ ("text" | "nouveau"))) => {
            return Err(MangoError::new(
                501,
                "index_not_implemented",
                format!("{t} indexes are not implemented by this node; use \"json\"."),
            ))
        }
        Some(Some(t)) => {
            return Err(MangoError::bad(
                "invalid_index",
                format!("Invalid type for index: {t}"),
            ))
        }
        Some(None) => {
            return Err(MangoError::bad(
                "invalid_string",
                format!("Invalid string: {}", b["type"]),
            ))
        }
    }
    if b.get("partitioned").is_some_and(|p| p == &json!(true)) {
        return Err(MangoError::bad(
            "invalid_partitioned_option",
            "Partitioned indexes need a partitioned database; this node has none.",
        ));
    }
    let Value::Object(index) = index else {
        return Err(MangoError::bad(
            "invalid_index",
            format!("JSON indexes must be an object, not: {index}"),
        ));
    };
    let fields = index
        .get("fields")
        .ok_or_else(|| MangoError::bad("missing_required_key", "Missing required key: fields"))?;
    let columns = parse_fields(fields)?;
    if columns.is_empty() {
        return Err(MangoError::bad(
            "invalid_index",
            "Index fields must name at least one field.",
        ));
    }
    if columns.len() > MAX_FIELDS {
        return Err(MangoError::bad(
            "invalid_index",
            format!("An index may name at most {MAX_FIELDS} fields."),
        ));
    }
    if columns.iter().any(|c| c.desc != columns[0].desc) {
        return Err(MangoError::bad(
            "unsupported_mixed_sort",
            "Sorts currently only support a single direction for all fields.",
        ));
    }
    let partial = match index.get("partial_filter_selector") {
        None => None,
        Some(s) if s.as_object().is_some_and(Map::is_empty) => None,
        // Parsed as given (errors), stored with its shorthands spelled out, as CouchDB does.
        Some(s) => {
            Selector::parse(s)?;
            Some(Selector::parse(&explicit_eq(s))?)
        }
    };
    let name_of = |k: &str| -> Result<Option<String>, MangoError> {
        match b.get(k) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Err(MangoError::bad(
                "invalid_empty_string",
                "Index name or ddoc cannot be empty string",
            )),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(MangoError::bad(
                if k == "name" {
                    "invalid_index_name"
                } else {
                    "invalid_string"
                },
                format!("Invalid index name: {v}"),
            )),
        }
    };
    let mut def = IndexDef {
        ddoc: String::new(),
        name: String::new(),
        columns,
        partial,
    };
    // CouchDB names an unnamed index and its design document by a hash of the definition and
    // the options (the name among them), so creating the same index twice finds it, and two
    // names for the same fields get two design documents.
    let name = name_of("name")?;
    let auto = hex::encode(Md5::digest(
        canonical::to_string(&json!([def.def_json(), name])).as_bytes(),
    ));
    def.name = name.unwrap_or_else(|| auto.clone());
    let ddoc = name_of("ddoc")?.unwrap_or(auto);
    def.ddoc = if ddoc.starts_with("_design/") {
        ddoc
    } else {
        format!("_design/{ddoc}")
    };
    Ok(NewIndex { def })
}

/// A selector with `{"field": value}` shorthands spelled `{"field": {"$eq": value}}` (objects
/// without operators are nested fields and are walked into).
fn explicit_eq(v: &Value) -> Value {
    let Value::Object(m) = v else {
        return v.clone();
    };
    let mut out = Map::new();
    for (k, val) in m {
        let is_op = |k: &str| k.starts_with('$');
        let new = if is_op(k) {
            match val {
                Value::Array(a) if matches!(k.as_str(), "$and" | "$or" | "$nor") => {
                    Value::Array(a.iter().map(explicit_eq).collect())
                }
                Value::Object(_)
                    if matches!(
                        k.as_str(),
                        "$not"
                            | "$elemMatch"
                            | "$allMatch"
                            | "$keyMapMatch"
                            | "$and"
                            | "$or"
                            | "$nor"
                    ) =>
                {
                    explicit_eq(val)
                }
                other => other.clone(),
            }
        } else {
            match val {
                Value::Object(o) if o.keys().any(|k| is_op(k)) => explicit_eq(val),
                Value::Object(o) if !o.is_empty() => explicit_eq(val),
                other => json!({"$eq": other}),
            }
        };
        out.insert(k.clone(), new);
    }
    Value::Object(out)
}

/// Index fields (or sort fields): `["a", {"b": "desc"}]`, errors as `mango_sort` words them.
pub fn parse_fields(v: &Value) -> Result<Vec<Column>, MangoError> {
    let Value::Array(items) = v else {
        return Err(MangoError::bad(
            "invalid_sort_json",
            format!("Sort must be an array of sort specs, not: {v}"),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let (name, desc) = match item {
            Value::String(s) => (s.clone(), false),
            Value::Object(o) if o.len() == 1 => {
                let (k, d) = o.iter().next().expect("one member");
                match d.as_str() {
                    Some("asc") => (k.clone(), false),
                    Some("desc") => (k.clone(), true),
                    _ => {
                        return Err(MangoError::bad(
                            "invalid_sort_dir",
                            format!("Invalid sort direction: {d}"),
                        ))
                    }
                }
            }
            other => {
                return Err(MangoError::bad(
                    "invalid_sort_field",
                    format!("Invalid sort field: {other}"),
                ))
            }
        };
        if name.is_empty() {
            return Err(MangoError::bad(
                "invalid_sort_field",
                format!("Invalid sort field: {item}"),
            ));
        }
        out.push(Column {
            path: parse_field(&name),
            name,
            desc,
        });
    }
    Ok(out)
}

/// Adds (or replaces) the index in its design document. `Ok(false)`: an identical index is
/// already there (`"result": "exists"`).
pub fn add_to_ddoc(doc: &mut Map<String, Value>, def: &IndexDef) -> Result<bool, MangoError> {
    match doc.get("language") {
        // A new design document (no `_rev`); a stored one without a language is JavaScript.
        None if !doc.contains_key("_rev") => {
            doc.insert("language".into(), json!("query"));
        }
        Some(l) if l == "query" => {}
        _ => {
            return Err(MangoError::bad(
                "invalid_index",
                "Invalid design document query language.",
            ))
        }
    }
    let views = doc
        .entry("views")
        .or_insert_with(|| Value::Object(Map::new()));
    if !views.is_object() {
        *views = Value::Object(Map::new());
    }
    let views = views.as_object_mut().expect("an object");
    let entry = def.view_json();
    if views.get(&def.name) == Some(&entry) {
        return Ok(false);
    }
    views.insert(def.name.clone(), entry);
    Ok(true)
}

/// Removes the index from its design document. `Ok(true)`: the design document has no view
/// left (CouchDB deletes it then).
pub fn remove_from_ddoc(doc: &mut Map<String, Value>, name: &str) -> Result<bool, MangoError> {
    let views = doc.get_mut("views").and_then(Value::as_object_mut);
    match views {
        Some(v) if v.contains_key(name) => {
            v.shift_remove(name);
            Ok(v.is_empty())
        }
        _ => Err(MangoError::new(
            404,
            "not_found",
            format!("JSON index {name} not found in this design doc."),
        )),
    }
}

/// The native map of one index.
struct IndexMap {
    columns: Vec<Vec<String>>,
    partial: Option<Selector>,
}

impl PluginFn for IndexMap {
    fn call(&self, args: &[Value]) -> Result<Value, PluginError> {
        let Some(doc) = args.first() else {
            return Ok(json!([]));
        };
        if self.partial.as_ref().is_some_and(|p| !p.matches(doc)) {
            return Ok(json!([]));
        }
        let mut key = Vec::with_capacity(self.columns.len());
        for c in &self.columns {
            match get_path(doc, c) {
                Some(v) => key.push(v.clone()),
                None => return Ok(json!([])),
            }
        }
        Ok(json!([[key, null]]))
    }
}

/// Compiles a `"language": "query"` design document from its indexes (`from_ddoc`): views
/// with native maps. `None` when it defines no valid index.
pub fn compile(id: &str, defs: &[IndexDef]) -> Option<DesignFns> {
    if defs.is_empty() {
        return None;
    }
    let mut views = BTreeMap::new();
    let mut material = Vec::new();
    for d in defs {
        let map: thali_plugins::Func = Arc::new(IndexMap {
            columns: d.paths(),
            partial: d.partial.clone(),
        });
        views.insert(
            d.name.clone(),
            ViewFns {
                map,
                reduce: Some(Reduce::Builtin("_count".into())),
            },
        );
        material.push(json!([d.name, d.def_json()]));
    }
    let material = json!([thali_doc::collate::VERSION, "query", material]);
    let sig = hex::encode(Md5::digest(canonical::to_string(&material).as_bytes()));
    Some(DesignFns {
        id: id.to_string(),
        validate: None,
        filters: HashMap::new(),
        views,
        view_sig: Some(sig.clone()),
        language: Language::Query,
        resolve_conflict: None,
        code_hash: sig,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_request_round_trips_through_the_design_document() {
        let req = json!({"index": {"fields": [{"b": "desc"}, {"a.x": "desc"}],
            "partial_filter_selector": {"t": "x"}}, "ddoc": "d", "name": "n"});
        let new = parse_create(&req).unwrap();
        assert_eq!(new.def.ddoc, "_design/d");
        let mut doc = Map::new();
        assert!(add_to_ddoc(&mut doc, &new.def).unwrap());
        assert!(
            !add_to_ddoc(&mut doc, &new.def).unwrap(),
            "the same index exists"
        );
        let defs = from_ddoc("_design/d", &doc);
        assert_eq!(defs.len(), 1);
        let names: Vec<&str> = defs[0].columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["b", "a.x"], "column order is kept");
        assert_eq!(defs[0].columns[1].path, ["a", "x"]);
        assert_eq!(
            defs[0].json()["def"],
            json!({"fields": [{"b": "desc"}, {"a.x": "desc"}], "partial_filter_selector": {"t": {"$eq": "x"}}})
        );
        let fns = compile("_design/d", &defs).unwrap();
        let map = &fns.views["n"].map;
        assert_eq!(
            map.call(&[json!({"t": "x", "b": 1, "a": {"x": [2]}})])
                .unwrap(),
            json!([[[1, [2]], null]])
        );
        assert_eq!(map.call(&[json!({"t": "x", "b": 1})]).unwrap(), json!([]));
        assert_eq!(
            map.call(&[json!({"t": "y", "b": 1, "a": {"x": 1}})])
                .unwrap(),
            json!([])
        );
        assert!(remove_from_ddoc(&mut doc, "n").unwrap());
    }

    #[test]
    fn unnamed_indexes_are_named_by_their_definition() {
        let a = parse_create(&json!({"index": {"fields": ["x"]}})).unwrap();
        let b = parse_create(&json!({"index": {"fields": [{"x": "asc"}]}})).unwrap();
        assert_eq!(a.def.name, b.def.name);
        assert_eq!(a.def.ddoc, format!("_design/{}", a.def.name));
    }

    #[test]
    fn bad_definitions_are_refused_with_couchdb_errors() {
        let err = |v: Value| parse_create(&v).unwrap_err().error;
        assert_eq!(err(json!({})), "missing_required_key");
        assert_eq!(err(json!({"index": 1})), "invalid_index");
        assert_eq!(err(json!({"index": {"fields": "x"}})), "invalid_sort_json");
        assert_eq!(
            err(json!({"index": {"fields": [{"x": "up"}]}})),
            "invalid_sort_dir"
        );
        assert_eq!(err(json!({"index": {"fields": [1]}})), "invalid_sort_field");
        assert_eq!(
            err(json!({"index": {"fields": [{"a": "desc"}, "b"]}})),
            "unsupported_mixed_sort"
        );
        assert_eq!(err(json!({"index": {"fields": []}})), "invalid_index");
        assert_eq!(
            err(json!({"index": {"fields": ["x"]}, "name": ""})),
            "invalid_empty_string"
        );
        assert_eq!(
            err(json!({"index": {"fields": ["x"]}, "bogus": 1})),
            "invalid_key"
        );
        assert_eq!(
            err(json!({"index": {"fields": ["x"]}, "type": "text"})),
            "index_not_implemented"
        );
        assert_eq!(
            err(json!({"index": {"fields": ["x"], "partial_filter_selector": {"a": {"$bad": 1}}}})),
            "invalid_operator"
        );
    }
}
