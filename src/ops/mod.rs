//! Operations: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` server.

pub mod metrics;
pub mod server;
