//! The contract a policy file's table must meet: known fields only, hooks that are
//! functions, command and response filters naming what exists, a name.

use std::collections::HashSet;
use std::sync::Arc;

use mlua::{Function, Value};

use super::lua::{HOOKS, PolicyMeta, VmPolicy, all_command_labels, flatten_error, hook_index};
use super::{PolicyError, api};
use crate::config::OnError;

/// Checks the table a policy file returned against the hook contract.
pub(super) fn contract(
    path: &str,
    default_name: &str,
    value: Value,
    (on_error, on_state_error): (OnError, OnError),
) -> Result<(PolicyMeta, VmPolicy), PolicyError> {
    let bad = |message: String| PolicyError::Contract {
        path: path.to_string(),
        message,
    };
    let Value::Table(t) = value else {
        return Err(bad(format!(
            "a policy must return a table, this one returns a {}",
            value.type_name()
        )));
    };
    let known = [
        "name",
        "commands",
        "responses",
        "completes",
        "on_connect",
        "on_capability",
        "on_command",
        "on_response",
        "on_complete",
        "on_disconnect",
        "on_login",
    ];
    for pair in t.pairs::<Value, Value>() {
        let (k, _) = pair.map_err(|e| bad(flatten_error(&e)))?;
        let key = match &k {
            Value::String(s) => s.to_string_lossy(),
            other => {
                return Err(bad(format!(
                    "unexpected {} key in the policy table",
                    other.type_name()
                )));
            }
        };
        if !known.contains(&key.as_str()) {
            return Err(bad(format!(
                "unknown field `{key}` in the policy table (known: {})",
                known.join(", ")
            )));
        }
    }
    let name = match t.get::<Value>("name").map_err(|e| bad(flatten_error(&e)))? {
        Value::Nil => default_name.to_string(),
        Value::String(s) => s.to_string_lossy(),
        other => {
            return Err(bad(format!(
                "`name` must be a string, not {}",
                other.type_name()
            )));
        }
    };
    let list = |field: &str,
                valid: &dyn Fn(&str) -> bool|
     -> Result<Option<HashSet<String>>, PolicyError> {
        match t.get::<Value>(field).map_err(|e| bad(flatten_error(&e)))? {
            Value::Nil => Ok(None),
            Value::Table(items) => {
                let mut set = HashSet::new();
                for item in items.sequence_values::<String>() {
                    let item =
                        item.map_err(|_| bad(format!("`{field}` must be a list of strings")))?;
                    let upper = item.to_ascii_uppercase();
                    if !valid(&upper) {
                        return Err(bad(format!(
                            "`{field}` names `{item}`, which is not a known name"
                        )));
                    }
                    set.insert(upper);
                }
                Ok(Some(set))
            }
            other => Err(bad(format!(
                "`{field}` must be a list, not {}",
                other.type_name()
            ))),
        }
    };
    let labels = all_command_labels();
    let commands = list("commands", &|s| labels.contains(&s))?;
    let completes = list("completes", &|s| labels.contains(&s))?;
    let responses = list("responses", &|s| {
        api::RESPONSE_KINDS.iter().any(|k| k.as_str() == s)
    })?;
    let mut hooks: [Option<Function>; 7] = Default::default();
    let mut has = [false; 7];
    for hook in HOOKS {
        match t
            .get::<Value>(hook.as_str())
            .map_err(|e| bad(flatten_error(&e)))?
        {
            Value::Nil => {}
            Value::Function(f) => {
                hooks[hook_index(hook)] = Some(f);
                has[hook_index(hook)] = true;
            }
            other => {
                return Err(bad(format!(
                    "`{}` must be a function, not {}",
                    hook.as_str(),
                    other.type_name()
                )));
            }
        }
    }
    Ok((
        PolicyMeta {
            name: Arc::from(name.as_str()),
            commands,
            responses,
            completes,
            has,
            on_error,
            on_state_error,
        },
        VmPolicy { hooks },
    ))
}
