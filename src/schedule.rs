//! Schedules and the decision of when to run: pure functions of the spec, the status and
//! `now`. Cron times are read in the export's time zone; the zone database is built in.

use croner::Cron;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use crate::cron::parse_cron;
use crate::export::report::{Outcome, Trigger};
use crate::spec::BrazeExportStatus;

/// The annotation that asks for a run now; its value (any new one) starts one run.
pub const RUN_NOW_ANNOTATION: &str = "looker-braze.dev/run-now";
/// With `delta: true`, a run-now whose request this annotation repeats sends everyone again
/// (a full resync), once.
pub const FULL_RESYNC_ANNOTATION: &str = "looker-braze.dev/full-resync";
/// With a stored audience, a run-now whose request this annotation repeats starts without it
/// (a first run: everyone is sent, nobody removed) and stores a new one, once.
pub const DISCARD_AUDIENCE_ANNOTATION: &str = "looker-braze.dev/discard-audience";
/// Retries after a run that failed as a whole.
pub const MAX_RETRIES: u32 = 3;
/// Wait before the first retry; doubled for each further one.
pub const RETRY_BASE: SignedDuration = SignedDuration::from_mins(1);
/// A scheduled run started later than this after its time is reported as a catch-up.
pub const ON_TIME: SignedDuration = SignedDuration::from_secs(60);

/// A cron expression in a time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    tz: TimeZone,
}

impl Schedule {
    /// The schedule of `expr` read in `time_zone` (UTC when absent).
    pub fn new(expr: &str, time_zone: Option<&str>) -> Result<Self, String> {
        let tz = match time_zone {
            Some(name) => TimeZone::get(name).map_err(|_| format!("unknown time zone {name:?}"))?,
            None => TimeZone::UTC,
        };
        Ok(Self {
            cron: parse_cron(expr)?,
            tz,
        })
    }

    /// The first time strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&t.to_zoned(self.tz.clone()), false)
            .ok()
            .map(|z| z.timestamp())
    }

    /// The gap between the scheduled times on either side of `t`: the last at or before it
    /// and the next after it (a weekday schedule's gap is 3 days over a weekend).
    pub fn interval_around(&self, t: Timestamp) -> Option<SignedDuration> {
        Some(
            self.next_after(t)?
                .duration_since(self.last_at_or_before(t)?),
        )
    }

    /// The last time at or before `t`.
    pub fn last_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_previous_occurrence(&t.to_zoned(self.tz.clone()), true)
            .ok()
            .map(|z| z.timestamp())
    }
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// The export's schedule.
    pub schedule: &'a Schedule,
    /// `spec.suspend`.
    pub suspend: bool,
    /// `spec.startingDeadlineSeconds`.
    pub starting_deadline_seconds: Option<i64>,
    /// When the resource was created (ticks at or before it are never due).
    pub created: Timestamp,
    /// The current status.
    pub status: &'a BrazeExportStatus,
    /// The run-now annotation's value.
    pub run_request: Option<&'a str>,
    /// A run of this export is in progress.
    pub running: bool,
    /// Wait before the first retry ([`RETRY_BASE`]; shorter in tests).
    pub retry_base: SignedDuration,
    /// Now.
    pub now: Timestamp,
}

/// A run to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// Why it starts.
    pub trigger: Trigger,
    /// The schedule time it stands for (scheduled and catch-up runs).
    pub scheduled_for: Option<Timestamp>,
    /// The run-now value it answers (manual runs).
    pub run_request: Option<String>,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start this run.
    Run(Due),
    /// Nothing to do before this time (`None`: until something changes).
    Wait(Option<Timestamp>),
}

/// Whether a run that failed or was interrupted is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// The last run needs no retry.
    No,
    /// Retried at this time.
    At(Timestamp),
    /// Not retried: [`MAX_RETRIES`] retries in a row ended the same way.
    GaveUp,
    /// Not retried: the next scheduled run comes first.
    Superseded,
}

