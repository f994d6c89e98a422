//! The read side of a run, on the parser thread: [`ExportSink`] takes Looker's rows as the
//! parser yields them, maps them to objects, and fills batches for the senders. Also what
//! crosses between the read side and the audience side: what the read side is told
//! ([`SinkSync`]) and what the read and send sides leave for the audience ([`ReadSide`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::deferred::{Taken, Waiting, WaitingRow};
use super::mapping::{self, Columns, near_miss_tag};
use super::options::{Failpoint, Progress, RunOptions, SpillOptions};
use super::pending::Journal;
use super::plan::ExportPlan;
use super::report::{RowReason, Tally};
use crate::audience::codec;
use crate::audience::seen::{Offer, Previous, Seen};
use crate::audience::writer::BodyWriter;
use crate::audience::{AudienceError, Encoded, MemberState};
use crate::braze::Batch;
use crate::braze::batch::MAX_REQUEST_BYTES;
use crate::looker::json_detail::{BadRow, Cell, Fields, RowSink, Stop};
use crate::text::clean;

/// What the read side is told of the audience sync (see [`super::audience_sync`]), and what
/// it counts for it.
#[derive(Debug, Default)]
pub(super) struct SinkSync {
    /// A stored audience is kept: objects carry keys, and members are written down.
    pub track: bool,
    /// Previous members that surely hold the flag are counted unchanged, not sent.
    pub delta_skip: bool,
    /// Every user counts as new (the flag changed).
    pub rename: bool,
    /// This run's users, written down as they are taken (not in a dry run).
    pub current: Option<BodyWriter>,
    /// Objects handed over for users new to the audience.
    pub pushed_new: u64,
    /// Rows counted unchanged.
    pub unchanged: u64,
    /// Keys of objects that were never handed to a sender.
    pub unsent_keys: Vec<u64>,
    /// Records users new to the audience before their batches go (not in a dry run).
    pub journal: Option<Journal>,
    /// The previous audience, too large to hold ([`Seen::sorted`]): merged with the rows
    /// that waited.
    pub merge_with: Option<Arc<Encoded>>,
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

/// Rows that were read and mapped but never handed to a sender (the senders had stopped).
#[derive(Debug, Default)]
pub(super) struct Unsent {
    pub count: u64,
    /// A few of their numbers, for the report.
    pub rows: Vec<u64>,
}

/// What the read side leaves when the parser is done: its counts, why the Look's columns
/// could not be used, the rows the senders never took, and who was in the Look.
pub(super) struct ReadSummary {
    pub tally: Tally,
    pub column_error: Option<mapping::ColumnError>,
    pub unsent: Unsent,
    pub seen: Seen,
    pub sync: SinkSync,
    /// Why the users about to be flagged could not be recorded first (the run stopped).
    pub journal_failed: Option<String>,
    /// Why rows could not wait in the scratch directory (the run stopped).
    pub spill_failed: Option<String>,
}

/// The parser thread's side of a run: rows to objects to batches.
pub(super) struct ExportSink {
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
    /// The object being mapped, serialized (its fingerprint is taken from these bytes).
    scratch: Vec<u8>,
    spill: SpillOptions,
    /// Rows of users new to the audience past those held in memory ([`super::deferred`]).
    waiting: Option<Waiting>,
    spill_failed: Option<String>,
}

impl ExportSink {
    pub(super) fn new(
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
            seen: seen.with_new_cap(opts.spill.new_in_memory),
            sync,
            batch: Batch::with_capacity(plan.batch_size),
            tx: Some(tx),
            tally: Tally::default(),
            handed: 0,
            unsent: Unsent::default(),
            progress,
            failpoint,
            scratch: Vec::with_capacity(256),
            spill: opts.spill.clone(),
            waiting: None,
            spill_failed: None,
        }
    }

    /// Hands the full (or last) batch to the senders; false when they are gone.
    fn flush(&mut self) -> bool {
        let batch = std::mem::replace(&mut self.batch, Batch::with_capacity(self.plan.batch_size));
        self.hand_over(batch)
    }

    /// Hands a batch to the senders, or to the journal to hold until its users are
    /// recorded; false when nothing more may be sent.
    fn hand_over(&mut self, batch: Batch) -> bool {
        if batch.is_empty() {
            return self.tx.is_some();
        }
        let Some(journal) = &mut self.sync.journal else {
            return self.send(batch);
        };
        let ready = journal.admit(batch);
        self.send_ready(ready)
    }

