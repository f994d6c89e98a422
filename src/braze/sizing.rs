//! How many requests a workspace keeps in flight (pure): with a rate limit in reach, enough
//! to fill it at the latency Braze shows unloaded; with a raised or absent limit, a climb
//! that doubles the budget while throughput follows and stops when it no longer does.

use std::time::Duration;

/// The most requests one workspace keeps in flight (the largest `concurrency`).
pub const MAX_BUDGET: usize = 1024;
/// Where the climb starts (a raised or absent limit).
pub const START: usize = 8;
/// Latency assumed until the first answer.
pub const ASSUMED_LATENCY: Duration = Duration::from_millis(100);
/// A doubling that raised throughput by this factor or more is followed by another.
pub const GROW: f64 = 1.25;
/// A doubling that raised throughput by less than this is undone; between the two it is
/// kept and the climb ends.
pub const KEEP: f64 = 1.10;
/// Saturated rounds after which a climb that ended on a drop tries one doubling again: one
/// slow round (a pause of the machine, of the network) must not hold a run at a fraction
/// of what the network allows for the rest of it. A climb that ended on a plateau (the
/// knee: doubling gave about the same) is not tried again.
pub const REPROBE_ROUNDS: u32 = 16;
/// A doubling whose round gave less than this share of the round before ended the climb on
/// a drop, not a plateau ([`REPROBE_ROUNDS`]).
pub const DROP: f64 = 0.9;

/// Requests in flight that keep `rate` requests a second flowing when each takes `latency`:
/// rate × latency, half as much again for jitter, and 4 for the pipeline. At least 1;
/// saturates at [`usize::MAX`] (an absent limit).
pub fn rate_ceiling(rate: f64, latency: Duration) -> usize {
    let want = (rate * latency.as_secs_f64() * 1.5).ceil() + 4.0;
    if want.is_nan() {
        return 1;
    }
    // `as` saturates: infinity and anything past usize::MAX become usize::MAX.
    (want as usize).max(1)
}

/// Whether the rate limit sizes the budget by itself: filling it needs no more than
/// [`MAX_BUDGET`] at [`ASSUMED_LATENCY`]. A limit far above (raised for an enterprise
/// contract, or set out of reach) says nothing about what Braze can serve.
pub fn limit_in_reach(rate: f64) -> bool {
    rate_ceiling(rate, ASSUMED_LATENCY) <= MAX_BUDGET
}

/// One measured stretch of a workspace's traffic, about one latency long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Round {
    /// How long it lasted.
    pub seconds: f64,
    /// Requests Braze answered (429s aside).
    pub answered: u64,
    /// Whether the budget, not the rows coming in, held deliveries back (most deliveries
    /// waited for a permit).
    pub saturated: bool,
}

/// The state of a workspace's budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sizer {
    /// What the climb allows (before the rate ceiling and the runs' caps).
    pub climb: usize,
    /// Before the latest doubling: the budget, and the throughput it gave (requests/s).
    pub previous: Option<(usize, f64)>,
    /// The climb is over: the budget no longer grows (but see [`REPROBE_ROUNDS`]).
    pub settled: bool,
    /// Saturated rounds since the climb ended.
    pub settled_rounds: u32,
    /// The climb ended on a drop: it is tried again after [`REPROBE_ROUNDS`].
    pub retry: bool,
    /// The lowest latency seen: the one measured at low in flight, so a Braze that slows
    /// under load never raises the rate ceiling.
    pub low_latency: Option<Duration>,
}

impl Sizer {
    /// A fresh budget for a workspace paced at `rate` requests a second: no climb when
    /// the limit is in reach, else a climb from [`START`].
    pub fn new(rate: f64) -> Self {
        let in_reach = limit_in_reach(rate);
        Self {
            climb: if in_reach { MAX_BUDGET } else { START },
            previous: None,
            settled: in_reach,
            settled_rounds: 0,
            retry: false,
            low_latency: None,
        }
    }

