//! `run --state FILE`: the run's pending records as files beside the state file
//! (`FILE.pending-N`, see [`crate::audience::file`]), each written whole and flushed to disk
//! before the users it holds are sent.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;

use crate::audience::{self, Encoded};
use crate::export::PendingLog;

/// Writes pending records beside a state file.
#[derive(Debug)]
pub struct PendingFiles {
    state: PathBuf,
    /// Numbers records after the run's start, so that names sort as records were written.
    first: u64,
    written: AtomicU64,
}

impl PendingFiles {
    /// Records beside the state file `state`.
    pub fn new(state: PathBuf) -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            state,
            first: ms.saturating_mul(1000),
            written: AtomicU64::new(0),
        }
    }
}

impl PendingLog for PendingFiles {
    fn record(&self, record: Encoded) -> BoxFuture<'_, Result<(), String>> {
        let n = self.first + self.written.fetch_add(1, Ordering::Relaxed);
        let path = audience::pending_path(&self.state, n);
        Box::pin(async move {
            let shown = path.display().to_string();
            tokio::task::spawn_blocking(move || audience::write_file(&path, &record))
                .await
                .map_err(|e| format!("writing {shown} failed: {e}"))?
                .map_err(|e| format!("cannot write {shown}: {e}"))
        })
    }
}
