//! Delivery under the conditions of a real Braze workspace: network latency, long Looks,
//! 429s without a usable wait, numbers Looker sends with more digits than a float holds,
//! oversized cells and requests, and panics inside the pipeline.

mod support;

use std::time::{Duration, Instant};

use braze_export_operator::braze::batch::MAX_REQUEST_BYTES;
use braze_export_operator::export::run::Failpoint;
use braze_export_operator::export::{Outcome, RunOptions, Trigger};
use braze_export_operator::sandbox::{Fault, Generator, Look, Rows};
use serde_json::{Value, json};
use support::*;

/// The users Look's identifiers for rows `range`.
fn ids(range: std::ops::RangeInclusive<u64>) -> std::collections::BTreeSet<String> {
    range.map(|i| format!("user-{i:07}")).collect()
}

#[tokio::test]
async fn requests_in_flight_follow_the_latency_up_to_the_user_s_bound() {
    // 300 ms away at about 600 requests/s needs about 270 in flight: far above the old
    // fixed 16, and above the 92 assumed before the first answer. Counted, not timed.
    let w = World::start().await;
    w.looker.add_look("1", Look::users(4000, Generator::Clean));
    w.braze
        .set_latency(Duration::from_millis(290), Duration::from_millis(20));
    let limit = "batchSize: 10\nrateLimit: {requests: 600, periodSeconds: 1}";
    let r = w.run(&w.yaml("1", limit, "")).await;
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.rate_limited),
        (Outcome::Succeeded, 4000, 0)
    );
    assert_eq!(w.delivered_set(), ids(1..=4000));
    let most = w.braze.max_in_flight();
    assert!(most >= 120, "only {most} requests were in flight at once");

    let w = World::start().await;
    w.looker.add_look("1", Look::users(600, Generator::Clean));
    w.braze
        .set_latency(Duration::from_millis(50), Duration::ZERO);
    let r = w
        .run(&w.yaml("1", &format!("{limit}\nconcurrency: 8"), ""))
        .await;
    assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 600));
    assert!(
        w.braze.max_in_flight() <= 8,
        "concurrency is an upper bound"
    );
}

#[tokio::test]
async fn a_look_that_braze_paces_past_the_looker_timeout_finishes() {
    // 6,000 rows at 40 requests/s of 50 objects take 3 s; Looker itself answers at once.
    let w = World::start().await;
    let mut look = Look::users(6000, Generator::Clean);
    look.table_limit = 10_000;
    w.looker.add_look("1", look);
    let yaml = w.yaml_looker(
        "1",
        "timeoutSeconds: 1",
        "batchSize: 50\nrateLimit: {requests: 40, periodSeconds: 1}",
        "",
    );
    let r = w.run(&yaml).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    assert_eq!((r.counts.rows_read, r.counts.sent), (6000, 6000));
}

#[tokio::test]
async fn a_looker_that_stalls_mid_body_times_out_as_looker_timeout() {
    let w = World::start().await;
    let mut look = Look::users(400, Generator::Clean);
    look.stall_after = Some((150, Duration::from_secs(4)));
    w.looker.add_look("1", look);
    let r = w
        .run(&w.yaml_looker("1", "timeoutSeconds: 1", "batchSize: 50", ""))
        .await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    assert_eq!(r.errors[0].reason, "LookerTimeout");
    assert_eq!(
        r.counts.rows_read, 150,
        "the rows before the stall are read"
    );
    assert_eq!(r.counts.sent, 150, "and delivered");

    // A stall shorter than the timeout is only a stall.
    let w = World::start().await;
    let mut look = Look::users(400, Generator::Clean);
    look.stall_after = Some((150, Duration::from_millis(500)));
    w.looker.add_look("1", look);
    let r = w
        .run(&w.yaml_looker("1", "timeoutSeconds: 2", "", ""))
        .await;
    assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 400));
}

#[tokio::test]
async fn a_look_that_trickles_is_stopped_at_the_run_s_deadline() {
    // Every row 100 ms apart: no single wait is long enough for timeoutSeconds, and the
    // whole body would take a minute and a half.
    let w = World::start().await;
    let mut look = Look::users(1000, Generator::Clean);
    look.slow_after = Some((20, Duration::from_millis(100)));
    w.looker.add_look("1", look);
    let started = Instant::now();
    let r = w
        .run(&w.yaml_looker(
            "1",
            "timeoutSeconds: 30",
            "batchSize: 10",
            "activeDeadlineSeconds: 2",
        ))
        .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "stopped at its deadline, took {took:?}"
    );
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    assert_eq!(r.errors[0].reason, "DeadlineExceeded");
    assert_eq!(
        r.errors[0].message,
        "the run took longer than spec.activeDeadlineSeconds (2 s) and was stopped; raise it if the Look needs longer"
    );
    let c = &r.counts;
    assert!(c.rows_read >= 20 && c.rows_read < 1000, "{c:?}");
    assert_eq!(
        c.rows_read,
        c.sent + c.failed,
        "every row read is counted once: {c:?}"
    );
    assert!(
        r.errors
            .iter()
            .all(|e| e.reason != "Interrupted" && !e.message.contains("shutting down")),
        "nothing says shutdown: {:?}",
        r.errors
    );
}

