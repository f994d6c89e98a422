//! A BrazeExport as the controller watches it: decoded when this operator version can read
//! it, and otherwise kept with the reason, so one export written for a newer operator (an
//! unknown field, a number out of range) gets its own `InvalidSpec` instead of failing the
//! whole list and stopping every export.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::spec::{BrazeExport, BrazeExportStatus};
use crate::text::truncate;

/// One watched object.
// Nearly every object is `Decoded`, and the cache keeps each behind an `Arc`: boxing the
// common case would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Watched {
    /// This version reads it.
    Decoded(BrazeExport),
    /// This version cannot read it.
    Undecodable(Box<Undecodable>),
}

/// An export this operator version cannot decode.
#[derive(Clone, Debug)]
pub struct Undecodable {
    /// Its metadata (always readable).
    pub metadata: ObjectMeta,
    /// Where and why decoding failed.
    pub error: DecodeError,
    /// Its status (empty when it has none yet), or `None` when this version cannot read it:
    /// then nothing is written, since a write would erase its history.
    pub status: Option<BrazeExportStatus>,
}

/// Why an object cannot be decoded: the field's path and serde's reason (which may quote a
/// number or a short enum value of the spec; never a Secret, which is not in the object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Path such as `spec.braze` (the parent, for an unknown field).
    pub path: String,
    /// What serde said, shortened.
    pub reason: String,
}

impl DecodeError {
    /// The sentence for the `Ready` condition and the log.
    pub fn message(&self) -> String {
        format!(
            "{}: {}: this operator version cannot read the export; a newer operator may be needed",
            self.path, self.reason
        )
    }
}

impl Watched {
    /// The decoded export, if any.
    pub fn export(&self) -> Option<&BrazeExport> {
        match self {
            Self::Decoded(e) => Some(e),
            Self::Undecodable(_) => None,
        }
    }
}

/// Decodes an object, keeping a decode failure as [`Watched::Undecodable`].
pub fn decode(value: Value) -> Result<Watched, serde_json::Error> {
    let metadata: ObjectMeta = match value.get("metadata") {
        Some(m) => ObjectMeta::deserialize(m)?,
        None => ObjectMeta::default(),
    };
    // No status yet is an empty one; a status this version cannot read is none.
    let status = match value.get("status") {
        None | Some(Value::Null) => Some(BrazeExportStatus::default()),
        Some(s) => BrazeExportStatus::deserialize(s).ok(),
    };
    match serde_path_to_error::deserialize::<_, BrazeExport>(value) {
        Ok(export) => Ok(Watched::Decoded(export)),
        Err(e) => {
            let path = e.path().to_string();
            // serde lists every expected field after an unknown one: the field is enough.
            let inner = e.into_inner().to_string();
            let reason = match inner.split_once(", expected one of") {
                Some((head, _)) if head.starts_with("unknown field") => head.to_owned(),
                _ => inner,
            };
            Ok(Watched::Undecodable(Box::new(Undecodable {
                metadata,
                error: DecodeError {
                    path: if path == "." { "object".into() } else { path },
                    reason: truncate(&reason, 200),
                },
                status,
            })))
        }
    }
}

impl<'de> Deserialize<'de> for Watched {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        decode(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Resource for Watched {
    type DynamicType = ();
    type Scope = <BrazeExport as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        BrazeExport::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        BrazeExport::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        BrazeExport::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        BrazeExport::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Decoded(e) => &e.metadata,
            Self::Undecodable(u) => &u.metadata,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Decoded(e) => &mut e.metadata,
            Self::Undecodable(u) => &mut u.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn export(braze: Value) -> Value {
        json!({
            "apiVersion": "looker-braze.dev/v1alpha1", "kind": "BrazeExport",
            "metadata": {"name": "e", "namespace": "n", "uid": "u1"},
            "spec": {
                "schedule": "@daily",
                "looker": {"baseUrl": "https://l.example.com", "lookId": "1", "credentialsSecretRef": {"name": "l"}},
                "braze": braze
            },
            "status": {"history": [], "lastHandledRunRequest": "r1"}
        })
    }

    #[test]
    fn a_good_export_decodes_and_a_bad_one_names_its_field() {
        let braze =
            json!({"endpoint": "https://rest.iad-01.braze.com", "apiKeySecretRef": {"name": "b"}});
        let ok: Watched = serde_json::from_value(export(braze.clone())).unwrap();
        assert!(ok.export().is_some());

        let mut unknown = braze.clone();
        unknown["removalMode"] = json!("Remove");
        let Watched::Undecodable(u) = serde_json::from_value(export(unknown)).unwrap() else {
            panic!("decoded an unknown field")
        };
        assert_eq!(u.metadata.name.as_deref(), Some("e"));
        assert_eq!(u.error.path, "spec.braze.removalMode");
        assert_eq!(u.error.reason, "unknown field `removalMode`");
        assert_eq!(
            u.error.message(),
            "spec.braze.removalMode: unknown field `removalMode`: this operator version cannot read the export; a newer operator may be needed"
        );
        assert_eq!(
            u.status.unwrap().last_handled_run_request.as_deref(),
            Some("r1"),
            "the status is kept"
        );

        let mut big = braze;
        big["batchSize"] = json!(5_000_000_000u64);
        let Watched::Undecodable(u) = serde_json::from_value(export(big)).unwrap() else {
            panic!("decoded an out-of-range number")
        };
        assert_eq!(u.error.path, "spec.braze.batchSize");
        assert!(u.error.reason.contains("5000000000"), "{}", u.error.reason);
    }

    #[test]
    fn a_list_with_one_bad_item_decodes_every_item() {
        let good = export(
            json!({"endpoint": "https://rest.iad-01.braze.com", "apiKeySecretRef": {"name": "b"}}),
        );
        let list = json!({"items": [good.clone(), {"metadata": {"name": "x"}, "spec": {"schedule": 5}}, good]});
        let items: Vec<Watched> = serde_json::from_value(list["items"].clone()).unwrap();
        assert_eq!(
            items
                .iter()
                .map(|w| w.export().is_some())
                .collect::<Vec<_>>(),
            [true, false, true]
        );
    }
}
