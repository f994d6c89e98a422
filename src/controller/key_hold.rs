//! The Braze key Secret of exports with `cleanupOnDelete`, held with the cleanup finalizer
//! while a cleanup may need it. A namespace deletion (or a prune of a whole folder) deletes
//! every kind at once: without the hold, the key is usually gone before the cleanup reads it.
//!
//! Several exports may name one key Secret. It is let go only when no live export with
//! `cleanupOnDelete` names it any more (the last one's cleanup ended, the field was turned
//! off, the export names another Secret), as a fresh list of the namespace's exports shows.
//! A Secret already being deleted gets no new finalizer; one held is still read while it
//! terminates, and goes once let go. The key's value is read only by the credentials path;
//! here, only metadata. An operator that may not patch the Secret (a tenant's Role) says so
//! once a term, in a Warning Event, and goes on without the hold.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::audience_store::OWNER_LABEL;
use super::context::{Context, key};
use super::error::Error;
use super::events;
use super::finalizer::{FINALIZER, SecretMeta, held, set_on_secret, wanted};
use super::retry::{self, retry};
use super::status::reason;
use super::step::Note;
use super::timeouts::API_TIMEOUT;
use super::watched::Watched;
use crate::spec::BrazeExport;

const FIELD: &str = "spec.braze.apiKeySecretRef";

/// Holds the key Secret of `export` (which wants a cleanup), once a term for each name it
/// gives; a Secret that does not exist yet is tried again on the next look. When the export
/// named another Secret before, that one is let go if no one else needs it.
pub async fn hold(ctx: &Context, export: &BrazeExport) {
    let (Some(uid), Some(ns)) = (export.uid(), export.namespace()) else {
        return;
    };
    let name = &export.spec.braze.api_key_secret_ref.name;
    let before = remember(ctx, &uid, Some(name));
    if before.as_deref() == Some(name.as_str()) {
        return;
    }
    match bounded(set(&secrets(ctx, &ns), name)).await {
        Ok(true) => {}
        Ok(false) => {
            // Not there yet: looked at again on the next look.
            remember(ctx, &uid, None);
        }
        Err(e) if e.refusal().is_some() => refused(ctx, export, &e).await,
        Err(e) => {
            remember(ctx, &uid, None);
            tracing::warn!(secret = %name, error = %e, "cannot hold the Braze key Secret; trying again on the next look");
        }
    }
    if before.is_some() {
        release_unneeded(ctx, &ns, None).await;
    }
}

/// Lets go the key Secret `export` was seen holding this term, unless another export needs
/// it: the export no longer wants a cleanup, yet keeps its finalizer (an audience in a
/// bucket), so the usual release with the finalizer does not come.
pub async fn let_go_if_held(ctx: &Context, export: &BrazeExport) {
    let (Some(uid), Some(ns)) = (export.uid(), export.namespace()) else {
        return;
    };
    if remember(ctx, &uid, None).is_some() {
        release_unneeded(ctx, &ns, None).await;
    }
}

/// Puts the finalizer on the Secret `name`; `false` when there is no such Secret.
async fn set(api: &Api<Secret>, name: &str) -> Result<bool, Error> {
    let Some(meta) = api.get_metadata_opt(name).await? else {
        return Ok(false);
    };
    set_on_secret(api, &meta, true).await?;
    Ok(true)
}

/// The Warning that the hold is refused (RBAC: the operator may not patch the Secret), told
/// once a term: the export runs as before, and a deletion of its namespace may delete the key
/// before its cleanup reads it.
async fn refused(ctx: &Context, export: &BrazeExport, e: &Error) {
    let why = e.refusal().unwrap_or_default();
    let message = format!(
        "cannot hold Secret {}/{} ({FIELD}) with the finalizer {FINALIZER} ({why}: the operator may not patch it): if the namespace is deleted, the key may go before the cleanup reads it and the users keep the flag; grant patch on Secrets (the chart's Role does)",
        export.namespace().unwrap_or_default(),
        export.spec.braze.api_key_secret_ref.name,
    );
    tracing::warn!(export = %key(export), reason = why, "cannot hold the Braze key Secret");
    let note = Note {
        warning: true,
        reason: reason::BRAZE_KEY_NOT_HELD,
        message,
    };
    events::publish(ctx, export, &note).await;
}

/// Lets go every key Secret of `namespace` that no live export with `cleanupOnDelete` names
/// any more; `leaving` is an export whose cleanup just ended, gone whatever a list still
/// shows. A failure is logged: the next release in the namespace tries again.
pub async fn release_unneeded(ctx: &Context, namespace: &str, leaving: Option<&str>) {
    let api = secrets(ctx, namespace);
    let attempt = |_| release_once(ctx, &api, namespace, leaving);
    let transient = |e: &Error, _| !matches!(e, Error::Gone) && e.refusal().is_none();
    if let Err(e) = retry(retry::KEY_RELEASE, attempt, transient).await {
        tracing::warn!(%namespace, error = %e, "cannot let go of a Braze key Secret");
    }
}

