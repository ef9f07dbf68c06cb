//! Mango selectors (`{"field": {"$op": value}}`), as `_find`, `_changes?filter=_selector`, the
//! replicator's `selector` option and partial indexes use them. Pure logic on JSON.
//!
//! A selector is parsed into CouchDB's normal form (`mango_selector:normalize`): implicit
//! `$and`s made explicit, field names moved down to the operators (`{"a": {"b": 1}}` is
//! `a.b $eq 1`), negations pushed down to the leaves (`$not $lt` is `$gte`, `$nor` an `$and`
//! of negations). Matching and the query planner (`mango::plan`) work on that form, so both
//! read a selector the same way CouchDB does. Values compare in CouchDB's view collation
//! (`collate::cmp`, strings by the Unicode Collation Algorithm), `_id` by its bytes.
//! `$regex` uses the `regex` crate: matching time is linear in the input.

use super::collate;
use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::fmt;

/// A selector refused when parsing: CouchDB's error name and reason (HTTP 400).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError {
    pub error: &'static str,
    pub reason: String,
}

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

fn bad_arg(op: &str, arg: &Value) -> SelectorError {
    SelectorError {
        error: "bad_arg",
        reason: format!("Bad argument for operator {op}: {arg}"),
    }
}

/// A selector in normal form.
#[derive(Clone, Debug)]
pub enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    /// A condition on the value at a path (the empty path is the value itself, as inside
    /// `$elemMatch`).
    Field(Vec<String>, Op),
}

/// A condition on one value.
#[derive(Clone, Debug)]
pub enum Op {
    Eq(Value),
    Ne(Value),
    Lt(Value),
    Lte(Value),
    Gt(Value),
    Gte(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Exists(bool),
    Type(String),
    Mod(i64, i64),
    Regex(regex::Regex),
    All(Vec<Value>),
    Size(u64),
    BeginsWith(String),
    ElemMatch(Box<Node>),
    AllMatch(Box<Node>),
    KeyMapMatch(Box<Node>),
    /// A negated operator with no opposite (`$not` of `$size`, `$regex`…).
    Not(Box<Op>),
}

#[derive(Clone, Debug)]
pub struct Selector {
    root: Node,
    source: Value,
}

/// Splits a field name on unescaped dots (`a\.b` is the one field `a.b`); `\$` is a `$` that
/// does not start an operator.
pub fn parse_field(name: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some('.' | '$')) => {
                let escaped = chars.next().expect("peeked");
                parts.last_mut().expect("one part").push(escaped);
            }
            '.' => parts.push(String::new()),
            c => parts.last_mut().expect("one part").push(c),
        }
    }
    parts
}

/// The value at `path` in `v`: object members by name, array elements by index.
pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for part in path {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn array<'a>(op: &str, v: &'a Value) -> Result<&'a Vec<Value>, SelectorError> {
    v.as_array().ok_or_else(|| bad_arg(op, v))
}

/// `sel` (any JSON) under `path`, in normal form before negations are pushed down.
fn norm(sel: &Value, path: &[String]) -> Result<Node, SelectorError> {
    let Value::Object(m) = sel else {
        return Ok(Node::Field(path.to_vec(), Op::Eq(sel.clone())));
    };
    if m.is_empty() {
        return Ok(if path.is_empty() {
            Node::And(vec![])
        } else {
            Node::Field(path.to_vec(), Op::Eq(sel.clone()))
        });
    }
    if m.len() > 1 {
        return m
            .iter()
            .map(|(k, v)| norm_member(k, v, path))
            .collect::<Result<_, _>>()
            .map(Node::And);
    }
    let (k, v) = m.iter().next().expect("one member");
    norm_member(k, v, path)
}

