//! The pipeline of one run. Looker's body streams into a blocking parser thread that maps
//! rows and fills batches; batches cross a bounded channel to concurrent senders. A slow
//! Braze slows the Looker read instead of filling memory.

use std::collections::HashMap;
use std::io::BufReader;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::mapping::{self, Columns, near_miss_tag};
use super::report::{self, RowReason, RunContext, RunFailure, Tally};
use super::sync::{self, AudienceInput, AudienceUpdate, Prepared, RunResult, SinkSync};
use super::{Credentials, ExportPlan, RunError, RunReport, Trigger};
use crate::audience::MemberState;
use crate::audience::seen::{Offer, Seen};
use crate::braze::batch::MAX_REQUEST_BYTES;
use crate::braze::{
    Batch, BrazeClient, BrazeError, Delivery, FailReason, LimiterRegistry, PayloadDump, RetryPolicy,
};
use crate::http::HttpClients;
use crate::looker::body::{self, Transfer, WaitBudget};
use crate::looker::json_detail::{self, BadRow, Cell, DetailError, Fields, RowSink, Stop};
use crate::looker::{LookerClient, LookerError};
use crate::text::clean;

/// What every run in the process shares: HTTP clients, Braze limiters, retry policy.
#[derive(Debug, Default)]
pub struct Services {
    /// HTTP clients.
    pub http: HttpClients,
    /// One limiter per Braze workspace.
    pub limiters: LimiterRegistry,
    /// Backoff for Braze retries.
    pub retry: RetryPolicy,
}

/// Live counters of a run in progress (for a progress bar or a status update).
#[derive(Debug, Default)]
pub struct Progress {
    /// Rows read so far.
    pub rows_read: AtomicU64,
    /// Objects accepted so far.
    pub sent: AtomicU64,
    /// Users whose flag was removed so far (set when the removals end).
    pub removed: AtomicU64,
}

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// What started the run.
    pub trigger: Trigger,
    /// Build every batch but send nothing.
    pub dry_run: bool,
    /// Where to write each request body.
    pub dump: Option<Arc<PayloadDump>>,
    /// Stops the run (shutdown); the report then says `Interrupted`.
    pub cancel: CancellationToken,
    /// Live counters.
    pub progress: Arc<Progress>,
    /// Remove even more than `removalLimitPercent` of the audience (or everyone, after a Look
    /// that returned nothing): the one run allowed to (see
    /// [`crate::audience::removal_allowed_once`]; `run --allow-removal`).
    pub allow_removal_over_limit: bool,
    /// Send everyone, as a full resync does, whatever `fullResyncInterval` says.
    pub full_resync: bool,
    /// Test hook: makes a part of the pipeline panic, to prove the counts survive it.
    #[doc(hidden)]
    pub failpoint: Failpoint,
}

/// Where a test makes the pipeline panic ([`RunOptions::failpoint`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Failpoint {
    /// Nowhere.
    #[default]
    None,
    /// The row reader, on this row.
    ReaderAtRow(u64),
    /// The sender of the batch holding this row.
    SenderAtRow(u64),
}

impl RunOptions {
    /// Options for a plain run started by `trigger`.
    pub fn new(trigger: Trigger) -> Self {
        Self {
            trigger,
            dry_run: false,
            dump: None,
            cancel: CancellationToken::new(),
            progress: Arc::default(),
            allow_removal_over_limit: false,
            full_resync: false,
            failpoint: Failpoint::None,
        }
    }
}

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
        let (ended, mode, update) = match sync::prepare(plan, &opts, audience, start_time).await {
            Err(e) => (Ended::failed(e), None, AudienceUpdate::Keep),
            Ok(prepared) => {
                let mode = prepared.as_ref().and_then(|(p, _, _)| p.mode);
                let (ended, update) =
                    execute(services, plan, creds, &opts, prepared, start_time).await;
                (ended, mode, update)
            }
        };
        let report = ended.conclude(&opts, start_time, mode);
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

/// How a run ended: its counts, what failed it, and whether shutdown stopped it.
#[derive(Debug, Default)]
pub(super) struct Ended {
    pub tally: Tally,
    pub failure: Option<RunError>,
    pub interrupted: bool,
}

