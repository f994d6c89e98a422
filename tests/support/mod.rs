//! Shared helpers for the integration tests: sandboxes, specs pointing at them, and the
//! two ways to run an export (the library pipeline and the real binary).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use braze_export_operator::audience::{Encoded, MemberState, Owner};
use braze_export_operator::braze::RetryPolicy;
use braze_export_operator::commands::load::load_export;
use braze_export_operator::export::{
    AudienceInput, AudienceUpdate, Credentials, ExportPlan, RunOptions, RunReport, RunResult,
    Services, Trigger, run_export, run_export_synced,
};
use braze_export_operator::redacted::Redacted;
use braze_export_operator::sandbox::{BrazeSandbox, LookerSandbox};
use serde_json::{Value, json};

pub const CLIENT_ID: &str = "looker-client-7f3a";
pub const CLIENT_SECRET: &str = "looker-secret-Zq81-do-not-leak";
pub const API_KEY: &str = "braze-key-4c2e-do-not-leak";

/// A sandbox Looker and Braze pair.
pub struct World {
    pub looker: LookerSandbox,
    pub braze: BrazeSandbox,
}

impl World {
    pub async fn start() -> Self {
        Self {
            looker: LookerSandbox::start(CLIENT_ID, CLIENT_SECRET)
                .await
                .expect("looker sandbox"),
            braze: BrazeSandbox::start(API_KEY).await.expect("braze sandbox"),
        }
    }

    /// A BrazeExport document for Look `look_id` against the sandboxes; `extra_braze` and
    /// `extra_spec` are YAML lines added under `spec.braze` and `spec`.
    pub fn yaml(&self, look_id: &str, extra_braze: &str, extra_spec: &str) -> String {
        self.yaml_looker(look_id, "", extra_braze, extra_spec)
    }

    /// Like [`World::yaml`], with `extra_looker` lines under `spec.looker`.
    pub fn yaml_looker(
        &self,
        look_id: &str,
        extra_looker: &str,
        extra_braze: &str,
        extra_spec: &str,
    ) -> String {
        let indent = |s: &str, n: usize| {
            s.lines()
                .map(|l| format!("{}{l}\n", " ".repeat(n)))
                .collect::<String>()
        };
        format!(
            "apiVersion: looker-braze.dev/v1alpha1\nkind: BrazeExport\nmetadata:\n  name: test-export\n  namespace: marketing\nspec:\n  schedule: \"0 6 * * *\"\n{}  looker:\n    baseUrl: {}\n    lookId: \"{look_id}\"\n{}    credentialsSecretRef:\n      name: looker-api\n  braze:\n    endpoint: {}\n    apiKeySecretRef:\n      name: braze-api\n{}",
            indent(extra_spec, 2),
            self.looker.url,
            indent(extra_looker, 4),
            self.braze.url,
            indent(extra_braze, 4),
        )
    }

    /// Runs the export through the library pipeline with quick retries.
    pub async fn run(&self, yaml: &str) -> RunReport {
        self.run_with(yaml, &fast_services(), RunOptions::new(Trigger::Cli))
            .await
    }

    pub async fn run_with(&self, yaml: &str, services: &Services, opts: RunOptions) -> RunReport {
        let doc = load_export(yaml).expect("test spec parses");
        let plan = ExportPlan::new("test-export", &doc.spec).expect("test spec is valid");
        let report = run_export(services, &plan, &creds(), opts).await;
        assert!(report.balanced(), "rows must add up: {report:#?}");
        report
    }

    /// Runs the export with its stored audience (`previous`), as the controller will.
    pub async fn sync(&self, yaml: &str, previous: Option<Encoded>, opts: RunOptions) -> RunResult {
        self.sync_with(yaml, previous, opts, None, &creds()).await
    }

    /// [`World::sync`] recording new users through `pending_log`, with `creds`.
    pub async fn sync_with(
        &self,
        yaml: &str,
        previous: Option<Encoded>,
        opts: RunOptions,
        pending_log: Option<std::sync::Arc<dyn braze_export_operator::export::PendingLog>>,
        creds: &Credentials,
    ) -> RunResult {
        let doc = load_export(yaml).expect("test spec parses");
        let plan = ExportPlan::new("test-export", &doc.spec).expect("test spec is valid");
        let input = AudienceInput {
            owner: owner(),
            previous,
            pending_log,
        };
        let result = run_export_synced(&fast_services(), &plan, creds, opts, Some(input)).await;
        assert!(
            result.report.balanced(),
            "counts must add up: {:#?}",
            result.report
        );
        result
    }

