//! One rate limiter per Braze endpoint and key, shared by every run in the process.
//!
//! Requests are paced evenly below the ceiling (so no window of the period ever sees more
//! than the ceiling), and the limiter stops everyone when Braze says the window is spent
//! (`X-RateLimit-Remaining: 0`) or answers 429.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use tokio::time::Instant;

use crate::secret::Secret;
use crate::spec::RateLimitSpec;

/// Share of the ceiling the pacing aims at, leaving room for timer jitter.
pub const HEADROOM: f64 = 0.98;
/// Longest wait a header can impose (Braze's hourly limits reset on the hour).
pub const MAX_HEADER_WAIT: Duration = Duration::from_secs(3600);

/// Paces requests for one Braze workspace.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    interval: Duration,
    next: Instant,
    blocked_until: Instant,
}

impl Limiter {
    /// A limiter allowing `ceiling.requests` per `ceiling.period_seconds`.
    pub fn new(ceiling: RateLimitSpec) -> Self {
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                interval: interval(ceiling),
                next: now,
                blocked_until: now,
            }),
        }
    }

    /// Changes the ceiling (the latest spec using this workspace wins).
    pub fn set_ceiling(&self, ceiling: RateLimitSpec) {
        self.lock().interval = interval(ceiling);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for this request's slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut s = self.lock();
            let slot = Instant::now().max(s.next).max(s.blocked_until);
            s.next = slot + s.interval;
            slot
        };
        if slot > Instant::now() {
            tokio::time::sleep_until(slot).await;
        }
    }

    /// Nobody sends for `wait`.
    pub fn pause(&self, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_HEADER_WAIT);
        let mut s = self.lock();
        s.blocked_until = s.blocked_until.max(until);
    }

    /// Learns from a response's rate-limit headers; returns the wait it imposed, if any.
    pub fn observe(&self, status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
        let wait = header_wait(status, headers, unix_now())?;
        self.pause(wait);
        Some(wait)
    }
}

fn interval(c: RateLimitSpec) -> Duration {
    let per_second = f64::from(c.requests.max(1)) / f64::from(c.period_seconds.max(1)) * HEADROOM;
    Duration::from_secs_f64(1.0 / per_second)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The wait Braze asks for: on 429 `X-Ratelimit-Retry-After`, then `Retry-After`, then
/// `X-RateLimit-Reset`; otherwise the reset time when `X-RateLimit-Remaining` is 0. A reset
/// above 10⁹ is an epoch time, below it seconds to go.
pub fn header_wait(status: StatusCode, headers: &HeaderMap, now_unix: f64) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let reset =
        || number("x-ratelimit-reset").map(|v| if v > 1e9 { (v - now_unix).max(0.0) } else { v });
    let seconds = if status == StatusCode::TOO_MANY_REQUESTS {
        number("x-ratelimit-retry-after")
            .or_else(|| number("retry-after"))
            .or_else(reset)?
    } else if number("x-ratelimit-remaining") == Some(0.0) {
        reset()?
    } else {
        return None;
    };
    Some(Duration::from_secs_f64(seconds).min(MAX_HEADER_WAIT))
}

/// The process's limiters, one per endpoint and API key.
#[derive(Debug, Default)]
pub struct LimiterRegistry {
    keys: RandomState,
    limiters: Mutex<HashMap<(String, u64), Arc<Limiter>>>,
}

impl LimiterRegistry {
    /// The limiter for `endpoint` and `key`, created on first use; its ceiling is set to
    /// `ceiling`.
    pub fn get(&self, endpoint: &Url, key: &Secret, ceiling: RateLimitSpec) -> Arc<Limiter> {
        let id = (
            endpoint.as_str().to_owned(),
            self.keys.hash_one(key.expose()),
        );
        let mut map = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        let limiter = map
            .entry(id)
            .or_insert_with(|| Arc::new(Limiter::new(ceiling)));
        limiter.set_ceiling(ceiling);
        Arc::clone(limiter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const NOW: f64 = 1_800_000_000.0;

    #[test]
    fn reads_braze_headers() {
        let ok = StatusCode::CREATED;
        let limited = StatusCode::TOO_MANY_REQUESTS;
        assert_eq!(
            header_wait(
                ok,
                &headers(&[("x-ratelimit-remaining", "5"), ("x-ratelimit-reset", "3")]),
                NOW
            ),
            None
        );
        assert_eq!(
            header_wait(
                ok,
                &headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "3")]),
                NOW
            ),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            header_wait(
                ok,
                &headers(&[
                    ("X-RateLimit-Remaining", "0"),
                    ("X-RateLimit-Reset", "1800000002.5")
                ]),
                NOW
            ),
            Some(Duration::from_millis(2500)),
            "epoch seconds"
        );
        assert_eq!(
            header_wait(
                limited,
                &headers(&[("x-ratelimit-retry-after", "7"), ("retry-after", "9")]),
                NOW
            ),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            header_wait(limited, &headers(&[("retry-after", "9")]), NOW),
            Some(Duration::from_secs(9))
        );
        assert_eq!(
            header_wait(
                limited,
                &headers(&[("x-ratelimit-reset", "1799999999")]),
                NOW
            ),
            Some(Duration::ZERO)
        );
        assert_eq!(header_wait(limited, &headers(&[]), NOW), None);
        assert_eq!(
            header_wait(
                limited,
                &headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]),
                NOW
            ),
            None
        );
        assert_eq!(
            header_wait(limited, &headers(&[("retry-after", "-4")]), NOW),
            None
        );
        assert_eq!(
            header_wait(limited, &headers(&[("retry-after", "99999999")]), NOW),
            Some(MAX_HEADER_WAIT)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn paces_below_the_ceiling_and_honours_pauses() {
        let l = Limiter::new(RateLimitSpec {
            requests: 100,
            period_seconds: 1,
        });
        let start = Instant::now();
        for _ in 0..99 {
            l.acquire().await;
        }
        let per = start.elapsed().as_secs_f64() / 98.0;
        assert!((per - 1.0 / 98.0).abs() < 1e-4, "{per}");
        l.pause(Duration::from_secs(5));
        let before = Instant::now();
        l.acquire().await;
        assert!(before.elapsed() >= Duration::from_secs(5));
    }

    #[test]
    fn one_limiter_per_endpoint_and_key() {
        let r = LimiterRegistry::default();
        let a: Url = "https://rest.iad-01.braze.com/users/track".parse().unwrap();
        let b: Url = "https://rest.iad-02.braze.com/users/track".parse().unwrap();
        let k1 = Secret::new("k1");
        let c = RateLimitSpec::default();
        assert!(Arc::ptr_eq(
            &r.get(&a, &k1, c),
            &r.get(&a, &Secret::new("k1"), c)
        ));
        assert!(!Arc::ptr_eq(
            &r.get(&a, &k1, c),
            &r.get(&a, &Secret::new("k2"), c)
        ));
        assert!(!Arc::ptr_eq(&r.get(&a, &k1, c), &r.get(&b, &k1, c)));
    }
}
