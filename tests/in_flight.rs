//! Requests in flight follow the network, once per workspace: runs sharing a workspace share
//! one in-flight budget, a Braze that slows under load gets no more requests for it, and
//! with a raised limit in flight follows what latency shows, not `concurrency`. Counted
//! over real HTTP against the sandbox Braze (its `max_in_flight`), not timed.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use braze_export_operator::export::{Outcome, RunOptions, Trigger};
use braze_export_operator::sandbox::{Generator, Look};
use support::*;

/// A limit far above anything the sandbox Braze can serve (an enterprise contract): the
/// pacing never binds, so only the in-flight budget decides how many requests fly.
const RAISED: &str = "batchSize: 10\nrateLimit: {requests: 1000000, periodSeconds: 1}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_runs_on_one_workspace_share_one_budget_fairly() {
    // Braze 50 ms away, plus 2 ms per request in flight: at most 500 requests/s whatever
    // is in flight. One run's budget settles where doubling stops paying (about 128 here);
    // each run may take up to 256, so four runs sizing themselves apart open up to 1,024.
    let w = World::start().await;
    w.braze.set_rate_limit(None);
    w.braze
        .set_latency(Duration::from_millis(50), Duration::ZERO);
    w.braze.set_latency_per_in_flight(Duration::from_millis(2));
    w.looker.add_look("1", Look::users(3000, Generator::Clean));
    let yaml = w.yaml("1", &format!("{RAISED}\nconcurrency: 256"), "");
    let services = Arc::new(fast_services());
    let progress: Vec<_> = (0..4)
        .map(|_| Arc::new(braze_export_operator::export::Progress::default()))
        .collect();
    let w = Arc::new(w);
    let mut runs = tokio::task::JoinSet::new();
    for (i, p) in progress.iter().enumerate() {
        let (w, services, yaml) = (Arc::clone(&w), Arc::clone(&services), yaml.clone());
        let mut opts = RunOptions::new(Trigger::Cli);
        opts.progress = Arc::clone(p);
        runs.spawn(async move { (i, w.run_with(&yaml, &services, opts).await) });
    }
    // When the first run ends, every other one has had its share: FIFO permits, one
    // waiting delivery per run, hand the budget round in turn.
    let (first, report) = runs.join_next().await.unwrap().unwrap();
    let shares: Vec<u64> = progress
        .iter()
        .map(|p| p.sent.load(Ordering::Relaxed))
        .collect();
    assert_eq!(report.outcome, Outcome::Succeeded, "{report:#?}");
    while let Some(r) = runs.join_next().await {
        let (_, r) = r.unwrap();
        assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 3000));
    }
    for (i, sent) in shares.iter().enumerate() {
        assert!(
            i == first || *sent >= 3000 * 6 / 10,
            "run {i} had sent only {sent} of 3000 when run {first} ended: {shares:?}"
        );
    }
    let most = w.braze.max_in_flight();
    assert!(
        most <= 200,
        "four runs together held {most} requests in flight, more than one run's budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_braze_that_slows_under_load_gets_no_more_requests_for_it() {
    // 20 ms plus 1 ms per request in flight: at most 1,000 requests/s. Sizing in flight from
    // the latency seen would chase it (more in flight, slower answers, more in flight) up to
    // `concurrency` (512 by default); the budget stops where doubling stops paying: 32 or
    // 64 here (n in flight give n / (20 + n) per ms), 128 at the very most.
    let w = World::start().await;
    w.braze.set_rate_limit(None);
    w.braze
        .set_latency(Duration::from_millis(20), Duration::ZERO);
    w.braze.set_latency_per_in_flight(Duration::from_millis(1));
    w.looker
        .add_look("1", Look::users(20_000, Generator::Clean));
    let started = Instant::now();
    let r = w.run(&w.yaml_looker("1", "results: All", RAISED, "")).await;
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 20_000));
    let most = w.braze.max_in_flight();
    assert!(most <= 128, "{most} requests in flight at once");
    // What that budget buys, as a share of what this Braze can serve at all (a ratio over
    // the whole run, ramp included, not a speed bar): 32 in flight give 0.6 of it, 16 give
    // 0.44, 8 give 0.29; the margin is for a busy machine.
    let share = r.counts.requests as f64 / seconds / 1000.0;
    assert!(
        share >= 0.35,
        "{share:.2} of what Braze can serve, with {most} in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_raised_limit_in_flight_follows_the_latency_not_the_cap() {
    // Loopback: a few requests keep up with everything the pipeline makes. The budget
    // climbs from 8 and keeps a doubling only when it paid: at most one doubling past the
    // budget that pays (today 8 or 16) is ever tried.
    let w = World::start().await;
    w.braze.set_rate_limit(None);
    w.looker
        .add_look("1", Look::users(30_000, Generator::Clean));
    let r = w.run(&w.yaml_looker("1", "results: All", RAISED, "")).await;
    assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 30_000));
    let near = w.braze.max_in_flight();
    assert!(near <= 32, "{near} requests in flight on loopback");

    // 250 ms away: the budget keeps doubling while throughput follows.
    let w = World::start().await;
    w.braze.set_rate_limit(None);
    w.braze
        .set_latency(Duration::from_millis(250), Duration::ZERO);
    w.looker
        .add_look("1", Look::users(10_000, Generator::Clean));
    let r = w.run(&w.yaml_looker("1", "results: All", RAISED, "")).await;
    assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 10_000));
    let far = w.braze.max_in_flight();
    assert!(far >= 128, "only {far} requests in flight 250 ms away");
}
