//! Where a run-now request stands, read from the export's status (pure): not picked up yet,
//! queued behind another run, running, or ended. Also the request's fresh value and the
//! `--timeout` parser. `trigger.rs` does the I/O.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp, Unit};

use crate::controller::status::{self, reason};
use crate::export::report::{Outcome, RunReport, Trigger};
use crate::spec::BrazeExportStatus;

/// Where a run-now request stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The operator has not acted on the request. `held_by`: the Ready message when the export
    /// waits for something before any run can start (a missing Secret).
    NotPickedUp {
        /// Why runs cannot start yet, if the status says.
        held_by: Option<String>,
    },
    /// Another run of the export is in progress; the requested run starts after it.
    Queued {
        /// That run's trigger and start time.
        behind: Option<(Trigger, Timestamp)>,
    },
    /// The requested run goes on (or waits for a free run slot): its counts so far.
    Running {
        /// When it started.
        started: Timestamp,
        /// Rows read so far.
        rows_read: u64,
        /// Users flagged so far.
        sent: u64,
    },
    /// The requested run ended: its report.
    Ended(Box<RunReport>),
    /// The export cannot run until its spec is fixed: the Ready message.
    Refused(String),
}

/// Reads where `request` stands from the status of the export at `generation`.
pub fn phase(status: Option<&BrazeExportStatus>, generation: Option<i64>, request: &str) -> Phase {
    let Some(s) = status else {
        return Phase::NotPickedUp { held_by: None };
    };
    if s.last_handled_run_request.as_deref() == Some(request) {
        return handled(s);
    }
    if status::is_running(s) {
        return Phase::Queued {
            behind: s.last_run.as_ref().map(|r| (r.trigger, r.start_time)),
        };
    }
    match status::ready(s) {
        // The controller stops at an invalid spec before looking at run requests.
        Some(c) if c.reason == reason::INVALID_SPEC && c.observed_generation == generation => {
            Phase::Refused(c.message.clone())
        }
        Some(c) if c.reason == reason::SECRET_NOT_FOUND => Phase::NotPickedUp {
            held_by: Some(c.message.clone()),
        },
        _ => Phase::NotPickedUp { held_by: None },
    }
}

/// The operator took the request: the run it started is either going on or over. (It marks
/// the request handled in the same status write that starts the run.)
fn handled(s: &BrazeExportStatus) -> Phase {
    match &s.last_run {
        Some(r) if r.outcome != Outcome::Running && !status::is_running(s) => {
            Phase::Ended(Box::new(r.clone()))
        }
        Some(r) => Phase::Running {
            started: r.start_time,
            rows_read: r.counts.rows_read,
            sent: r.counts.sent,
        },
        None => Phase::NotPickedUp { held_by: None },
    }
}

impl Phase {
    /// True when waiting longer changes nothing: the run ended, or cannot start.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Ended(_) | Self::Refused(_))
    }

    /// What the export is doing, in one line (the progress line, and the timeout message).
    pub fn describe(&self) -> String {
        match self {
            Self::NotPickedUp { held_by: None } => "not picked up: the operator has not acted on \
                 the request; is the operator running, and does it watch this namespace?"
                .into(),
            Self::NotPickedUp { held_by: Some(why) } => {
                format!("not picked up: runs of this export cannot start: {why}")
            }
            Self::Queued {
                behind: Some((t, at)),
            } => format!(
                "queued: a {t:?} run started at {} is in progress; the requested run starts after it",
                to_second(*at)
            ),
            Self::Queued { behind: None } => {
                "queued: another run is in progress; the requested run starts after it".into()
            }
            Self::Running {
                started,
                rows_read,
                sent,
            } => format!(
                "running since {}: {rows_read} rows read, {sent} users flagged so far",
                to_second(*started)
            ),
            Self::Ended(r) => format!("ended: {}", r.outcome.as_str()),
            Self::Refused(why) => format!("the export cannot run: {why}"),
        }
    }
}

/// `t` to the second, as people read times.
fn to_second(t: Timestamp) -> Timestamp {
    t.round(Unit::Second).unwrap_or(t)
}

