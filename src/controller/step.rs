//! The reconcile's pure steps: from the export, the exports cached beside it and `now`, the
//! next status, the Events and what to do next. [`step`] validates and decides;
//! [`secret_blocked`], [`undecodable`] and [`run_ended`] are the other outcomes.
//! [`effect`](super::effect::effect) applies them.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::flags::conflict;
use super::status::{self, reason};
use super::timeouts::{FLAG_CONFLICT_RETRY, MAX_REQUEUE, RUN_POLL, SECRET_RETRY};
use super::watched::Watched;
use crate::export::ExportPlan;
use crate::export::report::{Outcome, RunReport};
use crate::looker::hosts::AllowedHosts;
use crate::schedule::{Decision, Due, Inputs, RUN_NOW_ANNOTATION, Schedule, decide, retry};
use crate::spec::{BrazeExport, BrazeExportStatus, FieldError, join_errors};

/// What the step reads besides the export.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// A task of this process runs the export, or waits for a slot to.
    pub active: bool,
    /// The Looker hosts this operator may call.
    pub allowed_hosts: &'a AllowedHosts,
    /// Wait before the first retry.
    pub retry_base: SignedDuration,
    /// The exports in the controller's caches (this one may be among them), to find another
    /// that removes the same flag; empty for an export with `removal: Keep`.
    pub exports: &'a [Arc<Watched>],
    /// Now.
    pub now: Timestamp,
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// `Warning` when true, else `Normal`.
    pub warning: bool,
    /// One of [`reason`].
    pub reason: &'static str,
    /// What happened.
    pub message: String,
}

/// What to do after the write.
#[derive(Clone, Debug)]
pub enum Then {
    /// Look again after this long.
    Requeue(Duration),
    /// Look again when the object changes.
    AwaitChange,
    /// Start this run (read its Secrets, take a slot).
    Start(Box<Start>),
}

/// A run to start, with the status it starts from.
#[derive(Clone, Debug)]
pub struct Start {
    /// The status before the run (a crashed run already recorded as `Interrupted`).
    pub base: BrazeExportStatus,
    /// The validated plan.
    pub plan: ExportPlan,
    /// The schedule.
    pub schedule: Schedule,
    /// Why it runs.
    pub due: Due,
}

/// One step's result.
#[derive(Clone, Debug)]
pub struct Step {
    /// The status to write, when it differs from the current one.
    pub status: Option<BrazeExportStatus>,
    /// Events, published once the status is written.
    pub notes: Vec<Note>,
    /// What next.
    pub then: Then,
}

/// What the schedule's decisions read of `export`, with `status` as its status.
pub fn inputs<'a>(
    export: &'a BrazeExport,
    schedule: &'a Schedule,
    status: &'a BrazeExportStatus,
    f: &Facts<'_>,
) -> Inputs<'a> {
    let created = export
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(f.now, |t| t.0);
    Inputs {
        schedule,
        suspend: export.spec.suspend,
        starting_deadline_seconds: export.spec.starting_deadline_seconds,
        created,
        status,
        run_request: export
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RUN_NOW_ANNOTATION))
            .map(String::as_str),
        running: false,
        retry_base: f.retry_base,
        now: f.now,
    }
}