/// Decides whether a run starts now: a new run-now value first (even when suspended), then
/// the most recent due time not yet run (if within the starting deadline, default one
/// interval; older ones are skipped), then a retry of a run that failed or was interrupted (1,
/// 2, 4 minutes, at most 3, never past the next scheduled time). Never while a run of the
/// export is in progress.
pub fn decide(i: &Inputs<'_>) -> Decision {
    if i.running {
        return Decision::Wait(None);
    }
    if let Some(request) = i.run_request
        && !request.is_empty()
        && i.status.last_handled_run_request.as_deref() != Some(request)
    {
        return Decision::Run(Due {
            trigger: Trigger::Manual,
            scheduled_for: None,
            run_request: Some(request.to_owned()),
        });
    }
    let retry = retry(i);
    if i.suspend {
        // An interrupted or failed manual run is still retried while suspended: the chain of
        // retries started with a manual run (the newest run that was not a retry).
        let manual = i
            .status
            .last_run
            .iter()
            .map(|r| r.trigger)
            .chain(i.status.history.iter().map(|h| h.trigger))
            .find(|t| *t != Trigger::Retry)
            == Some(Trigger::Manual);
        return match retry {
            Retry::At(at) if manual && at <= i.now => Decision::Run(retry_due()),
            Retry::At(at) if manual => Decision::Wait(Some(at)),
            _ => Decision::Wait(None),
        };
    }
    if let Some(due) = missed_tick(i) {
        let trigger = if i.now.duration_since(due) <= ON_TIME {
            Trigger::Schedule
        } else {
            Trigger::CatchUp
        };
        return Decision::Run(Due {
            trigger,
            scheduled_for: Some(due),
            run_request: None,
        });
    }
    let next = i.schedule.next_after(i.now);
    match retry {
        Retry::At(at) if at <= i.now => Decision::Run(retry_due()),
        Retry::At(at) => Decision::Wait(Some(next.map_or(at, |n| n.min(at)))),
        Retry::No | Retry::GaveUp | Retry::Superseded => Decision::Wait(next),
    }
}

fn retry_due() -> Due {
    Due {
        trigger: Trigger::Retry,
        scheduled_for: None,
        run_request: None,
    }
}

/// The most recent schedule time not yet run, if it is within the starting deadline. Like a
/// CronJob, only ticks strictly after creation count: `creationTimestamp` has whole seconds,
/// so an export created at 14:58:00.4 reads as 14:58:00 and must not run for the 14:58 tick.
fn missed_tick(i: &Inputs<'_>) -> Option<Timestamp> {
    let due = i.schedule.last_at_or_before(i.now)?;
    if due <= i.created || i.status.last_schedule_time.is_some_and(|l| due <= l) {
        return None;
    }
    let deadline = match i.starting_deadline_seconds {
        Some(s) => SignedDuration::from_secs(s),
        None => i.schedule.next_after(due)?.duration_since(due),
    };
    (i.now.duration_since(due) <= deadline).then_some(due)
}