/// The message when `--timeout` passes first: what the export is doing, and how to follow it.
pub fn timeout_message(namespace: &str, name: &str, timeout: Duration, last: &Phase) -> String {
    let after = SignedDuration::try_from(timeout)
        .map_or_else(|_| format!("{timeout:?}"), |d| format!("{d:#}"));
    let mut message = format!(
        "timed out after {after} waiting for BrazeExport {namespace}/{name}: {}",
        last.describe()
    );
    let goes_on = match last {
        Phase::Running { .. } => "the run goes on in the operator",
        Phase::Queued { .. } => "the request stands",
        _ => return message,
    };
    message.push_str(&format!(
        "; {goes_on}: follow it with kubectl get bzx {name} -n {namespace} -w"
    ));
    message
}

/// A run-now value not used before: `now` as RFC 3339 to the millisecond, moved on by a
/// millisecond while it equals one of `taken` (the current annotation, the last handled
/// request), since an old value starts no run.
pub fn fresh_request(now: Timestamp, taken: &[Option<&str>]) -> String {
    let mut t = now.round(Unit::Millisecond).unwrap_or(now);
    loop {
        let value = t.to_string();
        if !taken.contains(&Some(value.as_str())) {
            return value;
        }
        t = t
            .saturating_add(SignedDuration::from_millis(1))
            .unwrap_or(t);
    }
}

