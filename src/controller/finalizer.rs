//! The cleanup finalizer, `looker-braze.dev/cleanup`: whether an export wants it, the patch
//! that puts it on an object or takes it off (exports, their audience Secrets and their Braze
//! key Secret alike), and its release from a deleted export.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::error::Error;
use super::retry::{self, retry};
use super::timeouts::API_TIMEOUT;
use super::watched::Watched;
use crate::spec::{BrazeExport, RemovalMode};

/// The finalizer's name.
pub const FINALIZER: &str = "looker-braze.dev/cleanup";

/// Whether the export asks for a cleanup on delete (the CRD's rule makes `cleanupOnDelete`
/// need `removal: Remove`; checked again here).
pub fn wanted(export: &BrazeExport) -> bool {
    export.spec.cleanup_on_delete && export.spec.braze.removal == RemovalMode::Remove
}

/// Whether the export wants the finalizer where its audience lives: for a cleanup on delete
/// ([`wanted`]), or (`bucket`) because it keeps an audience in a bucket, where no garbage
/// collector deletes it with the export (Secrets go with their owner): the operator deletes
/// its objects before it lets the export go.
pub fn wanted_in(export: &BrazeExport, bucket: bool) -> bool {
    let braze = &export.spec.braze;
    wanted(export) || (bucket && (braze.removal == RemovalMode::Remove || braze.delta))
}

/// Whether the export holds the finalizer.
pub fn held(export: &BrazeExport) -> bool {
    export.finalizers().iter().any(|f| f == FINALIZER)
}

/// The merge patch that puts [`FINALIZER`] in `current` (`hold`) or takes it out, keeping
/// the other finalizers; written only on `resource_version` (and `uid`), so a finalizer
/// added meanwhile by someone else is never lost.
pub fn finalizer_patch(
    current: &[String],
    hold: bool,
    resource_version: Option<String>,
    uid: Option<&str>,
) -> serde_json::Value {
    let mut list: Vec<&str> = current
        .iter()
        .map(String::as_str)
        .filter(|f| *f != FINALIZER)
        .collect();
    if hold {
        list.push(FINALIZER);
    }
    let mut metadata = json!({"finalizers": list, "resourceVersion": resource_version});
    if let Some(uid) = uid {
        metadata["uid"] = json!(uid);
    }
    json!({ "metadata": metadata })
}

/// A Secret's metadata alone, as a metadata-only list or read answers it.
pub type SecretMeta = PartialObjectMeta<Secret>;

/// Puts the finalizer on the Secret `s` or takes it off ([`finalizer_patch`]; read again
/// after a conflict). A Secret being deleted gets no new finalizer; one gone is let go.
pub async fn set_on_secret(
    api: &Api<Secret>,
    s: &SecretMeta,
    hold: bool,
) -> Result<(), kube::Error> {
    let name = s.name_any();
    let current = std::sync::Mutex::new(Some(s.clone()));
    let attempt = |_| async {
        let Some(now) = current.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let has = now.finalizers().iter().any(|f| f == FINALIZER);
        if has == hold || (hold && now.metadata.deletion_timestamp.is_some()) {
            return Ok(());
        }
        let patch = finalizer_patch(now.finalizers(), hold, now.resource_version(), None);
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.is_not_found() => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Tried again on the fresh object; gone is as good as let go.
                let fresh = api.get_metadata_opt(&name).await?;
                *current.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                Err(kube::Error::Api(e))
            }
            other => other.map(|_| ()),
        }
    };
    let conflict = |e: &kube::Error, _| matches!(e, kube::Error::Api(s) if s.code == 409);
    retry(retry::SECRET_CONFLICT, attempt, conflict).await
}

/// Puts the finalizer on `export` (`hold`) or takes it off, on the version it shows.
pub async fn set_on_export(
    api: &Api<Watched>,
    export: &BrazeExport,
    hold: bool,
) -> Result<(), Error> {
    let patch = finalizer_patch(
        export.finalizers(),
        hold,
        export.resource_version(),
        export.uid().as_deref(),
    );
    tokio::time::timeout(
        API_TIMEOUT,
        api.patch(
            &export.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ),
    )
    .await
    .map_err(|_| Error::Timeout("writing the export's finalizers"))??;
    Ok(())
}

/// Removes the finalizer from the export `uid` as it is now (re-read after a conflict);
/// done when it is gone, or when the name now belongs to a recreated export.
pub async fn release(api: &Api<Watched>, name: &str, uid: &str) -> Result<(), Error> {
    let attempt = |_| async {
        let Some(fresh) = holding(api, name, uid).await? else {
            return Ok(());
        };
        let current = fresh.meta().finalizers.as_deref().unwrap_or_default();
        let patch = finalizer_patch(current, false, fresh.resource_version(), Some(uid));
        let patched = tokio::time::timeout(
            API_TIMEOUT,
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map_err(|_| Error::Timeout("removing the finalizer"))?
        .map_err(Error::from_kube);
        match patched {
            Ok(_) | Err(Error::Gone) => Ok(()),
            Err(e) => Err(e),
        }
    };
    retry(retry::FINALIZER_CONFLICT, attempt, |e, _| {
        matches!(e, Error::Conflict(_))
    })
    .await
}

/// The export `uid` as it is now, if it still holds the finalizer.
pub async fn holding(api: &Api<Watched>, name: &str, uid: &str) -> Result<Option<Watched>, Error> {
    let fresh = tokio::time::timeout(API_TIMEOUT, api.get_opt(name))
        .await
        .map_err(|_| Error::Timeout("reading the export"))??;
    Ok(fresh.filter(|f| {
        f.uid().as_deref() == Some(uid)
            && f.meta().finalizers.iter().flatten().any(|x| x == FINALIZER)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finalizer_patch_keeps_other_finalizers() {
        let others = vec!["example.com/keep".to_owned()];
        assert_eq!(
            finalizer_patch(&others, true, Some("7".into()), Some("u")),
            json!({"metadata": {"finalizers": ["example.com/keep", FINALIZER], "resourceVersion": "7", "uid": "u"}})
        );
        let held = vec![FINALIZER.to_owned(), "example.com/keep".to_owned()];
        assert_eq!(
            finalizer_patch(&held, false, Some("8".into()), None),
            json!({"metadata": {"finalizers": ["example.com/keep"], "resourceVersion": "8"}})
        );
        assert_eq!(
            finalizer_patch(&[FINALIZER.to_owned()], true, Some("9".into()), None),
            json!({"metadata": {"finalizers": [FINALIZER], "resourceVersion": "9"}}),
            "never twice"
        );
    }
}
