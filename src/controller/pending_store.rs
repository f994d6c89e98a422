//! A run's pending records in the cluster: Secrets `<export>-audience-pending-<n>` beside the
//! stored audience ([`super::audience_store`]), owned and labelled like its parts (role
//! `pending`), holding the users a run was about to flag for the first time, written before
//! it sent them (see [`crate::export::pending`]).
//!
//! A load reads them with the audience ([`load_with_pending`]). A save that went through
//! deletes exactly the records that load read and those the run wrote ([`delete_records`]),
//! never one written meanwhile by another writer (a pod that lost its Lease and does not know
//! it yet): its users are in no saved audience.
//!
//! Unlike the audience's parts, records never carry the cleanup finalizer: they live for one
//! run (or until the next, after a crash), and a finalizer the operator could not take off
//! again (a crash between a save and the deletion, a Role that lets it patch only the
//! audience's names) would hold a namespace deletion for ever. So a foreground deletion may
//! delete a crashed run's records before the cleanup reads them; a run in progress is stopped
//! and saves whom it flagged first.

use std::sync::Mutex;

use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use super::audience_store::{
    self, OWNER_LABEL, PART_KEY, PENDING_ROLE, ROLE_LABEL, SecretOwner, StoreError,
};
use super::retry::{self, retry};
use super::timeouts::PENDING_RECORD_TIMEOUT;
use crate::audience::Encoded;
use crate::export::PendingLog;
use crate::export::pending::RecordNumbers;
use crate::spec::BrazeExport;

/// The export's stored audience with the pending records of its runs that stopped before
/// they saved ([`Encoded::with_pending`]; `None` when there is neither), and the records'
/// names.
pub async fn load_with_pending(
    api: &Api<Secret>,
    export: &BrazeExport,
) -> Result<(Option<Encoded>, Vec<String>), StoreError> {
    let main = audience_store::load_audience(api, export).await?;
    let (names, records) = load_pending(api, export).await?.into_iter().unzip();
    let merged = Encoded::with_pending(main, records).map_err(StoreError::Damaged)?;
    Ok((merged, names))
}

/// The pending records of the export, oldest first, each checked whole, with their names.
pub async fn load_pending(
    api: &Api<Secret>,
    export: &BrazeExport,
) -> Result<Vec<(String, Encoded)>, StoreError> {
    let o = audience_store::owner(export)?;
    let mut names: Vec<String> = audience_store::owned(api, &o.uid)
        .await?
        .iter()
        .filter(|s| s.labels().get(ROLE_LABEL).map(String::as_str) == Some(PENDING_ROLE))
        .map(ResourceExt::name_any)
        .collect();
    names.sort();
    let mut records = Vec::with_capacity(names.len());
    for name in names {
        // Deleted meanwhile: a save of this export took it in.
        let Some(s) = api.get_opt(&name).await? else {
            continue;
        };
        if s.labels().get(OWNER_LABEL) != Some(&o.uid) {
            continue;
        }
        let bytes = audience_store::data(&s, PART_KEY)
            .ok_or_else(|| StoreError::Damaged(format!("the pending record {name} has no data")))?;
        let record = Encoded::from_bytes(bytes.to_vec())?;
        record.verify()?;
        records.push((name, record));
    }
    Ok(records)
}

/// Deletes the records `names` (those a load read and a run wrote, once a save took their
/// users in); a failure is only logged: the next load reads them again, which is harmless.
pub async fn delete_records(api: &Api<Secret>, names: &[String]) {
    for name in names {
        let gone = match api.get_metadata_opt(name).await {
            Ok(Some(s)) => audience_store::discard(api, &s).await,
            other => other.map(drop),
        };
        if let Err(e) = gone {
            tracing::warn!(secret = %name, error = %e, "cannot delete a pending record");
        }
    }
}

/// Writes a run's pending records as Secrets beside the export's audience.
pub struct PendingSecrets {
    api: Api<Secret>,
    owner: SecretOwner,
    numbers: RecordNumbers,
    written: Mutex<Vec<String>>,
}

impl std::fmt::Debug for PendingSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSecrets")
            .field("export", &self.owner.name)
            .finish_non_exhaustive()
    }
}

impl PendingSecrets {
    /// The records of a run of `export` started at `now`.
    pub fn new(
        api: Api<Secret>,
        export: &BrazeExport,
        now: jiff::Timestamp,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            api,
            owner: audience_store::owner(export)?,
            numbers: RecordNumbers::starting(now),
            written: Mutex::default(),
        })
    }

    /// The names of the records written so far.
    pub fn written(&self) -> Vec<String> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Creates the record's Secret; a conflict (an earlier try that landed), a throttle or
    /// a server error is tried again.
    async fn create(&self, record: Encoded) -> Result<(), StoreError> {
        let mut parts = record.into_parts();
        let (Some(bytes), true) = (parts.pop(), parts.is_empty()) else {
            return Err(StoreError::Damaged(
                "a pending record larger than one part".into(),
            ));
        };
        let name = audience_store::pending_name(&self.owner.name, self.numbers.next());
        let mut s = audience_store::secret(
            &self.owner,
            name.clone(),
            PENDING_ROLE,
            None,
            PART_KEY,
            bytes,
        );
        s.immutable = Some(true);
        // Never held: see the module's header.
        s.metadata.finalizers = None;
        let attempt = |_| async {
            match self.api.create(&PostParams::default(), &s).await {
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                other => other.map(drop),
            }
        };
        let transient =
            |e: &kube::Error, _| matches!(e, kube::Error::Api(s) if s.code == 429 || s.code >= 500);
        retry(retry::PENDING_RECORD, attempt, transient).await?;
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name);
        Ok(())
    }
}

impl PendingLog for PendingSecrets {
    fn record(&self, record: Encoded) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            match tokio::time::timeout(PENDING_RECORD_TIMEOUT, self.create(record)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "the pending record was not written within {} s",
                    PENDING_RECORD_TIMEOUT.as_secs()
                )),
            }
        })
    }
}