/// Parses `--timeout`: a positive duration such as `90s`, `30m`, `1h` or `1h30m`.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d: SignedDuration = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write it like 90s, 30m or 1h"))?;
    if d.is_zero() || d.is_negative() {
        return Err(format!("{text:?}: the timeout must be longer than zero"));
    }
    Duration::try_from(d).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Due;
    use crate::schedule::Retry;

    const T0: &str = "2026-11-29T10:00:00Z";

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn idle() -> BrazeExportStatus {
        status::idle(
            &BrazeExportStatus::default(),
            Some(1),
            false,
            None,
            Retry::No,
            ts(T0),
        )
    }

    fn started(
        previous: &BrazeExportStatus,
        trigger: Trigger,
        request: Option<&str>,
    ) -> BrazeExportStatus {
        let due = Due {
            trigger,
            scheduled_for: None,
            run_request: request.map(str::to_owned),
        };
        status::started(previous, Some(1), &due, "pod-a", ts(T0))
    }

    fn ended(current: &BrazeExportStatus, outcome: Outcome) -> RunReport {
        let mut r = current.last_run.clone().unwrap();
        r.outcome = outcome;
        r.completion_time = Some(ts("2026-11-29T10:01:00Z"));
        r.counts.rows_read = 10;
        r.counts.sent = 10;
        r
    }

    #[test]
    fn a_request_the_operator_has_not_seen_is_not_picked_up() {
        assert_eq!(
            phase(None, Some(1), "r1"),
            Phase::NotPickedUp { held_by: None }
        );
        let s = idle();
        assert_eq!(
            phase(Some(&s), Some(1), "r1"),
            Phase::NotPickedUp { held_by: None }
        );
        assert!(
            phase(Some(&s), Some(1), "r1")
                .describe()
                .contains("is the operator running")
        );
        let mut old = started(&s, Trigger::Manual, Some("r0"));
        old = status::finished(
            &old,
            &ended(&old, Outcome::Succeeded),
            Some(1),
            None,
            Retry::No,
            ts(T0),
        );
        assert_eq!(
            phase(Some(&old), Some(1), "r1"),
            Phase::NotPickedUp { held_by: None }
        );
    }

    #[test]
    fn a_request_behind_another_run_is_queued() {
        let s = started(&idle(), Trigger::Schedule, None);
        let p = phase(Some(&s), Some(1), "r1");
        assert_eq!(
            p,
            Phase::Queued {
                behind: Some((Trigger::Schedule, ts(T0)))
            }
        );
        assert_eq!(
            p.describe(),
            "queued: a Schedule run started at 2026-11-29T10:00:00Z is in progress; the requested run starts after it"
        );
        assert!(!p.is_final());
    }

    #[test]
    fn the_requested_run_shows_its_counts_then_its_report() {
        let s = started(&idle(), Trigger::Manual, Some("r1"));
        let s = status::progress(&s, 1200, 1100);
        let p = phase(Some(&s), Some(1), "r1");
        assert_eq!(
            p.describe(),
            "running since 2026-11-29T10:00:00Z: 1200 rows read, 1100 users flagged so far"
        );
        let p = Phase::Running {
            started: ts("2026-11-29T10:00:00.961306956Z"),
            rows_read: 1,
            sent: 1,
        };
        assert!(
            p.describe()
                .starts_with("running since 2026-11-29T10:00:01Z:")
        );
        assert!(!p.is_final());
        for outcome in [
            Outcome::Succeeded,
            Outcome::PartiallySucceeded,
            Outcome::Failed,
            Outcome::Interrupted,
        ] {
            let report = ended(&s, outcome);
            let done = status::finished(&s, &report, Some(1), None, Retry::No, ts(T0));
            let p = phase(Some(&done), Some(1), "r1");
            assert_eq!(p, Phase::Ended(Box::new(report)));
            assert!(p.is_final());
        }
    }

    #[test]
    fn a_run_interrupted_by_a_crash_has_ended() {
        let s = started(&idle(), Trigger::Manual, Some("r1"));
        let crashed = status::crashed(&s, Some(1), ts(T0));
        match phase(Some(&crashed), Some(1), "r1") {
            Phase::Ended(r) => assert_eq!(r.outcome, Outcome::Interrupted),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_invalid_spec_refuses_and_a_missing_secret_holds() {
        let s = status::blocked(
            &idle(),
            Some(2),
            reason::INVALID_SPEC,
            "spec.schedule: bad",
            ts(T0),
        );
        assert_eq!(
            phase(Some(&s), Some(2), "r1"),
            Phase::Refused("spec.schedule: bad".into())
        );
        // Written for an older spec: the new one may be fine.
        assert_eq!(
            phase(Some(&s), Some(3), "r1"),
            Phase::NotPickedUp { held_by: None }
        );
        let s = status::blocked(
            &idle(),
            Some(1),
            reason::SECRET_NOT_FOUND,
            "Secret marketing/braze-api not found (spec.braze.apiKeySecretRef)",
            ts(T0),
        );
        let p = phase(Some(&s), Some(1), "r1");
        assert_eq!(
            p.describe(),
            "not picked up: runs of this export cannot start: Secret marketing/braze-api not found (spec.braze.apiKeySecretRef)"
        );
        assert!(!p.is_final());
    }

    #[test]
    fn a_timeout_says_what_the_export_is_doing() {
        let running = Phase::Running {
            started: ts(T0),
            rows_read: 5,
            sent: 4,
        };
        assert_eq!(
            timeout_message("marketing", "churn", Duration::from_secs(90), &running),
            "timed out after 1m 30s waiting for BrazeExport marketing/churn: running since \
             2026-11-29T10:00:00Z: 5 rows read, 4 users flagged so far; the run goes on in the \
             operator: follow it with kubectl get bzx churn -n marketing -w"
        );
        let lost = Phase::NotPickedUp { held_by: None };
        assert_eq!(
            timeout_message("marketing", "churn", Duration::from_secs(1800), &lost),
            "timed out after 30m waiting for BrazeExport marketing/churn: not picked up: the \
             operator has not acted on the request; is the operator running, and does it watch \
             this namespace?"
        );
    }

    #[test]
    fn request_values_are_fresh() {
        let now = ts("2026-11-29T10:00:00.123456Z");
        assert_eq!(
            fresh_request(now, &[None, None]),
            "2026-11-29T10:00:00.123Z"
        );
        assert_eq!(
            fresh_request(
                now,
                &[
                    Some("2026-11-29T10:00:00.123Z"),
                    Some("2026-11-29T10:00:00.124Z")
                ]
            ),
            "2026-11-29T10:00:00.125Z"
        );
        assert_eq!(fresh_request(ts(T0), &[Some("other")]), T0);
    }

    #[test]
    fn timeouts_read_like_durations() {
        for (text, secs) in [
            ("90s", 90),
            ("30m", 1800),
            ("1h", 3600),
            ("1h30m", 5400),
            (" 2s ", 2),
        ] {
            assert_eq!(parse_timeout(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        for bad in ["", "soon", "0s", "-5m", "30"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_timeout("soon").unwrap_err(),
            "\"soon\" is not a duration: write it like 90s, 30m or 1h"
        );
    }
}