fn norm_member(k: &str, v: &Value, path: &[String]) -> Result<Node, SelectorError> {
    let each = |op: &str| -> Result<Vec<Node>, SelectorError> {
        array(op, v)?.iter().map(|s| norm(s, path)).collect()
    };
    let sub = |op: &str| -> Result<Box<Node>, SelectorError> {
        match v {
            Value::Object(_) => Ok(Box::new(norm(v, &[])?)),
            _ => Err(bad_arg(op, v)),
        }
    };
    let leaf = |op: Op| Ok(Node::Field(path.to_vec(), op));
    match k {
        "$and" => Ok(Node::And(each(k)?)),
        "$or" => Ok(Node::Or(each(k)?)),
        "$nor" => Ok(Node::Not(Box::new(Node::Or(each(k)?)))),
        "$not" => match v {
            Value::Object(_) => Ok(Node::Not(Box::new(norm(v, path)?))),
            _ => Err(bad_arg(k, v)),
        },
        "$elemMatch" => leaf(Op::ElemMatch(sub(k)?)),
        "$allMatch" => leaf(Op::AllMatch(sub(k)?)),
        "$keyMapMatch" => leaf(Op::KeyMapMatch(sub(k)?)),
        "$eq" => leaf(Op::Eq(v.clone())),
        "$ne" => leaf(Op::Ne(v.clone())),
        "$lt" => leaf(Op::Lt(v.clone())),
        "$lte" => leaf(Op::Lte(v.clone())),
        "$gt" => leaf(Op::Gt(v.clone())),
        "$gte" => leaf(Op::Gte(v.clone())),
        "$in" => leaf(Op::In(array(k, v)?.clone())),
        "$nin" => leaf(Op::Nin(array(k, v)?.clone())),
        "$all" => leaf(Op::All(array(k, v)?.clone())),
        "$exists" => leaf(Op::Exists(v.as_bool().ok_or_else(|| bad_arg(k, v))?)),
        "$type" => leaf(Op::Type(
            v.as_str().ok_or_else(|| bad_arg(k, v))?.to_string(),
        )),
        "$size" => leaf(Op::Size(v.as_u64().ok_or_else(|| bad_arg(k, v))?)),
        "$mod" => match v.as_array().map(Vec::as_slice) {
            Some([d, r]) => match (d.as_i64(), r.as_i64()) {
                (Some(d), Some(r)) if d != 0 => leaf(Op::Mod(d, r)),
                _ => Err(bad_arg(k, v)),
            },
            _ => Err(bad_arg(k, v)),
        },
        "$regex" => {
            let re = v.as_str().ok_or_else(|| bad_arg(k, v))?;
            let re = regex::RegexBuilder::new(re)
                .size_limit(1 << 20)
                .build()
                .map_err(|_| bad_arg(k, v))?;
            leaf(Op::Regex(re))
        }
        "$beginsWith" => leaf(Op::BeginsWith(
            v.as_str().ok_or_else(|| bad_arg(k, v))?.to_string(),
        )),
        "$where" | "$geoWithin" | "$geoIntersects" | "$near" | "$nearSphere" | "$text" => {
            Err(SelectorError {
                error: "not_supported",
                reason: format!("Unsupported operator: {k}"),
            })
        }
        op if op.starts_with('$') => Err(SelectorError {
            error: "invalid_operator",
            reason: format!("Invalid operator: {op}"),
        }),
        field => {
            let mut p = path.to_vec();
            p.extend(parse_field(field));
            norm(v, &p)
        }
    }
}

/// Pushes `Not` down to the leaves.
fn push_not(n: Node) -> Node {
    match n {
        Node::Not(inner) => negate(*inner),
        Node::And(v) => Node::And(v.into_iter().map(push_not).collect()),
        Node::Or(v) => Node::Or(v.into_iter().map(push_not).collect()),
        Node::Field(p, op) => Node::Field(p, push_not_op(op)),
    }
}

fn push_not_op(op: Op) -> Op {
    match op {
        Op::ElemMatch(n) => Op::ElemMatch(Box::new(push_not(*n))),
        Op::AllMatch(n) => Op::AllMatch(Box::new(push_not(*n))),
        Op::KeyMapMatch(n) => Op::KeyMapMatch(Box::new(push_not(*n))),
        op => op,
    }
}

