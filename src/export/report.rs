//! The RunReport: counts that always add up, errors grouped by reason, an outcome and one
//! human sentence. Building it from a [`Tally`] is pure. It also holds the one list of
//! row-level reasons ([`RowReason`], with [`Invalid`] for rows refused by the mapping).
//! Imports nothing from the crate, so the spec, the controller and every part of the
//! pipeline can depend on it.

use jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What started a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Trigger {
    /// The cron schedule.
    Schedule,
    /// The run-now annotation.
    Manual,
    /// A retry after a failed run.
    Retry,
    /// A run missed while the operator was down.
    CatchUp,
    /// The `run` command.
    Cli,
    /// The export's deletion, with `cleanupOnDelete`: the flag is removed from its audience.
    Deletion,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Outcome {
    /// Every row was delivered, or counted as duplicate or invalid.
    Succeeded,
    /// Some users were flagged, but rows were rejected, not delivered, or skipped.
    PartiallySucceeded,
    /// The run failed as a whole, or nothing that should have been delivered was.
    Failed,
    /// The operator stopped mid-run.
    Interrupted,
    /// The run is still going (only in `status.lastRun` while it runs).
    Running,
}

impl Outcome {
    /// Process exit code of the `run` command.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Succeeded => 0,
            Self::PartiallySucceeded => 3,
            Self::Failed | Self::Interrupted | Self::Running => 1,
        }
    }

    /// The name as written in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::PartiallySucceeded => "PartiallySucceeded",
            Self::Failed => "Failed",
            Self::Interrupted => "Interrupted",
            Self::Running => "Running",
        }
    }
}

/// One group of errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorSummary {
    /// CamelCase reason, e.g. `NullIdentifier`.
    pub reason: String,
    /// What happened, pointing at rows by number; never data or secrets.
    pub message: String,
    /// Rows concerned (1 for an error of the whole run that concerns no row).
    pub count: u64,
}

/// The counters of a run. Code that reads them all destructures this struct without `..`,
/// so a counter added here fails to compile wherever it is forgotten.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Rows streamed from Looker.
    pub rows_read: u64,
    /// Objects Braze accepted (or, in a dry run, would have been sent).
    pub sent: u64,
    /// Rows whose identifier was already sent in this run.
    pub duplicates: u64,
    /// Rows not sent because of their identifier or a missing tagged field.
    pub invalid: u64,
    /// Objects Braze listed in a response's `errors`.
    pub rejected: u64,
    /// Objects read but not accepted.
    pub failed: u64,
    /// Rows beyond `maxRows`.
    pub skipped: u64,
    /// With `delta: true`: rows of users already flagged by the last successful run, not
    /// sent again (part of the rows' invariant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged: Option<u64>,
    /// With a stored audience: users newly flagged compared with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<u64>,
    /// With `removal: Remove`: users of the previous audience whose flag the run was to
    /// remove (`removed + removalRejected + removalFailed + removalWithheld`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_candidates: Option<u64>,
    /// With `removal: Remove`: users whose flag Braze removed (in a dry run: would remove).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<u64>,
    /// With `removal: Remove`: removals Braze listed in a response's `errors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_rejected: Option<u64>,
    /// With `removal: Remove`: removals never acknowledged (they stay in the stored audience,
    /// and a later run removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_failed: Option<u64>,
    /// With `removal: Remove`: removals not attempted because the run would have removed more
    /// than `removalLimitPercent` of the audience (error group `RemovalLimitExceeded`), or
    /// because a `results: Table` run read as many rows as the Look's row limit, so the
    /// result may be cut (error group `LookLimitReached`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_withheld: Option<u64>,
    /// HTTP requests to Braze.
    pub requests: u64,
    /// Requests that were retries.
    pub retries: u64,
    /// 429 answers from Braze.
    pub rate_limited: u64,
}

/// Adds two counts that may not apply (`None` + `None` stays `None`).
fn add_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        _ => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
}

impl Counts {
    /// Adds another run part's counts.
    pub fn add(&mut self, other: Counts) {
        let Counts {
            rows_read,
            sent,
            duplicates,
            invalid,
            rejected,
            failed,
            skipped,
            unchanged,
            added,
            removal_candidates,
            removed,
            removal_rejected,
            removal_failed,
            removal_withheld,
            requests,
            retries,
            rate_limited,
        } = other;
        self.rows_read += rows_read;
        self.sent += sent;
        self.duplicates += duplicates;
        self.invalid += invalid;
        self.rejected += rejected;
        self.failed += failed;
        self.skipped += skipped;
        self.unchanged = add_opt(self.unchanged, unchanged);
        self.added = add_opt(self.added, added);
        self.removal_candidates = add_opt(self.removal_candidates, removal_candidates);
        self.removed = add_opt(self.removed, removed);
        self.removal_rejected = add_opt(self.removal_rejected, removal_rejected);
        self.removal_failed = add_opt(self.removal_failed, removal_failed);
        self.removal_withheld = add_opt(self.removal_withheld, removal_withheld);
        self.requests += requests;
        self.retries += retries;
        self.rate_limited += rate_limited;
    }

