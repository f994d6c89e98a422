//! Deleting an export with `cleanupOnDelete: true` (and `removal: Remove`): a finalizer holds
//! the deletion while the export's flag is removed from every member of its stored audience
//! (Looker is not read), then the audience Secrets are deleted and the finalizer removed.
//!
//! A deletion never hangs: the finalizer goes when the cleanup ends however it ended (Braze
//! refusing the key, the Braze Secret already gone, an invalid spec, the cleanup timeout),
//! with a Warning saying how many users keep the flag. Only a term that ends (shutdown, a lost
//! Lease) leaves it, so that the next leader cleans up; removing a value twice is harmless.
//!
//! The Braze key Secret is held too ([`key_hold`]), so that a namespace deletion, which deletes
//! every kind at once, leaves the cleanup its key; it is let go once the cleanup ended. How
//! the cleanup ended goes to the export's status, an Event, one log line and the metrics: a
//! terminating namespace refuses the Event, and the status is then where a user sees it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::audiences::AudienceStore;
use super::context::{ActiveGuard, Context, TaskKind, key};
use super::error::Error;
use super::finalizer::{self, held, wanted};
use super::status::{self, reason};
use super::step::Note;
use super::timeouts::{API_TIMEOUT, AUDIENCE_TIMEOUT, RUN_POLL};
use super::watched::Watched;
use super::{audience_store, credentials, events, key_hold, writer};
use crate::audience::{Encoded, Owner};
use crate::export::report::{Outcome, RunReport, Trigger};
use crate::export::{AudienceInput, Credentials, ExportPlan, RunOptions, remove_audience};
use crate::spec::BrazeExport;

/// Whether `export` wants the finalizer with this operator's audience store: for a cleanup
/// on delete, or for an audience kept in a bucket ([`finalizer::wanted_in`]).
pub fn finalizer_wanted(ctx: &Context, export: &BrazeExport) -> bool {
    finalizer::wanted_in(export, !ctx.audience_store.in_secrets())
}

/// Adds the finalizer, or removes it, as [`finalizer_wanted`] says.
pub async fn set_finalizer(ctx: &Context, export: &BrazeExport, on: bool) -> Result<(), Error> {
    let ns = namespace(export);
    // What the cleanup reads first, the Braze key and the audience Secrets: held before a
    // deletion could take them, or let go so that none is left holding on.
    if on && wanted(export) {
        key_hold::hold(ctx, export).await;
    }
    set_audience_held(ctx, &ns, &uid(export), on).await?;
    finalizer::set_on_export(&exports(ctx, &ns), export, on).await?;
    if !on {
        // Read fresh, the export no longer needs its key.
        key_hold::release_unneeded(ctx, &ns, None).await;
    }
    Ok(())
}

/// Puts the finalizer on the audience Secrets of the export `uid`, or takes it off.
async fn set_audience_held(
    ctx: &Context,
    namespace: &str,
    uid: &str,
    hold: bool,
) -> Result<(), Error> {
    // In a bucket, nothing to hold; Secrets an earlier store left held are still let go, at
    // best (the operator may then have no right to list them).
    let in_secrets = ctx.audience_store.in_secrets();
    if hold && !in_secrets {
        return Ok(());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let held = audience_store::hold_audience(&api, uid, hold);
    match tokio::time::timeout(API_TIMEOUT, held).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if !in_secrets => {
            tracing::debug!(error = %e, "cannot release audience Secrets left by the Secrets store");
            Ok(())
        }
        Ok(Err(audience_store::StoreError::Kube(e))) => Err(Error::from_kube(e)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot hold or release the audience Secrets");
            Ok(())
        }
        Err(_) => Err(Error::Timeout("holding or releasing the audience Secrets")),
    }
}

/// Lets the export's audience Secrets go (or deletes its objects in a bucket), then removes
/// its finalizer: deleted without a cleanup.
async fn let_go(ctx: &Context, namespace: &str, name: &str, uid: &str) -> Result<(), Error> {
    delete_bucket_audience(ctx, uid).await;
    set_audience_held(ctx, namespace, uid, false).await?;
    finalizer::release(&exports(ctx, namespace), name, uid).await?;
    key_hold::release_unneeded(ctx, namespace, Some(uid)).await;
    Ok(())
}