/// The step for a decoded export. `active` exports are left to their run task. A `Running`
/// status that no task of this process owns was left by an instance that is gone: this
/// process holds the Lease (or runs alone), and a status write made from a stale read is
/// refused by its `resourceVersion`, so the object really says so now.
pub fn step(export: &BrazeExport, f: &Facts<'_>) -> Step {
    if f.active {
        return Step {
            status: None,
            notes: Vec::new(),
            then: Then::Requeue(RUN_POLL),
        };
    }
    let before = export.status.clone().unwrap_or_default();
    let (current, notes) = crash_recorded(export, &before, f.now);
    let (plan, schedule) = match validate(export, f.allowed_hosts) {
        Ok(ok) => ok,
        Err(message) => return invalid(export, &before, current, notes, message, f.now),
    };
    let others: Vec<&BrazeExport> = f.exports.iter().filter_map(|w| w.export()).collect();
    if let Some(message) = conflict(export, &others) {
        let refused = Refusal {
            reason: reason::FLAG_CONFLICT,
            message,
            then: Then::Requeue(FLAG_CONFLICT_RETRY),
        };
        return refuse(export, &before, current, notes, refused, f.now);
    }
    let inputs = inputs(export, &schedule, &current, f);
    match decide(&inputs) {
        Decision::Wait(until) => {
            let next = status::idle(
                &current,
                export.metadata.generation,
                export.spec.suspend,
                schedule.next_after(f.now),
                retry(&inputs),
                f.now,
            );
            Step {
                status: changed(&before, next),
                notes,
                then: Then::Requeue(until.map_or(MAX_REQUEUE, |t| wait_until(t, f.now))),
            }
        }
        Decision::Run(due) => Step {
            status: None,
            notes,
            then: Then::Start(Box::new(Start {
                base: current,
                plan,
                schedule,
                due,
            })),
        },
    }
}

/// `next`, when it differs from `before`.
fn changed(before: &BrazeExportStatus, next: BrazeExportStatus) -> Option<BrazeExportStatus> {
    (&next != before).then_some(next)
}

/// The status with a run left `Running` by a gone instance recorded as interrupted, and the
/// Event that tells it.
fn crash_recorded(
    export: &BrazeExport,
    before: &BrazeExportStatus,
    now: Timestamp,
) -> (BrazeExportStatus, Vec<Note>) {
    if !status::is_running(before) {
        return (before.clone(), Vec::new());
    }
    let current = status::crashed(before, export.metadata.generation, now);
    let message = current
        .last_run
        .as_ref()
        .map_or_else(String::new, |r| r.message.clone());
    let note = Note {
        warning: true,
        reason: reason::RUN_INTERRUPTED,
        message,
    };
    (current, vec![note])
}

/// An export whose spec is invalid: `Ready=False`, `InvalidSpec`, told once per change.
fn invalid(
    export: &BrazeExport,
    before: &BrazeExportStatus,
    current: BrazeExportStatus,
    notes: Vec<Note>,
    message: String,
    now: Timestamp,
) -> Step {
    let refused = Refusal {
        reason: reason::INVALID_SPEC,
        message,
        then: Then::AwaitChange,
    };
    refuse(export, before, current, notes, refused, now)
}

/// Why an export may not run, and when to look again.
struct Refusal {
    reason: &'static str,
    message: String,
    then: Then,
}

/// An export that may not run: `Ready=False` with the refusal's reason, told once per change.
fn refuse(
    export: &BrazeExport,
    before: &BrazeExportStatus,
    current: BrazeExportStatus,
    mut notes: Vec<Note>,
    refused: Refusal,
    now: Timestamp,
) -> Step {
    let generation = export.metadata.generation;
    let Refusal {
        reason,
        message,
        then,
    } = refused;
    let next = status::blocked(&current, generation, reason, &message, now);
    if status::ready(&next) != status::ready(before) {
        notes.push(Note {
            warning: true,
            reason,
            message,
        });
    }
    Step {
        status: changed(before, next),
        notes,
        then,
    }
}

/// A run that cannot start because its Secrets cannot be read (`why`: `SecretNotFound` or
/// `SecretUnreadable`): `Ready=False` naming the Secret, told once per change, looked at
/// again after [`SECRET_RETRY`].
pub fn secret_blocked(
    export: &BrazeExport,
    start: &Start,
    why: &'static str,
    message: String,
    now: Timestamp,
) -> Step {
    let generation = export.metadata.generation;
    let next = status::blocked(&start.base, generation, why, &message, now);
    let status = (Some(&next) != export.status.as_ref()).then_some(next);
    let notes = match status {
        Some(_) => vec![Note {
            warning: true,
            reason: why,
            message,
        }],
        None => Vec::new(),
    };
    Step {
        status,
        notes,
        then: Then::Requeue(SECRET_RETRY),
    }
}

