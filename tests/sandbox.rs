//! The sandboxes' hostile knobs, checked with plain HTTP calls: Braze latency, concurrency,
//! per-key rate limits, reset forms, faults, 400s and oversize answers; Looker latency,
//! bodies that slow down, stall or trickle, and oversized cells and `pivots`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use braze_export_operator::sandbox::{
    BrazeSandbox, Fault, Generator, Look, LookerSandbox, ResetForm,
};
use serde_json::{Value, json};

const KEY: &str = "sandbox-test-key";

fn client() -> reqwest::Client {
    braze_export_operator::http::install_crypto_provider();
    reqwest::Client::new()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn one_object() -> Value {
    json!({"attributes": [{"external_id": "u1", "looker_export": {"add": ["A"]}}]})
}

async fn braze() -> (BrazeSandbox, reqwest::Client) {
    (
        BrazeSandbox::start(KEY).await.expect("braze sandbox"),
        client(),
    )
}

/// POSTs `body` to `/users/track` with `key`.
async fn track(c: &reqwest::Client, braze: &BrazeSandbox, key: &str, body: &Value) -> Answer {
    track_raw(c, braze, key, body.to_string()).await
}

async fn track_raw(c: &reqwest::Client, braze: &BrazeSandbox, key: &str, body: String) -> Answer {
    let r = c
        .post(format!("{}/users/track", braze.url))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sandbox answers");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().await.expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn number(&self, name: &str) -> u64 {
        self.header(name)
            .unwrap_or_else(|| panic!("{name} missing: {self:?}"))
            .parse()
            .unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Waits, if need be, so that at least `margin_ms` remain in the current `period_ms` window.
async fn early_in_window(period_ms: u64, margin_ms: u64) {
    let into = now_ms() % period_ms;
    if period_ms - into < margin_ms {
        tokio::time::sleep(Duration::from_millis(period_ms - into + 20)).await;
    }
}

#[tokio::test]
async fn braze_latency_delays_each_answer_by_at_least_the_fixed_part() {
    let (braze, c) = braze().await;
    braze.set_latency(Duration::from_millis(150), Duration::from_millis(50));
    for _ in 0..3 {
        let start = Instant::now();
        let a = track(&c, &braze, KEY, &one_object()).await;
        let took = start.elapsed();
        assert_eq!(a.status, 201, "{a:?}");
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    assert_eq!((braze.request_count(), braze.accepted_count()), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn braze_latency_does_not_serialize_concurrent_requests() {
    let (braze, c) = braze().await;
    braze.set_latency(Duration::from_millis(200), Duration::ZERO);
    let (c, sandbox) = (&c, &braze);
    let start = Instant::now();
    let answers = futures_util::future::join_all(
        (0..16).map(|_| async move { track(c, sandbox, KEY, &one_object()).await.status }),
    )
    .await;
    let took = start.elapsed();
    assert_eq!(answers, vec![201; 16]);
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(
        took < Duration::from_millis(1600),
        "16 × 200 ms took {took:?}: latency serializes requests"
    );
    let peak = braze.max_in_flight();
    assert!((12..=16).contains(&peak), "max_in_flight {peak}");
    assert_eq!((braze.request_count(), braze.accepted_count()), (16, 16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn braze_latency_grows_with_the_requests_in_flight() {
    let (braze, c) = braze().await;
    braze.set_latency(Duration::from_millis(10), Duration::ZERO);
    braze.set_latency_per_in_flight(Duration::from_millis(25));
    let start = Instant::now();
    assert_eq!(track(&c, &braze, KEY, &one_object()).await.status, 201);
    assert!(
        start.elapsed() >= Duration::from_millis(35),
        "alone: 10 + 1 × 25 ms"
    );
    let (c, sandbox) = (&c, &braze);
    let took = futures_util::future::join_all((0..8).map(|_| async move {
        let start = Instant::now();
        assert_eq!(track(c, sandbox, KEY, &one_object()).await.status, 201);
        start.elapsed()
    }))
    .await;
    let slowest = took.iter().max().unwrap();
    let peak = braze.max_in_flight();
    assert!(
        *slowest >= Duration::from_millis(10 + 25 * peak as u64),
        "{peak} in flight, slowest {slowest:?}"
    );
}

#[tokio::test]
async fn braze_max_in_flight_is_one_for_sequential_requests() {
    let (braze, c) = braze().await;
    assert_eq!(braze.max_in_flight(), 0);
    for _ in 0..3 {
        assert_eq!(track(&c, &braze, KEY, &one_object()).await.status, 201);
    }
    assert_eq!(braze.max_in_flight(), 1);
}

#[tokio::test]
async fn braze_rate_limit_is_on_by_default_with_epoch_reset() {
    let (braze, c) = braze().await;
    let a = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.number("x-ratelimit-limit"), 3000);
    assert_eq!(a.number("x-ratelimit-remaining"), 2999);
    let reset = a.number("x-ratelimit-reset");
    let now = now_ms() / 1000;
    assert!(
        reset > 1_000_000_000 && reset >= now && reset <= now + 4,
        "reset {reset}, now {now}"
    );
    assert_eq!(reset % 3, 0, "windows are aligned to the epoch");
}

#[tokio::test]
async fn braze_reset_can_be_seconds_to_go() {
    let (braze, c) = braze().await;
    braze.set_reset_form(ResetForm::SecondsToGo);
    let a = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(a.status, 201, "{a:?}");
    let reset = a.number("x-ratelimit-reset");
    assert!((1..=3).contains(&reset), "reset {reset}");
    braze.set_reset_form(ResetForm::Epoch);
    let a = track(&c, &braze, KEY, &one_object()).await;
    assert!(a.number("x-ratelimit-reset") > 1_000_000_000, "{a:?}");
}

#[tokio::test]
async fn braze_rate_limit_is_per_key() {
    let (braze, c) = braze().await;
    braze.add_key("second-key");
    braze.set_rate_limit(Some((3, Duration::from_secs(2))));
    early_in_window(2000, 800).await;
    for left in [2, 1, 0] {
        let a = track(&c, &braze, KEY, &one_object()).await;
        assert_eq!(a.status, 201, "{a:?}");
        assert_eq!(a.number("x-ratelimit-remaining"), left);
    }
    let limited = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    let retry = limited.number("x-ratelimit-retry-after");
    assert!((1..=2).contains(&retry), "retry after {retry}");
    assert_eq!(limited.header("x-ratelimit-remaining"), None);

    // The second key has its own window.
    for left in [2, 1, 0] {
        let a = track(&c, &braze, "second-key", &one_object()).await;
        assert_eq!(a.status, 201, "{a:?}");
        assert_eq!(a.number("x-ratelimit-remaining"), left);
    }
    assert_eq!(
        track(&c, &braze, "second-key", &one_object()).await.status,
        429
    );
    assert_eq!((braze.request_count(), braze.accepted_count()), (8, 6));

    // Off: nothing is limited and no headers are sent.
    braze.set_rate_limit(None);
    let a = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.header("x-ratelimit-limit"), None);
}

#[tokio::test]
async fn braze_faults_come_before_the_limiter_and_do_not_use_the_window() {
    let (braze, c) = braze().await;
    braze.set_rate_limit(Some((1, Duration::from_secs(10))));
    early_in_window(10_000, 1000).await;
    braze.inject([Fault::HtmlError(502)]);
    assert_eq!(track(&c, &braze, KEY, &one_object()).await.status, 502);
    assert_eq!(track(&c, &braze, KEY, &one_object()).await.status, 201);
    assert_eq!(track(&c, &braze, KEY, &one_object()).await.status, 429);
    assert_eq!((braze.request_count(), braze.accepted_count()), (3, 1));
}

#[tokio::test]
async fn braze_rate_limited_fault_variants() {
    let (braze, c) = braze().await;
    braze.inject([
        Fault::RateLimited { retry_after: 0 },
        Fault::RateLimitedNoHeader,
        Fault::RateLimitedPastReset,
    ]);

    let zero = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(zero.status, 429, "{zero:?}");
    assert_eq!(zero.header("x-ratelimit-retry-after"), Some("0"));

    let none = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(none.status, 429, "{none:?}");
    for h in [
        "x-ratelimit-retry-after",
        "retry-after",
        "x-ratelimit-reset",
        "x-ratelimit-remaining",
    ] {
        assert_eq!(none.header(h), None, "{h} in {none:?}");
    }
    assert_eq!(none.json()["message"], "Over rate limit");

    let past = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(past.status, 429, "{past:?}");
    let reset = past.number("x-ratelimit-reset");
    let now = now_ms() / 1000;
    assert!(
        reset + 4 <= now && reset + 7 >= now,
        "reset {reset}, now {now}"
    );
    for h in [
        "x-ratelimit-retry-after",
        "retry-after",
        "x-ratelimit-remaining",
    ] {
        assert_eq!(past.header(h), None, "{h} in {past:?}");
    }

    assert_eq!(track(&c, &braze, KEY, &one_object()).await.status, 201);
    assert_eq!((braze.request_count(), braze.accepted_count()), (4, 1));
    let statuses: Vec<u16> = braze.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 429, 429, 201]);
}

#[tokio::test]
async fn braze_html_error_looks_like_a_load_balancer() {
    let (braze, c) = braze().await;
    braze.inject([Fault::HtmlError(502), Fault::HtmlError(504)]);
    let a = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(a.status, 502, "{a:?}");
    assert!(
        a.header("content-type").unwrap().starts_with("text/html"),
        "{a:?}"
    );
    assert!(a.body.contains("<title>502 Bad Gateway</title>"), "{a:?}");
    assert!(a.body.contains("<h1>502 Bad Gateway</h1>"), "{a:?}");
    assert!(a.body.contains("nginx"), "{a:?}");
    assert!(serde_json::from_str::<Value>(&a.body).is_err());
    let a = track(&c, &braze, KEY, &one_object()).await;
    assert_eq!(a.status, 504);
    assert!(
        a.body.contains("<title>504 Gateway Timeout</title>"),
        "{a:?}"
    );
    assert_eq!(braze.accepted_count(), 0);
}

#[tokio::test]
async fn braze_empty_attributes_is_400() {
    let (braze, c) = braze().await;
    let a = track(&c, &braze, KEY, &json!({"attributes": []})).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(
        a.json(),
        json!({"message": "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."})
    );
    assert_eq!((braze.request_count(), braze.accepted_count()), (1, 0));
    assert_eq!(braze.requests()[0].objects, 0);
}

#[tokio::test]
async fn braze_oversize_is_413_by_default_or_400() {
    let (braze, c) = braze().await;
    // Braze's 4 MB: a body just under it is read and accepted (past axum's own 2 MB default).
    let object = json!({"external_id": "u1", "looker_export": {"add": ["A"]}}).to_string();
    let pad = |total: usize| {
        let head = r#"{"attributes":["#;
        let tail = "]}";
        format!(
            "{head}{object}{}{tail}",
            " ".repeat(total - head.len() - object.len() - tail.len())
        )
    };
    let a = track_raw(&c, &braze, KEY, pad(4_000_000)).await;
    assert_eq!(a.status, 201, "{}", a.status);
    let a = track_raw(&c, &braze, KEY, pad(4_000_001)).await;
    assert_eq!(a.status, 413, "{}", a.status);

    braze.set_max_body_bytes(100);
    braze.set_oversize_status(400);
    let a = track_raw(&c, &braze, KEY, pad(101)).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(
        a.json(),
        json!({"message": "Request body too large: the payload exceeds the 4 MB limit"})
    );
    braze.set_oversize_status(413);
    assert_eq!(track_raw(&c, &braze, KEY, pad(101)).await.status, 413);
    assert_eq!(track_raw(&c, &braze, KEY, pad(100)).await.status, 201);
    assert_eq!((braze.request_count(), braze.accepted_count()), (5, 2));
}

// --- Looker ---

async fn looker_with(look: Look) -> (LookerSandbox, reqwest::Client, String) {
    let looker = LookerSandbox::start("id", "secret")
        .await
        .expect("looker sandbox");
    looker.add_look("1", look);
    let c = client();
    let token = login(&c, &looker).await;
    (looker, c, token)
}

async fn login(c: &reqwest::Client, looker: &LookerSandbox) -> String {
    let r = c
        .post(format!("{}/api/4.0/login", looker.url))
        .form(&[("client_id", "id"), ("client_secret", "secret")])
        .send()
        .await
        .expect("login answers");
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.expect("login body")).expect("login JSON");
    v["access_token"].as_str().expect("token").to_owned()
}

/// Runs Look 1 and returns, for each row, when it was seen (from the request's start), and
/// the whole body.
async fn run_timed(
    c: &reqwest::Client,
    looker: &LookerSandbox,
    token: &str,
) -> (Vec<Duration>, String) {
    const ROW: &str = r#"{"users.external_id":"#;
    let start = Instant::now();
    let mut r = c
        .get(format!("{}/api/4.0/looks/1/run/json_detail", looker.url))
        .header("authorization", format!("token {token}"))
        .send()
        .await
        .expect("run answers");
    assert_eq!(r.status(), 200);
    let mut body = Vec::new();
    let mut seen = Vec::new();
    while let Some(chunk) = r.chunk().await.expect("body streams") {
        body.extend_from_slice(&chunk);
        let rows = String::from_utf8_lossy(&body).matches(ROW).count();
        while seen.len() < rows {
            seen.push(start.elapsed());
        }
    }
    let body = String::from_utf8(body).expect("UTF-8 body");
    let parsed: Value = serde_json::from_str(&body).expect("complete JSON body");
    assert_eq!(parsed["data"].as_array().unwrap().len(), seen.len());
    (seen, body)
}

#[tokio::test]
async fn looker_stall_midway_sends_earlier_rows_first() {
    let mut look = Look::users(10, Generator::Clean);
    look.stall_after = Some((5, Duration::from_millis(800)));
    let (looker, c, token) = looker_with(look).await;
    let (seen, _) = run_timed(&c, &looker, &token).await;
    assert_eq!(seen.len(), 10);
    assert!(
        seen[4] < Duration::from_millis(700),
        "rows before the stall are held back: {seen:?}"
    );
    assert!(
        seen[5] - seen[4] >= Duration::from_millis(700),
        "no stall: {seen:?}"
    );
    assert!(
        seen[9] - seen[5] < Duration::from_millis(500),
        "full speed after the stall: {seen:?}"
    );
}

#[tokio::test]
async fn looker_slow_after_delays_every_further_row() {
    let mut look = Look::users(6, Generator::Clean);
    look.slow_after = Some((3, Duration::from_millis(150)));
    let (looker, c, token) = looker_with(look).await;
    let (seen, _) = run_timed(&c, &looker, &token).await;
    assert_eq!(seen.len(), 6);
    for i in 3..6 {
        assert!(
            seen[i] - seen[i - 1] >= Duration::from_millis(120),
            "row {i} not slowed: {seen:?}"
        );
    }
    assert!(seen[5] < Duration::from_secs(2), "{seen:?}");
}

#[tokio::test]
async fn looker_slow_and_stall_keep_the_body_intact() {
    let mut look = Look::users(400, Generator::Dirty);
    look.stall_after = Some((200, Duration::from_millis(50)));
    look.slow_after = Some((380, Duration::from_millis(10)));
    let plain = Look::users(400, Generator::Dirty);
    let (looker, c, token) = looker_with(look).await;
    let (seen, body) = run_timed(&c, &looker, &token).await;
    looker.add_look("1", plain);
    let (_, expected) = run_timed(&c, &looker, &token).await;
    assert_eq!(seen.len(), 400);
    assert_eq!(body, expected);
}

#[tokio::test]
async fn looker_trickle_sends_one_byte_at_a_time() {
    let mut look = Look::users(1000, Generator::Clean);
    look.trickle = Some(Duration::from_millis(20));
    let (looker, c, token) = looker_with(look).await;
    let mut r = c
        .get(format!("{}/api/4.0/looks/1/run/json_detail", looker.url))
        .header("authorization", format!("token {token}"))
        .send()
        .await
        .expect("run answers");
    assert_eq!(r.status(), 200);
    let mut body = Vec::new();
    let watch = Duration::from_millis(600);
    let start = Instant::now();
    while let Ok(chunk) =
        tokio::time::timeout(watch.saturating_sub(start.elapsed()), r.chunk()).await
    {
        let chunk = chunk.expect("body streams").expect("the body goes on");
        assert_eq!(chunk.len(), 1, "one byte at a time");
        body.extend_from_slice(&chunk);
    }
    assert!(
        (5..=40).contains(&body.len()),
        "about one byte per 20 ms: {} bytes in {watch:?}",
        body.len()
    );
    assert!(br#"{"status":"complete""#.starts_with(&body[..body.len().min(20)]));
}

#[tokio::test]
async fn looker_huge_array_cell_and_pivots_are_valid_json_of_the_asked_size() {
    let mut look = Look::users(3, Generator::Clean);
    look.huge_array_cell = Some((2, 100_000));
    look.huge_pivots = Some(200_000);
    let (looker, c, token) = looker_with(look).await;
    let (seen, body) = run_timed(&c, &looker, &token).await;
    assert_eq!(seen.len(), 3);
    let v: Value = serde_json::from_str(&body).unwrap();
    let cell = &v["data"][1]["users.first_name"]["value"];
    let text = cell.to_string().len();
    assert!((100_000..100_010).contains(&text), "{text} bytes");
    assert!(cell.as_array().unwrap().iter().all(|z| *z == 0));
    assert_eq!(v["data"][1]["users.external_id"]["value"], "user-0000002");
    assert_eq!(v["data"][2]["users.first_name"]["value"], "Margaret");
    let pivots = v["pivots"].to_string().len();
    assert!((200_000..201_000).contains(&pivots), "{pivots} bytes");
    assert_eq!(v["pivots"][0]["is_total"], false);
}

#[tokio::test]
async fn looker_latency_applies_to_login_and_run() {
    let (looker, c, token) = looker_with(Look::users(3, Generator::Clean)).await;
    looker.set_latency(Duration::from_millis(200));
    let start = Instant::now();
    login(&c, &looker).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let (seen, _) = run_timed(&c, &looker, &token).await;
    assert!(seen[0] >= Duration::from_millis(200), "{seen:?}");
}

#[tokio::test]
async fn braze_applies_add_and_remove_to_stored_arrays() {
    let (b, c) = braze().await;
    b.set_array("u9", "looker_export", &["OTHER"]);
    let add = json!({"attributes": [
        {"external_id": "u1", "_update_existing_only": true, "looker_export": {"add": ["A"]}},
        {"external_id": "u2", "looker_export": {"add": ["A", "B"]}},
        {"external_id": "u9", "looker_export": {"add": ["A"]}},
        {"braze_id": "b1", "looker_export": {"add": ["A"]}},
        {"user_alias": {"alias_name": "al", "alias_label": "looker"}, "looker_export": {"add": ["A"]}},
    ]});
    assert_eq!(track(&c, &b, KEY, &add).await.status, 201);
    let all: Vec<&str> = vec!["al", "b1", "u1", "u2", "u9"];
    assert_eq!(
        b.segment("looker_export", "A"),
        all.iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(b.array("u9", "looker_export").unwrap(), ["OTHER", "A"]);
    let remove = json!({"attributes": [
        {"external_id": "u1", "_update_existing_only": true, "looker_export": {"remove": ["A"]}},
        {"external_id": "u9", "looker_export": {"remove": ["A"]}},
        {"external_id": "u2", "looker_export": {"add": ["A"]}},
    ]});
    assert_eq!(track(&c, &b, KEY, &remove).await.status, 201);
    let left: Vec<String> = b.segment("looker_export", "A").into_iter().collect();
    assert_eq!(left, ["al", "b1", "u2"]);
    assert_eq!(b.array("u9", "looker_export").unwrap(), ["OTHER"]);
    assert_eq!(
        b.array("u2", "looker_export").unwrap(),
        ["B", "A"],
        "re-adding moves it to the end"
    );
    assert_eq!(
        b.array("u1", "looker_export").unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(b.requests().len(), 2, "requests are still recorded");

    // Rejected objects, refused requests and failing identifiers change nothing.
    b.reject_id("u1");
    let rejected = json!({"attributes": [
        {"external_id": "u1", "looker_export": {"add": ["A"]}},
        {"external_id": "u3", "looker_export": {"add": ["A"]}},
    ]});
    assert_eq!(track(&c, &b, KEY, &rejected).await.status, 201);
    b.set_failing_ids(&["u4"]);
    let failing = json!({"attributes": [
        {"external_id": "u4", "looker_export": {"add": ["A"]}},
        {"external_id": "u5", "looker_export": {"add": ["A"]}},
    ]});
    assert_eq!(track(&c, &b, KEY, &failing).await.status, 503);
    b.inject([Fault::Status(500)]);
    assert_eq!(track(&c, &b, KEY, &failing).await.status, 500);
    let left: Vec<String> = b.segment("looker_export", "A").into_iter().collect();
    assert_eq!(left, ["al", "b1", "u2", "u3"]);
    b.set_failing_ids(&[]);
    assert_eq!(track(&c, &b, KEY, &failing).await.status, 201);
    assert!(b.segment("looker_export", "A").contains("u4"));
}

/// `GET /looks/{id}` answers the Look's saved row limit as `query.limit` (a string, or what
/// `query_limit` says), and a `results: Table` run is cut there and ends cleanly.
#[tokio::test]
async fn looker_serves_the_look_s_row_limit_and_cuts_a_table_run_at_it() {
    let mut look = Look::users(30, Generator::Clean);
    look.table_limit = 12;
    let (looker, c, token) = looker_with(look).await;
    let get = |path: &str, token: &str| {
        c.get(format!("{}/api/4.0/{path}", looker.url))
            .header("authorization", format!("token {token}"))
            .send()
    };
    let r = get("looks/1?fields=query(limit)", &token).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["query"]["limit"], "12");
    assert_eq!(get("looks/1", "wrong").await.unwrap().status(), 401);
    assert_eq!(get("looks/2", &token).await.unwrap().status(), 404);
    let (seen, body) = run_timed(&c, &looker, &token).await;
    assert_eq!(seen.len(), 12, "cut at the Look's limit");
    assert!(body.trim_end().ends_with('}'), "the cut body ends cleanly");
    let all = get("looks/1/run/json_detail?limit=-1", &token)
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&all.text().await.unwrap()).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 30);

    let mut unsaved = Look::users(3, Generator::Clean);
    unsaved.query_limit = Some(Value::Null);
    looker.add_look("1", unsaved);
    let v: Value =
        serde_json::from_str(&get("looks/1", &token).await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(v["query"]["limit"], Value::Null);
    assert_eq!(
        looker.requests_to("/looks/1")[0].query,
        [("fields".to_owned(), "query(limit)".to_owned())]
    );
}
