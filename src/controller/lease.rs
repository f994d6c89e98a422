//! Leader election on a `coordination.k8s.io` Lease, with fencing.
//!
//! Written here rather than taken from kube-lease-manager because of one property it lacks: a
//! holder that cannot renew (an apiserver partition) keeps reporting itself leader there while
//! its renewals fail, so its runs go on after another pod has taken the Lease. Here the holder
//! counts its own deadline from the moment it *sent* its last successful renewal, and gives
//! up leadership a margin before any other pod can see the Lease expire, so its runs stop
//! first. Candidates judge expiry from when they last saw the Lease change (as client-go
//! does), so clocks need not agree.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::timeouts::LEASE_RELEASE_TIMEOUT;

/// Lease-based leader election settings.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease (one per release: shards never share one).
    pub lease_name: String,
    /// How long the Lease stays valid without renewal.
    pub duration: Duration,
}

impl LeaderElection {
    /// How often the holder renews (a third of the duration).
    fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// How long before others may take the Lease the holder stops: a fifth of the duration.
    fn fence_margin(&self) -> Duration {
        self.duration / 5
    }
}

/// What one attempt found.
enum Attempt {
    /// We hold the Lease (acquired or renewed).
    Held,
    /// Another live holder has it.
    Other,
}

/// What a candidate last saw of the Lease, to judge its expiry by its own clock.
struct Seen {
    record: (Option<String>, Option<MicroTime>),
    since: Instant,
}

/// The election's handle: stop it, and say whether to release the Lease when it stops.
pub struct Elector {
    /// Stops the election.
    pub stop: CancellationToken,
    /// Release the Lease on stop (only once every run is recorded; otherwise it expires).
    pub release: Arc<AtomicBool>,
    /// The election task.
    pub task: tokio::task::JoinHandle<()>,
}

/// Runs the election; the channel says whether this instance leads. `ready` is set after the
/// first successful look at the Lease (leading or not): a pod that cannot reach its Lease is
/// not Ready.
pub fn spawn(
    client: Client,
    le: LeaderElection,
    instance: String,
    ready: Arc<AtomicBool>,
) -> (watch::Receiver<bool>, Elector) {
    let (tx, rx) = watch::channel(false);
    let stop = CancellationToken::new();
    let release = Arc::new(AtomicBool::new(true));
    let task = tokio::spawn(elect(
        client,
        le,
        instance,
        ready,
        tx,
        stop.clone(),
        Arc::clone(&release),
    ));
    (
        rx,
        Elector {
            stop,
            release,
            task,
        },
    )
}

async fn elect(
    client: Client,
    le: LeaderElection,
    instance: String,
    ready: Arc<AtomicBool>,
    tx: watch::Sender<bool>,
    stop: CancellationToken,
    release: Arc<AtomicBool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &le.namespace);
    let mut seen: Option<Seen> = None;
    let mut fence_at: Option<Instant> = None;
    loop {
        let sent = Instant::now();
        // Never wait on the apiserver past our own deadline: that is the fence.
        let limit = fence_at.map_or(sent + le.renew_every(), |f| f.min(sent + le.renew_every()));
        let attempt = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = tokio::time::timeout_at(limit, attempt(&api, &le, &instance, &mut seen)) => r,
        };
        let failed = match judge(&le, attempt) {
            Some(Attempt::Held) => {
                fence_at = Some(sent + le.duration - le.fence_margin());
                false
            }
            Some(Attempt::Other) => {
                fence_at = None;
                false
            }
            None => true,
        };
        if !failed {
            ready.store(true, Ordering::Relaxed);
        }
        if fence_at.is_some_and(|f| Instant::now() >= f) {
            tracing::warn!(lease = %le.lease_name, "the Lease could not be renewed in time: stopping runs before another replica may take it");
            fence_at = None;
        }
        tx.send_if_modified(|leading| {
            let now = fence_at.is_some();
            std::mem::replace(leading, now) != now
        });
        let wait = next_look(&le, fence_at.is_some(), failed);
        let wake = fence_at.map_or(Instant::now() + wait, |f| f.min(Instant::now() + wait));
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    if fence_at.is_some() {
        let _ = tx.send(false);
        step_down(&api, &le, &instance, &release).await;
    }
}

