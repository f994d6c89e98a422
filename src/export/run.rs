//! An export run from start to end: checks the stored audience and decides the kind of run
//! ([`super::audience_sync`]), opens the Look, streams its body through the parser thread
//! (the read side, `sink`) to the senders (`send`) across a bounded channel (a slow Braze
//! slows the Looker read instead of filling memory), decides what ended the run, then
//! settles the audience and writes the report.

use std::io::BufReader;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use jiff::Timestamp;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::audience_sync::{self, AudienceInput, AudiencePlan, AudienceUpdate, RunResult};
use super::deadline::Deadline;
use super::ended::Ended;
use super::error::{PENDING_NOT_RECORDED, RunError, SCRATCH_FAILED};
/// Re-exported here, where the tests that make the pipeline panic have always found it.
pub use super::options::Failpoint;
use super::options::{RunOptions, Services};
use super::plan::{Credentials, ExportPlan};
use super::report::{RowReason, RunReport, Tally};
use super::send::{SendSummary, Side, braze_client, send_all, stop_reason};
use super::sink::{ExportSink, ReadSide, ReadSummary, SinkSync};
use crate::audience::seen::Seen;
use crate::braze::{Batch, BrazeClient, BrazeError, FailReason};
use crate::looker::body::{self, Transfer, WaitBudget};
use crate::looker::json_detail::{self, DetailError};
use crate::looker::{LookLimit, LookRun, LookerClient, LookerError};
use crate::spec::{RemovalMode, ResultsMode};

/// Runs one export to its end and reports what happened. Never fails: every error ends up
/// in the report, and every row read is counted exactly once (checked, also in release
/// builds: a report that does not add up becomes `Failed` and says so). An export with
/// `removal: Remove` or `delta: true` needs its stored audience: use [`run_export_synced`].
pub async fn run_export(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    opts: RunOptions,
) -> RunReport {
    run_export_synced(services, plan, creds, opts, None)
        .await
        .report
}

/// [`run_export`] with the export's stored audience (`None`: none is kept; then an export
/// with `removal: Remove` or `delta: true` fails with `AudienceRequired`). Returns the report
/// and the audience to store: users who left the Look lose the flag (`Remove`, within
/// `removalLimitPercent`), and with `delta: true` users already flagged are counted
/// `unchanged` instead of being sent again.
pub async fn run_export_synced(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    opts: RunOptions,
    audience: Option<AudienceInput>,
) -> RunResult {
    let span = tracing::info_span!("run", export = %plan.name, look_id = %plan.look_id);
    async {
        let start_time = Timestamp::now();
        tracing::info!(trigger = ?opts.trigger, dry_run = opts.dry_run, "run started");
        // The deadline stops the run as shutdown does (every row still counted once), then
        // names itself as the run's failure.
        let deadline = Deadline::arm(&opts.cancel, plan.active_deadline());
        let opts = RunOptions {
            cancel: deadline.stop.clone(),
            ..opts
        };
        let workspace = plan.workspace(creds);
        let planned =
            audience_sync::plan_audience(plan, &opts, audience, workspace, start_time).await;
        let (mut ended, mode, update) = match planned {
            Err(e) => (Ended::failed(e), None, AudienceUpdate::Keep),
            Ok(planned) => {
                let mode = planned.as_ref().and_then(|(p, _, _)| p.mode);
                let (ended, update) =
                    export_look(services, plan, creds, &opts, planned, start_time).await;
                (ended, mode, update)
            }
        };
        if deadline.passed() {
            ended.deadline_passed(plan.active_deadline_seconds);
        }
        let report = ended.into_report(&opts, start_time, mode);
        if let Some(d) = &opts.dump
            && let Err(e) = d.flush()
        {
            tracing::warn!(error = %e, "cannot flush the payload dump");
        }
        tracing::info!(
            outcome = report.outcome.as_str(),
            rows_read = report.counts.rows_read,
            sent = report.counts.sent,
            duplicates = report.counts.duplicates,
            invalid = report.counts.invalid,
            rejected = report.counts.rejected,
            failed = report.counts.failed,
            skipped = report.counts.skipped,
            unchanged = report.counts.unchanged,
            removed = report.counts.removed,
            requests = report.counts.requests,
            "run finished: {}",
            report.message
        );
        RunResult {
            report,
            audience: update,
        }
    }
    .instrument(span)
    .await
}

