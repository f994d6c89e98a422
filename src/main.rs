//! The `braze-export-operator` binary: argument parsing and wiring only.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use braze_export_operator::commands::{controller, demo, plugin, run, trigger};
use braze_export_operator::telemetry::{self, LogFormat};

/// Exports Looker Looks to Braze user flags.
#[derive(Debug, Parser)]
#[command(name = "braze-export-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format on stderr (filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the operator: watch BrazeExports and run them on their schedules.
    Controller(Box<controller::ControllerArgs>),
    /// Run one export described by a BrazeExport YAML file, here and now, without Kubernetes.
    ///
    /// Credentials come from LOOKERSDK_CLIENT_ID, LOOKERSDK_CLIENT_SECRET and BRAZE_API_KEY.
    /// Exit code: 0 Succeeded, 3 PartiallySucceeded, 1 Failed, 2 bad input.
    Run(run::RunArgs),
    /// Ask the operator to run an export now (the run-now annotation), and with --wait wait
    /// for that run and print its report.
    ///
    /// Uses the current kubeconfig (or the in-cluster config), like kubectl. Exit code with
    /// --wait: 0 Succeeded, 3 PartiallySucceeded, 1 Failed or Interrupted, 2 bad input (no
    /// such export, no cluster access), 4 when --timeout passes first.
    Trigger(trigger::TriggerArgs),
    /// Print the BrazeExport CustomResourceDefinition as YAML (what `crds/` holds).
    Crd,
    /// Start the sandbox Looker and Braze on loopback and run the example export through them.
    Demo {
        /// Rows in the sandbox Look.
        #[arg(long, default_value_t = 1000)]
        rows: u64,
    },
}

#[tokio::main]
async fn main() {
    let cli = parse();
    telemetry::init(cli.log_format, default_log_filter(&cli.command));
    let code = match cli.command {
        Command::Controller(args) => controller::controller(*args).await,
        Command::Run(args) => run::run(args).await,
        Command::Trigger(args) => trigger::trigger(args).await,
        Command::Demo { rows } => demo::demo(rows).await,
        Command::Crd => {
            print!("{}", braze_export_operator::crd::crd_yaml());
            0
        }
    };
    std::process::exit(code);
}

/// Log filter unless `RUST_LOG` says otherwise. `trigger` is a client: its own messages say
/// what went wrong, so the libraries' error lines would only repeat them.
fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Trigger(_) => "off,braze_export_operator=warn",
        _ => "warn,braze_export_operator=info",
    }
}

/// Parses the arguments; invoked as `kubectl-bzx`, help and usage say `kubectl bzx`.
fn parse() -> Cli {
    let mut command = Cli::command();
    if let Some(name) = std::env::args_os()
        .next()
        .and_then(|argv0| plugin::bin_name(&argv0))
    {
        command = command.bin_name(name);
    }
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
