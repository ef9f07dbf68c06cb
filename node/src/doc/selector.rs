//! Mango selectors (`{"field": {"$op": value}}`), as `_changes?filter=_selector` and the
//! replicator's `selector` option use them. Pure matching on JSON.
//!
//! Values compare in CouchDB's collation order of types (null < false < true < numbers <
//! strings < arrays < objects); strings compare by code point, not ICU's UCA (a known
//! difference for non-ASCII text). `$regex` is not supported and is refused when parsing.

use serde_json::{Map, Value};
use std::cmp::Ordering;

#[derive(Clone, Debug)]
pub struct Selector(Value);

fn type_rank(v: &Value) -> u8 {
    match v {
        Value::Null => 0,
        Value::Bool(false) => 1,
        Value::Bool(true) => 2,
        Value::Number(_) => 3,
        Value::String(_) => 4,
        Value::Array(_) => 5,
        Value::Object(_) => 6,
    }
}

/// CouchDB's view collation of JSON values (strings by code point).
pub fn collate(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            x.partial_cmp(&y).unwrap_or(Ordering::Equal)
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                let o = collate(p, q);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Object(x), Value::Object(y)) => {
            for ((kx, vx), (ky, vy)) in x.iter().zip(y) {
                let o = kx.cmp(ky).then_with(|| collate(vx, vy));
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        _ => type_rank(a).cmp(&type_rank(b)),
    }
}

fn field<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = doc;
    for part in path.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

const OPERATORS: [&str; 20] = [
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
];

fn check(sel: &Value) -> Result<(), String> {
    match sel {
        Value::Object(m) => {
            for (k, v) in m {
                if k.starts_with('$') && !OPERATORS.contains(&k.as_str()) {
                    return Err(format!("unsupported selector operator {k}"));
                }
                match k.as_str() {
                    "$and" | "$or" | "$nor" | "$all" | "$in" | "$nin" if !v.is_array() => {
                        return Err(format!("{k} needs an array"))
                    }
                    "$size" if !v.is_u64() => {
                        return Err("$size needs a non-negative integer".into())
                    }
                    "$exists" if !v.is_boolean() => return Err("$exists needs a boolean".into()),
                    "$mod" if !matches!(v.as_array().map(Vec::len), Some(2)) => {
                        return Err("$mod needs [divisor, remainder]".into())
                    }
                    _ => {}
                }
                match v {
                    Value::Array(a) if matches!(k.as_str(), "$and" | "$or" | "$nor") => {
                        a.iter().try_for_each(check)?
                    }
                    Value::Object(_) => check(v)?,
                    _ => {}
                }
            }
            Ok(())
        }
        _ => Err("a selector must be a JSON object".into()),
    }
}

impl Selector {
    pub fn parse(v: &Value) -> Result<Selector, String> {
        check(v)?;
        Ok(Selector(v.clone()))
    }

    pub fn matches(&self, doc: &Value) -> bool {
        // `parse` only accepts objects.
        self.0.as_object().is_some_and(|m| match_object(doc, m))
    }
}

/// A selector object applied at `doc` (the whole document or one field's value).
fn match_object(doc: &Value, sel: &Map<String, Value>) -> bool {
    sel.iter().all(|(k, cond)| match k.as_str() {
        "$and" => cond
            .as_array()
            .is_some_and(|a| a.iter().all(|s| match_cond(Some(doc), s))),
        "$or" => cond
            .as_array()
            .is_some_and(|a| a.iter().any(|s| match_cond(Some(doc), s))),
        "$nor" => cond
            .as_array()
            .is_some_and(|a| !a.iter().any(|s| match_cond(Some(doc), s))),
        "$not" => !match_cond(Some(doc), cond),
        k if k.starts_with('$') => operator(Some(doc), k, cond),
        path => match_cond(field(doc, path), cond),
    })
}

/// `cond` applied to a field value (absent fields are `None`).
fn match_cond(v: Option<&Value>, cond: &Value) -> bool {
    match cond {
        Value::Object(m) if m.keys().any(|k| k.starts_with('$')) => m.iter().all(|(op, arg)| {
            if matches!(op.as_str(), "$and" | "$or" | "$nor" | "$not") {
                match v {
                    Some(v) => match_object(v, &Map::from_iter([(op.clone(), arg.clone())])),
                    None => op == "$nor" || op == "$not",
                }
            } else if op.starts_with('$') {
                operator(v, op, arg)
            } else {
                v.is_some_and(|v| match_cond(field(v, op), arg))
            }
        }),
        Value::Object(m) => match v {
            // A plain object of fields: each applies below this one.
            Some(v) if !m.is_empty() => match_object(v, m),
            Some(v) => v == cond,
            None => false,
        },
        _ => v.is_some_and(|v| collate(v, cond) == Ordering::Equal),
    }
}

