//! Status writes that a late or stale writer cannot win.
//!
//! Every write is a server-side apply of the whole status by the field manager
//! `braze-export-operator` (so fields it no longer sets are removed), carrying the object's
//! `uid` (never onto a recreated namesake) and the `resourceVersion` the decision was made on
//! (never from a stale cache, never after someone else wrote). A conflict is an answer, not a
//! failure: the caller looks again.

use std::sync::Mutex;

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::config::CONTROLLER_NAME;
use super::context::Context;
use super::error::Error;
use super::retry::{self, retry};
use super::timeouts::API_TIMEOUT;
use super::watched::{Undecodable, Watched};
use crate::ops::metrics::Metrics;
use crate::spec::{API_VERSION, BrazeExport, BrazeExportStatus, KIND};

/// Writes `next` if the export is still the version `export` shows; returns the new version.
pub async fn write(
    ctx: &Context,
    export: &BrazeExport,
    next: &BrazeExportStatus,
) -> Result<String, Error> {
    let api: Api<Watched> =
        Api::namespaced(ctx.client.clone(), &export.namespace().unwrap_or_default());
    apply_status(
        &api,
        &export.name_any(),
        &export.uid().unwrap_or_default(),
        export.resource_version().as_deref(),
        next,
    )
    .await
}

/// Writes `next` to an export this version cannot decode, if it is still the version `u`
/// shows.
pub async fn write_undecodable(
    ctx: &Context,
    u: &Undecodable,
    next: &BrazeExportStatus,
) -> Result<String, Error> {
    let meta = &u.metadata;
    let api: Api<Watched> = Api::namespaced(
        ctx.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
    );
    apply_status(
        &api,
        meta.name.as_deref().unwrap_or_default(),
        meta.uid.as_deref().unwrap_or_default(),
        meta.resource_version.as_deref(),
        next,
    )
    .await
}

/// Writes `next(current status)` to the export `name` as it is now, if it still has `uid`
/// (read fresh, and again after a conflict): for a writer that keeps no version of its own,
/// such as a cleanup's end. [`Error::Gone`] when the export is gone or recreated.
pub async fn write_fresh(
    api: &Api<Watched>,
    name: &str,
    uid: &str,
    next: impl Fn(&BrazeExportStatus) -> BrazeExportStatus,
) -> Result<(), Error> {
    let attempt = |_| async {
        let fresh = tokio::time::timeout(API_TIMEOUT, api.get_opt(name))
            .await
            .map_err(|_| Error::Timeout("reading the export"))??;
        let Some(Watched::Decoded(export)) = fresh.filter(|f| f.uid().as_deref() == Some(uid))
        else {
            return Err(Error::Gone);
        };
        let status = next(&export.status.clone().unwrap_or_default());
        let rv = export.resource_version();
        apply_status(api, name, uid, rv.as_deref(), &status)
            .await
            .map(drop)
    };
    retry(retry::STATUS_CONFLICT, attempt, |e, _| {
        matches!(e, Error::Conflict(_))
    })
    .await
}

/// Applies `status` to the object `name` if it still has `uid` and `resource_version`;
/// returns the new `resourceVersion`. The answer is read as [`Watched`], so a write to an
/// export this version cannot decode succeeds as such.
pub async fn apply_status(
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
        API_TIMEOUT,
        api.patch_status(name, &params, &Patch::Apply(body)),
    )
    .await
    .map_err(|_| Error::Timeout("writing the status"))?
    .map_err(Error::from_kube)?;
    Ok(written.resource_version().unwrap_or_default())
}

/// The status writes of one run: each one chained on the `resourceVersion` of the last, and
/// owned by this operator `instance` (`status.runner`). After a conflict (someone changed the
/// object, e.g. an annotation), the write is retried on the fresh version only while the
/// object is still the same one and its status still names this instance as running it.
pub struct RunWriter {
    api: Api<Watched>,
    name: String,
    uid: String,
    instance: String,
    resource_version: Mutex<Option<String>>,
}

