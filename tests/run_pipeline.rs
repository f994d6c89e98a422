//! The export pipeline over real HTTP against the sandbox Looker and Braze, with quick
//! retries: identifier shapes, batching, dirty rows, faults, limits and shutdown.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use braze_export_operator::export::{Outcome, RunOptions, RunReport, Trigger};
use braze_export_operator::sandbox::{Fault, Generator, Look, LookerAnswer, LookerSandbox, Rows};
use serde_json::{Value, json};
use support::*;

fn ids(range: std::ops::RangeInclusive<u64>) -> BTreeSet<String> {
    range.map(|i| format!("user-{i:07}")).collect()
}

#[tokio::test]
async fn the_three_identifier_types() {
    let w = World::start().await;
    let fields =
        json!({"dimensions": [field("u.id", &["braze_id"]), field("u.tier", &["braze[tier]"])]});
    let rows = vec![
        row(&[("u.id", json!("a-1")), ("u.tier", json!("gold"))]),
        row(&[("u.id", json!(77)), ("u.tier", json!(null))]),
    ];
    w.looker.add_look("1", Look::new(fields, Rows::Fixed(rows)));
    let cases = [
        (
            "identifier: external_id",
            vec![json!({"external_id": "a-1"}), json!({"external_id": "77"})],
        ),
        (
            "identifier: braze_id",
            vec![json!({"braze_id": "a-1"}), json!({"braze_id": "77"})],
        ),
        (
            "identifier: user_alias\naliasLabel: looker_user",
            vec![
                json!({"user_alias": {"alias_name": "a-1", "alias_label": "looker_user"}}),
                json!({"user_alias": {"alias_name": "77", "alias_label": "looker_user"}}),
            ],
        ),
    ];
    for (i, (braze, idents)) in cases.into_iter().enumerate() {
        let report = w
            .run(&w.yaml(
                "1",
                &format!(
                    "{braze}\nexportName: VIP\nattribute: segments\nupdateExistingOnly: false"
                ),
                "",
            ))
            .await;
        assert_eq!(
            (report.outcome, report.counts.sent),
            (Outcome::Succeeded, 2),
            "{braze}"
        );
        let body = &w.braze.requests()[i].body;
        let mut first = idents[0].as_object().unwrap().clone();
        first.extend([
            ("_update_existing_only".to_string(), json!(false)),
            ("tier".into(), json!("gold")),
            ("segments".into(), json!({"add": ["VIP"]})),
        ]);
        let mut second = idents[1].as_object().unwrap().clone();
        second.extend([
            ("_update_existing_only".to_string(), json!(false)),
            ("segments".into(), json!({"add": ["VIP"]})),
        ]);
        assert_eq!(body, &json!({"attributes": [first, second]}), "{braze}");
        let keys: Vec<&String> = body["attributes"][0].as_object().unwrap().keys().collect();
        assert_eq!(
            keys[..2],
            [
                idents[0].as_object().unwrap().keys().next().unwrap(),
                "_update_existing_only"
            ],
            "identifier first"
        );
    }
}

#[tokio::test]
async fn batch_boundaries() {
    for (rows, batch, want) in [
        (75, 75, vec![75]),
        (76, 75, vec![75, 1]),
        (150, 75, vec![75, 75]),
        (151, 75, vec![75, 75, 1]),
        (25, 10, vec![10, 10, 5]),
        (3, 1, vec![1, 1, 1]),
        (0, 75, vec![]),
    ] {
        let w = World::start().await;
        w.looker.add_look("1", Look::users(rows, Generator::Clean));
        let report = w
            .run(&w.yaml("1", &format!("batchSize: {batch}"), ""))
            .await;
        let mut sizes: Vec<usize> = w.braze.requests().iter().map(|r| r.objects).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(sizes, want, "{rows} rows in batches of {batch}");
        assert_eq!(
            (report.counts.sent, report.counts.requests),
            (rows, want.len() as u64)
        );
        assert_eq!(w.delivered_set(), ids(1..=rows));
    }
}

