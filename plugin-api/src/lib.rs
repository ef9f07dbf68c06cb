//! Guest SDK for thali WebAssembly plugins, ABI v1 (the contract is in this crate's README).
//!
//! A plugin is a `cdylib` built for `wasm32-unknown-unknown`:
//!
//! ```ignore
//! use thali_plugin_api::{abi, filter, validate_doc_update, Reject, Value};
//! abi!();
//! validate_doc_update!(validate, |new, _old, _user, _sec| {
//!     if new.get("type").is_none() { return Err(Reject::Forbidden("type is required".into())); }
//!     Ok(())
//! });
//! filter!(by_type, |doc, req| doc["type"] == req["query"]["type"]);
//! ```
//!
//! Memory handed out by `alloc` and the output buffers are never freed: the host recycles an
//! instance once its memory passes 8 MiB, and after any trap.

pub use serde_json::{self, json, Value};

/// The ABI this SDK speaks; `thali_abi_version` returns it.
pub const ABI_VERSION: i32 = 1;

/// A validator's refusal: 403 `forbidden` or 401 `unauthorized`, with a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    Forbidden(String),
    Unauthorized(String),
}

impl Reject {
    pub fn to_json(&self) -> Value {
        match self {
            Reject::Forbidden(r) => json!({ "forbidden": r }),
            Reject::Unauthorized(r) => json!({ "unauthorized": r }),
        }
    }
}

/// Reserves `len` bytes of guest memory for the host to write the input into.
pub fn alloc(len: i32) -> i32 {
    let mut v = Vec::<u8>::with_capacity(len.max(0) as usize);
    let p = v.as_mut_ptr();
    std::mem::forget(v);
    p as usize as i32
}

/// The arguments of a call: a JSON array in CouchDB's order; missing ones read as `null`.
pub fn arg(args: &[Value], i: usize) -> &Value {
    args.get(i).unwrap_or(&Value::Null)
}

/// Reads the input the host wrote at `(ptr, len)`, runs `f`, and returns the output packed as
/// `(out_ptr << 32) | out_len`.
///
/// # Safety
/// `(ptr, len)` must be a buffer obtained from [`alloc`] and filled by the host, as the ABI
/// guarantees.
pub unsafe fn call(ptr: i32, len: i32, f: impl FnOnce(&[Value]) -> Value) -> i64 {
    let len = len.max(0) as usize;
    // SAFETY: the host wrote `len` bytes into the buffer `alloc` returned.
    let input = unsafe { std::slice::from_raw_parts(ptr as usize as *const u8, len) };
    let args: Vec<Value> = serde_json::from_slice(input).unwrap_or_default();
    let out = f(&args);
    let bytes = serde_json::to_vec(&out)
        .unwrap_or_else(|_| b"null".to_vec())
        .into_boxed_slice();
    let packed = ((bytes.as_ptr() as usize as u64) << 32) | bytes.len() as u64;
    std::mem::forget(bytes);
    packed as i64
}

/// What a validator closure returns, as the host expects it.
pub fn validate_result(r: Result<(), Reject>) -> Value {
    match r {
        Ok(()) => Value::Null,
        Err(e) => e.to_json(),
    }
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "thali")]
extern "C" {
    #[link_name = "log"]
    fn thali_log(level: i32, ptr: i32, len: i32);
}

/// Logs through the node (level 0 error, 1 warn, 2 info, 3 debug), tagged with the design
/// document's id.
pub fn log(level: i32, msg: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host reads `len` bytes at `ptr` from our memory during the call.
    unsafe {
        thali_log(level, msg.as_ptr() as usize as i32, msg.len() as i32)
    };
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level}] {msg}");
}

/// The exports every plugin needs: `alloc` and `thali_abi_version`. Use once per crate.
#[macro_export]
macro_rules! abi {
    () => {
        #[no_mangle]
        pub extern "C" fn alloc(len: i32) -> i32 {
            $crate::alloc(len)
        }
        #[no_mangle]
        pub extern "C" fn thali_abi_version() -> i32 {
            $crate::ABI_VERSION
        }
    };
}

/// Exports `validate_doc_update(newDoc, oldDoc, userCtx, secObj) -> Result<(), Reject>` under
/// `$name` (the name the design document's `validate_doc_update` field gives).
#[macro_export]
macro_rules! validate_doc_update {
    ($name:ident, $f:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(ptr: i32, len: i32) -> i64 {
            let f: fn(
                &$crate::Value,
                &$crate::Value,
                &$crate::Value,
                &$crate::Value,
            ) -> Result<(), $crate::Reject> = $f;
            // SAFETY: called by the host per the ABI.
            unsafe {
                $crate::call(ptr, len, |a| {
                    $crate::validate_result(f(
                        $crate::arg(a, 0),
                        $crate::arg(a, 1),
                        $crate::arg(a, 2),
                        $crate::arg(a, 3),
                    ))
                })
            }
        }
    };
}

