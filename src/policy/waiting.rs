//! Hooks that wait: a hook that calls out (to Redis, through `imap.state` or a shared rate
//! limit) suspends instead of blocking its thread.
//!
//! With `[state]` configured, `on_command`, `on_login` and `on_complete` run as Lua
//! coroutines driven by a Rust future. A hook that does not wait finishes on the first poll,
//! made right here, and its verdict is applied at once as before. One that waits comes back as
//! [`Judgement::Waiting`]: the session holds the message the hook judges, keeps serving its
//! connection, and applies the verdict when the future completes. While it waits, other hook
//! calls (of other sessions) use the same VM; each call keeps its own budget, and the time
//! budget counts the wait (see [`super::budget::OnVm`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use mlua::{Function, MultiValue, Table};

use super::lua::{PolicyMeta, Vm, flatten_error, hook_index};
use super::{ConnCtx, Decision, Hook, PolicySet, Verdict};

/// The glue between a view and one hook: the function to call and its arguments, and what
/// its results mean. One implementation per hook that can wait.
pub(super) trait Glue {
    const HOOK: Hook;
    /// The command label decisions are recorded under.
    fn command(&self) -> Option<&'static str>;
    /// Whether a policy's filters want this message.
    fn wants(meta: &PolicyMeta, command: Option<&'static str>) -> bool;
    /// The arguments of the hook after `ctx`, and the shim to call the hook through if it
    /// has one (see [`super::glue::invoke`]).
    fn prepare<'v>(&self, vm: &'v Vm) -> mlua::Result<(Option<&'v Function>, MultiValue)>;
    /// Reads the call's results back into the view; the verdict.
    fn finish(&mut self, ret: MultiValue) -> mlua::Result<Verdict>;
}

/// One hook call, for its decision record.
pub(super) struct Call {
    pub(super) policy: usize,
    pub(super) hook: Hook,
    pub(super) command: Option<&'static str>,
    pub(super) started: Instant,
}

/// Why a call did not give a verdict the hook can apply.
#[derive(Debug)]
pub(super) enum Failure {
    /// The script failed: `on_error` decides.
    Hook(String),
    /// Its shared state failed (timeout, unreachable): `on_state_error` decides.
    State(String),
}

/// What a hook came to once it stopped waiting: the verdict, the view with the hook's
/// rewrites, and the decisions made on the way (for metrics and the audit log).
#[derive(Debug)]
pub struct Finished<T> {
    pub verdict: Verdict,
    pub view: T,
    pub decisions: Vec<Decision>,
}

/// A hook's verdict now, or a hook that waits.
pub enum Judgement<T> {
    /// Decided without waiting (the decisions are already in the connection's ctx).
    Ready(Verdict, T),
    Waiting(Waiting<T>),
}

/// A hook call that waits for shared state; poll it to completion (dropping it abandons the
/// call, e.g. when the connection ends).
pub struct Waiting<T>(Pin<Box<dyn Future<Output = Finished<T>> + Send + Sync>>);

impl<T> Future for Waiting<T> {
    type Output = Finished<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Finished<T>> {
        self.0.as_mut().poll(cx)
    }
}

impl<T> std::fmt::Debug for Waiting<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waiting")
    }
}

impl PolicySet {
    /// `on_command`, which may wait ([`PolicySet::on_command`] otherwise): the verdict and the
    /// view with the mailbox names the policies left.
    pub fn judge_command(
        self: &Arc<Self>,
        ctx: &mut ConnCtx,
        view: super::CommandView,
    ) -> Judgement<super::CommandView> {
        self.judge(ctx, view)
    }

    /// `on_login`, which may wait ([`PolicySet::on_login`] otherwise).
    pub fn judge_login(
        self: &Arc<Self>,
        ctx: &mut ConnCtx,
        login: super::LoginView,
    ) -> Judgement<super::LoginView> {
        self.judge(ctx, login)
    }

    /// `on_complete`, which may wait ([`PolicySet::on_completed`] otherwise).
    pub fn judge_complete(
        self: &Arc<Self>,
        ctx: &mut ConnCtx,
        done: super::Completed,
    ) -> Judgement<super::Completed> {
        self.judge(ctx, done)
    }

    /// Whether hooks of this set may wait (`[state]` is configured).
    pub fn waits(&self) -> bool {
        self.waits
    }

