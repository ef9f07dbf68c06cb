//! Lua 5.4 design documents (mlua, vendored). One Lua state per design document, holding all its
//! functions; calls to it are serialised. The state gets only the `string`, `table`, `math` and
//! `utf8` libraries, without `load`, file loading, `collectgarbage` or randomness; a memory
//! limit; and an instruction hook that ends a call past its CPU budget or wall-clock deadline.
//!
//! A function is either an expression (`function(newDoc, oldDoc, userCtx, secObj) … end`) or a
//! chunk that returns one. Validators reject by returning or throwing (`error{forbidden = "…"}`)
//! a table, as CouchDB's JavaScript ones do.

use super::design::{DesignFns, Reduce, Source, ViewFns};
use super::{Func, Limits, PluginError, PluginFn};
use mlua::serde::{DeserializeOptions, SerializeOptions};
use mlua::{HookTriggers, Lua, LuaOptions, LuaSerdeExt, StdLib, VmState};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thali_sys::sync::lock;

/// Instructions between two hook checks.
const HOOK_EVERY: u32 = 1000;

struct Budget {
    used: u64,
    limit: u64,
    deadline: Instant,
    timeout: std::time::Duration,
}

impl Budget {
    /// Pays `steps` (VM instructions, or their equivalent in C string work); an error once the
    /// CPU budget or the deadline is passed.
    fn charge(&mut self, steps: u64) -> Result<(), String> {
        self.used = self.used.saturating_add(steps);
        if self.used > self.limit {
            Err(format!("CPU limit exceeded ({} instructions)", self.limit))
        } else if Instant::now() > self.deadline {
            Err(format!("time limit exceeded ({:?})", self.timeout))
        } else {
            Ok(())
        }
    }
}

struct State {
    lua: Lua,
    /// `pcall` wrapper that returns thrown tables instead of raising them.
    protect: mlua::Function,
    budget: Arc<Mutex<Budget>>,
    /// One call at a time: the budget belongs to the call that holds this.
    calls: Mutex<()>,
    limits: Limits,
    id: String,
}

impl State {
    fn new(id: &str, limits: &Limits) -> Result<State, PluginError> {
        let err = |e: mlua::Error| PluginError::Compile(format!("{id}: cannot start Lua: {e}"));
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8,
            LuaOptions::default(),
        )
        .map_err(err)?;
        let g = lua.globals();
        for name in [
            "dofile",
            "loadfile",
            "load",
            "require",
            "collectgarbage",
            "print",
        ] {
            g.set(name, mlua::Nil).map_err(err)?;
        }
        if let Ok(math) = g.get::<mlua::Table>("math") {
            math.set("random", mlua::Nil).map_err(err)?;
            math.set("randomseed", mlua::Nil).map_err(err)?;
        }
        let ddoc = id.to_string();
        let log = lua
            .create_function(move |_, msg: String| {
                tracing::info!(ddoc = %ddoc, "{msg}");
                Ok(())
            })
            .map_err(err)?;
        g.set("log", log).map_err(err)?;
        let protect: mlua::Function = lua
            .load(
                "local pcall, type, error = pcall, type, error
                 return function(f, ...)
                   local ok, r = pcall(f, ...)
                   if ok then return true, r end
                   if type(r) == 'table' then return false, r end
                   error(r, 0)
                 end",
            )
            .set_name("=thali")
            .eval()
            .map_err(err)?;
        lua.set_memory_limit(limits.memory).map_err(err)?;
        let budget = Arc::new(Mutex::new(Budget {
            used: 0,
            limit: limits.cpu,
            deadline: Instant::now() + limits.timeout,
            timeout: limits.timeout,
        }));
        let b = budget.clone();
        let charge: super::lua_strings::Charge = Arc::new(move |steps| lock(&b).charge(steps));
        super::lua_strings::install(&lua, charge).map_err(err)?;
        let b = budget.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_EVERY),
            move |_, _| {
                lock(&b)
                    .charge(HOOK_EVERY as u64)
                    .map(|()| VmState::Continue)
                    .map_err(mlua::Error::runtime)
            },
        )
        .map_err(err)?;
        Ok(State {
            lua,
            protect,
            budget,
            calls: Mutex::new(()),
            limits: limits.clone(),
            id: id.to_string(),
        })
    }

    fn reset_budget(&self) {
        let mut b = lock(&self.budget);
        b.used = 0;
        b.deadline = Instant::now() + b.timeout;
    }

    fn function(self: &Arc<Self>, field: &str, code: &str) -> Result<Func, PluginError> {
        let f = self.load(field, code)?;
        Ok(Arc::new(LuaFn {
            state: self.clone(),
            func: f,
            name: field.to_string(),
        }))
    }

    /// A view's map function, wrapped so that a call collects what it `emit`s (a global set
    /// for the call, as CouchDB's JavaScript maps expect) and returns `[[key, value], …]`.
    fn map_function(self: &Arc<Self>, field: &str, code: &str) -> Result<Func, PluginError> {
        let map = self.load(field, code)?;
        let err = |e: mlua::Error| PluginError::Compile(format!("{}: {field}: {e}", self.id));
        let wrapped: mlua::Function = {
            let _g = lock(&self.calls);
            let factory: mlua::Function = self
                .lua
                .load(
                    "local NULL = ...
                     return function(map)
                       return function(doc)
                         local out, n = {}, 0
                         emit = function(k, v)
                           if k == nil then k = NULL end
                           if v == nil then v = NULL end
                           n = n + 1
                           out[n] = {k, v}
                         end
                         map(doc)
                         emit = nil
                         return out
                       end
                     end",
                )
                .set_name("=thali/map")
                .call(self.lua.null())
                .map_err(err)?;
            factory.call(map).map_err(err)?
        };
        Ok(Arc::new(LuaFn {
            state: self.clone(),
            func: wrapped,
            name: field.to_string(),
        }))
    }

    fn load(&self, field: &str, code: &str) -> Result<mlua::Function, PluginError> {
        let _g = lock(&self.calls);
        self.reset_budget();
        let name = format!("={}/{field}", self.id);
        // An expression first (`function(...) ... end`), else a chunk that returns a function.
        let f = match self
            .lua
            .load(format!("return {code}"))
            .set_name(&name)
            .eval::<mlua::Function>()
        {
            Ok(f) => f,
            Err(first) => match self.lua.load(code).set_name(&name).eval::<mlua::Function>() {
                Ok(f) => f,
                Err(second) => {
                    let e = if code.trim_start().starts_with("function") {
                        first
                    } else {
                        second
                    };
                    return Err(PluginError::Compile(format!(
                        "{}: {field}: {}",
                        self.id,
                        clean(&e)
                    )));
                }
            },
        };
        Ok(f)
    }
}