/// Exports a filter `(doc, req) -> bool` under `$name`.
#[macro_export]
macro_rules! filter {
    ($name:ident, $f:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(ptr: i32, len: i32) -> i64 {
            let f: fn(&$crate::Value, &$crate::Value) -> bool = $f;
            // SAFETY: called by the host per the ABI.
            unsafe {
                $crate::call(ptr, len, |a| {
                    $crate::Value::Bool(f($crate::arg(a, 0), $crate::arg(a, 1)))
                })
            }
        }
    };
}

/// What a map function emits: `emit.emit(key, value)`, as CouchDB's `emit(key, value)`.
#[derive(Default)]
pub struct Emit(Vec<Value>);

impl Emit {
    pub fn emit(&mut self, key: impl Into<Value>, value: impl Into<Value>) {
        self.0.push(Value::Array(vec![key.into(), value.into()]));
    }
    pub fn into_value(self) -> Value {
        Value::Array(self.0)
    }
}

/// Exports a view's map function `(doc, &mut Emit)` under `$name`; the host receives the
/// emitted `[[key, value], …]`.
#[macro_export]
macro_rules! map {
    ($name:ident, $f:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(ptr: i32, len: i32) -> i64 {
            let f: fn(&$crate::Value, &mut $crate::Emit) = $f;
            // SAFETY: called by the host per the ABI.
            unsafe {
                $crate::call(ptr, len, |a| {
                    let mut e = $crate::Emit::default();
                    f($crate::arg(a, 0), &mut e);
                    e.into_value()
                })
            }
        }
    };
}

/// Exports a custom reduce `(keys, values, rereduce) -> value` under `$name`. `keys` are
/// `[key, doc id]` pairs on the first pass and `None` on rereduce, when `values` are earlier
/// results of this function.
#[macro_export]
macro_rules! reduce {
    ($name:ident, $f:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(ptr: i32, len: i32) -> i64 {
            let f: fn(Option<&[$crate::Value]>, &[$crate::Value], bool) -> $crate::Value = $f;
            // SAFETY: called by the host per the ABI.
            unsafe {
                $crate::call(ptr, len, |a| {
                    let keys = $crate::arg(a, 0).as_array().map(Vec::as_slice);
                    let values = $crate::arg(a, 1)
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or(&[]);
                    f(
                        keys,
                        values,
                        $crate::arg(a, 2) == &$crate::Value::Bool(true),
                    )
                })
            }
        }
    };
}

/// Exports `resolve_conflict(docs) -> body` under `$name`: `docs` are the conflicting live
/// revisions, winner first; return the merged body (`{"_deleted": true}` deletes), one of the
/// docs as it is, or `Value::Null` to leave the conflict. Must be deterministic: every node
/// runs it on the same conflict and must get the same answer.
#[macro_export]
macro_rules! resolve_conflict {
    ($name:ident, $f:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(ptr: i32, len: i32) -> i64 {
            let f: fn(&[$crate::Value]) -> $crate::Value = $f;
            // SAFETY: called by the host per the ABI.
            unsafe {
                $crate::call(ptr, len, |a| {
                    let docs = $crate::arg(a, 0)
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or(&[]);
                    f(docs)
                })
            }
        }
    };
}

/// Exports any function of the argument array (views, resolvers, …) under `$name`.
#[macro_export]
macro_rules! export {
    ($name:ident, $f:expr) => {
        #[no_mangle]
        pub extern "C" fn $name(ptr: i32, len: i32) -> i64 {
            let f: fn(&[$crate::Value]) -> $crate::Value = $f;
            // SAFETY: called by the host per the ABI.
            unsafe { $crate::call(ptr, len, f) }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_args() {
        assert_eq!(validate_result(Ok(())), Value::Null);
        assert_eq!(
            validate_result(Err(Reject::Forbidden("no".into()))),
            json!({"forbidden": "no"})
        );
        assert_eq!(
            Reject::Unauthorized("who".into()).to_json(),
            json!({"unauthorized": "who"})
        );
        let a = vec![json!(1)];
        assert_eq!(arg(&a, 0), &json!(1));
        assert_eq!(arg(&a, 3), &Value::Null);
    }
}
