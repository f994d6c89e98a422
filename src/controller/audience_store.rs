//! An export's stored audience in Secrets (identifiers are personal data: Secrets, never
//! ConfigMaps), owned by the BrazeExport (`ownerReferences`, `controller: true`) so they go
//! when it goes.
//!
//! Layout, for the export `churn-risk` (uid U):
//!
//! - `churn-risk-audience-<g>-<i>`: part i of generation g ([`Encoded::parts`], each under
//!   [`MAX_PART_BYTES`], so under the 1 MiB Secret limit once base64), immutable, labelled
//!   `looker-braze.dev/audience-of: U` and `looker-braze.dev/audience-generation: g`;
//! - `churn-risk-audience`: the manifest, written last: the generation in force, and each
//!   part's name, size and CRC-32;
//! - `churn-risk-audience-pending-<n>`: a pending record of a run (see
//!   [`super::pending_store`]), labelled like the parts (role `pending`, no generation).
//!
//! With `cleanupOnDelete`, every one of them carries the cleanup finalizer: a foreground
//! deletion of the export (`kubectl delete --cascade=foreground`, Argo CD's prune) or of its
//! namespace deletes what the export owns first, and the cleanup still needs to read them.
//! They are let go only by [`delete_audience`] (or [`hold_audience`] with `hold: false`, when
//! the field is turned off).
//!
//! A save first deletes the parts of every generation but the one in force (a failed or
//! crashed save's), then writes a new generation's parts under new names, then replaces the
//! manifest, then deletes the generation it replaced: never more than two generations at
//! once. A crash before the manifest is replaced leaves the old generation in force (the new
//! parts are garbage, deleted at the start of the next save); after it, the new one.
//! Everything but a load reads the Secrets' metadata alone (`PartialObjectMetadata`): a
//! listing never carries the parts' data. A load never mixes parts of two generations: it
//! reads the parts the manifest names, and checks their generation, size and checksum.
//!
//! A save is fenced: it never replaces a manifest labelled with another uid (a deleted
//! namesake's, or another export's), and right before the manifest switch it checks its
//! [`Fence`]: the writer's leadership term has not ended, and the export of that name, read
//! fresh, still has the uid it saves for. So a late save of a run whose term ended (a lost
//! Lease) or whose export was deleted and recreated (`kubectl replace --force`, Argo CD's
//! `Replace=true`) never writes the live audience.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub(super) use super::finalizer::SecretMeta;
use super::finalizer::{self, FINALIZER};
use super::watched::Watched;
use crate::audience::{AudienceError, Encoded, MAX_PART_BYTES};
use crate::spec::BrazeExport;

/// Label holding the owning export's uid.
pub const OWNER_LABEL: &str = "looker-braze.dev/audience-of";
/// Label holding a part's generation.
pub const GENERATION_LABEL: &str = "looker-braze.dev/audience-generation";
/// Label telling the manifest from the parts.
pub const ROLE_LABEL: &str = "looker-braze.dev/audience-role";
const MANIFEST_KEY: &str = "manifest";
pub(super) const PART_KEY: &str = "part";
/// The role of a pending record.
pub(super) const PENDING_ROLE: &str = "pending";

/// Why an audience could not be loaded or saved. Never names a user.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The Kubernetes API refused or failed.
    #[error("the audience Secrets: {}", api_words(.0))]
    Kube(#[from] kube::Error),
    /// The export has no uid (it was not read from the API server).
    #[error("the BrazeExport has no uid or namespace")]
    NoOwner,
    /// The manifest Secret belongs to another object.
    #[error("the Secret {0} is not this export's audience (another owner)")]
    NotOwned(String),
    /// The writer may no longer write this export's audience.
    #[error("the audience was not written: {0}")]
    Fenced(&'static str),
    /// A part is missing or does not match the manifest.
    #[error("the stored audience is damaged: {0}")]
    Damaged(String),
    /// The parts do not form an audience.
    #[error("the stored audience cannot be read: {0}")]
    Audience(#[from] AudienceError),
    /// The audience is larger than the Secrets store's budget: not written.
    #[error(
        "the audience takes {} (encoded), over the {} an export may keep in Secrets (--audience-secrets-budget-mib); the previous audience is kept. Keep audiences in an S3-compatible bucket instead: the operator's --audience-store s3://BUCKET/PREFIX (the chart's audienceStore.type: Bucket)",
        mib(*.bytes), mib(*.budget)
    )]
    OverBudget {
        /// The encoded audience's size.
        bytes: usize,
        /// The budget.
        budget: usize,
    },
    /// The bucket refused or failed.
    #[error(transparent)]
    Bucket(#[from] crate::bucket::BucketError),
}

impl StoreError {
    /// Condition-style reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "AudienceStoreUnavailable",
            Self::NoOwner | Self::NotOwned(_) => "AudienceNotOwned",
            Self::Fenced(_) => "AudienceFenced",
            Self::Damaged(_) | Self::Audience(_) => "AudienceDamaged",
            Self::OverBudget { .. } => "AudienceOverBudget",
            Self::Bucket(b) => b.reason(),
        }
    }

    /// Not to be mended by waiting: the way back is to discard the stored audience.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Self::NotOwned(_)
                | Self::Damaged(_)
                | Self::Audience(_)
                | Self::Bucket(
                    crate::bucket::BucketError::Damaged(_)
                        | crate::bucket::BucketError::Audience(_)
                )
        )
    }
}

