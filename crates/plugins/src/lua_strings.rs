//! The `string` and `table` functions of a plugin's Lua state that can run long inside C, where
//! the instruction hook never fires, replaced or wrapped so they pay into the call's budget:
//! pattern matching (`find`, `match`, `gmatch`, `gsub`) runs on `lua_pattern`'s metered
//! matcher; `rep`, `format`, `concat` and `sort` are charged for the work they are about to do
//! before the C function runs, and refused when it would not fit.

use super::lua_pattern::{self as pat, Capture, Meter, PatternError};
use mlua::{Lua, MultiValue, Value};
use std::sync::{Arc, Mutex};

/// Charges the plugin call's budget (shared with the instruction hook).
pub type Charge = Arc<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

struct LuaMeter(Charge);

impl Meter for LuaMeter {
    fn charge(&mut self, steps: u64) -> Result<(), String> {
        (self.0)(steps)
    }
}

fn err(e: PatternError) -> mlua::Error {
    match e {
        PatternError::Malformed(m) | PatternError::Budget(m) => mlua::Error::runtime(m),
    }
}

fn truthy(v: &Option<Value>) -> bool {
    !matches!(v, None | Some(Value::Nil) | Some(Value::Boolean(false)))
}

/// Lua's `luaL_checklstring`: strings, and numbers converted.
fn bytes(lua: &Lua, v: Value, arg: usize, fname: &str) -> mlua::Result<Vec<u8>> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Integer(_) | Value::Number(_) => match lua.coerce_string(v)? {
            Some(s) => Ok(s.as_bytes().to_vec()),
            None => Err(mlua::Error::runtime("number has no string form")),
        },
        other => Err(mlua::Error::runtime(format!(
            "bad argument #{arg} to '{fname}' (string expected, got {})",
            other.type_name()
        ))),
    }
}

fn capture_value(lua: &Lua, src: &[u8], c: &Capture) -> mlua::Result<Value> {
    Ok(match c {
        Capture::Str(a, b) => Value::String(lua.create_string(&src[*a..*b])?),
        Capture::Pos(n) => Value::Integer(*n as i64),
        Capture::Unfinished => return Err(mlua::Error::runtime("unfinished capture")),
    })
}

/// The captures of a match, or the whole match when the pattern has none.
fn captures(
    lua: &Lua,
    src: &[u8],
    s: usize,
    e: usize,
    caps: &[Capture],
) -> mlua::Result<MultiValue> {
    let mut out = MultiValue::new();
    if caps.is_empty() {
        out.push_back(Value::String(lua.create_string(&src[s..e])?));
    }
    for c in caps {
        out.push_back(capture_value(lua, src, c)?);
    }
    Ok(out)
}

fn find_aux(lua: &Lua, args: MultiValue, charge: &Charge, find: bool) -> mlua::Result<MultiValue> {
    let fname = if find { "find" } else { "match" };
    let mut it = args.into_iter();
    let src = bytes(lua, it.next().unwrap_or(Value::Nil), 1, fname)?;
    let p = bytes(lua, it.next().unwrap_or(Value::Nil), 2, fname)?;
    let init: Option<i64> = match it.next() {
        None | Some(Value::Nil) => None,
        Some(v) => Some(lua.unpack(v)?),
    };
    let plain = truthy(&it.next());
    let init = pat::start_offset(init.unwrap_or(1), src.len());
    let fail = || Ok(MultiValue::from_iter([Value::Nil]));
    if init > src.len() {
        return fail();
    }
    let mut meter = LuaMeter(charge.clone());
    if find && (plain || pat::no_specials(&p)) {
        return match pat::find_plain(&src[init..], &p, &mut meter).map_err(mlua::Error::runtime)? {
            Some(at) => Ok(MultiValue::from_iter([
                Value::Integer((init + at + 1) as i64),
                Value::Integer((init + at + p.len()) as i64),
            ])),
            None => fail(),
        };
    }
    match pat::find(&src, &p, init, &mut meter).map_err(err)? {
        None => fail(),
        Some((s, e, caps)) if find => {
            let mut out =
                MultiValue::from_iter([Value::Integer(s as i64 + 1), Value::Integer(e as i64)]);
            for c in &caps {
                out.push_back(capture_value(lua, &src, c)?);
            }
            Ok(out)
        }
        Some((s, e, caps)) => captures(lua, &src, s, e, &caps),
    }
}

