//! The controller: watches BrazeExports, starts their runs on time, and writes what happened
//! to their status. Runs are tasks bounded by `--max-concurrent-runs`; with leader election
//! only the replica holding the Lease runs exports.

pub mod freshness;
pub mod reconcile;
pub mod secrets;
pub mod status;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::export::Services;
use crate::ops::metrics::Metrics;
use crate::spec::BrazeExport;

/// Reconciles in progress at once.
pub const RECONCILE_CONCURRENCY: u16 = 32;

/// Name of the controller in Events and of the Lease.
pub const CONTROLLER_NAME: &str = "braze-export-operator";

/// Lease-based leader election settings.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Seconds a lock stays valid without renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_seconds: u64,
}

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Watch one namespace (all when absent).
    pub namespace: Option<String>,
    /// Label selector for the exports to handle (sharding).
    pub selector: Option<String>,
    /// Runs in progress at once across all exports.
    pub max_concurrent_runs: usize,
    /// Lease-based leader election (replicas > 1).
    pub leader_election: Option<LeaderElection>,
    /// How often a long run writes its progress to `status.lastRun`.
    pub progress_interval: Duration,
    /// How long shutdown waits for runs to record `Interrupted`.
    pub shutdown_grace: Duration,
    /// This replica's name, in Events.
    pub instance: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            selector: None,
            max_concurrent_runs: 4,
            leader_election: None,
            progress_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(20),
            instance: CONTROLLER_NAME.into(),
        }
    }
}

/// Errors of the controller layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(String),
}

impl Error {
    /// Reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "ApiError",
            Self::Kube(_) => "KubeError",
            Self::Lease(_) => "LeaseError",
        }
    }
}

/// What every reconcile and run task shares.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// HTTP clients and Braze limiters shared by all runs.
    pub services: Services,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Bounds runs in progress.
    pub permits: Arc<Semaphore>,
    /// Exports (namespace/name) with a run task in this process.
    pub active: Mutex<HashSet<String>>,
    /// Run tasks, awaited at shutdown.
    pub tasks: TaskTracker,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// See [`Config::progress_interval`].
    pub progress_interval: Duration,
}

impl Context {
    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when this process runs the export now.
    pub fn is_active(&self, key: &str) -> bool {
        self.lock_active().contains(key)
    }
}

/// A slot for the controller's cache, so `/metrics` can count exports by Ready status.
pub type StoreSlot = Arc<OnceLock<Store<BrazeExport>>>;

/// Sets the gauges derived from the exports themselves: how many there are by (Ready status,
/// reason), how many are overdue, and each one's freshness. Called before each scrape of
/// `/metrics`.
pub fn refresh_gauges(metrics: &Metrics, exports: &[Arc<BrazeExport>], now: jiff::Timestamp) {
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for e in exports {
        let key = e
            .status
            .as_ref()
            .and_then(status::ready)
            .map_or(("Unknown".to_owned(), "Pending".to_owned()), |c| {
                (c.status.clone(), c.reason.clone())
            });
        *counts.entry(key).or_insert(0) += 1;
    }
    metrics.set_exports(
        counts
            .iter()
            .map(|((r, why), n)| ((r.as_str(), why.as_str()), *n)),
    );
    metrics.set_overdue(overdue_count(exports.iter().map(AsRef::as_ref), now));
    let gauges: Vec<_> = exports
        .iter()
        .map(|e| freshness::export_gauges(e, now))
        .collect();
    metrics.set_export_gauges(&gauges);
}

/// How late a scheduled run may be before its export counts as overdue.
pub const OVERDUE_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_mins(5);

/// Exports not suspended and not running whose `nextScheduleTime` is more than
/// [`OVERDUE_AFTER`] before `now`.
pub fn overdue_count<'a>(
    exports: impl IntoIterator<Item = &'a BrazeExport>,
    now: jiff::Timestamp,
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

/// Runs the controller until `shutdown`, then waits (up to the grace period) for run tasks
/// to record how they ended. With leader election, waits to be leader first, and shuts
/// down if leadership is lost.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    store_slot: StoreSlot,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    crate::http::install_crypto_provider();
    let leadership = match &config.leader_election {
        Some(le) => match lead(&client, le, &shutdown).await? {
            Some(held) => Some(held),
            None => return Ok(()),
        },
        None => None,
    };
    let api: Api<BrazeExport> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut watch = watcher::Config::default();
    if let Some(selector) = &config.selector {
        watch = watch.labels(selector);
    }
    let reporter = Reporter {
        controller: CONTROLLER_NAME.into(),
        instance: Some(config.instance.clone()),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        services: Services::default(),
        metrics,
        recorder: Recorder::new(client, reporter),
        permits: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1))),
        active: Mutex::default(),
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
        progress_interval: config.progress_interval,
    });
    let trigger = shutdown.clone();
    let controller = Controller::new(api, watch)
        // Bounded reconciles: 1,000 exports due at once must not mean 1,000 API calls at once.
        .with_config(
            kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
        )
        .graceful_shutdown_on(async move { trigger.cancelled().await });
    let _ = store_slot.set(controller.store());
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        namespace = config.namespace.as_deref().unwrap_or("<all>"),
        selector = config.selector.as_deref().unwrap_or(""),
        "controller started"
    );
    controller
        .run(
            reconcile::reconcile,
            reconcile::error_policy,
            Arc::clone(&ctx),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile ended with an error");
            }
        })
        .await;
    ctx.tasks.close();
    if tokio::time::timeout(config.shutdown_grace, ctx.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "runs did not finish within the shutdown grace period; the next operator marks them Interrupted"
        );
    }
    if let Some(held) = leadership {
        let _ = tokio::time::timeout(Duration::from_secs(5), held).await;
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// Waits to hold the Lease (or for shutdown: `None`). Losing the Lease later cancels
/// `shutdown`; shutdown releases the Lease, and the returned task ends once it is released.
async fn lead(
    client: &Client,
    le: &LeaderElection,
    shutdown: &CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, Error> {
    let manager = LeaseManagerBuilder::new(client.clone(), &le.lease_name)
        .with_namespace(&le.namespace)
        .with_identity(&le.identity)
        .with_duration(le.duration_seconds)
        .with_grace(le.grace_seconds)
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (mut rx, task) = manager.watch().await;
    tracing::info!(lease = %le.lease_name, identity = %le.identity, "waiting for leadership");
    loop {
        if *rx.borrow_and_update() {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            changed = rx.changed() => if changed.is_err() {
                return Err(Error::Lease("the lease manager stopped".into()));
            },
        }
    }
    tracing::info!(identity = %le.identity, "leadership acquired");
    let stop = shutdown.clone();
    Ok(Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                changed = rx.changed() => if changed.is_err() || !*rx.borrow() {
                    tracing::warn!("leadership lost: stopping");
                    stop.cancel();
                    break;
                },
            }
        }
        // Closing the channel makes the manager release the Lease.
        drop(rx);
        let _ = task.await;
    })))
}
