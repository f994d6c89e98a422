//! The audience side of a run (a stored audience given): before it, what kind of run it is
//! (delta or full, a changed `exportName` or `attribute`) and the previous members as keys;
//! after the adds, the removals (within the removal limit) and the new stored audience. Also
//! the cleanup of a deleted export ([`remove_audience`]), which only removes.
//!
//! Order matters here: removals go out only after every add of the run was settled (a user
//! never gets an add and a remove of the same value in one request, and a Look read only in
//! part never removes anyone), and the new audience is written last, from what Braze
//! acknowledged.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio::task::JoinError;
use tracing::Instrument;

use super::ended::Ended;
use super::error::RunError;
use super::mapping::RemovalObject;
use super::options::{RunOptions, Services};
use super::pending::{Journal, PendingLog};
use super::plan::{Credentials, ExportPlan};
use super::report::{RowReason, RunReport, SyncMode, Tally};
use super::send::{Side, braze_client, send_all, stop_reason};
use super::sink::{ReadSide, SinkSync};
use crate::audience::seen::{KeySet, Previous, Seen};
use crate::audience::writer::BodyWriter;
use crate::audience::{AudienceError, Encoded, Flag, Header, MemberState, Output, Owner};
use crate::braze::{Batch, BrazeClient, BrazeError};
use crate::spec::{IdentifierKind, RemovalMode};
use crate::spill::Scratch;

/// The stored audience handed to a run.
#[derive(Clone, Debug)]
pub struct AudienceInput {
    /// The export it belongs to (checked against the stored header).
    pub owner: Owner,
    /// What the last run left, with the pending records of runs that stopped before they
    /// saved ([`Encoded::with_pending`]); `None` before the first run.
    pub previous: Option<Encoded>,
    /// Where this run records users new to the audience before it flags them; `None`: not
    /// recorded (then a run that stops before its audience is saved forgets them).
    pub pending_log: Option<Arc<dyn PendingLog>>,
}

/// What to do with the stored audience after a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudienceUpdate {
    /// Keep it as it was (a dry run, a run that could not start, or a run that changed
    /// `exportName` or `attribute` but could not remove the old value).
    Keep,
    /// Replace it with this one.
    Replace(Encoded),
}

/// A run's report and what became of its stored audience.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The report.
    pub report: RunReport,
    /// The stored audience to keep.
    pub audience: AudienceUpdate,
}

/// What is decided before a run with a stored audience.
#[derive(Debug)]
pub(super) struct AudiencePlan {
    pub owner: Owner,
    pub previous: Option<Arc<Encoded>>,
    /// `exportName` or `attribute` changed since the previous audience was written.
    pub rename: bool,
    /// Everyone is sent (no delta skip).
    pub full: bool,
    /// With `delta: true`: which kind of run.
    pub mode: Option<SyncMode>,
    /// The Braze workspace this run writes to ([`crate::audience::workspace_fingerprint`]).
    pub workspace: Option<String>,
    /// The stored audience was written to another workspace: its fingerprint and members
    /// (it is set aside: this run is a first run in its own workspace).
    pub moved_from: Option<(String, u64)>,
}

fn alias_label(plan: &ExportPlan) -> Option<&str> {
    (plan.shape.identifier == IdentifierKind::UserAlias).then_some(plan.shape.alias_label.as_str())
}