/// An export this version cannot decode (`message` names the field), with the status it has:
/// `Ready=False`, `InvalidSpec`.
pub fn undecodable(
    current: &BrazeExportStatus,
    generation: Option<i64>,
    message: &str,
    now: Timestamp,
) -> Step {
    let next = status::blocked(current, generation, reason::INVALID_SPEC, message, now);
    Step {
        status: changed(current, next),
        notes: Vec::new(),
        then: Then::AwaitChange,
    }
}

/// The end of a run of `export` that `start` began and `started` recorded: its report in
/// `lastRun` and `history`, `Ready` saying whether and when a failed run is retried, and the
/// Event of its outcome.
pub fn run_ended(
    export: &BrazeExport,
    start: &Start,
    started: &BrazeExportStatus,
    report: &RunReport,
    f: &Facts<'_>,
) -> Step {
    let (generation, suspend, now) = (export.metadata.generation, export.spec.suspend, f.now);
    let next = (!suspend).then(|| start.schedule.next_after(now)).flatten();
    let ended = status::finished(
        started,
        report,
        generation,
        next,
        crate::schedule::Retry::No,
        now,
    );
    let retried = retry(&inputs(export, &start.schedule, &ended, f));
    let finished = status::idle(&ended, generation, suspend, next, retried, now);
    let (warning, why) = match report.outcome {
        Outcome::Succeeded => (false, reason::RUN_SUCCEEDED),
        Outcome::PartiallySucceeded => (true, reason::RUN_PARTIALLY_SUCCEEDED),
        Outcome::Interrupted => (true, reason::RUN_INTERRUPTED),
        Outcome::Failed | Outcome::Running => (true, reason::RUN_FAILED),
    };
    let note = Note {
        warning,
        reason: why,
        message: report.message.clone(),
    };
    Step {
        status: Some(finished),
        notes: vec![note],
        then: Then::AwaitChange,
    }
}

