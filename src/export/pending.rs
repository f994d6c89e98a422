//! The pending record of a run: users new to the stored audience are recorded (as pending)
//! before any request that flags them is sent, so that whatever stops the run before its
//! audience is saved (a crash, an OOM kill, a lost Lease, a failed save, SIGKILL
//! mid-request), the next run still knows them and removes those who left.
//!
//! Order matters: the read side collects the new users of the batches it fills and holds
//! those batches back; when enough are waiting (or they waited long enough, or the Look
//! ended), it starts writing one record through the [`PendingLog`] and reads on; the held
//! batches go to the senders only once their record is durable. A record that cannot be
//! written stops the run: nothing it held is sent.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;

use crate::audience::writer::BodyWriter;
use crate::audience::{Encoded, Header, MemberState};
use crate::braze::Batch;

/// Where a run's pending records go: Secrets beside the audience in the cluster, a file
/// beside `--state` for `run`. `record` returns once the record is durable.
pub trait PendingLog: Send + Sync + fmt::Debug {
    /// Writes one record (an audience of pending users, under the run's header); says why
    /// not, naming no user.
    fn record(&self, record: Encoded) -> BoxFuture<'_, Result<(), String>>;
}

/// Numbers a run's records after its start (milliseconds × 1000 + a counter), so that their
/// names sort as they were written, across runs too.
#[derive(Debug)]
pub struct RecordNumbers {
    first: u64,
    next: std::sync::atomic::AtomicU64,
}

impl RecordNumbers {
    /// The numbers of a run started at `start`.
    pub fn starting(start: jiff::Timestamp) -> Self {
        let ms = u64::try_from(start.as_millisecond()).unwrap_or(0);
        Self {
            first: ms.saturating_mul(1000),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The next record's number.
    pub fn next(&self) -> u64 {
        self.first + self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// New users a record holds at most.
const RECORD_USERS: u64 = 50_000;
/// Compressed bytes that make a record due: with the batch then held and the header, a
/// record stays one part of a stored audience ([`crate::audience::MAX_PART_BYTES`]).
pub const RECORD_BYTES: usize = 512 << 10;
/// Bytes of held batches that make a record due (twice as much at most wait: one record in
/// flight, one in the making).
const HELD_BYTES: usize = 4 << 20;
/// How long held batches wait at most before their record is started.
const HELD_FOR: Duration = Duration::from_secs(2);

/// A record being written, and the batches that wait for it.
struct Flight {
    task: JoinHandle<Result<(), String>>,
    batches: Vec<Batch>,
}

/// The read side's pending records in the making, and the batches they hold back. A record
/// is written while the read goes on (at most one at a time); the batches it holds go once
/// it is durable.
pub(super) struct Journal {
    log: Arc<dyn PendingLog>,
    handle: tokio::runtime::Handle,
    header: Header,
    unrecorded: BodyWriter,
    /// A record is owed even without users: it names a new flag (a rename) as stray.
    flag_owed: bool,
    since: Option<Instant>,
    held: Vec<Batch>,
    held_bytes: usize,
    flight: Option<Flight>,
    /// Why a record could not be written; then nothing more is sent.
    pub failed: Option<String>,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("unrecorded", &self.unrecorded.count())
            .field("held", &self.held.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// A journal writing records under `header` (the run's export and flag) through `log`;
    /// with `flag_owed`, its first record is written before any batch goes, users or not (a
    /// run that changes the flag: the new value must be known as stray if the run stops).
    pub(super) fn new(log: Arc<dyn PendingLog>, header: Header, flag_owed: bool) -> Self {
        Self {
            log,
            handle: tokio::runtime::Handle::current(),
            header,
            unrecorded: BodyWriter::new(1),
            flag_owed,
            since: flag_owed.then(Instant::now),
            held: Vec::new(),
            held_bytes: 0,
            flight: None,
            failed: None,
        }
    }

    /// A user new to the audience, about to be put in a batch: recorded before that batch
    /// goes.
    pub(super) fn note(&mut self, id: &str) {
        self.unrecorded.push(id, MemberState::Pending, 0);
        self.since.get_or_insert_with(Instant::now);
    }

    /// Takes a full batch; answers the batches that may go now: this one when nobody in it
    /// waits to be recorded, and those of a record that became durable. After a failure,
    /// everything is answered at once (and must not be sent: see [`Journal::failed`]).
    pub(super) fn admit(&mut self, batch: Batch) -> Vec<Batch> {
        let mut ready = self.landed(false);
        let waits = self.unrecorded.count() > 0 || self.flag_owed || !self.held.is_empty();
        if self.failed.is_some() || !waits {
            ready.push(batch);
            return ready;
        }
        self.held_bytes += batch.body_len();
        self.held.push(batch);
        if self.due() {
            // One record at a time: the previous one lands first.
            ready.extend(self.landed(true));
            self.start();
        }
        ready
    }

    /// At the end of the read: waits for the record in flight, records what is left (unless
    /// the senders are gone: `sending` false) and answers every batch held.
    pub(super) fn drain(&mut self, sending: bool) -> Vec<Batch> {
        let mut ready = self.landed(true);
        if sending && !self.held.is_empty() {
            self.start();
            ready.extend(self.landed(true));
        }
        ready.append(&mut self.held);
        ready
    }

    fn due(&self) -> bool {
        self.unrecorded.count() >= RECORD_USERS
            || self.unrecorded.len_bound() >= RECORD_BYTES
            || self.held_bytes >= HELD_BYTES
            || self.since.is_some_and(|t| t.elapsed() >= HELD_FOR)
    }

    /// Starts writing the record of the users noted so far; the held batches wait for it.
    fn start(&mut self) {
        let batches = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        self.since = None;
        self.flag_owed = false;
        let body = std::mem::replace(&mut self.unrecorded, BodyWriter::new(1));
        let record = Encoded::new(self.header.clone(), body);
        let users = record.header().members;
        let log = Arc::clone(&self.log);
        let started = Instant::now();
        let task = self.handle.spawn(async move {
            let written = log.record(record).await;
            let millis = started.elapsed().as_millis() as u64;
            tracing::debug!(
                users,
                millis,
                ok = written.is_ok(),
                "pending record written"
            );
            written
        });
        self.flight = Some(Flight { task, batches });
    }

    /// The batches of the record in flight once it is durable (`wait`: blocking the read
    /// side's thread until then); none while it is being written.
    fn landed(&mut self, wait: bool) -> Vec<Batch> {
        let Some(flight) = self.flight.take_if(|f| wait || f.task.is_finished()) else {
            return Vec::new();
        };
        let written = self
            .handle
            .block_on(flight.task)
            .unwrap_or_else(|e| Err(format!("the record's writer failed: {e}")));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the pending users: the run stops");
            self.failed.get_or_insert(e);
        }
        flight.batches
    }
}
