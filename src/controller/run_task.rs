//! A run in its own task: wait for a slot, check on a fresh read that the run is still due,
//! record its start (compare-and-swap), run it with progress writes, and record how it ended
//! after the last progress write has landed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::audience_store;
use super::audiences::Place;
use super::context::{ActiveGuard, Context};
use super::credentials::read_credentials;
use super::effect::{Target, effect};
use super::error::Error;
use super::events;
use super::status::{self, reason};
use super::step::{self, Note, Start, Then};
use super::timeouts::{API_TIMEOUT, AUDIENCE_TIMEOUT, QUEUE_GRACE, audience_save_timeout};
use super::watched::Watched;
use super::writer::{self, RunWriter};
use crate::audience::{Encoded, Owner};
use crate::export::error::AUDIENCE_MISMATCH;
use crate::export::report::{RunContext, RunFailure, RunReport, Tally, audience_not_saved};
use crate::export::{
    AudienceInput, AudienceUpdate, Credentials, RunOptions, run_export, run_export_synced,
};
use crate::schedule::{DISCARD_AUDIENCE_ANNOTATION, FULL_RESYNC_ANNOTATION};
use crate::spec::{BrazeExport, BrazeExportStatus};

/// Said in the report's message and the Event of a run that discarded its stored audience.
pub const DISCARDED: &str = "the stored audience was discarded on request";

/// How to start afresh after a stored audience that cannot be used.
fn discard_hint(export: &BrazeExport) -> String {
    format!(
        "to start afresh without it, run now with {DISCARD_AUDIENCE_ANNOTATION} set to the \
         run-now value (kubectl bzx trigger {} --discard-audience)",
        export.name_any()
    )
}

/// A run to carry out, owning what it needs.
pub struct RunTask {
    /// Shared state.
    pub ctx: Arc<Context>,
    /// The export as last written by the reconcile (its status and `resourceVersion`).
    pub export: BrazeExport,
    /// `namespace/name`.
    pub key: String,
    /// The run.
    pub start: Start,
    /// Its credentials.
    pub creds: Credentials,
    /// Events found on the way (a crash), published once the start is recorded.
    pub notes: Vec<Note>,
    /// Keeps the export active in this process until the task ends, even by a panic.
    pub active: ActiveGuard,
}

impl RunTask {
    /// Waits for a slot (unless `permit` is one), runs, then leaves the export to the
    /// reconcile again.
    pub async fn carry_out(mut self, permit: Option<OwnedSemaphorePermit>) {
        let permit = match permit {
            Some(p) => Some(p),
            None => self.queue().await,
        };
        if let Some(permit) = permit
            && let Err(e) = self.run_and_record(permit).await
        {
            tracing::warn!(export = %self.key, error = %e, "the run's status could not be recorded");
        }
    }

    /// A slot free within [`QUEUE_GRACE`] starts the run as decided (its start write is still
    /// conditional on the version the decision read). A longer wait is shown as `Queued`,
    /// and the run is decided again when its slot comes.
    async fn queue(&mut self) -> Option<OwnedSemaphorePermit> {
        let soon = tokio::select! {
            biased;
            () = self.active.stop().cancelled() => return None,
            p = tokio::time::timeout(QUEUE_GRACE, Arc::clone(&self.ctx.permits).acquire_owned()) => p,
        };
        if let Ok(p) = soon {
            return p.ok();
        }
        let ctx = Arc::clone(&self.ctx);
        let queued = status::queued(
            &self.start.base,
            self.export.metadata.generation,
            &self.start.due,
            ctx.slots,
            ctx.now(),
        );
        let rv = writer::write(&ctx, &self.export, &queued).await.ok()?;
        self.export.metadata.resource_version = Some(rv);
        self.export.status = Some(queued);
        self.wait_for_slot().await
    }

