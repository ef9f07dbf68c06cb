//! Reduce functions: CouchDB's built-ins (`_count`, `_sum`, `_stats`,
//! `_approx_count_distinct`), the driver for custom ones (first pass over chunks of rows, then
//! rereduce), and CouchDB's `reduce_limit` check on their output.

use md5::{Digest, Md5};
use serde_json::{json, Map, Number, Value};
use thali_doc::collate;
use thali_plugins::{Func, PluginError};

/// Rows handed to one call of a custom reduce; bigger groups are reduced in chunks and the
/// chunks' results rereduced.
const CHUNK: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum ReduceError {
    /// CouchDB's `builtin_reduce_error` (bad input to a built-in).
    #[error("{0}")]
    Builtin(String),
    /// CouchDB's `reduce_overflow_error`.
    #[error("{0}")]
    Overflow(String),
    #[error("{0}")]
    Plugin(String),
}

/// A view's reduce: a built-in or a plugin function.
#[derive(Clone)]
pub enum Reducer {
    Count,
    Sum,
    Stats,
    ApproxCountDistinct,
    Custom(Func),
}

impl Reducer {
    /// The built-in named by `name` (CouchDB matches by prefix, e.g. `_sum` or `_count`).
    pub fn builtin(name: &str) -> Option<Reducer> {
        Some(match name {
            n if n.starts_with("_count") => Reducer::Count,
            n if n.starts_with("_sum") => Reducer::Sum,
            n if n.starts_with("_stats") => Reducer::Stats,
            n if n.starts_with("_approx_count_distinct") => Reducer::ApproxCountDistinct,
            _ => return None,
        })
    }

    /// Reduces one group of rows: `(key, doc id, value)`.
    pub fn reduce(&self, rows: &[(&Value, &str, &Value)]) -> Result<Value, ReduceError> {
        match self {
            Reducer::Count => Ok(json!(rows.len())),
            Reducer::Sum => {
                let mut acc = Value::from(0);
                for (_, _, v) in rows {
                    acc = sum(&acc, v)?;
                }
                Ok(acc)
            }
            Reducer::Stats => {
                let mut acc: Option<Value> = None;
                for (_, _, v) in rows {
                    let s = stats_of(v)?;
                    acc = Some(match acc {
                        None => s,
                        Some(a) => merge_stats(&a, &s)?,
                    });
                }
                Ok(acc.unwrap_or_else(
                    || json!({"sum": 0, "count": 0, "min": 0, "max": 0, "sumsqr": 0}),
                ))
            }
            Reducer::ApproxCountDistinct => {
                let mut h = Hll::new();
                for (k, _, _) in rows {
                    h.add(&collate::encode(k));
                }
                Ok(json!(h.estimate()))
            }
            Reducer::Custom(f) => custom(f, rows),
        }
    }
}

fn custom(f: &Func, rows: &[(&Value, &str, &Value)]) -> Result<Value, ReduceError> {
    let mut partials = Vec::new();
    for chunk in rows.chunks(CHUNK) {
        let keys: Vec<Value> = chunk.iter().map(|(k, id, _)| json!([k, id])).collect();
        let values: Vec<Value> = chunk.iter().map(|(_, _, v)| (*v).clone()).collect();
        let input = serde_json::to_vec(&values).map_or(0, |b| b.len());
        let out = call(
            f,
            &[Value::Array(keys), Value::Array(values), Value::Bool(false)],
        )?;
        check_limit(input, &out)?;
        partials.push(out);
    }
    // A group never has zero rows, but an empty view reduced as a whole does.
    if partials.is_empty() {
        return call(f, &[json!([]), json!([]), Value::Bool(false)]);
    }
    while partials.len() > 1 {
        let mut next = Vec::new();
        for chunk in partials.chunks(CHUNK) {
            let values = Value::Array(chunk.to_vec());
            let input = serde_json::to_vec(&values).map_or(0, |b| b.len());
            let out = call(f, &[Value::Null, values, Value::Bool(true)])?;
            check_limit(input, &out)?;
            next.push(out);
        }
        partials = next;
    }
    Ok(partials.pop().unwrap_or(Value::Null))
}

fn call(f: &Func, args: &[Value]) -> Result<Value, ReduceError> {
    f.call(args).map_err(|e| match e {
        PluginError::Thrown(v) => ReduceError::Plugin(format!("reduce threw {v}")),
        e => ReduceError::Plugin(e.to_string()),
    })
}

