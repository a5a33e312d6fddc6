//! The environment each policy runs in. Every policy of a VM gets a table of its own holding its
//! own copies of the safe base functions and of the `string`, `table`, `math` and `utf8`
//! libraries, and nothing else: no table a policy can reach is reachable from another policy.
//!
//! What remains common to the VM is kept out of reach: the real libraries (used by imapgate's
//! trusted shims) sit in the VM's globals, which no policy environment links to; the string
//! metatable (`("").find`) carries `__metatable = false`; userdata metatables are mlua's, which
//! carry it too; each policy's `math` is opened afresh, so `math.randomseed` in one policy does
//! not steer another's `math.random`. Finalizers (`__gc`) are refused, since they would run
//! inside whichever hook happens to trigger a collection.
//!
//! The pattern functions (`find`, `match`, `gmatch`, `gsub`, as library functions and as string
//! methods) are guarded: a call whose worst case is too expensive fails before it starts (see
//! [`super::pattern`]).

use mlua::{Function, Lua, StdLib, Table, Value};

use super::pattern;

/// The base functions a policy may use.
const BASE: &[&str] = &[
    "assert",
    "error",
    "ipairs",
    "next",
    "pairs",
    "pcall",
    "select",
    "tonumber",
    "tostring",
    "type",
    "xpcall",
    "rawequal",
    "rawget",
    "rawset",
    "rawlen",
    "getmetatable",
    "_VERSION",
];

/// Trusted glue: the guarded pattern functions and `setmetatable` without finalizers. Each
/// closes over the real function, which no policy can reach (there is no `debug` library).
const GUARDS: &str = r#"
local find, match, gmatch, gsub, check, setmt, rawget, error = ...
return function(s, p, init, plain)
    if not plain then
      local e = check(s, p, true)
      if e then error(e, 2) end
    end
    return find(s, p, init, plain)
  end,
  function(s, p, init)
    local e = check(s, p, true)
    if e then error(e, 2) end
    return match(s, p, init)
  end,
  function(s, p, init)
    local e = check(s, p, false)
    if e then error(e, 2) end
    return gmatch(s, p, init)
  end,
  function(s, p, r, n)
    local e = check(s, p, true)
    if e then error(e, 2) end
    return gsub(s, p, r, n)
  end,
  function(t, mt)
    if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
      error("__gc metamethods are not available to policies", 2)
    end
    return setmt(t, mt)
  end
"#;

/// What every policy environment of one VM is built from.
pub(super) struct Sandbox {
    base: Vec<(&'static str, Value)>,
    /// The guarded string library: the string metatable's `__index`, and what each policy's
    /// `string` is copied from.
    string: Table,
    table: Table,
    utf8: Table,
    math: Table,
}

impl Sandbox {
    /// Prepares the VM (whose globals hold the standard libraries) and the templates.
    pub(super) fn new(lua: &Lua) -> mlua::Result<Sandbox> {
        let globals = lua.globals();
        let string: Table = globals.get("string")?;
        // The refusal as a message, raised by the guard at the policy's call site.
        let check = lua.create_function(|lua, (s, p, anchor): (Value, Value, bool)| {
            // Arguments that are not strings: the real function raises its own error.
            let Some(n) = coerced(lua, s)?.map(|s| s.as_bytes().len()) else {
                return Ok(None);
            };
            let Some(p) = coerced(lua, p)? else {
                return Ok(None);
            };
            Ok(pattern::check(n, &p.as_bytes(), anchor)
                .err()
                .map(|e| e.to_string()))
        })?;
        let guards: mlua::MultiValue = lua.load(GUARDS).set_name("=imapgate").call((
            string.get::<Function>("find")?,
            string.get::<Function>("match")?,
            string.get::<Function>("gmatch")?,
            string.get::<Function>("gsub")?,
            check,
            globals.get::<Function>("setmetatable")?,
            globals.get::<Function>("rawget")?,
            globals.get::<Function>("error")?,
        ))?;
        let mut guards = guards.into_iter();
        let guarded = copy(lua, &string)?;
        guarded.raw_set("dump", Value::Nil)?;
        for name in ["find", "match", "gmatch", "gsub"] {
            guarded.raw_set(name, guards.next().unwrap_or(Value::Nil))?;
        }
        let setmetatable = guards.next().unwrap_or(Value::Nil);
        let mt = lua.create_table()?;
        mt.raw_set("__index", guarded.clone())?;
        mt.raw_set("__metatable", false)?;
        lua.set_type_metatable::<mlua::LuaString>(Some(mt));
        let mut base = Vec::with_capacity(BASE.len() + 1);
        for &name in BASE {
            base.push((name, globals.get::<Value>(name)?));
        }
        base.push(("setmetatable", setmetatable));
        Ok(Sandbox {
            base,
            string: guarded,
            table: globals.get("table")?,
            utf8: globals.get("utf8")?,
            math: globals.get("math")?,
        })
    }

    /// A fresh environment for one policy.
    pub(super) fn env(&self, lua: &Lua) -> mlua::Result<Table> {
        let env = lua.create_table_with_capacity(0, self.base.len() + 8)?;
        for (name, value) in &self.base {
            env.raw_set(*name, value.clone())?;
        }
        env.raw_set("string", copy(lua, &self.string)?)?;
        env.raw_set("table", copy(lua, &self.table)?)?;
        env.raw_set("utf8", copy(lua, &self.utf8)?)?;
        env.raw_set("math", self.fresh_math(lua)?)?;
        Ok(env)
    }

    /// A newly opened `math` (its own random state), leaving the VM's own in place.
    fn fresh_math(&self, lua: &Lua) -> mlua::Result<Table> {
        let loaded: Table = lua.named_registry_value("_LOADED")?;
        let globals = lua.globals();
        loaded.raw_set("math", Value::Nil)?;
        lua.load_std_libs(StdLib::MATH)?;
        let fresh: Table = globals.get("math")?;
        globals.raw_set("math", self.math.clone())?;
        loaded.raw_set("math", self.math.clone())?;
        Ok(fresh)
    }
}

/// A new table with the same entries (library tables hold functions and constants only).
fn copy(lua: &Lua, from: &Table) -> mlua::Result<Table> {
    let to = lua.create_table()?;
    for pair in from.pairs::<Value, Value>() {
        let (k, v) = pair?;
        to.raw_set(k, v)?;
    }
    Ok(to)
}

/// The string Lua's string functions would see for this argument (numbers are converted).
fn coerced(lua: &Lua, value: Value) -> mlua::Result<Option<mlua::LuaString>> {
    match value {
        Value::String(s) => Ok(Some(s)),
        Value::Integer(_) | Value::Number(_) => lua.coerce_string(value),
        _ => Ok(None),
    }
}