    /// Rows accounted for: sent, duplicate, invalid, rejected, failed, skipped or unchanged.
    pub fn accounted(&self) -> u64 {
        let Counts {
            rows_read: _,
            sent,
            duplicates,
            invalid,
            rejected,
            failed,
            skipped,
            unchanged,
            added: _,
            removal_candidates: _,
            removed: _,
            removal_rejected: _,
            removal_failed: _,
            removal_withheld: _,
            requests: _,
            retries: _,
            rate_limited: _,
        } = *self;
        sent + duplicates + invalid + rejected + failed + skipped + unchanged.unwrap_or(0)
    }

    /// Removals accounted for: removed, rejected, failed or withheld.
    pub fn removals_accounted(&self) -> u64 {
        [
            self.removed,
            self.removal_rejected,
            self.removal_failed,
            self.removal_withheld,
        ]
        .iter()
        .map(|n| n.unwrap_or(0))
        .sum()
    }

    /// True when every row read is accounted for exactly once, and so is every removal
    /// candidate.
    pub fn balanced(&self) -> bool {
        self.rows_read == self.accounted()
            && self.removal_candidates.unwrap_or(0) == self.removals_accounted()
    }
}

/// Which users a run sent (with `delta: true`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SyncMode {
    /// Only users not flagged by the last successful run.
    Delta,
    /// Everyone in the Look (the first run, every `fullResyncInterval`, on demand, or after
    /// `exportName` or `attribute` changed).
    Full,
}

/// What one run did. Also what `run --output json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// What started the run.
    pub trigger: Trigger,
    /// When the run started.
    pub start_time: Timestamp,
    /// When the run ended (absent while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Timestamp>,
    /// How it ended.
    pub outcome: Outcome,
    /// The run's counters, written inline (`rowsRead`, `sent`, …).
    #[serde(flatten)]
    pub counts: Counts,
    /// Up to 10 error groups, largest first.
    pub errors: Vec<ErrorSummary>,
    /// One human sentence.
    pub message: String,
    /// True when nothing was sent to Braze on purpose.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// With `delta: true`: whether this run sent only what changed or everyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_mode: Option<SyncMode>,
}

impl RunReport {
    /// A report of a run still going: the counts so far, outcome `Running`.
    pub fn in_progress(trigger: Trigger, start_time: Timestamp, rows_read: u64, sent: u64) -> Self {
        RunReport {
            trigger,
            start_time,
            completion_time: None,
            outcome: Outcome::Running,
            counts: Counts {
                rows_read,
                sent,
                ..Counts::default()
            },
            errors: Vec::new(),
            message: format!("running: {rows_read} rows read, {sent} users flagged so far"),
            dry_run: false,
            sync_mode: None,
        }
    }

    /// Seconds from start to completion (or to `now` while running).
    pub fn duration_seconds(&self, now: Timestamp) -> f64 {
        let end = self.completion_time.unwrap_or(now);
        (end.as_millisecond() - self.start_time.as_millisecond()).max(0) as f64 / 1000.0
    }

    /// True when every row read is accounted for exactly once.
    pub fn balanced(&self) -> bool {
        self.counts.balanced()
    }
}

impl RunReport {
    /// The report as a few human lines (what `run --output text` prints).
    pub fn to_text(&self, title: &str) -> String {
        let seconds = self.duration_seconds(self.start_time);
        let mut out = format!("{title}: {}\n  {}\n", self.outcome.as_str(), self.message);
        for (label, value) in self.text_lines() {
            out.push_str(&format!("  {label:<12}{value}\n"));
        }
        out.push_str(&format!("  {:<12}{seconds:.1} s\n", "duration"));
        if !self.errors.is_empty() {
            out.push_str("errors:\n");
            for e in &self.errors {
                out.push_str(&format!("  {} ({}): {}\n", e.reason, e.count, e.message));
            }
        }
        out
    }

    /// The labelled lines of [`RunReport::to_text`] between the message and the duration:
    /// the row counts, the audience counts that apply, the sync mode, the requests.
    fn text_lines(&self) -> Vec<(&'static str, String)> {
        let Counts {
            rows_read,
            sent,
            duplicates,
            invalid,
            rejected,
            failed,
            skipped,
            unchanged,
            added,
            removal_candidates: _,
            removed,
            removal_rejected,
            removal_failed,
            removal_withheld,
            requests,
            retries,
            rate_limited,
        } = self.counts;
        let (sent_label, removed_label) = if self.dry_run {
            ("would send", "would remove")
        } else {
            ("sent", "removed")
        };
        let nonzero = |n: Option<u64>| n.filter(|n| *n > 0);
        // The row counts always show; the audience counts only when they apply.
        let counts: [(&str, Option<u64>); 13] = [
            ("rows read", Some(rows_read)),
            (sent_label, Some(sent)),
            ("duplicates", Some(duplicates)),
            ("invalid", Some(invalid)),
            ("rejected", Some(rejected)),
            ("failed", Some(failed)),
            ("skipped", Some(skipped)),
            ("unchanged", unchanged),
            ("added", added),
            (removed_label, removed),
            ("rm rejected", nonzero(removal_rejected)),
            ("rm failed", nonzero(removal_failed)),
            ("rm withheld", nonzero(removal_withheld)),
        ];
        let mut lines: Vec<(&str, String)> = counts
            .into_iter()
            .filter_map(|(label, n)| Some((label, n?.to_string())))
            .collect();
        if let Some(mode) = self.sync_mode {
            let kind = match mode {
                SyncMode::Delta => "delta",
                SyncMode::Full => "full resync",
            };
            lines.push(("sync", kind.to_owned()));
        }
        let requests = format!("{requests} ({retries} retries, {rate_limited} rate-limited)");
        lines.push(("requests", requests));
        lines
    }
}

