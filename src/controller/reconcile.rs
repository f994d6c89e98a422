//! One reconcile: validate, decide (pure), read Secrets, start a run or wait. Status is
//! written through the status subresource only; the spec is never written.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::status::{self, reason};
use super::{CONTROLLER_NAME, Context, Error, secrets};
use crate::export::report::{self, Outcome, RunContext, RunReport, Tally};
use crate::export::{Credentials, ExportPlan, RunOptions, run_export};
use crate::schedule::{Decision, Due, Inputs, RUN_NOW_ANNOTATION, Schedule, decide};
use crate::spec::{BrazeExport, BrazeExportStatus, join_errors};
use crate::text::truncate;

/// Longest wait before looking at an export again.
const MAX_REQUEUE: Duration = Duration::from_secs(3600);
/// Wait before looking again at an export whose Secret is missing.
const SECRET_RETRY: Duration = Duration::from_secs(30);

/// Reconciles one export.
pub async fn reconcile(obj: Arc<BrazeExport>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let key = format!("{namespace}/{name}");
    if ctx.is_active(&key) {
        // The run task writes the status when it ends; look again shortly after.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    if ctx.shutdown.is_cancelled() {
        return Ok(Action::await_change());
    }
    let api: Api<BrazeExport> = Api::namespaced(ctx.client.clone(), &namespace);
    let generation = obj.metadata.generation;
    let now = Timestamp::now();
    let mut current = obj.status.clone().unwrap_or_default();

    if status::is_running(&current) {
        // Running, but no task here runs it: the operator that did stopped mid-run.
        current = status::crashed(&current, generation, now);
        write_status(&api, &name, &current).await?;
        publish(
            &ctx,
            &obj,
            EventType::Warning,
            "RunInterrupted",
            "the operator stopped during the run; it starts again",
        )
        .await;
    }

    let checked = ExportPlan::new(&name, &obj.spec).and_then(|plan| {
        Schedule::new(&obj.spec.schedule, obj.spec.time_zone.as_deref())
            .map(|s| (plan, s))
            .map_err(|e| {
                vec![crate::spec::FieldError {
                    field: "spec.schedule".into(),
                    message: e,
                }]
            })
    });
    let (plan, schedule) = match checked {
        Ok(ok) => ok,
        Err(errors) => {
            let message = join_errors(&errors);
            let next = status::blocked(&current, generation, reason::INVALID_SPEC, &message, now);
            if next != current {
                write_status(&api, &name, &next).await?;
                publish(
                    &ctx,
                    &obj,
                    EventType::Warning,
                    reason::INVALID_SPEC,
                    &message,
                )
                .await;
            }
            return Ok(Action::await_change());
        }
    };

    let decision = decide(&Inputs {
        schedule: &schedule,
        suspend: obj.spec.suspend,
        starting_deadline_seconds: obj.spec.starting_deadline_seconds,
        created: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(now, |t| t.0),
        status: &current,
        run_request: obj
            .annotations()
            .get(RUN_NOW_ANNOTATION)
            .map(String::as_str),
        running: false,
        now,
    });
    let due = match decision {
        Decision::Wait(until) => {
            let next = status::idle(
                &current,
                generation,
                obj.spec.suspend,
                schedule.next_after(now),
                now,
            );
            if next != current {
                write_status(&api, &name, &next).await?;
            }
            return Ok(until.map_or(Action::requeue(MAX_REQUEUE), |t| requeue_at(t, now)));
        }
        Decision::Run(due) => due,
    };
    let creds = match secrets::credentials(&ctx.client, &namespace, &obj.spec).await {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            let next = status::blocked(&current, generation, e.reason(), &message, now);
            if next != current {
                write_status(&api, &name, &next).await?;
                publish(&ctx, &obj, EventType::Warning, e.reason(), &message).await;
            }
            return Ok(Action::requeue(SECRET_RETRY));
        }
    };
    let started = status::started(&current, generation, &due, now);
    write_status(&api, &name, &started).await?;
    if let Some(at) = due.scheduled_for {
        ctx.metrics
            .record_start_delay(now.duration_since(at).as_secs_f64());
    }
    // No times in the note: repeated starts then aggregate into one Event series.
    let note = format!("{:?} run started", due.trigger);
    publish(&ctx, &obj, EventType::Normal, "RunStarted", &note).await;
    ctx.active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.clone());
    let task = RunTask {
        ctx: Arc::clone(&ctx),
        obj,
        api,
        key,
        plan,
        schedule,
        creds,
        due,
        status: started,
    };
    ctx.tasks.spawn(task.run());
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// Requeues for a failed reconcile.
pub fn error_policy(obj: Arc<BrazeExport>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(error.reason());
    tracing::warn!(export = %obj.name_any(), namespace = obj.namespace().unwrap_or_default(), error = %error, "reconcile failed; retrying in 15 s");
    Action::requeue(Duration::from_secs(15))
}

