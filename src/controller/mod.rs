//! The controller: watches BrazeExports, starts their runs on time, and writes what happened
//! to their status. Runs are tasks bounded by `--max-concurrent-runs`. With leader election,
//! every replica is Ready and only the Lease holder runs exports; a holder that cannot renew
//! stops its runs before another may take over (see [`lease`]).

pub mod audience_store;
pub mod cleanup;
pub mod freshness;
pub mod lease;
pub mod reconcile;
pub mod run_task;
pub mod secrets;
pub mod status;
pub mod step;
pub mod watched;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use jiff::{SignedDuration, Timestamp};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use lease::LeaderElection;

use crate::export::Services;
use crate::looker::hosts::AllowedHosts;
use crate::ops::metrics::Metrics;
use crate::spec::BrazeExport;
use watched::Watched;

/// Reconciles in progress at once.
pub const RECONCILE_CONCURRENCY: u16 = 32;

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
    /// This operator instance (pod name and a per-process suffix): in Events, in the Lease
    /// and in `status.runner`.
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
            cleanup_timeout: cleanup::TIMEOUT,
        }
    }
}

/// Errors of the controller layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// The object changed since it was read (409): the write was refused.
    #[error("the export changed since it was read: {0}")]
    Conflict(String),
    /// The object is gone (404).
    #[error("the export no longer exists")]
    Gone,
    /// The run is no longer this instance's: the export was recreated or taken over.
    #[error("the run is no longer this operator's")]
    Lost,
    /// An API call took too long.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The leader election task stopped.
    #[error("leader election stopped")]
    Election,
}

impl Error {
    /// Sorts a kube error: conflicts and missing objects are answers, not failures.
    pub fn from_kube(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 409 => Self::Conflict(s.message),
            kube::Error::Api(s) if s.code == 404 => Self::Gone,
            e => Self::Kube(e),
        }
    }

    /// Reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "ApiError",
            Self::Kube(_) => "KubeError",
            Self::Conflict(_) => "Conflict",
            Self::Gone => "Gone",
            Self::Lost => "Lost",
            Self::Timeout(_) => "Timeout",
            Self::Election => "Election",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::from_kube(e)
    }
}

