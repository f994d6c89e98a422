//! `braze-export-operator run`: one export, here and now, without Kubernetes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::load::load_export;
use super::pending_files::PendingFiles;
use crate::audience::{self, Encoded, Owner};
use crate::braze::PayloadDump;
use crate::bucket::{AudienceObjects, Bucket, BucketSettings, PendingObjects};
use crate::export::{
    AudienceInput, AudienceUpdate, Credentials, ExportPlan, Progress, RunOptions, RunReport,
    Services, Trigger, run_export_synced,
};
use crate::redacted::Redacted;
use crate::spill::Scratch;

/// Longest write of one pending record to a bucket.
const BUCKET_RECORD_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Keep the export's audience (the users it flagged) in this file between runs:
    /// created by the first run, replaced atomically after each. Needed by
    /// `removal: Remove` and `delta: true`. It holds user identifiers: keep it private.
    /// `s3://BUCKET/KEY`: in an S3-compatible bucket instead, objects under KEY/ (the
    /// endpoint, region, credentials and server-side encryption from the AWS_* environment:
    /// AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    /// AWS_SERVER_SIDE_ENCRYPTION, AWS_SSE_KMS_KEY_ID).
    #[arg(long, value_name = "FILE|s3://BUCKET/KEY")]
    pub state: Option<PathBuf>,
    /// With `delta: true`: send everyone this run (a full resync), whatever
    /// `fullResyncInterval` says.
    #[arg(long)]
    pub full_resync: bool,
    /// With `removal: Remove`: remove users who left even beyond `removalLimitPercent` (or
    /// everyone, when the Look returned nothing), for this run only.
    #[arg(long)]
    pub allow_removal: bool,
    /// Where the run sorts what does not fit in memory: the users of a large Look or
    /// audience (default: the system's temporary directory). Files there are anonymous and
    /// gone when the run ends.
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
}

/// Bad input, reported before anything runs.
#[derive(Debug)]
pub struct BadInput(pub String);

/// Everything `run` checked before running.
struct Prepared {
    plan: ExportPlan,
    creds: Credentials,
    dump: Option<Arc<PayloadDump>>,
    audience: Option<AudienceInput>,
    /// The pending records the run read and the log it writes them with.
    records: Option<Records>,
}

/// The pending records a run read, and the log it writes its own with.
#[derive(Clone)]
enum Records {
    /// Beside a state file.
    Files(Vec<PathBuf>, Arc<PendingFiles>),
    /// Beside the audience's objects in a bucket.
    Bucket(AudienceObjects, Vec<String>, Arc<PendingObjects>),
}

/// The bucket `--state` names, when it names one.
fn state_bucket(state: &Path, scratch: Option<&Path>) -> Option<Result<AudienceObjects, BadInput>> {
    let url = state.to_str()?;
    url.starts_with(crate::bucket::SCHEME).then(|| {
        let settings = BucketSettings {
            from_env: true,
            ..BucketSettings::default()
        };
        let bucket = Bucket::open(url, "--state", &settings).map_err(|e| BadInput(e.to_string()))?;
        let objects = bucket.audience("");
        let objects = objects.with_scratch(Scratch::new(scratch.map(Path::to_path_buf)));
        if objects.shown().ends_with('/') {
            return Err(BadInput(format!(
                "--state {url}: name a key in the bucket (s3://BUCKET/KEY): the audience's objects go under it"
            )));
        }
        Ok(objects)
    })
}