struct GmatchState {
    src: Vec<u8>,
    pat: Vec<u8>,
    pos: usize,
    last: Option<usize>,
}

fn gmatch(lua: &Lua, args: MultiValue, charge: &Charge) -> mlua::Result<mlua::Function> {
    let mut it = args.into_iter();
    let src = bytes(lua, it.next().unwrap_or(Value::Nil), 1, "gmatch")?;
    let p = bytes(lua, it.next().unwrap_or(Value::Nil), 2, "gmatch")?;
    let init: i64 = match it.next() {
        None | Some(Value::Nil) => 1,
        Some(v) => lua.unpack(v)?,
    };
    let mut pos = pat::start_offset(init, src.len());
    if pos > src.len() {
        pos = src.len() + 1;
    }
    let state = Mutex::new(GmatchState {
        src,
        pat: p,
        pos,
        last: None,
    });
    let charge = charge.clone();
    lua.create_function(move |lua, ()| {
        let mut st = thali_sys::sync::lock(&state);
        let GmatchState {
            src,
            pat,
            pos,
            last,
        } = &mut *st;
        let mut meter = LuaMeter(charge.clone());
        let mut m = pat::Matcher::new(src, pat, &mut meter);
        let mut s = *pos;
        while s <= src.len() {
            if let Some((e, caps)) = m.match_at(s).map_err(err)? {
                if Some(e) != *last {
                    m.settle().map_err(err)?;
                    *pos = e;
                    *last = Some(e);
                    return captures(lua, src, s, e, &caps);
                }
            }
            s += 1;
        }
        m.settle().map_err(err)?;
        *pos = src.len() + 1;
        Ok(MultiValue::from_iter([Value::Nil]))
    })
}

/// A string replacement (`%0`–`%9`, `%%`) for one match.
fn add_s(
    lua: &Lua,
    out: &mut Vec<u8>,
    repl: &[u8],
    src: &[u8],
    (s, e): (usize, usize),
    caps: &[Capture],
) -> mlua::Result<()> {
    let mut i = 0;
    while i < repl.len() {
        let c = repl[i];
        i += 1;
        if c != b'%' {
            out.push(c);
            continue;
        }
        let d = repl.get(i).copied().unwrap_or(0);
        i += 1;
        match d {
            b'%' => out.push(b'%'),
            b'0' => out.extend_from_slice(&src[s..e]),
            b'1'..=b'9' => {
                let l = (d - b'1') as usize;
                match caps.get(l) {
                    Some(Capture::Str(a, b)) => out.extend_from_slice(&src[*a..*b]),
                    Some(Capture::Pos(n)) => out.extend_from_slice(n.to_string().as_bytes()),
                    Some(Capture::Unfinished) => {
                        return Err(mlua::Error::runtime("unfinished capture"))
                    }
                    None if l == 0 => out.extend_from_slice(&src[s..e]),
                    None => {
                        return Err(mlua::Error::runtime(format!(
                            "invalid capture index %{} in replacement string",
                            l + 1
                        )))
                    }
                }
            }
            _ => {
                return Err(mlua::Error::runtime(
                    "invalid use of '%' in replacement string",
                ))
            }
        }
        let _ = lua;
    }
    Ok(())
}

