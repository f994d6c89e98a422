//! What a run is handed besides its plan: the services every run in the process shares,
//! the options of one run (with its test failpoint), and its live progress counters.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio_util::sync::CancellationToken;

use super::report::Trigger;
use crate::audience::Output;
use crate::audience::seen::NEW_IN_MEMORY;
use crate::braze::{LimiterRegistry, PayloadDump, RetryPolicy};
use crate::http::HttpClients;
use crate::spill::Scratch;

/// What every run in the process shares: HTTP clients, Braze limiters, retry policy.
#[derive(Debug, Default)]
pub struct Services {
    /// HTTP clients.
    pub http: HttpClients,
    /// One limiter per Braze workspace.
    pub limiters: LimiterRegistry,
    /// Backoff for Braze retries.
    pub retry: RetryPolicy,
}

/// Live counters of a run in progress (for a progress bar or a status update).
#[derive(Debug, Default)]
pub struct Progress {
    /// Rows read so far.
    pub rows_read: AtomicU64,
    /// Objects accepted so far.
    pub sent: AtomicU64,
    /// Users whose flag was removed so far (set when the removals end).
    pub removed: AtomicU64,
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// What started the run.
    pub trigger: Trigger,
    /// Build every batch but send nothing.
    pub dry_run: bool,
    /// Where to write each request body.
    pub dump: Option<Arc<PayloadDump>>,
    /// Stops the run (shutdown); the report then says `Interrupted`.
    pub cancel: CancellationToken,
    /// Live counters.
    pub progress: Arc<Progress>,
    /// Remove even more than `removalLimitPercent` of the audience (or everyone, after a Look
    /// that returned nothing): the one run allowed to (see
    /// [`crate::audience::removal_allowed_once`]; `run --allow-removal`).
    pub allow_removal_over_limit: bool,
    /// Send everyone, as a full resync does, whatever `fullResyncInterval` says.
    pub full_resync: bool,
    /// Where and past what a run's users go through the scratch directory.
    pub spill: SpillOptions,
    /// Where the new stored audience is built: in memory (Secrets), or beside the state
    /// file (`run --state FILE`), never held whole.
    pub audience_output: Output,
    /// Test hook: makes a part of the pipeline panic, to prove the counts survive it.
    #[doc(hidden)]
    pub failpoint: Failpoint,
}

/// What a run holds in memory before it sorts through the scratch directory
/// ([`crate::spill`]).
#[derive(Clone, Debug)]
pub struct SpillOptions {
    /// Where run files go (`run --scratch-dir`, the controller's `--scratch-dir`).
    pub scratch: Scratch,
    /// Users new to the audience held in memory; past them, rows wait for the end of the
    /// Look in the scratch directory ([`crate::audience::seen::NEW_IN_MEMORY`]).
    pub new_in_memory: usize,
    /// Bytes of waiting rows held before a sorted run is written (and of the new stored
    /// audience's members).
    pub run_bytes: usize,
    /// Members of a previous audience held in memory (12 bytes each); past them, every row
    /// waits, and is merged with the members in identifier order after the Look.
    pub previous_in_memory: u64,
}

/// Members of a previous audience held in memory by default (24 MiB).
pub const PREVIOUS_IN_MEMORY: u64 = 2_000_000;

/// Bytes of waiting rows held in memory before they are written to the scratch directory.
pub const SPILL_RUN_BYTES: usize = 8 << 20;

impl Default for SpillOptions {
    fn default() -> Self {
        Self {
            scratch: Scratch::default(),
            new_in_memory: NEW_IN_MEMORY,
            run_bytes: SPILL_RUN_BYTES,
            previous_in_memory: PREVIOUS_IN_MEMORY,
        }
    }
}

/// Where a test makes the pipeline panic ([`RunOptions::failpoint`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Failpoint {
    /// Nowhere.
    #[default]
    None,
    /// The row reader, on this row.
    ReaderAtRow(u64),
    /// The sender of the batch holding this row.
    SenderAtRow(u64),
}

impl RunOptions {
    /// Options for a plain run started by `trigger`.
    pub fn new(trigger: Trigger) -> Self {
        Self {
            trigger,
            dry_run: false,
            dump: None,
            cancel: CancellationToken::new(),
            progress: Arc::default(),
            allow_removal_over_limit: false,
            full_resync: false,
            spill: SpillOptions::default(),
            audience_output: Output::Memory,
            failpoint: Failpoint::None,
        }
    }
}
