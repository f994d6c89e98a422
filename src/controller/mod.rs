//! The controller: watches BrazeExports, starts their runs on time, and writes what happened
//! to their status. Runs are tasks bounded by `--max-concurrent-runs`. With leader election,
//! every replica is Ready and only the Lease holder runs exports; a holder that cannot renew
//! stops its runs before another may take over (see [`lease`]).
//!
//! Imports run one way, from the top down (this file only declares and re-exports):
//! - [`serve`]: the leadership terms, a kube-runtime `Controller` per namespace;
//! - [`reconcile`]: one look at one export: the pure [`step`], then [`effect`], or a start;
//! - [`run_task`] and [`cleanup`]: a run in its own task, a deleted export's cleanup;
//! - the leaves, which import nothing above them: [`effect`] (write, publish, next action),
//!   [`writer`] (status writes), [`events`], [`credentials`], [`audience_store`],
//!   [`key_hold`] (the Braze key Secret held for a cleanup), [`finalizer`], [`retry`],
//!   [`timeouts`], [`context`], [`error`];
//! - the pure parts: [`step`], [`flags`], [`status`], [`watched`], [`freshness`], [`gauges`].

pub mod audience_store;
pub mod audiences;
pub mod cleanup;
pub mod config;
pub mod context;
pub mod credentials;
pub mod effect;
pub mod error;
pub mod events;
pub mod finalizer;
pub mod flags;
pub mod freshness;
pub mod gauges;
pub mod key_hold;
pub mod lease;
pub mod pending_store;
pub mod reconcile;
pub mod retry;
pub mod run_task;
pub mod serve;
pub mod status;
pub mod step;
pub mod timeouts;
pub mod watched;
pub mod writer;

pub use config::{CONTROLLER_NAME, Config};
pub use context::{Context, TaskKind};
pub use error::Error;
pub use gauges::{OVERDUE_AFTER, StoreSlot, cached, overdue_count, refresh_gauges};
pub use lease::LeaderElection;
pub use serve::{RECONCILE_CONCURRENCY, serve};
