//! The pipeline of one run. Looker's body streams into a blocking parser thread that maps
//! rows and fills batches; batches cross a bounded channel to concurrent senders. A slow
//! Braze slows the Looker read instead of filling memory.

use std::io::BufReader;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::mapping::{self, Columns, Dedup, near_miss_tag};
use super::report::{self, RunContext, RunFailure, Tally};
use super::{Credentials, ExportPlan, RunError, RunReport, Trigger};
use crate::braze::{
    Batch, BrazeClient, BrazeError, Delivery, FailReason, LimiterRegistry, PayloadDump, RetryPolicy,
};
use crate::http::HttpClients;
use crate::looker::body::{self, Transfer, WaitBudget};
use crate::looker::json_detail::{self, Cell, DetailError, Fields, RowSink, Stop};
use crate::looker::{LookerClient, LookerError};

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
        }
    }
}

/// Runs one export to its end and reports what happened. Never fails: every error ends up
/// in the report, and every row read is counted exactly once.
pub async fn run_export(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    opts: RunOptions,
) -> RunReport {
    let start_time = Timestamp::now();
    tracing::info!(export = %plan.name, look_id = %plan.look_id, trigger = ?opts.trigger, dry_run = opts.dry_run, "run started");
    let ended = execute(services, plan, creds, &opts).await;
    let interrupted = ended.interrupted;
    let failure = ended.failure.map(|e| RunFailure {
        reason: e.reason(),
        message: e.to_string(),
    });
    let report = report::finish(
        ended.tally,
        failure,
        interrupted,
        RunContext {
            trigger: opts.trigger,
            start_time,
            completion_time: Timestamp::now(),
            dry_run: opts.dry_run,
        },
    );
    debug_assert!(report.balanced(), "{report:?}");
    if let Some(d) = &opts.dump
        && let Err(e) = d.flush()
    {
        tracing::warn!(error = %e, "cannot flush the payload dump");
    }
    tracing::info!(
        export = %plan.name, outcome = report.outcome.as_str(), rows_read = report.rows_read, sent = report.sent,
        duplicates = report.duplicates, invalid = report.invalid, rejected = report.rejected, failed = report.failed,
        skipped = report.skipped, requests = report.requests, "run finished: {}", report.message
    );
    report
}

struct Ended {
    tally: Tally,
    failure: Option<RunError>,
    interrupted: bool,
}

async fn execute(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    opts: &RunOptions,
) -> Ended {
    let fail = |e: RunError| Ended {
        tally: Tally::default(),
        failure: Some(e),
        interrupted: false,
    };
    let braze = match (&creds.braze_api_key, opts.dry_run) {
        (_, true) => None,
        (Some(key), false) => {
            let limiter = services.limiters.get(&plan.track_url, key, plan.rate_limit);
            match BrazeClient::new(
                services.http.get(true).clone(),
                plan.track_url.clone(),
                key,
                limiter,
                services.retry,
            ) {
                Ok(c) => Some(Arc::new(c)),
                Err(e) => return fail(e.into()),
            }
        }
        (None, false) => {
            return fail(RunError::Internal(
                "no Braze API key for a run that sends".into(),
            ));
        }
    };
    let looker = LookerClient::new(
        services.http.get(plan.verify_tls).clone(),
        plan.looker_api.clone(),
        creds.looker_client_id.clone(),
        creds.looker_client_secret.clone(),
        plan.looker_timeout_seconds,
    );
    let mut budget = WaitBudget::new(plan.looker_timeout());
    let response = tokio::select! {
        () = opts.cancel.cancelled() => return Ended { tally: Tally::default(), failure: None, interrupted: true },
        r = looker.run_look(&plan.look_id, plan.results, &mut budget) => r,
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => return fail(e.into()),
    };
    let (reader, transfer) = body::forward(response, budget, opts.cancel.clone());
    let (tx, rx) = mpsc::channel::<Batch>(plan.concurrency.max(1));
    let mut sink = ExportSink::new(plan, tx, Arc::clone(&opts.progress));
    let parser = tokio::task::spawn_blocking(move || {
        let parsed = json_detail::parse(BufReader::with_capacity(64 * 1024, reader), &mut sink);
        (sink.finish(), parsed)
    });
    let sent = send_all(rx, braze, plan.concurrency, opts).await;
    let (read, parsed) = match parser.await {
        Ok(out) => out,
        Err(e) => return fail(RunError::Internal(format!("the row reader died: {e}"))),
    };
    let (transfer, bytes) = transfer
        .await
        .unwrap_or((Transfer::Failed("the body reader died".into()), 0));
    tracing::debug!(bytes, ?transfer, "Looker body transfer ended");

    let interrupted = opts.cancel.is_cancelled() && sent.fatal.is_none();
    let failure = if let Some(fatal) = sent.fatal.clone() {
        Some(RunError::Braze(fatal))
    } else if interrupted {
        None
    } else if let Some(source) = read.column_error.clone() {
        Some(RunError::Columns {
            look_id: plan.look_id.clone(),
            source,
        })
    } else {
        parsed.err().map(|e| detail_error(e, &transfer, plan))
    };
    let mut tally = read.tally;
    tally.merge(sent.tally);
    if read.unsent.count > 0 {
        let (reason, why) = match &sent.fatal {
            Some(f) => (f.reason(), f.to_string()),
            None => ("Interrupted", "the operator is shutting down".into()),
        };
        let r = FailReason::Stopped(reason, why);
        tally.failed += read.unsent.count;
        tally.note_n(
            r.reason(),
            &r.describe(0),
            read.unsent.count,
            &read.unsent.rows,
        );
    }
    Ended {
        tally,
        failure,
        interrupted,
    }
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
}

