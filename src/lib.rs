//! braze-export-operator: exports Looker Looks to Braze user flags, as declared
//! `BrazeExport` resources or one run at a time from the command line.
//!
//! The data path of one run, left to right: [`spec`] → [`export::plan`] → [`looker`] (login,
//! streamed `json_detail`) → [`export::mapping`] (pure) → [`braze`] (batches, shared limiter,
//! retries) → [`export::report`]. The [`sandbox`] serves fake Looker and Braze APIs for
//! tests and the `demo` command.

pub mod audience;
pub mod braze;
pub mod bucket;
pub mod commands;
pub mod controller;
pub mod crd;
pub mod cron;
pub mod export;
pub mod http;
pub mod looker;
pub mod ops;
pub mod private_file;
pub mod redacted;
pub mod sandbox;
pub mod schedule;
pub mod spec;
pub mod spill;
pub mod telemetry;
pub mod text;
