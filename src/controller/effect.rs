//! The one place a decision takes effect: a [`Step`]'s status is written (compare-and-swap on
//! the version it was decided on), then its Events published, then its next look returned as
//! the reconcile's [`Action`]. Every decided outcome goes through [`effect`]: a reconcile's, a
//! run blocked by its Secrets, an export this version cannot decode, and a run's end. What a
//! run writes while it lasts (`Queued`, its start, its progress, a cleanup's `CleaningUp`)
//! goes through its [`RunWriter`] or [`writer::write`], and the Events beside it
//! (`RunStarted`, `AudienceNotSaved`, a cleanup's result) through [`events`].

use kube::runtime::controller::Action;

use super::context::Context;
use super::error::Error;
use super::events;
use super::step::{Step, Then};
use super::watched::Undecodable;
use super::writer::{self, RunWriter};
use crate::spec::BrazeExport;

/// Where a step's status goes.
pub enum Target<'a> {
    /// The export as the step read it.
    Export(&'a BrazeExport),
    /// An export this version cannot decode (no Events about it).
    Undecodable(&'a Undecodable),
    /// The end of a run: written by its writer, chained on its last write and retried until
    /// recorded (see [`RunWriter::write_final`]).
    RunEnd {
        /// The export as the run started it.
        export: &'a BrazeExport,
        /// The run's writer.
        writer: &'a RunWriter,
    },
}

/// Writes the step's status (when it has one), publishes its notes, and says when to look
/// again. The notes are published only once the status is written, so a step refused as
/// stale tells nothing; a run's end is told unless the run is no longer this operator's (its
/// export was recreated or taken over): the run happened, even when its record could not be
/// written before the term ended.
pub async fn effect(ctx: &Context, target: Target<'_>, step: Step) -> Result<Action, Error> {
    let written = match &step.status {
        None => Ok(()),
        Some(next) => write(ctx, &target, next).await,
    };
    let told = match &written {
        Ok(()) => true,
        Err(Error::Lost | Error::Gone) => false,
        Err(_) => matches!(target, Target::RunEnd { .. }),
    };
    if told && let Some(export) = regarding(&target) {
        events::publish_all(ctx, export, &step.notes).await;
    }
    written?;
    Ok(match step.then {
        Then::Requeue(after) => Action::requeue(after),
        Then::AwaitChange => Action::await_change(),
        // A start is the reconcile's to make (Secrets, a slot, a task), never a step's effect.
        Then::Start(_) => {
            debug_assert!(false, "a start reached effect");
            Action::await_change()
        }
    })
}

async fn write(
    ctx: &Context,
    target: &Target<'_>,
    next: &crate::spec::BrazeExportStatus,
) -> Result<(), Error> {
    match target {
        Target::Export(export) => writer::write(ctx, export, next).await.map(drop),
        Target::Undecodable(u) => writer::write_undecodable(ctx, u, next).await.map(drop),
        Target::RunEnd { writer, .. } => writer.write_final(next, &ctx.stop, &ctx.metrics).await,
    }
}

fn regarding<'a>(target: &Target<'a>) -> Option<&'a BrazeExport> {
    match target {
        Target::Export(export) | Target::RunEnd { export, .. } => Some(export),
        Target::Undecodable(_) => None,
    }
}
