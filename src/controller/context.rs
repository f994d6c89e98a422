//! What every reconcile, run task and cleanup of one leadership term shares, and the
//! exports this process has a task for (so no two tasks ever handle one export).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::runtime::events::Recorder;
use kube::{Client, ResourceExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::gauges::{StoreSlot, cached};
use super::step::Facts;
use super::watched::Watched;
use crate::export::Services;
use crate::looker::hosts::AllowedHosts;
use crate::ops::metrics::Metrics;
use crate::spec::{BrazeExport, RemovalMode};

/// What every reconcile and task of one leadership term shares.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// HTTP clients and Braze limiters shared by all runs.
    pub services: Arc<Services>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Bounds runs in progress (process-wide: a term's late tasks count too).
    pub permits: Arc<Semaphore>,
    /// How many permits there are.
    pub slots: usize,
    /// Exports (namespace/name) with a task in this process, running or queued; shared by
    /// every term, so a new term never takes the last term's live task for a crash.
    pub active: Active,
    /// Run tasks, awaited at the end of the term.
    pub tasks: TaskTracker,
    /// Cancelled on shutdown or lost leadership: stops runs and reconciles.
    pub stop: CancellationToken,
    /// Cancelled only when this instance loses the Lease (never on a shutdown, during which
    /// it still holds it until its runs are recorded): fences writes another leader owns.
    pub leadership: CancellationToken,
    /// See [`Config::progress_interval`](super::Config::progress_interval).
    pub progress_interval: Duration,
    /// See [`Config::instance`](super::Config::instance).
    pub instance: String,
    /// See [`Config::allowed_hosts`](super::Config::allowed_hosts).
    pub allowed_hosts: AllowedHosts,
    /// See [`Config::retry_base`](super::Config::retry_base).
    pub retry_base: SignedDuration,
    /// See [`Config::clock_offset`](super::Config::clock_offset).
    pub clock_offset: SignedDuration,
    /// See [`Config::cleanup_timeout`](super::Config::cleanup_timeout).
    pub cleanup_timeout: Duration,
    /// See [`Config::audience_store`](super::Config::audience_store).
    pub audience_store: super::audiences::AudienceStore,
    /// See [`Config::scratch`](super::Config::scratch).
    pub scratch: crate::spill::Scratch,
    /// The caches of the term's Controllers, one per watched namespace.
    pub stores: StoreSlot,
    /// The Braze key Secret each export (by uid) was seen to hold this term (see
    /// [`key_hold`](super::key_hold)).
    pub held_keys: Mutex<HashMap<String, String>>,
}

/// The exports with a task in this process, each with its kind and the token that stops it.
pub type Active = Arc<Mutex<HashMap<String, (TaskKind, CancellationToken)>>>;

/// What an export's task does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// A run, running or waiting for a slot.
    Run,
    /// The cleanup of a deleted export.
    Cleanup,
}

impl Context {
    fn lock_active(&self) -> MutexGuard<'_, HashMap<String, (TaskKind, CancellationToken)>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when this process runs the export now, or waits for a slot to.
    pub fn is_active(&self, key: &str) -> bool {
        self.lock_active().contains_key(key)
    }

    /// Marks `key` active with a task of `kind`; `None` when it already is. The guard clears
    /// it when dropped, a panicking task included.
    pub fn claim(&self, key: &str, kind: TaskKind) -> Option<ActiveGuard> {
        let mut active = self.lock_active();
        if active.contains_key(key) {
            return None;
        }
        let stop = self.stop.child_token();
        active.insert(key.to_owned(), (kind, stop.clone()));
        Some(ActiveGuard {
            active: Arc::clone(&self.active),
            key: key.to_owned(),
            stop,
        })
    }

    /// Stops the run of `key` (its export is being deleted): it records its end as after a
    /// shutdown. A cleanup goes on.
    pub fn stop_run(&self, key: &str) {
        if let Some((TaskKind::Run, stop)) = self.lock_active().get(key) {
            stop.cancel();
        }
    }

    /// Now, by the controller's clock.
    pub fn now(&self) -> Timestamp {
        Timestamp::now() + self.clock_offset
    }

    /// What a step reads besides the export, now; `active`: this process has a task for it;
    /// `exports`: what [`Context::others`] found.
    pub fn facts<'a>(&'a self, active: bool, exports: &'a [Arc<Watched>]) -> Facts<'a> {
        Facts {
            active,
            allowed_hosts: &self.allowed_hosts,
            retry_base: self.retry_base,
            exports,
            now: self.now(),
        }
    }

    /// The cached exports that may remove the flag `export` removes: every export of the
    /// caches when it has `removal: Remove`, none otherwise (a `Keep` export shares flags).
    pub fn others(&self, export: &BrazeExport) -> Vec<Arc<Watched>> {
        if export.spec.braze.removal == RemovalMode::Remove {
            cached(&self.stores)
        } else {
            Vec::new()
        }
    }
}

/// An export marked active by [`Context::claim`].
pub struct ActiveGuard {
    active: Active,
    key: String,
    stop: CancellationToken,
}

impl ActiveGuard {
    /// Cancelled when the task must stop: shutdown, a lost Lease, or the export's deletion.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// `namespace/name`: the export's key in [`Active`].
pub fn key(export: &BrazeExport) -> String {
    key_of(&export.namespace().unwrap_or_default(), &export.name_any())
}

/// `namespace/name`.
pub fn key_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}