#[tokio::test]
async fn dirty_rows_are_counted_with_their_reasons_and_row_numbers() {
    let w = World::start().await;
    let fields =
        json!({"dimensions": [field("u.id", &["braze_id"]), field("u.plan", &["braze[plan]"])]});
    let cell = |id: Value| row(&[("u.id", id), ("u.plan", json!("pro"))]);
    let rows = vec![
        cell(json!("u1")),                                            // 1 sent
        cell(json!("u1")),                                            // 2 duplicate
        cell(Value::Null),                                            // 3 null
        cell(json!("")),                                              // 4 empty
        cell(json!(true)),                                            // 5 boolean
        cell(json!(12345)),                                           // 6 numeric: sent as "12345"
        cell(json!("12345")),                                         // 7 duplicate of the number
        row(&[("u.id", json!("u8"))]),                                // 8 missing attribute cell
        row(&[("u.plan", json!("pro"))]),                             // 9 missing id cell
        cell(json!("x".repeat(988))),                                 // 10 too long
        json!({"u.id": {"value": "u11"}, "u.plan": {"value": null}}), // 11 null attribute left out
        json!({"u.id": {"value": "u12"}, "u.plan": "bare"}),          // 12 malformed cell
        cell(json!(["u13"])),                                         // 13 array
    ];
    w.looker.add_look("1", Look::new(fields, Rows::Fixed(rows)));
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(
        (
            r.counts.rows_read,
            r.counts.sent,
            r.counts.duplicates,
            r.counts.invalid
        ),
        (13, 3, 2, 8)
    );
    assert_eq!(r.message, "3 users flagged, 2 duplicates, 8 invalid rows");
    let errors: Vec<(String, u64, String)> = r
        .errors
        .iter()
        .map(|e| (e.reason.clone(), e.count, e.message.clone()))
        .collect();
    let want = [
        (
            "InvalidIdentifier",
            2,
            "rows 5, 13 have a u.id value that is neither a string nor a number",
        ),
        ("MissingField", 1, "row 8 lacks the field u.plan"),
        ("MissingField", 1, "row 9 lacks the field u.id"),
        ("NullIdentifier", 1, "row 3 has no u.id value"),
        ("EmptyIdentifier", 1, "row 4 has an empty u.id value"),
        (
            "IdentifierTooLong",
            1,
            "row 10 has a u.id value longer than 987 bytes",
        ),
        ("MalformedCell", 1, "row 12 has a malformed u.plan cell"),
    ];
    let mut got = errors.clone();
    got.sort();
    let mut want: Vec<(String, u64, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), *b, c.to_string()))
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        w.braze.accepted(),
        [
            json!({"external_id": "u1", "_update_existing_only": true, "plan": "pro", "looker_export": {"add": ["LOOKER_EXPORT"]}}),
            json!({"external_id": "12345", "_update_existing_only": true, "plan": "pro", "looker_export": {"add": ["LOOKER_EXPORT"]}}),
            json!({"external_id": "u11", "_update_existing_only": true, "looker_export": {"add": ["LOOKER_EXPORT"]}}),
        ]
    );
}

#[tokio::test]
async fn faults_lose_nothing() {
    // One request at a time: every batch meets 500, 503, 429, a dropped connection and a slow
    // answer, then one batch meets a burst of five 429s. Counts are exact.
    let w = World::start().await;
    w.looker.add_look("1", Look::users(3000, Generator::Clean));
    let cycle = [
        Fault::Status(500),
        Fault::Status(503),
        Fault::RateLimited { retry_after: 0 },
        Fault::Drop,
        Fault::Slow(Duration::from_millis(30)),
    ];
    w.braze.inject(cycle.iter().cycle().take(30).copied());
    w.braze.inject([Fault::RateLimited { retry_after: 0 }; 5]);
    let r = w
        .run(&w.yaml("1", "batchSize: 50\nconcurrency: 1", ""))
        .await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    assert_eq!(
        (r.counts.rows_read, r.counts.sent, r.counts.failed),
        (3000, 3000, 0)
    );
    assert_eq!(w.delivered_set(), ids(1..=3000), "every user delivered");
    assert_eq!(
        (r.counts.rate_limited, r.counts.retries, r.counts.requests),
        (6 + 5, 6 * 4 + 5, 60 + 29)
    );
    assert_eq!(w.braze.request_count(), r.counts.requests);

    // Eight in flight, sixteen faults among them: still nothing lost.
    let w = World::start().await;
    w.looker.add_look("1", Look::users(3000, Generator::Clean));
    w.braze.inject(cycle.iter().cycle().take(16).copied());
    let r = w
        .run(&w.yaml("1", "batchSize: 50\nconcurrency: 8", ""))
        .await;
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.failed),
        (Outcome::Succeeded, 3000, 0),
        "{r:#?}"
    );
    assert_eq!(w.delivered_set(), ids(1..=3000));
    assert_eq!((r.counts.rate_limited, r.counts.retries), (3, 13));
}

