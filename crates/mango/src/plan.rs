//! The query planner (`mango_idx_view:is_usable`, `mango_cursor_view:choose_best_index`):
//! which index answers a `_find`, and which key range of it to read. The range only narrows
//! the scan; every document read is matched against the whole selector.

use super::index::IndexDef;
use super::request::FindRequest;
use super::MangoError;
use serde_json::Value;
use std::cmp::Ordering;
use thali_doc::collate;
use thali_doc::selector::{Node, Op, Selector};

/// What answers the query.
#[derive(Clone, Copy, Debug)]
pub enum Access<'a> {
    /// The documents by id (`_all_docs`, CouchDB's "special" index).
    AllDocs,
    Json(&'a IndexDef),
}

/// A chosen index and the range to read.
#[derive(Debug)]
pub struct Plan<'a> {
    pub access: Access<'a>,
    /// Low bounds of the leading columns (inclusive), as many as are known.
    pub lo: Vec<Value>,
    /// High bounds of the leading columns (inclusive), as many as are known.
    pub hi: Vec<Value>,
    /// `_all_docs` only: the id range, compared by bytes as `_id` is.
    pub id_lo: Option<String>,
    pub id_hi: Option<String>,
    /// Nothing can match (contradictory bounds, `{"$or": []}`).
    pub empty: bool,
    pub descending: bool,
    /// Warnings known before running (`use_index` not used, no index).
    pub warnings: Vec<String>,
}

/// One field's bounds from the top-level conjuncts.
#[derive(Clone, Debug, Default)]
struct Bounds {
    lo: Option<Value>,
    hi: Option<Value>,
}

fn is_indexable(op: &Op) -> bool {
    matches!(
        op,
        Op::Eq(_)
            | Op::Lt(_)
            | Op::Lte(_)
            | Op::Gt(_)
            | Op::Gte(_)
            | Op::BeginsWith(_)
            | Op::Exists(_)
    )
}

/// Fields with indexable conditions among the top-level conjuncts (`indexable_fields`).
fn indexable_fields(sel: &Selector) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for c in sel.conjuncts() {
        if let Node::Field(p, op) = c {
            if is_indexable(op) && !p.is_empty() && !out.contains(p) {
                out.push(p.clone());
            }
        }
    }
    out
}

/// A string just above every string starting with `p`, in the order `cmp` gives.
fn prefix_end(p: &str, bytes: bool) -> String {
    // U+FFFF has the highest primary weight in the root collation; by bytes, U+10FFFF is last.
    format!("{p}{}", if bytes { '\u{10FFFF}' } else { '\u{FFFF}' })
}

/// The bounds of `field` from the top-level conjuncts; `None` when they contradict.
fn bounds(
    sel: &Selector,
    field: &[String],
    cmp: &dyn Fn(&Value, &Value) -> Ordering,
    bytes: bool,
) -> Option<Bounds> {
    let mut b = Bounds::default();
    let raise = |b: &mut Bounds, v: &Value| {
        if b.lo
            .as_ref()
            .is_none_or(|lo| cmp(v, lo) == Ordering::Greater)
        {
            b.lo = Some(v.clone());
        }
    };
    let lower = |b: &mut Bounds, v: &Value| {
        if b.hi.as_ref().is_none_or(|hi| cmp(v, hi) == Ordering::Less) {
            b.hi = Some(v.clone());
        }
    };
    for c in sel.conjuncts() {
        let Node::Field(p, op) = c else { continue };
        if p != field {
            continue;
        }
        match op {
            Op::Eq(v) => {
                raise(&mut b, v);
                lower(&mut b, v);
            }
            Op::Gt(v) | Op::Gte(v) => raise(&mut b, v),
            Op::Lt(v) | Op::Lte(v) => lower(&mut b, v),
            Op::BeginsWith(s) => {
                raise(&mut b, &Value::String(s.clone()));
                lower(&mut b, &Value::String(prefix_end(s, bytes)));
            }
            _ => {}
        }
    }
    match (&b.lo, &b.hi) {
        (Some(lo), Some(hi)) if cmp(lo, hi) == Ordering::Greater => None,
        _ => Some(b),
    }
}

/// CouchDB's `can_use_sort`: the sort fields are a prefix of the columns once the leading
/// columns fixed by `$eq` are passed over.
fn can_use_sort(cols: &[Vec<String>], sort: &[Vec<String>], sel: &Selector) -> bool {
    if sort.is_empty() {
        return true;
    }
    match cols.first() {
        None => false,
        Some(c) if *c == sort[0] => sort.len() <= cols.len() && cols[..sort.len()] == *sort,
        Some(c) if sel.is_constant(c) => can_use_sort(&cols[1..], sort, sel),
        Some(_) => false,
    }
}

fn is_usable(idx: &IndexDef, req: &FindRequest) -> bool {
    let cols = idx.paths();
    let sort = req.sort_paths();
    let required: Vec<Vec<String>> = cols
        .iter()
        .filter(|c| !sort.contains(c) && !matches!(c.as_slice(), [f] if f == "_id" || f == "_rev"))
        .cloned()
        .collect();
    req.selector.requires(&required) && can_use_sort(&cols, &sort, &req.selector)
}

