//! The one-off permission for a run to remove more than `removalLimitPercent`.

use std::collections::BTreeMap;

use crate::schedule::RUN_NOW_ANNOTATION;
use crate::spec::{BrazeExportSpec, BrazeExportStatus, RemovalMode};

/// The annotation that allows one run-now run to remove more than `removalLimitPercent`: its
/// value must equal the `looker-braze.dev/run-now` value of that run.
pub const ALLOW_REMOVAL_ANNOTATION: &str = "looker-braze.dev/allow-removal";

/// Whether the run about to start may remove more than `removalLimitPercent` (or everyone,
/// after a Look that returned nothing): only a run-now run whose request the
/// [`ALLOW_REMOVAL_ANNOTATION`] repeats, and only once. True when the export removes, the
/// run-now annotation is set, not yet handled (`status.lastHandledRunRequest` differs: this
/// run answers it), and the allow-removal annotation has the same value. Later runs (the
/// request handled) are held by the limit again, even if the annotations stay.
pub fn removal_allowed_once(
    spec: &BrazeExportSpec,
    annotations: &BTreeMap<String, String>,
    status: Option<&BrazeExportStatus>,
) -> bool {
    let Some(request) = annotations
        .get(RUN_NOW_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    else {
        return false;
    };
    let handled = status.and_then(|s| s.last_handled_run_request.as_deref());
    spec.braze.removal == RemovalMode::Remove
        && annotations.get(ALLOW_REMOVAL_ANNOTATION).map(|v| v.trim()) == Some(request)
        && handled.map(str::trim) != Some(request)
}