/// Checks the stored audience and decides the kind of run; loads the previous members as
/// keys, and tells the read side what to do with them.
pub(super) async fn plan_audience(
    plan: &ExportPlan,
    opts: &RunOptions,
    input: Option<AudienceInput>,
    workspace: Option<String>,
    now: Timestamp,
) -> Result<Option<(AudiencePlan, Seen, SinkSync)>, RunError> {
    let Some(input) = input else {
        if plan.needs_audience() {
            return Err(RunError::AudienceRequired);
        }
        return Ok(None);
    };
    let previous = input.previous.map(Arc::new);
    if let Some(p) = &previous {
        p.header()
            .check(&input.owner, plan.shape.identifier, alias_label(plan))
            .map_err(RunError::AudienceMismatch)?;
    }
    // Written to another workspace (or the same one under a new key: nothing tells them
    // apart): everyone is sent, nobody removed, and its members stay, as pending.
    let moved_from = moved_from(previous.as_deref(), workspace.as_deref());
    let (rename, full) = run_kind(plan, opts, previous.as_deref(), now);
    let full = full || moved_from.is_some();
    let mode = plan.delta.then_some(if full {
        SyncMode::Full
    } else {
        SyncMode::Delta
    });
    // Too many to hold: every row waits, and is merged with them after the Look.
    let sorted = previous
        .clone()
        .filter(|p| members_of(p) > opts.spill.previous_in_memory);
    let seen = match &previous {
        None => Seen::new(),
        Some(p) => previous_seen(p, opts).await?,
    };
    tracing::debug!(
        members = seen.previous_len(),
        rename,
        full,
        "audience loaded"
    );
    let audience = AudiencePlan {
        owner: input.owner,
        previous,
        rename,
        full,
        mode,
        workspace,
        moved_from,
    };
    let journal = input
        .pending_log
        .filter(|_| !opts.dry_run)
        .map(|log| journal(log, &audience, plan, now));
    let sink = SinkSync {
        track: true,
        delta_skip: plan.delta && !full,
        rename,
        current: (!opts.dry_run)
            .then(|| BodyWriter::spilling(&opts.spill.scratch, opts.spill.run_bytes)),
        journal,
        merge_with: sorted,
        ..SinkSync::default()
    };
    Ok(Some((audience, seen, sink)))
}

/// The run's journal, writing through `log`. A run that changes the flag records it first:
/// if it stops, the next run knows the new value as stray (unless it already does).
fn journal(
    log: Arc<dyn PendingLog>,
    audience: &AudiencePlan,
    plan: &ExportPlan,
    now: Timestamp,
) -> Journal {
    let flag_owed = audience.rename
        && audience
            .previous
            .as_ref()
            .is_some_and(|p| !p.header().stray_flags.contains(&plan.flag()));
    Journal::new(log, new_header(audience, plan, false, now), flag_owed)
}

/// When the stored audience records another workspace than this run's: its fingerprint and
/// members. An audience that records none was written before workspaces were recorded, and
/// is taken to be this one's.
fn moved_from(previous: Option<&Encoded>, workspace: Option<&str>) -> Option<(String, u64)> {
    let p = previous?;
    let (Some(was), Some(now)) = (p.header().workspace.as_deref(), workspace) else {
        return None;
    };
    (was != now).then(|| (was.to_owned(), p.header().members + p.pending_members()))
}

/// Whether the flag changed since the previous audience was written (`rename`), and whether
/// everyone is sent (`full`): the first run, a changed flag, a resync asked for, or one due
/// by `fullResyncInterval`.
fn run_kind(
    plan: &ExportPlan,
    opts: &RunOptions,
    previous: Option<&Encoded>,
    now: Timestamp,
) -> (bool, bool) {
    let rename = previous.is_some_and(|p| {
        p.header().attribute != plan.shape.attribute
            || p.header().export_name != plan.shape.export_name
    });
    let resync_due = previous
        .and_then(|p| p.header().last_full_resync)
        .is_none_or(|last| {
            last.checked_add(plan.full_resync_interval)
                .is_ok_and(|due| due <= now)
        });
    let full = previous.is_none() || rename || opts.full_resync || resync_due;
    (rename, full)
}

/// At most how many members an audience has (its pending records' users may be members too).
fn members_of(e: &Encoded) -> u64 {
    e.header().members + e.pending_members()
}

/// The previous members as a run tells them apart, nobody marked present yet: as keys in
/// memory, or, when too many, by their place in identifier order ([`Seen::sorted`]).
async fn previous_seen(previous: &Arc<Encoded>, opts: &RunOptions) -> Result<Seen, RunError> {
    let members = members_of(previous);
    if members > opts.spill.previous_in_memory {
        return Ok(Seen::sorted(members));
    }
    load_members(previous).await
}

/// The previous members as keys, nobody marked present yet (a blocking pass over the
/// compressed body).
async fn load_members(previous: &Arc<Encoded>) -> Result<Seen, RunError> {
    let p = Arc::clone(previous);
    let expected = members_of(&p);
    tokio::task::spawn_blocking(move || Seen::with_previous(p.members()?, expected))
        .await
        .map_err(|e| RunError::Internal(format!("loading the stored audience failed: {e}")))?
        .map_err(RunError::AudienceUnreadable)
}