#[tokio::test]
async fn server_errors_beyond_retries_fail_those_rows_only() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(100, Generator::Clean));
    w.braze.inject([Fault::Status(502); 6]);
    let r = w
        .run(&w.yaml("1", "batchSize: 50\nconcurrency: 1", ""))
        .await;
    assert_eq!(r.outcome, Outcome::PartiallySucceeded);
    assert_eq!(
        (
            r.counts.sent,
            r.counts.failed,
            r.counts.requests,
            r.counts.retries
        ),
        (50, 50, 7, 5)
    );
    assert_eq!(r.errors[0].reason, "BrazeServerError");
    assert_eq!(
        r.errors[0].message,
        "rows 1, 2, 3, 4, 5 and 45 more not delivered: Braze answered 502 on all 6 attempts"
    );
    assert_eq!(w.delivered_set(), ids(51..=100));

    let w = World::start().await;
    w.looker.add_look("1", Look::users(10, Generator::Clean));
    w.braze.inject([Fault::Status(503); 6]);
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.failed),
        (Outcome::Failed, 0, 10),
        "nothing delivered: the run failed"
    );
}

#[tokio::test]
async fn an_expired_looker_token_means_one_new_login() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(10, Generator::Clean));
    w.looker.expire_next_tokens_after(Duration::ZERO);
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 10));
    let paths: Vec<String> = w.looker.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            "/api/4.0/login",
            "/api/4.0/looks/1/run/json_detail",
            "/api/4.0/login",
            "/api/4.0/looks/1/run/json_detail"
        ]
    );

    w.looker.expire_next_tokens_after(Duration::ZERO);
    w.looker.expire_next_tokens_after(Duration::ZERO);
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!(r.outcome, Outcome::Failed, "only one new login");
    assert!(r.message.contains("answered HTTP 401"), "{}", r.message);
}

#[tokio::test]
async fn a_body_cut_off_mid_stream_fails_but_keeps_what_was_read() {
    let w = World::start().await;
    let mut look = Look::users(5000, Generator::Clean);
    look.cut_after = Some(3210);
    w.looker.add_look("1", look);
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.errors[0].reason, "LookerBodyInvalid", "{}", r.message);
    assert!(
        r.message.starts_with(
            "the result of Look 1 is not readable json_detail: the connection failed after"
        ),
        "{}",
        r.message
    );
    assert!(
        r.counts.rows_read > 0 && r.counts.rows_read <= 3210,
        "{}",
        r.counts.rows_read
    );
    assert_eq!(
        r.counts.sent, r.counts.rows_read,
        "rows read before the cut were delivered"
    );
    assert_eq!(w.delivered_set(), ids(1..=r.counts.rows_read));
}

#[tokio::test]
async fn a_truncated_or_malformed_result_is_reported() {
    let w = World::start().await;
    w.looker.add_look("sql", {
        let mut l = Look::users(10, Generator::Clean);
        l.errors = Some(json!([{"message": "Unknown column 'users.external_id' in 'field list'", "sql_error_loc": {"line": 1}}]));
        l
    });
    let r = w.run(&w.yaml("sql", "", "")).await;
    assert_eq!(r.errors[0].reason, "LookerQueryError");
    assert_eq!(
        r.message,
        "Look sql failed in Looker: Unknown column 'users.external_id' in 'field list'; 0 users flagged"
    );
}

