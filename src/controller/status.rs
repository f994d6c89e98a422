//! Status as a pure function of the previous status, what happened, and `now`.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::export::report::{Outcome, RunReport};
use crate::schedule::{Due, MAX_RETRIES, Retry};
use crate::spec::{BrazeExportStatus, RunSummary};

/// Runs kept in `status.history`.
pub const HISTORY: usize = 10;

/// Every reason the operator writes, in conditions and in Events: one list, so dashboards,
/// alerts and the README can rely on it.
pub mod reason {
    /// `Ready`: the last run succeeded.
    pub const SUCCEEDED: &str = "Succeeded";
    /// `Ready`: the last run flagged some users but not all.
    pub const PARTIALLY_SUCCEEDED: &str = "PartiallySucceeded";
    /// `Ready`: the last run failed or was interrupted.
    pub const FAILED: &str = "Failed";
    /// `Ready` and Event: the spec is invalid, or this operator cannot read it.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `Ready` and Event: a Secret or key is missing.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// `Ready` and Event: a Secret cannot be read (API error, permissions).
    pub const SECRET_UNREADABLE: &str = "SecretUnreadable";
    /// `Ready`: scheduled runs are suspended.
    pub const SUSPENDED: &str = "Suspended";
    /// `Ready`: no run yet.
    pub const PENDING: &str = "Pending";
    /// `Running`: a run is in progress.
    pub const RUNNING: &str = "Running";
    /// `Running`: a run is due and waits for one of the `--max-concurrent-runs` slots.
    pub const QUEUED: &str = "Queued";
    /// `Running`: no run in progress or waiting.
    pub const IDLE: &str = "Idle";
    /// Event: a run started.
    pub const RUN_STARTED: &str = "RunStarted";
    /// Event: a run succeeded.
    pub const RUN_SUCCEEDED: &str = "RunSucceeded";
    /// Event: a run flagged some users but not all.
    pub const RUN_PARTIALLY_SUCCEEDED: &str = "RunPartiallySucceeded";
    /// Event: a run failed.
    pub const RUN_FAILED: &str = "RunFailed";
    /// Event: a run stopped before its end (shutdown, lost leadership, crash).
    pub const RUN_INTERRUPTED: &str = "RunInterrupted";
    /// Event: the audience of a run could not be saved (the previous one stays).
    pub const AUDIENCE_NOT_SAVED: &str = crate::export::report::AUDIENCE_NOT_SAVED;
    /// Event: the stored audience was discarded on request; the run starts a new one.
    pub const AUDIENCE_DISCARDED: &str = "AudienceDiscarded";
    /// `Running`: a deleted export's flag is being removed from its audience.
    pub const CLEANING_UP: &str = "CleaningUp";
    /// Event: a deleted export's flag was removed from its whole audience.
    pub const CLEANED_UP: &str = "CleanedUp";
    /// Event: a deleted export went before its flag was removed from everyone.
    pub const CLEANUP_INCOMPLETE: &str = "CleanupIncomplete";
    /// A run failed because the stored audience could not be read.
    pub const AUDIENCE_UNREADABLE: &str = "AudienceUnreadable";
    /// `Ready`: the export's Looker host may not receive its Secret's values.
    pub const CREDENTIALS_NOT_ALLOWED: &str = "CredentialsNotAllowed";
    /// `Ready` and Event: an export created earlier removes the same flag (workspace,
    /// attribute and value) with `removal: Remove`; this one does not run.
    pub const FLAG_CONFLICT: &str = "FlagConflict";
    /// Event: the operator may not put the cleanup finalizer on the export's Braze key
    /// Secret (a deletion of the namespace may delete the key before the cleanup reads it).
    pub const BRAZE_KEY_NOT_HELD: &str = "BrazeKeyNotHeld";
    /// Watch error (metric): an export this version cannot decode.
    pub const UNDECODABLE_OBJECT: &str = "UndecodableObject";

    /// All of them but the metric-only [`UNDECODABLE_OBJECT`].
    pub const ALL: [&str; 25] = [
        SUCCEEDED,
        PARTIALLY_SUCCEEDED,
        FAILED,
        INVALID_SPEC,
        SECRET_NOT_FOUND,
        SECRET_UNREADABLE,
        SUSPENDED,
        PENDING,
        RUNNING,
        QUEUED,
        IDLE,
        RUN_STARTED,
        RUN_SUCCEEDED,
        RUN_PARTIALLY_SUCCEEDED,
        RUN_FAILED,
        RUN_INTERRUPTED,
        AUDIENCE_NOT_SAVED,
        AUDIENCE_DISCARDED,
        CLEANING_UP,
        CLEANED_UP,
        CLEANUP_INCOMPLETE,
        AUDIENCE_UNREADABLE,
        CREDENTIALS_NOT_ALLOWED,
        FLAG_CONFLICT,
        BRAZE_KEY_NOT_HELD,
    ];
}

