//! Per-command handles for `imapgate_commands_total` and `imapgate_command_duration_seconds`,
//! resolved at a command name's first use and cached.
//!
//! Resolving lazily (rather than for every known command up front) keeps a scrape to the
//! commands clients actually send: 50 names × 5 results × a 16-bucket histogram would be about
//! a thousand lines of zeros. The command label is a `&'static str` from the fixed set
//! [`crate::imap::command::CommandName::label`] returns, so the cache stays small.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};

use super::labels::CommandResult;

/// The handles of one command name.
#[derive(Debug)]
pub(crate) struct CommandHandles {
    results: [IntCounter; 5],
    duration: Histogram,
}

impl CommandHandles {
    fn record(&self, result: CommandResult, duration: Option<std::time::Duration>) {
        self.results[result.index()].inc();
        if let Some(d) = duration {
            self.duration.observe(d.as_secs_f64());
        }
    }
}

pub(crate) struct CommandCache {
    totals: IntCounterVec,
    durations: HistogramVec,
    by_name: RwLock<HashMap<&'static str, CommandHandles>>,
}

impl CommandCache {
    pub fn new(totals: IntCounterVec, durations: HistogramVec) -> CommandCache {
        CommandCache {
            totals,
            durations,
            by_name: RwLock::new(HashMap::new()),
        }
    }

    /// Records one outcome: under a read lock on the common path, the write lock only the first
    /// time a name is seen.
    pub fn record(
        &self,
        command: &'static str,
        result: CommandResult,
        duration: Option<std::time::Duration>,
    ) {
        // A poisoned lock only means another thread panicked while inserting; the map itself
        // is always consistent, so going on is safe.
        if let Some(h) = self
            .by_name
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(command)
        {
            h.record(result, duration);
            return;
        }
        let mut map = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        map.entry(command)
            .or_insert_with(|| CommandHandles {
                results: CommandResult::ALL
                    .map(|r| self.totals.with_label_values(&[command, r.as_str()])),
                duration: self.durations.with_label_values(&[command]),
            })
            .record(result, duration);
    }
}