    /// Waits for a slot, then re-reads the export and re-decides: while it waited, another
    /// instance may have run it, or its spec may have changed. `None` on shutdown (a run that
    /// never started records nothing) or when the run is no longer due.
    async fn wait_for_slot(&mut self) -> Option<OwnedSemaphorePermit> {
        let permit = tokio::select! {
            biased;
            () = self.active.stop().cancelled() => return None,
            p = Arc::clone(&self.ctx.permits).acquire_owned() => p.ok()?,
        };
        let (api, name) = (self.api(), self.export.name_any());
        let read = tokio::time::timeout(API_TIMEOUT, api.get_opt(&name));
        let Watched::Decoded(fresh) = read.await.ok()?.ok()?? else {
            return None;
        };
        // Recreated, or being deleted: its cleanup (if any) comes instead.
        if fresh.uid() != self.export.uid() || fresh.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let others = self.ctx.others(&fresh);
        let next = step::step(&fresh, &self.ctx.facts(false, &others));
        match next.then {
            Then::Start(start) => {
                // Secrets too may have changed while it waited.
                self.creds = read_credentials(&self.ctx, &fresh).await.ok()?.ok()?;
                self.start = *start;
                self.notes = next.notes;
                self.export = fresh;
                Some(permit)
            }
            // Something else to record: the reconcile does it on its next look.
            _ => None,
        }
    }

    fn api(&self) -> Api<Watched> {
        Api::namespaced(
            self.ctx.client.clone(),
            &self.export.namespace().unwrap_or_default(),
        )
    }

    /// The slot is held from the start write to the run's end, not while the end is
    /// recorded: the next run need not wait for this one's bookkeeping.
    async fn run_and_record(&self, permit: OwnedSemaphorePermit) -> Result<(), Error> {
        let ctx = &self.ctx;
        // A term that ended (shutdown, lost Lease) or a deleted export starts nothing: a run
        // never started is never recorded as interrupted.
        if self.active.stop().is_cancelled() {
            return Ok(());
        }
        let now = ctx.now();
        let started = status::started(
            &self.start.base,
            self.export.metadata.generation,
            &self.start.due,
            &ctx.instance,
            now,
        );
        let writer = Arc::new(RunWriter::new(self.api(), &self.export, &ctx.instance));
        // A conflict here means the decision was made on an outdated object: no run.
        writer.start(&started).await?;
        self.tell_started(now);
        let cancel = self.active.stop().child_token();
        let opts = self.options(cancel.clone());
        let stop_progress = CancellationToken::new();
        let progress = tokio::spawn(write_progress(
            Arc::clone(&writer),
            started.clone(),
            Arc::clone(&opts.progress),
            ctx.progress_interval,
            stop_progress.clone(),
            cancel,
        ));
        let mut report = self.run_synced(opts).await;
        // The status's times are the controller's clock (offset in tests).
        report.start_time = now;
        report.completion_time = Some(ctx.now());
        drop(permit);
        // The final status must land after every progress write, never before one.
        stop_progress.cancel();
        let _ = progress.await;
        self.finish(&writer, &started, &report).await
    }

    /// The start delay metric, and the Events: those found on the way (a crash), then
    /// `RunStarted`, told beside the run, not before it: a slow Events API must not delay it.
    fn tell_started(&self, now: jiff::Timestamp) {
        let ctx = &self.ctx;
        if let Some(at) = self.start.due.scheduled_for {
            ctx.metrics
                .record_start_delay(now.duration_since(at).as_secs_f64());
        }
        // No times in the note: repeated starts then aggregate into one Event series.
        let mut notes = self.notes.clone();
        notes.push(Note {
            warning: false,
            reason: reason::RUN_STARTED,
            message: format!("{:?} run started", self.start.due.trigger),
        });
        let (events_ctx, export) = (Arc::clone(ctx), self.export.clone());
        tokio::spawn(async move { events::publish_all(&events_ctx, &export, &notes).await });
    }

    /// The run's options: its trigger, and what this run-now request asks for.
    fn options(&self, cancel: CancellationToken) -> RunOptions {
        let due = &self.start.due;
        let annotations = self.export.metadata.annotations.clone().unwrap_or_default();
        let manual_request = due.run_request.as_deref();
        RunOptions {
            cancel,
            // Both answer this run-now request only: read before it is recorded handled.
            allow_removal_over_limit: crate::audience::removal_allowed_once(
                &self.export.spec,
                &annotations,
                Some(&self.start.base),
            ),
            full_resync: manual_request.is_some()
                && annotations.get(FULL_RESYNC_ANNOTATION).map(|v| v.trim()) == manual_request,
            spill: crate::export::SpillOptions {
                scratch: self.ctx.scratch.clone(),
                ..crate::export::SpillOptions::default()
            },
            // Built in the scratch directory, not in memory: a Secrets store reads it back
            // only within its budget, a bucket streams it.
            audience_output: crate::audience::Output::Beside(
                self.ctx.scratch.dir().join("audience"),
            ),
            ..RunOptions::new(due.trigger)
        }
    }

