//! The reconcile's pure step: validate → decide → the next status, the Events and what to do,
//! from the export and `now` alone. `reconcile` applies it.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::status::{self, reason};
use crate::export::ExportPlan;
use crate::looker::hosts::AllowedHosts;
use crate::schedule::{Decision, Due, Inputs, RUN_NOW_ANNOTATION, Schedule, decide, retry};
use crate::spec::{BrazeExport, BrazeExportStatus, FieldError, join_errors};

/// Longest wait before looking at an export again.
pub const MAX_REQUEUE: Duration = Duration::from_secs(3600);
/// How often an export whose run is in this process is looked at.
pub const RUN_POLL: Duration = Duration::from_secs(2);

/// What the step reads besides the export.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// A task of this process runs the export, or waits for a slot to.
    pub active: bool,
    /// The Looker hosts this operator may call.
    pub allowed_hosts: &'a AllowedHosts,
    /// Wait before the first retry.
    pub retry_base: SignedDuration,
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
    let generation = export.metadata.generation;
    let now = f.now;
    let before = export.status.clone().unwrap_or_default();
    let mut current = before.clone();
    let mut notes = Vec::new();
    if status::is_running(&current) {
        current = status::crashed(&current, generation, now);
        let message = current
            .last_run
            .as_ref()
            .map_or_else(String::new, |r| r.message.clone());
        notes.push(Note {
            warning: true,
            reason: reason::RUN_INTERRUPTED,
            message,
        });
    }
    let changed = |next: BrazeExportStatus| (next != before).then_some(next);

    let (plan, schedule) = match validate(export, f.allowed_hosts) {
        Ok(ok) => ok,
        Err(message) => {
            let next = status::blocked(&current, generation, reason::INVALID_SPEC, &message, now);
            if status::ready(&next) != status::ready(&before) {
                notes.push(Note {
                    warning: true,
                    reason: reason::INVALID_SPEC,
                    message,
                });
            }
            return Step {
                status: changed(next),
                notes,
                then: Then::AwaitChange,
            };
        }
    };
    let created = export
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let inputs = Inputs {
        schedule: &schedule,
        suspend: export.spec.suspend,
        starting_deadline_seconds: export.spec.starting_deadline_seconds,
        created,
        status: &current,
        run_request: export
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RUN_NOW_ANNOTATION))
            .map(String::as_str),
        running: false,
        retry_base: f.retry_base,
        now,
    };
    match decide(&inputs) {
        Decision::Wait(until) => {
            let next = status::idle(
                &current,
                generation,
                export.spec.suspend,
                schedule.next_after(now),
                retry(&inputs),
                now,
            );
            Step {
                status: changed(next),
                notes,
                then: Then::Requeue(until.map_or(MAX_REQUEUE, |t| wait_until(t, now))),
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
