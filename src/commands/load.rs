//! Reading a BrazeExport from a YAML file (the `run` command and the demo).

use serde_json::Value;

use crate::spec::{API_VERSION, BrazeExport, KIND};

/// Parses YAML holding one `BrazeExport` (other documents, such as its Secrets, are
/// ignored). Errors name the field and what is wrong with it.
pub fn load_export(yaml: &str) -> Result<BrazeExport, String> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut exports: Vec<Value> = docs
        .into_iter()
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some(KIND))
        .collect();
    let doc = match exports.len() {
        1 => exports.remove(0),
        0 => return Err(format!("no document of kind {KIND} in the file")),
        n => {
            return Err(format!(
                "{n} documents of kind {KIND} in the file: give one"
            ));
        }
    };
    match doc.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        other => {
            return Err(format!(
                "apiVersion must be {API_VERSION} (found {})",
                other.unwrap_or("nothing")
            ));
        }
    }
    let mut doc = doc;
    if doc.get("metadata").is_none() {
        // `run` needs no name; the resource type wants the field.
        doc["metadata"] = Value::Object(serde_json::Map::new());
    }
    serde_path_to_error::deserialize::<_, BrazeExport>(doc).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPORT: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: braze-api}
stringData: {api_key: x}
---
apiVersion: looker-braze.dev/v1alpha1
kind: BrazeExport
metadata: {name: churn-risk, namespace: marketing}
spec:
  schedule: "0 6 * * *"
  looker:
    baseUrl: https://acme.cloud.looker.com
    lookId: "42"
    credentialsSecretRef: {name: looker-api}
  braze:
    endpoint: https://rest.iad-01.braze.com
    apiKeySecretRef: {name: braze-api, key: api_key}
    batchSize: 50
"#;

    #[test]
    fn finds_the_export_among_other_documents() {
        let doc = load_export(EXPORT).unwrap();
        assert_eq!(doc.metadata.name.as_deref(), Some("churn-risk"));
        assert_eq!(doc.spec.braze.batch_size, 50);
    }

    #[test]
    fn metadata_may_be_left_out() {
        let yaml = EXPORT
            .split("---\n")
            .nth(1)
            .unwrap()
            .replace("metadata: {name: churn-risk, namespace: marketing}\n", "");
        let doc = load_export(&yaml).unwrap();
        assert_eq!(doc.metadata.name, None);
        assert_eq!(doc.spec.braze.batch_size, 50);
    }

    #[test]
    fn errors_name_the_field() {
        let e = load_export(&EXPORT.replace("batchSize: 50", "batchSize: many")).unwrap_err();
        assert!(
            e.starts_with("spec.braze.batchSize: invalid type: string \"many\""),
            "{e}"
        );
        let e = load_export(&EXPORT.replace("    batchSize: 50", "    batchsize: 50")).unwrap_err();
        assert!(
            e.starts_with("spec.braze.batchsize: unknown field `batchsize`, expected one of"),
            "{e}"
        );
        let e = load_export(&EXPORT.replace("looker-braze.dev/v1alpha1", "looker-braze.dev/v2"))
            .unwrap_err();
        assert_eq!(
            e,
            "apiVersion must be looker-braze.dev/v1alpha1 (found looker-braze.dev/v2)"
        );
        assert_eq!(
            load_export("kind: Secret").unwrap_err(),
            "no document of kind BrazeExport in the file"
        );
        assert!(
            load_export("a: [")
                .unwrap_err()
                .starts_with("not valid YAML")
        );
        let e = load_export(&EXPORT.replace("    lookId: \"42\"\n", "")).unwrap_err();
        assert!(e.contains("spec.looker") && e.contains("lookId"), "{e}");
    }
}