#[tokio::test]
async fn payload_too_large_splits_the_batch() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(75, Generator::Clean));
    w.braze.set_max_body_bytes(3000);
    let r = w.run(&w.yaml("1", "", "")).await;
    assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 75));
    let sizes: Vec<(usize, u16)> = w
        .braze
        .requests()
        .iter()
        .map(|r| (r.objects, r.status))
        .collect();
    assert_eq!(sizes[0], (75, 413));
    assert!(
        sizes
            .iter()
            .filter(|(_, s)| *s == 201)
            .all(|(n, _)| *n <= 38),
        "{sizes:?}"
    );
    assert_eq!(w.delivered_set(), ids(1..=75));
}

#[tokio::test]
async fn max_rows_skips_and_counts_the_rest() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(250, Generator::Clean));
    let r = w.run(&w.yaml("1", "", "maxRows: 200")).await;
    assert_eq!(r.outcome, Outcome::PartiallySucceeded);
    assert_eq!(
        (r.counts.rows_read, r.counts.sent, r.counts.skipped),
        (250, 200, 50)
    );
    assert_eq!(
        r.errors[0].message,
        "rows 201, 202, 203, 204, 205 and 45 more beyond maxRows 200 were skipped"
    );
}

#[tokio::test]
async fn the_limiter_paces_below_the_ceiling_and_is_shared_by_runs() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(15, Generator::Clean));
    w.braze.set_rate_limit(Some((10, Duration::from_secs(1))));
    let yaml = w.yaml(
        "1",
        "batchSize: 1\nrateLimit: {requests: 10, periodSeconds: 1}",
        "",
    );
    let services = fast_services();
    let start = Instant::now();
    let (a, b) = tokio::join!(
        w.run_with(&yaml, &services, RunOptions::new(Trigger::Cli)),
        w.run_with(&yaml, &services, RunOptions::new(Trigger::Cli)),
    );
    let elapsed = start.elapsed();
    assert_eq!((a.counts.sent, b.counts.sent), (15, 15));
    assert_eq!(
        a.counts.rate_limited + b.counts.rate_limited,
        0,
        "paced under Braze's window: no 429"
    );
    assert!(
        elapsed >= Duration::from_millis(2800),
        "30 requests at 10/s share one limiter: {elapsed:?}"
    );
}

#[tokio::test]
async fn braze_rate_limit_headers_and_429_are_honoured() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(13, Generator::Clean));
    w.braze.set_rate_limit(Some((4, Duration::from_secs(1))));
    let start = Instant::now();
    let r = w
        .run(&w.yaml("1", "batchSize: 1\nconcurrency: 1", ""))
        .await;
    assert_eq!((r.outcome, r.counts.sent), (Outcome::Succeeded, 13));
    assert_eq!(
        r.counts.rate_limited, 0,
        "X-RateLimit-Remaining: 0 makes the client wait for X-RateLimit-Reset"
    );
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "13 requests at 4 per window span 4 windows"
    );

    let w = World::start().await;
    w.looker.add_look("1", Look::users(12, Generator::Clean));
    w.braze.set_rate_limit(Some((4, Duration::from_secs(1))));
    let r = w
        .run(&w.yaml("1", "batchSize: 1\nconcurrency: 4", ""))
        .await;
    assert_eq!(
        (r.outcome, r.counts.sent, r.counts.failed),
        (Outcome::Succeeded, 12, 0),
        "429s are waited out and retried"
    );
    assert_eq!(w.delivered_set(), ids(1..=12));
}

#[tokio::test]
async fn a_slow_looker_times_out() {
    let w = World::start().await;
    let mut look = Look::users(5, Generator::Clean);
    look.delay = Some(Duration::from_secs(3));
    w.looker.add_look("1", look);
    let r = w
        .run(&w.yaml_looker("1", "timeoutSeconds: 1", "", ""))
        .await;
    assert_eq!(r.errors[0].reason, "LookerTimeout");
    assert_eq!(
        r.message,
        "Looker did not deliver Look 1 within timeoutSeconds (1 s); 0 users flagged"
    );
}

