//! The Lua host: a small pool of sandboxed Lua 5.4 VMs, the policies loaded into each, and the
//! calls into their hooks, one policy after another, each under its budget (see
//! [`super::budget`]).
//!
//! Every VM holds every policy, each in an environment of its own with its own copies of the
//! libraries (see [`super::sandbox`]), so one policy cannot see or change what another runs. A
//! connection always uses the same VM (`id % vms`), so the VMs' locks are rarely contended.
//! What a policy file must return is [`super::contract`]; the arguments and results of each
//! hook are [`super::glue`]; hooks that wait for Redis are [`super::waiting`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaOptions, MultiValue, StdLib, Table, Value};

use super::api::{self, HostShared};
use super::budget::{self, Budget};
use super::contract::contract;
use super::glue::{
    Names, SHIMS, invoke, namespace_from_lua, namespace_to_lua, push_slots, read_back_flags,
    read_back_names, verdict_of,
};
use super::sandbox::Sandbox;
use super::userdata::{VarsHandle, peer_ip};
use super::views::{CommandView, CompleteView, Completed, LoginView, ResponseView};
use super::waiting::{Call, Failure, Glue};
use super::{ConnCtx, Decision, Hook, PolicyError, Verdict, path_name};
use crate::config::{LuaConfig, OnError, PolicyConfig};
use crate::imap::capability::CapabilitySet;
use crate::imap::command::{CommandKind, CommandName};
use crate::imap::response::{DataKind, Status};

pub(super) const HOOKS: [Hook; 7] = [
    Hook::Connect,
    Hook::Capability,
    Hook::Command,
    Hook::Response,
    Hook::Complete,
    Hook::Disconnect,
    Hook::Login,
];

pub(super) fn hook_index(hook: Hook) -> usize {
    match hook {
        Hook::Connect => 0,
        Hook::Capability => 1,
        Hook::Command => 2,
        Hook::Response => 3,
        Hook::Complete => 4,
        Hook::Disconnect => 5,
        Hook::Login => 6,
    }
}

/// What is known of a policy independently of the VM it is loaded in.
#[derive(Debug)]
pub(super) struct PolicyMeta {
    pub(super) name: Arc<str>,
    pub(super) commands: Option<HashSet<String>>,
    pub(super) responses: Option<HashSet<String>>,
    /// `on_complete` filter; `None` means the `commands` filter applies.
    pub(super) completes: Option<HashSet<String>>,
    pub(super) has: [bool; 7],
    pub(super) on_error: OnError,
    pub(super) on_state_error: OnError,
}

pub(super) struct VmPolicy {
    pub(super) hooks: [Option<Function>; 7],
}

pub(super) struct Vm {
    /// One hook call at a time per VM; held for the whole call, budget included.
    pub(super) turn: std::sync::Mutex<()>,
    pub(super) lua: Lua,
    pub(super) budget: Arc<Budget>,
    pub(super) policies: Vec<VmPolicy>,
    pub(super) command_shim: Function,
    response_shim: Function,
    pub(super) names: Names,
    /// `__newindex` of every ctx proxy: ctx is read-only to policies.
    readonly: Function,
}

impl Vm {
    /// Exclusive use of the VM for one call that runs without waiting, asked for at `asked`;
    /// and when the call got it.
    fn take_turn(&self, asked: Instant) -> (std::sync::MutexGuard<'_, ()>, Instant) {
        budget::take_turn_at(&self.turn, asked)
    }
}

/// A loaded set of policies.
pub struct PolicySet {
    /// Unique per loaded set, so a connection's cached ctx table is never used with another.
    generation: u64,
    pub(super) meta: Vec<PolicyMeta>,
    pub(super) vms: Vec<Vm>,
    /// Command labels some `on_command` hook wants, with `*` for "all".
    command_hooked: HashSet<&'static str>,
    /// Command labels some `on_complete` hook wants.
    complete_hooked: HashSet<&'static str>,
    response_hooked: HashSet<&'static str>,
    any: [bool; 7],
    pub(super) instructions: u64,
    pub(super) time: Duration,
    /// Hooks may wait for shared state (`[state]` is configured): see [`super::waiting`].
    pub(super) waits: bool,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("policies", &self.names())
            .field("vms", &self.vms.len())
            .finish()
    }
}

fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Every command label a filter can name.
pub(super) fn all_command_labels() -> Vec<&'static str> {
    let mut labels = Vec::new();
    for &kind in CommandKind::ALL.iter().chain([CommandKind::Other].iter()) {
        for uid in [false, true] {
            let label = CommandName { kind, uid }.label();
            if !labels.contains(&label) {
                labels.push(label);
            }
        }
    }
    labels
}

impl PolicySet {
    pub fn empty() -> PolicySet {
        PolicySet {
            generation: next_generation(),
            meta: Vec::new(),
            vms: Vec::new(),
            command_hooked: HashSet::new(),
            complete_hooked: HashSet::new(),
            response_hooked: HashSet::new(),
            any: [false; 7],
            instructions: 0,
            time: Duration::ZERO,
            waits: false,
        }
    }

    pub fn load(
        configs: &[PolicyConfig],
        cfg: &LuaConfig,
        shared: Arc<HostShared>,
    ) -> Result<PolicySet, PolicyError> {
        if configs.is_empty() {
            return Ok(PolicySet::empty());
        }
        let mut sources = Vec::new();
        for c in configs {
            let text = std::fs::read_to_string(&c.script).map_err(|source| PolicyError::Read {
                path: path_name(&c.script),
                source,
            })?;
            sources.push(text);
        }
        let n = if cfg.vms == 0 {
            std::thread::available_parallelism().map_or(2, usize::from)
        } else {
            cfg.vms
        };
        let mut vms = Vec::with_capacity(n);
        let mut meta = Vec::new();
        for i in 0..n {
            let (vm, m) = load_vm(configs, &sources, cfg, &shared)?;
            if i == 0 {
                meta = m;
            }
            vms.push(vm);
        }
        let mut names = HashSet::new();
        for (m, c) in meta.iter().zip(configs) {
            // Names key metrics, the audit log, ctx.vars, rate limits and shared counters.
            if !names.insert(m.name.clone()) {
                return Err(PolicyError::Contract {
                    path: path_name(&c.script),
                    message: format!("another policy is already named `{}`", m.name),
                });
            }
        }
        let mut command_hooked = HashSet::new();
        let mut complete_hooked = HashSet::new();
        let mut response_hooked = HashSet::new();
        let mut any = [false; 7];
        for m in &meta {
            for (slot, has) in any.iter_mut().zip(m.has) {
                *slot |= has;
            }
            if m.has[hook_index(Hook::Command)] {
                for label in all_command_labels() {
                    if m.commands.as_ref().is_none_or(|c| c.contains(label)) {
                        command_hooked.insert(label);
                    }
                }
            }
            if m.has[hook_index(Hook::Complete)] {
                let filter = m.completes.as_ref().or(m.commands.as_ref());
                for label in all_command_labels() {
                    if filter.is_none_or(|c| c.contains(label)) {
                        complete_hooked.insert(label);
                    }
                }
            }
            if m.has[hook_index(Hook::Response)] {
                for kind in api::RESPONSE_KINDS {
                    let label = kind.as_str();
                    if m.responses.as_ref().is_none_or(|r| r.contains(label)) {
                        response_hooked.insert(label);
                    }
                }
            }
        }
        Ok(PolicySet {
            generation: next_generation(),
            meta,
            vms,
            command_hooked,
            complete_hooked,
            response_hooked,
            any,
            instructions: cfg.instructions,
            time: Duration::from_millis(cfg.time_ms),
            waits: shared.waits(),
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.meta.iter().map(|m| m.name.to_string()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Whether any policy's `on_command` wants this command. False means: do not enter Lua.
    pub fn hooks_command(&self, name: CommandName) -> bool {
        !self.command_hooked.is_empty() && self.command_hooked.contains(name.label())
    }

    /// Whether any policy's `on_complete` wants the completion of this command.
    pub fn hooks_complete(&self, name: &str) -> bool {
        !self.complete_hooked.is_empty() && self.complete_hooked.contains(name)
    }

    /// Whether any policy's `on_response` wants this untagged kind.
    pub fn hooks_response(&self, kind: DataKind) -> bool {
        !self.response_hooked.is_empty() && self.response_hooked.contains(kind.as_str())
    }

    pub fn has_hook(&self, hook: Hook) -> bool {
        self.any[hook_index(hook)]
    }

    fn vm(&self, ctx: &ConnCtx) -> Option<&Vm> {
        let n = self.vms.len() as u64;
        if n == 0 {
            return None;
        }
        self.vms.get((ctx.info.id % n) as usize)
    }

    /// This connection's `ctx` table for one policy in its VM: built once, refreshed when the
    /// connection's info changed. Lua reads it as a plain table (fast), through a read-only
    /// proxy; each policy has its own proxy (holding its own `ctx.vars`), so not even `rawset`
    /// on ctx reaches another policy.
    pub(super) fn ctx_table(
        &self,
        vm: &Vm,
        ctx: &mut ConnCtx,
        policy: usize,
    ) -> mlua::Result<Table> {
        self.ctx_proxy(vm, ctx, policy).cloned()
    }

    /// [`PolicySet::ctx_table`], borrowed from the connection.
    fn ctx_proxy<'c>(
        &self,
        vm: &Vm,
        ctx: &'c mut ConnCtx,
        policy: usize,
    ) -> mlua::Result<&'c Table> {
        let fresh = ctx
            .lua
            .as_ref()
            .is_some_and(|c| c.set == self.generation && c.version == ctx.version);
        if !fresh {
            self.refresh_ctx(vm, ctx)?;
        }
        ctx.lua
            .as_ref()
            .and_then(|c| c.proxies.get(policy))
            .ok_or_else(|| mlua::Error::RuntimeError("no such policy".into()))
    }

    /// Builds the connection's ctx tables, or brings them up to date with its info.
    fn refresh_ctx(&self, vm: &Vm, ctx: &mut ConnCtx) -> mlua::Result<()> {
        let (proxies, real) = match ctx.lua.take() {
            Some(c) if c.set == self.generation => (c.proxies, c.real),
            _ => {
                let real = vm.lua.create_table()?;
                let mt = vm.lua.create_table()?;
                mt.raw_set("__index", real.clone())?;
                mt.raw_set("__newindex", vm.readonly.clone())?;
                mt.raw_set("__metatable", false)?;
                let mut proxies = Vec::with_capacity(self.meta.len());
                for meta in &self.meta {
                    let proxy = vm.lua.create_table()?;
                    proxy.raw_set("vars", VarsHandle(ctx.vars.clone(), meta.name.clone()))?;
                    proxy.set_metatable(Some(mt.clone()))?;
                    proxies.push(proxy);
                }
                (proxies, real)
            }
        };
        let info = &ctx.info;
        real.raw_set("id", i64::try_from(info.id).unwrap_or(i64::MAX))?;
        real.raw_set("peer", info.peer.as_str())?;
        real.raw_set("peer_ip", peer_ip(&info.peer))?;
        real.raw_set("listener", info.listener.as_str())?;
        real.raw_set("tls", info.tls)?;
        real.raw_set("sni", info.sni.as_deref())?;
        real.raw_set("user", info.user.as_deref())?;
        real.raw_set("state", info.state)?;
        real.raw_set("selected", info.selected.as_deref())?;
        ctx.lua = Some(LuaCtx {
            set: self.generation,
            version: ctx.version,
            proxies,
            real,
        });
        Ok(())
    }

    /// Runs one hook of one policy and records the decision. `Ok` carries a verdict the hook
    /// can apply; `Err` a failure (a Lua error, an exceeded budget, a verdict the hook
    /// cannot apply, or shared state that failed), already recorded as action `error`.
    fn call(
        &self,
        ctx: &mut ConnCtx,
        policy: usize,
        hook: Hook,
        command: Option<&'static str>,
        run: &mut dyn FnMut(&Vm, &Function, &Table) -> mlua::Result<Verdict>,
    ) -> Option<Result<Verdict, Failure>> {
        let vm = self.vm(ctx)?;
        let f = vm.policies.get(policy)?.hooks[hook_index(hook)].as_ref()?;
        let started = Instant::now();
        let (turn, running) = vm.take_turn(started);
        budget::arm(&vm.lua, &vm.budget, running, (self.instructions, self.time));
        let result = self.ctx_proxy(vm, ctx, policy).and_then(|c| run(vm, f, c));
        let state = vm.budget.take_state_failure();
        drop(turn);
        let call = Call {
            policy,
            hook,
            command,
            started,
        };
        Some(self.settle(&call, result, state, &mut ctx.decisions))
    }

    /// What one call came to: checked against the hook's contract and recorded as a decision.
    pub(super) fn settle(
        &self,
        call: &Call,
        result: mlua::Result<Verdict>,
        state: Option<String>,
        decisions: &mut Vec<Decision>,
    ) -> Result<Verdict, Failure> {
        let hook = call.hook;
        let result = match (result, state) {
            // The hook failed after shared state did (the error went through, or the wait
            // took its time budget): `on_state_error` decides. A script that caught the error
            // with `pcall` decided for itself, and its verdict stands.
            (Err(_), Some(why)) => Err(Failure::State(format!("shared state: {why}"))),
            (result, _) => result
                .map_err(|e| Failure::Hook(flatten_error(&e)))
                .and_then(|v| {
                    if hook.allows(&v) {
                        Ok(v)
                    } else {
                        Err(Failure::Hook(format!(
                            "{} cannot apply a {} verdict (it may return {})",
                            hook.as_str(),
                            v.action(),
                            hook.verdicts()
                        )))
                    }
                }),
        };
        let meta = &self.meta[call.policy];
        let (action, code, error) = match &result {
            Ok(v) => (
                v.action(),
                match v {
                    Verdict::Reject { code, .. } => code.clone(),
                    _ => None,
                },
                None,
            ),
            Err(Failure::Hook(e) | Failure::State(e)) => ("error", None, Some(e.clone())),
        };
        if let Some(e) = &error {
            tracing::warn!(policy = %meta.name, hook = hook.as_str(), error = %e, "policy hook failed");
        }
        decisions.push(Decision {
            policy: meta.name.clone(),
            hook,
            action,
            code,
            command: call.command,
            elapsed: call.started.elapsed(),
            error,
        });
        result
    }

    /// What a failed call of a policy means: `None` to go on as if it passed.
    pub(super) fn failure_verdict(
        &self,
        policy: usize,
        hook: Hook,
        failure: &Failure,
    ) -> Option<Verdict> {
        let meta = &self.meta[policy];
        match failure {
            Failure::Hook(_) => failed(hook, meta.on_error),
            Failure::State(_) => state_failed(hook, meta.on_state_error),
        }
    }

    /// Runs one hook of every interested policy in order: rewrites compose, the first verdict
    /// other than pass wins, and a failure is handled by the failing policy's `on_error` (or
    /// `on_state_error`, when its shared state failed).
    fn chain(
        &self,
        ctx: &mut ConnCtx,
        hook: Hook,
        command: Option<&'static str>,
        wants: impl Fn(&PolicyMeta) -> bool,
        run: &mut dyn FnMut(&Vm, &Function, &Table) -> mlua::Result<Verdict>,
    ) -> Verdict {
        if !self.has_hook(hook) {
            return Verdict::Pass;
        }
        for i in 0..self.meta.len() {
            if !self.meta[i].has[hook_index(hook)] || !wants(&self.meta[i]) {
                continue;
            }
            match self.call(ctx, i, hook, command, run) {
                None | Some(Ok(Verdict::Pass)) => {}
                Some(Ok(v)) => return v,
                Some(Err(failure)) => {
                    if let Some(v) = self.failure_verdict(i, hook, &failure) {
                        return v;
                    }
                }
            }
        }
        Verdict::Pass
    }

    /// `on_connect`: [`Verdict::Pass`] or [`Verdict::Close`].
    #[must_use]
    pub fn on_connect(&self, ctx: &mut ConnCtx) -> Verdict {
        self.chain(ctx, Hook::Connect, None, |_| true, &mut |_, f, c| {
            verdict_of(f.call::<Value>(c)?)
        })
    }

    /// `on_disconnect`: the connection is gone, nothing can be applied (a verdict returned is
    /// still recorded as an error).
    pub fn on_disconnect(&self, ctx: &mut ConnCtx) {
        let _ = self.chain(ctx, Hook::Disconnect, None, |_| true, &mut |_, f, c| {
            verdict_of(f.call::<Value>(c)?)
        });
    }

    /// `on_capability`, which may change `caps`: [`Verdict::Pass`] or [`Verdict::Close`].
    #[must_use]
    pub fn on_capability(&self, ctx: &mut ConnCtx, caps: &mut CapabilitySet) -> Verdict {
        self.chain(ctx, Hook::Capability, None, |_| true, &mut |vm, f, c| {
            vm.lua.scope(|scope| {
                let caps = scope.create_userdata_ref_mut(&mut *caps)?;
                verdict_of(f.call::<Value>((c, caps))?)
            })
        })
    }

    /// `on_command`, which may change the view's mailbox names: [`Verdict::Pass`],
    /// [`Verdict::Reject`], [`Verdict::Close`] or [`Verdict::Delay`].
    #[must_use]
    pub fn on_command(&self, ctx: &mut ConnCtx, cmd: &mut CommandView) -> Verdict {
        self.chain_glue(ctx, cmd)
    }

    /// Runs the hook a glue object is for, without waiting (state calls, if any, must answer
    /// at once).
    pub(super) fn chain_glue<G: Glue>(&self, ctx: &mut ConnCtx, glue: &mut G) -> Verdict {
        let command = glue.command();
        self.chain(
            ctx,
            G::HOOK,
            command,
            |m| G::wants(m, command),
            &mut |vm, f, c| {
                let (shim, rest) = glue.prepare(vm)?;
                glue.finish(invoke(shim, f, c, &rest)?)
            },
        )
    }

    /// `on_response`, which may change the view: [`Verdict::Pass`], [`Verdict::Drop`],
    /// [`Verdict::Close`], or, when a hook failed under `on_error = "closed"`,
    /// [`Verdict::Reject`] (drop the response, complete its command with that status).
    #[must_use]
    pub fn on_response(&self, ctx: &mut ConnCtx, resp: &mut ResponseView) -> Verdict {
        let kind = resp.kind;
        let listing = kind == "LIST" || kind == "LSUB";
        self.chain(
            ctx,
            Hook::Response,
            None,
            |m| m.responses.as_ref().is_none_or(|r| r.contains(kind)),
            &mut |vm, f, c| {
                let lua = &vm.lua;
                let mut args = MultiValue::with_capacity(5 + 2 * resp.mailboxes.len());
                args.push_back(vm.names.get(lua, resp.kind)?);
                args.push_back(match &resp.delimiter {
                    Some(d) => Value::String(lua.create_string(d)?),
                    None => Value::Nil,
                });
                args.push_back(match &resp.namespace {
                    Some(ns) => Value::Table(namespace_to_lua(lua, ns)?),
                    None => Value::Nil,
                });
                args.push_back(if listing {
                    Value::Table(lua.create_sequence_from(resp.flags.iter().map(String::as_str))?)
                } else {
                    Value::Nil
                });
                push_slots(vm, &mut args, &resp.mailboxes)?;
                let mut ret = invoke(Some(&vm.response_shim), f, c, &args)?;
                let verdict = ret.pop_front().unwrap_or(Value::Nil);
                resp.delimiter = match ret.pop_front().unwrap_or(Value::Nil) {
                    Value::Nil => None,
                    Value::String(s) => Some(s.to_str()?.to_string()),
                    other => {
                        return Err(mlua::Error::RuntimeError(format!(
                            "resp.delimiter must be a string or nil, not {}",
                            other.type_name()
                        )));
                    }
                };
                let namespace = ret.pop_front().unwrap_or(Value::Nil);
                if resp.namespace.is_some() {
                    resp.namespace = Some(namespace_from_lua(namespace)?);
                }
                let flags = ret.pop_front().unwrap_or(Value::Nil);
                read_back_flags(flags, listing, &mut resp.flags)?;
                read_back_names(ret, &mut resp.mailboxes)?;
                verdict_of(verdict)
            },
        )
    }

    /// `on_complete` (the tagged response to a command was seen) without its response code:
    /// [`Verdict::Pass`] or [`Verdict::Close`].
    #[must_use]
    pub fn on_complete(
        &self,
        ctx: &mut ConnCtx,
        tag: &str,
        name: &'static str,
        status: Status,
    ) -> Verdict {
        self.on_completed(
            ctx,
            &CompleteView {
                tag,
                name,
                status,
                code: None,
            },
        )
    }

    /// `on_complete`: [`Verdict::Pass`] or [`Verdict::Close`].
    #[must_use]
    pub fn on_completed(&self, ctx: &mut ConnCtx, done: &CompleteView<'_>) -> Verdict {
        self.chain_glue(ctx, &mut Completed::from(done))
    }
}

impl PolicySet {
    /// `on_login` (imapgate owns the login): [`Verdict::Pass`] (the default upstream),
    /// [`Verdict::Route`], [`Verdict::Reject`], [`Verdict::Close`] or [`Verdict::Delay`].
    #[must_use]
    pub fn on_login(&self, ctx: &mut ConnCtx, login: &LoginView) -> Verdict {
        self.chain_glue(ctx, &mut login.clone())
    }
}

/// What a failed hook means under the policy's `on_error`: `None` to go on as if it passed.
fn failed(hook: Hook, on_error: OnError) -> Option<Verdict> {
    match (on_error, hook) {
        (OnError::Open, _) | (OnError::Closed, Hook::Disconnect) => None,
        (OnError::Closed, Hook::Command | Hook::Response | Hook::Login) => Some(Verdict::Reject {
            status: Status::No,
            code: Some("UNAVAILABLE".into()),
            text: "Policy check failed, try again later".into(),
        }),
        (OnError::Closed, Hook::Connect | Hook::Capability | Hook::Complete) => {
            Some(Verdict::Close {
                text: "Policy check failed".into(),
            })
        }
    }
}

/// What a call whose shared state failed means under the policy's `on_state_error`: "open"
/// goes on as if the policy allowed it, "closed" refuses a command or login with
/// `NO [UNAVAILABLE]`. A completion or a connection event has nothing left to refuse: the
/// failure is logged and counted, and the session goes on.
fn state_failed(hook: Hook, on_state_error: OnError) -> Option<Verdict> {
    match (on_state_error, hook) {
        (OnError::Closed, Hook::Command | Hook::Login) => Some(Verdict::Reject {
            status: Status::No,
            code: Some("UNAVAILABLE".into()),
            text: "Policy state unavailable, try again later".into(),
        }),
        _ => None,
    }
}

/// The Lua side of a connection's `ctx`.
#[derive(Debug)]
pub(crate) struct LuaCtx {
    set: u64,
    version: u64,
    /// One read-only proxy per policy, all reading `real`.
    proxies: Vec<Table>,
    real: Table,
}

/// The message of a Lua error without mlua's wrapping and traceback noise.
pub(super) fn flatten_error(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => flatten_error(cause),
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::MemoryError(m) => format!("out of memory: {m}"),
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

fn load_vm(
    configs: &[PolicyConfig],
    sources: &[String],
    cfg: &LuaConfig,
    shared: &Arc<HostShared>,
) -> Result<(Vm, Vec<PolicyMeta>), PolicyError> {
    let lua = Lua::new_with(
        StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8,
        LuaOptions::default(),
    )
    .map_err(|e| PolicyError::Lua(e.to_string()))?;
    let sandbox = Sandbox::new(&lua).map_err(|e| PolicyError::Lua(e.to_string()))?;
    let budget = Arc::new(Budget::new());
    budget::install(&lua, &budget).map_err(|e| PolicyError::Lua(e.to_string()))?;
    let mut metas = Vec::new();
    let mut policies = Vec::new();
    for (c, source) in configs.iter().zip(sources) {
        let path = path_name(&c.script);
        let load_err = |e: mlua::Error| PolicyError::Load {
            path: path.clone(),
            message: flatten_error(&e),
        };
        let env = sandbox.env(&lua).map_err(load_err)?;
        let default_name = c
            .script
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.clone());
        let name_cell = api::PolicyName::new(&default_name);
        let imap = api::imap_table(&lua, &c.options, shared.clone(), name_cell.clone(), &budget)
            .map_err(load_err)?;
        let loading = Arc::new(AtomicBool::new(true));
        imap.set(
            "read_map",
            api::read_map_fn(&lua, &c.options, loading.clone()).map_err(load_err)?,
        )
        .map_err(load_err)?;
        env.set("imap", imap).map_err(load_err)?;
        // The load itself runs under the budget too: a script's top level may loop.
        budget::arm(
            &lua,
            &budget,
            Instant::now(),
            (
                cfg.instructions,
                Duration::from_millis(cfg.time_ms.max(1000)),
            ),
        );
        let value: mlua::Result<Value> = lua
            .load(source.as_str())
            .set_name(format!("@{path}"))
            .set_mode(ChunkMode::Text)
            .set_environment(env)
            .eval();
        loading.store(false, Ordering::Relaxed);
        let value = value.map_err(load_err)?;
        let (meta, vm_policy) = contract(
            &path,
            &default_name,
            value,
            (c.on_error, c.state_error_mode()),
        )?;
        name_cell.set(&meta.name);
        metas.push(meta);
        policies.push(vm_policy);
    }
    lua.set_memory_limit(cfg.memory_mb.saturating_mul(1024 * 1024))
        .map_err(|e| PolicyError::Lua(e.to_string()))?;
    let (command_shim, response_shim): (Function, Function) = lua
        .load(SHIMS)
        .set_name("=imapgate")
        .eval()
        .map_err(|e| PolicyError::Lua(e.to_string()))?;
    let names = Names::new(&lua).map_err(|e| PolicyError::Lua(e.to_string()))?;
    // Most of what a hook call allocates (its cmd or resp table, the strings of a rewrite)
    // is garbage when the call returns: the generational collector frees it young, without
    // the incremental collector's marking and sweeping of everything the policies keep.
    lua.gc_set_mode(mlua::state::GcMode::Generational(
        mlua::state::GcGenParams::default(),
    ));
    let readonly = lua
        .create_function(|_, ()| -> mlua::Result<()> {
            Err(mlua::Error::RuntimeError(
                "ctx is read-only (use ctx.vars for your own values)".into(),
            ))
        })
        .map_err(|e| PolicyError::Lua(e.to_string()))?;
    Ok((
        Vm {
            turn: std::sync::Mutex::new(()),
            lua,
            budget,
            policies,
            command_shim,
            response_shim,
            names,
            readonly,
        },
        metas,
    ))
}
