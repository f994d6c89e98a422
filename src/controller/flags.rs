//! One owner per flag: two exports with `removal: Remove` that write the same flag (the same
//! Braze workspace, array attribute and value) would take it off each other's users. The one
//! created later is refused. Pure: it reads the exports the controller caches.
//!
//! The workspace is told by the endpoint's host (and port) and the API key's Secret (its
//! namespace, name and key): the key's value is never compared, so the same key kept in two
//! Secrets is not detected.

use jiff::Timestamp;

use crate::braze::endpoint::track_url;
use crate::spec::{BrazeExport, RemovalMode};

/// What a `Remove` export writes and takes back.
#[derive(Debug, PartialEq, Eq)]
struct Flag<'a> {
    host: String,
    port: Option<u16>,
    namespace: &'a str,
    secret: &'a str,
    key: &'a str,
    attribute: &'a str,
    value: &'a str,
}

/// The flag `e` removes, when it does: `removal: Remove`, not being deleted, with a valid
/// endpoint.
fn flag(e: &BrazeExport) -> Option<Flag<'_>> {
    let braze = &e.spec.braze;
    if braze.removal != RemovalMode::Remove || e.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let url = track_url(&braze.endpoint).ok()?;
    Some(Flag {
        host: url.host_str()?.to_ascii_lowercase(),
        port: url.port_or_known_default(),
        namespace: e.metadata.namespace.as_deref().unwrap_or_default(),
        secret: &braze.api_key_secret_ref.name,
        key: &braze.api_key_secret_ref.key,
        attribute: &braze.attribute,
        value: &braze.export_name,
    })
}

