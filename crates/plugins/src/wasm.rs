//! WebAssembly design documents (wasmtime, ABI v1 — `plugin-api/README.md` is the contract).
//!
//! The module is a core module exporting `memory`, `alloc(len) -> ptr`,
//! `thali_abi_version() -> 1`, and one `(ptr, len) -> i64` export per function. The input is
//! the JSON array of the call's arguments written into the guest's memory; the result is
//! `(out_ptr << 32) | out_len`, pointing at JSON. The only import is `thali.log(level, ptr, len)`.
//!
//! Calls run with a fuel budget, an epoch deadline as a wall-clock backstop, a memory limit that
//! traps on growth past it, and a bounded stack. Instances come from a pool and are kept warm
//! between calls of the same module (as CouchDB's query server keeps its state); one that
//! traps or grows large is dropped.

use super::design::{DesignFns, Reduce, Source, ViewFns};
use super::{Func, Limits, PluginError, PluginFn};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::{
    Caller, Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder, ValType,
};

pub const ABI_VERSION: i32 = 1;
/// Concurrent WASM plugin instances.
const POOL_SLOTS: u32 = 256;
const EPOCH_TICK: Duration = Duration::from_millis(10);

struct StoreData {
    limits: StoreLimits,
    id: Arc<str>,
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreData>,
}

fn compile_err(id: &str, m: impl std::fmt::Display) -> PluginError {
    PluginError::Compile(format!("{id}: {m}"))
}

impl Runtime {
    pub fn new(limits: &Limits) -> Result<Runtime, PluginError> {
        let mut cfg = Config::new();
        cfg.consume_fuel(true);
        cfg.epoch_interruption(true);
        cfg.max_wasm_stack(512 * 1024);
        // A fresh instance per call is only affordable from a pool: slots (memory reservations
        // included) are reused instead of mapped and unmapped every call. More concurrent calls
        // than slots fail that call with a clear error.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .max_memory_size(limits.memory.max(1 << 20))
            .linear_memory_keep_resident(0);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg)
            .map_err(|e| PluginError::Compile(format!("cannot start wasmtime: {e}")))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PluginError::Compile(format!("cannot start the epoch ticker: {e}")))?;
        let mut linker = Linker::new(&engine);
        linker
            .func_wrap(
                "thali",
                "log",
                |mut caller: Caller<'_, StoreData>, level: i32, ptr: i32, len: i32| {
                    let Some(mem) = caller.get_export("memory").and_then(|e| e.into_memory())
                    else {
                        return;
                    };
                    let mut buf = vec![0u8; (len.max(0) as usize).min(4096)];
                    if mem.read(&caller, ptr as u32 as usize, &mut buf).is_ok() {
                        let msg = String::from_utf8_lossy(&buf);
                        let id = caller.data().id.clone();
                        match level {
                            0 => tracing::error!(ddoc = %id, "{msg}"),
                            1 => tracing::warn!(ddoc = %id, "{msg}"),
                            2 => tracing::info!(ddoc = %id, "{msg}"),
                            _ => tracing::debug!(ddoc = %id, "{msg}"),
                        }
                    }
                },
            )
            .map_err(|e| PluginError::Compile(format!("cannot link thali.log: {e}")))?;
        Ok(Runtime { engine, linker })
    }

    pub fn compile(&self, src: &Source, limits: &Limits) -> Result<DesignFns, PluginError> {
        let id = &src.id;
        let bytes = src
            .module
            .as_ref()
            .ok_or_else(|| compile_err(id, "no module"))?;
        let module = Module::new(&self.engine, bytes)
            .map_err(|e| compile_err(id, format!("the module does not compile: {e}")))?;
        for imp in module.imports() {
            if (imp.module(), imp.name()) != ("thali", "log") {
                return Err(compile_err(
                    id,
                    format!(
                        "the module imports {}.{}; plugins may only import thali.log",
                        imp.module(),
                        imp.name()
                    ),
                ));
            }
        }
        let exports: HashMap<String, ExternType> = module
            .exports()
            .map(|e| (e.name().to_string(), e.ty()))
            .collect();
        let func_sig =
            |name: &str, params: &[ValType], results: &[ValType]| -> Result<(), PluginError> {
                match exports.get(name) {
                    Some(ExternType::Func(f))
                        if f.params()
                            .map(|p| p.to_string())
                            .eq(params.iter().map(|p| p.to_string()))
                            && f.results()
                                .map(|p| p.to_string())
                                .eq(results.iter().map(|p| p.to_string())) =>
                    {
                        Ok(())
                    }
                    Some(_) => Err(compile_err(
                        id,
                        format!("export {name:?} has the wrong type"),
                    )),
                    None => Err(compile_err(
                        id,
                        format!("the module has no export {name:?}"),
                    )),
                }
            };
        if !matches!(exports.get("memory"), Some(ExternType::Memory(_))) {
            return Err(compile_err(id, "the module does not export its memory"));
        }
        func_sig("alloc", &[ValType::I32], &[ValType::I32])?;
        func_sig("thali_abi_version", &[], &[ValType::I32])?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| compile_err(id, e))?;
        let compiled = Arc::new(Compiled {
            engine: self.engine.clone(),
            pre,
            limits: limits.clone(),
            id: Arc::from(id.as_str()),
            warm: Mutex::new(Vec::new()),
        });
        let version = compiled
            .abi_version()
            .map_err(|e| compile_err(id, format!("thali_abi_version failed: {e}")))?;
        if version != ABI_VERSION {
            return Err(compile_err(
                id,
                format!("the module speaks plugin ABI {version}; this node speaks {ABI_VERSION}"),
            ));
        }
        let export = |field: &str, name: &str| -> Result<Func, PluginError> {
            func_sig(name, &[ValType::I32, ValType::I32], &[ValType::I64])
                .map_err(|e| compile_err(id, format!("{field}: {e}")))?;
            Ok(Arc::new(WasmFn {
                module: compiled.clone(),
                export: name.to_string(),
                field: field.to_string(),
            }))
        };
        let validate = match &src.validate {
            Some(name) => Some(export("validate_doc_update", name)?),
            None => None,
        };
        let mut filters = HashMap::new();
        for (name, exp) in &src.filters {
            filters.insert(name.clone(), export(&format!("filters.{name}"), exp)?);
        }
        let mut views = BTreeMap::new();
        for (name, (map, reduce)) in &src.views {
            let m = export(&format!("views.{name}.map"), map)?;
            let r = match reduce {
                Some(r) if r.starts_with('_') => Some(Reduce::Builtin(r.clone())),
                Some(r) => Some(Reduce::Func(export(&format!("views.{name}.reduce"), r)?)),
                None => None,
            };
            views.insert(name.clone(), ViewFns { map: m, reduce: r });
        }
        let resolve_conflict = match &src.resolve_conflict {
            Some(name) => Some(export("resolve_conflict", name)?),
            None => None,
        };
        Ok(DesignFns {
            id: id.clone(),
            validate,
            filters,
            views,
            view_sig: src.view_signature(),
            language: src.language,
            resolve_conflict,
            code_hash: src.hash(),
        })
    }
}