fn operator(v: Option<&Value>, op: &str, arg: &Value) -> bool {
    // Ranges compare across types by collation, as CouchDB does (`{"$gt": null}` is "any").
    let cmp = |want: fn(Ordering) -> bool| v.is_some_and(|v| want(collate(v, arg)));
    match op {
        "$eq" => v.is_some_and(|v| collate(v, arg) == Ordering::Equal),
        "$ne" => v.is_none_or(|v| collate(v, arg) != Ordering::Equal),
        "$gt" => cmp(|o| o == Ordering::Greater),
        "$gte" => cmp(|o| o != Ordering::Less),
        "$lt" => cmp(|o| o == Ordering::Less),
        "$lte" => cmp(|o| o != Ordering::Greater),
        "$in" => v.is_some_and(|v| {
            arg.as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    collate(v, x) == Ordering::Equal
                        || v.as_array()
                            .is_some_and(|va| va.iter().any(|e| collate(e, x) == Ordering::Equal))
                })
            })
        }),
        "$nin" => !operator(v, "$in", arg),
        "$exists" => v.is_some() == (arg == &Value::Bool(true)),
        "$type" => v.is_some_and(|v| {
            let t = match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            arg.as_str() == Some(t)
        }),
        "$size" => v
            .and_then(Value::as_array)
            .is_some_and(|a| Some(a.len() as u64) == arg.as_u64()),
        "$mod" => {
            let (Some(n), Some(d), Some(r)) = (
                v.and_then(Value::as_i64),
                arg.get(0).and_then(Value::as_i64),
                arg.get(1).and_then(Value::as_i64),
            ) else {
                return false;
            };
            // `wrapping_rem`: `i64::MIN % -1` overflows (a panic with `%`); its remainder is 0.
            d != 0 && n.wrapping_rem(d) == r
        }
        "$all" => v.and_then(Value::as_array).is_some_and(|a| {
            arg.as_array().is_some_and(|want| {
                want.iter()
                    .all(|w| a.iter().any(|x| collate(x, w) == Ordering::Equal))
            })
        }),
        "$elemMatch" => v
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|e| match_cond(Some(e), arg))),
        "$allMatch" => v
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty() && a.iter().all(|e| match_cond(Some(e), arg))),
        "$keyMapMatch" => v.and_then(Value::as_object).is_some_and(|m| {
            m.keys()
                .any(|k| match_cond(Some(&Value::String(k.clone())), arg))
        }),
        "$not" => !match_cond(v, arg),
        _ => false,
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
        assert!(m(json!({"type": {"$nin": ["c"]}}), d.clone()));
        assert!(m(json!({"missing": {"$exists": false}}), d.clone()));
        assert!(m(json!({"missing": {"$ne": 1}}), d.clone()));
        assert!(m(json!({"n": {"$mod": [2, 1]}}), d.clone()));
        assert!(m(json!({"s": {"$type": "string"}}), d.clone()));
        assert!(m(json!({"$or": [{"type": "z"}, {"n": 5}]}), d.clone()));
        assert!(!m(json!({"$and": [{"type": "a"}, {"n": 6}]}), d.clone()));
        assert!(m(json!({"$nor": [{"type": "z"}]}), d.clone()));
        assert!(m(json!({"n": {"$not": {"$gt": 7}}}), d.clone()));
        assert!(m(json!({}), d));
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        assert!(Selector::parse(&json!({"s": {"$regex": "^h"}})).is_err());
        assert!(Selector::parse(&json!({"$and": {}})).is_err());
        assert!(Selector::parse(&json!([1])).is_err());
        assert!(Selector::parse(&json!({"a": {"$size": -1}})).is_err());
    }

    #[test]
    fn collation_order() {
        let order = [
            json!(null),
            json!(false),
            json!(true),
            json!(1),
            json!("a"),
            json!([1]),
            json!({"a": 1}),
        ];
        for w in order.windows(2) {
            assert_eq!(collate(&w[0], &w[1]), Ordering::Less, "{} < {}", w[0], w[1]);
        }
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

        fn ops() -> Vec<&'static str> {
            let mut v = super::super::OPERATORS.to_vec();
            v.extend(["$regex", "$bogus"]);
            v
        }

        fn selector() -> impl Strategy<Value = Value> {
            let leaf = (
                prop::sample::select(ops()),
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