/// CouchDB's `reduce_limit`: a reduce whose output is over 4906 bytes and more than half the
/// size of its input does not reduce, and would make the index grow without bound.
pub fn check_limit(input: usize, out: &Value) -> Result<(), ReduceError> {
    let s = out.to_string();
    if s.len() > 4906 && s.len() * 2 > input {
        let head: String = s.chars().take(200).collect();
        return Err(ReduceError::Overflow(format!(
            "Reduce output must shrink more rapidly: input size: {input} output size: {} \
             output: {head}…",
            s.len()
        )));
    }
    Ok(())
}

fn num(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

fn builtin_error(what: &str, v: &Value) -> ReduceError {
    ReduceError::Builtin(format!(
        "The {what} function requires that map values be numbers, arrays of numbers, or \
         objects. Objects cannot be mixed with other data structures. Objects can be \
         arbitrarily nested, provided that the values for all fields are themselves numbers, \
         arrays of numbers, or objects. Got: {}",
        thali_plugins::design::short(v)
    ))
}

/// `_sum`: numbers add, arrays add element-wise (the shorter padded with zeros), objects add
/// member-wise, recursively.
fn sum(a: &Value, b: &Value) -> Result<Value, ReduceError> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) if x.checked_add(y).is_some() => Ok(Value::from(x + y)),
            _ => Ok(num(x.as_f64().unwrap_or(0.0) + y.as_f64().unwrap_or(0.0))),
        },
        (Value::Number(_), Value::Array(arr)) | (Value::Array(arr), Value::Number(_)) => {
            // A number adds to the first element (CouchDB pads the number into an array).
            let n = if a.is_number() { a } else { b };
            let mut out = arr.clone();
            if out.is_empty() {
                out.push(n.clone());
            } else {
                out[0] = sum(&out[0], n)?;
            }
            Ok(Value::Array(out))
        }
        (Value::Array(x), Value::Array(y)) => {
            let len = x.len().max(y.len());
            let zero = Value::from(0);
            let mut out = Vec::with_capacity(len);
            for i in 0..len {
                let (p, q) = (x.get(i).unwrap_or(&zero), y.get(i).unwrap_or(&zero));
                if !p.is_number() || !q.is_number() {
                    return Err(builtin_error("_sum", if p.is_number() { q } else { p }));
                }
                out.push(sum(p, q)?);
            }
            Ok(Value::Array(out))
        }
        (Value::Object(x), Value::Object(y)) => {
            let mut out = x.clone();
            for (k, v) in y {
                let merged = match out.get(k) {
                    Some(e) => sum(e, v)?,
                    None => match v {
                        Value::Number(_) | Value::Array(_) | Value::Object(_) => v.clone(),
                        v => return Err(builtin_error("_sum", v)),
                    },
                };
                out.insert(k.clone(), merged);
            }
            Ok(Value::Object(out))
        }
        (Value::Number(n), Value::Object(o)) | (Value::Object(o), Value::Number(n))
            if n.as_f64() == Some(0.0) =>
        {
            // The starting zero meets the first object.
            sum(&Value::Object(Map::new()), &Value::Object(o.clone()))
        }
        (_, v) => Err(builtin_error("_sum", if a.is_number() { v } else { a })),
    }
}

fn stats_of(v: &Value) -> Result<Value, ReduceError> {
    match v {
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            Ok(json!({"sum": v, "count": 1, "min": v, "max": v, "sumsqr": num(f * f)}))
        }
        Value::Array(a) => a
            .iter()
            .map(stats_of)
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(o)
            if ["sum", "count", "min", "max", "sumsqr"]
                .iter()
                .all(|k| o.get(*k).is_some_and(Value::is_number)) =>
        {
            Ok(v.clone())
        }
        v => Err(ReduceError::Builtin(format!(
            "The _stats function requires that map values be numbers or arrays of numbers, \
             not '{}'",
            thali_plugins::design::short(v)
        ))),
    }
}

fn merge_stats(a: &Value, b: &Value) -> Result<Value, ReduceError> {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .map(|(p, q)| merge_stats(p, q))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        (Value::Object(_), Value::Object(_)) => {
            let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
            let add = |k: &str| sum(&a[k], &b[k]);
            Ok(json!({
                "sum": add("sum")?,
                "count": add("count")?,
                "min": if f(a, "min") <= f(b, "min") { a["min"].clone() } else { b["min"].clone() },
                "max": if f(a, "max") >= f(b, "max") { a["max"].clone() } else { b["max"].clone() },
                "sumsqr": add("sumsqr")?,
            }))
        }
        _ => Err(ReduceError::Builtin(
            "The _stats function requires that map values be numbers or arrays of numbers of \
             the same length"
                .into(),
        )),
    }
}