impl Ended {
    /// The report (checked to add up), as of now.
    pub(super) fn conclude(
        self,
        opts: &RunOptions,
        start_time: Timestamp,
        mode: Option<super::SyncMode>,
    ) -> RunReport {
        let failure = self.failure.map(|e| RunFailure {
            reason: e.reason(),
            message: e.to_string(),
        });
        let context = RunContext {
            trigger: opts.trigger,
            start_time,
            completion_time: Timestamp::now(),
            dry_run: opts.dry_run,
        };
        let report = report::finish_synced(self.tally, failure, self.interrupted, context, mode);
        report::ensure_balanced(report)
    }

    pub(super) fn failed(e: RunError) -> Self {
        Self {
            tally: Tally::default(),
            failure: Some(e),
            interrupted: false,
        }
    }
}

/// Opens the Look, streams it through the pipeline, then (with a stored audience) removes
/// and builds the new audience.
async fn execute(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    opts: &RunOptions,
    prepared: Option<(Prepared, Seen, SinkSync)>,
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
            let ended = Ended { tally: Tally::default(), failure: None, interrupted: true };
            return (ended, AudienceUpdate::Keep);
        }
        r = looker.run_look(&plan.look_id, plan.results, &mut budget) => r,
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => return (Ended::failed(e.into()), AudienceUpdate::Keep),
    };
    let (prep, seen, sync) = match prepared {
        Some((p, seen, sync)) => (Some(p), seen, sync),
        None => (None, Seen::new(), SinkSync::default()),
    };
    let (mut ended, read) = stream(response, braze.clone(), plan, opts, seen, sync).await;
    let update = match (prep, read) {
        (Some(prep), Some(read)) => {
            sync::settle(prep, read, &mut ended, braze, plan, opts, start_time).await
        }
        _ => AudienceUpdate::Keep,
    };
    (ended, update)
}

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

/// What the read and send sides leave for the audience: who was in the Look, and the keys
/// of objects Braze did not take.
#[derive(Debug)]
pub(super) struct ReadSide {
    pub seen: Seen,
    pub sync: SinkSync,
    pub failed_keys: Vec<u64>,
    pub rejected_keys: Vec<u64>,
}

/// Streams Looker's body through the parser thread to the senders, then settles the counts.
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
    conclude(read, parsed, sent, &transfer, plan, opts)
}

/// Batches waiting between the parser and the senders.
const QUEUED_BATCHES: usize = 32;

