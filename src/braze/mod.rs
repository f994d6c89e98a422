//! The Braze side: endpoint check, request batches, the shared rate limiter, retries, and the
//! `/users/track` client.

pub mod batch;
pub mod budget;
pub mod client;
pub mod dump;
pub mod endpoint;
pub mod error;
pub mod limiter;
pub mod retry;
pub mod sizing;

pub use batch::Batch;
pub use budget::{Budget, Permit};
pub use client::{BrazeClient, Delivery, FailReason};
pub use dump::PayloadDump;
pub use error::BrazeError;
pub use limiter::{Limiter, LimiterRegistry};
pub use retry::RetryPolicy;