#[tokio::test]
async fn a_429_with_no_usable_wait_is_waited_out_not_failed() {
    // 300 users behind forty 429s that name no wait: zero, absent, or a reset in the past.
    let w = World::start().await;
    w.looker.add_look("1", Look::users(300, Generator::Clean));
    let kinds = [
        Fault::RateLimited { retry_after: 0 },
        Fault::RateLimitedNoHeader,
        Fault::RateLimitedPastReset,
    ];
    w.braze.inject(kinds.iter().cycle().take(40).copied());
    let r = w.run(&w.yaml("1", "concurrency: 1", "")).await;
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.failed),
        (Outcome::Succeeded, 300, 0),
        "{r:#?}"
    );
    assert_eq!((r.counts.rate_limited, r.counts.requests), (40, 44));
    assert_eq!(w.delivered_set(), ids(1..=300));
}

#[tokio::test]
async fn a_run_gives_up_on_rate_limits_only_after_its_patience() {
    // Looker takes longer than the patience to answer: the patience counts from the first
    // 429, not from the start of the run.
    let w = World::start().await;
    let mut look = Look::users(300, Generator::Clean);
    look.delay = Some(Duration::from_millis(900));
    w.looker.add_look("1", look);
    w.braze
        .inject(std::iter::repeat_n(Fault::RateLimitedNoHeader, 100_000));
    let mut services = fast_services();
    services.retry.rate_limit_patience = Duration::from_millis(600);
    let started = Instant::now();
    let r = w
        .run_with(
            &w.yaml("1", "", ""),
            &services,
            RunOptions::new(Trigger::Cli),
        )
        .await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(
        r.counts.rate_limited >= 10,
        "429s were waited out first: {}",
        r.counts.rate_limited
    );
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.failed),
        (Outcome::Failed, 0, 300),
        "{r:#?}"
    );
    assert_eq!(r.errors[0].reason, "RateLimited");
    assert!(
        r.errors[0]
            .message
            .contains("Braze answered 429 (rate limited) and accepted no request for"),
        "{}",
        r.errors[0].message
    );
}

#[tokio::test]
async fn transient_answers_and_load_balancer_pages_are_retried() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(150, Generator::Clean));
    w.braze.inject([
        Fault::Status(408),
        Fault::Status(425),
        Fault::HtmlError(502),
        Fault::HtmlError(504),
    ]);
    let r = w.run(&w.yaml("1", "concurrency: 1", "")).await;
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.retries),
        (Outcome::Succeeded, 150, 4),
        "{r:#?}"
    );
    assert!(!serde_json::to_string(&r).unwrap().contains("<html>"));
}

