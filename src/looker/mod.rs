//! The Looker API 4.0 side: login, running a Look, and reading its `json_detail` stream.

pub mod api;
pub mod body;
pub mod cap;
pub mod client;
pub mod error;
pub mod hosts;
pub mod json_detail;

pub use api::{API_PREFIX, api_base};
pub use client::{LookLimit, LookRun, LookerClient};
pub use error::LookerError;
pub use hosts::AllowedHosts;
