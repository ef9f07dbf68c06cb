//! JavaScript design documents (QuickJS through rquickjs), as CouchDB apps write them. One
//! QuickJS runtime per design document, holding all its functions, kept warm between calls;
//! calls to it are serialised.
//!
//! The sandbox: QuickJS without its `std`/`os` modules has no I/O at all; `eval` and `Function`
//! stay inside the same runtime. Each call gets a CPU budget and a wall-clock deadline
//! (QuickJS's interrupt handler, called every few thousand operations), the runtime a memory
//! limit and a stack limit. A call that hits a limit fails alone, and the runtime is rebuilt
//! before the next call, so whatever it left in globals goes with it.
//!
//! Values cross as JSON text (QuickJS's own `JSON.parse`/`stringify`), which gives CouchDB's
//! semantics for free: numbers are doubles, `undefined` in an emitted row is `null`.
//! CouchDB's helpers are there: `emit`, `log`, `sum`, `isArray`, `toJSON`, `require` (views:
//! the modules under `views.lib`; other functions: the whole design document).

use super::design::{DesignFns, Reduce, Source, ViewFns};
use super::{Func, Limits, PluginError, PluginFn};
use rquickjs::{CatchResultExt, CaughtError, Context, Function, Runtime};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use thali_sys::sync::lock;

/// QuickJS calls the interrupt handler about every this many operations (its
/// `JS_INTERRUPT_COUNTER_INIT`); each call is charged that much CPU.
const OPS_PER_INTERRUPT: u64 = 10_000;

/// The stack a call may use: deep recursion ends in a `RangeError`, not a crash of the thread.
const MAX_STACK: usize = 512 << 10;

