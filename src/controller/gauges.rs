//! The gauges derived from the exports themselves, set before each scrape of `/metrics` from
//! the caches of the controller's current term.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::Store;

use super::freshness;
use super::status::{self, reason};
use super::watched::Watched;
use crate::ops::metrics::Metrics;
use crate::spec::BrazeExport;

/// The caches of the controller's current term (one per watched namespace), so `/metrics` can
/// count exports by Ready status. Empty on a standby.
pub type StoreSlot = Arc<Mutex<Vec<Store<Watched>>>>;

/// How late a scheduled run may be before its export counts as overdue.
pub const OVERDUE_AFTER: SignedDuration = SignedDuration::from_mins(5);

/// Every export in the caches of `slot`.
pub fn cached(slot: &StoreSlot) -> Vec<Arc<Watched>> {
    let stores = slot.lock().unwrap_or_else(|e| e.into_inner());
    stores.iter().flat_map(Store::state).collect()
}

/// Sets the gauges derived from the exports themselves: how many there are by (Ready status,
/// reason), how many are overdue, and each one's freshness. An export this version cannot
/// decode counts as `InvalidSpec`.
pub fn refresh_gauges(metrics: &Metrics, exports: &[Arc<Watched>], now: Timestamp) {
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for w in exports {
        let key = match w.export() {
            None => ("False".to_owned(), reason::INVALID_SPEC.to_owned()),
            Some(e) => e
                .status
                .as_ref()
                .and_then(status::ready)
                .map_or(("Unknown".to_owned(), reason::PENDING.to_owned()), |c| {
                    (c.status.clone(), c.reason.clone())
                }),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    metrics.set_exports(
        counts
            .iter()
            .map(|((r, why), n)| ((r.as_str(), why.as_str()), *n)),
    );
    let decoded = || exports.iter().filter_map(|w| w.export());
    metrics.set_overdue(overdue_count(decoded(), now));
    let gauges: Vec<_> = decoded()
        .map(|e| freshness::export_gauges(e, now))
        .collect();
    metrics.set_export_gauges(&gauges);
}

/// Exports not suspended and not running whose `nextScheduleTime` is more than
/// [`OVERDUE_AFTER`] before `now`.
pub fn overdue_count<'a>(
    exports: impl IntoIterator<Item = &'a BrazeExport>,
    now: Timestamp,
) -> i64 {
    exports
        .into_iter()
        .filter(|e| !e.spec.suspend)
        .filter_map(|e| e.status.as_ref())
        .filter(|s| !status::is_running(s))
        .filter(|s| {
            s.next_schedule_time
                .is_some_and(|t| now.duration_since(t) > OVERDUE_AFTER)
        })
        .count() as i64
}