fn id_path() -> Vec<String> {
    vec!["_id".to_string()]
}

fn matches_use_index(idx: &IndexDef, want: &(String, Option<String>)) -> bool {
    idx.ddoc == want.0 && want.1.as_ref().is_none_or(|n| *n == idx.name)
}

fn ddoc_name(id: &str) -> &str {
    id.strip_prefix("_design/").unwrap_or(id)
}

/// Chooses the index for `req` among the database's JSON indexes.
pub fn plan<'a>(req: &FindRequest, indexes: &'a [IndexDef]) -> Result<Plan<'a>, MangoError> {
    let sort = req.sort_paths();
    // Indexes with a partial filter are only used when asked for by `use_index`.
    let usable: Vec<&IndexDef> = indexes
        .iter()
        .filter(|i| {
            i.partial.is_none()
                || req
                    .use_index
                    .as_ref()
                    .is_some_and(|u| matches_use_index(i, u))
        })
        .filter(|i| is_usable(i, req))
        .collect();
    let all_docs_usable = can_use_sort(&[id_path()], &sort, &req.selector);
    if usable.is_empty() && !all_docs_usable {
        return Err(MangoError::bad(
            "no_usable_index",
            "No index exists for this sort, try indexing by the sort fields.",
        ));
    }
    let mut warnings = Vec::new();
    let candidates = match &req.use_index {
        Some(want) => asked_for(req, want, &usable, &mut warnings)?,
        None => usable,
    };
    let noop = matches!(req.selector.json(), Value::Object(m) if m.len() == 1
        && m.iter().any(|(k, v)| matches!(k.as_str(), "$or" | "$and" | "$in" | "$all")
            && v.as_array().is_some_and(|a| a.is_empty())));
    if candidates.is_empty() {
        warnings.push("No matching index found, create an index to optimize query time.".into());
        return Ok(all_docs_plan(req, noop, warnings));
    }
    Ok(index_plan(req, candidates, noop, warnings))
}

/// The usable indexes `use_index` names; when it names no usable one and a fallback is
/// allowed, every usable index (with a warning).
fn asked_for<'a>(
    req: &FindRequest,
    want: &(String, Option<String>),
    usable: &[&'a IndexDef],
    warnings: &mut Vec<String>,
) -> Result<Vec<&'a IndexDef>, MangoError> {
    let asked: Vec<&IndexDef> = usable
        .iter()
        .copied()
        .filter(|i| matches_use_index(i, want))
        .collect();
    if !asked.is_empty() {
        return Ok(asked);
    }
    if !req.allow_fallback {
        return Err(MangoError::bad(
            "invalid_index",
            match &want.1 {
                None => format!(
                    "_design/{} specified by `use_index` could not be found or it is not suitable.",
                    ddoc_name(&want.0)
                ),
                Some(n) => format!(
                    "_design/{}, {n} specified by `use_index` could not be found or it is not suitable.",
                    ddoc_name(&want.0)
                ),
            },
        ));
    }
    warnings.push(match &want.1 {
        None => format!(
            "_design/{} was not used because it does not contain a valid index for this query.",
            ddoc_name(&want.0)
        ),
        Some(n) => format!(
            "_design/{}, {n} was not used because it is not a valid index for this query.",
            ddoc_name(&want.0)
        ),
    });
    Ok(usable.to_vec())
}

/// A scan of `_all_docs`, bounded by what the selector says of `_id`.
fn all_docs_plan<'a>(req: &FindRequest, noop: bool, warnings: Vec<String>) -> Plan<'a> {
    // As the selector compares `_id`: strings by bytes, above every other type.
    let by_bytes = |a: &Value, b: &Value| match (a, b) {
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::String(_), _) => Ordering::Greater,
        (_, Value::String(_)) => Ordering::Less,
        _ => collate::cmp(a, b),
    };
    let b = bounds(&req.selector, &id_path(), &by_bytes, true);
    let s = |v: Option<Value>| v.and_then(|v| v.as_str().map(str::to_string));
    Plan {
        access: Access::AllDocs,
        lo: Vec::new(),
        hi: Vec::new(),
        empty: noop || b.is_none(),
        id_lo: s(b.clone().and_then(|b| b.lo)),
        id_hi: s(b.and_then(|b| b.hi)),
        descending: req.descending(),
        warnings,
    }
}

