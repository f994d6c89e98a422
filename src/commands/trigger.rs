//! `braze-export-operator trigger` (also `kubectl bzx trigger`): sets the run-now annotation of
//! a BrazeExport in the cluster and, with `--wait`, watches that one object until the run it
//! asked for ends; then prints the run's report and exits as `run` does.

use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt;
use indicatif::ProgressBar;
use jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::run::{EXIT_BAD_INPUT, Output, print_report, report_title, spinner};
use super::run_request::{Phase, fresh_request, parse_timeout, phase, timeout_message};
use crate::export::report::RunReport;
use crate::schedule::{DISCARD_AUDIENCE_ANNOTATION, RUN_NOW_ANNOTATION};
use crate::spec::{BrazeExport, BrazeExportStatus};

/// Exit code when `--timeout` passes before the run ends.
pub const EXIT_TIMEOUT: i32 = 4;

/// Arguments of `trigger`.
#[derive(Clone, Debug, clap::Args)]
pub struct TriggerArgs {
    /// Name of the BrazeExport.
    pub name: String,
    /// Its namespace (default: the namespace of the kubeconfig's current context).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Wait for the run to end, print its report and exit like `run`.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (90s, 30m, 1h), with exit code 4.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = parse_timeout, requires = "wait")]
    pub timeout: Duration,
    /// Start this run without the export's stored audience (a first run: everyone is sent,
    /// nobody removed) and store a new one: sets looker-braze.dev/discard-audience to the
    /// request's value too.
    #[arg(long)]
    pub discard_audience: bool,
    /// Output on stdout: the report with --wait, else the annotation's value.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Why the command ends without a report: the exit code and a message for stderr.
#[derive(Debug)]
struct Stop {
    code: i32,
    message: String,
}

impl Stop {
    fn bad_input(message: String) -> Self {
        Self {
            code: EXIT_BAD_INPUT,
            message,
        }
    }
}

/// Runs the command; returns the exit code: with `--wait` 0, 3 or 1 from the run's outcome,
/// 4 on timeout; 2 for bad input; 0 once the run is requested without `--wait`.
pub async fn trigger(args: TriggerArgs) -> i32 {
    crate::http::install_crypto_provider();
    match request_run(&args).await {
        Ok(code) => code,
        Err(stop) => {
            eprintln!("error: {}", stop.message);
            stop.code
        }
    }
}

async fn request_run(args: &TriggerArgs) -> Result<i32, Stop> {
    let export = Export::connect(args).await?;
    let current = export.get().await?;
    let handled = status_of(&current).and_then(|s| s.last_handled_run_request);
    let annotation = current
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RUN_NOW_ANNOTATION));
    let request = fresh_request(
        Timestamp::now(),
        &[annotation.map(String::as_str), handled.as_deref()],
    );
    export.annotate(&request, args.discard_audience).await?;
    if !args.wait {
        print_request(&export, &request, args.output);
        return Ok(0);
    }
    let report = export.wait_for(&request, args.timeout).await?;
    print_report(
        &report,
        &report_title(&export.name, &look_id(&current)),
        args.output,
    );
    Ok(report.outcome.exit_code())
}

fn print_request(export: &Export, request: &str, output: Output) {
    match output {
        Output::Text => println!("{request}"),
        Output::Json => println!(
            "{}",
            json!({"namespace": export.namespace, "name": export.name, "annotation": RUN_NOW_ANNOTATION, "runRequest": request})
        ),
    }
    eprintln!(
        "run requested for {}; follow it with: kubectl get bzx {} -n {} -w",
        export.key(),
        export.name,
        export.namespace
    );
}

/// The status, if it reads as one (a status this version does not know reads as none).
fn status_of(obj: &DynamicObject) -> Option<BrazeExportStatus> {
    serde_json::from_value(obj.data.get("status")?.clone()).ok()
}

fn look_id(obj: &DynamicObject) -> String {
    match obj.data.pointer("/spec/looker/lookId") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "?".into(),
    }
}

/// One BrazeExport in the cluster, read as a dynamic object: only metadata, the Look id and
/// the status matter here, so spec fields of a newer operator never break the command.
struct Export {
    api: Api<DynamicObject>,
    namespace: String,
    name: String,
    /// The API server's URL, for messages.
    server: String,
}

impl Export {
    /// A client from the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or the in-cluster config.
    async fn connect(args: &TriggerArgs) -> Result<Self, Stop> {
        let no_config = |e: &dyn std::fmt::Display| {
            Stop::bad_input(format!(
                "cannot connect to Kubernetes (kubeconfig, KUBECONFIG or in-cluster config): {e}"
            ))
        };
        let config = kube::Config::infer().await.map_err(|e| no_config(&e))?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| no_config(&e))?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let resource = ApiResource::erase::<BrazeExport>(&());
        Ok(Self {
            api: Api::namespaced_with(client, &namespace, &resource),
            namespace,
            name: args.name.clone(),
            server,
        })
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    async fn get(&self) -> Result<DynamicObject, Stop> {
        self.api
            .get(&self.name)
            .await
            .map_err(|e| self.api_error("read", &e))
    }