    /// Requests to keep in flight: the climb, within the rate ceiling at the unloaded
    /// latency and within `cap` (the largest `concurrency` of the runs). Between 1 and
    /// [`MAX_BUDGET`].
    pub fn budget(&self, rate: f64, cap: usize) -> usize {
        let latency = self.low_latency.unwrap_or(ASSUMED_LATENCY);
        self.climb
            .min(rate_ceiling(rate, latency))
            .min(cap)
            .clamp(1, MAX_BUDGET)
    }

    /// Learns from one answer's latency.
    pub fn latency(self, took: Duration) -> Self {
        let low = self.low_latency.map_or(took, |l| l.min(took));
        Self {
            low_latency: Some(low),
            ..self
        }
    }

    /// The budget after a measured round: doubled while each doubling raised throughput by
    /// [`GROW`], then kept (a gain of [`KEEP`] or more) or undone (less), and settled. A
    /// round the budget did not hold back says nothing and changes nothing.
    pub fn round(self, round: Round, rate: f64, cap: usize) -> Self {
        if !round.saturated || round.answered == 0 || round.seconds <= 0.0 {
            return self;
        }
        let throughput = round.answered as f64 / round.seconds;
        let latency = self.low_latency.unwrap_or(ASSUMED_LATENCY);
        let limit = rate_ceiling(rate, latency).min(cap).min(MAX_BUDGET);
        if self.settled {
            // Ended on a drop, short of the limit, and held back by it for long: one more
            // doubling, judged against this round as any other.
            let rounds = self.settled_rounds + 1;
            if !self.retry || self.climb >= limit || rounds < REPROBE_ROUNDS {
                return Self {
                    settled_rounds: rounds,
                    ..self
                };
            }
            return Self {
                climb: (self.climb * 2).min(limit),
                previous: Some((self.climb, throughput)),
                settled: false,
                settled_rounds: 0,
                retry: false,
                ..self
            };
        }
        let settle = |climb, retry| Self {
            climb,
            settled: true,
            settled_rounds: 0,
            retry,
            ..self
        };
        if let Some((budget, before)) = self.previous {
            if throughput < before * KEEP {
                return settle(budget, throughput < before * DROP);
            }
            if throughput < before * GROW {
                return settle(self.climb, false);
            }
        }
        // Doubling past the rate ceiling or the caps buys nothing: stop there.
        if self.climb >= limit {
            return settle(self.climb, false);
        }
        let climb = (self.climb * 2).min(limit);
        Self {
            climb,
            previous: Some((self.climb, throughput)),
            settled: climb == limit,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_RATE: f64 = 980.0;
    const RAISED: f64 = 980_000.0;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn round(answered: u64, seconds: f64) -> Round {
        Round {
            seconds,
            answered,
            saturated: true,
        }
    }

    #[test]
    fn the_ceiling_is_rate_times_latency_with_headroom() {
        // 980 requests/s (the default ceiling at 98%).
        assert_eq!(rate_ceiling(DEFAULT_RATE, ms(80)), 122);
        assert_eq!(rate_ceiling(DEFAULT_RATE, ms(250)), 372);
        assert_eq!(rate_ceiling(DEFAULT_RATE, ms(1)), 6);
        assert_eq!(rate_ceiling(DEFAULT_RATE, ASSUMED_LATENCY), 151);
        assert_eq!(rate_ceiling(f64::INFINITY, ms(1)), usize::MAX);
        assert_eq!(rate_ceiling(f64::NAN, ms(1)), 1);
        assert_eq!(rate_ceiling(0.0, ms(1)), 4);
    }

    #[test]
    fn a_limit_in_reach_sizes_the_budget_alone() {
        assert!(limit_in_reach(DEFAULT_RATE));
        assert!(limit_in_reach(6_800.0));
        assert!(!limit_in_reach(6_900.0));
        assert!(!limit_in_reach(RAISED));
        assert!(!limit_in_reach(f64::INFINITY));
        let s = Sizer::new(DEFAULT_RATE);
        assert!(s.settled);
        assert_eq!(s.budget(DEFAULT_RATE, 512), 151, "before the first answer");
        assert_eq!(s.latency(ms(250)).budget(DEFAULT_RATE, 512), 372);
        assert_eq!(s.latency(ms(80)).budget(DEFAULT_RATE, 512), 122);
        assert_eq!(s.latency(ms(1)).budget(DEFAULT_RATE, 512), 6);
        assert_eq!(
            s.latency(ms(250)).budget(DEFAULT_RATE, 16),
            16,
            "the cap wins"
        );
        assert_eq!(s.budget(DEFAULT_RATE, 0), 1);
        // A settled budget ignores rounds.
        let r = s.latency(ms(80)).round(round(1000, 1.0), DEFAULT_RATE, 512);
        assert_eq!(r.budget(DEFAULT_RATE, 512), 122);
    }

    #[test]
    fn a_braze_that_slows_under_load_never_raises_the_ceiling() {
        // Answers 20 ms at first, then 1 s once the workspace is loaded: the lowest
        // latency seen sizes the budget.
        let s = Sizer::new(DEFAULT_RATE).latency(ms(20));
        let loaded = (0..100).fold(s, |s, _| s.latency(ms(1000)));
        assert_eq!(loaded.low_latency, Some(ms(20)));
        assert_eq!(
            loaded.budget(DEFAULT_RATE, 512),
            rate_ceiling(DEFAULT_RATE, ms(20))
        );
        assert_eq!(loaded.budget(DEFAULT_RATE, 512), 34);
        // A faster answer lowers it.
        assert_eq!(loaded.latency(ms(2)).low_latency, Some(ms(2)));
    }

    #[test]
    fn a_raised_limit_climbs_from_the_start_while_throughput_doubles() {
        let s = Sizer::new(RAISED).latency(ms(250));
        assert_eq!((s.climb, s.settled), (START, false));
        assert_eq!(s.budget(RAISED, 512), START);
        // 250 ms away with no other bottleneck: throughput follows the budget.
        let mut s = s;
        let mut seen = vec![s.budget(RAISED, 512)];
        while !s.settled {
            let b = s.budget(RAISED, 512) as u64;
            s = s.round(round(b * 4, 1.0), RAISED, 512);
            seen.push(s.budget(RAISED, 512));
        }
        assert_eq!(seen, [8, 16, 32, 64, 128, 256, 512]);
        assert_eq!(s.budget(RAISED, 1024), 512, "settled at the cap then");
    }

    #[test]
    fn the_climb_stops_where_doubling_stops_paying() {
        // Braze 20 ms + 1 ms per request in flight: n in flight give n / (20 + n) ms.
        let throughput = |n: usize| n as f64 / (0.020 + 0.001 * n as f64);
        let mut s = Sizer::new(RAISED).latency(ms(21));
        let mut seen = vec![];
        while !s.settled {
            let b = s.budget(RAISED, 512);
            seen.push(b);
            s = s.round(round(throughput(b) as u64, 1.0), RAISED, 512);
        }
        // 64 gave 24% more than 32 (kept); 128 is never tried.
        assert_eq!(seen, [8, 16, 32, 64]);
        assert_eq!(s.budget(RAISED, 512), 64);
    }

    #[test]
    fn a_doubling_that_buys_nothing_is_undone() {
        // Loopback: the pipeline, not Braze, sets the pace past 8.
        let s = Sizer::new(RAISED).latency(ms(1));
        let s = s.round(round(4000, 1.0), RAISED, 512);
        assert_eq!((s.budget(RAISED, 512), s.settled), (16, false));
        let s = s.round(round(4100, 1.0), RAISED, 512);
        assert_eq!((s.budget(RAISED, 512), s.settled), (8, true));
        // Between KEEP and GROW: kept, and the climb ends.
        let s = Sizer::new(RAISED).latency(ms(1));
        let s = s.round(round(4000, 1.0), RAISED, 512);
        let s = s.round(round(4600, 1.0), RAISED, 512);
        assert_eq!((s.budget(RAISED, 512), s.settled), (16, true));
    }

    #[test]
    fn a_climb_ended_by_one_slow_round_tries_again() {
        // 250 ms away: 8, then 16, then a round of a paused machine at 32 (slower than at
        // 16) undoes that doubling and ends the climb at 16.
        let s = Sizer::new(RAISED).latency(ms(250));
        let s = s.round(round(32, 1.0), RAISED, 512);
        let s = s.round(round(64, 1.0), RAISED, 512);
        let mut s = s.round(round(20, 1.0), RAISED, 512);
        assert_eq!((s.budget(RAISED, 512), s.settled), (16, true));
        let mut seen = Vec::new();
        for _ in 0..REPROBE_ROUNDS * 8 {
            let b = s.budget(RAISED, 512);
            seen.push(b);
            s = s.round(round(b as u64 * 4, 1.0), RAISED, 512);
        }
        // Then it climbs on, as far as throughput follows: to the cap.
        assert_eq!(s.budget(RAISED, 512), 512, "{seen:?}");
        // Where doubling does not pay (a plateau, the knee), it is not tried again.
        let mut s = Sizer::new(RAISED).latency(ms(1));
        s = s.round(round(4000, 1.0), RAISED, 512);
        s = s.round(round(4000, 1.0), RAISED, 512);
        assert_eq!((s.budget(RAISED, 512), s.settled), (8, true));
        let mut seen = Vec::new();
        for _ in 0..REPROBE_ROUNDS * 3 {
            seen.push(s.budget(RAISED, 512));
            s = s.round(round(4000, 1.0), RAISED, 512);
        }
        assert!(seen.iter().all(|b| *b == 8), "{seen:?}");
        assert_eq!(s.budget(RAISED, 512), 8);
        // At its limit, never.
        let mut s = Sizer::new(DEFAULT_RATE).latency(ms(250));
        for _ in 0..REPROBE_ROUNDS * 2 {
            s = s.round(round(980, 1.0), DEFAULT_RATE, 512);
        }
        assert_eq!(s.budget(DEFAULT_RATE, 512), 372);
    }

    #[test]
    fn rounds_the_budget_did_not_hold_back_change_nothing() {
        let s = Sizer::new(RAISED).latency(ms(250));
        let idle = Round {
            saturated: false,
            ..round(100, 1.0)
        };
        assert_eq!(s.round(idle, RAISED, 512), s);
        assert_eq!(s.round(round(0, 1.0), RAISED, 512), s);
        assert_eq!(s.round(round(10, 0.0), RAISED, 512), s);
    }

    #[test]
    fn the_climb_ends_at_the_caps() {
        let s = Sizer::new(RAISED).latency(ms(250));
        let s = s.round(round(32, 1.0), RAISED, 16);
        assert_eq!((s.budget(RAISED, 16), s.settled), (16, true));
        let s = Sizer::new(RAISED)
            .latency(ms(250))
            .round(round(32, 1.0), RAISED, 8);
        assert_eq!((s.budget(RAISED, 8), s.settled), (8, true));
        // A rate just out of reach: the ceiling ends the climb.
        let rate = 7_000.0;
        let mut s = Sizer::new(rate).latency(ms(10));
        assert_eq!(rate_ceiling(rate, ms(10)), 109);
        while !s.settled {
            let b = s.budget(rate, 1024) as u64;
            s = s.round(round(b * 100, 1.0), rate, 1024);
        }
        assert_eq!(s.budget(rate, 1024), 109);
    }
}
