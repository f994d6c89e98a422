//! One reconcile: the pure [`step`](super::step::step), then its effects: the status write
//! (compare-and-swap on the version the step read), the Events, and a run's start. The error
//! policy decides, in one place, which failures are retried how soon.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;

use super::run_task::RunTask;
use super::status::{self, reason};
use super::step::{self, Facts, Note, Start, Then};
use super::watched::{Undecodable, Watched};
use super::{Context, Error, cleanup, secrets, writer};
use crate::spec::BrazeExport;
use crate::text::truncate;

/// Wait before looking again at an export whose Secret is missing or unreadable.
const SECRET_RETRY: Duration = Duration::from_secs(30);
/// Longest wait for a read or an Event: a hung call must not hold a reconcile slot.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

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
            Watched::Decoded(export) => apply(export, &ctx).await,
            Watched::Undecodable(u) => undecodable(u, &ctx).await,
        }
    }
    .instrument(span)
    .await
}

async fn apply(export: &BrazeExport, ctx: &Arc<Context>) -> Result<Action, Error> {
    if export.metadata.deletion_timestamp.is_some() {
        return cleanup::on_delete(export, ctx).await;
    }
    // The finalizer first, so that an export deleted right after its first run is cleaned
    // up; its change brings the export back here.
    let key = key(export);
    let wanted = cleanup::wanted(export);
    if wanted != cleanup::held(export) {
        if ctx.is_active(&key) {
            // Its run saves its audience as the spec was when it started: held or let go
            // once it has ended.
            return Ok(Action::requeue(step::RUN_POLL));
        }
        cleanup::set_finalizer(ctx, export, wanted).await?;
        return Ok(Action::await_change());
    }
    let step = step::step(
        export,
        &Facts {
            active: ctx.is_active(&key),
            allowed_hosts: &ctx.allowed_hosts,
            retry_base: ctx.retry_base,
            now: ctx.now(),
        },
    );
    if let Some(next) = &step.status {
        write(ctx, export, next).await?;
    }
    match step.then {
        // A crash found on the way to a start is told once the start is recorded: under a
        // lagging watch the start may be refused, and then nothing was interrupted.
        Then::Start(start) => start_run(export, *start, step.notes, ctx).await,
        then => {
            for note in &step.notes {
                publish(ctx, export, note).await;
            }
            Ok(match then {
                Then::Requeue(after) => Action::requeue(after),
                _ => Action::await_change(),
            })
        }
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
    let generation = export.metadata.generation;
    let creds = match read_credentials(ctx, export).await? {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            let next = status::blocked(&start.base, generation, e.reason(), &message, ctx.now());
            if Some(&next) != export.status.as_ref() {
                write(ctx, export, &next).await?;
                let note = Note {
                    warning: true,
                    reason: e.reason(),
                    message,
                };
                publish(ctx, export, &note).await;
            }
            return Ok(Action::requeue(SECRET_RETRY));
        }
    };
    // The term may have ended (shutdown, lost Lease) while the Secrets were read.
    if ctx.stop.is_cancelled() {
        return Ok(Action::await_change());
    }
    let key = key(export);
    let Some(guard) = ctx.claim(&key, super::TaskKind::Run) else {
        return Ok(Action::requeue(step::RUN_POLL));
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
        .spawn(task.run(permit).instrument(tracing::Span::current()));
    Ok(Action::requeue(step::RUN_POLL))
}

/// The credentials, or why not; `Err` only when the API does not answer in time.
pub async fn read_credentials(
    ctx: &Context,
    export: &BrazeExport,
) -> Result<Result<crate::export::Credentials, secrets::SecretError>, Error> {
    tokio::time::timeout(
        API_TIMEOUT,
        secrets::credentials(&ctx.client, &namespace(export), &export.spec),
    )
    .await
    .map_err(|_| Error::Timeout("reading the export's Secrets"))
}

/// An export this version cannot decode: `Ready=False`, `InvalidSpec`, naming the field.
async fn undecodable(u: &Undecodable, ctx: &Context) -> Result<Action, Error> {
    let message = u.error.message();
    let key = format!(
        "{}/{}",
        u.metadata.namespace.as_deref().unwrap_or_default(),
        u.metadata.name.as_deref().unwrap_or_default()
    );
    if ctx.is_active(&key) {
        // Its run goes on with the spec it started with, and records its own end.
        return Ok(Action::requeue(step::RUN_POLL));
    }
    if u.metadata.deletion_timestamp.is_some() {
        return cleanup::on_delete_undecodable(
            ctx,
            u.metadata.namespace.as_deref().unwrap_or_default(),
            u.metadata.name.as_deref().unwrap_or_default(),
            u.metadata.uid.as_deref().unwrap_or_default(),
        )
        .await;
    }
    let Some(current) = &u.status else {
        ctx.metrics.watch_error("UndecodableObject");
        tracing::warn!(error = %message, "cannot decode the export (nor its status)");
        // Its status is unreadable too: writing one would erase its history.
        return Ok(Action::await_change());
    };
    let next = status::blocked(
        current,
        u.metadata.generation,
        reason::INVALID_SPEC,
        &message,
        ctx.now(),
    );
    if &next != current {
        // Counted and logged once per change, not on every look.
        ctx.metrics.watch_error("UndecodableObject");
        tracing::warn!(error = %message, "cannot decode the export");
        let api: Api<Watched> = Api::namespaced(
            ctx.client.clone(),
            u.metadata.namespace.as_deref().unwrap_or_default(),
        );
        writer::apply(
            &api,
            u.metadata.name.as_deref().unwrap_or_default(),
            u.metadata.uid.as_deref().unwrap_or_default(),
            u.metadata.resource_version.as_deref(),
            &next,
        )
        .await?;
    }
    Ok(Action::await_change())
}

/// The error policy: a conflict means the object changed under the step (look again soon), a
/// vanished object needs nothing, anything else is retried after 15 s and counted.
pub fn error_policy(obj: Arc<Watched>, error: &Error, ctx: Arc<Context>) -> Action {
    match error {
        Error::Conflict(_) => {
            tracing::debug!(export = %obj.name_any(), error = %error, "the export changed; looking again");
            Action::requeue(Duration::from_secs(1))
        }
        Error::Gone | Error::Lost => Action::await_change(),
        _ => {
            ctx.metrics.reconcile_error(error.reason());
            tracing::warn!(export = %obj.name_any(), namespace = obj.namespace().unwrap_or_default(), error = %error, "reconcile failed; retrying in 15 s");
            Action::requeue(Duration::from_secs(15))
        }
    }
}

/// `namespace/name`.
pub fn key(export: &BrazeExport) -> String {
    format!("{}/{}", namespace(export), export.name_any())
}

fn namespace(export: &BrazeExport) -> String {
    export.namespace().unwrap_or_default()
}

/// Writes `next` if the object is still the version `export` shows; returns the new version.
pub async fn write(
    ctx: &Context,
    export: &BrazeExport,
    next: &crate::spec::BrazeExportStatus,
) -> Result<String, Error> {
    let api: Api<Watched> = Api::namespaced(ctx.client.clone(), &namespace(export));
    writer::apply(
        &api,
        &export.name_any(),
        &export.uid().unwrap_or_default(),
        export.resource_version().as_deref(),
        next,
    )
    .await
}

/// Publishes an Event about `export`; a failure is only logged.
pub async fn publish(ctx: &Context, export: &BrazeExport, note: &Note) {
    let event = Event {
        type_: if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason.into(),
        note: Some(truncate(&note.message, 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    let published = tokio::time::timeout(
        API_TIMEOUT,
        ctx.recorder.publish(&event, &export.object_ref(&())),
    )
    .await;
    if !matches!(published, Ok(Ok(()))) {
        tracing::debug!("cannot publish an event");
    }
}
