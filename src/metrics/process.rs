//! Process metrics: resident memory, CPU time, open and maximum file descriptors, threads and
//! start time, under the standard `process_*` names that dashboards and alerts expect.
//!
//! prometheus's own `ProcessCollector` reads `/proc/self` at each scrape; it exists on Linux
//! only, so elsewhere the scrape simply has no `process_*` families.

use prometheus::Registry;

#[cfg(target_os = "linux")]
pub fn register(registry: &Registry) -> prometheus::Result<()> {
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))
}

#[cfg(not(target_os = "linux"))]
pub fn register(_registry: &Registry) -> prometheus::Result<()> {
    Ok(())
}