/// Removes the flag from every member of the stored audience, without reading Looker: the
/// cleanup of a deleted export with `cleanupOnDelete`. The flag removed is the one the
/// audience records (its `attribute` and `exportName`, as they were flagged); members whose
/// add had failed get the remove too, which changes nothing for a user without the value.
/// The deletion asked for everyone, so no removal limit applies. `opts.cancel` stops it,
/// and the removals not sent are counted `removalFailed`.
pub async fn remove_audience(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    opts: RunOptions,
    input: AudienceInput,
) -> RunReport {
    let span = tracing::info_span!("cleanup", export = %plan.name);
    async {
        let start_time = Timestamp::now();
        let ended = clear(services, plan, creds, &opts, input)
            .await
            .unwrap_or_else(Ended::failed);
        let report = ended.into_report(&opts, start_time, None);
        tracing::info!(
            outcome = report.outcome.as_str(),
            removed = report.counts.removed,
            "cleanup finished: {}",
            report.message
        );
        report
    }
    .instrument(span)
    .await
}

/// The cleanup's removals: checks the audience is this export's, then removes everyone.
async fn clear(
    services: &Services,
    plan: &ExportPlan,
    creds: &Credentials,
    opts: &RunOptions,
    input: AudienceInput,
) -> Result<Ended, RunError> {
    let mut ended = Ended::default();
    zero_removals(&mut ended);
    let Some(previous) = input.previous else {
        return Ok(ended);
    };
    if previous.header().export != input.owner {
        return Err(RunError::AudienceMismatch(format!(
            "it belongs to the export {}, not {}",
            previous.header().export,
            input.owner
        )));
    }
    let braze = braze_client(services, plan, creds, opts.dry_run)?;
    let previous = Arc::new(previous);
    // Nobody is marked present: every member is picked.
    let picker = Picker {
        seen: Arc::new(previous_seen(&previous, opts).await?),
        add_failed: Arc::default(),
        add_rejected: Arc::default(),
        clearing: false,
        scratch: opts.spill.scratch.clone(),
    };
    let names = Names::of(&previous, Vec::new());
    send_removals(&previous, picker, names, &mut ended, braze, plan, opts).await;
    Ok(ended)
}

/// What became of the removals.
enum Removal {
    /// Not attempted: the export keeps flags, or the Look was not read to its end.
    NotRun,
    /// Held back by the removal limit.
    Withheld,
    /// Done (maybe nothing to do); the keys of removals never acknowledged. Removals Braze
    /// rejected leave the audience: Braze refused them for good.
    Done { failed: KeySet },
}

/// What the audience side of a run needs once the Look was read.
pub(super) struct Settling<'a> {
    pub braze: Option<Arc<BrazeClient>>,
    pub plan: &'a ExportPlan,
    pub opts: &'a RunOptions,
    pub start_time: Timestamp,
    /// The Look's result may have been cut at its row limit (`results: Table`): the
    /// sentence of the `LookLimitReached` group; every removal is withheld.
    pub cut: Option<String>,
}

