//! A run's deadline (`spec.activeDeadlineSeconds`): however slowly Looker or Braze answer,
//! the run stops when its time is up, the way shutdown stops it (every row still counted
//! once), and then fails with `DeadlineExceeded`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A run's deadline: `stop` is cancelled by the run's own token or when the time is up.
pub(super) struct Deadline {
    /// The run's token: cancelled by shutdown or by the deadline.
    pub stop: CancellationToken,
    passed: Arc<AtomicBool>,
    timer: tokio::task::JoinHandle<()>,
}

impl Deadline {
    /// Starts the clock of a run whose own token is `run`.
    pub fn arm(run: &CancellationToken, after: Duration) -> Self {
        let stop = run.child_token();
        let passed = Arc::new(AtomicBool::new(false));
        let timer = {
            let (stop, passed) = (stop.clone(), Arc::clone(&passed));
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(after) => {
                        tracing::warn!(seconds = after.as_secs(), "the run passed its deadline: stopping it");
                        passed.store(true, Ordering::Relaxed);
                        stop.cancel();
                    }
                }
            })
        };
        Self {
            stop,
            passed,
            timer,
        }
    }

    /// The time was up before the run ended (a shutdown first is not a deadline).
    pub fn passed(&self) -> bool {
        self.passed.load(Ordering::Relaxed)
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.timer.abort();
    }
}