/// Bytes in MiB with one decimal (KiB under 1 MiB).
fn mib(bytes: usize) -> String {
    if bytes < 1 << 20 {
        return format!("{} KiB", bytes.div_ceil(1 << 10));
    }
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// What the API server said, in its own words (a refusal's message, not the whole status).
fn api_words(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        other => other.to_string(),
    }
}

/// What a write of the audience checks first and right before the manifest switch.
pub struct Fence {
    /// The writer's leadership: cancelled when its Lease is lost.
    term: CancellationToken,
    /// The exports of the namespace, to read the export's uid again; `None`: not read.
    exports: Option<Api<Watched>>,
}

impl Fence {
    /// The fence of a controller's run: `term` cancelled when its leadership is lost, and
    /// the export read again from `exports` (the exports of its namespace).
    pub fn new(term: CancellationToken, exports: Api<Watched>) -> Self {
        Self {
            term,
            exports: Some(exports),
        }
    }

    /// Only the `term` (the export's uid is not read again; the manifest's owner still is).
    pub fn term_only(term: CancellationToken) -> Self {
        Self {
            term,
            exports: None,
        }
    }

    /// Whether an export of the namespace has `uid` now (`true` when the fence reads no
    /// exports: then nothing of another owner is touched).
    async fn is_live(&self, uid: &str) -> Result<bool, StoreError> {
        let Some(exports) = &self.exports else {
            return Ok(true);
        };
        let all = exports.list(&ListParams::default()).await?;
        Ok(all.items.iter().any(|e| e.uid().as_deref() == Some(uid)))
    }