    /// At the end of the read: the journal's last record, then the batches it held.
    fn release(&mut self) -> bool {
        let sending = self.tx.is_some();
        let Some(journal) = &mut self.sync.journal else {
            return sending;
        };
        let ready = journal.drain(sending);
        self.send_ready(ready)
    }

    /// Sends batches the journal let go; after a failed record, counts them unsent.
    fn send_ready(&mut self, ready: Vec<Batch>) -> bool {
        if self
            .sync
            .journal
            .as_ref()
            .is_some_and(|j| j.failed.is_some())
        {
            self.tx = None;
        }
        let mut open = self.tx.is_some();
        for batch in ready {
            open &= self.send(batch);
        }
        open
    }

    fn send(&mut self, batch: Batch) -> bool {
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
    pub(super) fn finish(mut self, panicked: bool) -> ReadSummary {
        // The rows that waited go after the Look was read (after a panic, they are lost
        // rows, counted below).
        if !panicked {
            self.take_back();
        }
        self.flush();
        // The last users are recorded, and their batches sent, only once the Look is read.
        self.release();
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
        let journal_failed = self.sync.journal.take().and_then(|j| j.failed);
        ReadSummary {
            tally: self.tally,
            column_error: self.column_error,
            unsent: self.unsent,
            seen: self.seen,
            sync: self.sync,
            journal_failed,
            spill_failed: self.spill_failed,
        }
    }

    /// Sets a row of a user new to the audience aside until the end of the Look
    /// ([`Offer::Deferred`]). A row that cannot be serialized is counted invalid at once
    /// (and its user kept as pending), as it is in memory.
    fn set_aside(
        &mut self,
        number: u64,
        object: &mapping::BrazeObject<'_>,
        fingerprinted: bool,
    ) -> Result<(), Stop> {
        if !self.serialize(number, object) {
            if let Some(w) = &mut self.sync.current {
                w.push(&object.id, MemberState::Pending, 0);
            }
            return self.wait(WaitingRow::present(object.id.to_string(), number));
        }
        let fingerprint = if fingerprinted && self.sync.track {
            codec::fingerprint(&self.scratch)
        } else {
            0
        };
        let row = WaitingRow {
            id: object.id.to_string(),
            number,
            fingerprint,
            too_long: object.too_long_attributes().map(str::to_owned).collect(),
            object: self.scratch.clone(),
            present: false,
        };
        self.wait(row)
    }

    /// Sets a row aside; a failure of the scratch directory stops the read.
    fn wait(&mut self, row: WaitingRow) -> Result<(), Stop> {
        let spill = &self.spill;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Waiting::new(&spill.scratch, spill.run_bytes));
        if let Err(e) = waiting.push(row) {
            tracing::error!(error = %e, "rows could not wait in the scratch directory: the run stops");
            self.spill_failed = Some(e.to_string());
            return Err(Stop);
        }
        Ok(())
    }