fn gsub(lua: &Lua, args: MultiValue, charge: &Charge) -> mlua::Result<MultiValue> {
    let mut it = args.into_iter();
    let src_v = it.next().unwrap_or(Value::Nil);
    let src = bytes(lua, src_v.clone(), 1, "gsub")?;
    let p = bytes(lua, it.next().unwrap_or(Value::Nil), 2, "gsub")?;
    let repl = it.next().unwrap_or(Value::Nil);
    let max_n: i64 = match it.next() {
        None | Some(Value::Nil) => src.len() as i64 + 1,
        Some(v) => lua.unpack(v)?,
    };
    let repl_str = match &repl {
        Value::String(_) | Value::Integer(_) | Value::Number(_) => {
            Some(bytes(lua, repl.clone(), 3, "gsub")?)
        }
        Value::Table(_) | Value::Function(_) => None,
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #3 to 'gsub' (string/function/table expected, got {})",
                other.type_name()
            )))
        }
    };
    let (anchor, p) = match p.first() {
        Some(b'^') => (true, p[1..].to_vec()),
        _ => (false, p),
    };
    let mut meter = LuaMeter(charge.clone());
    let mut m = pat::Matcher::new(&src, &p, &mut meter);
    let mut out = Vec::new();
    let mut n = 0i64;
    let mut changed = false;
    let mut s = 0usize;
    let mut last: Option<usize> = None;
    while n < max_n {
        let found = m.match_at(s).map_err(err)?;
        match found {
            Some((e, caps)) if Some(e) != last => {
                n += 1;
                let whole = &src[s..e];
                match (&repl_str, &repl) {
                    (Some(r), _) => {
                        add_s(lua, &mut out, r, &src, (s, e), &caps)?;
                        changed = true;
                    }
                    (None, repl) => {
                        let v = match repl {
                            Value::Table(t) => {
                                let key = match caps.first() {
                                    Some(c) => capture_value(lua, &src, c)?,
                                    None => Value::String(lua.create_string(whole)?),
                                };
                                t.get::<Value>(key)?
                            }
                            Value::Function(f) => {
                                f.call::<Value>(captures(lua, &src, s, e, &caps)?)?
                            }
                            _ => Value::Nil,
                        };
                        match v {
                            Value::Nil | Value::Boolean(false) => out.extend_from_slice(whole),
                            Value::String(_) | Value::Integer(_) | Value::Number(_) => {
                                out.extend_from_slice(&bytes(lua, v, 3, "gsub")?);
                                changed = true;
                            }
                            other => {
                                return Err(mlua::Error::runtime(format!(
                                    "invalid replacement value (a {})",
                                    other.type_name()
                                )))
                            }
                        }
                    }
                }
                s = e;
                last = Some(e);
            }
            _ if s < src.len() => {
                out.push(src[s]);
                s += 1;
            }
            _ => break,
        }
        if anchor {
            break;
        }
    }
    m.settle().map_err(err)?;
    let result = if changed {
        out.extend_from_slice(&src[s..]);
        Value::String(lua.create_string(&out)?)
    } else {
        match src_v {
            Value::String(_) => src_v,
            _ => Value::String(lua.create_string(&src)?),
        }
    };
    Ok(MultiValue::from_iter([result, Value::Integer(n)]))
}

fn len_of(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => s.as_bytes().len() as u64,
        Some(Value::Table(t)) => t.raw_len() as u64,
        _ => 0,
    }
}