/// After the adds: counts `added`, removes users who left (or withholds the removals), and
/// builds the new stored audience. In this order: the removals need to know which adds
/// Braze took, and the new audience what the removals did.
pub(super) async fn settle(
    audience: AudiencePlan,
    read: ReadSide,
    ended: &mut Ended,
    settling: Settling<'_>,
) -> AudienceUpdate {
    let (plan, opts, start_time) = (settling.plan, settling.opts, settling.start_time);
    let picker = Picker {
        seen: Arc::new(read.seen),
        add_failed: Arc::new(KeySet::new(read.failed_keys)),
        add_rejected: Arc::new(KeySet::new(read.rejected_keys)),
        clearing: !clear_flags(&audience, plan).is_empty(),
        scratch: opts.spill.scratch.clone(),
    };
    ended.tally.counts.added = Some(count_added(&picker, audience.rename, read.sync.pushed_new));
    if let Some((was, members)) = &audience.moved_from {
        let message = moved_message(was, audience.workspace.as_deref(), *members);
        tracing::warn!("{message}");
        ended
            .tally
            .note_n(RowReason::WorkspaceChanged, &message, *members, &[]);
    }
    let complete = ended.failure.is_none() && !ended.interrupted;
    tracing::debug!(
        present = picker.seen.present_count(),
        new = picker.seen.new_count(),
        "adds settled"
    );
    let picked = picker.clone();
    let removal = remove_leavers(&audience, picked, complete, ended, &settling).await;
    if opts.dry_run {
        return AudienceUpdate::Keep;
    }
    // A changed flag whose old value could not be removed keeps the old audience, so that a
    // later run still knows whom to remove it from.
    if audience.rename
        && audience.moved_from.is_none()
        && plan.removal == RemovalMode::Remove
        && !matches!(removal, Removal::Done { .. })
    {
        return AudienceUpdate::Keep;
    }
    let mut header = new_header(&audience, plan, complete, start_time);
    header.stray_flags = stray_flags(&audience, plan, &removal, &picker);
    let state = NewState {
        seen: picker.seen,
        add_failed: picker.add_failed,
        add_rejected: picker.add_rejected,
        removal,
        rename: audience.rename,
        keep_leavers: plan.removal == RemovalMode::Keep,
        moved: audience.moved_from.is_some(),
        scratch: picker.scratch,
    };
    tracing::debug!("removals settled");
    let output = opts.audience_output.clone();
    let built = (read.sync.current, audience.previous, output);
    build_audience(state, header, built, ended).await
}

/// Users newly flagged: the objects handed over for users new to the audience, less those
/// Braze did not take (a key both failed and rejected is lost once).
fn count_added(picker: &Picker, rename: bool, pushed_new: u64) -> u64 {
    // The key of a user new to the audience has its low bit set (see `ExportSink::hand`).
    let is_new = |k: u64| rename || k & 1 == 1;
    let (add_failed, add_rejected) = (&picker.add_failed, &picker.add_rejected);
    let lost_new = add_failed.iter().filter(|k| is_new(*k)).count()
        + add_rejected
            .iter()
            .filter(|k| is_new(*k) && !add_failed.contains(*k))
            .count();
    pushed_new.saturating_sub(lost_new as u64)
}

/// The sentence of a run whose stored audience was written to another Braze workspace.
fn moved_message(was: &str, now: Option<&str>, members: u64) -> String {
    format!(
        "the stored audience was written to another Braze workspace, or with another API key (fingerprint {was}; this run's is {}): this run sent everyone and removed nobody; its {members} users stay in the audience as pending, so later runs take the flag off those who leave. If it really is another workspace, they keep the flag in the old one: take it off there in Braze",
        now.unwrap_or("unknown")
    )
}

/// The flags that users in the Look lose besides getting the current one: the old flag
/// after a change of `attribute` or `exportName`, and any flag a stopped run left
/// ([`Header::stray_flags`]), never the current one.
fn clear_flags(audience: &AudiencePlan, plan: &ExportPlan) -> Vec<Flag> {
    let Some(previous) = &audience.previous else {
        return Vec::new();
    };
    let current = plan.flag();
    let mut flags = previous.header().flags();
    flags.retain(|f| *f != current);
    flags
}

/// With `removal: Remove`, the removals (within the limit) of a run that read the whole
/// Look: a Look read in part, or a failed run, removes nobody; nor does a Look that may have
/// been cut at its row limit (its removals are withheld).
async fn remove_leavers(
    audience: &AudiencePlan,
    picker: Picker,
    complete: bool,
    ended: &mut Ended,
    s: &Settling<'_>,
) -> Removal {
    if s.plan.removal != RemovalMode::Remove {
        return Removal::NotRun;
    }
    // Said even when nobody would be removed (a first run, nobody left): who is past the cut
    // was never flagged.
    ended.tally.look_cut = s.cut.clone();
    zero_removals(ended);
    let Some(previous) = audience
        .previous
        .as_ref()
        .filter(|_| complete && audience.moved_from.is_none())
    else {
        return Removal::NotRun;
    };
    let plan = s.plan;
    let names = Names::of(previous, clear_flags(audience, plan));
    remove_within_limit(previous, picker, names, ended, s).await
}