/// Sets a condition, keeping its transition time when its status does not change.
fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// The `Ready` condition, if set.
pub fn ready(status: &BrazeExportStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == "Ready")
}

/// True when the `Running` condition is `True`.
pub fn is_running(status: &BrazeExportStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == "Running" && c.status == "True")
}

fn set_idle(s: &mut BrazeExportStatus, generation: Option<i64>, now: Timestamp) {
    s.runner = None;
    set_condition(
        &mut s.conditions,
        "Running",
        "False",
        reason::IDLE,
        "no run in progress".into(),
        generation,
        now,
    );
}

/// `Ready` as the last run left it; `retry` says whether a failed or interrupted run starts
/// again.
fn ready_from_run(
    s: &mut BrazeExportStatus,
    generation: Option<i64>,
    retry: Retry,
    now: Timestamp,
) {
    let again = match retry {
        Retry::At(at) => format!("; it is retried at {at}"),
        Retry::GaveUp => format!(
            "; not retried again after {MAX_RETRIES} retries in a row ended the same way: the next run is the scheduled one"
        ),
        Retry::Superseded => "; not retried: the next scheduled run comes first".to_owned(),
        Retry::No => String::new(),
    };
    let (status, reason, message) = match &s.last_run {
        None => (
            "Unknown",
            reason::PENDING,
            "waiting for the first run".to_owned(),
        ),
        Some(r) => match r.outcome {
            Outcome::Succeeded => ("True", reason::SUCCEEDED, r.message.clone()),
            Outcome::PartiallySucceeded => {
                ("False", reason::PARTIALLY_SUCCEEDED, r.message.clone())
            }
            Outcome::Failed | Outcome::Interrupted => {
                ("False", reason::FAILED, format!("{}{again}", r.message))
            }
            Outcome::Running => ("Unknown", reason::PENDING, r.message.clone()),
        },
    };
    set_condition(
        &mut s.conditions,
        "Ready",
        status,
        reason,
        message,
        generation,
        now,
    );
}

/// Status of a valid export with no run in progress: `Ready` from the last run (or
/// `Suspended`, or `Pending`), the next scheduled time, and the observed generation.
pub fn idle(
    previous: &BrazeExportStatus,
    generation: Option<i64>,
    suspended: bool,
    next: Option<Timestamp>,
    retry: Retry,
    now: Timestamp,
) -> BrazeExportStatus {
    let mut s = previous.clone();
    s.observed_generation = generation;
    s.next_schedule_time = if suspended { None } else { next };
    if suspended {
        set_condition(
            &mut s.conditions,
            "Ready",
            "False",
            reason::SUSPENDED,
            "scheduled runs are suspended (spec.suspend); run-now still works".into(),
            generation,
            now,
        );
    } else {
        ready_from_run(&mut s, generation, retry, now);
    }
    set_idle(&mut s, generation, now);
    s
}

/// Status of a run that is due but waits for a free run slot: `Running=False`, reason
/// `Queued`. Nothing of the run is recorded yet, so a shutdown loses nothing: the next
/// operator finds the run still due.
pub fn queued(
    previous: &BrazeExportStatus,
    generation: Option<i64>,
    due: &Due,
    slots: usize,
    now: Timestamp,
) -> BrazeExportStatus {
    let mut s = previous.clone();
    s.observed_generation = generation;
    s.runner = None;
    set_condition(
        &mut s.conditions,
        "Running",
        "False",
        reason::QUEUED,
        format!(
            "{:?} run waits for one of the {slots} run slots (--max-concurrent-runs)",
            due.trigger
        ),
        generation,
        now,
    );
    s
}

/// Status of an export that cannot run: `Ready=False` with `reason` and a message naming the
/// field, Secret or key.
pub fn blocked(
    previous: &BrazeExportStatus,
    generation: Option<i64>,
    why: &str,
    message: &str,
    now: Timestamp,
) -> BrazeExportStatus {
    let mut s = previous.clone();
    s.observed_generation = generation;
    s.next_schedule_time = None;
    set_condition(
        &mut s.conditions,
        "Ready",
        "False",
        why,
        message.to_owned(),
        generation,
        now,
    );
    set_idle(&mut s, generation, now);
    s
}