/// Why a row is not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Invalid {
    /// The identifier is null.
    NullIdentifier,
    /// The identifier is an empty (or blank) string.
    EmptyIdentifier,
    /// The identifier is neither a string nor a number.
    InvalidIdentifier,
    /// The identifier is longer than 987 bytes.
    IdentifierTooLong,
    /// The identifier is a number with a fraction (`1.5`): no user has such an id.
    NonIntegralIdentifier,
    /// The identifier is a number too large to be a number at all (`1e400`).
    NonFiniteIdentifier,
    /// The row has no cell for the captured field at this index.
    MissingField(usize),
    /// The cell for the captured field at this index is not `{"value": …}`.
    MalformedCell(usize),
    /// The cell for the captured field at this index has an array or object value larger
    /// than the parser keeps ([`CELL_BUDGET_KIB`], [`ROW_BUDGET_MIB`]).
    ValueTooLarge(usize),
}

impl Invalid {
    /// Reason for the report's `errors`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NullIdentifier => "NullIdentifier",
            Self::EmptyIdentifier => "EmptyIdentifier",
            Self::InvalidIdentifier => "InvalidIdentifier",
            Self::IdentifierTooLong => "IdentifierTooLong",
            Self::NonIntegralIdentifier => "NonIntegralIdentifier",
            Self::NonFiniteIdentifier => "NonFiniteIdentifier",
            Self::MissingField(_) => "MissingField",
            Self::MalformedCell(_) => "MalformedCell",
            Self::ValueTooLarge(_) => "ValueTooLarge",
        }
    }
}

/// The parser's budget of one structured cell value, in KiB (`json_detail::MAX_CELL_BYTES`;
/// the mapping checks they agree), for [`Invalid::ValueTooLarge`]'s message.
pub const CELL_BUDGET_KIB: usize = 256;
/// The parser's budget of one row's kept cells, in MiB (`json_detail::MAX_ROW_BYTES`).
pub const ROW_BUDGET_MIB: usize = 1;

/// Braze keeps string attributes up to this many characters.
pub const MAX_ATTRIBUTE_CHARS: usize = 255;

/// Why rows are in an error group: the one list of row-level reasons, each with its name (for
/// the report, conditions and metrics) and the sentence [`finish`] writes for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowReason {
    /// Not sent: the identifier or a tagged cell is unusable.
    Invalid(Invalid),
    /// Not sent: the row is `null`.
    NullRow,
    /// Not sent: the row is not an object.
    MalformedRow,
    /// Sent without an attribute longer than Braze keeps.
    AttributeTooLong,
    /// Skipped beyond `maxRows`.
    MaxRowsExceeded,
    /// Listed in Braze's `errors`.
    BrazeRejected,
    /// Not delivered, under the reason of what stopped them (`BrazeServerError`,
    /// `RateLimited`, `Interrupted`, `BrazeForbidden`, `InternalError`, …).
    NotDelivered(&'static str),
    /// Removals Braze listed in `errors` (detail: Braze's error type).
    RemovalRejected,
    /// Removals not delivered, under the reason of what stopped them.
    RemovalNotDelivered(&'static str),
    /// Removals withheld by the removal limit (detail: the whole sentence).
    RemovalLimitExceeded,
    /// Removals withheld because a `results: Table` run read as many rows as the Look's
    /// row limit: the result may have been cut (detail: the whole sentence).
    LookLimitReached,
    /// The stored audience was written to another Braze workspace; its users (the count)
    /// keep the flag there (detail: the whole sentence).
    WorkspaceChanged,
}

impl RowReason {
    /// The CamelCase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid(i) => i.reason(),
            Self::NullRow => "NullRow",
            Self::MalformedRow => "MalformedRow",
            Self::AttributeTooLong => "AttributeTooLong",
            Self::MaxRowsExceeded => "MaxRowsExceeded",
            Self::BrazeRejected => "BrazeRejected",
            Self::NotDelivered(reason) | Self::RemovalNotDelivered(reason) => reason,
            Self::RemovalRejected => "RemovalRejected",
            Self::RemovalLimitExceeded => "RemovalLimitExceeded",
            Self::LookLimitReached => "LookLimitReached",
            Self::WorkspaceChanged => "WorkspaceChanged",
        }
    }
}

/// Most error groups a report lists.
pub const MAX_REPORTED_ERRORS: usize = 10;
const SAMPLE_ROWS: usize = 5;
const MAX_GROUPS: usize = 64;

/// Running counts of a run, kept by the reading and the sending side and merged at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// The counts so far.
    pub counts: Counts,
    groups: Vec<Group>,
    /// The Look's result may have been cut at its row limit: the sentence that says so and
    /// what to do (the run is then at best `PartiallySucceeded`, even if nobody was removed).
    pub look_cut: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Group {
    reason: RowReason,
    detail: String,
    count: u64,
    rows: Vec<u64>,
}