/// The flags some members of the new audience may still hold besides its own: none once
/// every removal went through and every previous member in the Look was sent and taken;
/// those a `Keep` export never removes carried as they were; else every flag this run was to
/// take off.
fn stray_flags(
    audience: &AudiencePlan,
    plan: &ExportPlan,
    removal: &Removal,
    picker: &Picker,
) -> Vec<Flag> {
    let seen = &picker.seen;
    let all_taken = seen.taken_count() == seen.present_count()
        && picker.add_failed.is_empty()
        && picker.add_rejected.is_empty();
    match removal {
        Removal::Done { failed } if failed.is_empty() && all_taken => Vec::new(),
        Removal::NotRun if plan.removal == RemovalMode::Keep => audience
            .previous
            .as_ref()
            .map(|p| p.header().stray_flags.clone())
            .unwrap_or_default(),
        _ => clear_flags(audience, plan),
    }
}

/// The new audience's header: this run's export and flag; the last full resync is this run
/// when it was a full one that read everything, else the previous audience's.
fn new_header(
    audience: &AudiencePlan,
    plan: &ExportPlan,
    complete: bool,
    start_time: Timestamp,
) -> Header {
    let last_full_resync = if audience.full && complete {
        Some(start_time)
    } else {
        audience
            .previous
            .as_ref()
            .and_then(|p| p.header().last_full_resync)
    };
    let workspace = audience.workspace.clone().or_else(|| {
        let p = audience.previous.as_ref()?;
        p.header().workspace.clone()
    });
    Header {
        export: audience.owner.clone(),
        identifier: plan.shape.identifier,
        alias_label: alias_label(plan).map(str::to_owned),
        attribute: plan.shape.attribute.clone(),
        export_name: plan.shape.export_name.clone(),
        last_full_resync,
        members: 0,
        workspace,
        stray_flags: Vec::new(),
    }
}

/// Builds the new stored audience on a blocking thread; when that fails, the run fails and
/// the old audience is kept.
async fn build_audience(
    state: NewState,
    header: Header,
    (current, previous, output): (Option<BodyWriter>, Option<Arc<Encoded>>, Output),
    ended: &mut Ended,
) -> AudienceUpdate {
    let built = tokio::task::spawn_blocking(move || {
        state.build(header, current, previous.as_deref(), &output)
    })
    .await;
    match built {
        Ok(Ok(encoded)) => {
            tracing::debug!(
                members = encoded.header().members,
                bytes = encoded.len_bytes(),
                "new stored audience built"
            );
            AudienceUpdate::Replace(encoded)
        }
        Ok(Err(e)) => {
            ended.fail_unless_failed(RunError::AudienceNotWritten(e));
            AudienceUpdate::Keep
        }
        Err(e) => {
            ended.fail_unless_failed(RunError::Internal(format!(
                "writing the stored audience failed: {e}"
            )));
            AudienceUpdate::Keep
        }
    }
}

/// The removal counts are in the report of an export that removes, zero or not.
fn zero_removals(ended: &mut Ended) {
    let c = &mut ended.tally.counts;
    for field in [
        &mut c.removal_candidates,
        &mut c.removed,
        &mut c.removal_rejected,
        &mut c.removal_failed,
        &mut c.removal_withheld,
    ] {
        field.get_or_insert(0);
    }
}

/// Which previous members lose the flag.
#[derive(Clone)]
struct Picker {
    seen: Arc<Seen>,
    add_failed: Arc<KeySet>,
    add_rejected: Arc<KeySet>,
    /// Users in the Look lose other flags ([`clear_flags`]): the old one after a change of
    /// the flag, or those a stopped run left.
    clearing: bool,
    /// Where the members are merged in identifier order, when too many to hold.
    scratch: Scratch,
}

impl Picker {
    /// Members absent from the Look; when other flags are cleared, also the members whose
    /// flag Braze accepted (users whose add failed keep the old one).
    fn picks(&self, i: usize, key: u64) -> bool {
        !self.seen.is_present(i)
            || (self.clearing
                && self.seen.is_taken(i)
                && !self.add_failed.contains(key)
                && !self.add_rejected.contains(key))
    }
}