/// Opens the Look, streams it through the pipeline, then (with a stored audience) removes
/// and builds the new audience. The Braze client comes first, so a run that cannot send
/// fails before Looker runs the query.
async fn export_look(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    opts: &RunOptions,
    planned: Option<(AudiencePlan, Seen, SinkSync)>,
    start_time: Timestamp,
) -> (Ended, AudienceUpdate) {
    let braze = match braze_client(services, plan, creds, opts.dry_run) {
        Ok(b) => b,
        Err(e) => return (Ended::failed(e), AudienceUpdate::Keep),
    };
    let looker = LookerClient::new(
        services.http.looker(plan.verify_tls).clone(),
        plan.looker_api.clone(),
        creds.looker_client_id.clone(),
        creds.looker_client_secret.clone(),
        plan.looker_timeout_seconds,
    );
    let mut budget = WaitBudget::new(plan.looker_timeout());
    let response = tokio::select! {
        () = opts.cancel.cancelled() => {
            let ended = Ended { interrupted: true, ..Ended::default() };
            return (ended, AudienceUpdate::Keep);
        }
        r = looker.run_look(&plan.look_id, plan.results, reads_limit(plan), &mut budget) => r,
    };
    let LookRun { response, limit } = match response {
        Ok(r) => r,
        Err(e) => return (Ended::failed(e.into()), AudienceUpdate::Keep),
    };
    let (audience, seen, sync) = match planned {
        Some((a, seen, sync)) => (Some(a), seen, sync),
        None => (None, Seen::new(), SinkSync::default()),
    };
    let (mut ended, read) = stream(response, braze.clone(), plan, opts, seen, sync).await;
    let cut = limit_reached(limit, ended.tally.counts.rows_read, plan);
    // The audience is settled only after every add was settled (see `audience_sync`).
    let update = match (audience, read) {
        (Some(audience), Some(read)) => {
            let settling = audience_sync::Settling {
                braze,
                plan,
                opts,
                start_time,
                cut,
            };
            audience_sync::settle(audience, read, &mut ended, settling).await
        }
        _ => AudienceUpdate::Keep,
    };
    (ended, update)
}

/// Whether the run reads the Look's saved row limit first: only when a `results: Table` run
/// could remove users (`removal: Remove`), the one case where a cut result does harm.
fn reads_limit(plan: &ExportPlan) -> bool {
    plan.results == ResultsMode::Table && plan.removal == RemovalMode::Remove
}

/// The sentence of a `results: Table` run whose rows reached the Look's row limit (the
/// result may have been cut there: Looker's body ends cleanly and says nothing, and
/// `json_detail` has no truncation flag), else `None`.
fn limit_reached(limit: Option<LookLimit>, rows_read: u64, plan: &ExportPlan) -> Option<String> {
    let Some(LookLimit::Rows { rows, saved }) = limit else {
        return None;
    };
    if plan.results != ResultsMode::Table || rows_read < rows {
        return None;
    }
    let whose = if saved {
        ""
    } else {
        ", Looker's default: the Look saves none"
    };
    Some(format!(
        "Look {} returned its row limit ({rows} rows{whose}): it may be cut, so nobody was removed; set spec.looker.results: All, or raise the Look's row limit in Looker",
        plan.look_id
    ))
}

/// Streams Looker's body through the parser thread to the senders, then merges both sides'
/// counts.
async fn stream(
    response: reqwest::Response,
    braze: Option<Arc<BrazeClient>>,
    plan: &ExportPlan,
    opts: &RunOptions,
    seen: Seen,
    sync: SinkSync,
) -> (Ended, Option<ReadSide>) {
    // `stop` ends the Looker transfer as well as shutdown does: a 401 from Braze must not
    // wait for a slow Looker to send its next chunk.
    let stop = opts.cancel.child_token();
    let (reader, transfer) = body::forward(response, plan.looker_timeout(), stop.clone());
    let (tx, rx) = mpsc::channel::<Batch>(QUEUED_BATCHES);
    let track = sync.track;
    let mut sink = ExportSink::new(plan, tx, opts, seen, sync);
    let parser = tokio::task::spawn_blocking(move || {
        let reader = BufReader::with_capacity(64 * 1024, reader);
        // A panic in the parser or the mapping must not lose the counts kept so far.
        let parsed =
            std::panic::catch_unwind(AssertUnwindSafe(|| json_detail::parse(reader, &mut sink)));
        let panicked = parsed.is_err();
        (sink.finish(panicked), parsed)
    });
    let side = if track {
        Side::Adds
    } else {
        Side::AddsUntracked
    };
    let sent = send_all(rx, braze, plan.concurrency, opts, &stop, side).await;
    // The senders are done: stop the transfer, so that the parser (blocked on a full
    // channel or a slow Looker) ends now and the join below cannot hang.
    stop.cancel();
    let (read, parsed) = match parser.await {
        Ok(out) => out,
        Err(e) => {
            let e = RunError::Internal(format!("the row reader died: {e}"));
            return (Ended::failed(e), None);
        }
    };
    let (transfer, bytes) = transfer
        .await
        .unwrap_or((Transfer::Failed("the body reader died".into()), 0));
    tracing::debug!(bytes, ?transfer, "Looker body transfer ended");
    merge_sides(read, parsed, sent, &transfer, plan, opts)
}

