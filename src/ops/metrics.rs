//! The operator's Prometheus metrics (prometheus-client).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use jiff::{SignedDuration, Timestamp};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::export::report::RunReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadyLabel {
    ready: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ExportLabel {
    namespace: String,
    name: String,
}

impl ExportLabel {
    fn of(e: &ExportGauges) -> Self {
        Self {
            namespace: e.namespace.clone(),
            name: e.name.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExportResultLabel {
    namespace: String,
    name: String,
    result: &'static str,
}

/// A run's rows by what became of them, as the `result` label names them.
pub type RowCounts = [(&'static str, u64); 8];

/// The rows of `r` by result: sent, duplicate, invalid, rejected, failed, skipped, unchanged
/// (delta runs), and removed (users whose flag a `removal: Remove` run took off).
pub fn row_counts(r: &RunReport) -> RowCounts {
    [
        ("sent", r.counts.sent),
        ("duplicate", r.counts.duplicates),
        ("invalid", r.counts.invalid),
        ("rejected", r.counts.rejected),
        ("failed", r.counts.failed),
        ("skipped", r.counts.skipped),
        ("unchanged", r.counts.unchanged.unwrap_or(0)),
        ("removed", r.counts.removed.unwrap_or(0)),
    ]
}

/// What the per-export gauges show for one export, read from it before each scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportGauges {
    /// The export's namespace.
    pub namespace: String,
    /// The export's name.
    pub name: String,
    /// `status.lastSuccessfulTime`.
    pub last_success: Option<Timestamp>,
    /// The rows of the last run, once it has ended (`None` while one runs).
    pub last_run: Option<RowCounts>,
    /// The gap between the scheduled times around now (`None` when suspended).
    pub interval: Option<SignedDuration>,
}

/// Every metric the operator exports, prefixed `braze_export_`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    runs: Family<OutcomeLabel, Counter>,
    rows: Family<ResultLabel, Counter>,
    duration: Histogram,
    start_delay: Histogram,
    requests: Counter,
    retries: Counter,
    rate_limited: Counter,
    reconcile_errors: Family<ReasonLabel, Counter>,
    watch_errors: Family<ReasonLabel, Counter>,
    status_write_failures: Family<ReasonLabel, Counter>,
    audience_save_failures: Counter,
    cleanups: Family<ResultLabel, Counter>,
    leader: Gauge,
    exports: Family<ReadyLabel, Gauge>,
    overdue: Gauge,
    last_success: Family<ExportLabel, Gauge>,
    last_run_rows: Family<ExportResultLabel, Gauge>,
    schedule_interval: Family<ExportLabel, Gauge>,
    /// Each export's last finished counts, kept while its next run goes on.
    last_rows: Mutex<BTreeMap<ExportLabel, RowCounts>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("braze_export");
        let runs = Family::<OutcomeLabel, Counter>::default();
        registry.register("runs", "Runs finished, by outcome", runs.clone());
        let rows = Family::<ResultLabel, Counter>::default();
        registry.register("rows", "Rows read, by what became of them (sent, duplicate, invalid, rejected, failed, skipped, unchanged), and users whose flag was removed (removed)", rows.clone());
        let duration = Histogram::new([
            1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
        ]);
        registry.register("run_duration_seconds", "Run duration", duration.clone());
        let start_delay = Histogram::new([0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]);
        registry.register(
            "run_start_delay_seconds",
            "How late scheduled runs start after their time",
            start_delay.clone(),
        );
        let requests = Counter::default();
        registry.register(
            "braze_requests",
            "HTTP requests to Braze /users/track",
            requests.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "braze_retries",
            "Retried requests to Braze",
            retries.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "braze_rate_limited",
            "Braze answers 429",
            rate_limited.clone(),
        );
        let reconcile_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile failures, by reason",
            reconcile_errors.clone(),
        );
        let watch_errors = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "watch_errors",
            "Errors watching BrazeExports (and objects this version cannot decode), by reason",
            watch_errors.clone(),
        );
        let status_write_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "status_write_failures",
            "Runs whose final status the apiserver refused (Forbidden: RBAC; Invalid: the object cannot take it) and that were given up unrecorded, by reason",
            status_write_failures.clone(),
        );
        let audience_save_failures = Counter::default();
        registry.register(
            "audience_save_failures",
            "Runs whose stored audience could not be saved (the previous one stays)",
            audience_save_failures.clone(),
        );
        let cleanups = Family::<ResultLabel, Counter>::default();
        registry.register(
            "cleanups",
            "Cleanups of deleted exports (cleanupOnDelete) that ended, by result (CleanedUp, CleanupIncomplete)",
            cleanups.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this instance holds the Lease and runs exports, else 0",
            leader.clone(),
        );
        let exports = Family::<ReadyLabel, Gauge>::default();
        registry.register(
            "exports",
            "BrazeExports by Ready status and reason",
            exports.clone(),
        );
        let overdue = Gauge::default();
        registry.register(
            "overdue",
            "Exports whose next scheduled run is more than 5 minutes late",
            overdue.clone(),
        );
        let last_success = Family::<ExportLabel, Gauge>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "When the export's last successful run ended (Unix time)",
            last_success.clone(),
        );
        let last_run_rows = Family::<ExportResultLabel, Gauge>::default();
        registry.register(
            "last_run_rows",
            "Rows of the export's last finished run, by result",
            last_run_rows.clone(),
        );
        let schedule_interval = Family::<ExportLabel, Gauge>::default();
        registry.register(
            "schedule_interval_seconds",
            "Seconds between the export's scheduled runs around now (absent when suspended)",
            schedule_interval.clone(),
        );
        Self {
            last_success,
            last_run_rows,
            schedule_interval,
            last_rows: Mutex::default(),
            overdue,
            registry,
            runs,
            rows,
            duration,
            start_delay,
            requests,
            retries,
            rate_limited,
            reconcile_errors,
            watch_errors,
            status_write_failures,
            audience_save_failures,
            cleanups,
            leader,
            exports,
        }
    }

    /// Counts a finished run.
    pub fn record_run(&self, r: &RunReport, now: jiff::Timestamp) {
        self.runs
            .get_or_create(&OutcomeLabel {
                outcome: r.outcome.as_str().into(),
            })
            .inc();
        for (result, n) in row_counts(r) {
            self.rows.get_or_create(&ResultLabel { result }).inc_by(n);
        }
        self.duration.observe(r.duration_seconds(now));
        self.requests.inc_by(r.counts.requests);
        self.retries.inc_by(r.counts.retries);
        self.rate_limited.inc_by(r.counts.rate_limited);
    }

    /// Counts a cleanup that ended, by its result (`CleanedUp` or `CleanupIncomplete`); its
    /// removals are counted by [`Metrics::record_run`], when it ran.
    pub fn record_cleanup(&self, result: &'static str) {
        self.cleanups.get_or_create(&ResultLabel { result }).inc();
    }

    /// Records how late a scheduled run started.
    pub fn record_start_delay(&self, seconds: f64) {
        self.start_delay.observe(seconds.max(0.0));
    }

    /// Counts a reconcile failure.
    pub fn reconcile_error(&self, reason: &str) {
        self.reconcile_errors
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a watch error or an undecodable object.
    pub fn watch_error(&self, reason: &str) {
        self.watch_errors
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a run whose stored audience could not be saved.
    pub fn audience_save_failure(&self) {
        self.audience_save_failures.inc();
    }

    /// Counts a run's final status given up because the apiserver refused it (`reason`:
    /// `Forbidden` or `Invalid`).
    pub fn status_write_failure(&self, reason: &str) {
        self.status_write_failures
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// Whether this instance leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Replaces the per-status export counts with `counts` of (Ready status, reason).
    pub fn set_exports<'a>(&self, counts: impl IntoIterator<Item = ((&'a str, &'a str), i64)>) {
        self.exports.clear();
        for ((ready, reason), n) in counts {
            self.exports
                .get_or_create(&ReadyLabel {
                    ready: ready.into(),
                    reason: reason.into(),
                })
                .set(n);
        }
    }

    /// Sets the number of exports late for their scheduled run.
    pub fn set_overdue(&self, n: i64) {
        self.overdue.set(n);
    }

    /// Replaces the per-export gauges with those of `exports` (every export the controller
    /// knows): a deleted export's series vanish.
    pub fn set_export_gauges(&self, exports: &[ExportGauges]) {
        let rows = self.remember_rows(exports);
        self.last_success.clear();
        self.schedule_interval.clear();
        self.last_run_rows.clear();
        for e in exports {
            let label = ExportLabel::of(e);
            if let Some(t) = e.last_success {
                self.last_success.get_or_create(&label).set(t.as_second());
            }
            if let Some(d) = e.interval {
                self.schedule_interval
                    .get_or_create(&label)
                    .set(d.as_secs());
            }
        }
        for (ExportLabel { namespace, name }, counts) in rows {
            for (result, n) in counts {
                let label = ExportResultLabel {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    result,
                };
                self.last_run_rows
                    .get_or_create(&label)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Updates the remembered counts of finished runs, forgetting exports that are gone.
    fn remember_rows(&self, exports: &[ExportGauges]) -> BTreeMap<ExportLabel, RowCounts> {
        let mut rows = self.last_rows.lock().unwrap_or_else(|e| e.into_inner());
        let live: BTreeSet<ExportLabel> = exports.iter().map(ExportLabel::of).collect();
        rows.retain(|k, _| live.contains(k));
        for e in exports {
            if let Some(counts) = e.last_run {
                rows.insert(ExportLabel::of(e), counts);
            }
        }
        rows.clone()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::report::{Outcome, Trigger};

    #[test]
    fn a_run_shows_up_in_the_exposition() {
        let m = Metrics::new();
        let now: jiff::Timestamp = "2026-11-29T06:00:10Z".parse().unwrap();
        let mut r = RunReport::in_progress(
            Trigger::Schedule,
            "2026-11-29T06:00:00Z".parse().unwrap(),
            10,
            7,
        );
        r.outcome = Outcome::PartiallySucceeded;
        r.completion_time = Some(now);
        r.counts.rejected = 3;
        r.counts.requests = 2;
        r.counts.rate_limited = 1;
        r.counts.removed = Some(4);
        m.record_run(&r, now);
        m.set_exports([(("True", "Succeeded"), 4), (("False", "InvalidSpec"), 1)]);
        m.status_write_failure("Forbidden");
        let text = m.encode();
        for line in [
            "braze_export_runs_total{outcome=\"PartiallySucceeded\"} 1",
            "braze_export_rows_total{result=\"sent\"} 7",
            "braze_export_rows_total{result=\"rejected\"} 3",
            "braze_export_rows_total{result=\"removed\"} 4",
            "braze_export_braze_requests_total 2",
            "braze_export_braze_rate_limited_total 1",
            "braze_export_run_duration_seconds_sum 10.0",
            "braze_export_exports{ready=\"True\",reason=\"Succeeded\"} 4",
            "braze_export_exports{ready=\"False\",reason=\"InvalidSpec\"} 1",
            "braze_export_status_write_failures_total{reason=\"Forbidden\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    fn gauges(name: &str, last_run: Option<RowCounts>) -> ExportGauges {
        ExportGauges {
            namespace: "marketing".into(),
            name: name.into(),
            last_success: Some("2026-11-29T06:00:10Z".parse().unwrap()),
            last_run,
            interval: Some(SignedDuration::from_hours(24)),
        }
    }

    fn counts(sent: u64, rejected: u64) -> RowCounts {
        let mut r = RunReport::in_progress(
            Trigger::Schedule,
            "2026-11-29T06:00:00Z".parse().unwrap(),
            sent + rejected,
            sent,
        );
        r.counts.rejected = rejected;
        row_counts(&r)
    }

    #[test]
    fn per_export_gauges_keep_the_last_finished_run_and_vanish_with_the_export() {
        let m = Metrics::new();
        m.set_export_gauges(&[
            gauges("churn", Some(counts(7, 3))),
            gauges("vip", Some(counts(1, 0))),
        ]);
        let text = m.encode();
        for line in [
            "braze_export_last_success_timestamp_seconds{namespace=\"marketing\",name=\"churn\"} 1795932010",
            "braze_export_last_run_rows{namespace=\"marketing\",name=\"churn\",result=\"sent\"} 7",
            "braze_export_last_run_rows{namespace=\"marketing\",name=\"churn\",result=\"rejected\"} 3",
            "braze_export_last_run_rows{namespace=\"marketing\",name=\"vip\",result=\"skipped\"} 0",
            "braze_export_schedule_interval_seconds{namespace=\"marketing\",name=\"churn\"} 86400",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        // churn runs again (no finished counts in its status) and vip is deleted.
        m.set_export_gauges(&[gauges("churn", None)]);
        let text = m.encode();
        assert!(
            text.contains("braze_export_last_run_rows{namespace=\"marketing\",name=\"churn\",result=\"sent\"} 7"),
            "{text}"
        );
        assert!(!text.contains("name=\"vip\""), "{text}");
        m.set_export_gauges(&[]);
        assert!(!m.encode().contains("name=\"churn\""));
    }
}