/// The removal limit, then the removals. A Look that may have been cut at its row limit
/// (`cut`), or a run over the limit (unless allowed once), removes nobody: the candidates
/// are only counted, as withheld.
async fn remove_within_limit(
    previous: &Arc<Encoded>,
    picker: Picker,
    names: Names,
    ended: &mut Ended,
    s: &Settling<'_>,
) -> Removal {
    let (plan, opts, cut) = (s.plan, s.opts, s.cut.as_deref());
    let seen = Arc::clone(&picker.seen);
    let (before, present) = (seen.previous_len(), seen.present_count());
    let leaving = before - present;
    let empty = present == 0 && seen.new_count() == 0;
    let over = u128::from(leaving) * 100
        > u128::from(plan.removal_limit_percent) * u128::from(before)
        || (empty && leaving > 0);
    if leaving == 0 && !picker.clearing {
        return Removal::Done {
            failed: KeySet::default(),
        };
    }
    if let Some(message) = cut {
        // Also past `--allow-removal`: that allows a large share, not removing users who
        // may still be in the Look.
        tracing::warn!(leaving, audience = before, "{message}");
        return withhold(
            previous,
            picker,
            names,
            ended,
            RowReason::LookLimitReached,
            message,
        )
        .await;
    }
    if !over || opts.allow_removal_over_limit {
        let braze = s.braze.clone();
        return send_removals(previous, picker, names, ended, braze, plan, opts).await;
    }
    let message = limit_message(leaving, before, plan.removal_limit_percent, empty);
    tracing::warn!(leaving, audience = before, "{message}");
    withhold(
        previous,
        picker,
        names,
        ended,
        RowReason::RemovalLimitExceeded,
        &message,
    )
    .await
}

/// Removes nobody: counts the candidates as withheld, under `reason` and `message`.
async fn withhold(
    previous: &Arc<Encoded>,
    picker: Picker,
    names: Names,
    ended: &mut Ended,
    reason: RowReason,
    message: &str,
) -> Removal {
    let counted = {
        let (p, pk) = (Arc::clone(previous), picker);
        tokio::task::spawn_blocking(move || produce(&p, &pk, names, usize::MAX, None)).await
    };
    let Some(candidates) = produced_or_fail(counted, ended).map(|p| p.candidates) else {
        return Removal::NotRun;
    };
    let c = &mut ended.tally.counts;
    c.removal_candidates = Some(candidates);
    c.removal_withheld = Some(candidates);
    ended.tally.note_n(reason, message, candidates, &[]);
    Removal::Withheld
}

/// What a removal producer made; when it failed, the run fails with why (the first failure
/// stays the one reported) and `None` is returned.
fn produced_or_fail(
    joined: Result<Result<Produced, AudienceError>, JoinError>,
    ended: &mut Ended,
) -> Option<Produced> {
    match joined {
        Ok(Ok(p)) => Some(p),
        Ok(Err(e)) => {
            ended.fail_unless_failed(RunError::AudienceUnreadable(e));
            None
        }
        Err(e) => {
            ended.fail_unless_failed(RunError::Internal(format!("the removals failed: {e}")));
            None
        }
    }
}

/// The sentence of the `RemovalLimitExceeded` group: how many, of how many, how to go ahead.
fn limit_message(leaving: u64, before: u64, limit: u32, empty: bool) -> String {
    let how = "To go ahead, raise spec.braze.removalLimitPercent for one run (with `run`, or pass --allow-removal once), or in the cluster run it now with the annotation looker-braze.dev/allow-removal set to the same value as looker-braze.dev/run-now, which allows it once";
    if empty {
        format!(
            "the Look returned no users: removing all {before} users of the stored audience is refused at any removalLimitPercent, and nobody was removed; the stored audience is kept. If the audience really is empty now: {how}"
        )
    } else {
        let share = leaving as f64 * 100.0 / before.max(1) as f64;
        format!(
            "this run would remove {leaving} of the {before} users of the stored audience ({share:.1}%), more than removalLimitPercent {limit}%: nobody was removed, and the stored audience is kept. {how}"
        )
    }
}

/// The identifier and the flags of the removal objects.
struct Names {
    identifier: IdentifierKind,
    alias_label: String,
    /// What a user who left loses: the previous audience's flag and its stray ones.
    all: Vec<Flag>,
    /// What a user still in the Look loses ([`clear_flags`]).
    clear: Vec<Flag>,
}