impl RunWriter {
    /// A writer for `export`, starting from its `resourceVersion`.
    pub fn new(api: Api<Watched>, export: &BrazeExport, instance: &str) -> Self {
        Self {
            api,
            name: export.name_any(),
            uid: export.uid().unwrap_or_default(),
            instance: instance.to_owned(),
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
        self.try_write(status).await
    }

    async fn try_write(&self, status: &BrazeExportStatus) -> Result<(), Error> {
        let version = self.version();
        let rv = apply_status(&self.api, &self.name, &self.uid, version.as_deref(), status).await?;
        self.set_version(rv);
        Ok(())
    }

    /// Writes a status of the running run. [`Error::Lost`] when the run is no longer ours.
    pub async fn write(&self, status: &BrazeExportStatus) -> Result<(), Error> {
        let attempt = |_| async {
            match self.try_write(status).await {
                // Retried on the fresh version, if the run is still ours.
                Err(Error::Conflict(why)) => Err(self
                    .refresh()
                    .await
                    .map_or_else(|e| e, |()| Error::Conflict(why))),
                other => other,
            }
        };
        retry(retry::STATUS_CONFLICT, attempt, |e, _| {
            matches!(e, Error::Conflict(_))
        })
        .await
    }

    /// Writes the run's final status until it is recorded: given up too early, this process
    /// would take its own finished run for a crash and run it again. Only a term that ended
    /// (`stop`: its successor judges), a run that is no longer ours, or an apiserver that
    /// refuses the write for good (403 or 422, [`Error::refusal`]: after
    /// [`retry::FINAL_STATUS_REFUSED_TRIES`] tries, logged and counted in `metrics`) stops the
    /// retries.
    pub async fn write_final(
        &self,
        status: &BrazeExportStatus,
        stop: &CancellationToken,
        metrics: &Metrics,
    ) -> Result<(), Error> {
        let again = |e: &Error, attempt: u32| {
            let refused_for_good =
                e.refusal().is_some() && attempt >= retry::FINAL_STATUS_REFUSED_TRIES;
            let retried = matches!(e, Error::Kube(_) | Error::Timeout(_) | Error::Conflict(_))
                && !(stop.is_cancelled() && attempt >= 3)
                && !refused_for_good;
            if retried {
                tracing::warn!(export = %self.name, attempt, error = %e, "cannot write the run's status; retrying");
            }
            retried
        };
        let written = retry(retry::FINAL_STATUS, |_| self.write(status), again).await;
        if let Err(e) = &written
            && let Some(reason) = e.refusal()
        {
            tracing::warn!(export = %self.name, reason, error = %e, "the apiserver refuses the run's final status: given up; the run's end is not recorded");
            metrics.status_write_failure(reason);
        }
        written
    }

    /// After a conflict: the fresh version, if the run is still ours; else [`Error::Lost`].
    async fn refresh(&self) -> Result<(), Error> {
        let fresh = tokio::time::timeout(API_TIMEOUT, self.api.get_opt(&self.name))
            .await
            .map_err(|_| Error::Timeout("reading the export"))?
            .map_err(Error::from_kube)?;
        match fresh {
            Some(f) if self.still_ours(&f) => {
                self.set_version(f.resource_version().unwrap_or_default());
                Ok(())
            }
            _ => Err(Error::Lost),
        }
    }

    fn still_ours(&self, fresh: &Watched) -> bool {
        let status = match fresh {
            Watched::Decoded(e) => e.status.as_ref(),
            Watched::Undecodable(u) => u.status.as_ref(),
        };
        fresh.uid().as_deref() == Some(self.uid.as_str())
            && status.is_some_and(|s| {
                s.runner.as_deref() == Some(self.instance.as_str()) && super::status::is_running(s)
            })
    }
}