#[tokio::test]
async fn shutdown_mid_run_is_interrupted_and_accounted() {
    let w = World::start().await;
    w.looker.add_look("1", Look::users(600, Generator::Clean));
    w.braze.inject([Fault::Slow(Duration::from_secs(30)); 4]);
    let opts = RunOptions::new(Trigger::Schedule);
    let cancel = opts.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let start = Instant::now();
    let r = w
        .run_with(&w.yaml("1", "concurrency: 2", ""), &fast_services(), opts)
        .await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "cancellation does not wait for slow answers"
    );
    assert_eq!(r.outcome, Outcome::Interrupted);
    assert!(r.counts.failed > 0 && r.counts.sent == 0, "{r:#?}");
    assert!(
        r.message
            .starts_with("interrupted by shutdown: 0 users flagged"),
        "{}",
        r.message
    );
    assert!(
        r.errors.iter().any(|e| e.reason == "Interrupted"),
        "{:?}",
        r.errors
    );
}

#[tokio::test]
async fn looker_s_own_json_detail_example_with_id_field() {
    let example: Value =
        serde_json::from_str(include_str!("data/looker-json-detail-example.json")).unwrap();
    let rows = example["data"].as_array().unwrap().clone();
    let w = World::start().await;
    w.looker.add_look(
        "1",
        Look::new(example["fields"].clone(), Rows::Fixed(rows.clone())),
    );
    let r = w
        .run(&w.yaml_looker("1", "idField: orders.created_month", "", ""))
        .await;
    assert_eq!(
        (r.outcome, r.counts.rows_read, r.counts.sent),
        (Outcome::Succeeded, rows.len() as u64, rows.len() as u64)
    );
    let months: Vec<String> = rows
        .iter()
        .map(|r| {
            r["orders.created_month"]["value"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut want = months.clone();
    want.sort();
    assert_eq!(w.delivered(), want);
    assert_eq!(months[0], "2017-07");
}

/// A 500 body an internal service might send: a token and other text that must stay there.
fn leaky_body() -> Value {
    json!({"access_token": "tok-LEAK", "token_type": "Bearer", "detail": "internal SECRET-TEXT"})
}

/// The report as the status and `run --output json` carry it.
fn report_json(r: &RunReport) -> String {
    serde_json::to_string(r).expect("report serialises")
}

fn assert_nothing_leaked(r: &RunReport) {
    let text = report_json(r);
    for secret in ["tok-LEAK", "SECRET-TEXT", "<html", "Bearer"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
}

#[tokio::test]
async fn an_unexpected_answer_s_body_never_reaches_the_report() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(5, Generator::Clean));

    // Login answered 500 with a token in the body.
    w.looker
        .answer_login_with(Some(LookerAnswer::json(500, &leaky_body())));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_nothing_leaked(&r);
    assert_eq!(
        (r.outcome, r.errors[0].reason.as_str()),
        (Outcome::Failed, "LookerError")
    );
    assert_eq!(
        r.message,
        "Look 42: Looker answered HTTP 500 to POST /api/4.0/login (body not shown); 0 users flagged"
    );
    w.looker.answer_login_with(None);

    // The run request answered 500 with the same body.
    w.looker
        .answer_run_with(Some(LookerAnswer::json(500, &leaky_body())));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_nothing_leaked(&r);
    assert_eq!(
        r.message,
        "Look 42: Looker answered HTTP 500 to GET /api/4.0/looks/42/run/json_detail (body not shown); 0 users flagged"
    );

    // An HTML error page (a proxy, or another service) is not echoed either.
    w.looker.answer_run_with(Some(LookerAnswer::html(
        502,
        "<html><head><title>502 Bad Gateway</title></head><body>upstream tok-LEAK SECRET-TEXT</body></html>",
    )));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_nothing_leaked(&r);
    assert_eq!(
        r.message,
        "Look 42: Looker answered HTTP 502 to GET /api/4.0/looks/42/run/json_detail (body not shown); 0 users flagged"
    );

    // A 200 that is not json_detail: the parse error says where, not what.
    w.looker.answer_run_with(Some(LookerAnswer::json(
        200,
        &json!({"fields": "tok-LEAK SECRET-TEXT"}),
    )));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_nothing_leaked(&r);
    assert_eq!(r.errors[0].reason, "LookerBodyInvalid");
    assert_eq!(
        r.message,
        "the result of Look 42 is not readable json_detail: the body is malformed after 0 complete rows (at line 1, column 32: not json_detail, found a string where a fields object was expected); 0 users flagged"
    );
}

#[tokio::test]
async fn looker_s_own_error_message_is_shown_cleaned_and_cut() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(5, Generator::Clean));
    let mut body = leaky_body();
    body["message"] = json!("Query timed out:\n\u{1b}[31mwarehouse busy");
    body["documentation_url"] = json!("https://cloud.google.com/looker/docs/r/err/4.0/500");
    w.looker
        .answer_run_with(Some(LookerAnswer::json(500, &body)));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_nothing_leaked(&r);
    assert_eq!(
        r.message,
        "Look 42: Looker answered HTTP 500 to GET /api/4.0/looks/42/run/json_detail, saying \"Query timed out: [31mwarehouse busy\"; 0 users flagged"
    );

    w.looker.answer_run_with(Some(LookerAnswer::json(
        400,
        &json!({"message": format!("{}tok-LEAK", "x".repeat(300))}),
    )));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_nothing_leaked(&r);
    assert!(
        r.message
            .contains(&format!(", saying \"{}…\"", "x".repeat(200))),
        "cut at 200 characters: {}",
        r.message
    );
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(5, Generator::Clean));
    // Another Looker that would accept the same credentials, on another host name.
    let elsewhere = LookerSandbox::start(CLIENT_ID, CLIENT_SECRET)
        .await
        .expect("second sandbox");
    elsewhere.add_look("42", Look::users(5, Generator::Clean));
    let other = elsewhere.url.replace("127.0.0.1", "localhost");
    let other_host = other.trim_start_matches("http://").to_owned();
    let refused = |method_path: &str, status: u16| {
        format!(
            "Look 42: Looker answered a redirect (HTTP {status}) to {method_path} toward host {other_host}; redirects are not followed: spec.looker.baseUrl must be the Looker API host itself; 0 users flagged"
        )
    };

    // A 307 on login would send the client id and secret to the other host.
    w.looker.answer_login_with(Some(LookerAnswer::redirect(
        307,
        &format!("{other}/api/4.0/login?next=tok-LEAK"),
    )));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_eq!(elsewhere.requests(), [], "the other host received nothing");
    assert_nothing_leaked(&r);
    assert_eq!(r.errors[0].reason, "LookerRedirect", "{}", r.message);
    assert_eq!(r.message, refused("POST /api/4.0/login", 307));
    w.looker.answer_login_with(None);

    // A 302 on the run request would take the request (and the Look's rows) elsewhere.
    w.looker.answer_run_with(Some(LookerAnswer::redirect(
        302,
        &format!("{other}/api/4.0/looks/42/run/json_detail?steal=tok-LEAK"),
    )));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_eq!(elsewhere.requests(), [], "the other host received nothing");
    assert_nothing_leaked(&r);
    assert_eq!(
        r.message,
        refused("GET /api/4.0/looks/42/run/json_detail", 302)
    );

    // A redirect within the same origin names no host.
    w.looker
        .answer_run_with(Some(LookerAnswer::redirect(301, "/login?tok-LEAK")));
    let r = w.run(&w.yaml("42", "", "")).await;
    assert_nothing_leaked(&r);
    assert!(
        r.message.starts_with(
            "Look 42: Looker answered a redirect (HTTP 301) to GET /api/4.0/looks/42/run/json_detail; redirects"
        ),
        "{}",
        r.message
    );
    assert_eq!(w.braze.request_count(), 0);
}