impl Names {
    /// The names of the removals from `previous`'s members; `clear` for those in the Look.
    fn of(previous: &Encoded, clear: Vec<Flag>) -> Self {
        let h = previous.header();
        let all = h.flags();
        Self {
            identifier: h.identifier,
            alias_label: h.alias_label.clone().unwrap_or_default(),
            all,
            clear,
        }
    }
}

/// What a removal producer did: the users picked, and the removals it could not hand over.
#[derive(Debug, Default)]
struct Produced {
    candidates: u64,
    unsent: u64,
    unsent_keys: Vec<u64>,
}

/// Streams the previous members and builds removal batches for those `picker` picks; with
/// no channel, only counts them. Batches the senders no longer take are counted unsent.
fn produce(
    previous: &Encoded,
    picker: &Picker,
    names: Names,
    batch_size: usize,
    tx: Option<mpsc::Sender<Batch>>,
) -> Result<Produced, AudienceError> {
    let mut out = Produced::default();
    // Each member once, though it may come twice (in the body and in a pending record).
    let mut members = Previous::of(previous, &picker.seen, &picker.scratch)?;
    let mut batch = Batch::with_capacity(batch_size.min(75));
    let mut tx = tx;
    let hand = |batch: Batch, out: &mut Produced, tx: &mut Option<mpsc::Sender<Batch>>| {
        if batch.is_empty() {
            return;
        }
        let refused = match tx {
            Some(t) => t.blocking_send(batch).err().map(|e| e.0),
            None => Some(batch),
        };
        if let Some(b) = refused {
            *tx = None;
            out.unsent += b.len() as u64;
            out.unsent_keys.extend_from_slice(b.keys());
        }
    };
    while let Some((i, id, _, _)) = members.next_member(&picker.seen)? {
        let key = picker.seen.key(&id);
        if !picker.picks(i, key) {
            continue;
        }
        out.candidates += 1;
        if tx.is_none() && batch_size == usize::MAX {
            continue;
        }
        let flags = if picker.seen.is_present(i) {
            &names.clear
        } else {
            &names.all
        };
        let object = RemovalObject {
            identifier: names.identifier,
            alias_label: &names.alias_label,
            flags,
            id: &id,
        };
        if batch.push_keyed(out.candidates, key, &object).is_err() {
            continue;
        }
        if batch.len() >= batch_size {
            let full = std::mem::replace(&mut batch, Batch::with_capacity(batch_size));
            hand(full, &mut out, &mut tx);
        }
    }
    hand(batch, &mut out, &mut tx);
    Ok(out)
}

/// Sends the removals, like the adds: in flight within the rate limit, retried, dumped.
async fn send_removals(
    previous: &Arc<Encoded>,
    picker: Picker,
    names: Names,
    ended: &mut Ended,
    braze: Option<Arc<BrazeClient>>,
    plan: &ExportPlan,
    opts: &RunOptions,
) -> Removal {
    let stop = opts.cancel.child_token();
    let (tx, rx) = mpsc::channel::<Batch>(32);
    let producer = {
        let p = Arc::clone(previous);
        let batch_size = plan.batch_size;
        tokio::task::spawn_blocking(move || produce(&p, &picker, names, batch_size, Some(tx)))
    };
    let sent = send_all(rx, braze, plan.concurrency, opts, &stop, Side::Removals).await;
    stop.cancel();
    let produced = produced_or_fail(producer.await, ended).unwrap_or_default();
    let mut tally = sent.tally;
    let mut failed = sent.failed_keys;
    count_unsent_removals(&mut tally, &produced, sent.fatal.as_ref());
    failed.extend_from_slice(&produced.unsent_keys);
    // The producer counted every candidate: its count replaces the zero of `zero_removals`.
    tally.counts.removal_candidates = Some(produced.candidates);
    ended.tally.counts.removal_candidates = None;
    ended.tally.merge(tally);
    if let Some(fatal) = sent.fatal {
        ended.fail_unless_failed(RunError::Braze(fatal));
    } else if opts.cancel.is_cancelled() {
        ended.interrupted = true;
    }
    opts.progress
        .removed
        .store(ended.tally.counts.removed.unwrap_or(0), Ordering::Relaxed);
    Removal::Done {
        failed: KeySet::new(failed),
    }
}

