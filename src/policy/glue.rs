//! The glue between views and Lua: the per-hook arguments and results of the calls that can
//! wait ([`Glue`] for commands, logins and completions), the trusted shims that build `cmd`
//! and `resp` inside Lua, and the conversions of names, flags, namespaces and verdicts.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use mlua::{Function, Lua, LuaString, MultiValue, Table, Value};

use super::lua::{PolicyMeta, Vm, all_command_labels};
use super::views::{
    CommandView, Completed, LoginView, Namespace, NamespaceEntry, ROLES, is_list_flag, role_name,
};
use super::waiting::Glue;
use super::{Hook, Verdict, api};
use crate::imap::response::Status;

impl Glue for CommandView {
    const HOOK: Hook = Hook::Command;

    fn command(&self) -> Option<&'static str> {
        Some(self.name)
    }

    fn wants(meta: &PolicyMeta, command: Option<&'static str>) -> bool {
        command.is_none_or(|name| meta.commands.as_ref().is_none_or(|c| c.contains(name)))
    }

    fn prepare<'v>(&self, vm: &'v Vm) -> mlua::Result<(Option<&'v Function>, MultiValue)> {
        let lua = &vm.lua;
        let mut args = MultiValue::with_capacity(5 + 2 * self.mailboxes.len());
        args.push_back(Value::String(lua.create_string(&self.tag)?));
        args.push_back(vm.names.get(lua, self.name)?);
        args.push_back(Value::Integer(
            i64::try_from(self.delayed_ms).unwrap_or(i64::MAX),
        ));
        args.push_back(match &self.user {
            Some(u) => Value::String(lua.create_string(u)?),
            None => Value::Nil,
        });
        push_slots(vm, &mut args, &self.mailboxes)?;
        Ok((Some(&vm.command_shim), args))
    }

    fn finish(&mut self, mut ret: MultiValue) -> mlua::Result<Verdict> {
        let verdict = ret.pop_front().unwrap_or(Value::Nil);
        read_back_names(ret, &mut self.mailboxes)?;
        verdict_of(verdict)
    }
}

impl Glue for LoginView {
    const HOOK: Hook = Hook::Login;

    fn command(&self) -> Option<&'static str> {
        Some("LOGIN")
    }

    fn wants(_: &PolicyMeta, _: Option<&'static str>) -> bool {
        true
    }

    fn prepare<'v>(&self, vm: &'v Vm) -> mlua::Result<(Option<&'v Function>, MultiValue)> {
        let t = vm.lua.create_table()?;
        t.raw_set("user", self.user.as_deref())?;
        t.raw_set("mechanism", self.mechanism.as_str())?;
        t.raw_set(
            "delayed_ms",
            i64::try_from(self.delayed_ms).unwrap_or(i64::MAX),
        )?;
        Ok((None, MultiValue::from_iter([Value::Table(t)])))
    }

    fn finish(&mut self, mut ret: MultiValue) -> mlua::Result<Verdict> {
        verdict_of(ret.pop_front().unwrap_or(Value::Nil))
    }
}

impl Glue for Completed {
    const HOOK: Hook = Hook::Complete;

    fn command(&self) -> Option<&'static str> {
        Some(self.name)
    }

    fn wants(meta: &PolicyMeta, command: Option<&'static str>) -> bool {
        let filter = meta.completes.as_ref().or(meta.commands.as_ref());
        command.is_none_or(|name| filter.is_none_or(|c| c.contains(name)))
    }

    fn prepare<'v>(&self, vm: &'v Vm) -> mlua::Result<(Option<&'v Function>, MultiValue)> {
        let lua = &vm.lua;
        let cmd = lua.create_table()?;
        cmd.raw_set("tag", self.tag.as_str())?;
        cmd.raw_set("name", vm.names.get(lua, self.name)?)?;
        cmd.raw_set("code", self.code.as_deref())?;
        Ok((
            None,
            MultiValue::from_iter([Value::Table(cmd), vm.names.get(lua, self.status.as_str())?]),
        ))
    }

    fn finish(&mut self, mut ret: MultiValue) -> mlua::Result<Verdict> {
        verdict_of(ret.pop_front().unwrap_or(Value::Nil))
    }
}

/// Glue that builds the `cmd`/`resp` tables inside Lua (much cheaper than field by field from
/// Rust) and returns, per mailbox name, `false` when the hook left it as it was or what it is
/// now (so an unchanged name costs no string on the way back). Trusted code, outside the
/// sandbox.
pub(super) const SHIMS: &str = r#"
local unpack, type, error = table.unpack, type, error
local function must_be_string(name, i)
  if type(name) ~= "string" then
    error("mailboxes[" .. i .. "] must stay a string, not " .. type(name), 0)
  end
  return name
