//! The pending record of a run: users new to the stored audience are recorded (as pending)
//! before any request that flags them is sent, so that whatever stops the run before its
//! audience is saved (a crash, an OOM kill, a lost Lease, a failed save, SIGKILL
//! mid-request), the next run still knows them and removes those who left.
//!
//! Order matters: the read side collects the new users of the batches it fills and holds
//! those batches back; when enough are waiting (or they waited long enough, or the Look
//! ended), it writes one record through the [`PendingLog`] and only then hands the held
//! batches to the senders. A record that cannot be written stops the run: nothing it held
//! is sent.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use crate::audience::codec::BodyWriter;
use crate::audience::{Encoded, Header, MemberState};
use crate::braze::Batch;

/// Where a run's pending records go: Secrets beside the audience in the cluster, a file
/// beside `--state` for `run`. `record` returns once the record is durable.
pub trait PendingLog: Send + Sync + fmt::Debug {
    /// Writes one record (an audience of pending users, under the run's header); says why
    /// not, naming no user.
    fn record(&self, record: Encoded) -> BoxFuture<'_, Result<(), String>>;
}

/// New users a record holds at most.
const RECORD_USERS: u64 = 50_000;
/// Compressed bytes that make a record due: with the batch then held and the header, a
/// record stays one part of a stored audience ([`crate::audience::MAX_PART_BYTES`]).
pub const RECORD_BYTES: usize = 512 << 10;
/// Bytes of held batches that make a record due.
const HELD_BYTES: usize = 8 << 20;
/// How long held batches wait at most for their record.
const HELD_FOR: Duration = Duration::from_secs(2);

/// The read side's pending record in the making, and the batches it holds back.
pub(super) struct Journal {
    log: Arc<dyn PendingLog>,
    handle: tokio::runtime::Handle,
    header: Header,
    unrecorded: BodyWriter,
    since: Option<Instant>,
    held: Vec<Batch>,
    held_bytes: usize,
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
    /// A journal writing records under `header` (the run's export and flag) through `log`.
    pub(super) fn new(log: Arc<dyn PendingLog>, header: Header) -> Self {
        Self {
            log,
            handle: tokio::runtime::Handle::current(),
            header,
            unrecorded: BodyWriter::new(1),
            since: None,
            held: Vec::new(),
            held_bytes: 0,
            failed: None,
        }
    }

    /// A user new to the audience, about to be put in a batch: recorded before that batch
    /// goes.
    pub(super) fn note(&mut self, id: &str) {
        self.unrecorded.push(id, MemberState::Pending, 0);
        self.since.get_or_insert_with(Instant::now);
    }

    /// Takes a full batch: `Some` when it may go now (nobody waits to be recorded), else it
    /// is held until the next record.
    pub(super) fn admit(&mut self, batch: Batch) -> Option<Batch> {
        if self.unrecorded.count() == 0 && self.held.is_empty() {
            return Some(batch);
        }
        self.held_bytes += batch.body_len();
        self.held.push(batch);
        None
    }

    /// Whether the held batches should be recorded and released now.
    pub(super) fn due(&self) -> bool {
        !self.held.is_empty()
            && (self.unrecorded.count() >= RECORD_USERS
                || self.unrecorded.len_bound() >= RECORD_BYTES
                || self.held_bytes >= HELD_BYTES
                || self.since.is_some_and(|t| t.elapsed() >= HELD_FOR))
    }

    /// Writes the record of the users noted so far (blocking the read side's thread until it
    /// is durable) and returns the batches it held, to be sent. After a failure, returns
    /// them too, and [`Journal::failed`] says why: they must not be sent.
    pub(super) fn record(&mut self) -> Vec<Batch> {
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        if self.unrecorded.count() == 0 || self.failed.is_some() {
            return held;
        }
        let body = std::mem::replace(&mut self.unrecorded, BodyWriter::new(1));
        self.since = None;
        let record = Encoded::new(self.header.clone(), body);
        let users = record.header().members;
        let started = Instant::now();
        let written = self.handle.block_on(self.log.record(record));
        match written {
            Ok(()) => tracing::debug!(
                users,
                millis = started.elapsed().as_millis() as u64,
                "pending users recorded"
            ),
            Err(e) => {
                tracing::warn!(users, error = %e, "cannot record the pending users: the run stops");
                self.failed = Some(e);
            }
        }
        held
    }
}