    /// `Ok` while `o` may still write: its term goes on and its export is the live one.
    pub(super) async fn check(&self, o: &SecretOwner) -> Result<(), StoreError> {
        if self.term.is_cancelled() {
            return Err(StoreError::Fenced("this instance's leadership term ended"));
        }
        let Some(exports) = &self.exports else {
            return Ok(());
        };
        let uid = match exports.get_opt(&o.name).await? {
            Some(Watched::Decoded(e)) => e.metadata.uid,
            Some(Watched::Undecodable(u)) => u.metadata.uid,
            None => None,
        };
        if uid.as_deref() != Some(o.uid.as_str()) {
            return Err(StoreError::Fenced("the export was deleted or recreated"));
        }
        // Read again after the read: the term may have ended while it waited.
        if self.term.is_cancelled() {
            return Err(StoreError::Fenced("this instance's leadership term ended"));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    version: u32,
    generation: u64,
    members: u64,
    parts: Vec<PartRef>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PartRef {
    name: String,
    bytes: usize,
    crc32: u32,
}

/// The manifest's name: `<export>-audience` (a long export name is shortened, with a hash).
pub fn manifest_name(export: &str) -> String {
    format!("{}-audience", short(export))
}

/// The name of pending record `n`.
pub(super) fn pending_name(export: &str, n: u64) -> String {
    format!("{}-audience-pending-{n:020}", short(export))
}

fn part_name(export: &str, generation: u64, index: usize) -> String {
    format!("{}-audience-{generation}-{index}", short(export))
}

/// Export names up to 200 characters as they are; longer ones cut, with a hash of the whole.
fn short(name: &str) -> String {
    if name.len() <= 200 {
        return name.to_owned();
    }
    let cut: String = name.chars().take(180).collect();
    let cut = cut.trim_end_matches(['-', '.']);
    format!("{cut}-{:08x}", crc32fast::hash(name.as_bytes()))
}

/// The export that owns the Secrets, as they record it.
pub(super) struct SecretOwner {
    pub(super) name: String,
    pub(super) uid: String,
    reference: OwnerReference,
    /// The export wants a cleanup on delete: its Secrets carry the finalizer.
    hold: bool,
}

pub(super) fn owner(export: &BrazeExport) -> Result<SecretOwner, StoreError> {
    let uid = export.meta().uid.clone().ok_or(StoreError::NoOwner)?;
    let name = export.name_any();
    let reference = OwnerReference {
        api_version: crate::spec::API_VERSION.into(),
        kind: crate::spec::KIND.into(),
        name: name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    Ok(SecretOwner {
        name,
        uid,
        reference,
        hold: finalizer::wanted(export),
    })
}

fn labels(o: &SecretOwner, role: &str, generation: Option<u64>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "braze-export-operator".to_owned(),
        ),
        (OWNER_LABEL.to_owned(), o.uid.clone()),
        (ROLE_LABEL.to_owned(), role.to_owned()),
    ]);
    if let Some(g) = generation {
        l.insert(GENERATION_LABEL.to_owned(), g.to_string());
    }
    l
}

pub(super) fn secret(
    o: &SecretOwner,
    name: String,
    role: &str,
    generation: Option<u64>,
    key: &str,
    bytes: Vec<u8>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(labels(o, role, generation)),
            owner_references: Some(vec![o.reference.clone()]),
            finalizers: o.hold.then(|| vec![FINALIZER.to_owned()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        immutable: generation.map(|_| true),
        data: Some(BTreeMap::from([(key.to_owned(), ByteString(bytes))])),
        ..Secret::default()
    }
}

/// Loads the export's stored audience from `api` (Secrets in the export's namespace):
/// `None` when there is none yet.
pub async fn load_audience(
    api: &Api<Secret>,
    export: &BrazeExport,
) -> Result<Option<Encoded>, StoreError> {
    let o = owner(export)?;
    let name = manifest_name(&o.name);
    let Some(manifest) = api.get_opt(&name).await? else {
        return Ok(None);
    };
    if manifest.labels().get(OWNER_LABEL) != Some(&o.uid) {
        return Err(StoreError::NotOwned(name));
    }
    let m: Manifest = data(&manifest, MANIFEST_KEY)
        .and_then(|b| serde_json::from_slice(b).ok())
        .ok_or_else(|| StoreError::Damaged(format!("the manifest {name} is unreadable")))?;
    let mut parts = Vec::with_capacity(m.parts.len());
    for p in &m.parts {
        let s = api
            .get_opt(&p.name)
            .await?
            .ok_or_else(|| StoreError::Damaged(format!("the part {} is missing", p.name)))?;
        let generation = s.labels().get(GENERATION_LABEL).cloned();
        if s.labels().get(OWNER_LABEL) != Some(&o.uid)
            || generation != Some(m.generation.to_string())
        {
            return Err(StoreError::Damaged(format!(
                "the part {} is not of generation {}",
                p.name, m.generation
            )));
        }
        let bytes = data(&s, PART_KEY)
            .ok_or_else(|| StoreError::Damaged(format!("the part {} has no data", p.name)))?;
        if bytes.len() != p.bytes || crc32fast::hash(bytes) != p.crc32 {
            return Err(StoreError::Damaged(format!(
                "the part {} does not match its checksum",
                p.name
            )));
        }
        parts.push(bytes.to_vec());
    }
    let encoded = Encoded::from_parts(parts)?;
    if encoded.header().members != m.members {
        return Err(StoreError::Damaged(
            "the manifest and the audience disagree on its size".into(),
        ));
    }
    Ok(Some(encoded))
}

pub(super) fn data<'a>(s: &'a Secret, key: &str) -> Option<&'a [u8]> {
    s.data.as_ref()?.get(key).map(|b| b.0.as_slice())
}