impl Tally {
    /// Records `rows.len()` rows under an error group (reason and detail, such as a field name
    /// or Braze's error type). Does not touch the counts.
    pub fn note(&mut self, reason: RowReason, detail: &str, rows: &[u64]) {
        self.note_n(reason, detail, rows.len() as u64, rows);
    }

    /// Moves the rows not delivered because the run was stopped (`from`: the reason shutdown
    /// gives them) to what really stopped it (`to`, `detail`): the counts stay.
    pub fn restate_stopped(&mut self, from: &str, to: &'static str, detail: &str) {
        for g in &mut self.groups {
            match g.reason {
                RowReason::NotDelivered(r) if r == from => g.reason = RowReason::NotDelivered(to),
                RowReason::RemovalNotDelivered(r) if r == from => {
                    g.reason = RowReason::RemovalNotDelivered(to);
                }
                _ => continue,
            }
            g.detail = detail.to_owned();
        }
    }

    /// Like [`Tally::note`] for `count` rows of which `rows` are examples.
    pub fn note_n(&mut self, reason: RowReason, detail: &str, count: u64, rows: &[u64]) {
        if count == 0 {
            return;
        }
        let index = match self
            .groups
            .iter()
            .position(|g| g.reason == reason && g.detail == detail)
        {
            Some(i) => i,
            None if self.groups.len() < MAX_GROUPS => {
                self.groups.push(Group {
                    reason,
                    detail: detail.to_owned(),
                    count: 0,
                    rows: Vec::new(),
                });
                self.groups.len() - 1
            }
            None => match self.groups.iter().position(|g| g.reason == reason) {
                Some(i) => i,
                None => return,
            },
        };
        let g = &mut self.groups[index];
        g.count += count;
        let room = SAMPLE_ROWS.saturating_sub(g.rows.len());
        g.rows.extend(rows.iter().take(room));
    }

    /// Adds another tally's counts and groups.
    pub fn merge(&mut self, other: Tally) {
        self.counts.add(other.counts);
        self.look_cut = self.look_cut.take().or(other.look_cut);
        for g in other.groups {
            self.note_n(g.reason, &g.detail, g.count, &g.rows);
        }
    }
}

/// An error that ended a run as a whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFailure {
    /// CamelCase reason.
    pub reason: &'static str,
    /// The error's message.
    pub message: String,
}

/// Everything [`finish`] needs besides the tally.
#[derive(Clone, Debug)]
pub struct RunContext {
    /// What started the run.
    pub trigger: Trigger,
    /// When it started.
    pub start_time: Timestamp,
    /// When it ended.
    pub completion_time: Timestamp,
    /// Nothing was sent on purpose.
    pub dry_run: bool,
}

/// Builds the report: outcome, message and error groups from the counts and how the run ended.
pub fn finish(
    tally: Tally,
    failure: Option<RunFailure>,
    interrupted: bool,
    ctx: RunContext,
) -> RunReport {
    finish_synced(tally, failure, interrupted, ctx, None)
}

/// [`finish`] for a run with a stored audience: `sync_mode` (with `delta: true`) is written
/// in the report and at the start of its message.
pub fn finish_synced(
    tally: Tally,
    failure: Option<RunFailure>,
    interrupted: bool,
    ctx: RunContext,
    sync_mode: Option<SyncMode>,
) -> RunReport {
    let mut outcome = outcome_of(&tally.counts, failure.is_some(), interrupted);
    let cut = tally.look_cut.as_deref().or_else(|| {
        tally
            .groups
            .iter()
            .find(|g| g.reason == RowReason::LookLimitReached)
            .map(|g| g.detail.as_str())
    });
    // A Look that may be cut is not all flagged: users past the cut were never read.
    if cut.is_some() && outcome == Outcome::Succeeded {
        outcome = Outcome::PartiallySucceeded;
    }
    let message = message_of(
        &tally.counts,
        failure.as_ref(),
        outcome,
        &ctx,
        sync_mode,
        cut,
    );
    let mut errors = error_summaries(&tally, failure.as_ref());
    if let Some(cut) = cut
        && !errors
            .iter()
            .any(|e| e.reason == RowReason::LookLimitReached.as_str())
    {
        errors.push(ErrorSummary {
            reason: RowReason::LookLimitReached.as_str().into(),
            message: cut.to_owned(),
            count: 1,
        });
        errors.truncate(MAX_REPORTED_ERRORS);
    }
    RunReport {
        trigger: ctx.trigger,
        start_time: ctx.start_time,
        completion_time: Some(ctx.completion_time),
        outcome,
        counts: tally.counts,
        errors,
        message,
        dry_run: ctx.dry_run,
        sync_mode,
    }
}

/// The outcome. Checked in this order because shutdown outranks a failure (the run did not
/// get to finish), and a failure outranks any count.
fn outcome_of(c: &Counts, failed: bool, interrupted: bool) -> Outcome {
    let undelivered = c.failed + c.rejected;
    let removals_left = c.removal_rejected.unwrap_or(0)
        + c.removal_failed.unwrap_or(0)
        + c.removal_withheld.unwrap_or(0);
    if interrupted {
        Outcome::Interrupted
    } else if failed || (c.sent == 0 && undelivered > 0 && c.removed.unwrap_or(0) == 0) {
        Outcome::Failed
    } else if undelivered + c.skipped + removals_left > 0 {
        Outcome::PartiallySucceeded
    } else {
        Outcome::Succeeded
    }
}