/// Status when a run starts on `runner` (this operator instance).
pub fn started(
    previous: &BrazeExportStatus,
    generation: Option<i64>,
    due: &Due,
    runner: &str,
    now: Timestamp,
) -> BrazeExportStatus {
    let mut s = previous.clone();
    s.observed_generation = generation;
    s.runner = Some(runner.to_owned());
    if let Some(at) = due.scheduled_for {
        s.last_schedule_time = Some(at);
    }
    if let Some(request) = &due.run_request {
        s.last_handled_run_request = Some(request.clone());
    }
    s.last_run = Some(RunReport::in_progress(due.trigger, now, 0, 0));
    let message = match due.scheduled_for {
        Some(at) => format!("{:?} run for {at} started at {now}", due.trigger),
        None => format!("{:?} run started at {now}", due.trigger),
    };
    set_condition(
        &mut s.conditions,
        "Running",
        "True",
        reason::RUNNING,
        message,
        generation,
        now,
    );
    s
}

/// Status while a deleted export's `flag` is removed from the `members` of its audience:
/// `Running=True`, reason `CleaningUp`, and a `lastRun` in progress triggered by the deletion.
pub fn cleaning(
    previous: Option<&BrazeExportStatus>,
    generation: Option<i64>,
    flag: &str,
    members: u64,
    runner: &str,
    now: Timestamp,
) -> BrazeExportStatus {
    let mut s = previous.cloned().unwrap_or_default();
    s.observed_generation = generation;
    s.runner = Some(runner.to_owned());
    s.last_run = Some(RunReport::in_progress(
        crate::export::Trigger::Deletion,
        now,
        0,
        0,
    ));
    set_condition(
        &mut s.conditions,
        "Running",
        "True",
        reason::CLEANING_UP,
        format!(
            "removing {flag} for the {members} users of the stored audience before the export is deleted"
        ),
        generation,
        now,
    );
    s
}

/// Status when a deleted export's cleanup ended: its `report` (when it ran) in `lastRun` and
/// `history`, and `Running=False` with the cleanup's reason (`CleanedUp` or
/// `CleanupIncomplete`) and `message`. `Ready` stays as the last scheduled run left it.
pub fn cleaned(
    current: &BrazeExportStatus,
    report: Option<&RunReport>,
    generation: Option<i64>,
    why: &str,
    message: &str,
    now: Timestamp,
) -> BrazeExportStatus {
    let mut s = current.clone();
    if let Some(report) = report {
        s.last_run = Some(report.clone());
        push_history(&mut s, report, now);
    }
    s.runner = None;
    set_condition(
        &mut s.conditions,
        "Running",
        "False",
        why,
        message.to_owned(),
        generation,
        now,
    );
    s
}

/// Status while a run goes on: the counts so far in `lastRun`.
pub fn progress(current: &BrazeExportStatus, rows_read: u64, sent: u64) -> BrazeExportStatus {
    let mut s = current.clone();
    if let Some(r) = &s.last_run {
        s.last_run = Some(RunReport::in_progress(
            r.trigger,
            r.start_time,
            rows_read,
            sent,
        ));
    }
    s
}

/// Status when a run ends: `lastRun`, `history`, `Ready` from the outcome, `Running=False`.
pub fn finished(
    current: &BrazeExportStatus,
    report: &RunReport,
    generation: Option<i64>,
    next: Option<Timestamp>,
    retry: Retry,
    now: Timestamp,
) -> BrazeExportStatus {
    let mut s = current.clone();
    s.last_run = Some(report.clone());
    if report.outcome == Outcome::Succeeded {
        s.last_successful_time = report.completion_time;
    }
    push_history(&mut s, report, now);
    if next.is_some() {
        s.next_schedule_time = next;
    }
    ready_from_run(&mut s, generation, retry, now);
    set_idle(&mut s, generation, now);
    s
}

/// `report` first in `status.history`, which keeps [`HISTORY`] runs.
fn push_history(s: &mut BrazeExportStatus, report: &RunReport, now: Timestamp) {
    s.history.insert(
        0,
        RunSummary {
            start_time: report.start_time,
            trigger: report.trigger,
            outcome: report.outcome,
            sent: report.counts.sent,
            duration_seconds: (report.duration_seconds(now) * 10.0).round() / 10.0,
        },
    );
    s.history.truncate(HISTORY);
}

