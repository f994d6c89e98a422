//! The subcommands' bodies; `main.rs` only parses arguments and calls these.

pub mod controller;
pub mod demo;
pub mod load;
pub mod pending_files;
pub mod plugin;
pub mod run;
pub mod run_request;
pub mod trigger;