/// The report's sentence: what stopped the run (shutdown, or the failure), then the counts,
/// prefixed with the kind of sync; after removals withheld because the Look may have been
/// cut at its row limit, that sentence (`cut`), which says what to do.
fn message_of(
    c: &Counts,
    failure: Option<&RunFailure>,
    outcome: Outcome,
    ctx: &RunContext,
    sync_mode: Option<SyncMode>,
    cut: Option<&str>,
) -> String {
    let withheld = if cut.is_some() {
        WITHHELD_BY_LOOK_LIMIT
    } else {
        WITHHELD_BY_REMOVAL_LIMIT
    };
    let mut counts = counts_phrase_of(c, ctx.dry_run, withheld);
    if let Some(cut) = cut {
        counts = format!("{counts}; {cut}");
    }
    match sync_mode {
        Some(SyncMode::Delta) => counts = format!("delta run: {counts}"),
        Some(SyncMode::Full) => counts = format!("full resync: {counts}"),
        None => {}
    }
    match (failure, outcome) {
        (_, Outcome::Interrupted) => format!("interrupted by shutdown: {counts}"),
        (Some(f), _) => format!("{}; {counts}", f.message),
        _ => counts,
    }
}

/// The error groups: the failure first (counting the rows of its reason's groups, which it
/// stands for), then the other groups, largest first, at most [`MAX_REPORTED_ERRORS`].
fn error_summaries(tally: &Tally, failure: Option<&RunFailure>) -> Vec<ErrorSummary> {
    let mut errors: Vec<ErrorSummary> = Vec::new();
    if let Some(f) = failure {
        let count = tally
            .groups
            .iter()
            .filter(|g| g.reason.as_str() == f.reason)
            .map(|g| g.count)
            .sum::<u64>()
            .max(1);
        errors.push(ErrorSummary {
            reason: f.reason.to_owned(),
            message: f.message.clone(),
            count,
        });
    }
    let mut groups: Vec<&Group> = tally
        .groups
        .iter()
        .filter(|g| failure.is_none_or(|f| f.reason != g.reason.as_str()))
        .collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    errors.extend(groups.into_iter().map(|g| ErrorSummary {
        reason: g.reason.as_str().to_owned(),
        message: describe(g),
        count: g.count,
    }));
    errors.truncate(MAX_REPORTED_ERRORS);
    errors
}

/// Reason of a run whose stored audience could not be saved.
pub const AUDIENCE_NOT_SAVED: &str = "AudienceNotSaved";

/// The report of a run whose new audience could not be saved (`why`): a run that succeeded
/// is `PartiallySucceeded`, and the report says what that means for removals.
pub fn audience_not_saved(mut report: RunReport, why: &str) -> RunReport {
    let message = format!(
        "the audience of this run could not be saved ({why}): the previous one stays, with the users this run flagged for the first time recorded as pending, so the next run still removes those who left (and may send some users again)"
    );
    if report.outcome == Outcome::Succeeded {
        report.outcome = Outcome::PartiallySucceeded;
    }
    report.message = format!("{}; {message}", report.message);
    report.errors.insert(
        0,
        ErrorSummary {
            reason: AUDIENCE_NOT_SAVED.into(),
            message,
            count: 1,
        },
    );
    report.errors.truncate(MAX_REPORTED_ERRORS);
    report
}

/// Checks the report's invariant (`rowsRead = sent + duplicates + invalid + rejected +
/// failed + skipped`). A report that does not add up is a bug; it becomes `Failed` and
/// says so, rather than passing a wrong count off as the truth.
pub fn ensure_balanced(mut report: RunReport) -> RunReport {
    if report.balanced() {
        return report;
    }
    let c = &report.counts;
    let (read, accounted) = (c.rows_read, c.accounted());
    let (message, read, accounted) = if read == accounted {
        let candidates = c.removal_candidates.unwrap_or(0);
        let settled = c.removals_accounted();
        (
            format!(
                "internal error: the removals do not add up ({candidates} candidates, {settled} accounted for); please report it"
            ),
            candidates,
            settled,
        )
    } else {
        (
            format!(
                "internal error: the counts do not add up ({read} rows read, {accounted} accounted for); please report it"
            ),
            read,
            accounted,
        )
    };
    tracing::error!("{message}");
    report.outcome = Outcome::Failed;
    report.message = format!("{message}; {}", report.message);
    report.errors.insert(
        0,
        ErrorSummary {
            reason: "InternalError".into(),
            message,
            count: read.abs_diff(accounted),
        },
    );
    report.errors.truncate(MAX_REPORTED_ERRORS);
    report
}

/// How withheld removals are named in the counts: by the removal limit, or for the Look's
/// row limit (the sentence that follows says more).
type Withheld = (&'static str, &'static str);
const WITHHELD_BY_REMOVAL_LIMIT: Withheld = (
    "removal withheld by the removal limit",
    "removals withheld by the removal limit",
);
const WITHHELD_BY_LOOK_LIMIT: Withheld = (
    "removal withheld at the Look's row limit",
    "removals withheld at the Look's row limit",
);

/// "12480 users flagged, 31 duplicates, 2 invalid rows": the non-zero counts.
pub fn counts_phrase(t: &Counts, dry_run: bool) -> String {
    counts_phrase_of(t, dry_run, WITHHELD_BY_REMOVAL_LIMIT)
}

