//! The controller under test: an in-process operator against the fake apiserver, and what a
//! user reads back (status, conditions, history, Events). Shared by the controller tests.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use braze_export_operator::controller::{self, Config, LeaderElection};
use braze_export_operator::ops::metrics::Metrics;
use fake_apiserver::{EVENTS, EXPORTS, FakeApiServer, LEASES, Rule, SECRETS};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::{API_KEY, CLIENT_ID, CLIENT_SECRET, World};

/// The namespace of the tests' exports.
pub const NS: &str = "marketing";

/// A running operator.
pub struct Operator {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), controller::Error>>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Its readiness (`/readyz`).
    pub ready: Arc<AtomicBool>,
}

impl Operator {
    /// Starts an operator with its own client of `api`, held to the chart's RBAC rules.
    pub fn start(api: &FakeApiServer, config: Config) -> Self {
        Self::start_with(api.client_with_rules(chart_rules()), config)
    }

    /// Starts an operator on `client`.
    pub fn start_with(client: kube::Client, config: Config) -> Self {
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let (s, m, r) = (shutdown.clone(), Arc::clone(&metrics), Arc::clone(&ready));
        let task = tokio::spawn(async move {
            controller::serve(client, config, m, r, Arc::default(), s).await
        });
        Self {
            shutdown,
            task,
            metrics,
            ready,
        }
    }

    /// True when `/readyz` would answer 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The value of a metric line starting with `prefix` (e.g. `braze_export_leader`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
    }

    /// Stops it as SIGTERM would, and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(40), self.task)
            .await
            .expect("the controller stops")
            .expect("joins")
            .expect("no error");
    }
}

/// The rules the chart grants the operator with the default values (audiences in Secrets):
/// its `bzx.exportRules` and `bzx.audienceSecretRules` as written in the template, and the
/// leader-election Role's (templated names; `tests/chart.rs` checks the rendered Role).
pub fn chart_rules() -> Vec<Rule> {
    chart_rules_for(ChartStore::Secrets)
}

/// Which of the chart's Secret rules apply (`audienceStore.type`, `rbac.holdBrazeKeySecrets`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChartStore {
    /// `type: Secrets`.
    Secrets,
    /// `type: Bucket`, `holdBrazeKeySecrets: true`.
    Bucket,
    /// `type: Bucket`, `holdBrazeKeySecrets: false`.
    BucketWithoutKeyHold,
}

/// The rules the chart grants for `store` (see [`chart_rules`]).
pub fn chart_rules_for(store: ChartStore) -> Vec<Rule> {
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<Rule>,
    }
    let text = include_str!("../../charts/braze-export-operator/templates/rbac.yaml");
    let block = |define: &str| {
        text.split_once(&format!("{{{{- define \"{define}\""))
            .and_then(|(_, rest)| rest.split_once("{{- end -}}"))
            .and_then(|(block, _)| block.split_once("}}"))
            .unwrap_or_else(|| panic!("the chart defines {define}"))
            .1
            .to_owned()
    };
    let mut yaml = block("bzx.exportRules");
    match store {
        ChartStore::Secrets => yaml.push_str(&block("bzx.audienceSecretRules")),
        ChartStore::Bucket => yaml.push_str(&block("bzx.keyHoldRules")),
        ChartStore::BucketWithoutKeyHold => {}
    }
    let mut rules = serde_saphyr::from_str::<Rules>(&yaml)
        .expect("the chart's rules are plain YAML")
        .rules;
    rules.push(Rule {
        api_groups: vec!["coordination.k8s.io".into()],
        resources: vec!["leases".into()],
        verbs: vec!["get".into(), "update".into(), "create".into()],
        resource_names: Vec::new(),
    });
    rules
}

/// Test settings: fast progress writes and retries.
pub fn config() -> Config {
    Config {
        progress_interval: Duration::from_millis(200),
        retry_base: jiff::SignedDuration::from_secs(1),
        ..Config::default()
    }
}

/// [`config`] with leader election on a 3 s Lease as `identity`.
pub fn elected(identity: &str) -> Config {
    Config {
        leader_election: Some(LeaderElection {
            namespace: "default".into(),
            lease_name: "braze-export-operator".into(),
            duration: Duration::from_secs(3),
        }),
        instance: identity.into(),
        ..config()
    }
}