/// HyperLogLog with 2^11 registers (about 2.3 % standard error, CouchDB's is ~2 %), over the
/// keys' collation bytes, so keys that collate equal count once.
struct Hll {
    regs: Vec<u8>,
}

impl Hll {
    const P: u32 = 11;

    fn new() -> Hll {
        Hll {
            regs: vec![0; 1 << Self::P],
        }
    }

    fn add(&mut self, bytes: &[u8]) {
        let d = Md5::digest(bytes);
        let h = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        let idx = (h >> (64 - Self::P)) as usize;
        let rest = (h << Self::P) | (1 << (Self::P - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if rank > self.regs[idx] {
            self.regs[idx] = rank;
        }
    }

    fn estimate(&self) -> u64 {
        let m = self.regs.len() as f64;
        let z: f64 = self.regs.iter().map(|&r| 2f64.powi(-(r as i32))).sum();
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let e = alpha * m * m / z;
        let zeros = self.regs.iter().filter(|&&r| r == 0).count();
        let e = if e <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            e
        };
        e.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &Reducer, values: &[Value]) -> Result<Value, ReduceError> {
        let k = Value::Null;
        let rows: Vec<(&Value, &str, &Value)> = values.iter().map(|v| (&k, "id", v)).collect();
        r.reduce(&rows)
    }

    #[test]
    fn builtins() {
        assert_eq!(
            run(&Reducer::Count, &[json!(1), json!("x")]).unwrap(),
            json!(2)
        );
        assert_eq!(
            run(&Reducer::Sum, &[json!(1), json!(2.5), json!(3)]).unwrap(),
            json!(6.5)
        );
        assert_eq!(
            run(
                &Reducer::Sum,
                &[json!([1, 2]), json!([10]), json!([0, 0, 5])]
            )
            .unwrap(),
            json!([11, 2, 5])
        );
        assert_eq!(
            run(
                &Reducer::Sum,
                &[json!({"a": 1, "b": {"c": 2}}), json!({"a": 2, "d": [1]})]
            )
            .unwrap(),
            json!({"a": 3, "b": {"c": 2}, "d": [1]})
        );
        assert!(matches!(
            run(&Reducer::Sum, &[json!(1), json!("x")]),
            Err(ReduceError::Builtin(_))
        ));
        assert_eq!(
            run(&Reducer::Stats, &[json!(2), json!(-1), json!(4)]).unwrap(),
            json!({"sum": 5, "count": 3, "min": -1, "max": 4, "sumsqr": 21})
        );
        assert_eq!(
            run(&Reducer::Stats, &[json!([1, 2]), json!([3, 4])]).unwrap(),
            json!([{"sum": 4, "count": 2, "min": 1, "max": 3, "sumsqr": 10},
                   {"sum": 6, "count": 2, "min": 2, "max": 4, "sumsqr": 20}])
        );
        assert!(run(&Reducer::Stats, &[json!("x")]).is_err());
    }

    #[test]
    fn approx_count_distinct_is_close() {
        let keys: Vec<Value> = (0..20_000)
            .map(|i| json!(format!("k{}", i % 5000)))
            .collect();
        let v = Value::Null;
        let rows: Vec<(&Value, &str, &Value)> = keys.iter().map(|k| (k, "id", &v)).collect();
        let n = Reducer::ApproxCountDistinct
            .reduce(&rows)
            .unwrap()
            .as_u64()
            .unwrap();
        assert!((4750..=5250).contains(&n), "{n}");
        let small: Vec<Value> = (0..10).map(|i| json!(i)).collect();
        let rows: Vec<(&Value, &str, &Value)> = small.iter().map(|k| (k, "id", &v)).collect();
        assert_eq!(
            Reducer::ApproxCountDistinct.reduce(&rows).unwrap(),
            json!(10)
        );
    }

    #[test]
    fn reduce_limit() {
        let big = Value::String("x".repeat(10_000));
        assert!(matches!(
            check_limit(12_000, &big),
            Err(ReduceError::Overflow(_))
        ));
        assert!(check_limit(100_000, &big).is_ok());
        assert!(check_limit(10, &json!(1)).is_ok());
    }
}
