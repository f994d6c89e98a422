//! Logging: `tracing` to stderr, as text or JSON, filtered by `RUST_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// kube's client logs the whole body of an answer it cannot decode at warn: a Secret's
/// included. That target is silenced whatever `RUST_LOG` says; the operator reports every
/// API failure itself, naming the object and the field instead.
pub const QUIET_BODIES: &str = "kube_client::client=off";

/// Installs the global subscriber. `RUST_LOG` wins over `default_filter`, except for
/// [`QUIET_BODIES`].
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter))
        .add_directive(QUIET_BODIES.parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