/// Saves `audience` as the export's stored audience: the parts of a failed save deleted (a
/// failure to delete one fails the save: never three generations at once), a new generation
/// of parts, then the manifest, then the replaced generation deleted (see the module's header
/// for why a crash never mixes generations). A manifest of another owner is never replaced
/// ([`StoreError::NotOwned`]), and `fence` is checked first and right before the manifest
/// switch ([`StoreError::Fenced`]: the new parts are deleted again, the audience in force
/// stays).
pub async fn save_audience(
    api: &Api<Secret>,
    export: &BrazeExport,
    audience: &Encoded,
    fence: &Fence,
) -> Result<(), StoreError> {
    let o = owner(export)?;
    fence.check(&o).await?;
    let existing = owned(api, &o.uid).await?;
    let manifest_name = manifest_name(&o.name);
    let current = api.get_opt(&manifest_name).await?;
    // Replaced on its resourceVersion below: it cannot change owner in between.
    if let Some(c) = &current
        && c.labels().get(OWNER_LABEL) != Some(&o.uid)
    {
        return Err(StoreError::NotOwned(manifest_name));
    }
    let in_force = current
        .as_ref()
        .and_then(|m| data(m, MANIFEST_KEY))
        .and_then(|b| serde_json::from_slice::<Manifest>(b).ok())
        .map_or(0, |m| m.generation);
    // Above every generation seen, finished or not: a crashed save's parts are never reused.
    let generation = existing
        .iter()
        .filter_map(generation_of)
        .chain([in_force])
        .max()
        .unwrap_or(0)
        + 1;
    let existing = discard_unused(api, existing, in_force).await?;
    let parts = write_parts(api, &o, generation, audience).await?;
    if let Err(e) = fence.check(&o).await {
        discard_parts(api, &parts).await;
        return Err(e);
    }
    let manifest = Manifest {
        version: 1,
        generation,
        members: audience.header().members,
        parts,
    };
    // The switch to the new generation: one write.
    write_manifest(api, &o, current, &manifest).await?;
    for old in existing {
        if generation_of(&old).is_some_and(|g| g != generation) {
            let name = old.name_any();
            if let Err(e) = discard(api, &old).await {
                // Harmless: the next save deletes it.
                tracing::warn!(secret = %name, error = %e, "cannot delete an old audience part");
            }
        }
    }
    Ok(())
}

/// Deletes the parts of every generation but the one in force (a failed save's), before a
/// save writes its own: never three generations at once. Answers the Secrets kept.
async fn discard_unused(
    api: &Api<Secret>,
    existing: Vec<SecretMeta>,
    in_force: u64,
) -> Result<Vec<SecretMeta>, StoreError> {
    let mut kept = Vec::with_capacity(existing.len());
    for s in existing {
        match generation_of(&s) {
            Some(g) if g != in_force => discard(api, &s).await?,
            _ => kept.push(s),
        }
    }
    Ok(kept)
}

/// Deletes the parts a refused save wrote; a failure is only logged (the next save, or the
/// garbage collector, deletes them).
async fn discard_parts(api: &Api<Secret>, parts: &[PartRef]) {
    for p in parts {
        let gone = match api.get_metadata_opt(&p.name).await {
            Ok(Some(s)) => discard(api, &s).await,
            other => other.map(drop),
        };
        if let Err(e) = gone {
            tracing::warn!(secret = %p.name, error = %e, "cannot delete an unused audience part");
        }
    }
}

fn generation_of(s: &SecretMeta) -> Option<u64> {
    s.labels()
        .get(GENERATION_LABEL)
        .and_then(|g| g.parse::<u64>().ok())
}

/// Creates the parts of `generation`; what the manifest says of them.
async fn write_parts(
    api: &Api<Secret>,
    o: &SecretOwner,
    generation: u64,
    audience: &Encoded,
) -> Result<Vec<PartRef>, StoreError> {
    let mut refs = Vec::with_capacity(audience.parts().len());
    for (i, part) in audience.parts().iter().enumerate() {
        debug_assert!(part.len() <= MAX_PART_BYTES);
        let name = part_name(&o.name, generation, i);
        let s = secret(
            o,
            name.clone(),
            "part",
            Some(generation),
            PART_KEY,
            part.clone(),
        );
        api.create(&PostParams::default(), &s).await?;
        refs.push(PartRef {
            name,
            bytes: part.len(),
            crc32: crc32fast::hash(part),
        });
    }
    Ok(refs)
}

