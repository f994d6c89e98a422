//! One in-flight budget per workspace, shared by every run on it: each delivery holds a
//! permit (a slot, and bytes for its body and connection) from the moment it starts until
//! it ends. Permits
//! are handed out first come, first served, and a run waits for one permit at a time, so
//! the runs on a workspace take turns. The number of slots follows [`super::sizing`], fed
//! by the answers of every run.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::sizing::{Round, Sizer};

/// Total bytes in flight on one workspace, request bodies and [`PER_REQUEST_BYTES`] each:
/// with objects far larger than usual fewer requests fly, so memory stays bounded whatever
/// the Looks hold, and however many requests the latency would want.
pub const MAX_IN_FLIGHT_BYTES: usize = 24 << 20;
/// What a request in flight costs besides its body: its connection's buffers and the answer
/// (about 56 KiB measured with 512 in flight; 64 KiB bounds a workspace at about 300).
pub const PER_REQUEST_BYTES: usize = 64 << 10;
/// The bytes budget counts kibibytes (a semaphore counts in `u32`).
const KIB: usize = 1024;
/// Shortest round: shorter ones would measure the scheduler, not Braze.
const MIN_ROUND: Duration = Duration::from_millis(50);
/// A budget idle this long starts afresh: the next runs climb again, at the network's
/// latency of the day.
pub const IDLE_RESET: Duration = Duration::from_secs(10);

/// The in-flight budget of one workspace (cheap to clone: every clone is the same budget).
#[derive(Clone, Debug)]
pub struct Budget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    slots: Arc<Semaphore>,
    kib: Arc<Semaphore>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    sizer: Sizer,
    /// Slots the budget stands for now: permits out and available, less `debt`.
    size: usize,
    /// Slots to forget as they come back (a shrink below the permits out).
    debt: usize,
    /// The largest `concurrency` of the runs since the budget was last idle.
    cap: usize,
    in_use: usize,
    idle_since: Instant,
    /// Smoothed latency: a round lasts at least that long.
    latency: Duration,
    round: RoundState,
}

#[derive(Debug)]
struct RoundState {
    started: Instant,
    answered: u64,
    acquired: u64,
    waited: u64,
    /// The round right after a change: its answers come from requests sent before it.
    transition: bool,
}

impl RoundState {
    fn new(transition: bool) -> Self {
        Self {
            started: Instant::now(),
            answered: 0,
            acquired: 0,
            waited: 0,
            transition,
        }
    }
}

/// One delivery's share of the budget; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Budget,
    slot: Option<OwnedSemaphorePermit>,
    _kib: OwnedSemaphorePermit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        s.in_use -= 1;
        if s.in_use == 0 {
            s.idle_since = Instant::now();
        }
        if s.debt > 0
            && let Some(slot) = self.slot.take()
        {
            s.debt -= 1;
            slot.forget();
        }
    }
}