    /// The rows set aside, back in identifier order, merged with the previous members when
    /// they are too many to hold ([`Seen::sorted`]): the first row of each user is taken as
    /// [`ExportSink::offer_and_push`] takes one, the others are duplicates. When the senders
    /// are gone, the rows to send are counted unsent (and the others still duplicates); when
    /// the scratch directory fails, every row not yet taken back is counted unsent.
    fn take_back(&mut self) {
        let waiting = self.waiting.take();
        // The rows still to count (present rows were counted when read).
        let mut left = waiting.as_ref().map_or(0, Waiting::to_count);
        let merged = self.sync.merge_with.take();
        if waiting.is_none() && merged.is_none() {
            return;
        }
        tracing::debug!(
            rows = waiting.as_ref().map_or(0, Waiting::len),
            "taking back the rows that waited"
        );
        let users = match (waiting, &self.spill_failed) {
            (Some(w), None) => match w.finish() {
                Ok(users) => Some(users),
                Err(e) => {
                    self.spill_failed = Some(e.to_string());
                    None
                }
            },
            _ => None,
        };
        // Nothing to merge with after a failure: every row still to count is unsent.
        let merge = merged.as_deref().filter(|_| self.spill_failed.is_none());
        let mut previous = match merge.map(|p| Previous::of(p, &self.seen, &self.spill.scratch)) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                self.spill_failed = Some(e.to_string());
                None
            }
            None => None,
        };
        // Without the previous members, the rows cannot be told new or returning.
        let users = users.filter(|_| merged.is_none() || previous.is_some());
        let mut head = None;
        for taken in users.into_iter().flatten() {
            let taken = match taken {
                Ok(t) => t,
                Err(e) => {
                    self.spill_failed = Some(e.to_string());
                    break;
                }
            };
            let member = match (taken.id(), &mut previous) {
                (Some(id), Some(p)) => match self.member(p, &mut head, id) {
                    Ok(m) => m,
                    Err(e) => {
                        self.spill_failed = Some(e.to_string());
                        break;
                    }
                },
                _ => None,
            };
            if !matches!(taken, Taken::Present(_)) {
                left -= 1;
            }
            match taken {
                Taken::Duplicate(_) => self.tally.counts.duplicates += 1,
                Taken::Present(_) => {
                    if let Some((i, _, _)) = member {
                        self.seen.merged_present(i, false);
                    }
                }
                Taken::First(row) if self.tx.is_none() => {
                    // The senders are gone: not sent, so not recorded either; a returning
                    // user stays as it was.
                    self.unsent.count += 1;
                    if self.unsent.rows.len() < 5 {
                        self.unsent.rows.push(row.number);
                    }
                    if let Some((i, _, _)) = member {
                        self.seen.merged_present(i, false);
                    }
                }
                Taken::First(row) => {
                    let offer = match member {
                        Some((index, state, fingerprint)) => {
                            self.seen.merged_present(index, true);
                            Offer::Returning {
                                index,
                                flagged: state == MemberState::Flagged,
                                fingerprint,
                            }
                        }
                        None => {
                            self.seen.note_deferred_new();
                            Offer::New
                        }
                    };
                    // Past a stop, the batch is counted unsent by `send`.
                    let _ = self.take_waiting(offer, row);
                }
            }
        }
        self.unsent.count += left;
        // The members past the last row: their number is the audience's size.
        while let (Some(p), None) = (&mut previous, &self.spill_failed) {
            match p.next_member(&self.seen) {
                Ok(Some((i, ..))) => self.seen.merged_len(i as u64 + 1),
                Ok(None) => break,
                Err(e) => self.spill_failed = Some(e.to_string()),
            }
        }
    }

    /// The previous member `id` is, if any: moves through the members (in identifier
    /// order) up to `id`, counting them; `head` holds the first member past it.
    fn member(
        &mut self,
        previous: &mut Previous<'_>,
        head: &mut Option<(usize, String, MemberState, u32)>,
        id: &str,
    ) -> Result<Option<(usize, MemberState, u32)>, AudienceError> {
        loop {
            if head.is_none() {
                *head = previous.next_member(&self.seen)?;
                if let Some((i, ..)) = head {
                    self.seen.merged_len(*i as u64 + 1);
                }
            }
            let Some((i, member, state, fp)) = head.as_ref() else {
                return Ok(None);
            };
            match member.as_str().cmp(id) {
                std::cmp::Ordering::Less => *head = None,
                std::cmp::Ordering::Equal => return Ok(Some((*i, *state, *fp))),
                std::cmp::Ordering::Greater => return Ok(None),
            }
        }
    }

    /// Takes the first row of a user that waited, as [`ExportSink::offer_and_push`] takes one
    /// in memory.
    fn take_waiting(&mut self, offer: Offer, row: WaitingRow) -> Result<(), Stop> {
        if self.is_unchanged(offer, row.fingerprint) {
            self.count_unchanged(&row.id, row.fingerprint);
            return Ok(());
        }
        for name in &row.too_long {
            self.tally
                .note(RowReason::AttributeTooLong, name, &[row.number]);
        }
        let key = self.seen.key(&row.id);
        self.scratch = row.object;
        self.hand(offer, row.number, key, &row.id, row.fingerprint)
    }

    /// Serializes a mapped object into the scratch buffer; false when it cannot be
    /// (counted invalid).
    fn serialize(&mut self, number: u64, object: &mapping::BrazeObject<'_>) -> bool {
        self.scratch.clear();
        if serde_json::to_writer(&mut self.scratch, object).is_ok() {
            return true;
        }
        self.tally.counts.invalid += 1;
        let id_field = self
            .columns
            .as_ref()
            .map_or("", |c| c.id_field())
            .to_owned();
        let reason = RowReason::Invalid(mapping::Invalid::MalformedCell(0));
        self.tally.note(reason, &id_field, &[number]);
        false
    }

    /// Adds the serialized object to the batch, sending the batch first when the object
    /// would take its body past the byte budget.
    fn push(&mut self, number: u64, key: u64) -> Result<(), Stop> {
        self.batch.push_bytes(number, key, &self.scratch);
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
        Ok(())
    }

    /// A user in the Look whose row is not sent: with a previous audience, not one to remove.
    fn mark_present(&mut self, cell: &Cell, number: u64) -> Result<(), Stop> {
        if self.seen.is_sorted()
            && let Ok(id) = mapping::identifier(cell)
        {
            return self.wait(WaitingRow::present(id.into_owned(), number));
        }
        if self.seen.previous_len() > 0
            && let Ok(id) = mapping::identifier(cell)
        {
            let key = self.seen.key(&id);
            self.seen.mark_present(key);
        }
        Ok(())
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
            return match cells.first() {
                Some(cell) => self.mark_present(cell, number),
                None => Ok(()),
            };
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
                    mapping::Invalid::MissingField(i)
                    | mapping::Invalid::MalformedCell(i)
                    | mapping::Invalid::ValueTooLarge(i) => &columns.captures[i],
                    _ => &columns.captures[0],
                };
                self.tally.counts.invalid += 1;
                self.tally
                    .note(RowReason::Invalid(invalid), field, &[number]);
                match cells.first() {
                    Some(cell) => self.mark_present(cell, number),
                    None => Ok(()),
                }
            }
            Ok(object) => {
                let fingerprinted = !columns.attributes.is_empty();
                self.offer_and_push(number, &object, fingerprinted)
            }
        }
    }

    /// Deduplicates a mapped object against the run and the stored audience, skips it when
    /// delta finds it sent as it is, else batches it (a user new to the audience is noted in
    /// the journal first) and writes it down for the new audience. `fingerprinted`: the
    /// Look has attributes (without, the object is the identifier and the flag alone, which
    /// the audience's header holds: its fingerprint is 0, and no object is serialized to
    /// count a user unchanged).
    fn offer_and_push(
        &mut self,
        number: u64,
        object: &mapping::BrazeObject<'_>,
        fingerprinted: bool,
    ) -> Result<(), Stop> {
        let key = self.seen.key(&object.id);
        let offer = self.seen.offer(key);
        match offer {
            Offer::Duplicate => {
                self.tally.counts.duplicates += 1;
                return Ok(());
            }
            Offer::Deferred => return self.set_aside(number, object, fingerprinted),
            _ => {}
        }
        let serialized = fingerprinted && self.serialize(number, object);
        let fingerprint = if serialized && self.sync.track {
            codec::fingerprint(&self.scratch)
        } else {
            0
        };
        if self.is_unchanged(offer, fingerprint) && (serialized || !fingerprinted) {
            self.count_unchanged(&object.id, fingerprint);
            return Ok(());
        }
        if !serialized && !self.serialize(number, object) {
            // Counted invalid; still in the Look, so kept in the audience, as pending.
            if let Some(w) = &mut self.sync.current {
                w.push(&object.id, MemberState::Pending, 0);
            }
            return Ok(());
        }
        for name in object.too_long_attributes() {
            self.tally
                .note(RowReason::AttributeTooLong, name, &[number]);
        }
        self.hand(offer, number, key, &object.id, fingerprint)
    }

    /// Delta: flagged by the last run with exactly this object, not sent again.
    fn is_unchanged(&self, offer: Offer, fingerprint: u32) -> bool {
        matches!(offer, Offer::Returning { flagged: true, fingerprint: last, .. }
            if self.sync.delta_skip && last == fingerprint)
    }

    fn count_unchanged(&mut self, id: &str, fingerprint: u32) {
        self.sync.unchanged += 1;
        if let Some(w) = &mut self.sync.current {
            w.push(id, MemberState::Flagged, fingerprint);
        }
    }

    /// Batches the object in the scratch buffer (a user new to the audience is noted in the
    /// journal first) and writes its user down for the new audience. The key of a user new
    /// to the audience has its low bit set: what Braze did not take is told apart by it.
    fn hand(
        &mut self,
        offer: Offer,
        number: u64,
        key: u64,
        id: &str,
        fingerprint: u32,
    ) -> Result<(), Stop> {
        let new = offer == Offer::New;
        if self.sync.track && (new || self.sync.rename) {
            self.sync.pushed_new += 1;
        }
        // Only users new to the audience need a record: the others are in it already.
        if let (true, Some(j)) = (new, &mut self.sync.journal) {
            j.note(id);
        }
        if let Some(w) = &mut self.sync.current {
            w.push(id, MemberState::Flagged, fingerprint);
        }
        self.push(number, key | u64::from(new))
    }
}