/// The best of `candidates` (the fewest indexable fields its leading columns leave out, then
/// the fewest columns, then by name) and the key bounds its leading columns get.
fn index_plan<'a>(
    req: &FindRequest,
    candidates: Vec<&'a IndexDef>,
    noop: bool,
    warnings: Vec<String>,
) -> Plan<'a> {
    let fields = indexable_fields(&req.selector);
    let prefix_len = |i: &IndexDef| i.paths().iter().take_while(|c| fields.contains(c)).count();
    let best = candidates
        .into_iter()
        .min_by(|a, b| {
            (fields.len() - prefix_len(a))
                .cmp(&(fields.len() - prefix_len(b)))
                .then(a.columns.len().cmp(&b.columns.len()))
                .then_with(|| (&a.ddoc, &a.name).cmp(&(&b.ddoc, &b.name)))
        })
        .expect("callers pass at least one candidate");
    let (mut lo, mut hi, mut lo_open, mut hi_open, mut empty) =
        (Vec::new(), Vec::new(), false, false, noop);
    for col in best.paths() {
        // `_id` matches by bytes but the index orders it by collation: no bounds from it.
        let b = if col == id_path() {
            Some(Bounds::default())
        } else {
            bounds(&req.selector, &col, &collate::cmp, false)
        };
        let Some(b) = b else {
            empty = true;
            break;
        };
        match (b.lo, lo_open) {
            (Some(v), false) => lo.push(v),
            _ => lo_open = true,
        }
        match (b.hi, hi_open) {
            (Some(v), false) => hi.push(v),
            _ => hi_open = true,
        }
    }
    Plan {
        access: Access::Json(best),
        lo,
        hi,
        id_lo: None,
        id_hi: None,
        empty,
        descending: req.descending(),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::from_ddoc;
    use serde_json::json;

    fn indexes() -> Vec<IndexDef> {
        let doc = json!({"language": "query", "views": {
            "age": {"map": {"fields": {"age": "asc"}}},
            "name_age": {"map": {"fields": {"name": "asc", "age": "asc"}}},
            "type_age": {"map": {"fields": {"type": "asc", "age": "asc"}, "partial_filter_selector": {"type": "user"}}},
        }});
        from_ddoc("_design/i", doc.as_object().unwrap())
    }

    fn req(v: Value) -> FindRequest {
        FindRequest::parse(&v).unwrap()
    }

    fn chosen(p: &Plan) -> String {
        match p.access {
            Access::AllDocs => "_all_docs".into(),
            Access::Json(i) => i.name.clone(),
        }
    }

    #[test]
    fn picks_the_index_whose_prefix_covers_the_most_fields() {
        let idx = indexes();
        let p = plan(&req(json!({"selector": {"age": {"$gt": 5}}})), &idx).unwrap();
        assert_eq!(chosen(&p), "age");
        assert_eq!((p.lo.clone(), p.hi.clone()), (vec![json!(5)], vec![]));
        let p = plan(
            &req(json!({"selector": {"name": "x", "age": {"$lte": 9}}})),
            &idx,
        )
        .unwrap();
        assert_eq!(chosen(&p), "name_age");
        assert_eq!(
            (p.lo.clone(), p.hi.clone()),
            (vec![json!("x")], vec![json!("x"), json!(9)])
        );
        // Sorting by age after a constant name uses name_age.
        let p = plan(
            &req(json!({"selector": {"name": "x"}, "sort": ["age"]})),
            &idx,
        )
        .unwrap();
        assert_eq!(chosen(&p), "name_age");
        // Partial indexes only when asked for.
        let p = plan(&req(json!({"selector": {"type": "user", "age": 3}})), &idx).unwrap();
        assert_eq!(chosen(&p), "age");
        // Naming the design document makes its partial index a candidate, and it covers more.
        let p = plan(
            &req(json!({"selector": {"type": "user", "age": 3}, "use_index": "i"})),
            &idx,
        )
        .unwrap();
        assert_eq!(chosen(&p), "type_age");
        let p = plan(
            &req(json!({"selector": {"type": "user", "age": 3}, "use_index": ["i", "type_age"]})),
            &idx,
        )
        .unwrap();
        assert_eq!(chosen(&p), "type_age");
    }

    #[test]
    fn falls_back_to_all_docs_or_refuses() {
        let idx = indexes();
        let p = plan(&req(json!({"selector": {"other": 1}})), &idx).unwrap();
        assert_eq!(chosen(&p), "_all_docs");
        assert_eq!(
            p.warnings,
            ["No matching index found, create an index to optimize query time."]
        );
        let e = plan(
            &req(json!({"selector": {"other": 1}, "sort": ["other"]})),
            &idx,
        )
        .unwrap_err();
        assert_eq!(e.error, "no_usable_index");
        let p = plan(
            &req(json!({"selector": {"other": 1}, "use_index": "nope"})),
            &idx,
        )
        .unwrap();
        assert_eq!(p.warnings.len(), 2);
        let e = plan(
            &req(json!({"selector": {"other": 1}, "use_index": "nope", "allow_fallback": false})),
            &idx,
        )
        .unwrap_err();
        assert_eq!(e.error, "invalid_index");
        let p = plan(
            &req(json!({"selector": {"_id": {"$beginsWith": "a", "$lt": "az"}}})),
            &idx,
        )
        .unwrap();
        assert_eq!(
            (p.id_lo.as_deref(), p.id_hi.as_deref()),
            (Some("a"), Some("az"))
        );
        let p = plan(
            &req(json!({"selector": {"_id": {"$gt": "b", "$lt": "a"}}})),
            &idx,
        )
        .unwrap();
        assert!(p.empty);
        let p = plan(&req(json!({"selector": {"$or": []}})), &idx).unwrap();
        assert!(p.empty);
    }
}