/// With the audiences in a bucket: deletes the objects of the export `uid` (a deleted
/// export's audience must not outlive it). A failure is a Warning in the log, never a hung
/// deletion.
async fn delete_bucket_audience(ctx: &Context, uid: &str) {
    let AudienceStore::Bucket(bucket) = &ctx.audience_store else {
        return;
    };
    let objects = bucket.audience(uid);
    match tokio::time::timeout(AUDIENCE_TIMEOUT, objects.delete_all()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot delete the deleted export's audience objects");
        }
        Err(_) => tracing::warn!(
            objects = %objects.shown(),
            "the deleted export's audience objects were not deleted in time"
        ),
    }
}

/// An export being deleted. With the finalizer: stops its run (which records its end and
/// saves its audience first), then starts the cleanup, or (no cleanup wanted) lets it go.
pub async fn on_delete(export: &BrazeExport, ctx: &Arc<Context>) -> Result<Action, Error> {
    if !held(export) {
        return Ok(Action::await_change());
    }
    let key = key(export);
    if !wanted(export) && !ctx.audience_store.in_secrets() && ctx.is_active(&key) {
        // Its run saves the audience first: the objects are deleted after that.
        ctx.stop_run(&key);
        return Ok(Action::requeue(RUN_POLL));
    }
    if !wanted(export) {
        // `cleanupOnDelete` was turned off before the deletion.
        let_go(ctx, &namespace(export), &export.name_any(), &uid(export)).await?;
        return Ok(Action::await_change());
    }
    let Some(guard) = ctx.claim(&key, TaskKind::Cleanup) else {
        ctx.stop_run(&key);
        return Ok(Action::requeue(RUN_POLL));
    };
    let task = Cleanup {
        ctx: Arc::clone(ctx),
        export: export.clone(),
        active: guard,
    };
    ctx.tasks
        .spawn(task.carry_out().instrument(tracing::Span::current()));
    // Looked at again when the cleanup ended: a finalizer it could not remove is retried.
    Ok(Action::requeue(RUN_POLL))
}