fn negate(n: Node) -> Node {
    match n {
        Node::Not(inner) => push_not(*inner),
        Node::And(v) => Node::Or(v.into_iter().map(negate).collect()),
        Node::Or(v) => Node::And(v.into_iter().map(negate).collect()),
        Node::Field(p, op) => Node::Field(
            p,
            match op {
                Op::Lt(a) => Op::Gte(a),
                Op::Lte(a) => Op::Gt(a),
                Op::Eq(a) => Op::Ne(a),
                Op::Ne(a) => Op::Eq(a),
                Op::Gte(a) => Op::Lt(a),
                Op::Gt(a) => Op::Lte(a),
                Op::In(a) => Op::Nin(a),
                Op::Nin(a) => Op::In(a),
                Op::Exists(b) => Op::Exists(!b),
                op => Op::Not(Box::new(push_not_op(op))),
            },
        ),
    }
}

impl Selector {
    pub fn parse(v: &Value) -> Result<Selector, SelectorError> {
        if !v.is_object() {
            return Err(SelectorError {
                error: "invalid_selector_json",
                reason: format!("Selector must be a JSON object, not: {v}"),
            });
        }
        within_limits(v)?;
        let root = push_not(norm(v, &[])?);
        if matches!(&root, Node::Field(p, _) if p.is_empty()) {
            return Err(SelectorError {
                error: "invalid_selector",
                reason: "One or more conditions is missing a field name.".into(),
            });
        }
        Ok(Selector {
            root,
            source: v.clone(),
        })
    }

    /// The selector as it was given.
    pub fn json(&self) -> &Value {
        &self.source
    }

    pub fn root(&self) -> &Node {
        &self.root
    }

    /// Matches everything (`{}`).
    pub fn is_empty(&self) -> bool {
        matches!(&self.root, Node::And(v) if v.is_empty())
    }

    pub fn matches(&self, doc: &Value) -> bool {
        match_node(&self.root, doc)
    }

    /// The top-level conjuncts: the selector itself, or the members of its `$and` (nested
    /// `$and`s flattened).
    pub fn conjuncts(&self) -> Vec<&Node> {
        fn flat<'a>(n: &'a Node, out: &mut Vec<&'a Node>) {
            match n {
                Node::And(v) => v.iter().for_each(|c| flat(c, out)),
                n => out.push(n),
            }
        }
        let mut out = Vec::new();
        flat(&self.root, &mut out);
        out
    }

    /// CouchDB's `has_required_fields`: every field in `fields` must exist in any document
    /// this selector matches (seen through `$and`, and `$or` when every branch requires it).
    /// Linear in the selector's size plus `fields`: the fields the selector guarantees are
    /// gathered once (a union over `$and`, an intersection over `$or`'s branches).
    pub fn requires(&self, fields: &[Vec<String>]) -> bool {
        if self.is_empty() {
            return fields.is_empty();
        }
        let sure = guaranteed(&self.root);
        fields.iter().all(|f| sure.contains(f.as_slice()))
    }

    /// CouchDB's `is_constant_field`: a top-level conjunct fixes `field` with `$eq`.
    pub fn is_constant(&self, field: &[String]) -> bool {
        self.conjuncts()
            .iter()
            .any(|c| matches!(c, Node::Field(p, Op::Eq(_)) if p == field))
    }
}

/// Deepest nesting of a selector's JSON, and most values in it (operators, fields, operands
/// together): a selector is a query, not a data set, and planning and matching cost grows with it.
pub const MAX_DEPTH: usize = 64;
pub const MAX_NODES: usize = 50_000;