    /// Runs the export; with `removal: Remove` or `delta: true`, against its stored audience,
    /// saved again before the run's end is recorded.
    async fn run_synced(&self, opts: RunOptions) -> RunReport {
        let ctx = &self.ctx;
        let plan = &self.start.plan;
        if !plan.needs_audience() {
            return run_export(&ctx.services, plan, &self.creds, opts).await;
        }
        let secrets: Api<Secret> = Api::namespaced(
            ctx.client.clone(),
            &self.export.namespace().unwrap_or_default(),
        );
        let place = ctx
            .audience_store
            .place(secrets, &self.export, &ctx.scratch);
        // Checked before the manifest switch: a run whose term ended, or whose export was
        // deleted and recreated meanwhile, never writes the audience.
        // Fenced by the Lease, not by shutdown: a run stopped by a rollout still saves whom it
        // flagged (this instance holds the Lease until its runs are recorded).
        let fence = audience_store::Fence::new(ctx.leadership.clone(), self.api());
        let discard = self.discard_requested();
        let loaded = if discard {
            self.discard(&place, &fence)
                .await
                .map(|()| (None, Vec::new()))
        } else {
            self.load(&place).await
        };
        let (previous, mut records) = match loaded {
            Ok(loaded) => loaded,
            Err(message) => return self.failed(&opts, message),
        };
        let owner = Owner {
            namespace: self.export.namespace(),
            name: self.export.name_any(),
        };
        // Users new to the audience are recorded before they are flagged: a run that stops
        // before its save (a crash, a lost Lease) is not forgotten by the next one.
        let log = match place.pending(ctx.now()) {
            Ok(log) => log,
            Err(e) => return self.failed(&opts, e.to_string()),
        };
        let input = AudienceInput {
            owner,
            previous,
            pending_log: Some(log.log()),
        };
        let result = run_export_synced(&ctx.services, plan, &self.creds, opts, Some(input)).await;
        let mut report = result.report;
        if let AudienceUpdate::Replace(audience) = &result.audience {
            match self.save(&place, audience, &fence).await {
                // The saved audience holds their users: the records read and written go.
                Ok(()) => {
                    records.extend(log.written());
                    place.delete_records(&records).await;
                }
                Err(why) => report = audience_not_saved(report, &why),
            }
        }
        if discard {
            report.message = format!("{}; {DISCARDED}", report.message);
        }
        self.hint_the_way_back(report)
    }

    /// A stored audience of another identifier type or export: the report tells the way
    /// back.
    fn hint_the_way_back(&self, mut report: RunReport) -> RunReport {
        let mut mismatch = false;
        for e in &mut report.errors {
            if e.reason == AUDIENCE_MISMATCH {
                e.message = format!("{}; {}", e.message, discard_hint(&self.export));
                mismatch = true;
            }
        }
        if mismatch {
            report.message = format!("{}; {}", report.message, discard_hint(&self.export));
        }
        report
    }

    /// This run answers a run-now request that [`DISCARD_AUDIENCE_ANNOTATION`] repeats.
    fn discard_requested(&self) -> bool {
        let request = self.start.due.run_request.as_deref();
        let annotations = self.export.metadata.annotations.as_ref();
        request.is_some()
            && annotations
                .and_then(|a| a.get(DISCARD_AUDIENCE_ANNOTATION))
                .map(|v| v.trim())
                == request
    }

