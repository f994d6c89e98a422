//! One export run: plan, row mapping, the pipeline and its report.
//!
//! Imports run one way, from the top: [`run`] (the orchestrator) → [`audience_sync`] (the
//! stored audience: kind of run, removals, new audience; also the cleanup) → `sink` (the
//! read side, which records new users through [`pending`] before their batches go, and
//! sorts those past the memory budget through [`deferred`]) and
//! `send` (the senders) → `ended` (how a run ended) → [`options`],
//! [`plan`], [`error`] → [`mapping`] → [`report`], which imports nothing from the crate.
//! This file only declares the modules and re-exports what the rest of the crate uses.

pub mod audience_sync;
mod deadline;
pub mod deferred;
mod ended;
pub mod error;
pub mod mapping;
pub mod options;
pub mod pending;
pub mod plan;
pub mod report;
pub mod run;
mod send;
mod sink;

pub use audience_sync::{AudienceInput, AudienceUpdate, RunResult, remove_audience};
pub use error::RunError;
pub use options::{Progress, RunOptions, Services, SpillOptions};
pub use pending::PendingLog;
pub use plan::{Credentials, ExportPlan};
pub use report::{Outcome, RunReport, SyncMode, Trigger};
pub use run::{run_export, run_export_synced};