/// Whether and when the last run, if it failed or was interrupted (a crash included), is
/// retried: `retry_base` doubled for each retry already made in a row, at most
/// [`MAX_RETRIES`], never past the next scheduled time. A run that keeps crashing the
/// operator thus stops being retried instead of looping.
pub fn retry(i: &Inputs<'_>) -> Retry {
    let failed = |o: Outcome| matches!(o, Outcome::Failed | Outcome::Interrupted);
    let Some(run) = i.status.last_run.as_ref().filter(|r| failed(r.outcome)) else {
        return Retry::No;
    };
    let done = i
        .status
        .history
        .iter()
        .take_while(|h| failed(h.outcome) && h.trigger == Trigger::Retry)
        .count() as u32;
    if done >= MAX_RETRIES {
        return Retry::GaveUp;
    }
    let Some(end) = run.completion_time else {
        return Retry::No;
    };
    let at = end + i.retry_base * (1i32 << done);
    match i.schedule.next_after(run.start_time) {
        Some(tick) if at >= tick && !i.suspend => Retry::Superseded,
        _ => Retry::At(at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::report::RunReport;
    use crate::spec::RunSummary;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn sched(expr: &str, tz: &str) -> Schedule {
        Schedule::new(expr, Some(tz)).unwrap()
    }

    #[test]
    fn accepts_five_fields_and_macros() {
        for ok in [
            "0 6 * * *",
            "*/15 * * * 1-5",
            "@hourly",
            "@daily",
            "@weekly",
            "@monthly",
            "@yearly",
        ] {
            assert!(parse_cron(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "0 0 6 * * *",
            "61 * * * *",
            "0 6 * *",
            "every day",
            "0 6 * * * 2030",
        ] {
            assert!(parse_cron(bad).is_err(), "{bad}");
        }
        assert!(
            Schedule::new("@daily", Some("Mars/Olympus"))
                .unwrap_err()
                .contains("unknown time zone")
        );
    }

    #[test]
    fn next_and_last_in_utc_and_macros() {
        let cases = [
            (
                "0 6 * * *",
                "2026-11-29T05:00:00Z",
                "2026-11-29T06:00:00Z",
                "2026-11-28T06:00:00Z",
            ),
            (
                "0 6 * * *",
                "2026-11-29T06:00:00Z",
                "2026-11-30T06:00:00Z",
                "2026-11-29T06:00:00Z",
            ),
            (
                "@hourly",
                "2026-11-29T10:30:00Z",
                "2026-11-29T11:00:00Z",
                "2026-11-29T10:00:00Z",
            ),
            (
                "@daily",
                "2026-11-29T10:30:00Z",
                "2026-11-30T00:00:00Z",
                "2026-11-29T00:00:00Z",
            ),
            (
                "@weekly",
                "2026-11-29T10:30:00Z",
                "2026-12-06T00:00:00Z",
                "2026-11-29T00:00:00Z",
            ),
            (
                "@monthly",
                "2026-11-29T10:30:00Z",
                "2026-12-01T00:00:00Z",
                "2026-11-01T00:00:00Z",
            ),
            (
                "@yearly",
                "2026-11-29T10:30:00Z",
                "2027-01-01T00:00:00Z",
                "2026-01-01T00:00:00Z",
            ),
            (
                "30 9 * * 1-5",
                "2026-11-28T12:00:00Z",
                "2026-11-30T09:30:00Z",
                "2026-11-27T09:30:00Z",
            ),
        ];
        for (expr, now, next, last) in cases {
            let s = Schedule::new(expr, None).unwrap();
            assert_eq!(
                s.next_after(ts(now)),
                Some(ts(next)),
                "{expr} next after {now}"
            );
            assert_eq!(
                s.last_at_or_before(ts(now)),
                Some(ts(last)),
                "{expr} last before {now}"
            );
        }
    }

    #[test]
    fn the_interval_is_the_gap_around_now() {
        let weekdays = Schedule::new("30 9 * * 1-5", None).unwrap();
        let days = |d: i64| Some(SignedDuration::from_hours(24 * d));
        // Saturday: from Friday's run to Monday's.
        assert_eq!(
            weekdays.interval_around(ts("2026-11-28T12:00:00Z")),
            days(3)
        );
        // Tuesday: from Monday's run to Tuesday's.
        assert_eq!(
            weekdays.interval_around(ts("2026-12-01T08:00:00Z")),
            days(1)
        );
        let hourly = Schedule::new("@hourly", None).unwrap();
        assert_eq!(
            hourly.interval_around(ts("2026-11-29T10:00:00Z")),
            Some(SignedDuration::from_hours(1))
        );
    }

    #[test]
    fn berlin_daylight_saving() {
        let s = sched("0 6 * * *", "Europe/Berlin");
        // 06:00 local is 05:00 UTC in winter and 04:00 UTC in summer.
        assert_eq!(
            s.next_after(ts("2026-03-28T12:00:00Z")),
            Some(ts("2026-03-29T04:00:00Z"))
        );
        assert_eq!(
            s.next_after(ts("2026-10-24T12:00:00Z")),
            Some(ts("2026-10-25T05:00:00Z"))
        );
        // 02:30 does not exist on 2026-03-29 (02:00 → 03:00): the run happens once, at 03:00.
        let gap = sched("30 2 * * *", "Europe/Berlin");
        let first = gap.next_after(ts("2026-03-28T12:00:00Z")).unwrap();
        let second = gap.next_after(first).unwrap();
        assert_eq!(
            first,
            ts("2026-03-29T01:00:00Z"),
            "03:00 CEST, the first instant after the gap"
        );
        assert_eq!(second, ts("2026-03-30T00:30:00Z"));
        // 02:30 happens twice on 2026-10-25 (03:00 → 02:00): the run happens once.
        let fold = sched("30 2 * * *", "Europe/Berlin");
        let first = fold.next_after(ts("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(first, ts("2026-10-25T00:30:00Z"), "the first 02:30 (CEST)");
        assert_eq!(fold.next_after(first), Some(ts("2026-10-26T01:30:00Z")));
    }

    #[test]
    fn new_york_daylight_saving() {
        let s = sched("0 9 * * *", "America/New_York");
        assert_eq!(
            s.next_after(ts("2026-03-07T20:00:00Z")),
            Some(ts("2026-03-08T13:00:00Z")),
            "EDT starts 2026-03-08"
        );
        assert_eq!(
            s.next_after(ts("2026-10-31T20:00:00Z")),
            Some(ts("2026-11-01T14:00:00Z")),
            "EST from 2026-11-01"
        );
        let hourly = sched("0 * * * *", "America/New_York");
        let mut t = ts("2026-11-01T04:30:00Z");
        let mut seen = Vec::new();
        for _ in 0..4 {
            t = hourly.next_after(t).unwrap();
            seen.push(t);
        }
        let gaps: Vec<i64> = seen
            .windows(2)
            .map(|w| w[1].duration_since(w[0]).as_secs())
            .collect();
        assert!(
            gaps.iter().all(|g| *g == 3600),
            "hourly stays hourly across the fold: {seen:?}"
        );
    }

    fn status() -> BrazeExportStatus {
        BrazeExportStatus::default()
    }

    fn report(trigger: Trigger, outcome: Outcome, start: &str, end: &str) -> RunReport {
        let mut r = RunReport::in_progress(trigger, ts(start), 0, 0);
        r.outcome = outcome;
        r.completion_time = Some(ts(end));
        r
    }

    fn summary(trigger: Trigger, outcome: Outcome) -> RunSummary {
        RunSummary {
            start_time: ts("2026-11-29T06:00:00Z"),
            trigger,
            outcome,
            sent: 0,
            duration_seconds: 1.0,
        }
    }

    struct Case<'a> {
        schedule: &'a Schedule,
        status: BrazeExportStatus,
        now: &'a str,
        suspend: bool,
        deadline: Option<i64>,
        request: Option<&'a str>,
        running: bool,
    }

    impl<'a> Case<'a> {
        fn new(schedule: &'a Schedule, now: &'a str) -> Self {
            Self {
                schedule,
                status: status(),
                now,
                suspend: false,
                deadline: None,
                request: None,
                running: false,
            }
        }
        fn decide(&self) -> Decision {
            decide(&Inputs {
                schedule: self.schedule,
                suspend: self.suspend,
                starting_deadline_seconds: self.deadline,
                created: ts("2026-11-01T00:00:00Z"),
                status: &self.status,
                run_request: self.request,
                running: self.running,
                retry_base: RETRY_BASE,
                now: ts(self.now),
            })
        }
    }

    fn run(trigger: Trigger, at: Option<&str>) -> Decision {
        Decision::Run(Due {
            trigger,
            scheduled_for: at.map(ts),
            run_request: None,
        })
    }

    #[test]
    fn scheduled_runs_on_time_late_and_missed() {
        let daily = Schedule::new("0 6 * * *", None).unwrap();
        let mut c = Case::new(&daily, "2026-11-29T06:00:05Z");
        c.status.last_schedule_time = Some(ts("2026-11-28T06:00:00Z"));
        assert_eq!(
            c.decide(),
            run(Trigger::Schedule, Some("2026-11-29T06:00:00Z"))
        );
        c.now = "2026-11-29T09:00:00Z";
        assert_eq!(
            c.decide(),
            run(Trigger::CatchUp, Some("2026-11-29T06:00:00Z")),
            "within the default deadline (one day)"
        );
        c.deadline = Some(3600);
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-30T06:00:00Z"))),
            "past the deadline: skipped"
        );
        c.deadline = None;
        c.status.last_schedule_time = Some(ts("2026-11-29T06:00:00Z"));
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-30T06:00:00Z"))),
            "already run"
        );
    }

    #[test]
    fn an_operator_down_for_days_catches_up_once() {
        let hourly = Schedule::new("@hourly", None).unwrap();
        let mut c = Case::new(&hourly, "2026-11-29T10:20:00Z");
        c.status.last_schedule_time = Some(ts("2026-11-25T10:00:00Z"));
        assert_eq!(
            c.decide(),
            run(Trigger::CatchUp, Some("2026-11-29T10:00:00Z")),
            "only the most recent tick"
        );
        c.status.last_schedule_time = Some(ts("2026-11-29T10:00:00Z"));
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-29T11:00:00Z"))),
            "and only once"
        );
        let mut late = Case::new(&hourly, "2026-11-29T11:30:00Z");
        late.status.last_schedule_time = Some(ts("2026-11-25T10:00:00Z"));
        late.deadline = Some(600);
        assert_eq!(
            late.decide(),
            Decision::Wait(Some(ts("2026-11-29T12:00:00Z"))),
            "none past the deadline"
        );
    }

    #[test]
    fn times_before_creation_are_never_due() {
        let daily = Schedule::new("0 6 * * *", None).unwrap();
        let c = Case::new(&daily, "2026-11-01T05:00:00Z");
        assert_eq!(c.decide(), Decision::Wait(Some(ts("2026-11-01T06:00:00Z"))));
    }

    #[test]
    fn suspend_and_run_now() {
        let daily = Schedule::new("0 6 * * *", None).unwrap();
        let mut c = Case::new(&daily, "2026-11-29T06:00:05Z");
        c.suspend = true;
        assert_eq!(
            c.decide(),
            Decision::Wait(None),
            "suspended: no scheduled run"
        );
        c.request = Some("2026-11-29T10:00:00Z");
        assert_eq!(
            c.decide(),
            Decision::Run(Due {
                trigger: Trigger::Manual,
                scheduled_for: None,
                run_request: Some("2026-11-29T10:00:00Z".into())
            }),
            "run-now works while suspended"
        );
        c.status.last_handled_run_request = Some("2026-11-29T10:00:00Z".into());
        assert_eq!(c.decide(), Decision::Wait(None), "the same value runs once");
        c.running = true;
        c.request = Some("2026-11-29T11:00:00Z");
        assert_eq!(c.decide(), Decision::Wait(None), "never two runs at once");
    }

    #[test]
    fn failed_runs_are_retried_with_backoff_but_not_past_the_next_tick() {
        let hourly = Schedule::new("@hourly", None).unwrap();
        let mut c = Case::new(&hourly, "2026-11-29T10:00:30Z");
        c.status.last_schedule_time = Some(ts("2026-11-29T10:00:00Z"));
        c.status.last_run = Some(report(
            Trigger::Schedule,
            Outcome::Failed,
            "2026-11-29T10:00:00Z",
            "2026-11-29T10:00:10Z",
        ));
        c.status.history = vec![summary(Trigger::Schedule, Outcome::Failed)];
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-29T10:01:10Z"))),
            "first retry after 1 minute"
        );
        c.now = "2026-11-29T10:01:10Z";
        assert_eq!(c.decide(), run(Trigger::Retry, None));
        c.status.last_run = Some(report(
            Trigger::Retry,
            Outcome::Failed,
            "2026-11-29T10:01:10Z",
            "2026-11-29T10:01:20Z",
        ));
        c.status
            .history
            .insert(0, summary(Trigger::Retry, Outcome::Failed));
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-29T10:03:20Z"))),
            "then 2 minutes"
        );
        c.status
            .history
            .insert(0, summary(Trigger::Retry, Outcome::Failed));
        c.status.last_run = Some(report(
            Trigger::Retry,
            Outcome::Failed,
            "2026-11-29T10:03:20Z",
            "2026-11-29T10:03:30Z",
        ));
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-29T10:07:30Z"))),
            "then 4 minutes"
        );
        c.status
            .history
            .insert(0, summary(Trigger::Retry, Outcome::Failed));
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-29T11:00:00Z"))),
            "at most 3 retries"
        );

        let mut tight = Case::new(&hourly, "2026-11-29T10:59:30Z");
        tight.status.last_schedule_time = Some(ts("2026-11-29T10:00:00Z"));
        tight.status.last_run = Some(report(
            Trigger::Schedule,
            Outcome::Failed,
            "2026-11-29T10:00:00Z",
            "2026-11-29T10:59:20Z",
        ));
        assert_eq!(
            tight.decide(),
            Decision::Wait(Some(ts("2026-11-29T11:00:00Z"))),
            "a retry never passes the next tick"
        );
        let mut ok = Case::new(&hourly, "2026-11-29T10:30:00Z");
        ok.status.last_schedule_time = Some(ts("2026-11-29T10:00:00Z"));
        ok.status.last_run = Some(report(
            Trigger::Schedule,
            Outcome::PartiallySucceeded,
            "2026-11-29T10:00:00Z",
            "2026-11-29T10:01:00Z",
        ));
        assert_eq!(
            ok.decide(),
            Decision::Wait(Some(ts("2026-11-29T11:00:00Z"))),
            "partial success is not retried"
        );
    }

    #[test]
    fn an_interrupted_run_starts_again() {
        let daily = Schedule::new("0 6 * * *", None).unwrap();
        let mut c = Case::new(&daily, "2026-11-29T06:10:00Z");
        c.status.last_schedule_time = Some(ts("2026-11-29T06:00:00Z"));
        c.status.last_run = Some(report(
            Trigger::Schedule,
            Outcome::Interrupted,
            "2026-11-29T06:00:00Z",
            "2026-11-29T06:05:00Z",
        ));
        assert_eq!(c.decide(), run(Trigger::Retry, None));
        c.now = "2026-11-29T06:05:30Z";
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-29T06:06:00Z"))),
            "after the same backoff as a failed run"
        );
        c.suspend = true;
        assert_eq!(c.decide(), Decision::Wait(None), "not when suspended since");
    }

    #[test]
    fn a_run_that_keeps_crashing_waits_for_its_next_tick() {
        let daily = Schedule::new("0 6 * * *", None).unwrap();
        let mut c = Case::new(&daily, "2026-11-29T07:00:00Z");
        c.status.last_schedule_time = Some(ts("2026-11-29T06:00:00Z"));
        c.status.last_run = Some(report(
            Trigger::Retry,
            Outcome::Interrupted,
            "2026-11-29T06:30:00Z",
            "2026-11-29T06:31:00Z",
        ));
        c.status.history = vec![
            summary(Trigger::Retry, Outcome::Interrupted),
            summary(Trigger::Retry, Outcome::Failed),
            summary(Trigger::Retry, Outcome::Interrupted),
            summary(Trigger::Schedule, Outcome::Interrupted),
        ];
        fn inputs<'a>(c: &'a Case<'_>) -> Inputs<'a> {
            Inputs {
                schedule: c.schedule,
                suspend: c.suspend,
                starting_deadline_seconds: None,
                created: ts("2026-11-01T00:00:00Z"),
                status: &c.status,
                run_request: None,
                running: false,
                retry_base: RETRY_BASE,
                now: ts(c.now),
            }
        }
        assert_eq!(retry(&inputs(&c)), Retry::GaveUp);
        assert_eq!(
            c.decide(),
            Decision::Wait(Some(ts("2026-11-30T06:00:00Z"))),
            "three retries interrupted in a row: the next scheduled run"
        );
        c.status.history.remove(0);
        assert_eq!(
            retry(&inputs(&c)),
            Retry::At(ts("2026-11-29T06:35:00Z")),
            "two retries so far: the third after 4 minutes"
        );
    }

    #[test]
    fn a_tick_in_the_second_of_creation_is_not_due() {
        let minutely = Schedule::new("* * * * *", None).unwrap();
        let mut c = Case::new(&minutely, "2026-11-29T14:58:00.900Z");
        let at = |created: &str, c: &Case| {
            decide(&Inputs {
                schedule: c.schedule,
                suspend: false,
                starting_deadline_seconds: None,
                created: ts(created),
                status: &c.status,
                run_request: None,
                running: false,
                retry_base: RETRY_BASE,
                now: ts(c.now),
            })
        };
        assert_eq!(
            at("2026-11-29T14:58:00Z", &c),
            Decision::Wait(Some(ts("2026-11-29T14:59:00Z"))),
            "created at 14:58:00.4 (stored as 14:58:00): not for the 14:58 tick"
        );
        c.now = "2026-11-29T14:59:00.200Z";
        assert_eq!(
            at("2026-11-29T14:58:00Z", &c),
            run(Trigger::Schedule, Some("2026-11-29T14:59:00Z"))
        );
        assert_eq!(
            at(
                "2026-11-29T14:57:59Z",
                &Case::new(&minutely, "2026-11-29T14:58:00.900Z")
            ),
            run(Trigger::Schedule, Some("2026-11-29T14:58:00Z")),
            "created before the tick: due"
        );
    }
}