/// Merges both sides' counts and decides what ended the run. Precedence: a fatal Braze
/// answer (it stopped everything), then shutdown, then a panic, then the Look's columns,
/// then how the body ended.
fn conclude(
    read: ReadSummary,
    parsed: std::thread::Result<Result<u64, DetailError>>,
    sent: SendSummary,
    transfer: &Transfer,
    plan: &ExportPlan,
    opts: &RunOptions,
) -> (Ended, Option<ReadSide>) {
    let interrupted = opts.cancel.is_cancelled() && sent.fatal.is_none();
    let failure = if let Some(fatal) = sent.fatal.clone() {
        Some(RunError::Braze(fatal))
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
    };
    let mut tally = read.tally;
    tally.merge(sent.tally);
    let mut failed_keys = sent.failed_keys;
    let mut sync = read.sync;
    failed_keys.append(&mut sync.unsent_keys);
    if read.unsent.count > 0 {
        let (reason, why) = match &sent.fatal {
            Some(f) => (f.reason(), f.to_string()),
            None => ("Interrupted", "the operator is shutting down".into()),
        };
        let r = FailReason::Stopped(reason, why);
        tally.counts.failed += read.unsent.count;
        tally.note_n(
            RowReason::NotDelivered(r.reason()),
            &r.describe(0),
            read.unsent.count,
            &read.unsent.rows,
        );
    }
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

/// Rows that were read and mapped but never handed to a sender (the senders had stopped).
#[derive(Debug, Default)]
struct Unsent {
    count: u64,
    rows: Vec<u64>,
}

struct ReadSummary {
    tally: Tally,
    column_error: Option<mapping::ColumnError>,
    unsent: Unsent,
    seen: Seen,
    sync: SinkSync,
}

/// The parser thread's side of a run: rows to objects to batches.
struct ExportSink {
    plan: ExportPlan,
    shape: Arc<mapping::ObjectShape>,
    columns: Option<Columns>,
    column_error: Option<mapping::ColumnError>,
    seen: Seen,
    sync: SinkSync,
    batch: Batch,
    tx: Option<mpsc::Sender<Batch>>,
    tally: Tally,
    /// Objects handed to the senders.
    handed: u64,
    unsent: Unsent,
    progress: Arc<Progress>,
    failpoint: Failpoint,
}

impl ExportSink {
    fn new(
        plan: &ExportPlan,
        tx: mpsc::Sender<Batch>,
        opts: &RunOptions,
        seen: Seen,
        sync: SinkSync,
    ) -> Self {
        let (progress, failpoint) = (Arc::clone(&opts.progress), opts.failpoint);
        Self {
            plan: plan.clone(),
            shape: Arc::new(plan.shape.clone()),
            columns: None,
            column_error: None,
            seen,
            sync,
            batch: Batch::with_capacity(plan.batch_size),
            tx: Some(tx),
            tally: Tally::default(),
            handed: 0,
            unsent: Unsent::default(),
            progress,
            failpoint,
        }
    }

    /// Hands the full (or last) batch to the senders; false when they are gone.
    fn flush(&mut self) -> bool {
        let batch = std::mem::replace(&mut self.batch, Batch::with_capacity(self.plan.batch_size));
        self.hand_over(batch)
    }

    fn hand_over(&mut self, batch: Batch) -> bool {
        if batch.is_empty() {
            return self.tx.is_some();
        }
        let len = batch.len() as u64;
        let refused = match &self.tx {
            Some(tx) => tx.blocking_send(batch).err().map(|e| e.0),
            None => Some(batch),
        };
        let Some(b) = refused else {
            self.handed += len;
            return true;
        };
        self.tx = None;
        self.unsent.count += len;
        if self.sync.track {
            self.sync.unsent_keys.extend_from_slice(b.keys());
        }
        let room = 5usize.saturating_sub(self.unsent.rows.len());
        self.unsent.rows.extend(b.rows().iter().take(room));
        false
    }

    /// Ends the read side. After a panic, the row being mapped when it struck is neither
    /// counted nor batched: it is counted failed here, so the report still adds up.
    fn finish(mut self, panicked: bool) -> ReadSummary {
        self.flush();
        let t = &self.tally;
        let accounted = t.counts.duplicates
            + t.counts.invalid
            + t.counts.skipped
            + self.sync.unchanged
            + self.handed
            + self.unsent.count;
        let (read, lost) = (
            t.counts.rows_read,
            t.counts.rows_read.saturating_sub(accounted),
        );
        if panicked && lost > 0 {
            self.tally.counts.failed += lost;
            self.tally.note_n(
                RowReason::NotDelivered("InternalError"),
                "the row reader failed unexpectedly",
                lost,
                &[read],
            );
        }
        if self.plan.delta && self.sync.track {
            self.tally.counts.unchanged = Some(self.sync.unchanged);
        }
        ReadSummary {
            tally: self.tally,
            column_error: self.column_error,
            unsent: self.unsent,
            seen: self.seen,
            sync: self.sync,
        }
    }

    /// Adds a mapped object to the batch, sending the batch first when the object would
    /// take its body past the byte budget. False when the object could not be serialized
    /// (counted invalid).
    fn push(
        &mut self,
        number: u64,
        key: u64,
        object: &mapping::BrazeObject<'_>,
    ) -> Result<bool, Stop> {
        if self.batch.push_keyed(number, key, object).is_err() {
            self.tally.counts.invalid += 1;
            let id_field = self
                .columns
                .as_ref()
                .map_or("", |c| c.id_field())
                .to_owned();
            let reason = RowReason::Invalid(mapping::Invalid::MalformedCell(0));
            self.tally.note(reason, &id_field, &[number]);
            return Ok(false);
        }
        if self.batch.body_len() > MAX_REQUEST_BYTES && self.batch.len() > 1 {
            let last = self.batch.pop_last();
            if !self.flush() {
                self.hand_over(last);
                return Err(Stop);
            }
            self.batch = last;
        }
        if (self.batch.len() >= self.plan.batch_size || self.batch.body_len() > MAX_REQUEST_BYTES)
            && !self.flush()
        {
            return Err(Stop);
        }
        Ok(true)
    }

    /// A user in the Look whose row is not sent: with a previous audience, not one to remove.
    fn mark_present(&mut self, cell: &Cell) {
        if self.seen.previous_len() > 0
            && let Ok(id) = mapping::identifier(cell)
        {
            let key = self.seen.key(&id);
            self.seen.mark_present(key);
        }
    }
}

impl RowSink for ExportSink {
    fn fields(&mut self, fields: &Fields) -> Result<Vec<String>, Stop> {
        for f in &fields.all {
            for t in f.tags.iter().filter(|t| near_miss_tag(t)) {
                // Names come from the answer: cleaned, so a log line stays one short line.
                tracing::warn!(field = %clean(&f.name, 80), tag = %clean(t, 80), "tag is not of the form braze[NAME] and is ignored");
            }
        }
        match mapping::resolve_columns(
            fields,
            self.plan.id_field.as_deref(),
            &self.plan.shape.attribute,
        ) {
            Ok(c) => {
                tracing::debug!(
                    id_field = c.id_field(),
                    attributes = c.attributes.len(),
                    "columns resolved"
                );
                let captures = c.captures.clone();
                self.columns = Some(c);
                Ok(captures)
            }
            Err(e) => {
                self.column_error = Some(e);
                Err(Stop)
            }
        }
    }

    fn row(&mut self, number: u64, cells: &mut [Cell]) -> Result<(), Stop> {
        self.tally.counts.rows_read += 1;
        self.progress.rows_read.fetch_add(1, Ordering::Relaxed);
        if self.failpoint == Failpoint::ReaderAtRow(number) {
            panic!("failpoint: the row reader panics at row {number}");
        }
        if let Some(max) = self.plan.max_rows
            && number > max
        {
            if self.tally.counts.skipped == 0 {
                tracing::warn!(
                    max_rows = max,
                    "the Look has more rows than maxRows; the rest are skipped"
                );
            }
            self.tally.counts.skipped += 1;
            self.tally
                .note(RowReason::MaxRowsExceeded, &max.to_string(), &[number]);
            if let Some(cell) = cells.first() {
                self.mark_present(cell);
            }
            return Ok(());
        }
        let Some(columns) = self.columns.take() else {
            return Err(Stop);
        };
        let result = self.map_and_push(&columns, number, cells);
        self.columns = Some(columns);
        result
    }

    fn bad_row(&mut self, number: u64, what: BadRow) -> Result<(), Stop> {
        self.tally.counts.rows_read += 1;
        self.progress.rows_read.fetch_add(1, Ordering::Relaxed);
        self.tally.counts.invalid += 1;
        let (reason, detail) = match what {
            BadRow::Null => (RowReason::NullRow, "null"),
            BadRow::NotAnObject => (RowReason::MalformedRow, "not an object"),
        };
        self.tally.note(reason, detail, &[number]);
        Ok(())
    }
}

impl ExportSink {
    fn map_and_push(
        &mut self,
        columns: &Columns,
        number: u64,
        cells: &mut [Cell],
    ) -> Result<(), Stop> {
        let shape = Arc::clone(&self.shape);
        match mapping::map_row(columns, &shape, cells) {
            Err(invalid) => {
                let field = match invalid {
                    mapping::Invalid::MissingField(i) | mapping::Invalid::MalformedCell(i) => {
                        &columns.captures[i]
                    }
                    _ => &columns.captures[0],
                };
                self.tally.counts.invalid += 1;
                self.tally
                    .note(RowReason::Invalid(invalid), field, &[number]);
                if let Some(cell) = cells.first() {
                    self.mark_present(cell);
                }
                Ok(())
            }
            Ok(object) => {
                let key = self.seen.key(&object.id);
                let offer = self.seen.offer(key);
                match offer {
                    Offer::Duplicate => {
                        self.tally.counts.duplicates += 1;
                        return Ok(());
                    }
                    // Delta: flagged by the last run, not sent again.
                    Offer::Returning { flagged: true, .. } if self.sync.delta_skip => {
                        self.sync.unchanged += 1;
                        if let Some(w) = &mut self.sync.current {
                            w.push(&object.id, MemberState::Flagged);
                        }
                        return Ok(());
                    }
                    _ => {}
                }
                for name in object.too_long_attributes() {
                    self.tally
                        .note(RowReason::AttributeTooLong, name, &[number]);
                }
                let pushed = self.push(number, key, &object)?;
                if pushed && self.sync.track {
                    if matches!(offer, Offer::New) || self.sync.rename {
                        self.sync.pushed_new += 1;
                    }
                    if let Some(w) = &mut self.sync.current {
                        w.push(&object.id, MemberState::Flagged);
                    }
                }
                Ok(())
            }
        }
    }
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

/// Total bytes of request bodies in flight for one run: with objects far larger than usual,
/// fewer requests fly, so memory stays bounded whatever the Look holds.
const MAX_IN_FLIGHT_BYTES: usize = 24 << 20;

/// The deliveries of one run in flight, with each one's rows so that a sender that panics
/// still has its rows counted.
#[derive(Default)]
struct InFlight {
    tasks: JoinSet<Delivery>,
    rows: HashMap<tokio::task::Id, (Vec<u64>, Vec<u64>, usize)>,
    bytes: usize,
}

impl InFlight {
    /// Starts delivering `batch`; `stop` ends the delivery (shutdown, or a fatal answer to
    /// another batch: a refused key must not go on being sent).
    fn spawn(
        &mut self,
        client: &Arc<BrazeClient>,
        batch: Batch,
        opts: &RunOptions,
        stop: &CancellationToken,
    ) {
        let rows = batch.rows().to_vec();
        let keys = batch.keys().to_vec();
        let bytes = batch.body_len();
        let panics = matches!(opts.failpoint, Failpoint::SenderAtRow(r) if rows.contains(&r));
        let client = Arc::clone(client);
        let cancel = stop.clone();
        let dump = opts.dump.clone();
        let handle = self.tasks.spawn(
            async move {
                if panics {
                    panic!("failpoint: a sender panics");
                }
                client.deliver(batch, &cancel, dump.as_deref()).await
            }
            .in_current_span(),
        );
        self.rows.insert(handle.id(), (rows, keys, bytes));
        self.bytes += bytes;
    }

    /// Waits for the next delivery to end; a panicked one counts its rows failed.
    async fn next(&mut self) -> Option<Delivery> {
        let (id, delivery) = match self.tasks.join_next_with_id().await? {
            Ok((id, d)) => (id, Some(d)),
            Err(e) => (e.id(), None),
        };
        let (rows, keys, bytes) = self.rows.remove(&id).unwrap_or_default();
        self.bytes -= bytes;
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

/// Receives batches and keeps deliveries in flight: as many as fill the rate limit at the
/// latency Braze shows (at most `cap`, and at most [`MAX_IN_FLIGHT_BYTES`]). On a fatal
/// answer or cancellation it stops taking batches and counts those still queued as failed.
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
    loop {
        if out.fatal.is_some() || stop.is_cancelled() {
            break;
        }
        let full = braze.as_ref().is_some_and(|c| {
            inflight.len() >= c.in_flight_target(cap) || inflight.bytes >= MAX_IN_FLIGHT_BYTES
        });
        if full {
            if let Some(d) = inflight.next().await {
                absorb_delivery(&mut out, d, &opts.progress, side);
            }
            continue;
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(d) = inflight.next(), if inflight.len() > 0 => absorb_delivery(&mut out, d, &opts.progress, side),
            next = rx.recv() => match (next, &braze) {
                (None, _) => break,
                (Some(batch), None) => dry_send(&mut out.tally, &batch, opts, side),
                (Some(batch), Some(client)) => inflight.spawn(client, batch, opts, stop),
            },
        }
    }
    if out.fatal.is_some() {
        // Why-comment: cancel the Looker transfer now; the parser then stops at once.
        stop.cancel();
    }
    rx.close();
    let reason = out.fatal.as_ref().map_or_else(
        || FailReason::Stopped("Interrupted", "the operator is shutting down".into()),
        |f| FailReason::Stopped(f.reason(), f.to_string()),
    );
    while let Some(batch) = rx.recv().await {
        let mut d = Delivery::default();
        d.fail(&batch, &reason, 0);
        absorb_delivery(&mut out, d, &opts.progress, side);
    }
    while let Some(d) = inflight.next().await {
        absorb_delivery(&mut out, d, &opts.progress, side);
    }
    out
}

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
            Some(f) if *reason == "Interrupted" => (
                f.reason(),
                FailReason::Stopped(f.reason(), f.to_string()).describe(0),
            ),
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