/// The parser thread's side of a run: rows to objects to batches.
struct ExportSink {
    plan: ExportPlan,
    columns: Option<Columns>,
    column_error: Option<mapping::ColumnError>,
    dedup: Dedup,
    batch: Batch,
    tx: Option<mpsc::Sender<Batch>>,
    tally: Tally,
    unsent: Unsent,
    progress: Arc<Progress>,
}

impl ExportSink {
    fn new(plan: &ExportPlan, tx: mpsc::Sender<Batch>, progress: Arc<Progress>) -> Self {
        Self {
            plan: plan.clone(),
            columns: None,
            column_error: None,
            dedup: Dedup::default(),
            batch: Batch::with_capacity(plan.batch_size),
            tx: Some(tx),
            tally: Tally::default(),
            unsent: Unsent::default(),
            progress,
        }
    }

    /// Hands the full (or last) batch to the senders; false when they are gone.
    fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return self.tx.is_some();
        }
        let batch = std::mem::replace(&mut self.batch, Batch::with_capacity(self.plan.batch_size));
        let refused = match &self.tx {
            Some(tx) => tx.blocking_send(batch).err().map(|e| e.0),
            None => Some(batch),
        };
        match refused {
            None => true,
            Some(b) => {
                self.tx = None;
                self.unsent.count += b.len() as u64;
                self.unsent.rows.extend(
                    b.rows()
                        .iter()
                        .take(5usize.saturating_sub(self.unsent.rows.len())),
                );
                false
            }
        }
    }

    fn finish(mut self) -> ReadSummary {
        self.flush();
        ReadSummary {
            tally: self.tally,
            column_error: self.column_error,
            unsent: self.unsent,
        }
    }
}