/// An export this version cannot decode cannot be cleaned up: its finalizer is removed.
pub async fn on_delete_undecodable(
    ctx: &Context,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<Action, Error> {
    tracing::warn!(
        export = name,
        "cannot decode the deleted export: it is deleted without a cleanup"
    );
    let_go(ctx, namespace, name, uid).await?;
    Ok(Action::await_change())
}

fn exports(ctx: &Context, namespace: &str) -> Api<Watched> {
    Api::namespaced(ctx.client.clone(), namespace)
}

struct Cleanup {
    ctx: Arc<Context>,
    export: BrazeExport,
    active: ActiveGuard,
}

/// How a cleanup ended: what to tell, the report of its removals (when it ran), and the size
/// of the stored audience (when it was read).
struct Ended {
    note: Note,
    report: Option<RunReport>,
    members: Option<u64>,
}

impl From<Note> for Ended {
    fn from(note: Note) -> Self {
        Self {
            note,
            report: None,
            members: None,
        }
    }
}

impl Cleanup {
    /// The cleanup, then its record, then the audience Secrets deleted and the finalizer
    /// released, in that order: the record must be written while the export exists.
    async fn carry_out(self) {
        let ctx = &self.ctx;
        let (ns, name, uid) = (
            namespace(&self.export),
            self.export.name_any(),
            uid(&self.export),
        );
        // A cache behind the API may show an export this process already let go (its
        // audience too, unless a crash came between: then let it go now).
        match finalizer::holding(&exports(ctx, &ns), &name, &uid).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = set_audience_held(ctx, &ns, &uid, false).await;
                key_hold::release_unneeded(ctx, &ns, Some(&uid)).await;
                return;
            }
            Err(_) => return,
        }
        let ended = self.bounded().await;
        if self.active.stop().is_cancelled() {
            // The term ended: the finalizer stays, and the next leader cleans up again.
            return;
        }
        self.record(&ended).await;
        self.finish(&ns, &name, &uid).await;
    }

    /// Writes how the cleanup ended to the export's status, then tells it in an Event, one log
    /// line and the metrics. The status first: in a terminating namespace the Event is refused
    /// (nothing new may be created there), while the export, held by its finalizer, still
    /// takes a status.
    async fn record(&self, ended: &Ended) {
        let (ctx, export, note) = (&self.ctx, &self.export, &ended.note);
        let api = exports(ctx, &namespace(export));
        let next = |current: &crate::spec::BrazeExportStatus| {
            let (generation, now) = (export.metadata.generation, ctx.now());
            status::cleaned(
                current,
                ended.report.as_ref(),
                generation,
                note.reason,
                &note.message,
                now,
            )
        };
        if let Err(e) = writer::write_fresh(&api, &export.name_any(), &uid(export), next).await {
            tracing::warn!(error = %e, "cannot write the cleanup's end to the status");
        }
        events::publish(ctx, export, note).await;
        ctx.metrics.record_cleanup(note.reason);
        log_end(&key(export), ended);
    }

    /// The cleanup within the cleanup timeout, which counts the wait for a run slot too: a
    /// deletion must not wait on long runs of other exports for ever.
    async fn bounded(&self) -> Ended {
        let bound = self.active.stop().child_token();
        let timer = {
            let (bound, after) = (bound.clone(), self.ctx.cleanup_timeout);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                bound.cancel();
            })
        };
        let permit: Option<OwnedSemaphorePermit> = tokio::select! {
            biased;
            () = bound.cancelled() => None,
            p = Arc::clone(&self.ctx.permits).acquire_owned() => p.ok(),
        };
        let ended = match permit {
            Some(_) => self.clean(bound).await,
            None => incomplete("no run slot came free in time".into()).into(),
        };
        timer.abort();
        drop(permit);
        ended
    }

    /// Deletes the audience Secrets, then releases the export.
    async fn finish(&self, ns: &str, name: &str, uid: &str) {
        let ctx = &self.ctx;
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let place = ctx
            .audience_store
            .place(secrets, &self.export, &ctx.scratch);
        let deleted = tokio::time::timeout(AUDIENCE_TIMEOUT, place.delete()).await;
        if !ctx.audience_store.in_secrets() {
            // Never a hung deletion: objects that cannot be deleted stay behind, said once.
            let why = match &deleted {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("not deleted in time".to_owned()),
            };
            if let Some(why) = why {
                tracing::warn!(error = %why, "the deleted export's audience objects stay in the bucket");
            }
        }
        // Secrets still held must not outlive the export: they would be stuck once it is
        // gone. Let go, the garbage collector deletes them with it; else looked at again
        // after RUN_POLL.
        if !matches!(deleted, Ok(Ok(()))) && set_audience_held(ctx, ns, uid, false).await.is_err() {
            tracing::warn!("cannot delete or release the audience Secrets; trying again");
            return;
        }
        if let Err(e) = finalizer::release(&exports(ctx, ns), name, uid).await {
            // Looked at again after RUN_POLL.
            tracing::warn!(error = %e, "cannot remove the finalizer");
            return;
        }
        // Only now: until the finalizer went, a failure would have the cleanup done again.
        key_hold::release_unneeded(ctx, ns, Some(uid)).await;
    }

    /// Removes the flag from the stored audience; what to tell about it.
    async fn clean(&self, bound: CancellationToken) -> Ended {
        let (plan, creds, previous) = match self.gather().await {
            Ok(Some(ready)) => ready,
            Ok(None) => {
                let note = Note {
                    warning: false,
                    reason: reason::CLEANED_UP,
                    message: "no stored audience: nobody to remove the flag from".into(),
                };
                return Ended {
                    members: Some(0),
                    ..note.into()
                };
            }
            Err(why) => return incomplete(why).into(),
        };
        let ctx = &self.ctx;
        let export = &self.export;
        let members = previous.header().members;
        let flag = format!(
            "{} from {}",
            previous.header().export_name,
            previous.header().attribute
        );
        let cleaning = status::cleaning(
            export.status.as_ref(),
            export.metadata.generation,
            &flag,
            members,
            &ctx.instance,
            ctx.now(),
        );
        // Shown while it lasts; the export is gone soon after, so a refused write is no loss.
        let _ = writer::write(ctx, export, &cleaning).await;
        let owner = Owner {
            namespace: export.namespace(),
            name: export.name_any(),
        };
        // A cleanup flags nobody: nothing to record.
        let input = AudienceInput {
            owner,
            previous: Some(previous),
            pending_log: None,
        };
        let opts = RunOptions {
            cancel: bound.clone(),
            // A large audience is merged through the scratch directory (the root filesystem
            // is read-only in the chart's pod).
            spill: crate::export::SpillOptions {
                scratch: ctx.scratch.clone(),
                ..crate::export::SpillOptions::default()
            },
            ..RunOptions::new(Trigger::Deletion)
        };
        let started = ctx.now();
        let mut report = remove_audience(&ctx.services, &plan, &creds, opts, input).await;
        // The controller's clock (offset in tests), as for runs.
        report.start_time = started;
        report.completion_time = Some(ctx.now());
        ctx.metrics.record_run(&report, ctx.now());
        Ended {
            note: outcome_note(&report, &flag, members, bound.is_cancelled()),
            report: Some(report),
            members: Some(members),
        }
    }

    /// The plan, the Braze key and the stored audience (`None`: there is none), or why not.
    async fn gather(&self) -> Result<Option<(ExportPlan, Credentials, Encoded)>, String> {
        let ctx = &self.ctx;
        let export = &self.export;
        let ns = namespace(export);
        let plan = ExportPlan::new(&export.name_any(), &export.spec).map_err(|e| {
            let fields: Vec<String> = e.iter().map(ToString::to_string).collect();
            format!("the spec is invalid ({})", fields.join("; "))
        })?;
        let read_key = credentials::braze_key(&ctx.client, &ns, &export.spec);
        let creds = within(API_TIMEOUT, "the Braze Secret", read_key).await?;
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let place = ctx.audience_store.place(api, export, &ctx.scratch);
        let loaded = place.load_with_pending();
        let (previous, _) = within(AUDIENCE_TIMEOUT, "the stored audience", loaded).await?;
        Ok(previous.map(|p| (plan, creds, p)))
    }
}

