//! Where the controller keeps the exports' stored audiences, chosen for the whole operator
//! (`--audience-store`): Secrets beside each export ([`super::audience_store`], the default,
//! for small audiences, within a budget per export), or an S3-compatible bucket
//! ([`crate::bucket`], objects under `<prefix>/<export uid>/`). One interface for the run
//! task and the cleanup ([`Place`]), with the same rules either way: a new generation, then
//! the manifest, then the old generation deleted; the fence checked right before the
//! manifest switch; loads that never mix generations and check every checksum.
//!
//! Operator-wide rather than per export: the store decides the operator's rights (the chart
//! grants the Secret write verbs only where Secrets hold audiences) and whose credentials
//! reach the bucket, which an export's author must not choose.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;

use super::audience_store::{self, Fence, StoreError};
use super::pending_store::{self, PendingSecrets};
use super::timeouts::PENDING_RECORD_TIMEOUT;
use crate::audience::Encoded;
use crate::bucket::{AudienceObjects, Bucket, PendingObjects};
use crate::export::PendingLog;
use crate::spec::BrazeExport;
use crate::spill::Scratch;

/// Default budget of an audience kept in Secrets: 8 MiB of encoded audience (a dozen
/// Secrets; about 500,000 random UUIDs, several million sequential identifiers).
pub const DEFAULT_SECRETS_BUDGET: usize = 8 << 20;

/// Where audiences are kept.
#[derive(Clone, Debug)]
pub enum AudienceStore {
    /// Secrets beside each export; a save larger than `budget` bytes is refused.
    Secrets {
        /// Bytes an export's encoded audience may take.
        budget: usize,
    },
    /// An S3-compatible bucket.
    Bucket(Bucket),
}

impl Default for AudienceStore {
    fn default() -> Self {
        Self::Secrets {
            budget: DEFAULT_SECRETS_BUDGET,
        }
    }
}

impl AudienceStore {
    /// Whether audiences (and so finalizers on them) live in Secrets.
    pub fn in_secrets(&self) -> bool {
        matches!(self, Self::Secrets { .. })
    }

    /// Where the audience of `export` is, with `secrets` the Secrets of its namespace; one
    /// loaded from a bucket is kept in a file in `scratch` while a run reads it.
    pub fn place<'a>(
        &'a self,
        secrets: Api<Secret>,
        export: &'a BrazeExport,
        scratch: &'a Scratch,
    ) -> Place<'a> {
        Place {
            store: self,
            secrets,
            export,
            scratch,
        }
    }
}

/// A run's pending records, wherever they go.
pub enum PendingRecords {
    /// Secrets beside the audience.
    Secrets(Arc<PendingSecrets>),
    /// Objects beside the audience.
    Bucket(Arc<PendingObjects>),
}

impl PendingRecords {
    /// The log a run writes with.
    pub fn log(&self) -> Arc<dyn PendingLog> {
        match self {
            Self::Secrets(s) => Arc::clone(s) as Arc<dyn PendingLog>,
            Self::Bucket(b) => Arc::clone(b) as Arc<dyn PendingLog>,
        }
    }

    /// The names of the records written so far.
    pub fn written(&self) -> Vec<String> {
        match self {
            Self::Secrets(s) => s.written(),
            Self::Bucket(b) => b.written(),
        }
    }
}

/// The stored audience of one export.
pub struct Place<'a> {
    store: &'a AudienceStore,
    secrets: Api<Secret>,
    export: &'a BrazeExport,
    scratch: &'a Scratch,
}

impl Place<'_> {
    fn objects(&self, bucket: &Bucket) -> Result<AudienceObjects, StoreError> {
        let uid = self.export.uid().ok_or(StoreError::NoOwner)?;
        Ok(bucket.audience(&uid).with_scratch(self.scratch.clone()))
    }

    /// The stored audience with the pending records of runs that stopped before they saved,
    /// and the records' names (see [`pending_store::load_with_pending`]).
    pub async fn load_with_pending(&self) -> Result<(Option<Encoded>, Vec<String>), StoreError> {
        match self.store {
            AudienceStore::Secrets { .. } => {
                pending_store::load_with_pending(&self.secrets, self.export).await
            }
            AudienceStore::Bucket(b) => Ok(self.objects(b)?.load_with_pending().await?),
        }
    }

    /// Saves `audience`, fenced (see [`audience_store::save_audience`]). In Secrets, an
    /// audience over the budget is refused before anything is written
    /// ([`StoreError::OverBudget`]): the audience in force stays.
    pub async fn save(&self, audience: &Encoded, fence: &Fence) -> Result<(), StoreError> {
        match self.store {
            AudienceStore::Secrets { budget } => {
                let bytes = audience.len_bytes();
                if bytes > *budget {
                    return Err(StoreError::OverBudget {
                        bytes,
                        budget: *budget,
                    });
                }
                audience_store::save_audience(&self.secrets, self.export, audience, fence).await
            }
            AudienceStore::Bucket(b) => {
                let objects = self.objects(b)?;
                let owner = audience_store::owner(self.export)?;
                fence.check(&owner).await?;
                let staged = objects.stage(audience).await?;
                // Right before the switch: a term that ended meanwhile writes no manifest.
                if let Err(e) = fence.check(&owner).await {
                    objects.abandon(staged).await;
                    return Err(e);
                }
                Ok(objects.commit(staged).await?)
            }
        }
    }

    /// Deletes the stored audience on request, fenced (see
    /// [`audience_store::discard_audience`]).
    pub async fn discard(&self, fence: &Fence) -> Result<(), StoreError> {
        match self.store {
            AudienceStore::Secrets { .. } => {
                audience_store::discard_audience(&self.secrets, self.export, fence).await
            }
            AudienceStore::Bucket(b) => {
                let objects = self.objects(b)?;
                fence.check(&audience_store::owner(self.export)?).await?;
                Ok(objects.delete_all().await?)
            }
        }
    }

    /// Deletes the stored audience and its pending records (after a cleanup on delete).
    pub async fn delete(&self) -> Result<(), StoreError> {
        match self.store {
            AudienceStore::Secrets { .. } => {
                audience_store::delete_audience(&self.secrets, self.export).await
            }
            AudienceStore::Bucket(b) => Ok(self.objects(b)?.delete_all().await?),
        }
    }

    /// The pending records of a run started at `now`.
    pub fn pending(&self, now: jiff::Timestamp) -> Result<PendingRecords, StoreError> {
        Ok(match self.store {
            AudienceStore::Secrets { .. } => PendingRecords::Secrets(Arc::new(
                PendingSecrets::new(self.secrets.clone(), self.export, now)?,
            )),
            AudienceStore::Bucket(b) => PendingRecords::Bucket(Arc::new(
                self.objects(b)?.pending_log(now, PENDING_RECORD_TIMEOUT),
            )),
        })
    }

    /// Deletes the records `names` once a save took their users in (failures are logged).
    pub async fn delete_records(&self, names: &[String]) {
        match self.store {
            AudienceStore::Secrets { .. } => {
                pending_store::delete_records(&self.secrets, names).await;
            }
            AudienceStore::Bucket(b) => {
                if let Ok(objects) = self.objects(b) {
                    objects.delete_records(names).await;
                }
            }
        }
    }
}