/// What every reconcile and run task of one leadership term shares.
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
    /// Exports (namespace/name) with a run task in this process, running or queued; shared by
    /// every term, so a new term never takes the last term's live task for a crash.
    pub active: Active,
    /// Run tasks, awaited at the end of the term.
    pub tasks: TaskTracker,
    /// Cancelled on shutdown or lost leadership: stops runs and reconciles.
    pub stop: CancellationToken,
    /// See [`Config::progress_interval`].
    pub progress_interval: Duration,
    /// See [`Config::instance`].
    pub identity: String,
    /// See [`Config::allowed_hosts`].
    pub allowed_hosts: AllowedHosts,
    /// See [`Config::retry_base`].
    pub retry_base: SignedDuration,
    /// See [`Config::clock_offset`].
    pub clock_offset: SignedDuration,
    /// See [`Config::cleanup_timeout`].
    pub cleanup_timeout: Duration,
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
    fn lock_active(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (TaskKind, CancellationToken)>> {
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

/// The caches of the controller's current term (one per watched namespace), so `/metrics` can
/// count exports by Ready status. Empty on a standby.
pub type StoreSlot = Arc<Mutex<Vec<Store<Watched>>>>;

/// Every export in the caches of `slot`.
pub fn cached(slot: &StoreSlot) -> Vec<Arc<Watched>> {
    let stores = slot.lock().unwrap_or_else(|e| e.into_inner());
    stores.iter().flat_map(Store::state).collect()
}

/// Sets the gauges derived from the exports themselves: how many there are by (Ready status,
/// reason), how many are overdue, and each one's freshness. Called before each scrape of
/// `/metrics`. An export this version cannot decode counts as `InvalidSpec`.
pub fn refresh_gauges(metrics: &Metrics, exports: &[Arc<Watched>], now: Timestamp) {
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for w in exports {
        let key = match w.export() {
            None => ("False".to_owned(), status::reason::INVALID_SPEC.to_owned()),
            Some(e) => e
                .status
                .as_ref()
                .and_then(status::ready)
                .map_or(("Unknown".to_owned(), "Pending".to_owned()), |c| {
                    (c.status.clone(), c.reason.clone())
                }),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    metrics.set_exports(
        counts
            .iter()
            .map(|((r, why), n)| ((r.as_str(), why.as_str()), *n)),
    );
    let decoded = || exports.iter().filter_map(|w| w.export());
    metrics.set_overdue(overdue_count(decoded(), now));
    let gauges: Vec<_> = decoded()
        .map(|e| freshness::export_gauges(e, now))
        .collect();
    metrics.set_export_gauges(&gauges);
}

/// How late a scheduled run may be before its export counts as overdue.
pub const OVERDUE_AFTER: SignedDuration = SignedDuration::from_mins(5);

/// Exports not suspended and not running whose `nextScheduleTime` is more than
/// [`OVERDUE_AFTER`] before `now`.
pub fn overdue_count<'a>(
    exports: impl IntoIterator<Item = &'a BrazeExport>,
    now: Timestamp,
) -> i64 {
    exports
        .into_iter()
        .filter(|e| !e.spec.suspend)
        .filter_map(|e| e.status.as_ref())
        .filter(|s| !status::is_running(s))
        .filter(|s| {
            s.next_schedule_time
                .is_some_and(|t| now.duration_since(t) > OVERDUE_AFTER)
        })
        .count() as i64
}

/// What stays the same across leadership terms.
struct Shared {
    client: Client,
    config: Config,
    services: Arc<Services>,
    metrics: Arc<Metrics>,
    store_slot: StoreSlot,
    permits: Arc<Semaphore>,
    active: Active,
}

/// Runs the controller until `shutdown`. The process is Ready at once, leader or not. With
/// leader election, each time this instance gains the Lease it serves a term, which ends on
/// shutdown or when the Lease is lost; either way its runs are stopped and recorded before the
/// Lease is released.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    store_slot: StoreSlot,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    crate::http::install_crypto_provider();
    let shared = Shared {
        client: client.clone(),
        services: Arc::new(Services::default()),
        metrics: Arc::clone(&metrics),
        store_slot,
        permits: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1))),
        active: Arc::default(),
        config: config.clone(),
    };
    tracing::info!(
        namespaces = %if config.namespaces.is_empty() { "<all>".to_owned() } else { config.namespaces.join(",") },
        selector = config.selector.as_deref().unwrap_or(""),
        "controller started"
    );
    let Some(le) = config.leader_election.clone() else {
        ready.store(true, Ordering::Relaxed);
        metrics.set_leader(true);
        serve_term(&shared, shutdown.child_token()).await;
        tracing::info!("controller stopped");
        return Ok(());
    };
    // The Lease outlives each term: released only once the last term's runs are recorded.
    let (mut leading, elector) = lease::spawn(client, le.clone(), ready);
    tracing::info!(lease = %le.lease_name, identity = %le.identity, "standing by for leadership");
    let mut result = Ok(());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = leading.wait_for(|l| *l) => if r.is_err() {
                result = Err(Error::Election);
                break;
            },
        }
        metrics.set_leader(true);
        tracing::info!(lease = %le.lease_name, identity = %le.identity, "leadership acquired: running exports");
        let term = shutdown.child_token();
        let fence = {
            let (term, mut leading, metrics) =
                (term.clone(), leading.clone(), Arc::clone(&metrics));
            tokio::spawn(async move {
                let _ = leading.wait_for(|l| !*l).await;
                metrics.set_leader(false);
                if !term.is_cancelled() {
                    tracing::warn!("leadership lost: stopping runs");
                    term.cancel();
                }
            })
        };
        let recorded = serve_term(&shared, term).await;
        fence.abort();
        metrics.set_leader(false);
        elector.release.store(recorded, Ordering::Relaxed);
        if shutdown.is_cancelled() {
            break;
        }
        tracing::info!(lease = %le.lease_name, "standing by for leadership again");
    }
    elector.stop.cancel();
    let _ = elector.task.await;
    metrics.set_leader(false);
    tracing::info!("controller stopped");
    result
}

