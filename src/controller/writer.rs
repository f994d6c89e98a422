//! Status writes that a late or stale writer cannot win.
//!
//! Every write is a server-side apply of the whole status by the field manager
//! `braze-export-operator` (so fields it no longer sets are removed), carrying the object's
//! `uid` (never onto a recreated namesake) and the `resourceVersion` the decision was made on
//! (never from a stale cache, never after someone else wrote). A conflict is an answer, not a
//! failure: the caller looks again.

use std::sync::Mutex;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::watched::Watched;
use super::{CONTROLLER_NAME, Error};
use crate::spec::{API_VERSION, BrazeExport, BrazeExportStatus, KIND};

/// Longest wait for one status write: a partitioned apiserver must not hold a run's end.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies `status` to the object `name` if it still has `uid` and `resource_version`;
/// returns the new `resourceVersion`. The answer is read as [`Watched`], so a write to an
/// export this version cannot decode succeeds as such.
pub async fn apply(
    api: &Api<Watched>,
    name: &str,
    uid: &str,
    resource_version: Option<&str>,
    status: &BrazeExportStatus,
) -> Result<String, Error> {
    let mut metadata = json!({ "name": name, "uid": uid });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    let body = json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "status": status,
    });
    // Forced: the operator is the status's only writer; an older version's merge patches
    // left their fields under an `Update` entry of the same manager name.
    let params = PatchParams::apply(CONTROLLER_NAME).force();
    let written = tokio::time::timeout(
        WRITE_TIMEOUT,
        api.patch_status(name, &params, &Patch::Apply(body)),
    )
    .await
    .map_err(|_| Error::Timeout("writing the status"))?
    .map_err(Error::from_kube)?;
    Ok(written.resource_version().unwrap_or_default())
}

/// The status writes of one run: each one chained on the `resourceVersion` of the last, and
/// owned by `runner`. After a conflict (someone changed the object, e.g. an annotation), the
/// write is retried on the fresh version only while the object is still the same one and its
/// status still names this runner as running it.
pub struct RunWriter {
    api: Api<Watched>,
    name: String,
    uid: String,
    runner: String,
    resource_version: Mutex<Option<String>>,
}

impl RunWriter {
    /// A writer for `export`, starting from `resource_version`.
    pub fn new(api: Api<Watched>, export: &BrazeExport, runner: &str) -> Self {
        Self {
            api,
            name: export.name_any(),
            uid: export.uid().unwrap_or_default(),
            runner: runner.to_owned(),
            resource_version: Mutex::new(export.resource_version()),
        }
    }

    fn version(&self) -> Option<String> {
        self.resource_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_version(&self, rv: String) {
        *self
            .resource_version
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(rv);
    }

    /// Writes the status that starts the run: no retry on a conflict, since then the decision
    /// to run was made on an outdated object.
    pub async fn start(&self, status: &BrazeExportStatus) -> Result<(), Error> {
        let rv = apply(
            &self.api,
            &self.name,
            &self.uid,
            self.version().as_deref(),
            status,
        )
        .await?;
        self.set_version(rv);
        Ok(())
    }

    /// Writes a status of the running run. [`Error::Lost`] when the run is no longer ours.
    pub async fn write(&self, status: &BrazeExportStatus) -> Result<(), Error> {
        for _ in 0..3 {
            match apply(
                &self.api,
                &self.name,
                &self.uid,
                self.version().as_deref(),
                status,
            )
            .await
            {
                Ok(rv) => {
                    self.set_version(rv);
                    return Ok(());
                }
                Err(Error::Conflict(_)) => {
                    let fresh = tokio::time::timeout(WRITE_TIMEOUT, self.api.get_opt(&self.name))
                        .await
                        .map_err(|_| Error::Timeout("reading the export"))?
                        .map_err(Error::from_kube)?;
                    match fresh {
                        Some(f) if self.still_ours(&f) => {
                            self.set_version(f.resource_version().unwrap_or_default());
                        }
                        _ => return Err(Error::Lost),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict("the export keeps changing".into()))
    }

    fn still_ours(&self, fresh: &Watched) -> bool {
        let status = match fresh {
            Watched::Decoded(e) => e.status.as_ref(),
            Watched::Undecodable(u) => u.status.as_ref(),
        };
        fresh.uid().as_deref() == Some(self.uid.as_str())
            && status.is_some_and(|s| {
                s.runner.as_deref() == Some(self.runner.as_str()) && super::status::is_running(s)
            })
    }
}
