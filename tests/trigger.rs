//! `trigger` as users run it: the binary (and the same binary linked as `kubectl-bzx`) with a
//! kubeconfig pointing at the fake apiserver, the controller binary running the exports
//! against the sandbox Looker and Braze, and the per-export metrics on its `/metrics`.

#[path = "support/fake.rs"]
mod fake;
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use braze_export_operator::export::RunReport;
use braze_export_operator::sandbox::{Fault, Generator, Look};
use fake::Start as _;
use fake_apiserver::{EXPORTS, FakeApiServer};
use serde_json::{Value, json};
use support::*;

const NS: &str = "marketing";

/// The sandboxes, the fake apiserver with the Secrets, and a kubeconfig pointing at it.
struct Cluster {
    api: FakeApiServer,
    world: World,
    kubeconfig: tempfile::NamedTempFile,
}

impl Cluster {
    async fn start(rows: u64) -> Self {
        let (api, world) = (FakeApiServer::start().await, World::start().await);
        world
            .looker
            .add_look("42", Look::users(rows, Generator::Clean));
        api.put_secret(
            NS,
            "looker-api",
            &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)],
        );
        api.put_secret(NS, "braze-api", &[("api_key", API_KEY)]);
        let kubeconfig = api.kubeconfig();
        Self {
            api,
            world,
            kubeconfig,
        }
    }

    fn put_export(&self, name: &str, extra_braze: &str) {
        self.put_export_with(name, extra_braze, "");
    }

    fn put_export_with(&self, name: &str, extra_braze: &str, extra_spec: &str) {
        let yaml = self
            .world
            .yaml("42", extra_braze, extra_spec)
            .replace("name: test-export", &format!("name: {name}"));
        self.api
            .put(EXPORTS, serde_saphyr::from_str(&yaml).expect("yaml"));
    }

    fn status(&self, name: &str) -> Value {
        self.api
            .get(EXPORTS, NS, name)
            .map_or(Value::Null, |o| o["status"].clone())
    }

    fn run_request(&self, name: &str) -> Option<String> {
        self.api
            .get(EXPORTS, NS, name)?
            .pointer("/metadata/annotations/looker-braze.dev~1run-now")?
            .as_str()
            .map(str::to_owned)
    }

    /// The controller binary against this cluster; killed when dropped.
    fn operator(&self) -> Operator {
        let port = free_port();
        let child = tokio::process::Command::new(binary())
            .args(["controller", "--metrics-addr", &format!("127.0.0.1:{port}")])
            // The sandbox Looker: trusted with the exports' credentials.
            .arg("--looker-allowed-hosts=127.0.0.1")
            .env("KUBECONFIG", self.kubeconfig.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the controller starts");
        Operator {
            _child: child,
            port,
        }
    }

    /// Runs `program` (the binary or its `kubectl-bzx` link) with this kubeconfig.
    async fn cli(&self, program: &Path, args: &[&str]) -> Cli {
        run_with_kubeconfig(program, self.kubeconfig.path(), args).await
    }

    async fn trigger(&self, args: &[&str]) -> Cli {
        let mut all = vec!["trigger"];
        all.extend_from_slice(args);
        self.cli(&binary(), &all).await
    }
}

struct Operator {
    _child: tokio::process::Child,
    port: u16,
}

