//! The time and instruction budget of a hook call, enforced by the VM's count hook, and the
//! wrapper that lets a call which waits (a coroutine suspended on Redis) keep its own budget
//! while other calls use the VM in between.
//!
//! The budget is checked every [`CHECK_EVERY`] instructions. Once exceeded it stays exceeded
//! for the rest of the call and the hook runs at every instruction, so `pcall` cannot swallow
//! it: the very next instruction outside the `pcall` fails again. The hook is mlua's *global*
//! hook, which every thread mlua creates inherits, so the coroutines that run waiting hooks
//! are counted like the main thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mlua::{HookTriggers, Lua, VmState};

/// Instructions between two budget checks.
pub(super) const CHECK_EVERY: u32 = 1000;

/// The per-call budget of one VM, shared with its count hook. A waiting call's share is saved
/// after each poll and put back before the next ([`Saved`]).
pub(super) struct Budget {
    remaining: AtomicI64,
    deadline_ns: AtomicU64,
    base: Instant,
    /// The hook runs at every instruction: the budget ran out during this call.
    lowered: AtomicBool,
    /// When this call next tries to leave the runtime's worker threads (since `base`).
    next_detach_ns: AtomicU64,
    /// A shared-state call of this hook call failed (timeout, Redis down): whatever the
    /// script made of it, the call ends under the policy's `on_state_error`.
    state_failed: Mutex<Option<String>>,
    /// The call runs in a coroutine that can wait (see [`OnVm`]).
    may_wait: AtomicBool,
}

/// One call's share of the budget while another call has the VM.
#[derive(Debug)]
pub(super) struct Saved {
    remaining: i64,
    deadline_ns: u64,
    next_detach_ns: u64,
    state_failed: Option<String>,
    may_wait: bool,
}

impl Budget {
    pub(super) fn new() -> Budget {
        Budget {
            remaining: AtomicI64::new(i64::MAX),
            deadline_ns: AtomicU64::new(u64::MAX),
            base: Instant::now(),
            lowered: AtomicBool::new(false),
            next_detach_ns: AtomicU64::new(u64::MAX),
            state_failed: Mutex::new(None),
            may_wait: AtomicBool::new(false),
        }
    }

    fn nanos(&self, at: Duration) -> u64 {
        u64::try_from(at.as_nanos()).unwrap_or(u64::MAX)
    }

    /// A fresh budget for a call starting now.
    fn fresh(&self, instructions: u64, time: Duration, may_wait: bool) -> Saved {
        self.fresh_from(Instant::now(), instructions, time, may_wait)
    }

    /// A fresh budget for a call that started at `started`.
    fn fresh_from(
        &self,
        started: Instant,
        instructions: u64,
        time: Duration,
        may_wait: bool,
    ) -> Saved {
        let now = started.saturating_duration_since(self.base);
        Saved {
            remaining: i64::try_from(instructions).unwrap_or(i64::MAX),
            deadline_ns: self.nanos(now + time),
            next_detach_ns: self.nanos(now + super::detach::DETACH_AFTER),
            state_failed: None,
            may_wait,
        }
    }

    fn restore(&self, saved: &mut Saved) {
        self.remaining.store(saved.remaining, Ordering::Relaxed);
        self.deadline_ns.store(saved.deadline_ns, Ordering::Relaxed);
        self.next_detach_ns
            .store(saved.next_detach_ns, Ordering::Relaxed);
        *self.failed_slot() = saved.state_failed.take();
        self.may_wait.store(saved.may_wait, Ordering::Relaxed);
    }

    fn save(&self) -> Saved {
        Saved {
            remaining: self.remaining.load(Ordering::Relaxed),
            deadline_ns: self.deadline_ns.load(Ordering::Relaxed),
            next_detach_ns: self.next_detach_ns.load(Ordering::Relaxed),
            state_failed: self.failed_slot().take(),
            may_wait: self.may_wait.load(Ordering::Relaxed),
        }
    }

    fn failed_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.state_failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long the current call may still run, waits included.
    pub(super) fn time_left(&self) -> Duration {
        let deadline = self.deadline_ns.load(Ordering::Relaxed);
        let now = self.nanos(self.base.elapsed());
        Duration::from_nanos(deadline.saturating_sub(now))
    }

    /// Whether the current call can wait for shared state.
    pub(super) fn may_wait(&self) -> bool {
        self.may_wait.load(Ordering::Relaxed)
    }

    /// A shared-state call of the current hook call failed.
    pub(super) fn state_failed(&self, why: String) {
        self.failed_slot().get_or_insert(why);
    }

    /// Why the current call's shared state failed, if it did (taken: asked once per call).
    pub(super) fn take_state_failure(&self) -> Option<String> {
        self.failed_slot().take()
    }

    fn exceeded(&self) -> bool {
        let left = self
            .remaining
            .fetch_sub(i64::from(CHECK_EVERY), Ordering::Relaxed)
            - i64::from(CHECK_EVERY);
        let now = self.nanos(self.base.elapsed());
        if now > self.next_detach_ns.load(Ordering::Relaxed) {
            // The hand-off may not take (the new thread did not start in time): try again
            // a little later, for as long as the call runs.
            let retry = self.nanos(super::detach::DETACH_RETRY);
            self.next_detach_ns
                .store(now.saturating_add(retry), Ordering::Relaxed);
            super::detach::leave_workers();
        }
        left < 0 || now > self.deadline_ns.load(Ordering::Relaxed)
    }
}