/// A cleanup that could not remove the flag at all.
fn incomplete(why: String) -> Note {
    Note {
        warning: true,
        reason: reason::CLEANUP_INCOMPLETE,
        message: format!("deleted without removing the flag: {why}"),
    }
}

/// `read`'s answer, or why not (its error, or `what` not read within `limit`).
async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    what: &str,
    read: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, read).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!("{what} could not be read in time")),
    }
}

/// The Event after a cleanup: how many users lost the flag, and how many may keep it (a
/// removal in flight when the cleanup stopped may have reached Braze unconfirmed).
fn outcome_note(report: &RunReport, flag: &str, members: u64, stopped: bool) -> Note {
    let c = &report.counts;
    let removed = c.removed.unwrap_or(0);
    let kept = members.saturating_sub(removed);
    if report.outcome == Outcome::Succeeded {
        return Note {
            warning: false,
            reason: reason::CLEANED_UP,
            message: format!("removed {flag} for all {removed} users of the stored audience"),
        };
    }
    let why = if stopped {
        "the cleanup ran out of time".to_owned()
    } else {
        report.message.clone()
    };
    Note {
        warning: true,
        reason: reason::CLEANUP_INCOMPLETE,
        message: format!(
            "removed {flag} for {removed} of the {members} users of the stored audience; {kept} may keep it ({why})"
        ),
    }
}

/// The one log line of a cleanup's end, with its counts (`unknown`: the stored audience was
/// not read).
fn log_end(export: &str, ended: &Ended) {
    let removed = ended
        .report
        .as_ref()
        .map_or(0, |r| r.counts.removed.unwrap_or(0));
    let (members, kept) = match ended.members {
        Some(m) => (m.to_string(), m.saturating_sub(removed).to_string()),
        None => ("unknown".to_owned(), "unknown".to_owned()),
    };
    let outcome = ended.note.reason;
    if ended.note.warning {
        tracing::warn!(export, outcome, removed, %members, %kept, message = %ended.note.message, "the cleanup ended");
    } else {
        tracing::info!(export, outcome, removed, %members, %kept, "the cleanup ended");
    }
}

fn namespace(export: &BrazeExport) -> String {
    export.namespace().unwrap_or_default()
}

fn uid(export: &BrazeExport) -> String {
    export.uid().unwrap_or_default()
}