impl Operator {
    async fn metrics(&self) -> String {
        let http = braze_export_operator::http::HttpClients::new()
            .get(true)
            .clone();
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        for _ in 0..100 {
            if let Ok(r) = http.get(&url).send().await {
                return r.text().await.unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("/metrics never answered");
    }

    /// Scrapes until `check` holds, or fails with the last exposition.
    async fn metrics_until(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.metrics().await;
            if check(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}; /metrics:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn run_with_kubeconfig(program: &Path, kubeconfig: &Path, args: &[&str]) -> Cli {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .output(),
    )
    .await
    .expect("trigger finishes")
    .expect("trigger runs");
    Cli {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The binary linked as `kubectl-bzx` in a temporary directory (kept as long as the value).
fn kubectl_bzx() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("kubectl-bzx");
    std::os::unix::fs::symlink(binary(), &link).expect("symlink");
    (dir, link)
}

fn last_run(c: &Cluster, name: &str) -> RunReport {
    serde_json::from_value(c.status(name)["lastRun"].clone()).expect("status.lastRun")
}

fn assert_no_secret(cli: &Cli) {
    for secret in [CLIENT_SECRET, API_KEY] {
        assert!(
            !cli.stdout.contains(secret) && !cli.stderr.contains(secret),
            "{secret} leaked"
        );
    }
}

#[tokio::test]
async fn trigger_wait_prints_the_report_of_a_successful_run_like_run_and_exits_0() {
    let c = Cluster::start(300).await;
    c.put_export("churn", "");
    let _op = c.operator();
    let out = c
        .trigger(&["churn", "--namespace", NS, "--wait", "--timeout", "60s"])
        .await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let report = last_run(&c, "churn");
    assert_eq!((report.counts.sent, report.counts.rows_read), (300, 300));
    assert_eq!(
        out.stdout,
        report.to_text("Export churn (Look 42)"),
        "the same text as `run`"
    );
    assert!(
        out.stdout
            .starts_with("Export churn (Look 42): Succeeded\n")
    );
    let status = c.status("churn");
    assert_eq!(status["lastRun"]["trigger"], "Manual");
    assert_eq!(
        status["lastHandledRunRequest"].as_str(),
        c.run_request("churn").as_deref(),
        "the run answered the annotation trigger set"
    );
    assert_eq!(c.world.delivered_set().len(), 300);
    assert_no_secret(&out);
}

#[tokio::test]
async fn a_partial_run_exits_3_through_kubectl_bzx_with_the_json_report() {
    let c = Cluster::start(50).await;
    c.world.braze.reject_id("user-0000005");
    c.put_export("churn", "");
    let _op = c.operator();
    let (_dir, plugin) = kubectl_bzx();
    let help = c.cli(&plugin, &["trigger", "--help"]).await;
    assert_eq!(help.code, 0);
    assert!(
        help.stdout.contains("Usage: kubectl bzx trigger"),
        "{}",
        help.stdout
    );
    let out = c
        .cli(
            &plugin,
            &["trigger", "churn", "-n", NS, "--wait", "--output", "json"],
        )
        .await;
    assert_eq!(out.code, 3, "{}\n{}", out.stdout, out.stderr);
    let printed = out.report();
    assert_eq!(printed["outcome"], "PartiallySucceeded");
    assert_eq!(
        (printed["sent"].as_u64(), printed["rejected"].as_u64()),
        (Some(49), Some(1))
    );
    assert_eq!(
        printed,
        c.status("churn")["lastRun"],
        "the run's own report"
    );
}

#[tokio::test]
async fn an_unknown_export_or_no_cluster_exits_2_naming_it() {
    let c = Cluster::start(10).await;
    let _op = c.operator();
    let out = c.trigger(&["nope", "-n", NS, "--wait"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(
        out.stderr.trim(),
        "error: no BrazeExport nope in namespace marketing (kubectl get bzx -n marketing lists them)"
    );
    assert!(out.stdout.is_empty());

    let port = free_port();
    let nowhere = tempfile::NamedTempFile::new().unwrap();
    let config = std::fs::read_to_string(c.kubeconfig.path())
        .unwrap()
        .replace(&c.api.url, &format!("http://127.0.0.1:{port}"));
    std::fs::write(nowhere.path(), config).unwrap();
    let out = run_with_kubeconfig(&binary(), nowhere.path(), &["trigger", "churn", "-n", NS]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.starts_with(&format!(
            "error: cannot reach the Kubernetes API at http://127.0.0.1:{port}/ to read BrazeExport marketing/churn: "
        )),
        "{}",
        out.stderr
    );

    // The operator refuses the spec: waiting would be in vain.
    let broken = c
        .world
        .yaml("42", "", "")
        .replace("name: test-export", "name: broken")
        .replace("\"0 6 * * *\"", "\"every day\"");
    c.api
        .put(EXPORTS, serde_saphyr::from_str(&broken).expect("yaml"));
    let out = c
        .trigger(&["broken", "-n", NS, "--wait", "--timeout", "30s"])
        .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.starts_with(
            "error: BrazeExport marketing/broken cannot run until its spec is fixed: spec.schedule: "
        ),
        "{}",
        out.stderr
    );

    let bad = c.trigger(&["churn", "--wait", "--timeout", "soon"]).await;
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("\"soon\" is not a duration"),
        "{}",
        bad.stderr
    );
}

#[tokio::test]
async fn without_an_operator_the_request_is_set_and_waiting_times_out_with_exit_4() {
    let c = Cluster::start(10).await;
    c.put_export("churn", "");
    let out = c.trigger(&["churn", "-n", NS]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let value = out.stdout.trim();
    assert_eq!(c.run_request("churn").as_deref(), Some(value));
    assert!(value.parse::<jiff::Timestamp>().is_ok(), "{value}");

    let json = c.trigger(&["churn", "-n", NS, "-o", "json"]).await;
    let printed: Value = serde_json::from_str(&json.stdout).expect("json");
    assert_ne!(
        printed["runRequest"].as_str(),
        Some(value),
        "a fresh value each time"
    );
    assert_eq!(
        printed["runRequest"].as_str(),
        c.run_request("churn").as_deref()
    );

    let started = std::time::Instant::now();
    let out = c
        .trigger(&["churn", "-n", NS, "--wait", "--timeout", "2s"])
        .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(
        out.stderr.trim(),
        "error: timed out after 2s waiting for BrazeExport marketing/churn: not picked up: the \
         operator has not acted on the request; is the operator running, and does it watch this \
         namespace?"
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn a_timeout_says_whether_the_run_is_running_or_queued() {
    let c = Cluster::start(600).await;
    c.world
        .braze
        .inject([Fault::Slow(Duration::from_secs(60)); 2]);
    c.put_export("slow", "concurrency: 2");
    let _op = c.operator();
    wait_for("the operator to see the export", || {
        c.status("slow")["conditions"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["reason"] == "Pending"))
    })
    .await;
    let out = c
        .trigger(&["slow", "-n", NS, "--wait", "--timeout", "3s"])
        .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr.starts_with(
            "error: timed out after 3s waiting for BrazeExport marketing/slow: running since "
        ) && out.stderr.contains(
            " users flagged so far; the run goes on in the operator: follow it with kubectl get bzx slow -n marketing -w"
        ),
        "{}",
        out.stderr
    );
    let out = c
        .trigger(&["slow", "-n", NS, "--wait", "--timeout", "1s"])
        .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("marketing/slow: queued: a Manual run started at ")
            && out
                .stderr
                .contains("is in progress; the requested run starts after it; the request stands"),
        "{}",
        out.stderr
    );
}

/// Polls until `check` holds (at most 20 s).
async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn per_export_metrics_appear_after_a_run_and_vanish_after_a_delete() {
    let c = Cluster::start(120).await;
    c.put_export_with("churn", "", "maxRows: 100");
    c.put_export("other", "");
    let op = c.operator();
    let out = c.trigger(&["churn", "-n", NS, "--wait"]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    let success = c.trigger(&["other", "-n", NS, "--wait"]).await;
    assert_eq!(success.code, 0, "{}", success.stderr);

    let last_success = c.status("other")["lastSuccessfulTime"]
        .as_str()
        .unwrap()
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_second();
    let text = op
        .metrics_until("the per-export series", |m| m.contains("name=\"other\""))
        .await;
    for line in [
        format!(
            "braze_export_last_success_timestamp_seconds{{namespace=\"marketing\",name=\"other\"}} {last_success}"
        ),
        "braze_export_last_run_rows{namespace=\"marketing\",name=\"churn\",result=\"sent\"} 100"
            .into(),
        "braze_export_last_run_rows{namespace=\"marketing\",name=\"churn\",result=\"skipped\"} 20"
            .into(),
        "braze_export_last_run_rows{namespace=\"marketing\",name=\"other\",result=\"sent\"} 120"
            .into(),
        "braze_export_schedule_interval_seconds{namespace=\"marketing\",name=\"churn\"} 86400"
            .into(),
    ] {
        assert!(
            text.contains(&line),
            "{line} missing from /metrics:\n{text}"
        );
    }
    assert!(
        !text.contains(
            "braze_export_last_success_timestamp_seconds{namespace=\"marketing\",name=\"churn\"}"
        ),
        "churn never succeeded"
    );

    c.api.delete(EXPORTS, NS, "churn");
    let text = op
        .metrics_until("churn's series to vanish", |m| {
            !m.contains("name=\"churn\"")
        })
        .await;
    assert!(text.contains("name=\"other\""), "{text}");
}

#[tokio::test]
async fn the_fake_apiserver_selects_by_field_as_kubernetes_does() {
    use braze_export_operator::spec::BrazeExport;
    use kube::api::{Api, ListParams};
    let c = Cluster::start(1).await;
    c.put_export("a", "");
    c.put_export("b", "");
    let api: Api<BrazeExport> = Api::namespaced(c.api.client(), NS);
    let names = |l: kube::core::ObjectList<BrazeExport>| {
        l.items
            .iter()
            .map(|e| e.metadata.name.clone().unwrap())
            .collect::<Vec<_>>()
    };
    let only_a = api
        .list(&ListParams::default().fields("metadata.name=a"))
        .await
        .unwrap();
    assert_eq!(names(only_a), ["a"]);
    let not_a = api
        .list(&ListParams::default().fields("metadata.name!=a"))
        .await
        .unwrap();
    assert_eq!(names(not_a), ["b"]);
    let e = api
        .list(&ListParams::default().fields("spec.schedule=x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(s) if s.code == 400),
        "field not supported"
    );
}

/// `--discard-audience` sets the discard-audience annotation to the run-now value it sets.
#[tokio::test]
async fn discard_audience_repeats_the_request_in_its_annotation() {
    let c = Cluster::start(10).await;
    c.put_export("churn", "removal: Remove");
    let out = c.trigger(&["churn", "-n", NS, "--discard-audience"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let value = out.stdout.trim();
    assert_eq!(c.run_request("churn").as_deref(), Some(value));
    let discard = c
        .api
        .get(EXPORTS, NS, "churn")
        .unwrap()
        .pointer("/metadata/annotations/looker-braze.dev~1discard-audience")
        .cloned();
    assert_eq!(discard, Some(json!(value)));
    // Without the flag, a new request leaves it behind: it no longer repeats run-now.
    let out = c.trigger(&["churn", "-n", NS]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_ne!(c.run_request("churn").as_deref(), Some(value));
}
