//! The controller's one retry loop, with its policies named: how often a write is tried again,
//! and how long it pauses between tries. What counts as worth another try is the caller's.

use std::future::Future;
use std::time::Duration;

/// How many tries, and the pause before try `n + 1` (`pause × n`, at most `pause × max_steps`).
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Tries at most (`None`: until the caller's test says stop).
    pub attempts: Option<u32>,
    /// The pause after the first failed try; it grows by as much after each one.
    pub pause: Duration,
    /// The pause stops growing after this many tries.
    pub max_steps: u32,
}

/// A status write refused by a conflict: re-read, then try again at once, three times in all.
pub const STATUS_CONFLICT: Policy = Policy {
    attempts: Some(3),
    pause: Duration::ZERO,
    max_steps: 1,
};

/// A run's final status: until it is recorded (the caller decides when to give up), pausing
/// 0.5 s, 1 s, … up to 5 s.
pub const FINAL_STATUS: Policy = Policy {
    attempts: None,
    pause: Duration::from_millis(500),
    max_steps: 10,
};

/// A run's final status refused by the apiserver as forbidden (403: RBAC changed) or invalid
/// (422: the object cannot take it): given up after this many tries in all, about 5 s with
/// [`FINAL_STATUS`]'s pauses (0.5 s + 1 s + 1.5 s + 2 s). Trying for ever would hold the export
/// (and this term's shutdown) for an answer that does not change by itself.
pub const FINAL_STATUS_REFUSED_TRIES: u32 = 5;

/// A finalizer patch refused by a conflict: five tries, pausing 100 ms, 200 ms, …
pub const FINALIZER_CONFLICT: Policy = Policy {
    attempts: Some(5),
    pause: Duration::from_millis(100),
    max_steps: 5,
};

/// A Secret's finalizer patch refused by a conflict: re-read, then five tries in all at once.
pub const SECRET_CONFLICT: Policy = Policy {
    attempts: Some(5),
    pause: Duration::ZERO,
    max_steps: 1,
};

/// A pending record's create, throttled or failed by the server: four tries, pausing
/// 250 ms, 500 ms, 750 ms (within the record's timeout).
pub const PENDING_RECORD: Policy = Policy {
    attempts: Some(4),
    pause: Duration::from_millis(250),
    max_steps: 3,
};

/// Letting go of a Braze key Secret (the last cleanup naming it ended): five tries, pausing
/// 200 ms, 400 ms, …, since nothing looks at it again once its export is gone (in a
/// terminating namespace, a Secret left held would hold the namespace).
pub const KEY_RELEASE: Policy = Policy {
    attempts: Some(5),
    pause: Duration::from_millis(200),
    max_steps: 5,
};

impl Policy {
    fn pause_after(&self, attempt: u32) -> Duration {
        self.pause * attempt.min(self.max_steps)
    }

    fn may_try_again(&self, attempt: u32) -> bool {
        self.attempts.is_none_or(|max| attempt < max)
    }
}

/// Calls `attempt(n)` for n = 1, 2, … until it succeeds, `again(&error, n)` says no, or the
/// policy's tries are spent; answers the last result.
pub async fn retry<T, E, F, Fut>(
    policy: Policy,
    mut attempt: F,
    mut again: impl FnMut(&E, u32) -> bool,
) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut n = 1;
    loop {
        match attempt(n).await {
            Err(e) if policy.may_try_again(n) && again(&e, n) => {
                let pause = policy.pause_after(n);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                n += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn tries_as_often_as_the_policy_says_and_pauses_longer_each_time() {
        let tries = Cell::new(0);
        let started = tokio::time::Instant::now();
        let r: Result<(), u32> = retry(
            FINALIZER_CONFLICT,
            |n| {
                tries.set(n);
                async move { Err(n) }
            },
            |_, _| true,
        )
        .await;
        assert_eq!(r, Err(5), "the last error is answered");
        assert_eq!(tries.get(), 5);
        // 100 + 200 + 300 + 400 ms between five tries.
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn the_caller_decides_what_is_worth_another_try() {
        let r: Result<(), &str> = retry(
            FINAL_STATUS,
            |n| async move { Err(if n < 3 { "busy" } else { "refused" }) },
            |e, _| *e == "busy",
        )
        .await;
        assert_eq!(r, Err("refused"));
        let ok: Result<u32, &str> =
            retry(STATUS_CONFLICT, |n| async move { Ok(n) }, |_, _| true).await;
        assert_eq!(ok, Ok(1));
    }
}