struct Compiled {
    engine: Engine,
    pre: InstancePre<StoreData>,
    limits: Limits,
    id: Arc<str>,
    /// Instances that finished a call cleanly, ready for the next one.
    warm: Mutex<Vec<Warm>>,
}

/// An instance kept between calls: a fresh one costs page faults on every page the guest
/// touches (tens of microseconds), a warm one almost nothing. Instances are recycled after a
/// trap, and once their memory passes `RECYCLE_AT` (guests never free their inputs and outputs).
struct Warm {
    store: Store<StoreData>,
    mem: wasmtime::Memory,
    alloc: wasmtime::TypedFunc<i32, i32>,
    instance: wasmtime::Instance,
}

const WARM_MAX: usize = 8;
const RECYCLE_AT: usize = 8 << 20;

impl Compiled {
    fn deadline_ticks(&self) -> u64 {
        (self.limits.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }

    fn store(&self) -> Result<Store<StoreData>, String> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            StoreData {
                limits,
                id: self.id.clone(),
            },
        );
        store.limiter(|d| &mut d.limits);
        store.set_fuel(self.limits.cpu).map_err(|e| e.to_string())?;
        store.set_epoch_deadline(
            (self.limits.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64,
        );
        store.epoch_deadline_trap();
        Ok(store)
    }

    fn abi_version(&self) -> Result<i32, String> {
        let mut store = self.store()?;
        let inst = self.pre.instantiate(&mut store).map_err(|e| describe(&e))?;
        let f = inst
            .get_typed_func::<(), i32>(&mut store, "thali_abi_version")
            .map_err(|e| e.to_string())?;
        f.call(&mut store, ()).map_err(|e| describe(&e))
    }