/// The Lease's holder.
pub fn holder(api: &FakeApiServer) -> Option<String> {
    api.get(LEASES, "default", "braze-export-operator")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// The two Secrets of the tests' exports; the Looker one allows the sandbox's host (the
/// operator under test allows any host, so it trusts none with credentials by itself).
pub fn secrets(api: &FakeApiServer) {
    api.put_secret(
        NS,
        "looker-api",
        &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)],
    );
    allow_looker_host(api, "looker-api");
    api.put_secret(NS, "braze-api", &[("api_key", API_KEY)]);
}

/// Lets Secret `name` go to the sandbox Looker's host (`127.0.0.1`).
pub fn allow_looker_host(api: &FakeApiServer, name: &str) {
    api.patch(
        SECRETS,
        NS,
        name,
        json!({"metadata": {"annotations": {"looker-braze.dev/allowed-hosts": "127.0.0.1"}}}),
    );
}

/// Creates export `name` on Look `look`, with extra lines under `spec.braze` and `spec`.
pub fn put_export(
    api: &FakeApiServer,
    w: &World,
    name: &str,
    look: &str,
    extra_braze: &str,
    extra_spec: &str,
) {
    api.put(
        EXPORTS,
        export_object(w, name, look, extra_braze, extra_spec),
    );
}

/// The object [`put_export`] creates.
pub fn export_object(
    w: &World,
    name: &str,
    look: &str,
    extra_braze: &str,
    extra_spec: &str,
) -> Value {
    let yaml = w
        .yaml(look, extra_braze, extra_spec)
        .replace("name: test-export", &format!("name: {name}"));
    serde_saphyr::from_str(&yaml).expect("yaml")
}

/// Sets the run-now annotation.
pub fn run_now(api: &FakeApiServer, name: &str, value: &str) {
    api.patch(
        EXPORTS,
        NS,
        name,
        json!({"metadata": {"annotations": {"looker-braze.dev/run-now": value}}}),
    );
}

/// The export's status (`Null` when none).
pub fn status(api: &FakeApiServer, name: &str) -> Value {
    api.get(EXPORTS, NS, name)
        .and_then(|o| o.get("status").cloned())
        .unwrap_or(Value::Null)
}

/// A condition of `status` (`Null` when absent).
pub fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Polls until `check` returns `Some`, or fails with what was last seen.
pub async fn wait_for<T>(what: &str, seconds: u64, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `name` is idle with this Ready reason.
pub async fn wait_ready(api: &FakeApiServer, name: &str, reason: &str, seconds: u64) -> Value {
    let mut last = Value::Null;
    let found = tokio::time::timeout(
        Duration::from_secs(seconds),
        wait_for(
            &format!("{name} Ready reason {reason}"),
            seconds + 1,
            || {
                let s = status(api, name);
                last = s.clone();
                (condition(&s, "Ready")["reason"] == reason
                    && condition(&s, "Running")["status"] == "False")
                    .then_some(s)
            },
        ),
    )
    .await;
    match found {
        Ok(s) => s,
        Err(_) => panic!("timed out waiting for {name} Ready reason {reason}; status: {last}"),
    }
}

/// "trigger outcome" of each run in `status.history`, newest first.
pub fn history(status: &Value) -> Vec<String> {
    status["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            format!(
                "{} {}",
                h["trigger"].as_str().unwrap_or(""),
                h["outcome"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// Waits for the first Event of `reason` about export `name`: (type, reason, note).
pub async fn wait_event(
    api: &FakeApiServer,
    name: &str,
    reason: &str,
    seconds: u64,
) -> (String, String, String) {
    wait_for(&format!("the {reason} Event"), seconds, || {
        events(api, name).into_iter().find(|(_, r, _)| r == reason)
    })
    .await
}

/// (type, reason, note) of the Events about `name`.
pub fn events(api: &FakeApiServer, name: &str) -> Vec<(String, String, String)> {
    api.list(EVENTS)
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name)
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").into(),
                e["reason"].as_str().unwrap_or("").into(),
                e["note"].as_str().unwrap_or("").into(),
            )
        })
        .collect()
}
