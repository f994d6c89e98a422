//! Cron schedules: parsing (the controller adds next-run math here).

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

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn refuses_seconds_years_and_nonsense() {
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
    }
}