fn counts_phrase_of(t: &Counts, dry_run: bool, withheld: Withheld) -> String {
    let users = plural(t.sent, "user", "users");
    let mut parts = vec![match (dry_run, t.added) {
        (true, Some(n)) => format!("{users} would be flagged ({n} new, dry run)"),
        (true, None) => format!("{users} would be flagged (dry run)"),
        (false, Some(n)) => format!("{users} flagged ({n} new)"),
        (false, None) => format!("{users} flagged"),
    }];
    if let Some(n) = t.unchanged {
        parts.push(format!("{n} unchanged"));
    }
    if let Some(n) = t.removed.filter(|n| *n > 0) {
        parts.push(if dry_run {
            format!("{n} would be removed")
        } else {
            format!("{n} removed")
        });
    }
    for (n, one, many) in [
        (t.duplicates, "duplicate", "duplicates"),
        (t.invalid, "invalid row", "invalid rows"),
        (t.rejected, "rejected by Braze", "rejected by Braze"),
        (t.failed, "not delivered", "not delivered"),
        (
            t.skipped,
            "row skipped beyond maxRows",
            "rows skipped beyond maxRows",
        ),
        (
            t.removal_rejected.unwrap_or(0),
            "removal rejected by Braze",
            "removals rejected by Braze",
        ),
        (
            t.removal_failed.unwrap_or(0),
            "removal not delivered",
            "removals not delivered",
        ),
        (t.removal_withheld.unwrap_or(0), withheld.0, withheld.1),
    ] {
        if n > 0 {
            parts.push(plural(n, one, many));
        }
    }
    parts.join(", ")
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The sentence of an error group: which rows, then what is wrong with them.
fn describe(g: &Group) -> String {
    let subject = rows_subject(g);
    let (have, lack, is_are) = if g.count == 1 {
        ("has", "lacks", "is")
    } else {
        ("have", "lack", "are")
    };
    let d = &g.detail;
    match g.reason {
        RowReason::Invalid(invalid) => describe_invalid(invalid, &subject, (have, lack), d),
        RowReason::NullRow => {
            format!("{subject} of the Look's data {is_are} null instead of a row")
        }
        RowReason::MalformedRow => {
            format!("{subject} of the Look's data {is_are} not a row object")
        }
        RowReason::AttributeTooLong => format!(
            "{subject} {have} a {d} value longer than Braze's {MAX_ATTRIBUTE_CHARS} characters: flagged without it"
        ),
        RowReason::BrazeRejected => format!("Braze rejected {subject}: {d}"),
        RowReason::MaxRowsExceeded => format!(
            "{subject} beyond maxRows {d} {}",
            if g.count == 1 {
                "was skipped"
            } else {
                "were skipped"
            }
        ),
        RowReason::NotDelivered(_) => format!("{subject} not delivered: {d}"),
        RowReason::RemovalRejected => format!(
            "Braze rejected {}: {d}",
            plural(g.count, "removal", "removals")
        ),
        RowReason::RemovalNotDelivered(_) => format!(
            "{} not delivered (the users stay in the stored audience, and a later run removes them): {d}",
            plural(g.count, "removal", "removals")
        ),
        RowReason::RemovalLimitExceeded
        | RowReason::LookLimitReached
        | RowReason::WorkspaceChanged => d.clone(),
    }
}

/// "row 4", "rows 2, 7 and 12 more", "3 rows": the group's sample rows, in order.
fn rows_subject(g: &Group) -> String {
    let mut rows = g.rows.clone();
    rows.sort_unstable();
    let list: Vec<String> = rows.iter().map(u64::to_string).collect();
    let more = g.count.saturating_sub(rows.len() as u64);
    let mut subject = match (g.count, list.len()) {
        (1, 1) => format!("row {}", list[0]),
        (_, 0) => plural(g.count, "row", "rows"),
        _ => format!("rows {}", list.join(", ")),
    };
    if more > 0 && !list.is_empty() {
        subject.push_str(&format!(" and {more} more"));
    }
    subject
}

/// What is wrong with rows not sent (`d`: the field concerned).
fn describe_invalid(
    invalid: Invalid,
    subject: &str,
    (have, lack): (&str, &str),
    d: &str,
) -> String {
    match invalid {
        Invalid::NullIdentifier => format!("{subject} {have} no {d} value"),
        Invalid::EmptyIdentifier => format!("{subject} {have} an empty {d} value"),
        Invalid::InvalidIdentifier => {
            format!("{subject} {have} a {d} value that is neither a string nor a number")
        }
        Invalid::IdentifierTooLong => {
            format!("{subject} {have} a {d} value longer than 987 bytes")
        }
        Invalid::NonIntegralIdentifier => {
            format!("{subject} {have} a {d} value that is not a whole number")
        }
        Invalid::NonFiniteIdentifier => {
            format!("{subject} {have} a {d} value too large to be a number")
        }
        Invalid::MissingField(_) => format!("{subject} {lack} the field {d}"),
        Invalid::MalformedCell(_) => format!("{subject} {have} a malformed {d} cell"),
        Invalid::ValueTooLarge(_) => format!(
            "{subject} {have} a {d} value too large to keep (an array or object over {CELL_BUDGET_KIB} KiB, or a value past the {ROW_BUDGET_MIB} MiB a row may take)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RunContext {
        let t: Timestamp = "2026-11-29T10:00:00Z".parse().unwrap();
        RunContext {
            trigger: Trigger::Cli,
            start_time: t,
            completion_time: t,
            dry_run: false,
        }
    }

    fn tally(sent: u64, dup: u64, invalid: u64, rejected: u64, failed: u64, skipped: u64) -> Tally {
        Tally {
            counts: Counts {
                rows_read: sent + dup + invalid + rejected + failed + skipped,
                sent,
                duplicates: dup,
                invalid,
                rejected,
                failed,
                skipped,
                ..Counts::default()
            },
            ..Tally::default()
        }
    }

    #[test]
    fn outcomes() {
        let f = || {
            Some(RunFailure {
                reason: "LookNotFound",
                message: "Look 42 was not found".into(),
            })
        };
        let cases = [
            (tally(10, 1, 1, 0, 0, 0), None, false, Outcome::Succeeded),
            (tally(0, 0, 0, 0, 0, 0), None, false, Outcome::Succeeded),
            (tally(0, 0, 3, 0, 0, 0), None, false, Outcome::Succeeded),
            (
                tally(10, 0, 0, 1, 0, 0),
                None,
                false,
                Outcome::PartiallySucceeded,
            ),
            (
                tally(10, 0, 0, 0, 1, 0),
                None,
                false,
                Outcome::PartiallySucceeded,
            ),
            (
                tally(10, 0, 0, 0, 0, 1),
                None,
                false,
                Outcome::PartiallySucceeded,
            ),
            (tally(0, 0, 0, 2, 0, 0), None, false, Outcome::Failed),
            (tally(0, 0, 0, 0, 2, 0), None, false, Outcome::Failed),
            (tally(10, 0, 0, 0, 0, 0), f(), false, Outcome::Failed),
            (tally(10, 0, 0, 0, 5, 0), None, true, Outcome::Interrupted),
        ];
        for (t, failure, interrupted, want) in cases {
            let r = finish(t.clone(), failure, interrupted, ctx());
            assert_eq!(r.outcome, want, "{t:?}");
            assert!(r.balanced());
        }
        assert_eq!(
            [0, 3, 1, 1].to_vec(),
            [
                Outcome::Succeeded,
                Outcome::PartiallySucceeded,
                Outcome::Failed,
                Outcome::Interrupted
            ]
            .map(Outcome::exit_code)
        );
    }

    #[test]
    fn messages_read_like_the_spec() {
        let r = finish(tally(12480, 31, 2, 0, 0, 0), None, false, ctx());
        assert_eq!(
            r.message,
            "12480 users flagged, 31 duplicates, 2 invalid rows"
        );
        let r = finish(tally(1, 0, 1, 1, 2, 3), None, false, ctx());
        assert_eq!(
            r.message,
            "1 user flagged, 1 invalid row, 1 rejected by Braze, 2 not delivered, 3 rows skipped beyond maxRows"
        );
        let failure = RunFailure {
            reason: "LookNotFound",
            message: "Look 42 was not found".into(),
        };
        let r = finish(tally(0, 0, 0, 0, 0, 0), Some(failure), false, ctx());
        assert_eq!(r.message, "Look 42 was not found; 0 users flagged");
        assert_eq!(
            r.errors,
            [ErrorSummary {
                reason: "LookNotFound".into(),
                message: "Look 42 was not found".into(),
                count: 1
            }]
        );
        let dry = finish(
            tally(5, 0, 0, 0, 0, 0),
            None,
            false,
            RunContext {
                dry_run: true,
                ..ctx()
            },
        );
        assert_eq!(dry.message, "5 users would be flagged (dry run)");
        let json = serde_json::to_value(&dry).unwrap();
        assert_eq!(json["dryRun"], true);
        assert_eq!(json["rowsRead"], 5);
        assert_eq!(json["startTime"], "2026-11-29T10:00:00Z");
        assert!(serde_json::to_value(&r).unwrap().get("dryRun").is_none());
    }

    #[test]
    fn errors_are_grouped_sampled_and_capped() {
        let mut t = Tally::default();
        let null = RowReason::Invalid(Invalid::NullIdentifier);
        t.note(null, "users.braze_id", &[17]);
        t.note(null, "users.braze_id", &[230]);
        t.note(
            RowReason::Invalid(Invalid::MissingField(1)),
            "users.email",
            &[3],
        );
        t.note_n(
            RowReason::NotDelivered("BrazeServerError"),
            "Braze answered 503 after 6 attempts",
            150,
            &[9, 8, 7, 6, 5, 4, 3],
        );
        for i in 0..20u64 {
            t.note(RowReason::BrazeRejected, &format!("type {i}"), &[i]);
        }
        let r = finish(t, None, false, ctx());
        assert_eq!(r.errors.len(), MAX_REPORTED_ERRORS);
        assert_eq!(
            r.errors[0].message,
            "rows 5, 6, 7, 8, 9 and 145 more not delivered: Braze answered 503 after 6 attempts"
        );
        assert_eq!(
            r.errors[1],
            ErrorSummary {
                reason: "NullIdentifier".into(),
                message: "rows 17, 230 have no users.braze_id value".into(),
                count: 2
            }
        );
        assert_eq!(r.errors[2].message, "row 3 lacks the field users.email");
        assert_eq!(r.errors[3].message, "Braze rejected row 0: type 0");
    }

    #[test]
    fn run_failure_takes_the_count_of_its_rows() {
        let mut t = tally(75, 0, 0, 0, 150, 0);
        t.note_n(
            RowReason::NotDelivered("BrazeUnauthorized"),
            "the run stopped: Braze refused the API key",
            150,
            &[76, 77],
        );
        let failure = RunFailure {
            reason: "BrazeUnauthorized",
            message: "Braze answered 401".into(),
        };
        let r = finish(t, Some(failure), false, ctx());
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.errors.len(), 1);
        assert_eq!(r.errors[0].count, 150);
    }

    #[test]
    fn merge_adds_everything() {
        let mut a = tally(1, 1, 1, 1, 1, 1);
        a.note(RowReason::NotDelivered("X"), "d", &[1]);
        let mut b = tally(2, 0, 0, 0, 0, 0);
        b.counts.requests = 3;
        b.note(RowReason::NotDelivered("X"), "d", &[2, 3]);
        a.merge(b);
        assert_eq!(
            (a.counts.rows_read, a.counts.sent, a.counts.requests),
            (8, 3, 3)
        );
        assert_eq!(a.groups[0].count, 3);
        assert_eq!(a.groups[0].rows, [1, 2, 3]);
    }

    #[test]
    fn audience_counts_have_their_own_invariant_and_appear_only_when_they_apply() {
        let plain = finish(tally(3, 0, 0, 0, 0, 0), None, false, ctx());
        let json = serde_json::to_value(&plain).unwrap();
        for k in [
            "added",
            "unchanged",
            "removed",
            "removalRejected",
            "removalFailed",
            "removalWithheld",
            "removalCandidates",
            "syncMode",
        ] {
            assert!(json.get(k).is_none(), "{k} only when it applies");
        }

        let mut t = tally(10, 0, 0, 0, 0, 0);
        t.counts.rows_read += 90;
        t.counts.unchanged = Some(90);
        t.counts.added = Some(4);
        t.counts.removal_candidates = Some(7);
        t.counts.removed = Some(5);
        t.counts.removal_rejected = Some(0);
        t.counts.removal_failed = Some(2);
        t.counts.removal_withheld = Some(0);
        t.note_n(
            RowReason::RemovalNotDelivered("BrazeServerError"),
            "Braze answered 503 on all 6 attempts",
            2,
            &[1, 2],
        );
        let r = finish_synced(t.clone(), None, false, ctx(), Some(SyncMode::Delta));
        assert!(r.balanced());
        assert_eq!(r.outcome, Outcome::PartiallySucceeded, "a removal failed");
        assert_eq!(
            r.message,
            "delta run: 10 users flagged (4 new), 90 unchanged, 5 removed, 2 removals not delivered"
        );
        assert_eq!(
            r.errors[0].message,
            "2 removals not delivered (the users stay in the stored audience, and a later run removes them): Braze answered 503 on all 6 attempts"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            (
                &json["syncMode"],
                &json["unchanged"],
                &json["removed"],
                &json["removalFailed"]
            ),
            (
                &serde_json::json!("Delta"),
                &serde_json::json!(90),
                &serde_json::json!(5),
                &serde_json::json!(2)
            )
        );
        let text = r.to_text("Export x (Look 1)");
        assert!(
            text.contains("  unchanged   90\n") && text.contains("  sync        delta\n"),
            "{text}"
        );

        // Unbalanced on the removal side: Failed, and says which side.
        let mut off = t.clone();
        off.counts.removed = Some(6);
        let r = ensure_balanced(finish(off, None, false, ctx()));
        assert_eq!(r.outcome, Outcome::Failed);
        assert!(
            r.message.starts_with(
                "internal error: the removals do not add up (7 candidates, 8 accounted for)"
            ),
            "{}",
            r.message
        );

        // Withheld removals alone make a partial success.
        let mut held = tally(10, 0, 0, 0, 0, 0);
        held.counts.removal_candidates = Some(30);
        held.counts.removed = Some(0);
        held.counts.removal_withheld = Some(30);
        let r = finish(held, None, false, ctx());
        assert_eq!(
            (r.outcome, r.balanced()),
            (Outcome::PartiallySucceeded, true)
        );
        assert_eq!(
            r.message,
            "10 users flagged, 30 removals withheld by the removal limit"
        );

        // Withheld at the Look's row limit: the message says why and what to do.
        let mut cut = tally(10, 0, 0, 0, 0, 0);
        cut.counts.removal_candidates = Some(30);
        cut.counts.removed = Some(0);
        cut.counts.removal_withheld = Some(30);
        cut.note_n(
            RowReason::LookLimitReached,
            "Look 42 returned its row limit",
            30,
            &[],
        );
        let r = finish(cut, None, false, ctx());
        assert_eq!(
            (r.outcome, r.balanced()),
            (Outcome::PartiallySucceeded, true)
        );
        assert_eq!(
            r.message,
            "10 users flagged, 30 removals withheld at the Look's row limit; Look 42 returned its row limit"
        );
        assert_eq!(
            (r.errors[0].reason.as_str(), r.errors[0].count),
            ("LookLimitReached", 30)
        );
    }
}
