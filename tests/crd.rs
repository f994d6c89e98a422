//! The CRD in `crds/` is exactly what `braze-export-operator crd` prints, and says what the
//! contract says.

use braze_export_operator::crd::crd_yaml;
use serde_json::Value;

fn crd() -> Value {
    serde_saphyr::from_str(&crd_yaml()).expect("the CRD is YAML")
}

#[test]
fn crds_dir_matches_the_generated_crd() {
    let on_disk = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/brazeexport.yaml"
    ))
    .expect("crds/brazeexport.yaml");
    assert!(
        on_disk == crd_yaml(),
        "crds/brazeexport.yaml is stale: regenerate it with `cargo run -- crd > crds/brazeexport.yaml`"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_braze-export-operator"))
        .arg("crd")
        .output()
        .expect("binary runs");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        on_disk,
        "`crd` prints the file"
    );
}

#[test]
fn names_scope_and_subresources() {
    let c = crd();
    assert_eq!(c["metadata"]["name"], "brazeexports.looker-braze.dev");
    let spec = &c["spec"];
    assert_eq!(spec["group"], "looker-braze.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "BrazeExport");
    assert_eq!(spec["names"]["plural"], "brazeexports");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["bzx"]));
    assert!(
        spec["names"].get("categories").is_none(),
        "not in category all"
    );
    let v = &spec["versions"][0];
    assert_eq!(
        (
            v["name"].as_str(),
            v["served"].as_bool(),
            v["storage"].as_bool()
        ),
        (Some("v1alpha1"), Some(true), Some(true))
    );
    assert!(v["subresources"]["status"].is_object());
}

#[test]
fn printer_columns_follow_the_contract() {
    let c = crd();
    let cols: Vec<(String, String, i64)> = c["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_uppercase(),
                c["jsonPath"].as_str().unwrap().to_owned(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    let want = [
        ("LOOK", ".spec.looker.lookId", 0),
        ("SCHEDULE", ".spec.schedule", 0),
        ("SUSPEND", ".spec.suspend", 0),
        ("LAST RUN", ".status.lastRun.completionTime", 0),
        ("SENT", ".status.lastRun.sent", 0),
        (
            "READY",
            ".status.conditions[?(@.type==\"Ready\")].status",
            0,
        ),
        (
            "STATUS",
            ".status.conditions[?(@.type==\"Ready\")].reason",
            0,
        ),
        ("AGE", ".metadata.creationTimestamp", 0),
        ("NEXT RUN", ".status.nextScheduleTime", 1),
        ("REMOVED", ".status.lastRun.removed", 1),
    ];
    let want: Vec<(String, String, i64)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), *c))
        .collect();
    assert_eq!(cols, want);
}

#[test]
fn the_schema_validates_what_it_can() {
    let c = crd();
    let spec = &c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        spec["required"],
        serde_json::json!(["braze", "looker", "schedule"])
    );
    let braze = &spec["properties"]["braze"];
    assert_eq!(
        braze["properties"]["identifier"]["enum"],
        serde_json::json!(["external_id", "braze_id", "user_alias"])
    );
    assert_eq!(braze["properties"]["identifier"]["default"], "external_id");
    assert_eq!(
        (
            braze["properties"]["batchSize"]["minimum"].as_f64(),
            braze["properties"]["batchSize"]["maximum"].as_f64()
        ),
        (Some(1.0), Some(75.0))
    );
    assert_eq!(braze["properties"]["batchSize"]["default"], 75);
    assert_eq!(
        braze["properties"]["exportName"]["default"],
        "LOOKER_EXPORT"
    );
    assert_eq!(braze["properties"]["updateExistingOnly"]["default"], true);
    let rules = braze["x-kubernetes-validations"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["message"] == "aliasLabel is required when identifier is user_alias")
    );
    assert_eq!(
        braze["properties"]["removal"]["enum"],
        serde_json::json!(["Keep", "Remove"])
    );
    assert_eq!(braze["properties"]["removal"]["default"], "Keep");
    assert_eq!(braze["properties"]["removalLimitPercent"]["default"], 20);
    assert_eq!(
        braze["properties"]["removalLimitPercent"]["maximum"].as_f64(),
        Some(100.0)
    );
    assert_eq!(braze["properties"]["delta"]["default"], false);
    assert_eq!(braze["properties"]["fullResyncInterval"]["default"], "168h");
    assert!(braze["properties"]["fullResyncInterval"]["pattern"].is_string());
    assert_eq!(spec["properties"]["cleanupOnDelete"]["default"], false);
    assert!(
        spec["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["message"] == "cleanupOnDelete needs braze.removal: Remove")
    );
    let looker = &spec["properties"]["looker"];
    assert_eq!(
        looker["properties"]["results"]["enum"],
        serde_json::json!(["Table", "All"])
    );
    assert_eq!(looker["properties"]["timeoutSeconds"]["default"], 300);
    assert!(
        looker["properties"]["baseUrl"]["x-kubernetes-validations"][0]["rule"]
            .as_str()
            .unwrap()
            .contains("https://")
    );
    assert!(
        looker["properties"]["lookId"]["description"]
            .as_str()
            .unwrap()
            .contains("Look"),
        "doc comments become descriptions"
    );
    let text = crd_yaml();
    assert!(
        !text.contains("additionalProperties: false"),
        "structural schemas may not forbid extra properties"
    );
}

/// Every integer in the spec has a maximum (a number this version cannot hold is refused by
/// the apiserver, not by a failing decode), and `conditions` is a map keyed by `type`, so
/// server-side apply merges conditions by type.
#[test]
fn numbers_have_maximums_and_conditions_are_a_map() {
    fn integers(path: &str, schema: &Value, out: &mut Vec<(String, Value)>) {
        if schema["type"] == "integer" {
            out.push((path.to_owned(), schema.clone()));
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, v) in props {
                integers(&format!("{path}.{k}"), v, out);
            }
        }
        if schema["items"].is_object() {
            integers(&format!("{path}[]"), &schema["items"], out);
        }
    }
    let c = crd();
    let root = &c["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut found = Vec::new();
    integers("spec", &root["properties"]["spec"], &mut found);
    assert!(found.len() >= 7, "{found:?}");
    for (path, schema) in &found {
        assert!(
            schema["maximum"].is_number(),
            "{path} has no maximum: {schema}"
        );
    }
    let conditions = &root["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    assert!(
        root["properties"]["status"]["properties"]["runner"].is_object(),
        "the runner is part of the status"
    );
}