#[tokio::test]
async fn the_binary_shows_no_body_in_its_text_json_or_logs() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(5, Generator::Clean));
    w.looker
        .answer_run_with(Some(LookerAnswer::json(500, &leaky_body())));
    let yaml = w.yaml("42", "", "");
    let (json_run, spec) = cli_run(&yaml, &[]).await;
    let text_run = cli_spec(&spec, &[], &[], &[("RUST_LOG", "trace")]).await;
    for (name, run) in [("json", &json_run), ("text", &text_run)] {
        assert_eq!(run.code, 1, "{name}: {}", run.stderr);
        for out in [&run.stdout, &run.stderr] {
            assert!(
                !out.contains("tok-LEAK") && !out.contains("SECRET-TEXT"),
                "{name} output leaked the body:\n{out}"
            );
        }
    }
    assert_eq!(
        json_run.report()["message"],
        "Look 42: Looker answered HTTP 500 to GET /api/4.0/looks/42/run/json_detail (body not shown); 0 users flagged"
    );
    assert!(
        text_run.stdout.contains(
            "Looker answered HTTP 500 to GET /api/4.0/looks/42/run/json_detail (body not shown)"
        ),
        "{}",
        text_run.stdout
    );
}

/// The call that reads the Look's row limit (`results: Table` with `removal: Remove`) is held
/// to the same rules as the others: Looker's own message only, never its body; a Look the
/// API user may not see is named; nothing is run or sent after it failed.
#[tokio::test]
async fn the_look_s_row_limit_call_never_echoes_a_body() {
    let w = World::start().await;
    w.looker.add_look("42", Look::users(5, Generator::Clean));
    let yaml = w.yaml("42", "removal: Remove", "");
    let opts = || RunOptions::new(Trigger::Cli);

    w.looker
        .answer_look_with(Some(LookerAnswer::json(500, &leaky_body())));
    let r = w.sync(&yaml, None, opts()).await.report;
    assert_nothing_leaked(&r);
    assert_eq!(
        (r.outcome, r.errors[0].reason.as_str()),
        (Outcome::Failed, "LookerError")
    );
    assert_eq!(
        r.message,
        "Look 42: Looker answered HTTP 500 to GET /api/4.0/looks/42 (body not shown); 0 users flagged"
    );

    let mut body = leaky_body();
    body["message"] = json!("Looker is\nupgrading");
    w.looker
        .answer_look_with(Some(LookerAnswer::json(503, &body)));
    let r = w.sync(&yaml, None, opts()).await.report;
    assert_nothing_leaked(&r);
    assert_eq!(
        r.message,
        "Look 42: Looker answered HTTP 503 to GET /api/4.0/looks/42, saying \"Looker is upgrading\"; 0 users flagged"
    );

    // A 200 that is not a Look, or whose limit is not a number.
    for odd in [
        LookerAnswer::html(200, "<html>tok-LEAK SECRET-TEXT</html>"),
        LookerAnswer::json(200, &json!({"query": {"limit": "tok-LEAK"}})),
    ] {
        w.looker.answer_look_with(Some(odd));
        let r = w.sync(&yaml, None, opts()).await.report;
        assert_nothing_leaked(&r);
        assert_eq!(
            r.message,
            "Look 42: Looker answered HTTP 200 to GET /api/4.0/looks/42 without a Look's query row limit (body not shown); 0 users flagged"
        );
    }
    w.looker.answer_look_with(None);

    // An unknown Look: named, with the call that said so.
    let r = w
        .sync(&w.yaml("7", "removal: Remove", ""), None, opts())
        .await
        .report;
    assert_eq!(r.errors[0].reason, "LookNotFound");
    assert!(
        r.message.starts_with("Look 7 was not found (GET "),
        "{}",
        r.message
    );
    assert!(
        w.looker.requests_to("/run/json_detail").is_empty(),
        "no run after the limit could not be read"
    );
    assert!(w.braze.requests().is_empty(), "nothing sent");
}
