//! Cron expressions as Kubernetes CronJobs read them: 5 fields or an `@hourly`-style macro.
//! Its own module so that both the spec's validation and the schedule math use it without
//! depending on each other.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Parses a 5-field cron expression or an `@hourly`-style macro, as Kubernetes CronJobs do.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let trimmed = expr.trim();
    if trimmed.is_empty() {
        return Err(
            "must not be empty: use a 5-field cron expression such as \"0 6 * * *\"".into(),
        );
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|e| format!("invalid cron expression {trimmed:?}: {e}"))
}