end
local function split(n, ...)
  local mailboxes, roles = { ... }, {}
  for i = 1, n do roles[i] = mailboxes[n + i]; mailboxes[n + i] = nil end
  return mailboxes, roles
end
local function changed(now, n, ...)
  local out = { ... }
  for i = 1, n do
    local name = now[i]
    if name == out[i] then out[i] = false else out[i] = must_be_string(name, i) end
  end
  return unpack(out, 1, n)
end
-- One mailbox (most hooked messages) and none are straight-line: no varargs tables.
local function command(f, ctx, tag, name, delayed_ms, user, n, ...)
  if n == 1 then
    local was, role = ...
    local cmd = { tag = tag, name = name, mailboxes = { was }, roles = { role }, delayed_ms = delayed_ms, user = user }
    local verdict = f(ctx, cmd)
    local now = cmd.mailboxes[1]
    if now == was then return verdict, false end
    return verdict, must_be_string(now, 1)
  end
  if n == 0 then
    return (f(ctx, { tag = tag, name = name, mailboxes = {}, roles = {}, delayed_ms = delayed_ms, user = user }))
  end
  local mailboxes, roles = split(n, ...)
  local cmd = { tag = tag, name = name, mailboxes = mailboxes, roles = roles, delayed_ms = delayed_ms, user = user }
  local verdict = f(ctx, cmd)
  return verdict, changed(cmd.mailboxes, n, ...)
end
local function response(f, ctx, kind, delimiter, namespace, flags, n, ...)
  if n == 1 then
    local was, role = ...
    local resp = { kind = kind, mailboxes = { was }, roles = { role }, delimiter = delimiter, namespace = namespace, flags = flags }
    local verdict = f(ctx, resp)
    local now = resp.mailboxes[1]
    if now == was then now = false else now = must_be_string(now, 1) end
    return verdict, resp.delimiter, resp.namespace, resp.flags, now
  end
  local mailboxes, roles = split(n, ...)
  local resp = { kind = kind, mailboxes = mailboxes, roles = roles, delimiter = delimiter, namespace = namespace, flags = flags }
  local verdict = f(ctx, resp)
  return verdict, resp.delimiter, resp.namespace, resp.flags, changed(resp.mailboxes, n, ...)
end
return command, response
"#;

