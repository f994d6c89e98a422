//! One reconcile: the pure [`step`](super::step::step), then its [`effect`], or a run's start;
//! a deleted export goes to its cleanup. The error policy decides, in one place, which
//! failures are retried how soon.

use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::Instrument;

use super::cleanup;
use super::context::{Context, TaskKind, key, key_of};
use super::credentials::read_credentials;
use super::effect::{Target, effect};
use super::error::Error;
use super::finalizer::{held, wanted};
use super::key_hold;
use super::run_task::RunTask;
use super::status::reason;
use super::step::{self, Note, Start, Step, Then};
use super::timeouts::{CONFLICT_REQUEUE, ERROR_REQUEUE, RUN_POLL};
use super::watched::{Undecodable, Watched};
use crate::spec::BrazeExport;

/// Reconciles one export, in its own span.
pub async fn reconcile(obj: Arc<Watched>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!(
        "reconcile",
        namespace = obj.namespace().unwrap_or_default(),
        export = obj.name_any()
    );
    async move {
        if ctx.stop.is_cancelled() {
            return Ok(Action::await_change());
        }
        match obj.as_ref() {
            Watched::Decoded(export) => handle(export, &ctx).await,
            Watched::Undecodable(u) => undecodable(u, &ctx).await,
        }
    }
    .instrument(span)
    .await
}

async fn handle(export: &BrazeExport, ctx: &Arc<Context>) -> Result<Action, Error> {
    if export.metadata.deletion_timestamp.is_some() {
        return cleanup::on_delete(export, ctx).await;
    }
    // The finalizer first, so that an export deleted right after its first run is cleaned
    // up; its change brings the export back here.
    let key = key(export);
    let finalizer = cleanup::finalizer_wanted(ctx, export);
    if finalizer != held(export) {
        if ctx.is_active(&key) {
            // Its run saves its audience as the spec was when it started: held or let go
            // once it has ended.
            return Ok(Action::requeue(RUN_POLL));
        }
        cleanup::set_finalizer(ctx, export, finalizer).await?;
        return Ok(Action::await_change());
    }
    if wanted(export) {
        // Once a term per key name (the export may name another one now).
        key_hold::hold(ctx, export).await;
    } else if finalizer {
        // Held for its audience in a bucket alone: a key it held for a cleanup goes.
        key_hold::let_go_if_held(ctx, export).await;
    }
    let others = ctx.others(export);
    match step::step(export, &ctx.facts(ctx.is_active(&key), &others)) {
        // A crash found on the way to a start is told once the start is recorded: under a
        // lagging watch the start may be refused, and then nothing was interrupted.
        Step {
            then: Then::Start(start),
            notes,
            ..
        } => start_run(export, *start, notes, ctx).await,
        step => effect(ctx, Target::Export(export), step).await,
    }
}

/// Reads the Secrets, then starts the run at once when a slot is free, or records it as
/// `Queued` and lets its task wait for one.
async fn start_run(
    export: &BrazeExport,
    start: Start,
    notes: Vec<Note>,
    ctx: &Arc<Context>,
) -> Result<Action, Error> {
    let creds = match read_credentials(ctx, export).await? {
        Ok(c) => c,
        Err(e) => {
            let blocked =
                step::secret_blocked(export, &start, e.reason(), e.to_string(), ctx.now());
            return effect(ctx, Target::Export(export), blocked).await;
        }
    };
    // The term may have ended (shutdown, lost Lease) while the Secrets were read.
    if ctx.stop.is_cancelled() {
        return Ok(Action::await_change());
    }
    let key = key(export);
    let Some(guard) = ctx.claim(&key, TaskKind::Run) else {
        return Ok(Action::requeue(RUN_POLL));
    };
    let permit = Arc::clone(&ctx.permits).try_acquire_owned().ok();
    let mut base = export.clone();
    base.status = Some(start.base.clone());
    let task = RunTask {
        ctx: Arc::clone(ctx),
        export: base,
        key,
        start,
        creds,
        notes,
        active: guard,
    };
    ctx.tasks
        .spawn(task.carry_out(permit).instrument(tracing::Span::current()));
    Ok(Action::requeue(RUN_POLL))
}

/// An export this version cannot decode: `Ready=False`, `InvalidSpec`, naming the field.
async fn undecodable(u: &Undecodable, ctx: &Context) -> Result<Action, Error> {
    let meta = &u.metadata;
    let (namespace, name) = (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    );
    if ctx.is_active(&key_of(namespace, name)) {
        // Its run goes on with the spec it started with, and records its own end.
        return Ok(Action::requeue(RUN_POLL));
    }
    if meta.deletion_timestamp.is_some() {
        let uid = meta.uid.as_deref().unwrap_or_default();
        return cleanup::on_delete_undecodable(ctx, namespace, name, uid).await;
    }
    let message = u.error.message();
    let Some(current) = &u.status else {
        ctx.metrics.watch_error(reason::UNDECODABLE_OBJECT);
        tracing::warn!(error = %message, "cannot decode the export (nor its status)");
        // Its status is unreadable too: writing one would erase its history.
        return Ok(Action::await_change());
    };
    let step = step::undecodable(current, meta.generation, &message, ctx.now());
    if step.status.is_some() {
        // Counted and logged once per change, not on every look.
        ctx.metrics.watch_error(reason::UNDECODABLE_OBJECT);
        tracing::warn!(error = %message, "cannot decode the export");
    }
    effect(ctx, Target::Undecodable(u), step).await
}

/// The error policy: a conflict means the object changed under the step (look again soon), a
/// vanished object needs nothing, anything else is retried after 15 s and counted.
pub fn error_policy(obj: Arc<Watched>, error: &Error, ctx: Arc<Context>) -> Action {
    match error {
        Error::Conflict(_) => {
            tracing::debug!(export = %obj.name_any(), error = %error, "the export changed; looking again");
            Action::requeue(CONFLICT_REQUEUE)
        }
        Error::Gone | Error::Lost => Action::await_change(),
        _ => {
            ctx.metrics.reconcile_error(error.reason());
            tracing::warn!(export = %obj.name_any(), namespace = obj.namespace().unwrap_or_default(), error = %error, "reconcile failed; retrying in 15 s");
            Action::requeue(ERROR_REQUEUE)
        }
    }
}
