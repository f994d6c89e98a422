//! How long the controller waits for the Kubernetes API and for its own tasks, in one place:
//! a hung call must never hold a reconcile slot, a run's end or a deletion for ever.

use std::time::Duration;

/// Longest wait for one read, one status write or one Event.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for loading or saving a stored audience (a million users: a few MiB).
pub const AUDIENCE_TIMEOUT: Duration = Duration::from_secs(120);
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