/// Strings hooks are given over and over (command labels, response kinds, mailbox roles,
/// statuses), made once per VM: a string made from Rust costs a protected call while the VM
/// has a memory limit, one kept here only a reference.
pub(super) struct Names(HashMap<&'static str, LuaString, BuildHasherDefault<Fnv>>);

/// FNV-1a: the names are a few short fixed strings, hashed on every hook call; SipHash's
/// resistance to chosen keys buys nothing here and costs more than the lookup.
pub(super) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl Names {
    pub(super) fn new(lua: &Lua) -> mlua::Result<Names> {
        let mut names = HashMap::default();
        let roles = ROLES.map(role_name);
        let statuses = [Status::Ok, Status::No, Status::Bad].map(Status::as_str);
        let kinds = api::RESPONSE_KINDS.iter().map(|k| k.as_str());
        for name in all_command_labels()
            .into_iter()
            .chain(kinds)
            .chain(roles)
            .chain(statuses)
        {
            names.insert(name, lua.create_string(name)?);
        }
        Ok(Names(names))
    }

    /// `name` as a Lua string (kept, or made now if it is not one of the kept ones).
    pub(super) fn get(&self, lua: &Lua, name: &'static str) -> mlua::Result<Value> {
        match self.0.get(name) {
            Some(s) => Ok(Value::String(s.clone())),
            None => lua.create_string(name).map(Value::String),
        }
    }
}

/// Calls hook `f` with `ctx` and the arguments [`Glue::prepare`] made: through the shim, if
/// it gave one.
pub(super) fn invoke(
    shim: Option<&Function>,
    f: &Function,
    ctx: &Table,
    rest: &MultiValue,
) -> mlua::Result<MultiValue> {
    match shim {
        Some(shim) => shim.call((f, ctx, rest)),
        None => f.call((ctx, rest)),
    }
}

/// `n, names..., roles...` as the shims take them.
pub(super) fn push_slots(
    vm: &Vm,
    args: &mut MultiValue,
    slots: &[super::MailboxSlot],
) -> mlua::Result<()> {
    args.push_back(Value::Integer(i64::try_from(slots.len()).unwrap_or(0)));
    for slot in slots {
        args.push_back(Value::String(vm.lua.create_string(&slot.name)?));
    }
    for slot in slots {
        args.push_back(vm.names.get(&vm.lua, slot.role_str())?);
    }
    Ok(())
}

pub(super) fn read_back_names(
    values: MultiValue,
    slots: &mut [super::MailboxSlot],
) -> mlua::Result<()> {
    for (i, (value, slot)) in values.into_iter().zip(slots.iter_mut()).enumerate() {
        match value {
            // The shim's "left as it was".
            Value::Boolean(false) => {}
            Value::String(s) => {
                let s = s.to_str()?;
                if *s != *slot.name {
                    slot.name = s.to_string();
                }
            }
            other => {
                return Err(mlua::Error::RuntimeError(format!(
                    "mailboxes[{}] must stay a string, not {}",
                    i + 1,
                    other.type_name()
                )));
            }
        }
    }
    Ok(())
}

/// `resp.flags` back from Lua: a list of `\\atom` or atom strings on LIST/LSUB, absent elsewhere.
pub(super) fn read_back_flags(
    value: Value,
    listing: bool,
    flags: &mut Vec<String>,
) -> mlua::Result<()> {
    let err = |m: String| Err(mlua::Error::RuntimeError(m));
    let t = match value {
        Value::Nil if !listing => return Ok(()),
        Value::Table(t) if listing => t,
        other if listing => {
            return err(format!(
                "resp.flags must stay a list of strings, not {}",
                other.type_name()
            ));
        }
        _ => return err("resp.flags exists only on LIST and LSUB responses".into()),
    };
    let mut same = t.raw_len() == flags.len();
    if same {
        for (i, flag) in flags.iter().enumerate() {
            match t.raw_get::<Value>(i + 1)? {
                Value::String(s) if s.as_bytes() == flag.as_bytes() => {}
                _ => {
                    same = false;
                    break;
                }
            }
        }
    }
    if same {
        return Ok(());
    }
    let mut changed = Vec::with_capacity(t.raw_len());
    for value in t.sequence_values::<Value>() {
        let flag = match value? {
            Value::String(s) => s.to_str()?.to_string(),
            other => {
                return err(format!(
                    "resp.flags holds strings, not {}",
                    other.type_name()
                ));
            }
        };
        if !is_list_flag(&flag) {
            return err(format!(
                "{flag:?} is not a mailbox attribute (\\atom or atom)"
            ));
        }
        changed.push(flag);
    }
    *flags = changed;
    Ok(())
}

pub(super) fn namespace_to_lua(lua: &Lua, ns: &Namespace) -> mlua::Result<Table> {
    let n = lua.create_table()?;
    for (key, entries) in [
        ("personal", &ns.personal),
        ("other", &ns.other),
        ("shared", &ns.shared),
    ] {
        let list = lua.create_table()?;
        for (i, e) in entries.iter().enumerate() {
            let entry = lua.create_table()?;
            entry.set("prefix", e.prefix.as_str())?;
            if let Some(d) = &e.delimiter {
                entry.set("delimiter", d.as_str())?;
            }
            list.raw_set(i + 1, entry)?;
        }
        n.set(key, list)?;
    }
    Ok(n)
}

pub(super) fn namespace_from_lua(value: Value) -> mlua::Result<Namespace> {
    let Value::Table(n) = value else {
        return Err(mlua::Error::RuntimeError(
            "resp.namespace must stay a table".into(),
        ));
    };
    let mut ns = Namespace::default();
    for (key, slot) in [
        ("personal", &mut ns.personal),
        ("other", &mut ns.other),
        ("shared", &mut ns.shared),
    ] {
        if let Some(list) = n.get::<Option<Table>>(key)? {
            for entry in list.sequence_values::<Table>() {
                let entry = entry?;
                slot.push(NamespaceEntry {
                    prefix: entry.get("prefix")?,
                    delimiter: entry.get("delimiter")?,
                });
            }
        }
    }
    Ok(ns)
}

/// Reads a hook's return value: nothing is pass; a verdict table from `imap.*` is its verdict.
pub(super) fn verdict_of(value: Value) -> mlua::Result<Verdict> {
    let t = match value {
        Value::Nil => return Ok(Verdict::Pass),
        Value::Table(t) => t,
        other => {
            return Err(mlua::Error::RuntimeError(format!(
                "a hook returns nothing or an imap.* verdict, not {}",
                other.type_name()
            )));
        }
    };
    api::verdict_from_table(&t)
}
