//! `run --state FILE`: the run's pending records as files beside the state file
//! (`FILE.pending-N`, see [`crate::audience::file`]), each written whole and flushed to disk
//! before the users it holds are sent.

use std::path::PathBuf;
use std::sync::Mutex;

use futures_util::future::BoxFuture;

use crate::audience::{self, Encoded};
use crate::export::PendingLog;
use crate::export::pending::RecordNumbers;

/// Writes pending records beside a state file.
#[derive(Debug)]
pub struct PendingFiles {
    state: PathBuf,
    numbers: RecordNumbers,
    written: Mutex<Vec<PathBuf>>,
}

impl PendingFiles {
    /// Records beside the state file `state`.
    pub fn new(state: PathBuf) -> Self {
        Self {
            state,
            numbers: RecordNumbers::starting(jiff::Timestamp::now()),
            written: Mutex::default(),
        }
    }

    /// The records written so far.
    pub fn written(&self) -> Vec<PathBuf> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl PendingLog for PendingFiles {
    fn record(&self, record: Encoded) -> BoxFuture<'_, Result<(), String>> {
        let path = audience::pending_path(&self.state, self.numbers.next());
        Box::pin(async move {
            let shown = path.display().to_string();
            let target = path.clone();
            tokio::task::spawn_blocking(move || audience::write_file(&target, &record))
                .await
                .map_err(|e| format!("writing {shown} failed: {e}"))?
                .map_err(|e| format!("cannot write {shown}: {e}"))?;
            self.written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(path);
            Ok(())
        })
    }
}
