//! The sending machinery, shared by the adds and the removals: the Braze client of a run,
//! and the senders that take batches from a channel and keep deliveries in flight within
//! the workspace's in-flight budget and the run's `concurrency`, counting what Braze did
//! with each object.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::RunError;
use super::options::{Failpoint, Progress, RunOptions, Services};
use super::plan::{Credentials, ExportPlan};
use super::report::{RowReason, Tally};
use crate::braze::client::INTERRUPTED;
use crate::braze::{Batch, BrazeClient, BrazeError, Delivery, FailReason, Permit};

/// The Braze client of a run that sends; `None` for a dry run.
pub(super) fn braze_client(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    dry_run: bool,
) -> Result<Option<Arc<BrazeClient>>, RunError> {
    if dry_run {
        return Ok(None);
    }
    let Some(key) = &creds.braze_api_key else {
        return Err(RunError::Internal(
            "no Braze API key for a run that sends".into(),
        ));
    };
    let limiter = services.limiters.get(&plan.track_url, key, plan.rate_limit);
    let http = services.http.get(true).clone();
    let client = BrazeClient::new(http, plan.track_url.clone(), key, limiter, services.retry)?;
    Ok(Some(Arc::new(client)))
}

/// What the senders did: counts, the answer that stopped them, and (when the side is
/// tracked) the keys of objects Braze rejected or never acknowledged.
pub(super) struct SendSummary {
    pub tally: Tally,
    pub fatal: Option<BrazeError>,
    pub failed_keys: Vec<u64>,
    pub rejected_keys: Vec<u64>,
}

/// Which objects the senders carry: adds (with or without keys to keep) or removals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    /// Adds of a run without a stored audience.
    AddsUntracked,
    /// Adds of a run with a stored audience: keys are kept.
    Adds,
    /// Removals: counted `removed`, `removalRejected`, `removalFailed`; keys are kept.
    Removals,
}

/// The deliveries of one run in flight, with each one's rows so that a sender that panics
/// still has its rows counted.
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<Delivery>,
    rows: HashMap<tokio::task::Id, (Vec<u64>, Vec<u64>)>,
}

impl InFlight {
    /// Starts delivering `batch`, which holds `permit` until it ends; `stop` ends the
    /// delivery (shutdown, or a fatal answer to another batch: a refused key must not go on
    /// being sent).
    fn spawn(
        &mut self,
        client: &Arc<BrazeClient>,
        batch: Batch,
        permit: Permit,
        opts: &RunOptions,
        stop: &CancellationToken,
    ) {
        let rows = batch.rows().to_vec();
        let keys = batch.keys().to_vec();
        let panics = matches!(opts.failpoint, Failpoint::SenderAtRow(r) if rows.contains(&r));
        let client = Arc::clone(client);
        let cancel = stop.clone();
        let dump = opts.dump.clone();
        let handle = self.tasks.spawn(
            async move {
                let _permit = permit;
                if panics {
                    panic!("failpoint: a sender panics");
                }
                client.deliver(batch, &cancel, dump.as_deref()).await
            }
            .in_current_span(),
        );
        self.rows.insert(handle.id(), (rows, keys));
    }

    /// Waits for the next delivery to end; a panicked one counts its rows failed.
    async fn next(&mut self) -> Option<Delivery> {
        let (id, delivery) = match self.tasks.join_next_with_id().await? {
            Ok((id, d)) => (id, Some(d)),
            Err(e) => (e.id(), None),
        };
        let (rows, keys) = self.rows.remove(&id).unwrap_or_default();
        Some(delivery.unwrap_or_else(|| {
            tracing::error!("a Braze sender failed unexpectedly; its rows are counted failed");
            Delivery {
                failed: vec![(
                    "InternalError",
                    "a sender failed unexpectedly (a bug: please report it)".into(),
                    rows,
                )],
                failed_keys: keys,
                ..Delivery::default()
            }
        }))
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }
}

/// Receives batches and keeps deliveries in flight: as many as the workspace's in-flight
/// budget admits (shared with the other runs on it, see [`crate::braze::budget`]), at most
/// `cap` of this run's own. On a fatal answer or cancellation it stops taking batches and
/// counts those still queued (or waiting for a permit) as failed.
pub(super) async fn send_all(
    mut rx: mpsc::Receiver<Batch>,
    braze: Option<Arc<BrazeClient>>,
    cap: usize,
    opts: &RunOptions,
    stop: &CancellationToken,
    side: Side,
) -> SendSummary {
    let mut out = SendSummary {
        tally: Tally::default(),
        fatal: None,
        failed_keys: Vec::new(),
        rejected_keys: Vec::new(),
    };
    let mut inflight = InFlight::default();
    while out.fatal.is_none() && !stop.is_cancelled() {
        if braze.is_some() && inflight.len() >= cap.max(1) {
            if let Some(d) = inflight.next().await {
                absorb_delivery(&mut out, d, &opts.progress, side);
            }
            continue;
        }
        // Biased, in this order: a stop is seen before anything else, and a delivery that
        // ended (maybe with a fatal answer) before another batch is taken.
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(d) = inflight.next(), if inflight.len() > 0 => absorb_delivery(&mut out, d, &opts.progress, side),
            next = rx.recv() => match (next, &braze) {
                (None, _) => break,
                (Some(batch), None) => dry_send(&mut out.tally, &batch, opts, side),
                (Some(batch), Some(client)) => {
                    let admitted = permit(client, &batch, cap, &mut inflight, &mut out, opts, stop, side);
                    match admitted.await {
                        Some(p) => inflight.spawn(client, batch, p, opts, stop),
                        None => {
                            let mut d = Delivery::default();
                            d.fail(&batch, &stop_reason(out.fatal.as_ref()), 0);
                            absorb_delivery(&mut out, d, &opts.progress, side);
                        }
                    }
                }
            },
        }
    }
    if out.fatal.is_some() {
        // Cancel the Looker transfer now, before draining: the parser then stops at once
        // instead of filling the channel with batches that can only fail.
        stop.cancel();
    }
    drain(&mut out, &mut inflight, &mut rx, &opts.progress, side).await;
    out
}

