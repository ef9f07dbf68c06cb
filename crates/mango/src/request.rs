//! A `_find` / `_explain` request body, checked as `mango_opts:validate_find` does.

use super::index::{parse_fields, Column};
use super::MangoError;
use serde_json::Value;
use thali_doc::selector::{parse_field, Selector};

/// CouchDB's default `limit`.
pub const DEFAULT_LIMIT: usize = 25;

#[derive(Clone, Debug)]
pub struct FindRequest {
    pub selector: Selector,
    pub limit: usize,
    pub skip: usize,
    pub sort: Vec<Column>,
    /// `fields`: the paths a result keeps (`None`: the whole document).
    pub fields: Option<Vec<Vec<String>>>,
    /// `use_index`: a design document, optionally with the index name.
    pub use_index: Option<(String, Option<String>)>,
    pub bookmark: Option<String>,
    pub conflicts: bool,
    pub update: bool,
    pub execution_stats: bool,
    pub allow_fallback: bool,
}

fn invalid(name: &str, v: &Value) -> MangoError {
    MangoError::bad("invalid_value", format!("Invalid value for {name}: {v}"))
}

fn boolean(v: &Value) -> Result<bool, MangoError> {
    v.as_bool()
        .ok_or_else(|| MangoError::bad("invalid_boolean", format!("Invalid boolean value: {v}")))
}

fn non_neg(v: &Value) -> Result<usize, MangoError> {
    v.as_u64().map(|n| n as usize).ok_or_else(|| {
        MangoError::bad(
            "invalid_non_neg_integer",
            format!("{v} is not an integer greater than or equal to zero"),
        )
    })
}

impl FindRequest {
    pub fn parse(body: &Value) -> Result<FindRequest, MangoError> {
        let Value::Object(b) = body else {
            return Err(MangoError::bad(
                "bad_request",
                "Request body must be a JSON object",
            ));
        };
        let selector = b.get("selector").ok_or_else(|| {
            MangoError::bad("missing_required_key", "Missing required key: selector")
        })?;
        let mut req = FindRequest {
            selector: Selector::parse(selector)?,
            limit: DEFAULT_LIMIT,
            skip: 0,
            sort: Vec::new(),
            fields: None,
            use_index: None,
            bookmark: None,
            conflicts: false,
            update: true,
            execution_stats: false,
            allow_fallback: true,
        };
        for (k, v) in b {
            match k.as_str() {
                "selector" => {}
                "limit" => req.limit = non_neg(v)?,
                "skip" => req.skip = non_neg(v)?,
                "sort" => {
                    req.sort = parse_fields(v)?;
                    if req.sort.iter().any(|c| c.desc != req.sort[0].desc) {
                        return Err(MangoError::bad(
                            "unsupported_mixed_sort",
                            "Sorts currently only support a single direction for all fields.",
                        ));
                    }
                }
                "fields" => {
                    let Value::Array(f) = v else {
                        return Err(invalid("fields", v));
                    };
                    let paths: Option<Vec<Vec<String>>> = f
                        .iter()
                        .map(|x| x.as_str().filter(|s| !s.is_empty()).map(parse_field))
                        .collect();
                    let paths = paths.ok_or_else(|| invalid("fields", v))?;
                    // `[]` asks for the whole document, as in CouchDB.
                    req.fields = (!paths.is_empty()).then_some(paths);
                }
                "use_index" => req.use_index = use_index(v)?,
                "bookmark" => match v {
                    Value::String(s) if s.is_empty() || s == "nil" => {}
                    Value::String(s) => req.bookmark = Some(s.clone()),
                    Value::Null => {}
                    v => return Err(invalid("bookmark", v)),
                },
                "conflicts" => req.conflicts = boolean(v)?,
                "update" => req.update = boolean(v)?,
                "execution_stats" => req.execution_stats = boolean(v)?,
                "allow_fallback" => req.allow_fallback = boolean(v)?,
                "stable" => {
                    boolean(v)?;
                }
                "r" => {
                    if v.as_u64().is_none_or(|n| n == 0) {
                        return Err(MangoError::bad(
                            "invalid_pos_integer",
                            format!("{v} is not an integer greater than zero"),
                        ));
                    }
                }
                "stale" => {
                    if v != "ok" && v != &Value::Bool(false) {
                        return Err(invalid("stale", v));
                    }
                    // `stale: "ok"` is the old spelling of `update: false`.
                    if v == "ok" {
                        req.update = false;
                    }
                }
                "partition" => {
                    if v.as_str().is_none_or(|s| !s.is_empty()) {
                        return Err(MangoError::bad(
                            "invalid_partition",
                            "This node has no partitioned databases.",
                        ));
                    }
                }
                other => {
                    return Err(MangoError::bad(
                        "invalid_key",
                        format!("Invalid key {other} for this request."),
                    ))
                }
            }
        }
        Ok(req)
    }

