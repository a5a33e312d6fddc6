//! Keeping policy calls that wait or run long off the runtime's worker threads.
//!
//! A hook runs synchronously on the thread of the session that called it. When it runs long
//! (up to its `time_ms`), or waits for a Lua VM another session's hook is using, it would hold
//! one of the few worker threads of the runtime, and every other session queued on that worker
//! would stall with it. `tokio::task::block_in_place` hands the worker's other tasks to a new
//! thread first, so only the session that called the hook waits.

use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};

/// A hook running this long leaves the worker threads for the rest of its call.
pub const DETACH_AFTER: Duration = Duration::from_millis(1);

/// A hand-off that did not take (the machine too busy to start the new thread within
/// [`HANDOFF`]) is tried again this much later, for as long as the call runs. Once it took,
/// a further try costs only the [`HANDOFF`] pause.
pub const DETACH_RETRY: Duration = Duration::from_millis(20);

/// How long the hand-off may take: the worker's other tasks move to a thread that must start
/// and take them before this call goes on without them (paid once, by a call already slow).
const HANDOFF: Duration = Duration::from_millis(1);

/// Only a worker of a multi-threaded runtime can hand its tasks over; tools (`replay`,
/// `check`) and single-threaded test runtimes just run the call.
fn on_worker_thread() -> bool {
    Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
}

/// Runs `f`, which may block (the wait for a busy VM and the call after it), off the workers.
pub fn off_workers<R>(f: impl FnOnce() -> R) -> R {
    if on_worker_thread() {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Called from inside a hook that has run for [`DETACH_AFTER`]: this thread stops being a
/// worker for the rest of the current poll; its queued tasks go on elsewhere.
pub fn leave_workers() {
    if on_worker_thread() {
        tokio::task::block_in_place(|| std::thread::sleep(HANDOFF));
    }
}