/// Installs the metered functions in `string` and `table`.
pub fn install(lua: &Lua, charge: Charge) -> mlua::Result<()> {
    let g = lua.globals();
    let string: mlua::Table = g.get("string")?;
    let table: mlua::Table = g.get("table")?;

    let c = charge.clone();
    string.set(
        "find",
        lua.create_function(move |lua, a: MultiValue| find_aux(lua, a, &c, true))?,
    )?;
    let c = charge.clone();
    string.set(
        "match",
        lua.create_function(move |lua, a: MultiValue| find_aux(lua, a, &c, false))?,
    )?;
    let c = charge.clone();
    string.set(
        "gmatch",
        lua.create_function(move |lua, a: MultiValue| gmatch(lua, a, &c))?,
    )?;
    let c = charge.clone();
    string.set(
        "gsub",
        lua.create_function(move |lua, a: MultiValue| gsub(lua, a, &c))?,
    )?;

    // Charged by the bytes they are about to write (a VM instruction ≈ 16 copied bytes).
    let charged = |orig: mlua::Function, cost: fn(&MultiValue) -> u64| {
        let c = charge.clone();
        lua.create_function(move |_, a: MultiValue| {
            c(cost(&a)).map_err(mlua::Error::runtime)?;
            orig.call::<MultiValue>(a)
        })
    };
    let rep: mlua::Function = string.get("rep")?;
    string.set(
        "rep",
        charged(rep, |a| {
            let n = match a.get(1) {
                Some(Value::Integer(n)) => (*n).max(0) as u64,
                Some(Value::Number(n)) if *n > 0.0 => *n as u64,
                _ => 0,
            };
            (len_of(a.front()) + len_of(a.get(2))).saturating_mul(n) / 16
        })?,
    )?;
    let format: mlua::Function = string.get("format")?;
    string.set(
        "format",
        charged(format, |a| {
            a.iter().map(|v| len_of(Some(v))).sum::<u64>() / 16 + 1
        })?,
    )?;
    let concat: mlua::Function = table.get("concat")?;
    table.set(
        "concat",
        charged(concat, |a| len_of(a.front()).saturating_mul(4))?,
    )?;
    let sort: mlua::Function = table.get("sort")?;
    table.set(
        "sort",
        charged(sort, |a| {
            let n = len_of(a.front()).max(2);
            n.saturating_mul(64 - n.leading_zeros() as u64)
                .saturating_mul(4)
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs `find`, `match`, `gsub` and `gmatch` on `(s, p)` and prints what they gave.
    const PROBE: &str = r#"
        local s, p = ...
        local function show(ok, ...)
          if not ok then return "error" end
          local t = table.pack(...)
          local parts = {}
          for i = 1, t.n do parts[#parts + 1] = type(t[i]) .. ":" .. tostring(t[i]) end
          return table.concat(parts, ",")
        end
        local out = {}
        out[#out + 1] = show(pcall(string.find, s, p))
        out[#out + 1] = show(pcall(string.find, s, p, 2))
        out[#out + 1] = show(pcall(string.find, s, p, -3))
        out[#out + 1] = show(pcall(string.match, s, p))
        out[#out + 1] = show(pcall(string.gsub, s, p, "<%0>"))
        out[#out + 1] = show(pcall(string.gsub, s, p, function(c) return c .. c end, 2))
        out[#out + 1] = show(pcall(function()
          local r = {}
          for a, b in string.gmatch(s, p) do
            r[#r + 1] = tostring(a) .. "/" .. tostring(b)
            if #r > 20 then break end
          end
          return table.concat(r, ";")
        end))
        return table.concat(out, " | ")
    "#;

    fn run(lua: &Lua, s: &str, p: &str) -> String {
        lua.load(PROBE).call::<String>((s, p)).unwrap()
    }

    fn token() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a", "b", "1", " ", ".", "%a", "%d", "%s", "%w", "%A", "[ab]", "[^a]", "[a-c1]",
            "[%d]", "*", "+", "-", "?", "^", "$", "(", ")", "()", "%b()", "%f[%a]", "%1", "%%",
            "%(", "]", "%", "[", "[^", "%f", "%b", "%2", "%0",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        /// The metered matcher answers exactly as Lua's own C code does.
        #[test]
        fn same_answers_as_lua(
            subject in "[ab1 ()]{0,10}",
            pattern in prop::collection::vec(token(), 0..6),
        ) {
            let pattern: String = pattern.concat();
            let plain = Lua::new();
            let metered = Lua::new();
            install(&metered, Arc::new(|_| Ok(()))).unwrap();
            prop_assert_eq!(
                run(&plain, &subject, &pattern),
                run(&metered, &subject, &pattern),
                "subject {:?} pattern {:?}", subject, pattern
            );
        }
    }
}