/// Helpers every function sees, and the wrappers calls go through.
const PRELUDE: &str = r#"
(function (g) {
  "use strict";
  var hostLog = g.__thali_log;
  delete g.__thali_log;
  var stringify = JSON.stringify, parse = JSON.parse;
  g.log = function (m) { hostLog(typeof m === "string" ? m : stringify(m)); };
  g.toJSON = function (v) { return stringify(v); };
  g.isArray = function (v) { return Array.isArray(v); };
  g.sum = function (values) {
    var s = 0;
    for (var i = 0; i < values.length; i++) s += values[i];
    return s;
  };
  g.emit = function () { throw new Error("emit() is only available in a map function"); };
  var noEmit = g.emit;

  // CommonJS modules of `root` (an object of source strings), resolved by path from the root
  // or relative to the requiring module; each module runs once per runtime.
  function makeRequire(root) {
    var cache = {};
    function resolve(base, name) {
      if (typeof name !== "string") throw new Error("require() needs a module path");
      var parts = name.split("/");
      var path = parts[0] === "." || parts[0] === ".." ? base.slice() : [];
      for (var i = 0; i < parts.length; i++) {
        var p = parts[i];
        if (p === "..") {
          if (path.length === 0) throw new Error("require(" + stringify(name) + "): path leaves the design document");
          path.pop();
        } else if (p !== "." && p !== "") {
          path.push(p);
        }
      }
      return path;
    }
    function requireFrom(base) {
      return function (name) {
        var path = resolve(base, name);
        var key = path.join("/");
        if (Object.prototype.hasOwnProperty.call(cache, key)) return cache[key].exports;
        var code = root;
        for (var i = 0; i < path.length; i++) {
          if (code === null || typeof code !== "object" || !Object.prototype.hasOwnProperty.call(code, path[i]))
            throw { error: "invalid_require_path", reason: "Object has no property " + stringify(path[i]) + ": " + key };
          code = code[path[i]];
        }
        if (typeof code !== "string")
          throw { error: "invalid_require_path", reason: "Not a module (a string of code): " + key };
        var module = { id: key, exports: {} };
        cache[key] = module;
        var f = (0, eval)("(function (module, exports, require) {" + code + "\n})");
        f.call(module.exports, module, module.exports, requireFrom(path.slice(0, -1)));
        return module.exports;
      };
    }
    return requireFrom([]);
  }

  var fns = [];
  var wrappers = {};

  // Compiles a function from its source, with `require` over `root` in scope, and keeps it
  // under the next slot with the wrapper of its kind.
  function compile(code, root, kind) {
    var require = makeRequire(root);
    // CouchDB accepts a trailing `;` after the function expression.
    code = code.replace(/[\s;]+$/, "");
    var f = (0, eval)("(function (require) { return (" + code + "\n); })")(require);
    if (typeof f !== "function") throw new Error("the code does not evaluate to a function");
    fns.push([wrappers[kind], f]);
    return fns.length - 1;
  }
  function invoke(slot, args) {
    var e = fns[slot];
    return e[0](e[1], args);
  }
  Object.defineProperty(g, "__thali_compile", { value: compile });
  Object.defineProperty(g, "__thali_invoke", { value: invoke });

  function isVerdict(e) {
    return e !== null && typeof e === "object" && !(e instanceof Error);
  }
  function answer(ok, v) {
    return stringify([ok, v === undefined ? null : v]);
  }

  // Calls answer `[true, result]`, or `[false, thrown]` for a thrown plain object (a
  // validator's `{forbidden: …}`); a thrown Error or string stays an error.
  wrappers.call = function (f, args) {
    try {
      return answer(true, f.apply(null, parse(args)));
    } catch (e) {
      if (isVerdict(e)) return answer(false, e);
      throw e;
    }
  };
  // CouchDB's reduce: an error is logged and the reduction is null.
  wrappers.reduce = function (f, args) {
    try {
      return answer(true, f.apply(null, parse(args)));
    } catch (e) {
      hostLog("reduce function failed, its value is null: " + (e instanceof Error ? e.name + ": " + e.message : stringify(e)));
      return answer(true, null);
    }
  };
  wrappers.filter = function (f, args) {
    try {
      return answer(true, !!f.apply(null, parse(args)));
    } catch (e) {
      if (isVerdict(e)) return answer(false, e);
      throw e;
    }
  };
  wrappers.map = function (f, args) {
    var out = [];
    g.emit = function (k, v) { out.push([k === undefined ? null : k, v === undefined ? null : v]); };
    try {
      f(parse(args)[0]);
    } catch (e) {
      if (isVerdict(e)) return answer(false, e);
      throw e;
    } finally {
      g.emit = noEmit;
    }
    return answer(true, out);
  };
})(globalThis);
"#;

/// How a function's result is read.
#[derive(Clone, Copy)]
enum Kind {
    Call,
    Filter,
    Map,
    Reduce,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Call => "call",
            Kind::Filter => "filter",
            Kind::Map => "map",
            Kind::Reduce => "reduce",
        }
    }
}

/// One function of the design document: where it comes from and how to compile it.
struct Def {
    field: String,
    code: String,
    kind: Kind,
    /// What `require` sees: `views.lib` for views, the whole design document otherwise.
    views_only: bool,
}

struct Budget {
    interrupts: u64,
    max_interrupts: u64,
    deadline: Instant,
    /// Which limit stopped the call, if one did.
    hit: Option<String>,
}

/// A live runtime with every function compiled (in slots numbered as `State::defs`).
struct Live {
    // Field order is drop order: the context goes before its runtime.
    ctx: Context,
    _rt: Runtime,
}

struct State {
    id: String,
    defs: Vec<Def>,
    /// The design document's fields, for `require` (JSON text).
    root: String,
    views_root: String,
    limits: Limits,
    budget: Arc<Mutex<Budget>>,
    /// `None` after a call hit a limit: rebuilt before the next one.
    live: Mutex<Option<Live>>,
}

/// A QuickJS error or thrown value as one line.
fn describe(e: &CaughtError<'_>) -> String {
    let s = match e {
        CaughtError::Exception(ex) => {
            let msg = ex.message().unwrap_or_default();
            let name = ex
                .get::<_, String>("name")
                .unwrap_or_else(|_| "Error".to_string());
            format!("{name}: {msg}")
        }
        other => other.to_string(),
    };
    s.lines().next().unwrap_or("").to_string()
}

