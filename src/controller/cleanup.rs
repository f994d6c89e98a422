//! Deleting an export with `cleanupOnDelete: true` (and `removal: Remove`): a finalizer holds
//! the deletion while the export's flag is removed from every member of its stored audience
//! (Looker is not read), then the audience Secrets are deleted and the finalizer removed.
//!
//! A deletion never hangs: the finalizer goes when the cleanup ends however it ended (Braze
//! refusing the key, the Braze Secret already gone, an invalid spec, [`TIMEOUT`]), with a
//! Warning Event saying how many users keep the flag. Only a term that ends (shutdown, a lost
//! Lease) leaves it, so that the next leader cleans up; removing a value twice is harmless.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use super::reconcile::{API_TIMEOUT, key, publish, write};
use super::status::{self, reason};
use super::step::{Note, RUN_POLL};
use super::watched::Watched;
use super::{ActiveGuard, Context, Error, TaskKind, audience_store, secrets};
use crate::export::report::{Outcome, RunReport, Trigger};
use crate::export::{AudienceInput, ExportPlan, RunOptions, remove_audience};
use crate::spec::{BrazeExport, RemovalMode};

/// The finalizer's name.
pub const FINALIZER: &str = "looker-braze.dev/cleanup";

/// Default bound of one cleanup ([`super::Config::cleanup_timeout`]): 15 minutes, as long as
/// a run waits out Braze's rate limit.
pub const TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Longest wait for loading the stored audience.
const AUDIENCE_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether the export asks for a cleanup on delete (the CRD's rule makes `cleanupOnDelete`
/// need `removal: Remove`; checked again here).
pub fn wanted(export: &BrazeExport) -> bool {
    export.spec.cleanup_on_delete && export.spec.braze.removal == RemovalMode::Remove
}

/// Whether the export holds the finalizer.
pub fn held(export: &BrazeExport) -> bool {
    export.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the finalizer, or removes it, as [`wanted`] says ([`finalizer_patch`]).
pub async fn set_finalizer(ctx: &Context, export: &BrazeExport, on: bool) -> Result<(), Error> {
    // Its audience Secrets first: held before a deletion could take them, or let go so that
    // none is left holding on.
    hold_audience(ctx, &namespace(export), &uid(export), on).await?;
    let patch = finalizer_patch(
        export.finalizers(),
        on,
        export.resource_version(),
        export.uid().as_deref(),
    );
    let api: Api<Watched> = Api::namespaced(ctx.client.clone(), &namespace(export));
    tokio::time::timeout(
        API_TIMEOUT,
        api.patch(
            &export.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await
    .map_err(|_| Error::Timeout("writing the export's finalizers"))??;
    Ok(())
}

/// The merge patch that puts [`FINALIZER`] in `current` (`hold`) or takes it out, keeping
/// the other finalizers; written only on `resource_version` (and `uid`), so a finalizer
/// added meanwhile by someone else is never lost.
pub(super) fn finalizer_patch(
    current: &[String],
    hold: bool,
    resource_version: Option<String>,
    uid: Option<&str>,
) -> serde_json::Value {
    let mut list: Vec<&str> = current
        .iter()
        .map(String::as_str)
        .filter(|f| *f != FINALIZER)
        .collect();
    if hold {
        list.push(FINALIZER);
    }
    let mut metadata = json!({"finalizers": list, "resourceVersion": resource_version});
    if let Some(uid) = uid {
        metadata["uid"] = json!(uid);
    }
    json!({ "metadata": metadata })
}

/// Removes the finalizer from the export `uid` as it is now (re-read after a conflict);
/// done when it is gone, or when the name now belongs to a recreated export.
async fn release(ctx: &Context, namespace: &str, name: &str, uid: &str) -> Result<(), Error> {
    let api: Api<Watched> = Api::namespaced(ctx.client.clone(), namespace);
    for attempt in 1..=5u32 {
        let Some(fresh) = holding(&api, name, uid).await? else {
            return Ok(());
        };
        let current = fresh.meta().finalizers.as_deref().unwrap_or_default();
        let patch = finalizer_patch(current, false, fresh.resource_version(), Some(uid));
        let patched = tokio::time::timeout(
            API_TIMEOUT,
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map_err(|_| Error::Timeout("removing the finalizer"))?
        .map_err(Error::from_kube);
        match patched {
            Ok(_) | Err(Error::Gone) => return Ok(()),
            Err(Error::Conflict(_)) => {
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::Conflict("the export keeps changing".into()))
}

/// Puts the finalizer on the audience Secrets of the export `uid`, or takes it off.
async fn hold_audience(ctx: &Context, namespace: &str, uid: &str, hold: bool) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let held = audience_store::hold_audience(&api, uid, hold);
    match tokio::time::timeout(API_TIMEOUT, held).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(audience_store::StoreError::Kube(e))) => Err(Error::from_kube(e)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot hold or release the audience Secrets");
            Ok(())
        }
        Err(_) => Err(Error::Timeout("holding or releasing the audience Secrets")),
    }
}

/// The export `uid` as it is now, if it still holds the finalizer.
async fn holding(api: &Api<Watched>, name: &str, uid: &str) -> Result<Option<Watched>, Error> {
    let fresh = tokio::time::timeout(API_TIMEOUT, api.get_opt(name))
        .await
        .map_err(|_| Error::Timeout("reading the export"))??;
    Ok(fresh.filter(|f| {
        f.uid().as_deref() == Some(uid)
            && f.meta().finalizers.iter().flatten().any(|x| x == FINALIZER)
    }))
}

/// An export being deleted. With the finalizer: stops its run (which records its end and
/// saves its audience first), then starts the cleanup.
pub async fn on_delete(export: &BrazeExport, ctx: &Arc<Context>) -> Result<Action, Error> {
    if !held(export) {
        return Ok(Action::await_change());
    }
    if !wanted(export) {
        // `cleanupOnDelete` was turned off before the deletion.
        hold_audience(ctx, &namespace(export), &uid(export), false).await?;
        release(ctx, &namespace(export), &export.name_any(), &uid(export)).await?;
        return Ok(Action::await_change());
    }
    let key = key(export);
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
        .spawn(task.run().instrument(tracing::Span::current()));
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
    hold_audience(ctx, namespace, uid, false).await?;
    release(ctx, namespace, name, uid).await?;
    Ok(Action::await_change())
}

struct Cleanup {
    ctx: Arc<Context>,
    export: BrazeExport,
    active: ActiveGuard,
}

impl Cleanup {
    async fn run(self) {
        let ctx = &self.ctx;
        let (ns, name, uid) = (
            namespace(&self.export),
            self.export.name_any(),
            uid(&self.export),
        );
        // A cache behind the API may show an export this process already let go (its
        // audience too, unless a crash came between: then let it go now).
        let api: Api<Watched> = Api::namespaced(ctx.client.clone(), &ns);
        match holding(&api, &name, &uid).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = hold_audience(ctx, &ns, &uid, false).await;
                return;
            }
            Err(_) => return,
        }
        let stop = self.active.stop().clone();
        // The bound counts the wait for a run slot too: a deletion must not wait on long runs
        // of other exports for ever.
        let bound = stop.child_token();
        let timer = {
            let (bound, after) = (bound.clone(), ctx.cleanup_timeout);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                bound.cancel();
            })
        };
        let permit = tokio::select! {
            biased;
            () = bound.cancelled() => None,
            p = Arc::clone(&ctx.permits).acquire_owned() => p.ok(),
        };
        let note = match permit {
            Some(_) => self.clean(bound).await,
            None => Note {
                warning: true,
                reason: reason::CLEANUP_INCOMPLETE,
                message: "deleted without removing the flag: no run slot came free in time".into(),
            },
        };
        timer.abort();
        drop(permit);
        if stop.is_cancelled() {
            // The term ended: the finalizer stays, and the next leader cleans up again.
            return;
        }
        publish(ctx, &self.export, &note).await;
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let deleted = tokio::time::timeout(
            AUDIENCE_TIMEOUT,
            audience_store::delete_audience(&secrets, &self.export),
        )
        .await;
        // Secrets still held must not outlive the export: they would be stuck once it is
        // gone. Let go, the garbage collector deletes them with it; else looked at again
        // after RUN_POLL.
        if !matches!(deleted, Ok(Ok(()))) && hold_audience(ctx, &ns, &uid, false).await.is_err() {
            tracing::warn!("cannot delete or release the audience Secrets; trying again");
            return;
        }
        if let Err(e) = release(ctx, &ns, &name, &uid).await {
            // Looked at again after RUN_POLL.
            tracing::warn!(error = %e, "cannot remove the finalizer");
        }
    }

    /// Removes the flag from the stored audience; what to tell about it.
    async fn clean(&self, bound: tokio_util::sync::CancellationToken) -> Note {
        let ctx = &self.ctx;
        let export = &self.export;
        let ns = namespace(export);
        let incomplete = |why: String| Note {
            warning: true,
            reason: reason::CLEANUP_INCOMPLETE,
            message: format!("deleted without removing the flag: {why}"),
        };
        let plan = match ExportPlan::new(&export.name_any(), &export.spec) {
            Ok(p) => p,
            Err(e) => {
                let fields: Vec<String> = e.iter().map(ToString::to_string).collect();
                return incomplete(format!("the spec is invalid ({})", fields.join("; ")));
            }
        };
        let key = secrets::braze_key(&ctx.client, &ns, &export.spec);
        let creds = match within(API_TIMEOUT, "the Braze Secret", key).await {
            Ok(c) => c,
            Err(why) => return incomplete(why),
        };
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let loaded = audience_store::load_audience(&api, export);
        let previous = match within(AUDIENCE_TIMEOUT, "the stored audience", loaded).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Note {
                    warning: false,
                    reason: reason::CLEANED_UP,
                    message: "no stored audience: nobody to remove the flag from".into(),
                };
            }
            Err(why) => return incomplete(why),
        };
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
            &ctx.identity,
            ctx.now(),
        );
        // Shown while it lasts; the export is gone soon after, so a refused write is no loss.
        let _ = write(ctx, export, &cleaning).await;
        let owner = crate::audience::Owner {
            namespace: export.namespace(),
            name: export.name_any(),
        };
        let input = AudienceInput {
            owner,
            previous: Some(previous),
        };
        let opts = RunOptions {
            cancel: bound.clone(),
            ..RunOptions::new(Trigger::Deletion)
        };
        let started = ctx.now();
        let mut report = remove_audience(&ctx.services, &plan, &creds, opts, input).await;
        // The controller's clock (offset in tests), as for runs.
        report.start_time = started;
        report.completion_time = Some(ctx.now());
        ctx.metrics.record_run(&report, ctx.now());
        outcome_note(&report, &flag, members, bound.is_cancelled())
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

fn namespace(export: &BrazeExport) -> String {
    export.namespace().unwrap_or_default()
}

fn uid(export: &BrazeExport) -> String {
    export.uid().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finalizer_patch_keeps_other_finalizers() {
        let others = vec!["example.com/keep".to_owned()];
        assert_eq!(
            finalizer_patch(&others, true, Some("7".into()), Some("u")),
            json!({"metadata": {"finalizers": ["example.com/keep", FINALIZER], "resourceVersion": "7", "uid": "u"}})
        );
        let held = vec![FINALIZER.to_owned(), "example.com/keep".to_owned()];
        assert_eq!(
            finalizer_patch(&held, false, Some("8".into()), None),
            json!({"metadata": {"finalizers": ["example.com/keep"], "resourceVersion": "8"}})
        );
        assert_eq!(
            finalizer_patch(&[FINALIZER.to_owned()], true, Some("9".into()), None),
            json!({"metadata": {"finalizers": [FINALIZER], "resourceVersion": "9"}}),
            "never twice"
        );
    }
}
