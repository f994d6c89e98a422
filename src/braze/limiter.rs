//! One rate limiter per Braze endpoint and key, shared by every run in the process.
//!
//! Requests are paced evenly below the ceiling (so no window of the period ever sees more
//! than the ceiling), and the limiter stops everyone when Braze says the window is spent
//! (`X-RateLimit-Remaining: 0`) or answers 429. A 429 without a usable wait (none, zero, or
//! a reset already past) pauses for a jittered exponential backoff from a one-second floor.
//! The limiter also holds the workspace's in-flight budget ([`Budget`]), shared the same way.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use tokio::time::Instant;

use super::budget::Budget;
use super::retry::RetryPolicy;
use crate::redacted::Redacted;
use crate::spec::RateLimitSpec;

/// Share of the ceiling the pacing aims at, leaving room for timer jitter.
pub const HEADROOM: f64 = 0.98;
/// Longest wait a header can impose (Braze's hourly limits reset on the hour).
pub const MAX_HEADER_WAIT: Duration = Duration::from_secs(3600);

/// Paces requests for one Braze workspace, and holds its in-flight budget.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    budget: Budget,
}

#[derive(Debug)]
struct State {
    interval: Duration,
    next: Instant,
    blocked_until: Instant,
    /// 429s in a row that each came after the previous pause had ended.
    strikes: u32,
}

impl Limiter {
    /// A limiter allowing `ceiling.requests` per `ceiling.period_seconds`.
    pub fn new(ceiling: RateLimitSpec) -> Self {
        let now = Instant::now();
        let interval = interval(ceiling);
        Self {
            state: Mutex::new(State {
                interval,
                next: now,
                blocked_until: now,
                strikes: 0,
            }),
            budget: Budget::new(1.0 / interval.as_secs_f64()),
        }
    }

    /// The workspace's in-flight budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Changes the ceiling (the latest spec using this workspace wins).
    pub fn set_ceiling(&self, ceiling: RateLimitSpec) {
        self.lock().interval = interval(ceiling);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests per second the pacing allows.
    pub fn rate_per_second(&self) -> f64 {
        1.0 / self.lock().interval.as_secs_f64()
    }

    /// Waits for this request's slot. A pause that starts while the request waits holds it
    /// too: the slot is given up and a new one taken after the pause.
    pub async fn acquire(&self) {
        loop {
            let slot = {
                let mut s = self.lock();
                let slot = Instant::now().max(s.next).max(s.blocked_until);
                s.next = slot + s.interval;
                slot
            };
            if slot > Instant::now() {
                tokio::time::sleep_until(slot).await;
            }
            // The slot was taken at or after the pause known then; a later pause moved
            // `blocked_until` past it.
            if self.lock().blocked_until <= slot {
                return;
            }
        }
    }

    /// Nobody sends for `wait`.
    pub fn pause(&self, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_HEADER_WAIT);
        let mut s = self.lock();
        s.blocked_until = s.blocked_until.max(until);
    }

    /// Learns from an answer: a 429 pauses everyone (see [`Limiter::rate_limited`]); a spent
    /// window (`X-RateLimit-Remaining: 0`) pauses until its reset; a success ends a streak of
    /// 429s. Returns the pause imposed, if any. `jitter` is random in [0, 1).
    pub fn observe(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        policy: &RetryPolicy,
        jitter: f64,
    ) -> Option<Duration> {
        let wait = header_wait(status, headers, unix_now());
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Some(self.rate_limited(wait, policy, jitter));
        }
        if status.is_success() {
            self.lock().strikes = 0;
        }
        let wait = wait?;
        self.pause(wait);
        Some(wait)
    }

    /// A 429: pauses for Braze's wait when it names one (at least the floor), else for a
    /// backoff that doubles with each 429 that came after the previous pause had ended
    /// (answers to requests sent before a pause do not count twice).
    pub fn rate_limited(
        &self,
        header: Option<Duration>,
        policy: &RetryPolicy,
        jitter: f64,
    ) -> Duration {
        let now = Instant::now();
        let wait = {
            let mut s = self.lock();
            if s.blocked_until <= now {
                s.strikes = s.strikes.saturating_add(1);
            }
            match header {
                Some(w) if !w.is_zero() => w.max(policy.rate_limit_floor),
                _ => policy.rate_limit_backoff(s.strikes.max(1), jitter),
            }
        };
        self.pause(wait);
        wait
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
    pub fn get(&self, endpoint: &Url, key: &Redacted, ceiling: RateLimitSpec) -> Arc<Limiter> {
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

    #[tokio::test(start_paused = true)]
    async fn reserved_slots_do_not_fire_during_a_pause() {
        let l = Arc::new(Limiter::new(RateLimitSpec {
            requests: 10,
            period_seconds: 1,
        }));
        // Ten requests reserve slots over the next second; a pause then starts.
        let start = Instant::now();
        let waiting: Vec<_> = (0..10)
            .map(|_| {
                let l = Arc::clone(&l);
                tokio::spawn(async move {
                    l.acquire().await;
                    Instant::now()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(150)).await;
        l.pause(Duration::from_secs(5));
        let mut fired = Vec::new();
        for w in waiting {
            fired.push(w.await.unwrap() - start);
        }
        fired.sort();
        let early: Vec<_> = fired
            .iter()
            .filter(|t| **t < Duration::from_millis(150))
            .collect();
        assert!(early.len() <= 2, "{fired:?}");
        assert!(
            fired
                .iter()
                .all(|t| *t < Duration::from_millis(150) || *t >= Duration::from_millis(5150)),
            "{fired:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_without_a_usable_wait_backs_off_from_the_floor() {
        let l = Limiter::new(RateLimitSpec::default());
        let floor = &RetryPolicy::default();
        assert_eq!(l.rate_limited(None, floor, 0.0), Duration::from_secs(1));
        // Still paused: a second 429 from a request sent before the pause does not escalate.
        assert_eq!(
            l.rate_limited(Some(Duration::ZERO), floor, 0.0),
            Duration::from_secs(1)
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(l.rate_limited(None, floor, 0.5), Duration::from_secs(3));
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            l.rate_limited(Some(Duration::from_millis(300)), floor, 0.0),
            Duration::from_secs(1),
            "a short wait Braze names is raised to the floor"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            l.rate_limited(Some(Duration::from_secs(7)), floor, 0.9),
            Duration::from_secs(7)
        );
        let ok = l.observe(StatusCode::CREATED, &HeaderMap::new(), floor, 0.0);
        assert_eq!(ok, None);
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(
            l.rate_limited(None, floor, 0.0),
            Duration::from_secs(1),
            "a success resets"
        );
    }

    #[test]
    fn one_limiter_per_endpoint_and_key() {
        let r = LimiterRegistry::default();
        let a: Url = "https://rest.iad-01.braze.com/users/track".parse().unwrap();
        let b: Url = "https://rest.iad-02.braze.com/users/track".parse().unwrap();
        let k1 = Redacted::new("k1");
        let c = RateLimitSpec::default();
        assert!(Arc::ptr_eq(
            &r.get(&a, &k1, c),
            &r.get(&a, &Redacted::new("k1"), c)
        ));
        assert!(!Arc::ptr_eq(
            &r.get(&a, &k1, c),
            &r.get(&a, &Redacted::new("k2"), c)
        ));
        assert!(!Arc::ptr_eq(&r.get(&a, &k1, c), &r.get(&b, &k1, c)));
    }
}
