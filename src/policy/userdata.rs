//! What policies hold of the host as Lua userdata: `ctx.vars` (kept in Rust, surviving
//! reloads) and `caps` (the capability list `on_capability` edits).

use std::sync::Arc;

use mlua::{MetaMethod, UserData, UserDataMethods, Value};

use super::Var;
use crate::imap::capability::CapabilitySet;

pub(super) fn peer_ip(peer: &str) -> &str {
    match peer.rsplit_once(':') {
        Some((ip, _)) => ip.trim_start_matches('[').trim_end_matches(']'),
        None => peer,
    }
}

/// `ctx.vars`: reads and writes go to the connection's Rust-side map, which outlives reloads.
pub(super) struct VarsHandle(pub(super) super::Vars, pub(super) Arc<str>);

/// Most variables one policy may keep per connection.
const MAX_VARS: usize = 256;

impl UserData for VarsHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |lua, this, key: String| {
            let map = this
                .0
                .lock()
                .map_err(|_| mlua::Error::RuntimeError("vars unavailable".into()))?;
            Ok(match map.get(&this.1).and_then(|vars| vars.get(&key)) {
                None => Value::Nil,
                Some(Var::Bool(b)) => Value::Boolean(*b),
                Some(Var::Int(i)) => Value::Integer(*i),
                Some(Var::Number(n)) => Value::Number(*n),
                Some(Var::Str(s)) => Value::String(lua.create_string(s)?),
            })
        });
        methods.add_meta_method(
            MetaMethod::NewIndex,
            |_, this, (key, value): (String, Value)| {
                let var = match value {
                    Value::Nil => None,
                    Value::Boolean(b) => Some(Var::Bool(b)),
                    Value::Integer(i) => Some(Var::Int(i)),
                    Value::Number(n) => Some(Var::Number(n)),
                    Value::String(s) => Some(Var::Str(s.to_str()?.to_string())),
                    other => {
                        return Err(mlua::Error::RuntimeError(format!(
                            "ctx.vars holds booleans, numbers and strings, not {}",
                            other.type_name()
                        )));
                    }
                };
                let mut map = this
                    .0
                    .lock()
                    .map_err(|_| mlua::Error::RuntimeError("vars unavailable".into()))?;
                match var {
                    None => {
                        if let Some(vars) = map.get_mut(&this.1) {
                            vars.remove(&key);
                        }
                    }
                    Some(v) => {
                        let vars = map.entry(this.1.clone()).or_default();
                        if vars.len() >= MAX_VARS && !vars.contains_key(&key) {
                            return Err(mlua::Error::RuntimeError("too many ctx.vars".into()));
                        }
                        vars.insert(key, v);
                    }
                }
                Ok(())
            },
        );
    }
}

impl UserData for CapabilitySet {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("has", |_, this, name: String| Ok(this.has(&name)));
        methods.add_method_mut("add", |_, this, name: String| {
            if !crate::imap::encode::is_valid_atom(name.as_bytes()) {
                return Err(mlua::Error::RuntimeError(format!(
                    "{name:?} is not a valid capability name"
                )));
            }
            this.add(&name);
            Ok(())
        });
        methods.add_method_mut("remove", |_, this, name: String| {
            this.remove(&name);
            Ok(())
        });
        methods.add_method_mut("remove_prefix", |_, this, prefix: String| {
            let prefix = prefix.to_ascii_uppercase();
            this.retain(|c| !c.to_ascii_uppercase().starts_with(&prefix));
            Ok(())
        });
        methods.add_method("list", |_, this, ()| Ok(this.names().to_vec()));
    }
}