impl Budget {
    /// A budget for a workspace paced at `rate` requests a second; it has no slots until
    /// a run asks for one (and says its `concurrency`).
    pub fn new(rate: f64) -> Self {
        let now = Instant::now();
        Self(Arc::new(Inner {
            slots: Arc::new(Semaphore::new(0)),
            kib: Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES / KIB)),
            state: Mutex::new(State {
                sizer: Sizer::new(rate),
                size: 0,
                debt: 0,
                cap: 0,
                in_use: 0,
                idle_since: now,
                latency: Duration::ZERO,
                round: RoundState::new(true),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots the budget stands for now.
    pub fn size(&self) -> usize {
        self.lock().size
    }

    /// Waits for a permit for a delivery of `bytes` from a run allowed `cap` in flight (at a
    /// pace of `rate` requests a second). Cancel-safe: dropped while waiting, it takes
    /// nothing and keeps nobody waiting.
    pub async fn acquire(&self, rate: f64, cap: usize, bytes: usize) -> Permit {
        {
            let mut s = self.lock();
            if s.in_use == 0 && s.idle_since.elapsed() >= IDLE_RESET {
                s.sizer = Sizer::new(rate);
                s.cap = 0;
                s.round = RoundState::new(true);
            }
            s.cap = s.cap.max(cap);
            s.round.acquired += 1;
            self.resize(&mut s, rate);
        }
        let slots = &self.0.slots;
        let slot = match Arc::clone(slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.lock().round.waited += 1;
                Arc::clone(slots)
                    .acquire_owned()
                    .await
                    .expect("the budget's semaphore is never closed")
            }
        };
        // A body larger than the whole budget waits for all of it, then goes alone.
        let kib = (bytes + PER_REQUEST_BYTES)
            .div_ceil(KIB)
            .min(MAX_IN_FLIGHT_BYTES / KIB);
        let kib = Arc::clone(&self.0.kib)
            .acquire_many_owned(u32::try_from(kib).unwrap_or(u32::MAX))
            .await
            .expect("the budget's semaphore is never closed");
        self.lock().in_use += 1;
        Permit {
            budget: self.clone(),
            slot: Some(slot),
            _kib: kib,
        }
    }

    /// Learns from an answer (429s aside) that took `took`: the unloaded latency, and the
    /// throughput of the round, which may change the size.
    pub fn answered(&self, took: Duration, rate: f64) {
        let mut s = self.lock();
        s.sizer = s.sizer.latency(took);
        s.latency = if s.latency.is_zero() {
            took
        } else {
            (s.latency * 7 + took) / 8
        };
        s.round.answered += 1;
        let elapsed = s.round.started.elapsed();
        if elapsed >= s.latency.max(MIN_ROUND) {
            let r = &s.round;
            let round = Round {
                seconds: elapsed.as_secs_f64(),
                answered: r.answered,
                saturated: r.acquired > 0 && r.waited * 2 >= r.acquired,
            };
            let before = s.sizer;
            if !r.transition {
                s.sizer = s.sizer.round(round, rate, s.cap);
            }
            s.round = RoundState::new(s.sizer.climb != before.climb);
        }
        self.resize(&mut s, rate);
    }

    /// Brings the slots to what the sizer says: adds permits (first cancelling debt), or
    /// takes back available ones and owes the rest.
    fn resize(&self, s: &mut State, rate: f64) {
        let target = s.sizer.budget(rate, s.cap.max(1));
        if target > s.size {
            let grow = target - s.size;
            let cancelled = grow.min(s.debt);
            s.debt -= cancelled;
            self.0.slots.add_permits(grow - cancelled);
        } else if target < s.size {
            let shrink = s.size - target;
            let taken = self.0.slots.forget_permits(shrink);
            s.debt += shrink - taken;
        }
        s.size = target;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::braze::sizing::{ASSUMED_LATENCY, START, rate_ceiling};

    const RAISED: f64 = 980_000.0;

    #[tokio::test(start_paused = true)]
    async fn runs_take_turns_and_never_exceed_the_budget() {
        let b = Budget::new(RAISED);
        let mut held = Vec::new();
        for _ in 0..START {
            held.push(b.acquire(RAISED, 512, 100).await);
        }
        assert_eq!(b.size(), START);
        // Two runs wait, in order: the first to ask gets the first slot back.
        let (b1, b2) = (b.clone(), b.clone());
        let first = tokio::spawn(async move { b1.acquire(RAISED, 512, 100).await });
        tokio::task::yield_now().await;
        let second = tokio::spawn(async move { b2.acquire(RAISED, 512, 100).await });
        tokio::task::yield_now().await;
        assert!(!first.is_finished() && !second.is_finished());
        held.pop();
        let p = first.await.unwrap();
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "one slot back, one run served");
        drop(p);
        second.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_shrink_takes_slots_back_as_they_return() {
        let b = Budget::new(980.0);
        let mut held = Vec::new();
        for _ in 0..rate_ceiling(980.0, ASSUMED_LATENCY) {
            held.push(b.acquire(980.0, 512, 100).await);
        }
        assert_eq!(b.size(), 151);
        // Braze answers in 1 ms: 6 slots are enough.
        b.answered(Duration::from_millis(1), 980.0);
        assert_eq!(b.size(), 6);
        held.truncate(6);
        let b2 = b.clone();
        let waiting = tokio::spawn(async move { b2.acquire(980.0, 512, 100).await });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "the 145 returned slots were forgotten"
        );
        held.pop();
        waiting.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_per_workspace() {
        let b = Budget::new(RAISED);
        let big = b.acquire(RAISED, 512, MAX_IN_FLIGHT_BYTES - 1000).await;
        let b2 = b.clone();
        let more = tokio::spawn(async move { b2.acquire(RAISED, 512, 4096).await });
        tokio::task::yield_now().await;
        assert!(!more.is_finished(), "the bytes budget is spent");
        drop(big);
        more.await.unwrap();
        // A body larger than the whole budget still goes, alone.
        drop(b.acquire(RAISED, 512, 2 * MAX_IN_FLIGHT_BYTES).await);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_bounds_the_requests_in_flight_whatever_the_latency() {
        // 6,800 requests/s at the assumed 100 ms: 1,024 slots; memory admits fewer.
        let b = Budget::new(6_800.0);
        let mut held = Vec::new();
        while let Ok(p) =
            tokio::time::timeout(Duration::from_millis(1), b.acquire(6_800.0, 1024, 100)).await
        {
            held.push(p);
        }
        assert_eq!(b.size(), 1024);
        // 65 KiB a request (64 for the connection, 1 for a 100-byte body).
        assert_eq!(held.len(), MAX_IN_FLIGHT_BYTES / KIB / 65);
        assert_eq!(held.len(), 378);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_of_the_largest_run_bounds_the_budget_and_idleness_resets_it() {
        let b = Budget::new(980.0);
        drop(b.acquire(980.0, 16, 100).await);
        assert_eq!(b.size(), 16);
        drop(b.acquire(980.0, 64, 100).await);
        assert_eq!(b.size(), 64);
        tokio::time::sleep(IDLE_RESET).await;
        drop(b.acquire(980.0, 32, 100).await);
        assert_eq!(b.size(), 32, "a fresh budget after idleness");
    }

    #[tokio::test(start_paused = true)]
    async fn a_saturated_budget_climbs_round_by_round() {
        let b = Budget::new(RAISED);
        let mut held = Vec::new();
        for _ in 0..START {
            held.push(b.acquire(RAISED, 512, 100).await);
        }
        // Demand beyond the budget: a run waits for a slot.
        let b2 = b.clone();
        let waiting = tokio::spawn(async move { b2.acquire(RAISED, 512, 100).await });
        tokio::task::yield_now().await;
        // The first round after a change only carries older requests: not measured.
        tokio::time::sleep(Duration::from_millis(60)).await;
        b.answered(Duration::from_millis(60), RAISED);
        assert_eq!(b.size(), START);
        // Every later round needs waiting runs to count: one waits for each answer here.
        let b3 = b.clone();
        let also = tokio::spawn(async move { b3.acquire(RAISED, 512, 100).await });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        b.answered(Duration::from_millis(60), RAISED);
        assert_eq!(b.size(), 2 * START);
        waiting.await.unwrap();
        also.await.unwrap();
    }
}
