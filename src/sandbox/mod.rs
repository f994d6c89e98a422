//! Fake Looker and Braze APIs on loopback ports, faithful to the parts this product uses.
//! They serve the integration tests, the benchmark and the `demo` command, and record
//! every request so tests can assert exact payloads.

pub mod braze;
mod listen;
pub mod looker;

pub use braze::{BrazeSandbox, Fault, ResetForm, TrackRequest};
pub use looker::{Generator, Look, LookerAnswer, LookerRequest, LookerSandbox, Rows};
