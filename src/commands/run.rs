//! `braze-export-operator run`: one export, here and now, without Kubernetes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::load::load_export;
use crate::braze::PayloadDump;
use crate::export::{
    Credentials, ExportPlan, Progress, RunOptions, RunReport, Services, Trigger, run_export,
};
use crate::secret::Secret;

/// Exit code for bad input: unreadable file, invalid spec, missing credential.
pub const EXIT_BAD_INPUT: i32 = 2;

/// Environment variable with the Looker API client id.
pub const ENV_CLIENT_ID: &str = "LOOKERSDK_CLIENT_ID";
/// Environment variable with the Looker API client secret.
pub const ENV_CLIENT_SECRET: &str = "LOOKERSDK_CLIENT_SECRET";
/// Environment variable with the Braze REST API key.
pub const ENV_API_KEY: &str = "BRAZE_API_KEY";

/// How `run` prints its report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A few human lines.
    #[default]
    Text,
    /// The RunReport as JSON.
    Json,
}

/// Arguments of `run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// BrazeExport YAML file (other documents in it, such as Secrets, are ignored).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Read Looker and build every batch, but send nothing to Braze.
    #[arg(long)]
    pub dry_run: bool,
    /// Report format on stdout.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Write each request body to this file, one JSON line per request.
    #[arg(long, value_name = "PATH")]
    pub dump_payloads: Option<PathBuf>,
}

/// Bad input, reported before anything runs.
#[derive(Debug)]
pub struct BadInput(pub String);

/// Runs the command; returns the process exit code (0, 3, 1 or 2).
pub async fn run(args: RunArgs) -> i32 {
    match prepare(&args) {
        Err(BadInput(message)) => {
            eprintln!("error: {message}");
            EXIT_BAD_INPUT
        }
        Ok((plan, creds, dump)) => {
            let report = execute(&plan, &creds, &args, dump).await;
            print_report(
                &report,
                &report_title(&plan.name, &plan.look_id),
                args.output,
            );
            report.outcome.exit_code()
        }
    }
}

/// The first line of a text report: `Export NAME (Look ID)`.
pub fn report_title(name: &str, look_id: &str) -> String {
    format!("Export {name} (Look {look_id})")
}

/// Prints a report on stdout as `run` does (`trigger --wait` prints the same way).
pub fn print_report(report: &RunReport, title: &str, output: Output) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        ),
        Output::Text => print!("{}", report.to_text(title)),
    }
}

fn prepare(
    args: &RunArgs,
) -> Result<(ExportPlan, Credentials, Option<Arc<PayloadDump>>), BadInput> {
    let file = args.file.display();
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| BadInput(format!("cannot read {file}: {e}")))?;
    let doc = load_export(&text).map_err(|e| BadInput(format!("{file}: {e}")))?;
    let name = doc
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "unnamed".into());
    let plan = ExportPlan::new(&name, &doc.spec).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
        BadInput(format!("{file}: invalid spec:\n{}", lines.join("\n")))
    })?;
    let creds = credentials_from_env(args.dry_run)?;
    let dump = match &args.dump_payloads {
        Some(p) => {
            Some(Arc::new(PayloadDump::create(p).map_err(|e| {
                BadInput(format!("cannot write {}: {e}", p.display()))
            })?))
        }
        None => None,
    };
    Ok((plan, creds, dump))
}

/// Reads the credentials from the environment; a dry run needs no Braze key.
pub fn credentials_from_env(dry_run: bool) -> Result<Credentials, BadInput> {
    let var = |name: &str, what: &str| match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(BadInput(format!("missing credential: set {name} ({what})"))),
    };
    let looker_client_id = var(ENV_CLIENT_ID, "the Looker API client id")?;
    let looker_client_secret = Secret::new(var(ENV_CLIENT_SECRET, "the Looker API client secret")?);
    let braze_api_key = if dry_run {
        None
    } else {
        Some(Secret::new(var(
            ENV_API_KEY,
            "the Braze REST API key with users.track",
        )?))
    };
    Ok(Credentials {
        looker_client_id,
        looker_client_secret,
        braze_api_key,
    })
}

async fn execute(
    plan: &ExportPlan,
    creds: &Credentials,
    args: &RunArgs,
    dump: Option<Arc<PayloadDump>>,
) -> RunReport {
    let services = Services::default();
    let mut opts = RunOptions::new(Trigger::Cli);
    opts.dry_run = args.dry_run;
    opts.dump = dump;
    let cancel = opts.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("interrupted: stopping the run");
            cancel.cancel();
        }
    });
    let bar = progress_bar(Arc::clone(&opts.progress));
    let report = run_export(&services, plan, creds, opts).await;
    bar.finish_and_clear();
    report
}

/// A spinner with elapsed time and a message on stderr, drawn only when stderr is a terminal
/// (stdout stays the report's alone).
pub fn spinner() -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar
}

/// A spinner with live counts of this run.
fn progress_bar(progress: Arc<Progress>) -> ProgressBar {
    let bar = spinner();
    if !bar.is_hidden() {
        let b = bar.clone();
        tokio::spawn(async move {
            while !b.is_finished() {
                let read = progress.rows_read.load(Ordering::Relaxed);
                let sent = progress.sent.load(Ordering::Relaxed);
                b.set_message(format!("{read} rows read, {sent} users flagged"));
                b.tick();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    bar
}