    /// Runs the hook `view` is for, waiting if a policy's shared state must answer (only when
    /// the set can wait; otherwise exactly the hook's method that does not wait).
    fn judge<G>(self: &Arc<Self>, ctx: &mut ConnCtx, mut view: G) -> Judgement<G>
    where
        G: Glue + Send + Sync + 'static,
    {
        if !self.waits {
            let verdict = self.chain_glue(ctx, &mut view);
            return Judgement::Ready(verdict, view);
        }
        let Some((vm, calls)) = self.calls(ctx, &view) else {
            return Judgement::Ready(Verdict::Pass, view);
        };
        let set = self.clone();
        let mut run = Box::pin(async move {
            let mut view = view;
            let mut decisions = Vec::new();
            let verdict = set
                .chain_waiting(vm, calls, &mut view, &mut decisions)
                .await;
            Finished {
                verdict,
                view,
                decisions,
            }
        });
        // The first poll happens here, without a waker: a hook that does not wait is done
        // now. One that waits registers the driver's waker on its next poll.
        match run.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(done) => {
                ctx.decisions.extend(done.decisions);
                Judgement::Ready(done.verdict, done.view)
            }
            Poll::Pending => Judgement::Waiting(Waiting(run)),
        }
    }

    /// The connection's VM and the policies whose hook wants this message, each with its
    /// `ctx` table (built now: the future does not hold the connection).
    #[allow(clippy::type_complexity)]
    fn calls<G: Glue>(
        &self,
        ctx: &mut ConnCtx,
        view: &G,
    ) -> Option<(usize, Vec<(usize, Result<Table, String>)>)> {
        if !self.has_hook(G::HOOK) || self.vms.is_empty() {
            return None;
        }
        let index = (ctx.info.id % self.vms.len() as u64) as usize;
        let vm = self.vms.get(index)?;
        let command = view.command();
        let mut calls = Vec::new();
        for (i, meta) in self.meta.iter().enumerate() {
            if meta.has[hook_index(G::HOOK)] && G::wants(meta, command) {
                let table = self.ctx_table(vm, ctx, i).map_err(|e| flatten_error(&e));
                calls.push((i, table));
            }
        }
        (!calls.is_empty()).then_some((index, calls))
    }

    /// The policies' calls in order, each of which may wait: rewrites compose, the first
    /// verdict other than pass wins, failures are handled as [`PolicySet::failure_verdict`]
    /// says.
    async fn chain_waiting<G: Glue>(
        &self,
        vm: usize,
        calls: Vec<(usize, Result<Table, String>)>,
        view: &mut G,
        decisions: &mut Vec<Decision>,
    ) -> Verdict {
        let Some(vm) = self.vms.get(vm) else {
            return Verdict::Pass;
        };
        let command = view.command();
        for (policy, table) in calls {
            let call = Call {
                policy,
                hook: G::HOOK,
                command,
                started: Instant::now(),
            };
            let Some(f) = vm
                .policies
                .get(policy)
                .and_then(|p| p.hooks[hook_index(G::HOOK)].clone())
            else {
                continue;
            };
            let prepared = table
                .map_err(mlua::Error::RuntimeError)
                .and_then(|ctx| Ok((ctx, view.prepare(vm)?)));
            let (result, state) = match prepared {
                Err(e) => (Err(e), None),
                Ok((ctx, (shim, rest))) => {
                    let running = match shim {
                        Some(shim) => shim.call_async::<MultiValue>((&f, &ctx, &rest)),
                        None => f.call_async::<MultiValue>((&ctx, &rest)),
                    };
                    let view = &mut *view;
                    super::budget::OnVm::new(
                        (&vm.turn, &vm.lua, &vm.budget),
                        running,
                        move |ret: mlua::Result<MultiValue>| ret.and_then(|r| view.finish(r)),
                        (self.instructions, self.time),
                    )
                    .await
                }
            };
            match self.settle(&call, result, state, decisions) {
                Ok(Verdict::Pass) => {}
                Ok(verdict) => return verdict,
                Err(failure) => {
                    if let Some(verdict) = self.failure_verdict(policy, G::HOOK, &failure) {
                        return verdict;
                    }
                }
            }
        }
        Verdict::Pass
    }
}