    /// The sort's field paths.
    pub fn sort_paths(&self) -> Vec<Vec<String>> {
        self.sort.iter().map(|c| c.path.clone()).collect()
    }

    /// Descending when every sort field is (directions cannot be mixed).
    pub fn descending(&self) -> bool {
        self.sort.first().is_some_and(|c| c.desc)
    }
}

fn use_index(v: &Value) -> Result<Option<(String, Option<String>)>, MangoError> {
    let ddoc = |s: &str| {
        if s.starts_with("_design/") {
            s.to_string()
        } else {
            format!("_design/{s}")
        }
    };
    match v {
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some((ddoc(s), None))),
        Value::Array(a) => match a.as_slice() {
            [] => Ok(None),
            [Value::String(d)] => Ok(Some((ddoc(d), None))),
            [Value::String(d), Value::String(n)] => Ok(Some((ddoc(d), Some(n.clone())))),
            _ => Err(invalid("use_index", v)),
        },
        _ => Err(invalid("use_index", v)),
    }
}

/// A result document cut down to `fields` (nested paths keep their parents' shape).
pub fn project(doc: &Value, fields: &[Vec<String>]) -> Value {
    let mut out = Value::Object(serde_json::Map::new());
    for path in fields {
        if let Some(v) = thali_doc::selector::get_path(doc, path) {
            let mut cur = &mut out;
            for (i, part) in path.iter().enumerate() {
                let Value::Object(m) = cur else { break };
                if i + 1 == path.len() {
                    m.insert(part.clone(), v.clone());
                    break;
                }
                cur = m
                    .entry(part.clone())
                    .or_insert_with(|| Value::Object(serde_json::Map::new()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_are_checked_like_couchdb() {
        let err = |v: Value| FindRequest::parse(&v).unwrap_err().error;
        assert_eq!(err(json!({})), "missing_required_key");
        assert_eq!(err(json!({"selector": []})), "invalid_selector_json");
        assert_eq!(
            err(json!({"selector": {}, "limit": -1})),
            "invalid_non_neg_integer"
        );
        assert_eq!(
            err(json!({"selector": {}, "limit": "5"})),
            "invalid_non_neg_integer"
        );
        assert_eq!(
            err(json!({"selector": {}, "conflicts": 1})),
            "invalid_boolean"
        );
        assert_eq!(
            err(json!({"selector": {}, "sort": [{"a": "asc"}, {"b": "desc"}]})),
            "unsupported_mixed_sort"
        );
        assert_eq!(err(json!({"selector": {}, "nope": 1})), "invalid_key");
        assert_eq!(err(json!({"selector": {}, "fields": "a"})), "invalid_value");
        assert_eq!(
            err(json!({"selector": {}, "use_index": 3})),
            "invalid_value"
        );
        let r = FindRequest::parse(&json!({"selector": {"a": 1}, "sort": [{"a": "desc"}],
            "use_index": ["d", "n"], "fields": ["a.b"], "bookmark": "nil"}))
        .unwrap();
        assert!(r.descending());
        assert_eq!(r.use_index, Some(("_design/d".into(), Some("n".into()))));
        assert_eq!(r.fields, Some(vec![vec!["a".to_string(), "b".to_string()]]));
        assert_eq!((r.limit, r.bookmark), (DEFAULT_LIMIT, None));
    }

    #[test]
    fn projection_keeps_nested_shape() {
        let doc = json!({"_id": "x", "a": {"b": 1, "c": 2}, "d": 3});
        let f = vec![
            vec!["_id".to_string()],
            parse_field("a.b"),
            parse_field("zz"),
        ];
        assert_eq!(project(&doc, &f), json!({"_id": "x", "a": {"b": 1}}));
    }
}