#[tokio::test]
async fn numeric_identifiers_go_out_with_every_digit() {
    let w = World::start().await;
    let fields = json!({"dimensions": [field("users.id", &["braze_id"]), field("users.score", &["braze[score]"])]});
    let rows = [
        r#"{"users.id":{"value":123456789012345678901},"users.score":{"value":0.30000000000000004441}}"#,
        r#"{"users.id":{"value":-42},"users.score":{"value":7}}"#,
        r#"{"users.id":{"value":12.5},"users.score":{"value":1}}"#,
        r#"null"#,
        r#"{"users.id":{"value":4.2e1},"users.score":{"value":null}}"#,
    ];
    let look = Look::new(fields, Rows::Raw(rows.map(str::to_owned).to_vec()));
    w.looker.add_look("1", look);
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!(
        (r.counts.rows_read, r.counts.sent, r.counts.invalid),
        (5, 3, 2),
        "{r:#?}"
    );
    let reasons: Vec<(&str, &str)> = r
        .errors
        .iter()
        .map(|e| (e.reason.as_str(), e.message.as_str()))
        .collect();
    assert!(
        reasons.contains(&(
            "NonIntegralIdentifier",
            "row 3 has a users.id value that is not a whole number"
        )),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&(
            "NullRow",
            "row 4 of the Look's data is null instead of a row"
        )),
        "{reasons:?}"
    );
    // The exact text of the request body: digits as Looker sent them.
    let body = serde_json::to_string(&w.braze.requests()[0].body).unwrap();
    assert!(
        body.contains(r#""external_id":"123456789012345678901""#),
        "{body}"
    );
    assert!(body.contains(r#""external_id":"-42""#) && body.contains(r#""external_id":"42""#));
    assert!(!body.contains("e+20") && !body.contains("e20"), "{body}");
}

#[tokio::test]
async fn requests_stay_under_the_byte_budget_and_long_cells_never_travel() {
    // 150 users with 60 attributes of 250 characters: about 16 KB an object, so a batch of
    // 75 would be 1.2 MB. One user also has a 20 MiB cell.
    let w = World::start().await;
    let attributes: Vec<Value> = (0..60)
        .map(|i| field(&format!("users.a{i}"), &[&format!("braze[a{i}]")]))
        .collect();
    let mut dims = vec![field("users.id", &["braze_id"])];
    dims.extend(attributes);
    let text = "x".repeat(250);
    let mut rows = Vec::new();
    for n in 1..=150 {
        let mut cells = vec![("users.id".to_owned(), json!(format!("user-{n:07}")))];
        for i in 0..60 {
            let v = if n == 7 && i == 3 {
                json!("y".repeat(20 << 20))
            } else {
                json!(text)
            };
            cells.push((format!("users.a{i}"), v));
        }
        let cells: Vec<(&str, Value)> =
            cells.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        rows.push(row(&cells));
    }
    w.looker.add_look(
        "1",
        Look::new(json!({"dimensions": dims}), Rows::Fixed(rows)),
    );
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.invalid),
        (Outcome::Succeeded, 150, 0),
        "{r:#?}"
    );
    let long = r
        .errors
        .iter()
        .find(|e| e.reason == "AttributeTooLong")
        .expect("reported");
    assert_eq!(
        long.message,
        "row 7 has a a3 value longer than Braze's 255 characters: flagged without it"
    );
    let requests = w.braze.requests();
    assert!(requests.len() >= 3, "{} requests", requests.len());
    for req in &requests {
        let size = serde_json::to_vec(&req.body).unwrap().len();
        assert!(size <= MAX_REQUEST_BYTES, "a request of {size} bytes");
    }
    let seventh = w
        .braze
        .accepted()
        .into_iter()
        .find(|o| o["external_id"] == "user-0000007")
        .unwrap();
    assert!(seventh.get("a3").is_none() && seventh["a4"] == text.as_str());
}

#[tokio::test]
async fn a_400_that_says_too_large_splits_the_batch() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(75, Generator::Clean));
    w.braze.set_max_body_bytes(4000);
    w.braze.set_oversize_status(400);
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.rejected),
        (Outcome::Succeeded, 75, 0),
        "{r:#?}"
    );
    assert!(r.counts.requests > 3);
    assert_eq!(w.delivered_set(), ids(1..=75));
}

#[tokio::test]
async fn a_panic_in_the_reader_or_a_sender_loses_no_count() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(1000, Generator::Clean));
    let mut opts = RunOptions::new(Trigger::Cli);
    opts.failpoint = Failpoint::SenderAtRow(160);
    let r = w
        .run_with(&w.yaml("1", "batchSize: 50", ""), &fast_services(), opts)
        .await;
    assert_eq!(r.outcome, Outcome::PartiallySucceeded, "{r:#?}");
    assert_eq!(
        (r.counts.rows_read, r.counts.sent, r.counts.failed),
        (1000, 950, 50)
    );
    assert_eq!(r.errors[0].reason, "InternalError");

    let w = World::start().await;
    w.looker.add_look("1", Look::users(1000, Generator::Clean));
    let mut opts = RunOptions::new(Trigger::Cli);
    opts.failpoint = Failpoint::ReaderAtRow(620);
    let r = w
        .run_with(&w.yaml("1", "batchSize: 50", ""), &fast_services(), opts)
        .await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    assert_eq!(r.errors[0].reason, "InternalError");
    assert_eq!(
        (r.counts.rows_read, r.counts.sent, r.counts.failed),
        (620, 619, 1),
        "{r:#?}"
    );
}

#[tokio::test]
async fn a_braze_key_refused_mid_run_ends_it_while_looker_is_slow() {
    // Looker sends 100 rows, then one row a second; Braze is slow to answer the first batch
    // and refuses the key on the second. The run must end now: not when Looker is done
    // (900 s), nor when the slow answer comes (60 s).
    let w = World::start().await;
    let mut look = Look::users(1000, Generator::Clean);
    look.slow_after = Some((100, Duration::from_secs(1)));
    w.looker.add_look("1", look);
    w.braze
        .inject([Fault::Slow(Duration::from_secs(60)), Fault::Status(403)]);
    let started = Instant::now();
    let r = w.run(&w.yaml("1", "batchSize: 50", "")).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.errors[0].reason, "BrazeForbidden");
    assert_eq!((r.counts.sent, r.counts.failed), (0, r.counts.rows_read));
    assert!(r.counts.rows_read < 1000);
}
