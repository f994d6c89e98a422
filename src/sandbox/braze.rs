//! Sandbox Braze `/users/track`: Bearer auth, the 75-object limit, per-object `errors`,
//! 401/403, 413 (or 400) over 4 MB, per-key fixed-window rate limiting with Braze's headers
//! (on by default), latency, and injectable faults. Accepted objects are applied to stored
//! users: array attributes take `add` and `remove` (and whole arrays), other attributes keep
//! the value last sent, so tests and `demo` can read a segment (the users whose array holds
//! a value) and each user's attributes after each run.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Braze's limit of attributes objects per request.
pub const MAX_OBJECTS: usize = 75;

/// Braze's request body limit (4 MB), the sandbox's default.
pub const MAX_BODY_BYTES: usize = 4_000_000;

/// Braze's default burst limit per key: 3,000 requests per 3 s.
pub const DEFAULT_RATE_LIMIT: (u64, Duration) = (3000, Duration::from_secs(3));

/// Bodies the server reads at all (larger ones get axum's own 413).
const READ_LIMIT: usize = 64 * 1024 * 1024;

const EMPTY_MESSAGE: &str =
    "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.";

/// A fault the next request gets instead of (or before) its normal answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status.
    Status(u16),
    /// Answer 429 with `X-Ratelimit-Retry-After` in seconds.
    RateLimited { retry_after: u64 },
    /// Wait, then answer normally.
    Slow(Duration),
    /// Drop the connection without a complete answer.
    Drop,
    /// Answer 429 with no wait header at all.
    RateLimitedNoHeader,
    /// Answer 429 whose only header is `X-RateLimit-Reset`, an epoch time 5 s in the past.
    RateLimitedPastReset,
    /// Answer this status with an HTML body (`text/html`), as a load balancer does.
    HtmlError(u16),
}

/// How `X-RateLimit-Reset` is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResetForm {
    /// Epoch seconds of the window's end (Braze's `api_limits` wording).
    #[default]
    Epoch,
    /// Seconds until the window's end, rounded up (the MAU contracts' wording).
    SecondsToGo,
}

/// One request the sandbox received and what it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct TrackRequest {
    /// `Authorization` header.
    pub authorization: Option<String>,
    /// `Content-Type` header.
    pub content_type: Option<String>,
    /// The body as JSON (`Null` when not recorded or not JSON).
    pub body: Value,
    /// Objects in the body.
    pub objects: usize,
    /// Status answered.
    pub status: u16,
    /// Indexes listed in the answer's `errors`.
    pub rejected: Vec<usize>,
}