async fn release_once(
    ctx: &Context,
    api: &Api<Secret>,
    namespace: &str,
    leaving: Option<&str>,
) -> Result<(), Error> {
    // The Secrets first, then the exports: an export that starts needing one in between is
    // in the list, and holds it again on its next look if it was seen held.
    let held = bounded(held_keys(api)).await?;
    if held.is_empty() {
        return Ok(());
    }
    let exports: Api<Watched> = Api::namespaced(ctx.client.clone(), namespace);
    let all = bounded(async { Ok(exports.list(&ListParams::default()).await?.items) }).await?;
    let needed = needed(&all, leaving);
    for s in held.iter().filter(|s| !needed.contains(&s.name_any())) {
        bounded(async { Ok(set_on_secret(api, s, false).await?) }).await?;
        forget_name(ctx, &s.name_any());
    }
    Ok(())
}

/// The key Secrets this operator holds in the namespace of `api`: its finalizer, and not an
/// audience Secret (metadata alone).
async fn held_keys(api: &Api<Secret>) -> Result<Vec<SecretMeta>, Error> {
    let all = api.list_metadata(&ListParams::default()).await?.items;
    Ok(all
        .into_iter()
        .filter(|s| {
            s.finalizers().iter().any(|f| f == FINALIZER) && !s.labels().contains_key(OWNER_LABEL)
        })
        .collect())
}

/// The key Secrets that live exports with `cleanupOnDelete` name: those not deleted, and
/// those deleted whose cleanup has not ended (they still hold their finalizer), but
/// `leaving`.
pub fn needed(exports: &[Watched], leaving: Option<&str>) -> BTreeSet<String> {
    exports
        .iter()
        .filter_map(Watched::export)
        .filter(|e| wanted(e) && (e.metadata.deletion_timestamp.is_none() || held(e)))
        .filter(|e| leaving.is_none() || e.uid().as_deref() != leaving)
        .map(|e| e.spec.braze.api_key_secret_ref.name.clone())
        .collect()
}

/// Records that the export `uid` holds `name` (`None`: nothing); the name it held before.
fn remember(ctx: &Context, uid: &str, name: Option<&str>) -> Option<String> {
    let mut held = ctx.held_keys.lock().unwrap_or_else(|e| e.into_inner());
    match name {
        Some(n) => held.insert(uid.to_owned(), n.to_owned()),
        None => held.remove(uid),
    }
}

/// Forgets every export seen holding `name`: it was let go, and whoever needs it again holds
/// it again.
fn forget_name(ctx: &Context, name: &str) {
    let mut held = ctx.held_keys.lock().unwrap_or_else(|e| e.into_inner());
    held.retain(|_, n| n != name);
}

fn secrets(ctx: &Context, namespace: &str) -> Api<Secret> {
    Api::namespaced(ctx.client.clone(), namespace)
}

/// `call` within [`API_TIMEOUT`].
async fn bounded<T>(call: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| Error::Timeout("holding or letting go of the Braze key Secret"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::BrazeExport;

    fn export(name: &str, key: &str, cleanup: bool) -> BrazeExport {
        let yaml = format!(
            "apiVersion: looker-braze.dev/v1alpha1\nkind: BrazeExport\nmetadata: {{name: {name}, namespace: marketing, uid: uid-{name}}}\nspec:\n  schedule: \"@daily\"\n  cleanupOnDelete: {cleanup}\n  looker: {{baseUrl: \"https://acme.cloud.looker.com\", lookId: \"42\", credentialsSecretRef: {{name: looker-api}}}}\n  braze:\n    endpoint: https://rest.iad-01.braze.com\n    apiKeySecretRef: {{name: {key}}}\n    removal: Remove\n"
        );
        serde_saphyr::from_str(&yaml).expect("export")
    }

    fn deleting(mut e: BrazeExport, holding: bool) -> BrazeExport {
        e.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::UNIX_EPOCH,
        ));
        if holding {
            e.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
        }
        e
    }

    fn names(set: BTreeSet<String>) -> Vec<String> {
        set.into_iter().collect()
    }

    #[test]
    fn a_key_is_needed_while_a_live_export_with_cleanup_names_it() {
        let all: Vec<Watched> = [
            export("a", "shared", true),
            export("b", "shared", true),
            export("c", "own", true),
            export("d", "kept", false),
            deleting(export("e", "ending", true), true),
            deleting(export("f", "ended", true), false),
        ]
        .into_iter()
        .map(Watched::Decoded)
        .collect();
        assert_eq!(names(needed(&all, None)), ["ending", "own", "shared"]);
        assert_eq!(
            names(needed(&all, Some("uid-a"))),
            ["ending", "own", "shared"],
            "b still names it"
        );
        assert_eq!(
            names(needed(&all, Some("uid-e"))),
            ["own", "shared"],
            "its cleanup ended"
        );
        assert_eq!(
            names(needed(&all[0..1], Some("uid-a"))),
            Vec::<String>::new()
        );
    }
}
