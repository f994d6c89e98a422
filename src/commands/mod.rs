//! The subcommands' bodies; `main.rs` only parses arguments and calls these.

pub mod controller;
pub mod demo;
pub mod load;
pub mod run;
