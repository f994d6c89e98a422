//! Backoff for retried Braze requests.

use std::time::Duration;

/// Exponential backoff with jitter, at most `max_attempts` attempts a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per batch, the first included.
    pub max_attempts: u32,
    /// Delay after the first failure (before jitter).
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
    /// How long a run keeps waiting out 429s without Braze accepting any of its requests
    /// before it gives up (the rows left count as failed, reason `RateLimited`).
    pub rate_limit_patience: Duration,
    /// Shortest pause after a 429, and the first step of the backoff when Braze names no
    /// usable wait (none, zero, or a reset already past).
    pub rate_limit_floor: Duration,
    /// Longest step of that backoff.
    pub rate_limit_backoff_cap: Duration,
}

/// Default of [`RetryPolicy::rate_limit_patience`]: 15 minutes.
pub const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(15 * 60);

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            rate_limit_patience: RATE_LIMIT_PATIENCE,
            rate_limit_floor: Duration::from_secs(1),
            rate_limit_backoff_cap: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Delay after failed attempt `attempt` (1-based): half of `base·2^(attempt-1)` (capped),
    /// plus up to as much again, chosen by `jitter` in [0, 1).
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.cap);
        let half = exp / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

impl RetryPolicy {
    /// Pause after the `strikes`-th 429 in a row without a usable wait: the floor doubled
    /// per strike (capped), plus up to as much again by `jitter` in [0, 1), so concurrent
    /// runs do not come back in step.
    pub fn rate_limit_backoff(&self, strikes: u32, jitter: f64) -> Duration {
        let step = self
            .rate_limit_floor
            .saturating_mul(1u32 << strikes.saturating_sub(1).min(20))
            .min(self.rate_limit_backoff_cap);
        step + step.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(250));
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(500));
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(1500));
        assert_eq!(p.backoff(10, 0.0), Duration::from_secs(15));
        assert_eq!(p.backoff(64, 1.0), Duration::from_secs(30));
    }

    #[test]
    fn rate_limit_backoff_starts_at_the_floor() {
        let p = RetryPolicy::default();
        assert_eq!(p.rate_limit_backoff(1, 0.0), Duration::from_secs(1));
        assert_eq!(p.rate_limit_backoff(3, 0.5), Duration::from_secs(6));
        assert_eq!(p.rate_limit_backoff(40, 1.0), Duration::from_secs(120));
    }
}