/// mlua errors carry tracebacks and wrappers; keep the first line, which has `name:line: what`.
fn clean(e: &mlua::Error) -> String {
    let s = match e {
        mlua::Error::CallbackError { cause, .. } => return clean(cause),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        e => e.to_string(),
    };
    s.lines().next().unwrap_or("").to_string()
}

struct LuaFn {
    state: Arc<State>,
    func: mlua::Function,
    name: String,
}

impl PluginFn for LuaFn {
    fn call(&self, args: &[Value]) -> Result<Value, PluginError> {
        let st = &self.state;
        let fail = |m: String| {
            tracing::warn!(ddoc = %st.id, function = %self.name, error = %m, "plugin call failed");
            thali_sys::metrics::get().plugin_errors.inc();
            PluginError::Call(format!("{} {}: {m}", st.id, self.name))
        };
        let _g = lock(&st.calls);
        st.reset_budget();
        let lua = &st.lua;
        let ser = SerializeOptions::new().set_array_metatable(true);
        let mut largs = mlua::MultiValue::new();
        largs.push_back(mlua::Value::Function(self.func.clone()));
        for a in args {
            // A missing argument (`oldDoc` of a new document) is `nil`, as Lua code expects;
            // nulls inside documents stay the `null` sentinel, since tables cannot hold nil.
            let v = match a {
                Value::Null => mlua::Value::Nil,
                a => lua.to_value_with(a, ser).map_err(|e| fail(clean(&e)))?,
            };
            largs.push_back(v);
        }
        let (ok, out): (bool, mlua::Value) = st.protect.call(largs).map_err(|e| fail(clean(&e)))?;
        // Lua tables have no member order and iterate in a per-process hash order: sort
        // members so an emitted object is the same JSON on every run (and on every node).
        let de = DeserializeOptions::new()
            .deny_unsupported_types(true)
            .deny_recursive_tables(true)
            .sort_keys(true);
        let v: Value = lua.from_value_with(out, de).map_err(|e| {
            fail(format!(
                "returned something that is not JSON: {}",
                clean(&e)
            ))
        })?;
        let size = serde_json::to_vec(&v)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        if size > st.limits.max_output {
            return Err(fail(format!(
                "output of {size} bytes is over the {} byte limit",
                st.limits.max_output
            )));
        }
        if ok {
            Ok(v)
        } else {
            Err(PluginError::Thrown(v))
        }
    }
}