    /// The stored audience, or why it cannot be read.
    async fn load(&self, place: &Place<'_>) -> Result<(Option<Encoded>, Vec<String>), String> {
        let loaded = tokio::time::timeout(AUDIENCE_TIMEOUT, place.load_with_pending()).await;
        match loaded {
            Ok(Ok(previous)) => Ok(previous),
            // Not to be mended by waiting: tell the way back.
            Ok(Err(e)) if e.is_damage() => Err(format!("{e}; {}", discard_hint(&self.export))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the stored audience could not be read in time".into()),
        }
    }

    /// Deletes the stored audience on request, told in an Event `AudienceDiscarded` (beside
    /// the run: a slow Events API must not delay it); or why it could not be deleted.
    async fn discard(
        &self,
        place: &Place<'_>,
        fence: &audience_store::Fence,
    ) -> Result<(), String> {
        let discarded = tokio::time::timeout(AUDIENCE_TIMEOUT, place.discard(fence)).await;
        match discarded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("the stored audience could not be discarded: {e}")),
            Err(_) => return Err("the stored audience could not be discarded in time".into()),
        }
        let request = self.start.due.run_request.clone().unwrap_or_default();
        let note = Note {
            warning: false,
            reason: reason::AUDIENCE_DISCARDED,
            message: format!(
                "{DISCARDED} (run-now {request}): this run starts a new one, sending everyone and removing nobody"
            ),
        };
        let (events_ctx, export) = (Arc::clone(&self.ctx), self.export.clone());
        tokio::spawn(async move { events::publish(&events_ctx, &export, &note).await });
        Ok(())
    }

    /// Saves the run's audience; a failure (why) is counted and told in a Warning Event, and
    /// makes the run `PartiallySucceeded`. The stored audience then stays the previous one:
    /// the next run adds the users this one flagged again, and removes nobody it should not.
    async fn save(
        &self,
        place: &Place<'_>,
        audience: &Encoded,
        fence: &audience_store::Fence,
    ) -> Result<(), String> {
        // Within the Lease term: the fence refuses the manifest switch once it has ended.
        let timeout = audience_save_timeout(audience.parts().len());
        let saved = tokio::time::timeout(timeout, place.save(audience, fence)).await;
        let why = match saved {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {} s", timeout.as_secs()),
        };
        tracing::warn!(export = %self.key, error = %why, "cannot save the audience");
        self.ctx.metrics.audience_save_failure();
        let note = Note {
            warning: true,
            reason: reason::AUDIENCE_NOT_SAVED,
            message: format!("the audience of this run could not be saved: {why}"),
        };
        events::publish(&self.ctx, &self.export, &note).await;
        Err(why)
    }

    /// A report for a run whose stored audience could not be read (before Looker was).
    fn failed(&self, opts: &RunOptions, message: String) -> RunReport {
        let now = self.ctx.now();
        let failure = RunFailure {
            reason: reason::AUDIENCE_UNREADABLE,
            message,
        };
        let context = RunContext {
            trigger: opts.trigger,
            start_time: now,
            completion_time: now,
            dry_run: false,
        };
        crate::export::report::finish(Tally::default(), Some(failure), false, context)
    }

    /// Records the run's end (see [`step::run_ended`]), counted in the metrics. The export
    /// stays active here until its end is recorded (see [`RunWriter::write_final`]).
    async fn finish(
        &self,
        writer: &RunWriter,
        started: &BrazeExportStatus,
        report: &RunReport,
    ) -> Result<(), Error> {
        let ctx = &self.ctx;
        let facts = ctx.facts(false, &[]);
        let ended = step::run_ended(&self.export, &self.start, started, report, &facts);
        ctx.metrics.record_run(report, facts.now);
        let target = Target::RunEnd {
            export: &self.export,
            writer,
        };
        effect(ctx, target, ended).await.map(drop)
    }
}

/// Writes the counts so far every `interval` until `stop`. A write finding the run taken
/// over by another instance (or the export gone) cancels the run.
async fn write_progress(
    writer: Arc<RunWriter>,
    started: crate::spec::BrazeExportStatus,
    progress: Arc<crate::export::Progress>,
    interval: Duration,
    stop: CancellationToken,
    cancel_run: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let (read, sent) = (
            progress.rows_read.load(Ordering::Relaxed),
            progress.sent.load(Ordering::Relaxed),
        );
        match writer.write(&status::progress(&started, read, sent)).await {
            Err(Error::Lost | Error::Gone) => {
                tracing::warn!("the export was deleted, recreated or taken over: stopping the run");
                cancel_run.cancel();
                return;
            }
            Err(e) => tracing::debug!(error = %e, "cannot write the run's progress"),
            Ok(()) => {}
        }
    }
}