impl TrackRequest {
    /// The attributes objects Braze accepted from this request.
    pub fn accepted(&self) -> Vec<Value> {
        if !(200..300).contains(&self.status) {
            return Vec::new();
        }
        let all = self.body["attributes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        all.into_iter()
            .enumerate()
            .filter(|(i, _)| !self.rejected.contains(i))
            .map(|(_, o)| o)
            .collect()
    }
}

#[derive(Debug)]
struct Window {
    start_ms: u64,
    used: u64,
}

#[derive(Debug)]
struct Limits {
    /// Requests per window and the window's length in ms; `None` is no limit.
    limit: Option<(u64, u64)>,
    /// Each key's current window.
    windows: HashMap<String, Window>,
}

impl Limits {
    fn new(limit: Option<(u64, Duration)>) -> Self {
        Self {
            limit: limit.map(|(n, period)| (n, period.as_millis().max(1) as u64)),
            windows: HashMap::new(),
        }
    }
}

#[derive(Debug)]
struct BrazeState {
    api_keys: Mutex<HashSet<String>>,
    forbidden_keys: Mutex<HashSet<String>>,
    limits: Mutex<Limits>,
    reset_form: Mutex<ResetForm>,
    latency: Mutex<(Duration, Duration)>,
    /// Extra latency per request in flight, in ns (see `set_latency_per_in_flight`).
    latency_per_in_flight: AtomicU64,
    faults: Mutex<VecDeque<Fault>>,
    reject_ids: Mutex<HashSet<String>>,
    failing_ids: Mutex<HashSet<String>>,
    max_body_bytes: AtomicUsize,
    oversize_status: AtomicU16,
    record: AtomicBool,
    requests: Mutex<Vec<TrackRequest>>,
    store: AtomicBool,
    users: Mutex<HashMap<UserKey, StoredUser>>,
    request_count: AtomicU64,
    accepted_count: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Counts a request as in flight while alive.
struct InFlight<'a>(&'a BrazeState);

impl<'a> InFlight<'a> {
    /// Enters, with the number in flight counting this one.
    fn enter(state: &'a BrazeState) -> (Self, usize) {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        (Self(state), now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running sandbox Braze.
#[derive(Debug)]
pub struct BrazeSandbox {
    /// REST endpoint (`http://127.0.0.1:PORT`).
    pub url: String,
    state: Arc<BrazeState>,
    task: JoinHandle<()>,
}

impl Drop for BrazeSandbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl BrazeSandbox {
    /// Starts a Braze that accepts `api_key`, with Braze's default rate limit per key
    /// ([`DEFAULT_RATE_LIMIT`]), no latency and no faults.
    pub async fn start(api_key: &str) -> io::Result<Self> {
        let state = Arc::new(BrazeState {
            api_keys: Mutex::new(HashSet::from([api_key.to_owned()])),
            forbidden_keys: Mutex::default(),
            limits: Mutex::new(Limits::new(Some(DEFAULT_RATE_LIMIT))),
            reset_form: Mutex::default(),
            latency: Mutex::default(),
            latency_per_in_flight: AtomicU64::new(0),
            faults: Mutex::default(),
            reject_ids: Mutex::default(),
            failing_ids: Mutex::default(),
            max_body_bytes: AtomicUsize::new(MAX_BODY_BYTES),
            oversize_status: AtomicU16::new(413),
            record: AtomicBool::new(true),
            requests: Mutex::default(),
            store: AtomicBool::new(true),
            users: Mutex::default(),
            request_count: AtomicU64::new(0),
            accepted_count: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/users/track", post(track))
            .layer(DefaultBodyLimit::max(READ_LIMIT))
            .with_state(Arc::clone(&state));
        let (addr, task) = super::listen::serve(router).await?;
        Ok(Self {
            url: format!("http://{addr}"),
            state,
            task,
        })
    }

    /// Enforces `limit` requests per fixed window of `period` (aligned to the epoch) for each
    /// API key separately, as Braze does; `None` turns the limit off. Starts fresh windows.
    pub fn set_rate_limit(&self, limit: Option<(u64, Duration)>) {
        *lock(&self.state.limits) = Limits::new(limit);
    }

    /// How `X-RateLimit-Reset` is written on answers that carry the rate-limit headers
    /// (default [`ResetForm::Epoch`]).
    pub fn set_reset_form(&self, form: ResetForm) {
        *lock(&self.state.reset_form) = form;
    }

    /// Every request is answered no sooner than `fixed` plus a uniform random share of
    /// `jitter` after it arrived (requests still run concurrently). Default zero.
    pub fn set_latency(&self, fixed: Duration, jitter: Duration) {
        *lock(&self.state.latency) = (fixed, jitter);
    }

    /// A Braze that slows under load: every request also waits `per_in_flight` times the
    /// requests in flight when it arrived (itself included), on top of [`Self::set_latency`].
    /// So `n` in flight take `fixed + n × per_in_flight` each, and no number in flight gets
    /// more than one request per `per_in_flight` through. Default zero.
    pub fn set_latency_per_in_flight(&self, per_in_flight: Duration) {
        let nanos = u64::try_from(per_in_flight.as_nanos()).unwrap_or(u64::MAX);
        self.state
            .latency_per_in_flight
            .store(nanos, Ordering::Relaxed);
    }

    /// Queues faults for the next requests, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.faults).extend(faults);
    }

    /// Also accepts `key` (another key of the workspace), with its own rate-limit window.
    pub fn add_key(&self, key: &str) {
        lock(&self.state.api_keys).insert(key.into());
    }

    /// Requests with this key get 403 (a key without `users.track`).
    pub fn forbid_key(&self, key: &str) {
        lock(&self.state.forbidden_keys).insert(key.into());
    }

    /// Objects with this identifier are listed in `errors` (blacklisted).
    pub fn reject_id(&self, id: &str) {
        lock(&self.state.reject_ids).insert(id.into());
    }

    /// Requests holding an object with one of these identifiers get 503, every time (until
    /// the set is replaced): the whole batch fails after its retries. Replaces the set.
    pub fn set_failing_ids(&self, ids: &[&str]) {
        *lock(&self.state.failing_ids) = ids.iter().map(|i| (*i).to_owned()).collect();
    }

    /// Bodies larger than this get the oversize answer (default [`MAX_BODY_BYTES`]).
    pub fn set_max_body_bytes(&self, n: usize) {
        self.state.max_body_bytes.store(n, Ordering::Relaxed);
    }

    /// Status of the oversize answer: 413 (default) or 400 with Braze's "Request body too
    /// large" message (any other status is sent with the 413 body).
    pub fn set_oversize_status(&self, status: u16) {
        self.state.oversize_status.store(status, Ordering::Relaxed);
    }

    /// The most requests the sandbox was handling at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Starts [`Self::max_in_flight`] over from the requests in flight now (between the
    /// scenarios of a benchmark).
    pub fn reset_max_in_flight(&self) {
        let now = self.state.in_flight.load(Ordering::SeqCst);
        self.state.max_in_flight.store(now, Ordering::SeqCst);
    }

    /// Whether to keep every request (off for benchmarks; counters always run).
    pub fn set_recording(&self, on: bool) {
        self.state.record.store(on, Ordering::Relaxed);
    }

    /// Whether accepted objects are applied to stored users (on by default; off for
    /// benchmarks of a million users).
    pub fn set_storing(&self, on: bool) {
        self.state.store.store(on, Ordering::Relaxed);
    }

    /// The segment `attribute includes value`: the identifiers (external id, Braze id or
    /// alias name) of the stored users whose array `attribute` holds `value`.
    pub fn segment(&self, attribute: &str, value: &str) -> BTreeSet<String> {
        lock(&self.state.users)
            .iter()
            .filter(|(_, user)| {
                user.arrays
                    .get(attribute)
                    .is_some_and(|a| a.iter().any(|v| v == value))
            })
            .map(|(k, _)| k.id.clone())
            .collect()
    }

    /// The array `attribute` of the user with this external id, as stored (`None` when the
    /// user or the attribute was never written).
    pub fn array(&self, external_id: &str, attribute: &str) -> Option<Vec<String>> {
        lock(&self.state.users)
            .get(&UserKey::external(external_id))?
            .arrays
            .get(attribute)
            .cloned()
    }

    /// A non-array attribute of the user with this external id, as last sent (`None` when
    /// never sent).
    pub fn attribute(&self, external_id: &str, name: &str) -> Option<Value> {
        lock(&self.state.users)
            .get(&UserKey::external(external_id))?
            .scalars
            .get(name)
            .cloned()
    }

    /// Sets the array `attribute` of the user with this external id, as someone else (a
    /// marketer in the dashboard, another integration) would.
    pub fn set_array(&self, external_id: &str, attribute: &str, values: &[&str]) {
        lock(&self.state.users)
            .entry(UserKey::external(external_id))
            .or_default()
            .arrays
            .insert(
                attribute.to_owned(),
                values.iter().map(|v| (*v).to_owned()).collect(),
            );
    }

    /// Every recorded request.
    pub fn requests(&self) -> Vec<TrackRequest> {
        lock(&self.state.requests).clone()
    }

    /// Every accepted object, in the order requests were answered.
    pub fn accepted(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .flat_map(TrackRequest::accepted)
            .collect()
    }

    /// Requests received (recorded or not).
    pub fn request_count(&self) -> u64 {
        self.state.request_count.load(Ordering::Relaxed)
    }

    /// Objects accepted (recorded or not).
    pub fn accepted_count(&self) -> u64 {
        self.state.accepted_count.load(Ordering::Relaxed)
    }
}

/// What the sandbox keeps of a user: array attributes (as `add`/`remove` leave them) and
/// every other attribute as last sent.
#[derive(Clone, Debug, Default)]
struct StoredUser {
    arrays: HashMap<String, Vec<String>>,
    scalars: HashMap<String, Value>,
}

/// A stored user: the kind of identifier (`user_alias` with its label) and the id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct UserKey {
    kind: String,
    id: String,
}

impl UserKey {
    fn external(id: &str) -> Self {
        Self {
            kind: "external_id".into(),
            id: id.into(),
        }
    }

    fn of(object: &Value) -> Option<Self> {
        if let Some(id) = object.get("external_id").and_then(Value::as_str) {
            return Some(Self::external(id));
        }
        if let Some(id) = object.get("braze_id").and_then(Value::as_str) {
            return Some(Self {
                kind: "braze_id".into(),
                id: id.into(),
            });
        }
        let alias = object.get("user_alias")?;
        Some(Self {
            kind: format!("user_alias/{}", alias.get("alias_label")?.as_str()?),
            id: alias.get("alias_name")?.as_str()?.to_owned(),
        })
    }
}

/// Applies the accepted objects of a request to the stored users: an array attribute
/// given as `{"add": [...], "remove": [...]}` loses the removed values and gains the added
/// ones (a value is kept once, and re-adding it moves it to the end, as in Braze); an array
/// replaces the attribute. Other attributes are not stored.
fn apply(users: &mut HashMap<UserKey, StoredUser>, objects: &[Value]) {
    const IDS: [&str; 4] = [
        "external_id",
        "braze_id",
        "user_alias",
        "_update_existing_only",
    ];
    for object in objects {
        let (Some(key), Some(fields)) = (UserKey::of(object), object.as_object()) else {
            continue;
        };
        let user = users.entry(key).or_default();
        for (name, value) in fields.iter().filter(|(n, _)| !IDS.contains(&n.as_str())) {
            let strings = |v: Option<&Value>| -> Vec<String> {
                v.and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            match value {
                Value::Array(_) => {
                    user.arrays.insert(name.clone(), strings(Some(value)));
                }
                Value::Object(ops) => {
                    let array = user.arrays.entry(name.clone()).or_default();
                    let remove = strings(ops.get("remove"));
                    array.retain(|v| !remove.contains(v));
                    for v in strings(ops.get("add")) {
                        array.retain(|x| *x != v);
                        array.push(v);
                    }
                }
                other => {
                    user.scalars.insert(name.clone(), other.clone());
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct TrackBody {
    attributes: Vec<ObjectIds>,
}

#[derive(Deserialize)]
struct ObjectIds {
    external_id: Option<Value>,
    braze_id: Option<Value>,
    user_alias: Option<Value>,
}

impl ObjectIds {
    /// The identifier, or the error Braze would list.
    fn identifier(&self) -> Result<String, &'static str> {
        const REQUIRED: &str = "'external_id' or 'braze_id' or 'user_alias' is required";
        let alias = self.user_alias.as_ref().and_then(|a| {
            (a["alias_label"].is_string())
                .then(|| a["alias_name"].as_str().map(str::to_owned))
                .flatten()
        });
        let ids = [
            self.external_id
                .as_ref()
                .and_then(|v| v.as_str().map(str::to_owned)),
            self.braze_id
                .as_ref()
                .and_then(|v| v.as_str().map(str::to_owned)),
            alias,
        ];
        let present = [
            self.external_id.is_some(),
            self.braze_id.is_some(),
            self.user_alias.is_some(),
        ];
        match (
            present.iter().filter(|p| **p).count(),
            ids.into_iter().flatten().next(),
        ) {
            (1, Some(id)) => Ok(id),
            (n, _) if n > 1 => {
                Err("only one of 'external_id', 'braze_id' or 'user_alias' may be given")
            }
            _ => Err(REQUIRED),
        }
    }
}

fn json_response(status: StatusCode, body: Value, extra: &[(&'static str, String)]) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    for (k, v) in extra {
        if let Ok(v) = HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
    r
}

async fn track(State(state): State<Arc<BrazeState>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = tokio::time::Instant::now();
    let (_in_flight, in_flight) = InFlight::enter(&state);
    let (fixed, jitter) = *lock(&state.latency);
    let per_in_flight = state.latency_per_in_flight.load(Ordering::Relaxed);
    let load = Duration::from_nanos(per_in_flight.saturating_mul(in_flight as u64));
    let jitter = match jitter.as_nanos() as u64 {
        0 => Duration::ZERO,
        n => Duration::from_nanos(fastrand::u64(0..n)),
    };
    state.request_count.fetch_add(1, Ordering::Relaxed);
    let h = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = h(header::AUTHORIZATION);
    let mut log = TrackRequest {
        authorization: authorization.clone(),
        content_type: h(header::CONTENT_TYPE),
        body: Value::Null,
        objects: 0,
        status: 0,
        rejected: vec![],
    };
    let parsed = serde_json::from_slice::<TrackBody>(&body).ok();
    log.objects = parsed.as_ref().map_or(0, |b| b.attributes.len());
    let response = answer(
        &state,
        authorization.as_deref(),
        body.len(),
        parsed,
        &mut log,
    )
    .await;
    log.status = response.status().as_u16();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/json");
    // A dropped connection (no JSON answer) was not processed.
    if state.store.load(Ordering::Relaxed) && (200..300).contains(&log.status) && json {
        let objects = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|mut b| b.get_mut("attributes").map(Value::take))
            .and_then(|a| match a {
                Value::Array(list) => Some(list),
                _ => None,
            })
            .unwrap_or_default();
        let accepted: Vec<Value> = objects
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !log.rejected.contains(i))
            .map(|(_, o)| o)
            .collect();
        apply(&mut lock(&state.users), &accepted);
    }
    if state.record.load(Ordering::Relaxed) {
        if log.body.is_null() {
            log.body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        }
        lock(&state.requests).push(log);
    }
    tokio::time::sleep_until(arrived + fixed + jitter + load).await;
    response
}

fn html_response(status: StatusCode) -> Response {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    (status, [(header::CONTENT_TYPE, "text/html")], body).into_response()
}

async fn answer(
    state: &BrazeState,
    authorization: Option<&str>,
    body_len: usize,
    parsed: Option<TrackBody>,
    log: &mut TrackRequest,
) -> Response {
    let key = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !lock(&state.api_keys).contains(key) && !lock(&state.forbidden_keys).contains(key) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"message": "Invalid API key"}),
            &[],
        );
    }
    if lock(&state.forbidden_keys).contains(key) {
        return json_response(
            StatusCode::FORBIDDEN,
            json!({"message": "Access Denied"}),
            &[],
        );
    }
    let fault = lock(&state.faults).pop_front();
    match fault {
        Some(Fault::Status(s)) => {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return json_response(status, json!({"message": "Internal Server Error"}), &[]);
        }
        Some(Fault::RateLimited { retry_after }) => {
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"message": "Over rate limit"}),
                &[("x-ratelimit-retry-after", retry_after.to_string())],
            );
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::Drop) => {
            let broken = futures_util::stream::once(async {
                Err::<Bytes, _>(io::Error::other("sandbox dropped the connection"))
            });
            return Response::new(Body::from_stream(broken));
        }
        Some(Fault::RateLimitedNoHeader) => {
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"message": "Over rate limit"}),
                &[],
            );
        }
        Some(Fault::RateLimitedPastReset) => {
            let past = (now_ms() / 1000).saturating_sub(5);
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"message": "Over rate limit"}),
                &[("x-ratelimit-reset", past.to_string())],
            );
        }
        Some(Fault::HtmlError(s)) => {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY);
            return html_response(status);
        }
        None => {}
    }
    let mut limit_headers = Vec::new();
    let mut limits = lock(&state.limits);
    if let Some((limit, period_ms)) = limits.limit {
        let now = now_ms();
        let start = now - now % period_ms;
        let w = limits.windows.entry(key.to_owned()).or_insert(Window {
            start_ms: start,
            used: 0,
        });
        if start != w.start_ms {
            w.start_ms = start;
            w.used = 0;
        }
        let reset_ms = start + period_ms;
        if w.used >= limit {
            let retry = (reset_ms - now).div_ceil(1000).max(1);
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"message": "Over rate limit"}),
                &[("x-ratelimit-retry-after", retry.to_string())],
            );
        }
        w.used += 1;
        let reset = match *lock(&state.reset_form) {
            ResetForm::Epoch => reset_ms.div_ceil(1000),
            ResetForm::SecondsToGo => (reset_ms - now).div_ceil(1000),
        };
        limit_headers = vec![
            ("x-ratelimit-limit", limit.to_string()),
            ("x-ratelimit-remaining", (limit - w.used).to_string()),
            ("x-ratelimit-reset", reset.to_string()),
        ];
    }
    drop(limits);
    if body_len > state.max_body_bytes.load(Ordering::Relaxed) {
        return match state.oversize_status.load(Ordering::Relaxed) {
            400 => json_response(
                StatusCode::BAD_REQUEST,
                json!({"message": "Request body too large: the payload exceeds the 4 MB limit"}),
                &limit_headers,
            ),
            s => json_response(
                StatusCode::from_u16(s).unwrap_or(StatusCode::PAYLOAD_TOO_LARGE),
                json!({"message": "Payload Too Large"}),
                &limit_headers,
            ),
        };
    }
    let Some(parsed) = parsed.filter(|p| !p.attributes.is_empty()) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"message": EMPTY_MESSAGE}),
            &limit_headers,
        );
    };
    let failing = lock(&state.failing_ids);
    if !failing.is_empty()
        && parsed
            .attributes
            .iter()
            .any(|o| o.identifier().is_ok_and(|id| failing.contains(&id)))
    {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"message": "Service Unavailable"}),
            &limit_headers,
        );
    }
    drop(failing);
    if parsed.attributes.len() > MAX_OBJECTS {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"message": "Max Input Length Exceeded"}),
            &limit_headers,
        );
    }
    let rejected_ids = lock(&state.reject_ids);
    let mut errors = Vec::new();
    for (index, object) in parsed.attributes.iter().enumerate() {
        let kind = match object.identifier() {
            Ok(id) if rejected_ids.contains(&id) => {
                "provided external_id is blacklisted and disallowed"
            }
            Ok(_) => continue,
            Err(kind) => kind,
        };
        errors.push(json!({"type": kind, "input_array": "attributes", "index": index}));
        log.rejected.push(index);
    }
    drop(rejected_ids);
    let ok = parsed.attributes.len() - errors.len();
    if ok == 0 && !errors.is_empty() {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"message": EMPTY_MESSAGE, "errors": errors}),
            &limit_headers,
        );
    }
    state.accepted_count.fetch_add(ok as u64, Ordering::Relaxed);
    let mut answer = json!({"message": "success", "attributes_processed": ok});
    if !errors.is_empty() {
        answer["errors"] = Value::Array(errors);
    }
    json_response(StatusCode::CREATED, answer, &limit_headers)
}