/// Removals the senders never took count `removalFailed`, under what stopped the senders.
fn count_unsent_removals(tally: &mut Tally, produced: &Produced, fatal: Option<&BrazeError>) {
    if produced.unsent == 0 {
        return;
    }
    let r = stop_reason(fatal);
    *tally.counts.removal_failed.get_or_insert(0) += produced.unsent;
    tally.note_n(
        RowReason::RemovalNotDelivered(r.reason()),
        &r.describe(0),
        produced.unsent,
        &[],
    );
}

/// Everything the new stored audience is built from.
struct NewState {
    seen: Arc<Seen>,
    add_failed: Arc<KeySet>,
    add_rejected: Arc<KeySet>,
    removal: Removal,
    rename: bool,
    keep_leavers: bool,
    /// The audience was written to another workspace: its members stay, as pending.
    moved: bool,
    scratch: Scratch,
}

impl NewState {
    /// This run's users (flagged, or pending when their add failed; dropped when Braze
    /// rejected a user new to the audience), and the previous members this run did not
    /// take: kept in the Look, kept by `Keep`, or as the removals left them. Both go through
    /// one sorted writer (this run's users were pushed into it as they were taken), which
    /// writes each user once, where `output` says.
    fn build(
        &self,
        header: Header,
        current: Option<BodyWriter>,
        previous: Option<&Encoded>,
        output: &Output,
    ) -> Result<Encoded, AudienceError> {
        const CURRENT: u8 = 0;
        const PREVIOUS: u8 = 1;
        let mut out = current.unwrap_or_else(|| BodyWriter::new(crate::audience::codec::LEVEL));
        if let Some(previous) = previous {
            // Each member once, though it may come twice (in the body and in a pending
            // record): pending if either is, with the first known fingerprint.
            let mut r = Previous::of(previous, &self.seen, &self.scratch)?;
            while let Some((i, id, was, fingerprint)) = r.next_member(&self.seen)? {
                if let Some(state) = self.written_previous(i, self.seen.key(&id), was) {
                    out.push_tagged(&id, state, fingerprint, PREVIOUS);
                }
            }
        }
        Encoded::build_with(header, out, output, |id, state, _, tag| match tag {
            CURRENT => self.written_current(self.seen.key(id), state),
            _ => Some(state),
        })
    }

    /// What this run's user (written down as `recorded`) is written as (`None`: left out).
    /// The sets hold the keys of the objects sent: a user new to the audience by its key
    /// with the low bit set (see `ExportSink::hand`).
    fn written_current(&self, key: u64, recorded: MemberState) -> Option<MemberState> {
        let returning = |set: &KeySet| set.contains(key);
        let new = |set: &KeySet| set.contains(key | 1);
        if returning(&self.add_rejected) || new(&self.add_rejected) {
            let known = !self.rename && returning(&self.add_rejected);
            return known.then_some(MemberState::Pending);
        }
        if returning(&self.add_failed) || new(&self.add_failed) {
            return Some(MemberState::Pending);
        }
        Some(recorded)
    }

    /// What a previous member this run did not take is written as (`None`: left out).
    fn written_previous(&self, i: usize, key: u64, was: MemberState) -> Option<MemberState> {
        let seen = &self.seen;
        if seen.is_taken(i) {
            // Written with this run's users.
            return None;
        }
        if self.moved {
            return Some(MemberState::Pending);
        }
        if seen.is_present(i) {
            // In the Look, not sent (an invalid row, beyond maxRows): as it was; after a
            // change of the flag it does not hold the new one yet.
            return Some(if self.rename {
                MemberState::Pending
            } else {
                was
            });
        }
        if self.keep_leavers {
            // `Keep`: the flag stays on users who left, so they stay in the audience.
            return (!self.rename).then_some(was);
        }
        match &self.removal {
            Removal::NotRun | Removal::Withheld => Some(was),
            // Removed, or refused for good by Braze: out; never acknowledged: a later run
            // removes it.
            Removal::Done { failed } => failed.contains(key).then_some(MemberState::Pending),
        }
    }
}