/// What one look found, or `None` (logged) when it failed or took too long.
fn judge(
    le: &LeaderElection,
    answer: Result<Result<Attempt, kube::Error>, tokio::time::error::Elapsed>,
) -> Option<Attempt> {
    match answer {
        Ok(Ok(attempt)) => Some(attempt),
        Ok(Err(e)) => {
            tracing::warn!(lease = %le.lease_name, error = %e, "cannot read or renew the Lease");
            None
        }
        Err(_) => {
            tracing::warn!(lease = %le.lease_name, "the Lease request timed out");
            None
        }
    }
}

/// How long until the next look at the Lease.
fn next_look(le: &LeaderElection, holding: bool, failed: bool) -> Duration {
    match (holding, failed) {
        // A holder retries soon after a failure: one slow answer must not fence it.
        (true, true) => (le.renew_every() / 3).min(Duration::from_secs(1)),
        (true, false) => le.renew_every(),
        // Candidates look often enough to take over soon after expiry.
        (false, _) => (le.duration / 5).max(Duration::from_millis(200)),
    }
}

/// At the end of the election: releases the Lease, unless some run was not recorded (then
/// it expires, so the next leader finds them).
async fn step_down(api: &Api<Lease>, le: &LeaderElection, instance: &str, release: &AtomicBool) {
    if !release.load(Ordering::Relaxed) {
        tracing::warn!(lease = %le.lease_name, "runs were not all recorded: leaving the Lease to expire, so the next leader finds them");
        return;
    }
    let released =
        tokio::time::timeout(LEASE_RELEASE_TIMEOUT, release_lease(api, le, instance)).await;
    if !matches!(released, Ok(Ok(()))) {
        tracing::warn!(lease = %le.lease_name, "could not release the Lease; it expires on its own");
    }
}

fn lease_spec(
    le: &LeaderElection,
    instance: &str,
    transitions: i32,
    acquired: Option<MicroTime>,
) -> LeaseSpec {
    let now = MicroTime(Timestamp::now());
    LeaseSpec {
        holder_identity: Some(instance.to_owned()),
        lease_duration_seconds: Some(le.duration.as_secs().max(1) as i32),
        acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// One look at the Lease: create it, renew it, take it over when expired, or leave it.
/// Writes are compare-and-swap on `resourceVersion`, so two candidates never both win.
async fn attempt(
    api: &Api<Lease>,
    le: &LeaderElection,
    instance: &str,
    seen: &mut Option<Seen>,
) -> Result<Attempt, kube::Error> {
    let Some(mut lease) = api.get_opt(&le.lease_name).await? else {
        return create_when_absent(api, le, instance, seen).await;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let record = (holder.clone(), spec.renew_time.clone());
    let now = Instant::now();
    if seen.as_ref().is_none_or(|s| s.record != record) {
        *seen = Some(Seen { record, since: now });
    }
    let mine = holder.as_deref() == Some(instance);
    let valid_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
    let expired = seen.as_ref().is_some_and(|s| now >= s.since + valid_for);
    if !mine && holder.is_some() && !expired {
        return Ok(Attempt::Other);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
    let acquired = mine.then(|| spec.acquire_time.clone()).flatten();
    lease.spec = Some(lease_spec(le, instance, transitions, acquired));
    match api
        .replace(&le.lease_name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => {
            *seen = None;
            Ok(Attempt::Held)
        }
        // Someone else wrote first. For a holder that means another took the Lease (or it
        // was rewritten): stop leading at once rather than at the deadline.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Other),
        Err(e) => Err(e),
    }
}

/// An absent Lease is a record too: a holder whose Lease was deleted stops at once, and a
/// candidate creates it only once it has been absent for a whole duration, so a holder that
/// has not noticed yet has stopped first.
async fn create_when_absent(
    api: &Api<Lease>,
    le: &LeaderElection,
    instance: &str,
    seen: &mut Option<Seen>,
) -> Result<Attempt, kube::Error> {
    let now = Instant::now();
    if seen.as_ref().is_none_or(|s| s.record != (None, None)) {
        *seen = Some(Seen {
            record: (None, None),
            since: now,
        });
    }
    if seen.as_ref().is_some_and(|s| now < s.since + le.duration) {
        return Ok(Attempt::Other);
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(le.lease_name.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(lease_spec(le, instance, 0, None)),
    };
    match api.create(&PostParams::default(), &lease).await {
        Ok(_) => {
            // What we saw before is history: an absence from now on counts from now.
            *seen = None;
            Ok(Attempt::Held)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Other),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up so a standby can take it at once.
async fn release_lease(
    api: &Api<Lease>,
    le: &LeaderElection,
    instance: &str,
) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&le.lease_name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(instance) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&lease.name_any(), &PostParams::default(), &lease)
        .await
        .map(|_| ())
}