    fn fresh(&self) -> Result<Warm, String> {
        let mut store = self.store()?;
        let instance = self.pre.instantiate(&mut store).map_err(|e| describe(&e))?;
        let mem = instance
            .get_memory(&mut store, "memory")
            .ok_or("no memory export")?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "alloc")
            .map_err(|e| e.to_string())?;
        Ok(Warm {
            store,
            mem,
            alloc,
            instance,
        })
    }

    fn call(&self, export: &str, input: &[u8]) -> Result<Vec<u8>, String> {
        let warm = self.warm.lock().ok().and_then(|mut w| w.pop());
        let mut w = match warm {
            Some(mut w) => {
                // A new budget for this call.
                w.store
                    .set_fuel(self.limits.cpu)
                    .map_err(|e| e.to_string())?;
                w.store.set_epoch_deadline(self.deadline_ticks());
                w
            }
            None => self.fresh()?,
        };
        let out = self.call_in(&mut w, export, input)?;
        if w.mem.data_size(&w.store) <= RECYCLE_AT {
            if let Ok(mut pool) = self.warm.lock() {
                if pool.len() < WARM_MAX {
                    pool.push(w);
                }
            }
        }
        Ok(out)
    }

    fn call_in(&self, w: &mut Warm, export: &str, input: &[u8]) -> Result<Vec<u8>, String> {
        let f = w
            .instance
            .get_typed_func::<(i32, i32), i64>(&mut w.store, export)
            .map_err(|e| e.to_string())?;
        let len = i32::try_from(input.len()).map_err(|_| "input too large")?;
        let ptr = w.alloc.call(&mut w.store, len).map_err(|e| describe(&e))?;
        w.mem
            .write(&mut w.store, ptr as u32 as usize, input)
            .map_err(|_| format!("alloc returned {ptr}, outside the module's memory"))?;
        let packed = f.call(&mut w.store, (ptr, len)).map_err(|e| describe(&e))? as u64;
        let (out_ptr, out_len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
        if out_len > self.limits.max_output {
            return Err(format!(
                "output of {out_len} bytes is over the {} byte limit",
                self.limits.max_output
            ));
        }
        let mut out = vec![0u8; out_len];
        w.mem.read(&w.store, out_ptr, &mut out).map_err(|_| {
            format!("output ({out_ptr}, {out_len}) lies outside the module's memory")
        })?;
        Ok(out)
    }
}

/// A trap or error as one line that says what limit or fault it was.
fn describe(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => "CPU limit exceeded (out of fuel)".into(),
        Some(wasmtime::Trap::Interrupt) => "time limit exceeded".into(),
        Some(wasmtime::Trap::StackOverflow) => "stack overflow".into(),
        Some(t) => format!("trap: {t}"),
        None => {
            let s = format!("{e:#}");
            if s.contains("memory") && s.contains("limit")
                || s.contains("forcing trap when growing memory")
            {
                "memory limit exceeded".into()
            } else {
                s.lines().next().unwrap_or("").to_string()
            }
        }
    }
}

struct WasmFn {
    module: Arc<Compiled>,
    export: String,
    field: String,
}

impl PluginFn for WasmFn {
    fn call(&self, args: &[Value]) -> Result<Value, PluginError> {
        let input = serde_json::to_vec(args).unwrap_or_default();
        let res = self.module.call(&self.export, &input).and_then(|out| {
            serde_json::from_slice::<Value>(&out).map_err(|e| {
                format!(
                    "returned output that is not JSON ({e}): {}",
                    String::from_utf8_lossy(&out[..out.len().min(80)])
                )
            })
        });
        res.map_err(|m| {
            tracing::warn!(ddoc = %self.module.id, function = %self.field, error = %m, "plugin call failed");
            thali_sys::metrics::get().plugin_errors.inc();
            PluginError::Call(format!("{} {}: {m}", self.module.id, self.field))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::design::Language;
    use serde_json::json;

    /// Echoes its input unless it starts with `[13`, which traps; the bump
    /// allocator never frees, so memory grows with every call.
    const ECHO: &str = r#"(module
      (memory (export "memory") 1)
      (global $heap (mut i32) (i32.const 1024))
      (func (export "alloc") (param $len i32) (result i32)
        (local $p i32)
        (local.set $p (global.get $heap))
        (global.set $heap (i32.add (global.get $heap) (local.get $len)))
        (block $ok
          (br_if $ok (i32.lt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
          (drop (memory.grow (i32.add (i32.div_u (local.get $len) (i32.const 65536)) (i32.const 1)))))
        (local.get $p))
      (func (export "thali_abi_version") (result i32) (i32.const 1))
      (func (export "echo") (param $p i32) (param $l i32) (result i64)
        (if (i32.eq (i32.load8_u (i32.add (local.get $p) (i32.const 1))) (i32.const 49))
          (then (if (i32.eq (i32.load8_u (i32.add (local.get $p) (i32.const 2))) (i32.const 51))
            (then unreachable))))
        (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $l))))
    )"#;

    #[test]
    fn warm_instances_survive_calls_and_are_replaced_after_traps() {
        let limits = Limits::default();
        let rt = Runtime::new(&limits).unwrap();
        let src = Source {
            id: "_design/echo".into(),
            language: Language::Wasm,
            validate: None,
            filters: [("echo".to_string(), "echo".to_string())].into(),
            views: Default::default(),
            resolve_conflict: None,
            module: Some(ECHO.as_bytes().to_vec()),
            options: Value::Null,
            lib: Value::Null,
        };
        let fns = rt.compile(&src, &limits).unwrap();
        let echo = fns.filters.get("echo").unwrap();
        // Enough calls, with a 64 KiB argument each, to pass the recycling threshold.
        let big = "x".repeat(64 << 10);
        for i in 200..500 {
            let out = echo.call(&[json!(i), json!(big)]).unwrap();
            assert_eq!(out, json!([i, big]));
        }
        let e = echo.call(&[json!(13)]).unwrap_err().to_string();
        assert!(e.contains("unreachable"), "{e}");
        assert_eq!(echo.call(&[json!(7)]).unwrap(), json!([7]));
    }
}