/// Creates the manifest, or replaces `current` (on its `resourceVersion`).
async fn write_manifest(
    api: &Api<Secret>,
    o: &SecretOwner,
    current: Option<Secret>,
    manifest: &Manifest,
) -> Result<(), StoreError> {
    let name = manifest_name(&o.name);
    let body = serde_json::to_vec(manifest).unwrap_or_default();
    let mut m = secret(o, name.clone(), "manifest", None, MANIFEST_KEY, body);
    match current {
        Some(c) => {
            m.metadata.resource_version = c.resource_version();
            api.replace(&name, &PostParams::default(), &m).await?;
        }
        None => {
            api.create(&PostParams::default(), &m).await?;
        }
    }
    Ok(())
}

/// Deletes the export's stored audience (after a cleanup on delete, or to start afresh). Goes
/// through every Secret before it answers the first failure: none is left held for nothing.
pub async fn delete_audience(api: &Api<Secret>, export: &BrazeExport) -> Result<(), StoreError> {
    let o = owner(export)?;
    let mut first_error = None;
    for s in owned(api, &o.uid).await? {
        if let Err(e) = discard(api, &s).await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), |e| Err(e.into()))
}

/// Deletes the export's stored audience to start afresh (`looker-braze.dev/discard-audience`):
/// its own Secrets, and a manifest of its name left by another owner (a deleted namesake's,
/// which it could neither read nor replace) with that owner's parts. Checks `fence` first.
pub async fn discard_audience(
    api: &Api<Secret>,
    export: &BrazeExport,
    fence: &Fence,
) -> Result<(), StoreError> {
    let o = owner(export)?;
    fence.check(&o).await?;
    delete_audience(api, export).await?;
    if let Some(m) = api.get_metadata_opt(&manifest_name(&o.name)).await? {
        // With the parts of its owner (their names would collide with the new ones'), unless
        // that owner is a live export: a label names it, and a label proves nothing.
        if let Some(uid) = m.labels().get(OWNER_LABEL)
            && !fence.is_live(uid).await?
        {
            for s in owned(api, uid).await? {
                discard(api, &s).await?;
            }
        }
        discard(api, &m).await?;
    }
    Ok(())
}

/// Takes the cleanup finalizer off (`hold: false`; `cleanupOnDelete` turned off, or an export
/// deleted without a cleanup: they go with the export again) or puts it on (`hold: true`;
/// `cleanupOnDelete` turned on) the audience Secrets of the export `uid`.
pub async fn hold_audience(api: &Api<Secret>, uid: &str, hold: bool) -> Result<(), StoreError> {
    let mut first_error = None;
    // Pending records are never held (see `pending_store`): a hold put on now would only
    // have to be taken off again.
    let held = owned(api, uid)
        .await?
        .into_iter()
        .filter(|s| !hold || s.labels().get(ROLE_LABEL).map(String::as_str) != Some(PENDING_ROLE));
    for s in held {
        if let Err(e) = finalizer::set_on_secret(api, &s, hold).await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), |e| Err(e.into()))
}

/// Every audience Secret of the export `uid`, by its metadata alone (the parts' data, MiBs,
/// stays in the API server).
pub(super) async fn owned(api: &Api<Secret>, uid: &str) -> Result<Vec<SecretMeta>, StoreError> {
    let lp = ListParams::default().labels(&format!("{OWNER_LABEL}={uid}"));
    Ok(api.list_metadata(&lp).await?.items)
}

/// Lets `s` go, then deletes it.
pub(super) async fn discard(api: &Api<Secret>, s: &SecretMeta) -> Result<(), kube::Error> {
    finalizer::set_on_secret(api, s, false).await?;
    match api.delete(&s.name_any(), &DeleteParams::default()).await {
        Err(kube::Error::Api(e)) if e.is_not_found() => Ok(()),
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_valid_for_long_exports() {
        assert_eq!(manifest_name("churn-risk"), "churn-risk-audience");
        assert_eq!(part_name("churn-risk", 3, 0), "churn-risk-audience-3-0");
        let long = format!("{}.{}", "a".repeat(179), "b".repeat(100));
        let m = manifest_name(&long);
        assert!(m.len() <= 253, "{}", m.len());
        assert!(!m.contains(".-"), "{m}");
        assert_ne!(manifest_name(&format!("{long}x")), m);
    }
}