    /// Sets the run-now annotation to `request` (and, with `discard`, the discard-audience
    /// annotation to the same value, in the same write: the run reads both).
    async fn annotate(&self, request: &str, discard: bool) -> Result<(), Stop> {
        let mut annotations = json!({RUN_NOW_ANNOTATION: request});
        if discard {
            annotations[DISCARD_AUDIENCE_ANNOTATION] = json!(request);
        }
        let patch = json!({"metadata": {"annotations": annotations}});
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|e| self.api_error("annotate", &e))
    }

    /// Bad input: the message names the export and what went wrong, never a credential.
    fn api_error(&self, action: &str, e: &kube::Error) -> Stop {
        let key = self.key();
        Stop::bad_input(match e {
            kube::Error::Api(s) if s.is_not_found() => format!(
                "no BrazeExport {} in namespace {} (kubectl get bzx -n {} lists them)",
                self.name, self.namespace, self.namespace
            ),
            kube::Error::Api(s) if s.is_forbidden() => format!(
                "not allowed to {action} BrazeExport {key}: {} (trigger needs get, list, watch and patch on brazeexports)",
                s.message
            ),
            kube::Error::Api(s) => {
                format!(
                    "cannot {action} BrazeExport {key}: {} ({})",
                    s.message, s.code
                )
            }
            kube::Error::Service(_) | kube::Error::HyperError(_) => format!(
                "cannot reach the Kubernetes API at {} to {action} BrazeExport {key}: {e}",
                self.server
            ),
            other => format!("cannot {action} BrazeExport {key}: {other}"),
        })
    }

    /// Watches the export until the run for `request` ends, at most `timeout`, showing what
    /// it does on a terminal.
    async fn wait_for(&self, request: &str, timeout: Duration) -> Result<RunReport, Stop> {
        let bar = spinner();
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(100));
        }
        let mut last = Phase::NotPickedUp { held_by: None };
        bar.set_message(last.describe());
        let result = tokio::time::timeout(timeout, self.follow(request, &mut last, &bar)).await;
        bar.finish_and_clear();
        result.unwrap_or_else(|_| {
            Err(Stop {
                code: EXIT_TIMEOUT,
                message: timeout_message(&self.namespace, &self.name, timeout, &last),
            })
        })
    }

    /// Follows the watch of this one object (field selector on its name), updating `last`.
    async fn follow(
        &self,
        request: &str,
        last: &mut Phase,
        bar: &ProgressBar,
    ) -> Result<RunReport, Stop> {
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = pin!(watcher::watcher(self.api.clone(), config).default_backoff());
        let mut seen = false;
        while let Some(event) = events.next().await {
            let Some(obj) = self.object_of(event, &mut seen)? else {
                continue;
            };
            *last = phase(status_of(&obj).as_ref(), obj.metadata.generation, request);
            bar.set_message(last.describe());
            if let Some(end) = self.end_at(last) {
                return end;
            }
        }
        Err(Stop::bad_input(format!(
            "the watch of BrazeExport {} ended",
            self.key()
        )))
    }

    /// The object a watch event shows, if any. As in kube's `watch_object`, a delete, or an
    /// initial list without the object (`seen` tracks it), means the export is gone.
    fn object_of(
        &self,
        event: watcher::Result<Event<DynamicObject>>,
        seen: &mut bool,
    ) -> Result<Option<DynamicObject>, Stop> {
        match event {
            Ok(Event::Init) => {
                *seen = false;
                Ok(None)
            }
            Ok(Event::InitApply(o)) => {
                *seen = true;
                Ok(Some(o))
            }
            Ok(Event::Apply(o)) => Ok(Some(o)),
            Ok(Event::InitDone) if *seen => Ok(None),
            Ok(Event::InitDone | Event::Delete(_)) => Err(self.deleted()),
            Err(e) => self.watch_failed(e).map(|()| None),
        }
    }

    /// How waiting ends at `phase`, if it does: with the run's report, or because the export
    /// cannot run.
    fn end_at(&self, phase: &Phase) -> Option<Result<RunReport, Stop>> {
        match phase {
            Phase::Ended(report) => Some(Ok((**report).clone())),
            Phase::Refused(why) => Some(Err(Stop::bad_input(format!(
                "BrazeExport {} cannot run until its spec is fixed: {why}",
                self.key()
            )))),
            _ => None,
        }
    }

    fn deleted(&self) -> Stop {
        Stop::bad_input(format!(
            "BrazeExport {} was deleted while waiting for its run",
            self.key()
        ))
    }

    /// A refused watch stops the command; other watch errors are retried (with backoff).
    fn watch_failed(&self, e: watcher::Error) -> Result<(), Stop> {
        match &e {
            watcher::Error::InitialListFailed(k)
            | watcher::Error::WatchStartFailed(k)
            | watcher::Error::WatchFailed(k)
                if matches!(k, kube::Error::Api(s) if s.is_forbidden()) =>
            {
                Err(self.api_error("watch", k))
            }
            _ => {
                tracing::warn!(export = %self.key(), error = %e, "the watch failed; retrying");
                Ok(())
            }
        }
    }
}