impl State {
    fn budget(&self) -> MutexGuard<'_, Budget> {
        lock(&self.budget)
    }

    fn reset_budget(&self) {
        let mut b = self.budget();
        b.interrupts = 0;
        b.deadline = Instant::now() + self.limits.timeout;
        b.hit = None;
    }

    /// A fresh runtime with the prelude and every function compiled.
    fn start(&self) -> Result<Live, PluginError> {
        let id = &self.id;
        let err = |e: rquickjs::Error| {
            PluginError::Compile(format!("{id}: cannot start JavaScript: {e}"))
        };
        let rt = Runtime::new().map_err(err)?;
        rt.set_memory_limit(self.limits.memory);
        rt.set_max_stack_size(MAX_STACK);
        let b = self.budget.clone();
        let timeout = self.limits.timeout;
        let cpu = self.limits.cpu;
        rt.set_interrupt_handler(Some(Box::new(move || {
            let mut b = lock(&b);
            b.interrupts += 1;
            if b.interrupts > b.max_interrupts {
                b.hit = Some(format!("CPU limit exceeded ({cpu} operations)"));
            } else if Instant::now() > b.deadline {
                b.hit = Some(format!("time limit exceeded ({timeout:?})"));
            }
            b.hit.is_some()
        })));
        let ctx = Context::full(&rt).map_err(err)?;
        self.reset_budget();
        ctx.with(|ctx| -> Result<(), PluginError> {
            let fail = |what: &str, e: CaughtError<'_>| {
                PluginError::Compile(format!("{id}: {what}: {}", describe(&e)))
            };
            let ddoc = id.clone();
            let log = Function::new(ctx.clone(), move |msg: String| {
                tracing::info!(ddoc = %ddoc, "{msg}");
            })
            .catch(&ctx)
            .map_err(|e| fail("log", e))?;
            ctx.globals()
                .set("__thali_log", log)
                .catch(&ctx)
                .map_err(|e| fail("log", e))?;
            ctx.eval::<(), _>(PRELUDE)
                .catch(&ctx)
                .map_err(|e| fail("prelude", e))?;
            let compile: Function = ctx
                .globals()
                .get("__thali_compile")
                .catch(&ctx)
                .map_err(|e| fail("prelude", e))?;
            let parse = |json: &str| ctx.json_parse(json.to_string()).catch(&ctx);
            let root = parse(&self.root).map_err(|e| fail("design document", e))?;
            let views_root = parse(&self.views_root).map_err(|e| fail("views.lib", e))?;
            for (i, d) in self.defs.iter().enumerate() {
                let r = if d.views_only { &views_root } else { &root };
                let slot: usize = compile
                    .call((d.code.as_str(), r.clone(), d.kind.name()))
                    .catch(&ctx)
                    .map_err(|e| fail(&d.field, e))?;
                if slot != i {
                    return Err(PluginError::Compile(format!(
                        "{id}: function slots out of step"
                    )));
                }
            }
            Ok(())
        })?;
        Ok(Live { ctx, _rt: rt })
    }

    fn call(&self, slot: usize, args: &[Value]) -> Result<Value, PluginError> {
        let field = &self.defs[slot].field;
        let fail = |m: String| {
            tracing::warn!(ddoc = %self.id, function = %field, error = %m, "plugin call failed");
            thali_sys::metrics::get().plugin_errors.inc();
            PluginError::Call(format!("{} {field}: {m}", self.id))
        };
        let args = serde_json::to_string(args).map_err(|e| fail(e.to_string()))?;
        let mut live = lock(&self.live);
        let l = match live.take() {
            Some(l) => live.insert(l),
            None => live.insert(self.start().map_err(|e| fail(e.to_string()))?),
        };
        self.reset_budget();
        let out = l.ctx.with(|ctx| -> Result<String, String> {
            let invoke: Function = ctx
                .globals()
                .get("__thali_invoke")
                .map_err(|e| e.to_string())?;
            invoke
                .call::<_, String>((slot, args))
                .catch(&ctx)
                .map_err(|e| describe(&e))
        });
        let hit = self.budget().hit.take();
        let out = match (out, hit) {
            (Ok(s), None) => s,
            (Err(m), None) if !m.contains("out of memory") => return Err(fail(m)),
            (Err(m), hit) | (Ok(m), hit @ Some(_)) => {
                // A limit was hit: the runtime may hold whatever the call built up.
                *live = None;
                return Err(fail(hit.unwrap_or(format!("memory limit exceeded ({m})"))));
            }
        };
        drop(live);
        if out.len() > self.limits.max_output {
            return Err(fail(format!(
                "output of {} bytes is over the {} byte limit",
                out.len(),
                self.limits.max_output
            )));
        }
        let v: Value = serde_json::from_str(&out).map_err(|e| fail(e.to_string()))?;
        match v {
            Value::Array(mut a) if a.len() == 2 => {
                let v = a.pop().unwrap_or(Value::Null);
                if a[0] == Value::Bool(true) {
                    Ok(v)
                } else {
                    Err(PluginError::Thrown(v))
                }
            }
            _ => Err(fail("malformed answer from the wrapper".into())),
        }
    }
}

