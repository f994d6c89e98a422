//! How a run (or a cleanup) ended, [`Ended`]: its counts, the error that failed it, and
//! whether shutdown stopped it; and how that becomes the run's checked report. Shared by
//! the pipeline in [`super::run`] and the audience side in [`super::audience_sync`].

use jiff::Timestamp;

use super::error::{DEADLINE_EXCEEDED, RunError};
use super::options::RunOptions;
use super::report::{self, RunContext, RunFailure, RunReport, SyncMode, Tally};
use crate::braze::client::INTERRUPTED;

/// How a run ended: its counts, what failed it, and whether shutdown stopped it.
#[derive(Debug, Default)]
pub(super) struct Ended {
    pub tally: Tally,
    pub failure: Option<RunError>,
    pub interrupted: bool,
}

impl Ended {
    /// A run that failed before it counted anything.
    pub(super) fn failed(e: RunError) -> Self {
        Self {
            tally: Tally::default(),
            failure: Some(e),
            interrupted: false,
        }
    }

    /// Records `e` unless the run already failed: the first failure is the one reported.
    pub(super) fn fail_unless_failed(&mut self, e: RunError) {
        if self.failure.is_none() {
            self.failure = Some(e);
        }
    }

    /// A run its deadline stopped: what shutdown would have called an interruption is the
    /// run's failure, and the rows it could not send say so.
    pub(super) fn deadline_passed(&mut self, seconds: u64) {
        if !self.interrupted || self.failure.is_some() {
            return;
        }
        let e = RunError::DeadlineExceeded { seconds };
        self.tally
            .restate_stopped(INTERRUPTED, DEADLINE_EXCEEDED, &e.to_string());
        self.interrupted = false;
        self.failure = Some(e);
    }

    /// The report (checked to add up), as of now.
    pub(super) fn into_report(
        self,
        opts: &RunOptions,
        start_time: Timestamp,
        mode: Option<SyncMode>,
    ) -> RunReport {
        let failure = self.failure.map(|e| RunFailure {
            reason: e.reason(),
            message: e.to_string(),
        });
        let context = RunContext {
            trigger: opts.trigger,
            start_time,
            completion_time: Timestamp::now(),
            dry_run: opts.dry_run,
        };
        let report = report::finish_synced(self.tally, failure, self.interrupted, context, mode);
        report::ensure_balanced(report)
    }
}