/// Waits for the budget to admit `batch`, absorbing this run's deliveries that end
/// meanwhile; `None` when the run stops or one of them ends with a fatal answer first.
#[expect(
    clippy::too_many_arguments,
    reason = "the sender loop's own state, passed down"
)]
async fn permit(
    client: &BrazeClient,
    batch: &Batch,
    cap: usize,
    inflight: &mut InFlight,
    out: &mut SendSummary,
    opts: &RunOptions,
    stop: &CancellationToken,
    side: Side,
) -> Option<Permit> {
    // Made once, so the wait keeps its place in the queue while deliveries end.
    let acquire = client.permit(cap, batch.body_len());
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            Some(d) = inflight.next(), if inflight.len() > 0 => {
                absorb_delivery(out, d, &opts.progress, side);
                if out.fatal.is_some() {
                    return None;
                }
            }
            p = &mut acquire => return Some(p),
        }
    }
}

/// After the senders stopped: closes the channel and counts the batches still queued as
/// failed, under what stopped the run; then waits for the deliveries in flight, which
/// `stop` ends (or which end on their own when the channel simply ran dry).
async fn drain(
    out: &mut SendSummary,
    inflight: &mut InFlight,
    rx: &mut mpsc::Receiver<Batch>,
    progress: &Progress,
    side: Side,
) {
    rx.close();
    let reason = stop_reason(out.fatal.as_ref());
    while let Some(batch) = rx.recv().await {
        let mut d = Delivery::default();
        d.fail(&batch, &reason, 0);
        absorb_delivery(out, d, progress, side);
    }
    while let Some(d) = inflight.next().await {
        absorb_delivery(out, d, progress, side);
    }
}

/// What stopped the senders, as the reason of objects that never got to go: the fatal
/// answer when there is one, else shutdown.
pub(super) fn stop_reason(fatal: Option<&BrazeError>) -> FailReason {
    match fatal {
        Some(f) => FailReason::Stopped(f.reason(), f.to_string()),
        None => FailReason::Stopped(INTERRUPTED, "the operator is shutting down".into()),
    }
}

/// A dry run's "send": the body goes to the dump, and the objects count as sent (or
/// removed) without a request.
fn dry_send(tally: &mut Tally, batch: &Batch, opts: &RunOptions, side: Side) {
    if let Some(d) = &opts.dump
        && let Err(e) = d.write(&batch.body())
    {
        tracing::warn!(error = %e, "cannot write to the payload dump");
    }
    let n = batch.len() as u64;
    if side == Side::Removals {
        *tally.counts.removed.get_or_insert(0) += n;
        return;
    }
    tally.counts.sent += n;
    opts.progress.sent.fetch_add(n, Ordering::Relaxed);
}

/// Adds one delivery's counts and error groups to the summary, under the side's counters;
/// keeps the first fatal answer.
fn absorb_delivery(out: &mut SendSummary, d: Delivery, progress: &Progress, side: Side) {
    let t = &mut out.tally;
    t.counts.requests += d.requests;
    t.counts.retries += d.retries;
    t.counts.rate_limited += d.rate_limited;
    let removals = side == Side::Removals;
    if removals {
        *t.counts.removed.get_or_insert(0) += d.sent;
        progress.removed.fetch_add(d.sent, Ordering::Relaxed);
    } else {
        t.counts.sent += d.sent;
        progress.sent.fetch_add(d.sent, Ordering::Relaxed);
    }
    for (kind, rows) in &d.rejected {
        let n = rows.len() as u64;
        if removals {
            *t.counts.removal_rejected.get_or_insert(0) += n;
            t.note(RowReason::RemovalRejected, kind, rows);
        } else {
            t.counts.rejected += n;
            t.note(RowReason::BrazeRejected, kind, rows);
        }
    }
    for (reason, description, rows) in &d.failed {
        let n = rows.len() as u64;
        // A delivery stopped because another batch got a fatal answer: say which.
        let (reason, description) = match &out.fatal {
            Some(f) if *reason == INTERRUPTED => (f.reason(), stop_reason(Some(f)).describe(0)),
            _ => (*reason, description.clone()),
        };
        if removals {
            *t.counts.removal_failed.get_or_insert(0) += n;
            t.note(RowReason::RemovalNotDelivered(reason), &description, rows);
        } else {
            t.counts.failed += n;
            t.note(RowReason::NotDelivered(reason), &description, rows);
        }
    }
    if side != Side::AddsUntracked {
        out.failed_keys.extend_from_slice(&d.failed_keys);
        out.rejected_keys.extend_from_slice(&d.rejected_keys);
    }
    if out.fatal.is_none() {
        out.fatal = d.fatal;
    }
}