/// Status of a run left `Running` by an operator instance that is gone (it crashed, or lost
/// its Lease and was fenced): `Interrupted`. Whether it is retried is decided next, like a
/// failed run.
pub fn crashed(
    previous: &BrazeExportStatus,
    generation: Option<i64>,
    now: Timestamp,
) -> BrazeExportStatus {
    let mut s = previous.clone();
    let runner = s.runner.take().unwrap_or_else(|| "unknown".into());
    if let Some(r) = s
        .last_run
        .as_mut()
        .filter(|r| r.outcome == Outcome::Running)
    {
        r.outcome = Outcome::Interrupted;
        r.completion_time = Some(now);
        r.message = format!(
            "interrupted: operator instance {runner} stopped during the run ({} rows read, {} users flagged before)",
            r.counts.rows_read, r.counts.sent
        );
        let report = r.clone();
        return finished(&s, &report, generation, None, Retry::No, now);
    }
    set_idle(&mut s, generation, now);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::report::Trigger;
    use crate::schedule::Retry;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn done(outcome: Outcome, sent: u64, message: &str) -> RunReport {
        let mut r =
            RunReport::in_progress(Trigger::Schedule, ts("2026-11-29T06:00:00Z"), sent, sent);
        r.outcome = outcome;
        r.completion_time = Some(ts("2026-11-29T06:00:30Z"));
        r.message = message.into();
        r
    }

    fn cond<'a>(s: &'a BrazeExportStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn a_new_export_is_pending_with_its_next_run() {
        let s = idle(
            &BrazeExportStatus::default(),
            Some(1),
            false,
            Some(ts("2026-11-30T06:00:00Z")),
            Retry::No,
            ts("2026-11-29T10:00:00Z"),
        );
        let r = cond(&s, "Ready");
        assert_eq!(
            (r.status.as_str(), r.reason.as_str(), r.observed_generation),
            ("Unknown", "Pending", Some(1))
        );
        assert_eq!(cond(&s, "Running").status, "False");
        assert_eq!(s.next_schedule_time, Some(ts("2026-11-30T06:00:00Z")));
        assert_eq!(s.observed_generation, Some(1));
        let sus = idle(
            &s,
            Some(2),
            true,
            Some(ts("2026-11-30T06:00:00Z")),
            Retry::No,
            ts("2026-11-29T10:00:00Z"),
        );
        assert_eq!(cond(&sus, "Ready").reason, "Suspended");
        assert_eq!(sus.next_schedule_time, None, "absent when suspended");
    }

    #[test]
    fn a_run_from_start_to_finish() {
        let now = ts("2026-11-29T06:00:00Z");
        let due = Due {
            trigger: Trigger::Manual,
            scheduled_for: None,
            run_request: Some("r1".into()),
        };
        let s = started(&BrazeExportStatus::default(), Some(3), &due, "pod-a", now);
        assert!(is_running(&s));
        assert_eq!(s.last_handled_run_request.as_deref(), Some("r1"));
        assert_eq!(s.last_run.as_ref().unwrap().outcome, Outcome::Running);
        let p = progress(&s, 5000, 4000);
        assert_eq!(p.last_run.as_ref().unwrap().counts.rows_read, 5000);
        let f = finished(
            &p,
            &done(
                Outcome::Succeeded,
                12480,
                "12480 users flagged, 31 duplicates, 2 invalid rows",
            ),
            Some(3),
            Some(ts("2026-11-30T06:00:00Z")),
            Retry::No,
            ts("2026-11-29T06:00:30Z"),
        );
        let ready = cond(&f, "Ready");
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            (
                "True",
                "Succeeded",
                "12480 users flagged, 31 duplicates, 2 invalid rows"
            )
        );
        assert!(!is_running(&f));
        assert_eq!(f.last_successful_time, Some(ts("2026-11-29T06:00:30Z")));
        assert_eq!(f.history.len(), 1);
        assert_eq!(
            (f.history[0].sent, f.history[0].duration_seconds),
            (12480, 30.0)
        );
    }

    #[test]
    fn outcomes_map_to_ready() {
        for (outcome, status, why) in [
            (Outcome::Succeeded, "True", "Succeeded"),
            (Outcome::PartiallySucceeded, "False", "PartiallySucceeded"),
            (Outcome::Failed, "False", "Failed"),
            (Outcome::Interrupted, "False", "Failed"),
        ] {
            let f = finished(
                &BrazeExportStatus::default(),
                &done(outcome, 1, "m"),
                None,
                None,
                Retry::No,
                ts("2026-11-29T07:00:00Z"),
            );
            let r = cond(&f, "Ready");
            assert_eq!(
                (r.status.as_str(), r.reason.as_str()),
                (status, why),
                "{outcome:?}"
            );
            assert_eq!(
                f.last_successful_time.is_some(),
                outcome == Outcome::Succeeded
            );
        }
    }

    #[test]
    fn history_keeps_ten_newest_first_and_transition_times_hold() {
        let mut s = BrazeExportStatus::default();
        for i in 0..12u64 {
            s = finished(
                &s,
                &done(Outcome::Succeeded, i, "ok"),
                None,
                None,
                Retry::No,
                ts("2026-11-29T07:00:00Z") + jiff::SignedDuration::from_secs(i as i64),
            );
        }
        assert_eq!(s.history.len(), HISTORY);
        assert_eq!(s.history[0].sent, 11);
        assert_eq!(
            cond(&s, "Ready").last_transition_time,
            Time(ts("2026-11-29T07:00:00Z")),
            "unchanged status keeps its time"
        );
        let b = blocked(
            &s,
            Some(9),
            reason::SECRET_NOT_FOUND,
            "Secret marketing/braze-api not found",
            ts("2026-11-29T08:00:00Z"),
        );
        let r = cond(&b, "Ready");
        assert_eq!(
            (
                r.status.as_str(),
                r.reason.as_str(),
                r.last_transition_time.clone()
            ),
            ("False", "SecretNotFound", Time(ts("2026-11-29T08:00:00Z")))
        );
        assert_eq!(b.history.len(), HISTORY, "history stays");
    }

    #[test]
    fn overdue_exports_are_counted() {
        use crate::spec::BrazeExport;
        let now = ts("2026-11-29T12:00:00Z");
        let spec: crate::spec::BrazeExportSpec = serde_json::from_value(serde_json::json!({
            "schedule": "@hourly",
            "looker": {"baseUrl": "https://l.example.com", "lookId": "1", "credentialsSecretRef": {"name": "l"}},
            "braze": {"endpoint": "https://rest.iad-01.braze.com", "apiKeySecretRef": {"name": "b"}}
        }))
        .unwrap();
        let export = |next: &str, suspend: bool, running: bool| {
            let mut e = BrazeExport::new("e", spec.clone());
            e.spec.suspend = suspend;
            let mut s = idle(
                &BrazeExportStatus::default(),
                None,
                false,
                Some(ts(next)),
                Retry::No,
                now,
            );
            if running {
                s = started(
                    &s,
                    None,
                    &Due {
                        trigger: Trigger::Schedule,
                        scheduled_for: None,
                        run_request: None,
                    },
                    "pod-a",
                    now,
                );
            }
            e.status = Some(s);
            e
        };
        let exports = [
            export("2026-11-29T11:50:00Z", false, false),
            export("2026-11-29T11:58:00Z", false, false),
            export("2026-11-29T11:00:00Z", true, false),
            export("2026-11-29T11:00:00Z", false, true),
            export("2026-11-29T13:00:00Z", false, false),
        ];
        assert_eq!(crate::controller::overdue_count(exports.iter(), now), 1);
        // The same count reaches /metrics, with the exports by Ready status.
        let metrics = crate::ops::metrics::Metrics::new();
        let shared: Vec<std::sync::Arc<crate::controller::watched::Watched>> = exports
            .into_iter()
            .map(|e| std::sync::Arc::new(crate::controller::watched::Watched::Decoded(e)))
            .collect();
        crate::controller::refresh_gauges(&metrics, &shared, now);
        let text = metrics.encode();
        assert!(text.contains("braze_export_overdue 1\n"), "{text}");
        assert!(
            text.contains("braze_export_exports{ready=\"Unknown\",reason=\"Pending\"} 5"),
            "{text}"
        );
    }

    #[test]
    fn a_crashed_run_becomes_interrupted() {
        let due = Due {
            trigger: Trigger::Schedule,
            scheduled_for: Some(ts("2026-11-29T06:00:00Z")),
            run_request: None,
        };
        let s = progress(
            &started(
                &BrazeExportStatus::default(),
                Some(1),
                &due,
                "pod-a",
                ts("2026-11-29T06:00:00Z"),
            ),
            10,
            7,
        );
        let c = crashed(&s, Some(1), ts("2026-11-29T06:05:00Z"));
        let last = c.last_run.as_ref().unwrap();
        assert_eq!((last.outcome, last.counts.sent), (Outcome::Interrupted, 7));
        assert!(!is_running(&c));
        assert_eq!(c.history[0].outcome, Outcome::Interrupted);
        assert_eq!(cond(&c, "Ready").reason, "Failed");
    }
}
