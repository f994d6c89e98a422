//! Fake Looker and Braze APIs on loopback ports, faithful to the parts this product uses.
//! They serve the integration tests, the benchmark and the `demo` command, and record
//! every request so tests can assert exact payloads.

pub mod braze;
pub mod looker;

pub use braze::{BrazeSandbox, Fault, ResetForm, TrackRequest};
pub use looker::{Generator, Look, LookerAnswer, LookerRequest, LookerSandbox, Rows};

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Binds a loopback port and serves `router` on it until the handle is dropped or aborted.
async fn serve(router: axum::Router) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((addr, task))
}
