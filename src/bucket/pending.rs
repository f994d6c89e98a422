//! A run's pending records in the bucket: `D/pending-<n>` beside the audience's objects
//! (see [`super::objects`]), each one small object written whole before the users it holds
//! are sent (see [`crate::export::pending`]). A save that went through deletes the records
//! its load read and those its run wrote, never one written meanwhile by another writer.

use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::BoxFuture;
use object_store::{ObjectStoreExt, PutPayload};

use super::objects::PENDING_PREFIX;
use super::{AudienceObjects, BucketError};
use crate::audience::Encoded;
use crate::export::PendingLog;
use crate::export::pending::RecordNumbers;

impl AudienceObjects {
    /// The pending records, oldest first, each checked whole, with their names.
    pub async fn load_pending(&self) -> Result<Vec<(String, Encoded)>, BucketError> {
        let mut records = Vec::new();
        for (name, path) in self.list().await? {
            if !is_record(&name) {
                continue;
            }
            // Deleted meanwhile: a save took it in.
            let Some(bytes) = self.read_whole(&path).await? else {
                continue;
            };
            let record = Encoded::from_bytes(bytes)?;
            record.verify()?;
            records.push((name, record));
        }
        Ok(records)
    }

    /// The stored audience with the pending records of runs that stopped before they saved
    /// ([`Encoded::with_pending`]), and the records' names.
    pub async fn load_with_pending(&self) -> Result<(Option<Encoded>, Vec<String>), BucketError> {
        let main = self.load().await?;
        let (names, records) = self.load_pending().await?.into_iter().unzip();
        let merged = Encoded::with_pending(main, records).map_err(BucketError::Damaged)?;
        Ok((merged, names))
    }

    /// Deletes the records `names`; a failure is only logged (the next load reads them
    /// again, which is harmless).
    pub async fn delete_records(&self, names: &[String]) {
        for name in names {
            if let Err(e) = self.delete(&self.path(name)).await {
                tracing::warn!(error = %e, "cannot delete a pending record");
            }
        }
    }

    /// A log writing a run's records beside this audience, numbered after `now`; a record
    /// not written within `limit` fails (then the run stops sending).
    pub fn pending_log(&self, now: jiff::Timestamp, limit: Duration) -> PendingObjects {
        PendingObjects {
            objects: self.clone(),
            numbers: RecordNumbers::starting(now),
            written: Mutex::default(),
            limit,
        }
    }
}

fn is_record(name: &str) -> bool {
    name.strip_prefix(PENDING_PREFIX)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Writes a run's pending records as objects beside its audience.
#[derive(Debug)]
pub struct PendingObjects {
    objects: AudienceObjects,
    numbers: RecordNumbers,
    written: Mutex<Vec<String>>,
    limit: Duration,
}

impl PendingObjects {
    /// The names of the records written so far.
    pub fn written(&self) -> Vec<String> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn put(&self, record: Encoded) -> Result<(), BucketError> {
        let name = format!("{PENDING_PREFIX}{:020}", self.numbers.next());
        let path = self.objects.path(&name);
        // One part (a record stays under one): a single PUT.
        let payload: PutPayload = record
            .into_parts()
            .into_iter()
            .map(bytes::Bytes::from)
            .collect();
        self.objects
            .bucket
            .store()
            .put(&path, payload)
            .await
            .map_err(self.objects.failed("write", &path))?;
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name);
        Ok(())
    }
}

impl PendingLog for PendingObjects {
    fn record(&self, record: Encoded) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match tokio::time::timeout(self.limit, self.put(record)).await {
                Ok(written) => written.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "the pending record was not written to {} within {} s",
                    self.objects.shown(),
                    self.limit.as_secs()
                )),
            }
        })
    }
}