/// What the schema cannot check: the plan (identifiers, names, URLs), the schedule, and the
/// operator's Looker host allowlist. One message naming every bad field.
pub fn validate(
    export: &BrazeExport,
    allowed_hosts: &AllowedHosts,
) -> Result<(ExportPlan, Schedule), String> {
    let name = export.metadata.name.as_deref().unwrap_or_default();
    let mut errors = Vec::new();
    let plan = ExportPlan::new(name, &export.spec).map_err(|e| errors.extend(e));
    let schedule =
        Schedule::new(&export.spec.schedule, export.spec.time_zone.as_deref()).map_err(|e| {
            // The plan already names a bad schedule or zone field.
            if errors.is_empty() {
                errors.push(FieldError {
                    field: "spec.schedule".into(),
                    message: e,
                });
            }
        });
    // The allowlist's message names the field itself.
    let host = allowed_hosts.check(&export.spec.looker.base_url);
    match (plan, schedule, host) {
        (Ok(plan), Ok(schedule), Ok(())) if errors.is_empty() => Ok((plan, schedule)),
        (_, _, host) => Err([Some(join_errors(&errors)), host.err()]
            .into_iter()
            .flatten()
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// The requeue delay to reach `at`, a little after it so the tick has passed.
pub fn wait_until(at: Timestamp, now: Timestamp) -> Duration {
    let wait = at.duration_since(now).as_secs_f64().max(0.0) + 0.05;
    Duration::from_secs_f64(wait).clamp(Duration::from_millis(50), MAX_REQUEUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::report::{Outcome, Trigger};

    const NOW: &str = "2026-11-29T10:00:00Z";

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn export(extra: serde_json::Value) -> BrazeExport {
        let mut v = serde_json::json!({
            "apiVersion": "looker-braze.dev/v1alpha1", "kind": "BrazeExport",
            "metadata": {"name": "churn", "namespace": "m", "generation": 2, "creationTimestamp": "2026-11-01T00:00:00Z"},
            "spec": {
                "schedule": "0 6 * * *",
                "looker": {"baseUrl": "https://acme.looker.com", "lookId": "42", "credentialsSecretRef": {"name": "l"}},
                "braze": {"endpoint": "https://rest.iad-01.braze.com", "apiKeySecretRef": {"name": "b"}}
            }
        });
        merge(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    /// RFC 7386 merge, for spec variants.
    fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
            (t, p) => *t = p.clone(),
        }
    }

    fn facts(hosts: &AllowedHosts) -> Facts<'_> {
        Facts {
            active: false,
            allowed_hosts: hosts,
            retry_base: crate::schedule::RETRY_BASE,
            exports: &[],
            now: ts(NOW),
        }
    }

    fn ready(s: &BrazeExportStatus) -> (String, String, String) {
        let c = status::ready(s).unwrap();
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn a_new_export_is_pending_until_its_next_tick() {
        let any = AllowedHosts::any();
        let mut e = export(serde_json::json!({}));
        e.status = Some(BrazeExportStatus {
            last_schedule_time: Some(ts("2026-11-29T06:00:00Z")),
            ..BrazeExportStatus::default()
        });
        let s = step(&e, &facts(&any));
        let next = s.status.expect("a status to write");
        assert_eq!(ready(&next).1, "Pending");
        assert_eq!(next.observed_generation, Some(2));
        assert_eq!(next.next_schedule_time, Some(ts("2026-11-30T06:00:00Z")));
        assert!(s.notes.is_empty());
        assert!(matches!(s.then, Then::Requeue(d) if d == Duration::from_secs(3600)));

        e.status = Some(next);
        let again = step(&e, &facts(&any));
        assert!(again.status.is_none(), "nothing changed: nothing to write");
    }

    #[test]
    fn an_export_with_a_task_here_is_left_to_it() {
        let any = AllowedHosts::any();
        let e = export(
            serde_json::json!({"metadata": {"annotations": {"looker-braze.dev/run-now": "r1"}}}),
        );
        let s = step(
            &e,
            &Facts {
                active: true,
                ..facts(&any)
            },
        );
        assert!(s.status.is_none() && s.notes.is_empty());
        assert!(matches!(s.then, Then::Requeue(d) if d == RUN_POLL));
    }

    #[test]
    fn run_now_starts_a_manual_run() {
        let any = AllowedHosts::any();
        let e = export(
            serde_json::json!({"metadata": {"annotations": {"looker-braze.dev/run-now": "r1"}}}),
        );
        let s = step(&e, &facts(&any));
        let Then::Start(start) = s.then else {
            panic!("no start")
        };
        assert_eq!(start.due.trigger, Trigger::Manual);
        assert_eq!(start.due.run_request.as_deref(), Some("r1"));
        assert!(s.status.is_none(), "the start is written by the run task");
    }

    #[test]
    fn a_run_left_by_a_gone_runner_is_interrupted_and_retried_after_a_minute() {
        let any = AllowedHosts::any();
        let mut e = export(serde_json::json!({}));
        let due = crate::schedule::Due {
            trigger: Trigger::Schedule,
            scheduled_for: Some(ts("2026-11-29T06:00:00Z")),
            run_request: None,
        };
        e.status = Some(status::progress(
            &status::started(
                &BrazeExportStatus::default(),
                Some(2),
                &due,
                "pod-a_1",
                ts("2026-11-29T09:59:00Z"),
            ),
            40,
            30,
        ));
        let s = step(&e, &facts(&any));
        let next = s.status.expect("a status");
        let last = next.last_run.as_ref().unwrap();
        assert_eq!((last.outcome, last.counts.sent), (Outcome::Interrupted, 30));
        assert!(next.runner.is_none());
        assert!(!status::is_running(&next));
        let (st, why, message) = ready(&next);
        assert_eq!((st.as_str(), why.as_str()), ("False", "Failed"));
        assert!(
            message.ends_with("; it is retried at 2026-11-29T10:01:00Z"),
            "{message}"
        );
        assert_eq!(s.notes.len(), 1);
        assert_eq!(s.notes[0].reason, reason::RUN_INTERRUPTED);
        assert!(
            s.notes[0]
                .message
                .contains("operator instance pod-a_1 stopped during the run")
        );
        assert!(
            matches!(s.then, Then::Requeue(d) if d > Duration::from_secs(59) && d < Duration::from_secs(61))
        );
    }

    #[test]
    fn an_invalid_spec_or_host_is_blocked_with_one_event() {
        let any = AllowedHosts::any();
        let e = export(serde_json::json!({"spec": {"timeZone": "Mars/Olympus"}}));
        let s = step(&e, &facts(&any));
        let next = s.status.expect("a status");
        let (st, why, message) = ready(&next);
        assert_eq!((st.as_str(), why.as_str()), ("False", "InvalidSpec"));
        assert!(
            message.starts_with("spec.timeZone: unknown time zone"),
            "{message}"
        );
        assert_eq!(s.notes.len(), 1);
        assert!(matches!(s.then, Then::AwaitChange));
        let mut e2 = e.clone();
        e2.status = Some(next);
        assert!(
            step(&e2, &facts(&any)).notes.is_empty(),
            "the Event is not repeated"
        );

        let looker_only = AllowedHosts::parse("*.cloud.looker.com").unwrap();
        let s = step(&export(serde_json::json!({})), &facts(&looker_only));
        assert_eq!(
            ready(&s.status.unwrap()).2,
            "spec.looker.baseUrl: host acme.looker.com is not allowed by this operator (--looker-allowed-hosts *.cloud.looker.com)"
        );
    }

    #[test]
    fn a_second_remover_of_one_flag_is_refused_and_does_not_start() {
        let any = AllowedHosts::any();
        let first = export(serde_json::json!({"spec": {"braze": {"removal": "Remove"}}}));
        let mut later = export(serde_json::json!({
            "metadata": {"name": "later", "creationTimestamp": "2026-11-02T00:00:00Z",
                         "annotations": {"looker-braze.dev/run-now": "r1"}},
            "spec": {"braze": {"removal": "Remove"}}
        }));
        let cached = [
            Arc::new(Watched::Decoded(first.clone())),
            Arc::new(Watched::Decoded(later.clone())),
        ];
        let f = Facts {
            exports: &cached,
            ..facts(&any)
        };
        let s = step(&later, &f);
        let next = s.status.expect("a status");
        let (st, why, message) = ready(&next);
        assert_eq!((st.as_str(), why.as_str()), ("False", "FlagConflict"));
        assert!(
            message.starts_with("export m/churn already removes"),
            "{message}"
        );
        assert_eq!(next.next_schedule_time, None);
        assert_eq!(s.notes.len(), 1);
        assert_eq!(s.notes[0].reason, reason::FLAG_CONFLICT);
        assert!(matches!(s.then, Then::Requeue(d) if d == FLAG_CONFLICT_RETRY));
        later.status = Some(next);
        let again = step(&later, &f);
        assert!(
            again.status.is_none() && again.notes.is_empty(),
            "told once"
        );

        let s = step(&first, &f);
        assert!(
            s.notes.is_empty()
                && s.status.as_ref().map(|n| ready(n).1) != Some("FlagConflict".into()),
            "the first is unaffected"
        );
        let own = export(serde_json::json!({
            "metadata": {"name": "later", "creationTimestamp": "2026-11-02T00:00:00Z",
                         "annotations": {"looker-braze.dev/run-now": "r1"}},
            "spec": {"braze": {"removal": "Remove", "exportName": "LATER"}}
        }));
        assert!(
            matches!(step(&own, &f).then, Then::Start(_)),
            "its own flag"
        );
    }

    /// The run a run-now request starts on `e` (which must carry one).
    fn manual_start(e: &BrazeExport, any: &AllowedHosts) -> Start {
        match step(e, &facts(any)).then {
            Then::Start(start) => *start,
            other => panic!("expected a start, got {other:?}"),
        }
    }

    #[test]
    fn a_run_blocked_by_its_secret_names_it_once_and_looks_again_later() {
        let any = AllowedHosts::any();
        let mut e = export(
            serde_json::json!({"metadata": {"annotations": {"looker-braze.dev/run-now": "r1"}}}),
        );
        let start = manual_start(&e, &any);
        let why = "Secret m/b not found (spec.braze.apiKeySecretRef)";
        let s = secret_blocked(&e, &start, reason::SECRET_NOT_FOUND, why.into(), ts(NOW));
        let next = s.status.expect("a status");
        assert_eq!(
            ready(&next),
            ("False".into(), "SecretNotFound".into(), why.into())
        );
        assert_eq!(
            next.next_schedule_time, None,
            "nothing runs until it is fixed"
        );
        assert_eq!(
            s.notes,
            vec![Note {
                warning: true,
                reason: reason::SECRET_NOT_FOUND,
                message: why.into()
            }]
        );
        assert!(matches!(s.then, Then::Requeue(d) if d == SECRET_RETRY));

        e.status = Some(next);
        let again = secret_blocked(&e, &start, reason::SECRET_NOT_FOUND, why.into(), ts(NOW));
        assert!(
            again.status.is_none() && again.notes.is_empty(),
            "told once"
        );
        assert!(matches!(again.then, Then::Requeue(d) if d == SECRET_RETRY));
    }

    #[test]
    fn an_undecodable_export_is_an_invalid_spec_written_once() {
        let why = "spec.braze.removal: unknown variant `Purge`; a newer operator may be needed";
        let s = undecodable(&BrazeExportStatus::default(), Some(3), why, ts(NOW));
        let next = s.status.expect("a status");
        assert_eq!(
            ready(&next),
            ("False".into(), "InvalidSpec".into(), why.into())
        );
        assert_eq!(next.observed_generation, Some(3));
        assert!(s.notes.is_empty() && matches!(s.then, Then::AwaitChange));
        let again = undecodable(&next, Some(3), why, ts(NOW));
        assert!(again.status.is_none(), "nothing changed: nothing to write");
    }

    #[test]
    fn a_run_s_end_records_its_report_its_retry_and_one_event() {
        use crate::export::report::{RunContext, RunFailure, Tally, finish};
        let any = AllowedHosts::any();
        let e = export(
            serde_json::json!({"metadata": {"annotations": {"looker-braze.dev/run-now": "r1"}}}),
        );
        let start = manual_start(&e, &any);
        let began = ts("2026-11-29T09:58:00Z");
        let started = status::started(&start.base, Some(2), &start.due, "pod-a_1", began);
        let context = RunContext {
            trigger: Trigger::Manual,
            start_time: began,
            completion_time: ts(NOW),
            dry_run: false,
        };
        let failure = RunFailure {
            reason: "LookerUnavailable",
            message: "Looker answered 503 to GET /api/4.0/looks/42".into(),
        };
        let failed = finish(Tally::default(), Some(failure), false, context.clone());
        let s = run_ended(&e, &start, &started, &failed, &facts(&any));
        let next = s.status.expect("a status");
        assert_eq!(
            next.last_run.as_ref().map(|r| r.outcome),
            Some(Outcome::Failed)
        );
        assert_eq!(next.history.len(), 1);
        assert!(next.runner.is_none() && !status::is_running(&next));
        let (st, why, message) = ready(&next);
        assert_eq!((st.as_str(), why.as_str()), ("False", "Failed"));
        assert!(message.contains("Looker answered 503"), "{message}");
        assert!(
            message.ends_with("; it is retried at 2026-11-29T10:01:00Z"),
            "{message}"
        );
        assert_eq!(next.next_schedule_time, Some(ts("2026-11-30T06:00:00Z")));
        assert_eq!(
            s.notes,
            vec![Note {
                warning: true,
                reason: reason::RUN_FAILED,
                message: failed.message.clone()
            }]
        );
        assert!(matches!(s.then, Then::AwaitChange));

        let succeeded = finish(Tally::default(), None, false, context);
        let s = run_ended(&e, &start, &started, &succeeded, &facts(&any));
        assert_eq!(ready(&s.status.unwrap()).0, "True");
        assert_eq!(
            (s.notes[0].warning, s.notes[0].reason),
            (false, reason::RUN_SUCCEEDED)
        );
    }
}