/// Batches waiting between the parser and the senders.
const QUEUED_BATCHES: usize = 32;

/// Merges both sides' counts and decides what ended the run ([`first_failure`]); the rows
/// the senders never took count failed under what stopped them.
fn merge_sides(
    mut read: ReadSummary,
    parsed: std::thread::Result<Result<u64, DetailError>>,
    sent: SendSummary,
    transfer: &Transfer,
    plan: &ExportPlan,
    opts: &RunOptions,
) -> (Ended, Option<ReadSide>) {
    let interrupted = opts.cancel.is_cancelled() && sent.fatal.is_none();
    let failure = first_failure(
        &read,
        parsed,
        sent.fatal.as_ref(),
        interrupted,
        transfer,
        plan,
    );
    let mut tally = std::mem::take(&mut read.tally);
    tally.merge(sent.tally);
    count_unsent(&mut tally, &read, sent.fatal.as_ref());
    let mut failed_keys = sent.failed_keys;
    let mut sync = read.sync;
    failed_keys.append(&mut sync.unsent_keys);
    let ended = Ended {
        tally,
        failure,
        interrupted,
    };
    let side = ReadSide {
        seen: read.seen,
        sync,
        failed_keys,
        rejected_keys: sent.rejected_keys,
    };
    (ended, Some(side))
}

/// What failed the run, in this order of precedence: a fatal Braze answer (it stopped
/// everything, the read included), then shutdown (no failure: the run is interrupted),
/// then a panic of the reader, then the Look's columns, then how the body ended.
fn first_failure(
    read: &ReadSummary,
    parsed: std::thread::Result<Result<u64, DetailError>>,
    fatal: Option<&BrazeError>,
    interrupted: bool,
    transfer: &Transfer,
    plan: &ExportPlan,
) -> Option<RunError> {
    if let Some(fatal) = fatal {
        Some(RunError::Braze(fatal.clone()))
    } else if let Some(why) = &read.journal_failed {
        Some(RunError::PendingNotRecorded(why.clone()))
    } else if let Some(why) = &read.spill_failed {
        Some(RunError::ScratchFailed(why.clone()))
    } else if interrupted {
        None
    } else if parsed.is_err() {
        Some(RunError::Internal(
            "the row reader stopped on an unexpected error (a bug: please report it)".into(),
        ))
    } else if let Some(source) = read.column_error.clone() {
        Some(RunError::Columns {
            look_id: plan.look_id.clone(),
            source,
        })
    } else {
        parsed
            .ok()
            .and_then(Result::err)
            .map(|e| detail_error(e, transfer, plan))
    }
}

/// Rows mapped but never handed to a sender count failed, under what stopped the senders
/// (or the read side, when its users could not be recorded).
fn count_unsent(tally: &mut Tally, read: &ReadSummary, fatal: Option<&BrazeError>) {
    let unsent = &read.unsent;
    if unsent.count == 0 {
        return;
    }
    let r = match (&read.journal_failed, &read.spill_failed, fatal) {
        (Some(why), _, None) => FailReason::Stopped(
            PENDING_NOT_RECORDED,
            format!("the users could not be recorded in the stored audience first ({why})"),
        ),
        (None, Some(why), None) => FailReason::Stopped(SCRATCH_FAILED, why.clone()),
        _ => stop_reason(fatal),
    };
    tally.counts.failed += unsent.count;
    tally.note_n(
        RowReason::NotDelivered(r.reason()),
        &r.describe(0),
        unsent.count,
        &unsent.rows,
    );
}

/// The Looker error behind a body that ended early; a timeout or a broken transfer explains
/// the parser's error better than the parser does.
fn detail_error(e: DetailError, transfer: &Transfer, plan: &ExportPlan) -> RunError {
    let look_id = plan.look_id.clone();
    let looker = match (e, transfer) {
        (_, Transfer::TimedOut) => LookerError::Timeout {
            look_id,
            seconds: plan.looker_timeout_seconds,
        },
        (_, Transfer::Failed(detail)) => LookerError::Body {
            look_id,
            detail: detail.clone(),
        },
        (DetailError::QueryErrors(m), _) => LookerError::QueryError {
            look_id,
            message: m.join("; "),
        },
        (DetailError::Pivoted(detail), _) => LookerError::Pivoted { look_id, detail },
        (DetailError::Stopped, _) => {
            return RunError::Internal("the row reader stopped without a reason".into());
        }
        (other, _) => LookerError::Body {
            look_id,
            detail: other.to_string(),
        },
    };
    RunError::Looker(looker)
}