/// One term: a Controller per watched namespace until `term` is cancelled, then up to the
/// shutdown grace for run tasks to record how they ended. True when they all did.
async fn serve_term(shared: &Shared, term: CancellationToken) -> bool {
    let config = &shared.config;
    let reporter = Reporter {
        controller: CONTROLLER_NAME.into(),
        instance: Some(config.instance.clone()),
    };
    let slots = config.max_concurrent_runs.max(1);
    let ctx = Arc::new(Context {
        client: shared.client.clone(),
        services: Arc::clone(&shared.services),
        metrics: Arc::clone(&shared.metrics),
        recorder: Recorder::new(shared.client.clone(), reporter),
        permits: Arc::clone(&shared.permits),
        slots,
        active: Arc::clone(&shared.active),
        tasks: TaskTracker::new(),
        stop: term.clone(),
        progress_interval: config.progress_interval,
        identity: config.instance.clone(),
        allowed_hosts: config.allowed_hosts.clone(),
        retry_base: config.retry_base,
        clock_offset: config.clock_offset,
        cleanup_timeout: config.cleanup_timeout,
    });
    let apis: Vec<Api<Watched>> = if config.namespaces.is_empty() {
        vec![Api::all(shared.client.clone())]
    } else {
        config
            .namespaces
            .iter()
            .map(|ns| Api::namespaced(shared.client.clone(), ns))
            .collect()
    };
    let mut watch = watcher::Config::default();
    if let Some(selector) = &config.selector {
        watch = watch.labels(selector);
    }
    let mut stores = Vec::new();
    let mut streams = Vec::new();
    for api in apis {
        let stop = term.clone();
        let controller = Controller::new(api, watch.clone())
            // Bounded reconciles: 1,000 exports due at once must not mean 1,000 API calls at once.
            .with_config(
                kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
            )
            .graceful_shutdown_on(async move { stop.cancelled().await });
        stores.push(controller.store());
        streams.push(
            controller
                .run(
                    reconcile::reconcile,
                    reconcile::error_policy,
                    Arc::clone(&ctx),
                )
                .boxed(),
        );
    }
    *shared.store_slot.lock().unwrap_or_else(|e| e.into_inner()) = stores;
    let metrics = Arc::clone(&shared.metrics);
    futures_util::stream::select_all(streams)
        .for_each(|result| {
            if let Err(e) = result {
                log_controller_error(&metrics, &e);
            }
            std::future::ready(())
        })
        .await;
    shared
        .store_slot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    ctx.tasks.close();
    let recorded = tokio::time::timeout(config.shutdown_grace, ctx.tasks.wait())
        .await
        .is_ok();
    if !recorded {
        tracing::warn!(
            "runs did not finish within the shutdown grace period; the next leader marks them Interrupted"
        );
    }
    recorded
}

/// Watch errors at warn, counted, without bodies; reconcile errors were handled by the error
/// policy already.
fn log_controller_error(
    metrics: &Metrics,
    e: &kube::runtime::controller::Error<Error, watcher::Error>,
) {
    use kube::runtime::controller::Error as E;
    match e {
        E::QueueError(w) => {
            let reason = match w {
                watcher::Error::InitialListFailed(_) => "InitialListFailed",
                watcher::Error::WatchStartFailed(_) => "WatchStartFailed",
                watcher::Error::WatchError(_) => "WatchError",
                watcher::Error::WatchFailed(_) => "WatchFailed",
                _ => "WatchError",
            };
            metrics.watch_error(reason);
            tracing::warn!(reason, error = %crate::text::truncate(&w.to_string(), 300), "watching BrazeExports failed; retrying");
        }
        other => tracing::debug!(error = %other, "reconcile ended with an error"),
    }
}
