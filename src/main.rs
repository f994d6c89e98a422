//! The `braze-export-operator` binary: argument parsing and wiring only.

use clap::{Parser, Subcommand};

use braze_export_operator::commands::{controller, demo, run};
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
    Controller(controller::ControllerArgs),
    /// Run one export described by a BrazeExport YAML file, here and now, without Kubernetes.
    ///
    /// Credentials come from LOOKERSDK_CLIENT_ID, LOOKERSDK_CLIENT_SECRET and BRAZE_API_KEY.
    /// Exit code: 0 Succeeded, 3 PartiallySucceeded, 1 Failed, 2 bad input.
    Run(run::RunArgs),
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
    let cli = Cli::parse();
    telemetry::init(cli.log_format, "warn,braze_export_operator=info");
    let code = match cli.command {
        Command::Controller(args) => controller::controller(args).await,
        Command::Run(args) => run::run(args).await,
        Command::Demo { rows } => demo::demo(rows).await,
        Command::Crd => {
            print!("{}", braze_export_operator::crd::crd_yaml());
            0
        }
    };
    std::process::exit(code);
}
