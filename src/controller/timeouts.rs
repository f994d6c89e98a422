//! How long the controller waits for the Kubernetes API and for its own tasks, in one place:
//! a hung call must never hold a reconcile slot, a run's end or a deletion for ever.

use std::time::Duration;

/// Longest wait for one read, one status write or one Event.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for loading, discarding or cleaning up a stored audience (a million users: a
/// few MiB). A save's wait grows with its parts: [`audience_save_timeout`].
pub const AUDIENCE_TIMEOUT: Duration = Duration::from_secs(120);
/// What a save of a stored audience may take whatever its size: the reads, the fence, the
/// manifest and the deletions of old parts.
const AUDIENCE_SAVE_BASE: Duration = Duration::from_secs(30);
/// What a save may take for each part it writes (one Secret of up to 1 MiB).
const AUDIENCE_SAVE_PER_PART: Duration = Duration::from_secs(2);
/// The longest a save may take, however many parts: as long as a cleanup; the fence still
/// refuses the manifest switch once the Lease term has ended.
const AUDIENCE_SAVE_MAX: Duration = Duration::from_secs(15 * 60);
/// Longest write of one pending record (the users a run is about to flag): past it, the run
/// stops sending.
pub const PENDING_RECORD_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait before looking at an export again.
pub const MAX_REQUEUE: Duration = Duration::from_secs(3600);
/// How often an export whose run (or cleanup) is in this process is looked at.
pub const RUN_POLL: Duration = Duration::from_secs(2);
/// Wait before looking again at an export whose Secret is missing or unreadable.
pub const SECRET_RETRY: Duration = Duration::from_secs(30);
/// Wait before looking again at an export refused for a flag another export removes (that
/// one may change or go without this one hearing of it).
pub const FLAG_CONFLICT_RETRY: Duration = Duration::from_secs(30);
/// How long a run may wait for a slot before it is shown as `Queued`: a short wait costs no
/// status write and no fresh read (1,000 exports due at once with enough slots).
pub const QUEUE_GRACE: Duration = Duration::from_secs(1);
/// Default bound of one cleanup (`Config::cleanup_timeout`): 15 minutes, as long as a run
/// waits out Braze's rate limit.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Longest wait for giving the Lease up at the end of the election.
pub const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// Look again this soon after a conflict: the object changed under the step.
pub const CONFLICT_REQUEUE: Duration = Duration::from_secs(1);
/// Look again this late after any other reconcile failure.
pub const ERROR_REQUEUE: Duration = Duration::from_secs(15);

/// Longest wait for saving a stored audience of `parts` parts: 30 s, and 2 s a part, up to
/// 15 minutes.
pub fn audience_save_timeout(parts: usize) -> Duration {
    let parts = u32::try_from(parts).unwrap_or(u32::MAX);
    AUDIENCE_SAVE_PER_PART
        .checked_mul(parts)
        .and_then(|p| p.checked_add(AUDIENCE_SAVE_BASE))
        .map_or(AUDIENCE_SAVE_MAX, |t| t.min(AUDIENCE_SAVE_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_save_s_timeout_grows_with_its_parts_up_to_a_cap() {
        let secs = |parts| audience_save_timeout(parts).as_secs();
        assert_eq!(secs(0), 30);
        assert_eq!(secs(1), 32);
        assert_eq!(secs(45), 120);
        assert_eq!(secs(435), 900);
        assert_eq!(secs(436), 900);
        assert_eq!(secs(usize::MAX), 900);
        assert!(audience_save_timeout(10_000) <= CLEANUP_TIMEOUT);
    }
}