pub fn compile(src: &Source, limits: &Limits) -> Result<DesignFns, PluginError> {
    let st = Arc::new(State::new(&src.id, limits)?);
    let validate = match &src.validate {
        Some(code) => Some(st.function("validate_doc_update", code)?),
        None => None,
    };
    let mut filters = HashMap::new();
    for (name, code) in &src.filters {
        filters.insert(name.clone(), st.function(&format!("filters.{name}"), code)?);
    }
    let mut views = BTreeMap::new();
    for (name, (map, reduce)) in &src.views {
        let m = st.map_function(&format!("views.{name}.map"), map)?;
        let r = match reduce {
            Some(r) if r.starts_with('_') => Some(Reduce::Builtin(r.clone())),
            Some(r) => Some(Reduce::Func(
                st.function(&format!("views.{name}.reduce"), r)?,
            )),
            None => None,
        };
        views.insert(name.clone(), ViewFns { map: m, reduce: r });
    }
    let resolve_conflict = match &src.resolve_conflict {
        Some(code) => Some(st.function("resolve_conflict", code)?),
        None => None,
    };
    Ok(DesignFns {
        id: src.id.clone(),
        validate,
        filters,
        views,
        view_sig: src.view_signature(),
        language: src.language,
        resolve_conflict,
        code_hash: src.hash(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(code: &str, limits: Limits) -> Result<Value, PluginError> {
        let st = Arc::new(State::new("_design/t", &limits).unwrap());
        st.function("f", code)
            .unwrap()
            .call(&[json!({"a": 1}), Value::Null])
    }

    #[test]
    fn memory_limit_stops_a_memory_bomb() {
        let limits = Limits {
            timeout: std::time::Duration::from_secs(30),
            cpu: u64::MAX,
            ..Limits::default()
        };
        let e = one(
            "function() local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end end",
            limits,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory"), "{e}");
    }

    #[test]
    fn backtracking_patterns_stop_at_the_time_limit() {
        let limits = Limits {
            timeout: std::time::Duration::from_millis(300),
            cpu: u64::MAX,
            ..Limits::default()
        };
        let started = Instant::now();
        let e = one(
            r#"function() return string.find(("a"):rep(200), ("a-"):rep(4).."b") end"#,
            limits,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("time limit"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_millis(800));
    }

    #[test]
    fn string_functions_behave_as_in_lua() {
        let out = one(
            r#"function()
                 local words = {}
                 for w in ("one two  three"):gmatch("%a+") do words[#words + 1] = w end
                 local s, n = ("hello world"):gsub("o", "0")
                 local t = ("$name is $age"):gsub("%$(%w+)", {name = "Ann", age = 7})
                 local f = ("abc"):gsub("%w", function(c) return c:upper() .. "." end)
                 local a, b, k, v = ("key=val"):find("(%w+)=(%w+)")
                 return {words = words, s = s, n = n, t = t, f = f, a = a, b = b, k = k, v = v,
                         m = ("2024-05"):match("^(%d+)-(%d+)$"), p = ("a.b"):find(".", 1, true),
                         e = ("x"):gsub("", "-"), r = ("ab"):rep(3, ","),
                         pos = ("hello"):match("()ll()")}
               end"#,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"words": ["one", "two", "three"], "s": "hell0 w0rld", "n": 2,
                   "t": "Ann is 7", "f": "A.B.C.", "a": 1, "b": 7, "k": "key", "v": "val",
                   "m": "2024", "p": 2, "e": "-x-", "r": "ab,ab,ab", "pos": 3})
        );
    }

    #[test]
    fn huge_repetitions_are_refused_by_the_budget() {
        let limits = Limits {
            cpu: 1_000_000,
            ..Limits::default()
        };
        let e = one(r#"function() return #string.rep("x", 1e9) end"#, limits)
            .unwrap_err()
            .to_string();
        assert!(e.contains("CPU limit"), "{e}");
    }

    #[test]
    fn null_arguments_are_nil_and_thrown_tables_come_back() {
        let out = one(
            "function(doc, old) if old == nil then error({forbidden = doc.a}) end end",
            Limits::default(),
        );
        assert!(matches!(out, Err(PluginError::Thrown(v)) if v == json!({"forbidden": 1})));
    }

    #[test]
    fn returned_tables_have_sorted_members() {
        let out = one(
            "function() return {zeta = 1, b = {y = 1, x = 2}, alpha = 3, m = 4} end",
            Limits::default(),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"{"alpha":3,"b":{"x":2,"y":1},"m":4,"zeta":1}"#
        );
    }
}