struct JsFn {
    state: Arc<State>,
    slot: usize,
}

impl PluginFn for JsFn {
    fn call(&self, args: &[Value]) -> Result<Value, PluginError> {
        self.state.call(self.slot, args)
    }
}

/// The budget in interrupt-handler calls for a CPU limit in operations.
fn max_interrupts(cpu: u64) -> u64 {
    (cpu / OPS_PER_INTERRUPT).max(1)
}

pub fn compile(
    src: &Source,
    doc: &serde_json::Map<String, Value>,
    limits: &Limits,
) -> Result<DesignFns, PluginError> {
    let mut defs = Vec::new();
    let mut def = |field: String, code: &str, kind: Kind, views_only: bool| {
        defs.push(Def {
            field,
            code: code.to_string(),
            kind,
            views_only,
        });
        defs.len() - 1
    };
    let validate = src
        .validate
        .as_deref()
        .map(|c| def("validate_doc_update".into(), c, Kind::Call, false));
    let filters: Vec<(String, usize)> = src
        .filters
        .iter()
        .map(|(n, c)| {
            (
                n.clone(),
                def(format!("filters.{n}"), c, Kind::Filter, false),
            )
        })
        .collect();
    let mut views = Vec::new();
    for (name, (map, reduce)) in &src.views {
        let m = def(format!("views.{name}.map"), map, Kind::Map, true);
        let r = match reduce {
            Some(r) if r.starts_with('_') => Err(r.clone()),
            Some(r) => Ok(Some(def(
                format!("views.{name}.reduce"),
                r,
                Kind::Reduce,
                true,
            ))),
            None => Ok(None),
        };
        views.push((name.clone(), m, r));
    }
    let resolve = src
        .resolve_conflict
        .as_deref()
        .map(|c| def("resolve_conflict".into(), c, Kind::Call, false));

    let mut root = doc.clone();
    root.retain(|k, _| !k.starts_with('_'));
    let views_root = serde_json::json!({"views": {"lib": doc.get("views").and_then(|v| v.get("lib")).cloned().unwrap_or(Value::Null)}});
    let state = Arc::new(State {
        id: src.id.clone(),
        defs,
        root: Value::Object(root).to_string(),
        views_root: views_root.to_string(),
        limits: limits.clone(),
        budget: Arc::new(Mutex::new(Budget {
            interrupts: 0,
            max_interrupts: max_interrupts(limits.cpu),
            deadline: Instant::now(),
            hit: None,
        })),
        live: Mutex::new(None),
    });
    // Compiled now, so code that does not compile is refused when it is written.
    *lock(&state.live) = Some(state.start()?);
    let func = |slot: usize| -> Func {
        Arc::new(JsFn {
            state: state.clone(),
            slot,
        })
    };
    Ok(DesignFns {
        id: src.id.clone(),
        validate: validate.map(func),
        filters: filters
            .into_iter()
            .map(|(n, s)| (n, func(s)))
            .collect::<HashMap<_, _>>(),
        views: views
            .into_iter()
            .map(|(name, m, r)| {
                let reduce = match r {
                    Err(builtin) => Some(Reduce::Builtin(builtin)),
                    Ok(Some(s)) => Some(Reduce::Func(func(s))),
                    Ok(None) => None,
                };
                (
                    name,
                    ViewFns {
                        map: func(m),
                        reduce,
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
        view_sig: src.view_signature(),
        language: src.language,
        resolve_conflict: resolve.map(func),
        code_hash: src.hash(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::design::Source;
    use serde_json::json;
    use std::time::Duration;

    fn limits_for_test(cpu: u64, timeout: Duration) -> Limits {
        Limits {
            cpu,
            timeout,
            ..Limits::default()
        }
    }

    fn ddoc(v: Value) -> DesignFns {
        ddoc_with(v, Limits::default()).unwrap()
    }

    fn ddoc_with(v: Value, limits: Limits) -> Result<DesignFns, PluginError> {
        let Value::Object(m) = v else { panic!() };
        let src = Source::parse("_design/t", &m, &|_| None)?.expect("has code");
        compile(&src, &m, &limits)
    }

    fn validator(code: &str, limits: Limits) -> Result<Value, PluginError> {
        let d = ddoc_with(json!({"validate_doc_update": code}), limits)?;
        d.validate.unwrap().call(&[
            json!({"_id": "x", "a": 1}),
            Value::Null,
            json!({"name": null, "roles": []}),
            json!({}),
        ])
    }

    #[test]
    fn validators_throw_verdicts() {
        let out = validator(
            r#"function(n, o, u, s) { if (!o && n.a === 1) throw({forbidden: "no writes of " + n._id}); }"#,
            Limits::default(),
        );
        assert!(
            matches!(out, Err(PluginError::Thrown(v)) if v == json!({"forbidden": "no writes of x"}))
        );
        let ok = validator(
            "function(n) { if (n.a !== 1) throw {unauthorized: 'x'}; }",
            Limits::default(),
        );
        assert_eq!(ok.unwrap(), Value::Null);
        let e = validator("function(n) { n.nothing.deeper; }", Limits::default()).unwrap_err();
        assert!(e.to_string().contains("TypeError"), "{e}");
    }

    #[test]
    fn maps_emit_with_couchdb_helpers_and_modules() {
        let d = ddoc(json!({
            "views": {
                "lib": {"util": "exports.twice = function (x) { return require('./more').k * x; };",
                        "more": "module.exports = {k: 2};"},
                "v": {"map": "function(doc) { var u = require('views/lib/util'); emit(doc.n, u.twice(doc.n)); emit([doc._id, isArray(doc.t)], undefined); emit(sum(doc.t), toJSON({a: 1})); }",
                      "reduce": "(keys, values, rereduce) => rereduce ? sum(values) : values.length"},
                "arrow": {"map": "doc => { if (doc.n > 1) emit(doc.n ?? 0, null) }", "reduce": "_count"}
            }
        }));
        let v = &d.views["v"];
        let rows = v
            .map
            .call(&[json!({"_id": "a", "n": 1.5, "t": [1, 2]})])
            .unwrap();
        assert_eq!(
            rows,
            json!([[1.5, 3], [["a", true], null], [3, "{\"a\":1}"]])
        );
        let Some(Reduce::Func(r)) = &v.reduce else {
            panic!()
        };
        assert_eq!(
            r.call(&[json!([1, 2]), json!([5, 6]), json!(false)])
                .unwrap(),
            json!(2)
        );
        assert_eq!(
            r.call(&[Value::Null, json!([5, 6]), json!(true)]).unwrap(),
            json!(11)
        );
        // A reduce that throws gives null, as in CouchDB.
        assert_eq!(
            r.call(&[Value::Null, Value::Null, json!(true)]).unwrap(),
            Value::Null
        );
        assert!(matches!(d.views["arrow"].reduce, Some(Reduce::Builtin(_))));
        let rows = d.views["arrow"].map.call(&[json!({"n": 2})]).unwrap();
        let semi = ddoc(json!({"views": {"v": {"map": "function (doc) { emit(1); };\n "}}}));
        assert_eq!(
            semi.views["v"].map.call(&[json!({})]).unwrap(),
            json!([[1, null]])
        );
        assert_eq!(rows, json!([[2, null]]));
        // A map that throws fails that call only; emit is not left armed.
        let bad = ddoc(
            json!({"views": {"v": {"map": "function(doc) { emit(1, 1); throw new Error('boom'); }"}}}),
        );
        assert!(bad.views["v"].map.call(&[json!({})]).is_err());
        assert!(bad.views["v"].map.call(&[json!({})]).is_err());
    }

    #[test]
    fn filters_are_truthy() {
        let d =
            ddoc(json!({"filters": {"f": "function(doc, req) { return doc.n && req.query.on; }"}}));
        let f = &d.filters["f"];
        assert_eq!(
            f.call(&[json!({"n": 0}), json!({"query": {"on": 1}})])
                .unwrap(),
            json!(false)
        );
        assert_eq!(
            f.call(&[json!({"n": 2}), json!({"query": {"on": "y"}})])
                .unwrap(),
            json!(true)
        );
    }

    #[test]
    fn compile_errors_name_the_function() {
        let e = ddoc_with(
            json!({"views": {"v": {"map": "function(doc) { emit(1 }"}}}),
            Limits::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("views.v.map") && e.contains("SyntaxError"),
            "{e}"
        );
        let e = ddoc_with(json!({"validate_doc_update": "42"}), Limits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("validate_doc_update"), "{e}");
    }

    #[test]
    fn hostile_code_fails_its_call_only() {
        let limits = limits_for_test(2_000_000, Duration::from_secs(5));
        let started = Instant::now();
        let e = validator("function() { while (true) {} }", limits.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("CPU limit"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let e = validator(
            "function() { while (true) {} }",
            limits_for_test(u64::MAX, Duration::from_millis(200)),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("time limit"), "{e}");
        let e = validator("function f() { return f() + 1; }", Limits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("stack") || e.contains("RangeError"), "{e}");
        let e = validator(
            "function() { var a = []; for (;;) a.push('x'.repeat(1 << 20) + a.length); }",
            limits_for_test(u64::MAX, Duration::from_secs(20)),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory"), "{e}");
        let e = validator(
            "function() { return 'x'.repeat(9 << 20); }",
            Limits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("output"), "{e}");
        // A runtime stays warm between calls, and is rebuilt after a call that hit a limit.
        let d = ddoc(
            json!({"validate_doc_update": "function(n) { if (n.loop) while (true) {}; globalThis.calls = (globalThis.calls || 0) + 1; return {calls: globalThis.calls}; }"}),
        );
        let v = d.validate.unwrap();
        assert_eq!(v.call(&[json!({})]).unwrap(), json!({"calls": 1}));
        assert_eq!(v.call(&[json!({})]).unwrap(), json!({"calls": 2}));
        assert!(v.call(&[json!({"loop": true})]).is_err());
        assert_eq!(v.call(&[json!({})]).unwrap(), json!({"calls": 1}));
    }

    #[test]
    fn no_host_access() {
        let d = ddoc(
            json!({"validate_doc_update": "function() { return [typeof std, typeof os, typeof require, typeof __thali_log, typeof eval('1+1')]; }"}),
        );
        let out = d.validate.unwrap().call(&[]).unwrap();
        assert_eq!(
            out,
            json!(["undefined", "undefined", "function", "undefined", "number"])
        );
    }
}
