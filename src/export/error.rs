//! Why a run fails as a whole ([`RunError`]), each variant with its reason for conditions
//! and metrics.

use super::mapping::ColumnError;
use crate::audience::AudienceError;
use crate::braze::BrazeError;
use crate::looker::LookerError;

/// The reason of a run whose stored audience belongs to another export or identifier type.
pub const AUDIENCE_MISMATCH: &str = "AudienceMismatch";

/// The reason of a run stopped because the users it was about to flag could not be recorded.
pub const PENDING_NOT_RECORDED: &str = "PendingNotRecorded";

/// The reason of a run stopped because its scratch directory failed.
pub const SCRATCH_FAILED: &str = "ScratchFailed";

/// The reason of a run stopped at its deadline, and of the rows it could not send.
pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";

/// Why a run failed as a whole. Each variant has a reason for conditions and metrics.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Looker refused, failed or sent something unreadable.
    #[error(transparent)]
    Looker(#[from] LookerError),
    /// The Look's fields cannot be exported.
    #[error("Look {look_id}: {source}")]
    Columns {
        look_id: String,
        source: ColumnError,
    },
    /// Braze answered in a way that stops the run.
    #[error(transparent)]
    Braze(#[from] BrazeError),
    /// A bug: a task of the pipeline died.
    #[error("internal error: {0}")]
    Internal(String),
    /// `removal: Remove` or `delta: true` without a stored audience.
    #[error(
        "spec.braze.removal: Remove and spec.braze.delta: true need the export's stored audience, and this run has none"
    )]
    AudienceRequired,
    /// The stored audience belongs to another export or identifier type.
    #[error("the stored audience cannot be used: {0}")]
    AudienceMismatch(String),
    /// The stored audience is damaged.
    #[error("the stored audience cannot be read: {0}")]
    AudienceUnreadable(AudienceError),
    /// The users about to be flagged could not be recorded in the stored audience first.
    #[error(
        "the users this run was about to flag could not be recorded in the stored audience first ({0}), so nothing more was sent"
    )]
    PendingNotRecorded(String),
    /// Rows that waited for the end of the Look could not be kept in the scratch directory
    /// (a full disk, an unwritable directory).
    #[error(
        "{0}: the rows that were to wait there for the end of the Look were not sent (give it more room, or another place: run --scratch-dir, the chart's scratch.sizeLimit)"
    )]
    ScratchFailed(String),
    /// The new stored audience could not be written (its members could not be sorted
    /// through the scratch directory, or its file could not be written): the stored
    /// audience is kept.
    #[error(
        "the new stored audience could not be written, so the stored audience is kept: {0} (give the scratch directory more room, or another place: run --scratch-dir, the chart's scratch.sizeLimit)"
    )]
    AudienceNotWritten(AudienceError),
    /// The run took longer than `spec.activeDeadlineSeconds` and was stopped.
    #[error(
        "the run took longer than spec.activeDeadlineSeconds ({seconds} s) and was stopped; raise it if the Look needs longer"
    )]
    DeadlineExceeded { seconds: u64 },
}

impl RunError {
    /// Short CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Looker(e) => e.reason(),
            Self::Columns { source, .. } => source.reason(),
            Self::Braze(e) => e.reason(),
            Self::Internal(_) => "InternalError",
            Self::AudienceRequired => "AudienceRequired",
            Self::AudienceMismatch(_) => AUDIENCE_MISMATCH,
            Self::AudienceUnreadable(AudienceError::Scratch(_)) => SCRATCH_FAILED,
            Self::AudienceUnreadable(_) => "AudienceUnreadable",
            Self::PendingNotRecorded(_) => PENDING_NOT_RECORDED,
            Self::ScratchFailed(_) => SCRATCH_FAILED,
            Self::AudienceNotWritten(AudienceError::Scratch(_)) => SCRATCH_FAILED,
            Self::AudienceNotWritten(_) => super::report::AUDIENCE_NOT_SAVED,
            Self::DeadlineExceeded { .. } => DEADLINE_EXCEEDED,
        }
    }
}
