//! What ships besides the binary: the Helm chart's files, the values schema, the examples, the
//! dashboard and the image, checked without Helm or a cluster (tests/chart.rs renders the chart
//! and the GitOps example with the real helm and kubectl).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use braze_export_operator::commands::load::load_export;
use braze_export_operator::crd::crd_yaml;
use braze_export_operator::export::ExportPlan;
use braze_export_operator::ops::metrics::{ExportGauges, Metrics, row_counts};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/braze-export-operator")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p, ext));
        } else if p.extension().is_some_and(|e| e == ext) {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn yaml_docs(p: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple(&read(p))
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", p.display()))
}

#[test]
fn every_plain_chart_file_parses() {
    let c = chart();
    let chart_yaml = &yaml_docs(&c.join("Chart.yaml"))[0];
    assert_eq!(chart_yaml["name"], "braze-export-operator");
    assert_eq!(chart_yaml["apiVersion"], "v2");
    assert_eq!(
        chart_yaml["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "appVersion follows the crate"
    );
    assert!(yaml_docs(&c.join("values.yaml"))[0].is_object());
    for f in files(&c.join("crds"), "yaml") {
        assert!(!yaml_docs(&f).is_empty());
    }
    for f in files(&c.join("dashboards"), "json")
        .into_iter()
        .chain([c.join("values.schema.json")])
    {
        serde_json::from_str::<Value>(&read(&f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    assert_eq!(
        files(&c.join("templates"), "yaml").len(),
        9,
        "the templates are all there"
    );
}

#[test]
fn the_chart_ships_the_same_crd() {
    assert!(
        read(&chart().join("crds/brazeexport.yaml")) == crd_yaml(),
        "charts/braze-export-operator/crds is stale: copy crds/brazeexport.yaml"
    );
}

#[test]
fn values_follow_their_schema() {
    let schema: Value = serde_json::from_str(&read(&chart().join("values.schema.json"))).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("the values schema is a schema");
    let values = yaml_docs(&chart().join("values.yaml")).remove(0);
    let errors: Vec<String> = validator
        .iter_errors(&values)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    for (path, bad) in [
        ("/logFormat", serde_json::json!("xml")),
        ("/maxConcurrentRuns", serde_json::json!(0)),
        ("/replicas", serde_json::json!("two")),
        ("/metrics/port", serde_json::json!(70000)),
        ("/prometheusRule/failingFor", serde_json::json!("soon")),
        ("/typoKey", serde_json::json!(true)),
        ("/watchNamespace", serde_json::json!("Marketing")),
        ("/watchNamespaces", serde_json::json!("crm,sales")),
        ("/watchNamespaces", serde_json::json!(["crm", "crm"])),
        (
            "/looker/allowedHosts",
            serde_json::json!(["https://acme.looker.com"]),
        ),
        (
            "/looker/allowedHosts",
            serde_json::json!(["*.looker.com,x.com"]),
        ),
        ("/looker/allowedHosts", serde_json::json!(["acme.*.com"])),
        ("/networkPolicy/enabled", serde_json::json!("yes")),
        ("/networkPolicy/kubernetesApi/ports", serde_json::json!([0])),
        ("/networkPolicy/kubernetesApi/cidrs", serde_json::json!([])),
        (
            "/networkPolicy/https/cidrs",
            serde_json::json!(["anywhere"]),
        ),
        (
            "/networkPolicy/https/except",
            serde_json::json!(["10.0.0.0"]),
        ),
        ("/networkPolicy/extraEgress", serde_json::json!({"to": []})),
    ] {
        let mut v = values.clone();
        let (parent, key) = path.rsplit_once('/').unwrap();
        v.pointer_mut(if parent.is_empty() { "" } else { parent })
            .unwrap()[key] = bad.clone();
        assert!(!validator.is_valid(&v), "{path} = {bad} should be refused");
    }
    for (path, good) in [
        ("/watchNamespaces", serde_json::json!(["crm", "sales-eu-1"])),
        (
            "/looker/allowedHosts",
            serde_json::json!(["*.looker.com", "*.cloud.looker.com", "looker.acme.com"]),
        ),
        (
            "/networkPolicy/https/except",
            serde_json::json!(["10.0.0.0/8", "fd00::/8"]),
        ),
    ] {
        let mut v = values.clone();
        *v.pointer_mut(path).unwrap() = good;
        assert!(validator.is_valid(&v), "{path} should be accepted");
    }
}

#[test]
fn templates_use_only_values_that_exist() {
    let values = yaml_docs(&chart().join("values.yaml")).remove(0);
    let mut used = BTreeSet::new();
    for f in files(&chart().join("templates"), "yaml")
        .into_iter()
        .chain(files(&chart().join("templates"), "tpl"))
        .chain(files(&chart().join("templates"), "txt"))
    {
        let text = read(&f);
        for (i, _) in text.match_indices(".Values.") {
            let path: String = text[i + 8..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '.' || *c == '_')
                .collect();
            used.insert(path.trim_end_matches('.').to_owned());
        }
    }
    assert!(used.len() > 15, "{used:?}");
    for path in &used {
        let pointer = format!("/{}", path.replace('.', "/"));
        assert!(
            values.pointer(&pointer).is_some(),
            ".Values.{path} is used by a template but not in values.yaml"
        );
    }
}

#[test]
fn the_image_is_small_and_non_root() {
    let docker = read(&root().join("Dockerfile"));
    assert!(
        docker.contains("USER 65532:65532") && docker.contains("distroless"),
        "a small non-root image"
    );
}

#[test]
fn every_example_is_a_valid_export() {
    let crd: Value = serde_saphyr::from_str(&crd_yaml()).unwrap();
    let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let validator = jsonschema::validator_for(&schema).expect("the CRD schema compiles");
    let mut exports = 0;
    let mut identifiers = BTreeSet::new();
    let mut suspended = false;
    for f in files(&root().join("examples"), "yaml") {
        for doc in yaml_docs(&f) {
            if doc["kind"] != "BrazeExport" {
                continue;
            }
            exports += 1;
            let errors: Vec<String> = validator
                .iter_errors(&doc)
                .map(|e| format!("{e} at {}", e.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", f.display());
            let export = load_export(&read(&f)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            ExportPlan::new("example", &export.spec)
                .unwrap_or_else(|e| panic!("{}: {e:?}", f.display()));
            identifiers.insert(export.spec.braze.identifier.key());
            suspended |= export.spec.suspend;
        }
    }
    assert!(exports >= 4, "{exports}");
    assert_eq!(
        identifiers.into_iter().collect::<Vec<_>>(),
        ["braze_id", "external_id", "user_alias"],
        "one per identifier type"
    );
    assert!(suspended, "a suspended example");
    let secrets = yaml_docs(&root().join("examples/secrets.yaml"));
    let names: Vec<&str> = secrets
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["looker-api", "braze-api"],
        "the Secrets the examples name"
    );
}

#[test]
fn the_gitops_layout_lists_real_files_kept_in_step() {
    let dir = root().join("examples/gitops");
    let k = yaml_docs(&dir.join("kustomization.yaml")).remove(0);
    for r in k["resources"].as_array().unwrap() {
        assert!(dir.join(r.as_str().unwrap()).exists(), "{r} is missing");
    }
    for (copy, original) in [
        ("exports/churn-risk.yaml", "churn-risk.yaml"),
        ("exports/vip-customers.yaml", "vip-braze-id.yaml"),
    ] {
        assert_eq!(
            read(&dir.join(copy)),
            read(&root().join("examples").join(original)),
            "{copy} drifted from examples/{original}"
        );
    }
}

/// Metric names in PromQL text: identifiers starting with `braze_export_`.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in promql.match_indices("braze_export_") {
        let name: String = promql[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[test]
fn the_dashboard_and_alerts_use_metrics_the_operator_exports() {
    // Every family gets a series, so the exposition names them all.
    let metrics = Metrics::new();
    let now = jiff::Timestamp::now();
    let report = braze_export_operator::export::RunReport::in_progress(
        braze_export_operator::export::Trigger::Schedule,
        now,
        1,
        1,
    );
    metrics.record_run(&report, now);
    metrics.set_exports([(("True", "Succeeded"), 1)]);
    metrics.reconcile_error("ApiError");
    metrics.status_write_failure("Forbidden");
    metrics.set_export_gauges(&[ExportGauges {
        namespace: "marketing".into(),
        name: "churn-risk".into(),
        last_success: Some(now),
        last_run: Some(row_counts(&report)),
        interval: Some(jiff::SignedDuration::from_hours(24)),
    }]);
    let exposed = metrics.encode();
    let exists = |name: &str| {
        let base = name.trim_end_matches("_bucket");
        exposed.contains(&format!("# TYPE {base} "))
            || exposed.contains(&format!("# TYPE {} ", base.trim_end_matches("_total")))
    };
    let dashboard: Value = serde_json::from_str(&read(
        &chart().join("dashboards/braze-export-operator.json"),
    ))
    .unwrap();
    let mut seen = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            seen.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    seen.extend(metric_names(&read(
        &chart().join("templates/prometheusrule.yaml"),
    )));
    assert!(seen.len() >= 8, "{seen:?}");
    for name in &seen {
        assert!(
            exists(name),
            "{name} is not a metric of the operator:\n{exposed}"
        );
    }
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Runs by outcome",
        "Users flagged (1 h)",
        "Rejected and failed users",
        "Braze requests, retries and 429s",
        "Run duration",
        "Exports by last success",
    ] {
        assert!(titles.contains(&want), "{want} panel");
    }
}