impl RowSink for ExportSink {
    fn fields(&mut self, fields: &Fields) -> Result<Vec<String>, Stop> {
        for f in &fields.all {
            for t in f.tags.iter().filter(|t| near_miss_tag(t)) {
                tracing::warn!(field = %f.name, tag = %t, "tag is not of the form braze[NAME] and is ignored");
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
        self.tally.rows_read += 1;
        self.progress.rows_read.fetch_add(1, Ordering::Relaxed);
        if let Some(max) = self.plan.max_rows
            && number > max
        {
            if self.tally.skipped == 0 {
                tracing::warn!(
                    max_rows = max,
                    "the Look has more rows than maxRows; the rest are skipped"
                );
            }
            self.tally.skipped += 1;
            self.tally
                .note("MaxRowsExceeded", &max.to_string(), &[number]);
            return Ok(());
        }
        let Some(columns) = &self.columns else {
            return Err(Stop);
        };
        match mapping::map_row(columns, &self.plan.shape, cells) {
            Err(invalid) => {
                let field = match invalid {
                    mapping::Invalid::MissingField(i) | mapping::Invalid::MalformedCell(i) => {
                        &columns.captures[i]
                    }
                    _ => &columns.captures[0],
                };
                self.tally.invalid += 1;
                self.tally.note(invalid.reason(), field, &[number]);
            }
            Ok(object) => {
                if !self.dedup.first(&object.id) {
                    self.tally.duplicates += 1;
                } else if self.batch.push(number, &object).is_err() {
                    self.tally.invalid += 1;
                    self.tally
                        .note("MalformedCell", columns.id_field(), &[number]);
                }
            }
        }
        if self.batch.len() >= self.plan.batch_size && !self.flush() {
            return Err(Stop);
        }
        Ok(())
    }
}

struct SendSummary {
    tally: Tally,
    fatal: Option<BrazeError>,
}

/// Receives batches and keeps up to `concurrency` deliveries in flight. On a fatal answer or
/// cancellation it stops taking batches and counts those still queued as failed.
async fn send_all(
    mut rx: mpsc::Receiver<Batch>,
    braze: Option<Arc<BrazeClient>>,
    concurrency: usize,
    opts: &RunOptions,
) -> SendSummary {
    let mut out = SendSummary {
        tally: Tally::default(),
        fatal: None,
    };
    let mut inflight: JoinSet<Delivery> = JoinSet::new();
    let absorb = |out: &mut SendSummary,
                  d: Result<Delivery, tokio::task::JoinError>,
                  progress: &Progress| {
        let d = d.unwrap_or_else(|e| Delivery {
            fatal: None,
            failed: vec![("InternalError", format!("a sender died: {e}"), vec![])],
            ..Delivery::default()
        });
        progress.sent.fetch_add(d.sent, Ordering::Relaxed);
        absorb_delivery(out, d);
    };
    loop {
        if out.fatal.is_some() || opts.cancel.is_cancelled() {
            break;
        }
        if inflight.len() >= concurrency.max(1) {
            if let Some(d) = inflight.join_next().await {
                absorb(&mut out, d, &opts.progress);
            }
            continue;
        }
        tokio::select! {
            biased;
            () = opts.cancel.cancelled() => break,
            Some(d) = inflight.join_next(), if !inflight.is_empty() => absorb(&mut out, d, &opts.progress),
            next = rx.recv() => match next {
                None => break,
                Some(batch) => match &braze {
                    None => dry_send(&mut out.tally, &batch, opts),
                    Some(client) => {
                        let client = Arc::clone(client);
                        let cancel = opts.cancel.clone();
                        let dump = opts.dump.clone();
                        inflight.spawn(async move { client.deliver(batch, &cancel, dump.as_deref()).await });
                    }
                },
            },
        }
    }
    rx.close();
    let stop = out.fatal.as_ref().map_or_else(
        || FailReason::Stopped("Interrupted", "the operator is shutting down".into()),
        |f| FailReason::Stopped(f.reason(), f.to_string()),
    );
    while let Some(batch) = rx.recv().await {
        let mut d = Delivery::default();
        d.fail(&batch, &stop, 0);
        absorb_delivery(&mut out, d);
    }
    while let Some(d) = inflight.join_next().await {
        absorb(&mut out, d, &opts.progress);
    }
    out
}

fn dry_send(tally: &mut Tally, batch: &Batch, opts: &RunOptions) {
    if let Some(d) = &opts.dump
        && let Err(e) = d.write(&batch.body())
    {
        tracing::warn!(error = %e, "cannot write to the payload dump");
    }
    tally.sent += batch.len() as u64;
    opts.progress
        .sent
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
}

fn absorb_delivery(out: &mut SendSummary, d: Delivery) {
    let t = &mut out.tally;
    t.sent += d.sent;
    t.requests += d.requests;
    t.retries += d.retries;
    t.rate_limited += d.rate_limited;
    for (kind, rows) in &d.rejected {
        t.rejected += rows.len() as u64;
        t.note("BrazeRejected", kind, rows);
    }
    for (reason, description, rows) in &d.failed {
        t.failed += rows.len() as u64;
        t.note(reason, description, rows);
    }
    if out.fatal.is_none() {
        out.fatal = d.fatal;
    }
}