/// Saves the run's audience where `--state` says, then deletes the pending records it took
/// in; a failure to save is an error (exit 1).
async fn save_state(
    path: &std::path::Path,
    encoded: &Encoded,
    records: Option<Records>,
) -> Result<(), String> {
    match records {
        Some(Records::Bucket(objects, mut gone, log)) => {
            objects
                .save(encoded)
                .await
                .map_err(|e| format!("cannot save the audience to {}: {e}", objects.shown()))?;
            gone.extend(log.written());
            objects.delete_records(&gone).await;
        }
        other => {
            audience::write_file(path, encoded)
                .map_err(|e| format!("cannot write the state file {}: {e}", path.display()))?;
            // Only once the new state is on disk: it holds the records' users.
            let mut gone = Vec::new();
            if let Some(Records::Files(read, log)) = other {
                gone = read;
                gone.extend(log.written());
            }
            if let Err(e) = audience::remove_pending(&gone) {
                eprintln!(
                    "warning: cannot delete the pending records beside {}: {e}",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// Runs the command; returns the process exit code (0, 3, 1 or 2).
pub async fn run(args: RunArgs) -> i32 {
    match prepare(&args).await {
        Err(BadInput(message)) => {
            eprintln!("error: {message}");
            EXIT_BAD_INPUT
        }
        Ok(p) => {
            let title = report_title(&p.plan.name, &p.plan.look_id);
            let records = p.records.clone();
            let (report, update) = execute(p, &args).await;
            print_report(&report, &title, args.output);
            if let (Some(path), AudienceUpdate::Replace(encoded)) = (&args.state, &update)
                && let Err(e) = save_state(path, encoded, records).await
            {
                eprintln!("error: {e}");
                return 1;
            }
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

async fn prepare(args: &RunArgs) -> Result<Prepared, BadInput> {
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
    let owner = Owner {
        namespace: doc.metadata.namespace.clone(),
        name,
    };
    let (audience, records) = match load_state(args, &plan, owner).await? {
        Some((input, records)) => (Some(input), Some(records)),
        None => (None, None),
    };
    let creds = credentials_from_env(args.dry_run)?;
    let dump = match &args.dump_payloads {
        Some(p) => Some(Arc::new(PayloadDump::create(p).map_err(|e| {
            BadInput(format!("--dump-payloads {}: {e}", p.display()))
        })?)),
        None => None,
    };
    Ok(Prepared {
        plan,
        creds,
        dump,
        audience,
        records,
    })
}

/// Reads and checks `--state`: a file of another export or identifier type, or a damaged
/// one, is refused (never used, never overwritten).
async fn load_state(
    args: &RunArgs,
    plan: &ExportPlan,
    owner: Owner,
) -> Result<Option<(AudienceInput, Records)>, BadInput> {
    let Some(path) = &args.state else {
        if plan.needs_audience() {
            return Err(BadInput(format!(
                "{}: spec.braze.removal: Remove and spec.braze.delta: true need --state FILE: the file keeps the export's audience (the users it flagged) between runs, so that users who leave the Look lose the flag and users already flagged are not sent again",
                args.file.display()
            )));
        }
        return Ok(None);
    };
    let bucket = state_bucket(path, args.scratch_dir.as_deref()).transpose()?;
    let refuse = |why: String| match &bucket {
        Some(objects) => BadInput(format!(
            "the stored audience {} cannot be used: {why}",
            objects.shown()
        )),
        None => BadInput(format!(
            "the state file {} cannot be used: {why}",
            path.display()
        )),
    };
    let (previous, records) = match &bucket {
        Some(objects) => {
            let (previous, read) = objects
                .load_with_pending()
                .await
                .map_err(|e| refuse(e.to_string()))?;
            let log = Arc::new(objects.pending_log(jiff::Timestamp::now(), BUCKET_RECORD_TIMEOUT));
            (previous, Records::Bucket(objects.clone(), read, log))
        }
        None => {
            let main: Option<Encoded> =
                audience::read_file(path).map_err(|e| refuse(e.to_string()))?;
            let (read, pending): (Vec<PathBuf>, Vec<Encoded>) = audience::read_pending(path)
                .map_err(|e| refuse(e.to_string()))?
                .into_iter()
                .unzip();
            // The records of runs that stopped before they saved: their users are members too.
            let previous = Encoded::with_pending(main, pending).map_err(refuse)?;
            let log = Arc::new(PendingFiles::new(path.clone()));
            (previous, Records::Files(read, log))
        }
    };
    if let Some(p) = &previous {
        let alias = (plan.shape.identifier == crate::spec::IdentifierKind::UserAlias)
            .then_some(plan.shape.alias_label.as_str());
        p.header()
            .check(&owner, plan.shape.identifier, alias)
            .map_err(refuse)?;
        p.verify().map_err(|e| refuse(e.to_string()))?;
    }
    let log: Arc<dyn crate::export::PendingLog> = match &records {
        Records::Files(_, log) => Arc::clone(log) as _,
        Records::Bucket(_, _, log) => Arc::clone(log) as _,
    };
    let input = AudienceInput {
        owner,
        previous,
        pending_log: Some(log),
    };
    Ok(Some((input, records)))
}

/// Reads the credentials from the environment; a dry run needs no Braze key.
pub fn credentials_from_env(dry_run: bool) -> Result<Credentials, BadInput> {
    let var = |name: &str, what: &str| match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(BadInput(format!("missing credential: set {name} ({what})"))),
    };
    let looker_client_id = var(ENV_CLIENT_ID, "the Looker API client id")?;
    let looker_client_secret =
        Redacted::new(var(ENV_CLIENT_SECRET, "the Looker API client secret")?);
    let braze_api_key = if dry_run {
        None
    } else {
        Some(Redacted::new(var(
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

async fn execute(p: Prepared, args: &RunArgs) -> (RunReport, AudienceUpdate) {
    let services = Services::default();
    let mut opts = RunOptions::new(Trigger::Cli);
    opts.dry_run = args.dry_run;
    opts.dump = p.dump;
    opts.full_resync = args.full_resync;
    opts.allow_removal_over_limit = args.allow_removal;
    opts.spill.scratch = crate::spill::Scratch::new(args.scratch_dir.clone());
    // The new audience is built beside the state file, then renamed over it; for a state in
    // a bucket (`s3://`), in the scratch directory, then uploaded from there.
    if let Some(state) = &args.state {
        let in_bucket = state
            .to_str()
            .is_some_and(|s| s.starts_with(crate::bucket::SCHEME));
        opts.audience_output = audience::Output::Beside(if in_bucket {
            opts.spill.scratch.dir().join("audience")
        } else {
            state.clone()
        });
    }
    let cancel = opts.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("interrupted: stopping the run");
            cancel.cancel();
        }
    });
    let bar = progress_bar(Arc::clone(&opts.progress));
    let result = run_export_synced(&services, &p.plan, &p.creds, opts, p.audience).await;
    bar.finish_and_clear();
    (result.report, result.audience)
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
