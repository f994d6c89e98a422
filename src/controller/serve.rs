//! The controller's life: standing by for the Lease, and serving each leadership term with a
//! kube-runtime `Controller` per watched namespace; at the end of a term, up to the shutdown
//! grace for run tasks to record how they ended before the Lease is released.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{CONTROLLER_NAME, Config};
use super::context::{Active, Context};
use super::error::Error;
use super::gauges::StoreSlot;
use super::lease::{self, LeaderElection};
use super::reconcile;
use super::watched::Watched;
use crate::export::Services;
use crate::ops::metrics::Metrics;

/// Reconciles in progress at once.
pub const RECONCILE_CONCURRENCY: u16 = 32;

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
pub async fn serve(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    store_slot: StoreSlot,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    crate::http::install_crypto_provider();
    let shared = Shared {
        client,
        services: Arc::new(Services::default()),
        metrics,
        store_slot,
        permits: Arc::new(Semaphore::new(config.max_concurrent_runs.max(1))),
        active: Arc::default(),
        config,
    };
    let config = &shared.config;
    tracing::info!(
        namespaces = %if config.namespaces.is_empty() { "<all>".to_owned() } else { config.namespaces.join(",") },
        selector = config.selector.as_deref().unwrap_or(""),
        "controller started"
    );
    let result = match config.leader_election.clone() {
        None => {
            ready.store(true, Ordering::Relaxed);
            shared.metrics.set_leader(true);
            serve_term(&shared, shutdown.child_token(), CancellationToken::new()).await;
            Ok(())
        }
        Some(le) => {
            let result = serve_elected(&shared, le, ready, &shutdown).await;
            shared.metrics.set_leader(false);
            result
        }
    };
    tracing::info!("controller stopped");
    result
}

/// Stands by for the Lease and serves a term each time it is held, until `shutdown`. The
/// Lease outlives each term: released only once the last term's runs are recorded.
async fn serve_elected(
    shared: &Shared,
    le: LeaderElection,
    ready: Arc<AtomicBool>,
    shutdown: &CancellationToken,
) -> Result<(), Error> {
    let instance = &shared.config.instance;
    let (mut leading, elector) =
        lease::spawn(shared.client.clone(), le.clone(), instance.clone(), ready);
    tracing::info!(lease = %le.lease_name, %instance, "standing by for leadership");
    let mut result = Ok(());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = leading.wait_for(|l| *l) => if r.is_err() {
                result = Err(Error::Election);
                break;
            },
        }
        shared.metrics.set_leader(true);
        tracing::info!(lease = %le.lease_name, %instance, "leadership acquired: running exports");
        let (term, lost) = (shutdown.child_token(), CancellationToken::new());
        let fence = fence(
            term.clone(),
            lost.clone(),
            leading.clone(),
            Arc::clone(&shared.metrics),
        );
        let recorded = serve_term(shared, term, lost).await;
        fence.abort();
        shared.metrics.set_leader(false);
        elector.release.store(recorded, Ordering::Relaxed);
        if shutdown.is_cancelled() {
            break;
        }
        tracing::info!(lease = %le.lease_name, "standing by for leadership again");
    }
    elector.stop.cancel();
    let _ = elector.task.await;
    result
}

/// Ends `term`, and cancels `lost`, as soon as leadership is lost.
fn fence(
    term: CancellationToken,
    lost: CancellationToken,
    mut leading: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = leading.wait_for(|l| !*l).await;
        // First: a run stopped by the term must find its writes already fenced.
        lost.cancel();
        metrics.set_leader(false);
        if !term.is_cancelled() {
            tracing::warn!("leadership lost: stopping runs");
            term.cancel();
        }
    })
}

/// One term: a Controller per watched namespace until `term` is cancelled, then up to the
/// shutdown grace for run tasks to record how they ended. True when they all did.
async fn serve_term(shared: &Shared, term: CancellationToken, lost: CancellationToken) -> bool {
    let ctx = Arc::new(term_context(shared, term.clone(), lost));
    let (stores, streams): (Vec<_>, Vec<_>) = apis(shared)
        .into_iter()
        .map(|api| {
            let stop = term.clone();
            let controller = Controller::new(api, watch_config(&shared.config))
                // Bounded reconciles: 1,000 exports due at once must not mean 1,000 API calls
                // at once.
                .with_config(
                    kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
                )
                .graceful_shutdown_on(async move { stop.cancelled().await });
            let store = controller.store();
            let stream = controller
                .run(
                    reconcile::reconcile,
                    reconcile::error_policy,
                    Arc::clone(&ctx),
                )
                .boxed();
            (store, stream)
        })
        .unzip();
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
    let recorded = tokio::time::timeout(shared.config.shutdown_grace, ctx.tasks.wait())
        .await
        .is_ok();
    if !recorded {
        tracing::warn!(
            "runs did not finish within the shutdown grace period; the next leader marks them Interrupted"
        );
    }
    recorded
}

/// What the term's reconciles and tasks share.
fn term_context(shared: &Shared, term: CancellationToken, lost: CancellationToken) -> Context {
    let config = &shared.config;
    let reporter = Reporter {
        controller: CONTROLLER_NAME.into(),
        instance: Some(config.instance.clone()),
    };
    Context {
        client: shared.client.clone(),
        services: Arc::clone(&shared.services),
        metrics: Arc::clone(&shared.metrics),
        recorder: Recorder::new(shared.client.clone(), reporter),
        permits: Arc::clone(&shared.permits),
        slots: config.max_concurrent_runs.max(1),
        active: Arc::clone(&shared.active),
        tasks: TaskTracker::new(),
        stop: term,
        leadership: lost,
        progress_interval: config.progress_interval,
        instance: config.instance.clone(),
        allowed_hosts: config.allowed_hosts.clone(),
        retry_base: config.retry_base,
        clock_offset: config.clock_offset,
        cleanup_timeout: config.cleanup_timeout,
        audience_store: config.audience_store.clone(),
        scratch: config.scratch.clone(),
        stores: Arc::clone(&shared.store_slot),
        held_keys: std::sync::Mutex::default(),
    }
}

/// The watched namespaces' APIs (one for all when none is named).
fn apis(shared: &Shared) -> Vec<Api<Watched>> {
    let namespaces = &shared.config.namespaces;
    if namespaces.is_empty() {
        return vec![Api::all(shared.client.clone())];
    }
    namespaces
        .iter()
        .map(|ns| Api::namespaced(shared.client.clone(), ns))
        .collect()
}

fn watch_config(config: &Config) -> watcher::Config {
    let watch = watcher::Config::default();
    match &config.selector {
        Some(selector) => watch.labels(selector),
        None => watch,
    }
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
