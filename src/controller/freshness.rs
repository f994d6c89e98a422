//! Per-export freshness, read from each export before a scrape (pure): when it last
//! succeeded, what its last finished run counted, and how far apart its runs are due. Read
//! from the status (not from runs seen by this process), so the figures survive a restart and
//! an export's series go when the export goes.

use jiff::Timestamp;
use kube::ResourceExt;

use crate::export::report::Outcome;
use crate::ops::metrics::{ExportGauges, row_counts};
use crate::schedule::Schedule;
use crate::spec::BrazeExport;

/// The per-export gauges of `e` at `now`.
pub fn export_gauges(e: &BrazeExport, now: Timestamp) -> ExportGauges {
    let status = e.status.as_ref();
    ExportGauges {
        namespace: e.namespace().unwrap_or_default(),
        name: e.name_any(),
        last_success: status.and_then(|s| s.last_successful_time),
        last_run: status
            .and_then(|s| s.last_run.as_ref())
            .filter(|r| r.outcome != Outcome::Running)
            .map(row_counts),
        interval: if e.spec.suspend {
            None
        } else {
            Schedule::new(&e.spec.schedule, e.spec.time_zone.as_deref())
                .ok()
                .and_then(|s| s.interval_around(now))
        },
    }
}

#[cfg(test)]
mod tests {
    use jiff::SignedDuration;

    use super::*;
    use crate::commands::load::load_export;
    use crate::export::report::{RunReport, Trigger};

    const EXPORT: &str = r#"
apiVersion: looker-braze.dev/v1alpha1
kind: BrazeExport
metadata: {name: churn-risk, namespace: marketing}
spec:
  schedule: "0 6 * * *"
  looker:
    baseUrl: https://acme.cloud.looker.com
    lookId: "42"
    credentialsSecretRef: {name: looker-api}
  braze:
    endpoint: https://rest.iad-01.braze.com
    apiKeySecretRef: {name: braze-api, key: api_key}
"#;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn report(outcome: Outcome) -> RunReport {
        let mut r = RunReport::in_progress(Trigger::Schedule, ts("2026-11-29T06:00:00Z"), 10, 8);
        r.outcome = outcome;
        r.counts.rejected = 2;
        r
    }

    #[test]
    fn a_new_export_has_only_its_interval() {
        let e = load_export(EXPORT).unwrap();
        let g = export_gauges(&e, ts("2026-11-29T10:00:00Z"));
        assert_eq!(
            (g.namespace.as_str(), g.name.as_str()),
            ("marketing", "churn-risk")
        );
        assert_eq!(g.last_success, None);
        assert_eq!(g.last_run, None);
        assert_eq!(g.interval, Some(SignedDuration::from_hours(24)));
    }

    #[test]
    fn a_finished_run_counts_and_a_running_one_does_not() {
        let mut e = load_export(EXPORT).unwrap();
        let mut status = crate::spec::BrazeExportStatus {
            last_successful_time: Some(ts("2026-11-28T06:01:00Z")),
            last_run: Some(report(Outcome::PartiallySucceeded)),
            ..Default::default()
        };
        e.status = Some(status.clone());
        let g = export_gauges(&e, ts("2026-11-29T10:00:00Z"));
        assert_eq!(g.last_success, Some(ts("2026-11-28T06:01:00Z")));
        let counts = g.last_run.unwrap();
        assert_eq!(counts[0], ("sent", 8));
        assert_eq!(counts[3], ("rejected", 2));
        status.last_run = Some(report(Outcome::Running));
        e.status = Some(status);
        assert_eq!(export_gauges(&e, ts("2026-11-29T10:00:00Z")).last_run, None);
    }

    #[test]
    fn a_suspended_or_invalid_schedule_has_no_interval() {
        let mut e = load_export(EXPORT).unwrap();
        e.spec.suspend = true;
        assert_eq!(export_gauges(&e, ts("2026-11-29T10:00:00Z")).interval, None);
        e.spec.suspend = false;
        e.spec.schedule = "every day".into();
        assert_eq!(export_gauges(&e, ts("2026-11-29T10:00:00Z")).interval, None);
    }
}