fn within_limits(v: &Value) -> Result<(), SelectorError> {
    let too = |reason: String| SelectorError {
        error: "invalid_selector",
        reason,
    };
    let mut nodes = 0usize;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(too(format!(
                "the selector holds more than {MAX_NODES} values"
            )));
        }
        if depth > MAX_DEPTH {
            return Err(too(format!(
                "the selector nests deeper than {MAX_DEPTH} levels"
            )));
        }
        match v {
            Value::Object(m) => stack.extend(m.values().map(|c| (c, depth + 1))),
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// The fields that exist in every document `n` matches.
fn guaranteed(n: &Node) -> std::collections::HashSet<&[String]> {
    use std::collections::HashSet;
    match n {
        Node::And(v) => {
            let mut out = HashSet::new();
            for c in v {
                out.extend(guaranteed(c));
            }
            out
        }
        Node::Or(v) if !v.is_empty() => {
            let mut branches = v.iter();
            let mut out = branches.next().map(guaranteed).unwrap_or_default();
            for c in branches {
                if out.is_empty() {
                    break;
                }
                let other = guaranteed(c);
                out.retain(|f| other.contains(f));
            }
            out
        }
        Node::Field(_, Op::Exists(false)) => HashSet::new(),
        Node::Field(p, _) => HashSet::from([p.as_slice()]),
        _ => HashSet::new(),
    }
}

fn match_node(n: &Node, v: &Value) -> bool {
    match n {
        Node::And(c) => c.iter().all(|c| match_node(c, v)),
        // CouchDB: an empty `$or` matches everything.
        Node::Or(c) => c.is_empty() || c.iter().any(|c| match_node(c, v)),
        Node::Not(c) => !match_node(c, v),
        Node::Field(path, op) => match get_path(v, path) {
            None => matches!(op, Op::Exists(false)),
            Some(x) => {
                let raw = path.len() == 1 && path[0] == "_id";
                match_op(op, x, raw)
            }
        },
    }
}

fn match_op(op: &Op, v: &Value, raw: bool) -> bool {
    let cmp = |a: &Value| -> Ordering {
        match (raw, v, a) {
            // `_id` compares as CouchDB's `_all_docs` orders it: strings by their bytes, and
            // above every other type (Erlang's term order, which CouchDB uses there).
            (true, Value::String(x), Value::String(y)) => x.as_str().cmp(y.as_str()),
            (true, Value::String(_), _) => Ordering::Greater,
            _ => collate::cmp(v, a),
        }
    };
    match op {
        Op::Eq(a) => cmp(a).is_eq(),
        Op::Ne(a) => cmp(a).is_ne(),
        Op::Lt(a) => cmp(a).is_lt(),
        Op::Lte(a) => cmp(a).is_le(),
        Op::Gt(a) => cmp(a).is_gt(),
        Op::Gte(a) => cmp(a).is_ge(),
        Op::In(args) => match v {
            Value::Array(vs) => args
                .iter()
                .any(|a| vs.iter().any(|x| collate::cmp(x, a).is_eq())),
            _ => args.iter().any(|a| cmp(a).is_eq()),
        },
        Op::Nin(args) => !match_op(&Op::In(args.clone()), v, raw),
        Op::Exists(b) => *b,
        Op::Type(t) => {
            let name = match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            name == t
        }
        // `wrapping_rem`: `i64::MIN % -1` overflows (a panic with `%`); its remainder is 0.
        Op::Mod(d, r) => v.as_i64().is_some_and(|n| n.wrapping_rem(*d) == *r),
        Op::Regex(re) => v.as_str().is_some_and(|s| re.is_match(s)),
        Op::All(args) => match v {
            Value::Array(vs) if !args.is_empty() => {
                args.iter().all(|a| vs.contains(a))
                    || matches!(args.as_slice(), [Value::Array(only)] if only == vs)
            }
            _ => false,
        },
        Op::Size(n) => v.as_array().is_some_and(|a| a.len() as u64 == *n),
        Op::BeginsWith(p) => v.as_str().is_some_and(|s| s.starts_with(p.as_str())),
        Op::ElemMatch(n) => v
            .as_array()
            .is_some_and(|a| a.iter().any(|e| match_node(n, e))),
        Op::AllMatch(n) => v
            .as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|e| match_node(n, e))),
        Op::KeyMapMatch(n) => v.as_object().is_some_and(|m: &Map<String, Value>| {
            m.keys().any(|k| match_node(n, &Value::String(k.clone())))
        }),
        Op::Not(op) => !match_op(op, v, raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(sel: Value, doc: Value) -> bool {
        Selector::parse(&sel).unwrap().matches(&doc)
    }

    #[test]
    fn operators() {
        let d = json!({"type": "a", "n": 5, "tags": ["x", "y"], "sub": {"k": true}, "s": "hello"});
        assert!(m(json!({"type": "a"}), d.clone()));
        assert!(!m(json!({"type": "b"}), d.clone()));
        assert!(m(json!({"n": {"$gt": 4, "$lte": 5}}), d.clone()));
        assert!(
            !m(json!({"n": {"$gt": "4"}}), d.clone()),
            "numbers sort before strings"
        );
        assert!(m(json!({"n": {"$gt": null}}), d.clone()));
        assert!(m(json!({"sub.k": true}), d.clone()));
        assert!(m(json!({"sub": {"k": {"$eq": true}}}), d.clone()));
        assert!(m(json!({"tags": {"$all": ["y"]}}), d.clone()));
        assert!(m(json!({"tags": {"$elemMatch": {"$eq": "x"}}}), d.clone()));
        assert!(m(json!({"tags": {"$size": 2}}), d.clone()));
        assert!(m(json!({"type": {"$in": ["a", "b"]}}), d.clone()));
        assert!(m(json!({"tags": {"$in": ["y", "z"]}}), d.clone()));
        assert!(m(json!({"type": {"$nin": ["c"]}}), d.clone()));
        assert!(m(json!({"missing": {"$exists": false}}), d.clone()));
        assert!(
            !m(json!({"missing": {"$ne": 1}}), d.clone()),
            "absent: no match"
        );
        assert!(m(json!({"n": {"$mod": [2, 1]}}), d.clone()));
        assert!(m(json!({"s": {"$type": "string"}}), d.clone()));
        assert!(m(json!({"s": {"$regex": "^h.l+o$"}}), d.clone()));
        assert!(!m(json!({"n": {"$regex": "5"}}), d.clone()));
        assert!(m(json!({"s": {"$beginsWith": "he"}}), d.clone()));
        assert!(m(json!({"$or": [{"type": "z"}, {"n": 5}]}), d.clone()));
        assert!(!m(json!({"$and": [{"type": "a"}, {"n": 6}]}), d.clone()));
        assert!(m(json!({"$nor": [{"type": "z"}]}), d.clone()));
        assert!(m(json!({"n": {"$not": {"$gt": 7}}}), d.clone()));
        assert!(m(json!({"sub": {"$keyMapMatch": {"$eq": "k"}}}), d.clone()));
        assert!(m(
            json!({"tags": {"$allMatch": {"$type": "string"}}}),
            d.clone()
        ));
        assert!(m(json!({"tags.1": "y"}), d.clone()));
        assert!(m(json!({}), d));
    }

    #[test]
    fn couchdb_edge_cases() {
        // `$eq` compares whole values: an array does not equal one of its elements.
        assert!(!m(json!({"a": 1}), json!({"a": [1]})));
        assert!(m(json!({"a": [1]}), json!({"a": [1]})));
        // An inner empty object matches only an empty object.
        assert!(m(json!({"x": {}}), json!({"x": {}})));
        assert!(!m(json!({"x": {}}), json!({"x": {"a": 1}})));
        // `$all: [[..]]` matches the array itself.
        assert!(m(json!({"a": {"$all": [[1, 2]]}}), json!({"a": [1, 2]})));
        assert!(!m(json!({"a": {"$all": []}}), json!({"a": [1]})));
        // `$or: []` matches everything, so does `$not` of `$and: []`.
        assert!(m(json!({"$or": []}), json!({})));
        assert!(m(json!({"x": {"$not": {"$and": []}}}), json!({})));
        // A negated condition still needs the field.
        assert!(!m(json!({"x": {"$not": {"$eq": 0}}}), json!({})));
        assert!(m(
            json!({"x": {"$not": {"$exists": true, "$eq": 0}}}),
            json!({})
        ));
        // Strings collate by UCA: "a" < "B".
        assert!(m(json!({"s": {"$gt": "a"}}), json!({"s": "B"})));
        // `_id` compares by bytes.
        assert!(!m(json!({"_id": {"$gt": "a"}}), json!({"_id": "B"})));
        // Escaped dots name one field.
        assert!(m(json!({"a\\.b": 1}), json!({"a.b": 1})));
    }

    #[test]
    fn errors_have_couchdb_names() {
        let e = |v: Value| Selector::parse(&v).unwrap_err().error;
        assert_eq!(e(json!({"s": {"$bogus": 1}})), "invalid_operator");
        assert_eq!(e(json!({"s": {"$where": "x"}})), "not_supported");
        assert_eq!(e(json!({"$and": {}})), "bad_arg");
        assert_eq!(e(json!({"a": {"$size": -1}})), "bad_arg");
        assert_eq!(e(json!({"a": {"$regex": "("}})), "bad_arg");
        assert_eq!(e(json!({"a": {"$mod": [0, 1]}})), "bad_arg");
        assert_eq!(e(json!({"$eq": 1})), "invalid_selector");
        assert_eq!(e(json!([1])), "invalid_selector_json");
    }

    #[test]
    fn required_and_constant_fields() {
        let f = |s: &str| parse_field(s);
        let s = Selector::parse(&json!({"a": 1, "$or": [{"b": 1}, {"b": 2}], "c": {"$gt": 1}}))
            .unwrap();
        assert!(s.requires(&[f("a"), f("b"), f("c")]));
        assert!(!s.requires(&[f("d")]));
        assert!(s.is_constant(&f("a")));
        assert!(!s.is_constant(&f("c")));
        let s = Selector::parse(&json!({"a": {"$exists": false}})).unwrap();
        assert!(!s.requires(&[f("a")]));
        let s = Selector::parse(&json!({"$or": [{"a": 1}, {"b": 1}]})).unwrap();
        assert!(!s.requires(&[f("a")]));
    }

    #[test]
    fn a_catastrophic_regex_runs_in_linear_time() {
        let s = Selector::parse(&json!({"s": {"$regex": "^(a+)+$"}})).unwrap();
        let long = "a".repeat(100_000) + "b";
        assert!(!s.matches(&json!({ "s": long })));
    }

    mod random {
        use super::super::Selector;
        use proptest::prelude::*;
        use serde_json::{json, Value};

        fn number() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(json!(i64::MIN)),
                Just(json!(i64::MAX)),
                Just(json!(u64::MAX)),
                Just(json!(-1)),
                Just(json!(0)),
                any::<i64>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|f| json!(f)),
            ]
        }

        fn scalar() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                number(),
                "[a-c.$]{0,4}".prop_map(Value::String),
            ]
        }

        fn json_value() -> impl Strategy<Value = Value> {
            scalar().prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        const OPS: [&str; 24] = [
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
            "$all",
            "$elemMatch",
            "$allMatch",
            "$and",
            "$or",
            "$nor",
            "$not",
            "$keyMapMatch",
            "$regex",
            "$beginsWith",
            "$bogus",
            "$where",
        ];

        fn selector() -> impl Strategy<Value = Value> {
            let leaf = (
                prop::sample::select(&OPS[..]),
                json_value(),
                "[a-c]{1,2}(\\.[a-c0-9])?",
            )
                .prop_map(|(op, arg, field)| {
                    let arg = if op == "$mod" {
                        json!([arg.clone(), arg])
                    } else {
                        arg
                    };
                    json!({ field: { op: arg } })
                });
            leaf.prop_recursive(3, 16, 3, |inner| {
                (
                    prop::sample::select(&["$and", "$or", "$nor"][..]),
                    prop::collection::vec(inner.clone(), 1..3),
                )
                    .prop_map(|(op, subs)| json!({ op: subs }))
            })
        }

        proptest! {
            /// No selector and document, however odd, panics `matches`.
            #[test]
            fn matching_never_panics(sel in selector(), doc in json_value(), n in number()) {
                if let Ok(s) = Selector::parse(&sel) {
                    let _ = s.matches(&doc);
                    let _ = s.matches(&json!({"a": n, "b": [n], "c": {"a": n}}));
                }
            }
        }

        #[test]
        fn mod_of_the_smallest_integer_by_minus_one() {
            let s = Selector::parse(&json!({"n": {"$mod": [-1, 0]}})).unwrap();
            assert!(s.matches(&json!({ "n": i64::MIN })));
        }
    }
}