    /// The access tokens the sandbox Looker saw (to prove they leak nowhere).
    pub fn access_tokens(&self) -> Vec<String> {
        self.looker
            .requests()
            .iter()
            .filter_map(|r| {
                r.authorization
                    .as_deref()?
                    .strip_prefix("token ")
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Identifiers of every object Braze accepted, sorted, with repeats.
    pub fn delivered(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.braze.accepted().iter().map(identifier).collect();
        ids.sort();
        ids
    }

    /// Distinct identifiers Braze accepted.
    pub fn delivered_set(&self) -> BTreeSet<String> {
        self.delivered().into_iter().collect()
    }
}

/// The identifier of an attributes object, whatever its kind.
pub fn identifier(o: &Value) -> String {
    o.get("external_id")
        .or_else(|| o.get("braze_id"))
        .or_else(|| o.pointer("/user_alias/alias_name"))
        .and_then(Value::as_str)
        .unwrap_or("<none>")
        .to_owned()
}

pub fn creds() -> Credentials {
    Credentials {
        looker_client_id: CLIENT_ID.into(),
        looker_client_secret: Redacted::new(CLIENT_SECRET),
        braze_api_key: Some(Redacted::new(API_KEY)),
    }
}

/// Services whose retries wait milliseconds instead of seconds.
pub fn fast_services() -> Services {
    Services {
        retry: RetryPolicy {
            max_attempts: 6,
            base: Duration::from_millis(4),
            cap: Duration::from_millis(40),
            rate_limit_patience: Duration::from_secs(20),
            rate_limit_floor: Duration::from_millis(5),
            rate_limit_backoff_cap: Duration::from_millis(40),
        },
        ..Services::default()
    }
}

/// A field as Looker describes it.
pub fn field(name: &str, tags: &[&str]) -> Value {
    json!({"name": name, "label": name, "tags": tags, "hidden": false, "view": name.split('.').next()})
}

/// A row from (field, value) pairs, each cell shaped `{"value": …}` with a rendered copy.
pub fn row(cells: &[(&str, Value)]) -> Value {
    let mut r = serde_json::Map::new();
    for (name, value) in cells {
        r.insert(
            (*name).into(),
            json!({"value": value, "rendered": value.to_string()}),
        );
    }
    Value::Object(r)
}

/// Output of one run of the binary.
pub struct Cli {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cli {
    pub fn report(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// A temporary YAML file holding `yaml`.
pub fn write_spec(yaml: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    std::fs::write(f.path(), yaml).expect("write spec");
    f
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_braze-export-operator"))
}

/// Runs the binary with `args` and the three credential variables (minus `unset`), plus `env`.
pub async fn cli(args: &[&str], unset: &[&str], env: &[(&str, &str)]) -> Cli {
    let mut cmd = tokio::process::Command::new(binary());
    cmd.args(args)
        .env("LOOKERSDK_CLIENT_ID", CLIENT_ID)
        .env("LOOKERSDK_CLIENT_SECRET", CLIENT_SECRET)
        .env("BRAZE_API_KEY", API_KEY)
        .env_remove("RUST_LOG");
    for k in unset {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("binary finishes")
        .expect("binary runs");
    Cli {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `run --file <spec>` plus `extra` arguments, with the credentials (minus `unset`) and `env`.
pub async fn cli_spec(
    spec: &tempfile::NamedTempFile,
    extra: &[&str],
    unset: &[&str],
    env: &[(&str, &str)],
) -> Cli {
    let path = spec.path().to_str().expect("utf-8 path");
    let mut args = vec!["run", "--file", path];
    args.extend_from_slice(extra);
    cli(&args, unset, env).await
}

/// `run --file <spec> --output json` plus `extra` arguments.
pub async fn cli_run(yaml: &str, extra: &[&str]) -> (Cli, tempfile::NamedTempFile) {
    let spec = write_spec(yaml);
    let mut args = vec!["--output", "json"];
    args.extend_from_slice(extra);
    (cli_spec(&spec, &args, &[], &[]).await, spec)
}

/// The owner of the test exports' audiences (`metadata` of [`World::yaml`]).
pub fn owner() -> Owner {
    Owner {
        namespace: Some("marketing".into()),
        name: "test-export".into(),
    }
}

/// The audience a run left to store (panics when it kept the old one).
pub fn stored(result: &RunResult) -> Encoded {
    match &result.audience {
        AudienceUpdate::Replace(e) => e.clone(),
        AudienceUpdate::Keep => panic!("the run kept the old audience: {:#?}", result.report),
    }
}

/// The members of a stored audience, by identifier.
pub fn members(e: &Encoded) -> std::collections::BTreeMap<String, MemberState> {
    let a = braze_export_operator::audience::decode(e.parts().to_vec()).expect("audience decodes");
    a.members.into_iter().map(|m| (m.id, m.state)).collect()
}

/// A Look of the users `user-<i>` for each i, one row each, the id tagged `braze_id`.
pub fn look_of(ids: impl IntoIterator<Item = u64>) -> braze_export_operator::sandbox::Look {
    let fields = json!({"dimensions": [field("users.external_id", &["braze_id"])]});
    let rows = ids
        .into_iter()
        .map(|i| row(&[("users.external_id", json!(format!("user-{i:07}")))]))
        .collect();
    braze_export_operator::sandbox::Look::new(
        fields,
        braze_export_operator::sandbox::Rows::Fixed(rows),
    )
}

/// `user-<i>` for each i in `range`, as the users Look names them.
pub fn users(range: impl IntoIterator<Item = u64>) -> BTreeSet<String> {
    range.into_iter().map(|i| format!("user-{i:07}")).collect()
}