/// Who came first: by `creationTimestamp` (none: last), then namespace and name.
fn order(e: &BrazeExport) -> (Timestamp, &str, &str) {
    (
        e.metadata
            .creation_timestamp
            .as_ref()
            .map_or(Timestamp::MAX, |t| t.0),
        e.metadata.namespace.as_deref().unwrap_or_default(),
        e.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// `namespace/name`.
fn named(e: &BrazeExport) -> String {
    let (_, namespace, name) = order(e);
    format!("{namespace}/{name}")
}

/// Why `export` may not run: an export among `others` created before it removes the same
/// flag. The message names the first such export and how to resolve it. `None` for a `Keep`
/// export, which shares flags freely.
pub fn conflict(export: &BrazeExport, others: &[&BrazeExport]) -> Option<String> {
    let mine = flag(export)?;
    let me = order(export);
    let first = others
        .iter()
        .filter(|o| {
            let theirs = order(o);
            (theirs.1, theirs.2) != (me.1, me.2) && theirs < me
        })
        .filter(|o| flag(o).is_some_and(|f| f == mine))
        .min_by_key(|o| order(o))?;
    Some(format!(
        "export {} already removes {}={} with Secret {}/{} (key {}) on {}; two exports with removal: Remove on one flag would take it off each other's users, so this one does not run: give one of them a different spec.braze.exportName, or set one to spec.braze.removal: Keep",
        named(first),
        mine.attribute,
        mine.value,
        mine.namespace,
        mine.secret,
        mine.key,
        mine.host,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(name: &str, created: &str, braze: serde_json::Value) -> BrazeExport {
        let mut b = serde_json::json!({
            "endpoint": "https://rest.iad-01.braze.com",
            "apiKeySecretRef": {"name": "braze"},
            "removal": "Remove"
        });
        for (k, v) in braze.as_object().unwrap() {
            b[k] = v.clone();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "looker-braze.dev/v1alpha1", "kind": "BrazeExport",
            "metadata": {"name": name, "namespace": "m", "creationTimestamp": created},
            "spec": {
                "schedule": "0 6 * * *",
                "looker": {"baseUrl": "https://acme.looker.com", "lookId": "42", "credentialsSecretRef": {"name": "l"}},
                "braze": b
            }
        }))
        .unwrap()
    }

    const EARLY: &str = "2026-11-01T00:00:00Z";
    const LATE: &str = "2026-11-02T00:00:00Z";

    fn first() -> BrazeExport {
        export("a", EARLY, serde_json::json!({}))
    }

    #[test]
    fn the_later_of_two_removers_of_one_flag_is_refused_naming_the_first() {
        let (a, b) = (first(), export("b", LATE, serde_json::json!({})));
        let message = conflict(&b, &[&a, &b]).expect("a conflict");
        assert_eq!(
            message,
            "export m/a already removes looker_export=LOOKER_EXPORT with Secret m/braze (key api_key) on rest.iad-01.braze.com; two exports with removal: Remove on one flag would take it off each other's users, so this one does not run: give one of them a different spec.braze.exportName, or set one to spec.braze.removal: Keep"
        );
        assert_eq!(conflict(&a, &[&a, &b]), None, "the first is unaffected");
        assert_eq!(conflict(&b, &[&b]), None, "alone");
    }

    #[test]
    fn the_same_workspace_is_the_same_host_and_secret_key() {
        let a = first();
        for same in [
            serde_json::json!({"endpoint": "https://REST.iad-01.braze.com/ "}),
            serde_json::json!({"apiKeySecretRef": {"name": "braze", "key": "api_key"}}),
            serde_json::json!({"attribute": "looker_export", "exportName": "LOOKER_EXPORT"}),
            serde_json::json!({"delta": true, "batchSize": 10}),
        ] {
            let b = export("b", LATE, same.clone());
            assert!(conflict(&b, &[&a]).is_some(), "{same}");
        }
        for other in [
            serde_json::json!({"endpoint": "https://rest.fra-01.braze.eu"}),
            serde_json::json!({"endpoint": "http://127.0.0.1:8080"}),
            serde_json::json!({"apiKeySecretRef": {"name": "braze-2"}}),
            serde_json::json!({"apiKeySecretRef": {"name": "braze", "key": "other"}}),
            serde_json::json!({"attribute": "segments"}),
            serde_json::json!({"exportName": "CHURN"}),
            serde_json::json!({"removal": "Keep"}),
        ] {
            let b = export("b", LATE, other.clone());
            assert_eq!(conflict(&b, &[&a]), None, "{other}");
        }
        let mut elsewhere = export("b", LATE, serde_json::json!({}));
        elsewhere.metadata.namespace = Some("n".into());
        assert_eq!(
            conflict(&elsewhere, &[&a]),
            None,
            "another namespace's Secret"
        );
    }

    #[test]
    fn keep_exports_share_flags() {
        let a = export("a", EARLY, serde_json::json!({"removal": "Keep"}));
        let b = export("b", LATE, serde_json::json!({}));
        assert_eq!(conflict(&b, &[&a]), None, "an earlier Keep does not own it");
        let c = export("c", LATE, serde_json::json!({"removal": "Keep"}));
        assert_eq!(
            conflict(&c, &[&first()]),
            None,
            "a later Keep removes nothing"
        );
    }

    #[test]
    fn creation_order_decides_and_ties_go_by_namespace_and_name() {
        let (a, b) = (first(), export("b", LATE, serde_json::json!({})));
        // Listed in any order, by any name: the earlier one wins.
        let early_z = export("z", EARLY, serde_json::json!({}));
        assert!(
            conflict(&b, &[&b, &early_z])
                .unwrap()
                .starts_with("export m/z ")
        );
        assert_eq!(conflict(&early_z, &[&b]), None);
        // A tie: the name decides.
        let a2 = export("a2", EARLY, serde_json::json!({}));
        assert!(conflict(&a2, &[&a]).unwrap().starts_with("export m/a "));
        assert_eq!(conflict(&a, &[&a2]), None);
        // Three on one flag: the later two both name the first.
        let c = export("c", "2026-11-03T00:00:00Z", serde_json::json!({}));
        assert!(
            conflict(&c, &[&b, &a, &c])
                .unwrap()
                .starts_with("export m/a ")
        );
    }

    #[test]
    fn a_deleting_export_is_not_counted() {
        let mut a = first();
        a.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            LATE.parse().unwrap(),
        ));
        let b = export("b", LATE, serde_json::json!({}));
        assert_eq!(conflict(&b, &[&a]), None);
    }
}