fn requeue_at(at: Timestamp, now: Timestamp) -> Action {
    let wait = at.duration_since(now).as_secs_f64().max(0.0) + 0.05;
    Action::requeue(Duration::from_secs_f64(wait).clamp(Duration::from_millis(50), MAX_REQUEUE))
}

/// Replaces the status (a merge patch of the whole object: absent fields are removed).
async fn write_status(
    api: &Api<BrazeExport>,
    name: &str,
    status: &BrazeExportStatus,
) -> Result<(), Error> {
    let params = PatchParams::apply(CONTROLLER_NAME);
    api.patch_status(name, &params, &Patch::Merge(json!({ "status": status })))
        .await?;
    Ok(())
}

async fn publish(ctx: &Context, obj: &BrazeExport, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot publish an event");
    }
}

/// A run in progress, owning what it needs.
struct RunTask {
    ctx: Arc<Context>,
    obj: Arc<BrazeExport>,
    api: Api<BrazeExport>,
    key: String,
    plan: ExportPlan,
    schedule: Schedule,
    creds: Credentials,
    due: Due,
    status: BrazeExportStatus,
}

impl RunTask {
    async fn run(self) {
        let report = self.execute().await;
        let now = Timestamp::now();
        let next = if self.obj.spec.suspend {
            None
        } else {
            self.schedule.next_after(now)
        };
        let finished = status::finished(
            &self.status,
            &report,
            self.obj.metadata.generation,
            next,
            now,
        );
        for attempt in 1..=5 {
            match write_status(&self.api, &self.obj.name_any(), &finished).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(export = %self.key, attempt, error = %e, "cannot write the run's status");
                    tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                }
            }
        }
        self.ctx.metrics.record_run(&report, now);
        let (type_, why) = match report.outcome {
            Outcome::Succeeded => (EventType::Normal, "RunSucceeded"),
            Outcome::PartiallySucceeded => (EventType::Warning, "RunPartiallySucceeded"),
            Outcome::Interrupted => (EventType::Warning, "RunInterrupted"),
            Outcome::Failed | Outcome::Running => (EventType::Warning, "RunFailed"),
        };
        publish(&self.ctx, &self.obj, type_, why, &report.message).await;
        self.ctx
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }

    async fn execute(&self) -> RunReport {
        let start = Timestamp::now();
        let permit = tokio::select! {
            () = self.ctx.shutdown.cancelled() => None,
            p = Arc::clone(&self.ctx.permits).acquire_owned() => p.ok(),
        };
        let Some(_permit) = permit else {
            let ctx = RunContext {
                trigger: self.due.trigger,
                start_time: start,
                completion_time: Timestamp::now(),
                dry_run: false,
            };
            return report::finish(Tally::default(), None, true, ctx);
        };
        let opts = RunOptions::new(self.due.trigger);
        let opts = RunOptions {
            cancel: self.ctx.shutdown.child_token(),
            ..opts
        };
        let progress = Arc::clone(&opts.progress);
        let (api, name, base, interval) = (
            self.api.clone(),
            self.obj.name_any(),
            self.status.clone(),
            self.ctx.progress_interval,
        );
        let reporter = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let (read, sent) = (
                    progress.rows_read.load(Ordering::Relaxed),
                    progress.sent.load(Ordering::Relaxed),
                );
                let _ = write_status(&api, &name, &status::progress(&base, read, sent)).await;
            }
        });
        let report = run_export(&self.ctx.services, &self.plan, &self.creds, opts).await;
        reporter.abort();
        report
    }
}
