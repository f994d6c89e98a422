//! The operator's Prometheus metrics (prometheus-client).

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
    exports: Family<ReadyLabel, Gauge>,
    overdue: Gauge,
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
        registry.register("rows", "Rows read, by what became of them (sent, duplicate, invalid, rejected, failed, skipped)", rows.clone());
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
        Self {
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
        for (result, n) in [
            ("sent", r.sent),
            ("duplicate", r.duplicates),
            ("invalid", r.invalid),
            ("rejected", r.rejected),
            ("failed", r.failed),
            ("skipped", r.skipped),
        ] {
            self.rows.get_or_create(&ResultLabel { result }).inc_by(n);
        }
        self.duration.observe(r.duration_seconds(now));
        self.requests.inc_by(r.requests);
        self.retries.inc_by(r.retries);
        self.rate_limited.inc_by(r.rate_limited);
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
        r.rejected = 3;
        r.requests = 2;
        r.rate_limited = 1;
        m.record_run(&r, now);
        m.set_exports([(("True", "Succeeded"), 4), (("False", "InvalidSpec"), 1)]);
        let text = m.encode();
        for line in [
            "braze_export_runs_total{outcome=\"PartiallySucceeded\"} 1",
            "braze_export_rows_total{result=\"sent\"} 7",
            "braze_export_rows_total{result=\"rejected\"} 3",
            "braze_export_braze_requests_total 2",
            "braze_export_braze_rate_limited_total 1",
            "braze_export_run_duration_seconds_sum 10.0",
            "braze_export_exports{ready=\"True\",reason=\"Succeeded\"} 4",
            "braze_export_exports{ready=\"False\",reason=\"InvalidSpec\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