/// The count hook. Once the budget is spent it re-arms itself, on the thread that ran out
/// (the main thread or a waiting hook's coroutine), to run at every instruction and fails
/// each time.
fn budget_hook(lua: &Lua, budget: &Arc<Budget>) -> mlua::Result<VmState> {
    if !budget.exceeded() {
        return Ok(VmState::Continue);
    }
    if !budget.lowered.swap(true, Ordering::Relaxed) {
        let b = budget.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(1),
            move |lua, _| budget_hook(lua, &b),
        )?;
    }
    Err(mlua::Error::RuntimeError(
        "instruction budget exceeded".into(),
    ))
}

/// Installs the count hook on a new VM, for its main thread and every thread mlua creates.
pub(super) fn install(lua: &Lua, budget: &Arc<Budget>) -> mlua::Result<()> {
    let b = budget.clone();
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(CHECK_EVERY),
        move |lua, _| budget_hook(lua, &b),
    )
}

/// Arms the count hook at its normal rate for a new call (that runs without waiting), which
/// started at `started`.
pub(super) fn arm(
    lua: &Lua,
    budget: &Arc<Budget>,
    started: Instant,
    (instructions, time): (u64, Duration),
) {
    let mut fresh = budget.fresh_from(started, instructions, time, false);
    budget.restore(&mut fresh);
    rearm(lua, budget);
}

/// Back to the normal rate if an earlier call lowered the hook on the main thread. (A
/// coroutine that ran out is not reused before mlua resets its hook to the global one.)
fn rearm(lua: &Lua, budget: &Arc<Budget>) {
    if budget.lowered.swap(false, Ordering::Relaxed)
        && let Err(e) = install(lua, budget)
    {
        tracing::error!(error = %e, "cannot re-arm the Lua instruction budget");
    }
}

/// A Lua call that may wait, run on one VM: each poll takes the VM's turn and puts this call's
/// budget back, so calls of other sessions can use the VM while this one waits, and the time
/// budget counts the wait. `finish` reads the call's results under the same turn and budget
/// (reading a returned table may run its metamethods).
pub(super) struct OnVm<'a, F, Fin> {
    turn: &'a Mutex<()>,
    lua: &'a Lua,
    budget: &'a Arc<Budget>,
    inner: Pin<Box<F>>,
    finish: Option<Fin>,
    saved: Saved,
    started: bool,
}

impl<'a, F: Future, Fin> OnVm<'a, F, Fin> {
    pub(super) fn new(
        (turn, lua, budget): (&'a Mutex<()>, &'a Lua, &'a Arc<Budget>),
        inner: F,
        finish: Fin,
        (instructions, time): (u64, Duration),
    ) -> OnVm<'a, F, Fin> {
        OnVm {
            turn,
            lua,
            budget,
            inner: Box::pin(inner),
            finish: Some(finish),
            saved: budget.fresh(instructions, time, true),
            started: false,
        }
    }
}

impl<F: Future, Fin: FnOnce(F::Output) -> R + Unpin, R> Future for OnVm<'_, F, Fin> {
    /// The call's result, and why its shared state failed if it did.
    type Output = (R, Option<String>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let _turn = take_turn(this.turn);
        this.budget.restore(&mut this.saved);
        if !this.started {
            this.started = true;
            rearm(this.lua, this.budget);
        }
        let polled = match this.inner.as_mut().poll(cx) {
            Poll::Ready(out) => match this.finish.take() {
                Some(finish) => Poll::Ready(finish(out)),
                None => Poll::Pending,
            },
            Poll::Pending => Poll::Pending,
        };
        this.saved = this.budget.save();
        match polled {
            Poll::Ready(out) => Poll::Ready((out, this.saved.state_failed.take())),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Exclusive use of a VM (its budget is per VM). When another session's call holds it, the
/// wait (and this call) happen off the runtime's worker threads.
pub(super) fn take_turn(turn: &Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    lock(turn, || ()).0
}

/// [`take_turn`] for a call that asked at `asked`, and when it got the VM: the budget of a
/// call counts from then, not from the wait for another session's call.
pub(super) fn take_turn_at(
    turn: &Mutex<()>,
    asked: Instant,
) -> (std::sync::MutexGuard<'_, ()>, Instant) {
    let (turn, waited) = lock(turn, Instant::now);
    (turn, waited.unwrap_or(asked))
}

/// The VM's lock, and `after_wait()` if the call had to wait for it.
fn lock<T>(
    turn: &Mutex<()>,
    after_wait: impl FnOnce() -> T,
) -> (std::sync::MutexGuard<'_, ()>, Option<T>) {
    use std::sync::TryLockError;
    match turn.try_lock() {
        Ok(turn) => (turn, None),
        Err(TryLockError::Poisoned(p)) => (p.into_inner(), None),
        Err(TryLockError::WouldBlock) => super::detach::off_workers(|| {
            let turn = turn.lock().unwrap_or_else(|p| p.into_inner());
            (turn, Some(after_wait()))
        }),
    }
}
