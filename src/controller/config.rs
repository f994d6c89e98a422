//! How the controller runs: the settings `braze-export-operator controller` reads from its
//! flags, with defaults for tests and embedding.

use std::time::Duration;

use jiff::SignedDuration;

use super::audiences::AudienceStore;
use super::lease::LeaderElection;
use super::timeouts::CLEANUP_TIMEOUT;
use crate::looker::hosts::AllowedHosts;

/// Name of the controller in Events, of the field manager, and the default Lease.
pub const CONTROLLER_NAME: &str = "braze-export-operator";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Watch these namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// Label selector for the exports to handle (sharding).
    pub selector: Option<String>,
    /// Runs in progress at once across all exports.
    pub max_concurrent_runs: usize,
    /// Lease-based leader election.
    pub leader_election: Option<LeaderElection>,
    /// How often a long run writes its progress to `status.lastRun`.
    pub progress_interval: Duration,
    /// How long shutdown waits for runs to record `Interrupted`.
    pub shutdown_grace: Duration,
    /// This operator instance (pod name and a per-process suffix): in Events, as the Lease's
    /// holder and in `status.runner`.
    pub instance: String,
    /// The Looker hosts exports may call.
    pub allowed_hosts: AllowedHosts,
    /// Wait before the first retry of a failed or interrupted run.
    pub retry_base: SignedDuration,
    /// Added to the clock (tests: a minute boundary without waiting for one).
    pub clock_offset: SignedDuration,
    /// Longest cleanup of a deleted export (`cleanupOnDelete`): past it the finalizer is
    /// removed whatever is left, so a deletion never hangs.
    pub cleanup_timeout: Duration,
    /// Where the exports' audiences are kept (`--audience-store`).
    pub audience_store: AudienceStore,
    /// Where runs sort what does not fit in memory (`--scratch-dir`; the chart's `emptyDir`).
    pub scratch: crate::spill::Scratch,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            selector: None,
            max_concurrent_runs: 4,
            leader_election: None,
            progress_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(20),
            instance: CONTROLLER_NAME.into(),
            allowed_hosts: AllowedHosts::any(),
            retry_base: crate::schedule::RETRY_BASE,
            clock_offset: SignedDuration::ZERO,
            cleanup_timeout: CLEANUP_TIMEOUT,
            audience_store: AudienceStore::default(),
            scratch: crate::spill::Scratch::default(),
        }
    }
}
