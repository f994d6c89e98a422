//! Sandbox Braze `/users/track`: Bearer auth, the 75-object limit, per-object `errors`,
//! 401/403, 413, fixed-window rate limiting with Braze's headers, and injectable faults.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Braze's limit of attributes objects per request.
pub const MAX_OBJECTS: usize = 75;

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
    limit: u64,
    period_ms: u64,
    start_ms: u64,
    used: u64,
}

#[derive(Debug)]
struct BrazeState {
    api_key: String,
    forbidden_keys: Mutex<HashSet<String>>,
    window: Mutex<Option<Window>>,
    faults: Mutex<VecDeque<Fault>>,
    reject_ids: Mutex<HashSet<String>>,
    max_body_bytes: AtomicUsize,
    record: AtomicBool,
    requests: Mutex<Vec<TrackRequest>>,
    request_count: AtomicU64,
    accepted_count: AtomicU64,
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
    /// Starts a Braze that accepts `api_key`, with no rate limit and no faults.
    pub async fn start(api_key: &str) -> io::Result<Self> {
        let state = Arc::new(BrazeState {
            api_key: api_key.into(),
            forbidden_keys: Mutex::default(),
            window: Mutex::new(None),
            faults: Mutex::default(),
            reject_ids: Mutex::default(),
            max_body_bytes: AtomicUsize::new(4 * 1024 * 1024),
            record: AtomicBool::new(true),
            requests: Mutex::default(),
            request_count: AtomicU64::new(0),
            accepted_count: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/users/track", post(track))
            .with_state(Arc::clone(&state));
        let (addr, task) = super::serve(router).await?;
        Ok(Self {
            url: format!("http://{addr}"),
            state,
            task,
        })
    }

    /// Enforces `limit` requests per fixed window of `period` (aligned to the epoch), as
    /// Braze does; `None` turns the limit off.
    pub fn set_rate_limit(&self, limit: Option<(u64, Duration)>) {
        *lock(&self.state.window) = limit.map(|(limit, period)| Window {
            limit,
            period_ms: period.as_millis().max(1) as u64,
            start_ms: 0,
            used: 0,
        });
    }

    /// Queues faults for the next requests, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.faults).extend(faults);
    }

    /// Requests with this key get 403 (a key without `users.track`).
    pub fn forbid_key(&self, key: &str) {
        lock(&self.state.forbidden_keys).insert(key.into());
    }

    /// Objects with this identifier are listed in `errors` (blacklisted).
    pub fn reject_id(&self, id: &str) {
        lock(&self.state.reject_ids).insert(id.into());
    }

    /// Bodies larger than this get 413.
    pub fn set_max_body_bytes(&self, n: usize) {
        self.state.max_body_bytes.store(n, Ordering::Relaxed);
    }

    /// Whether to keep every request (off for benchmarks; counters always run).
    pub fn set_recording(&self, on: bool) {
        self.state.record.store(on, Ordering::Relaxed);
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
    if state.record.load(Ordering::Relaxed) {
        if log.body.is_null() {
            log.body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        }
        lock(&state.requests).push(log);
    }
    response
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
    if key != state.api_key && !lock(&state.forbidden_keys).contains(key) {
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
        None => {}
    }
    let mut limit_headers = Vec::new();
    if let Some(w) = lock(&state.window).as_mut() {
        let now = now_ms();
        let start = now - now % w.period_ms;
        if start != w.start_ms {
            w.start_ms = start;
            w.used = 0;
        }
        let reset_ms = start + w.period_ms;
        if w.used >= w.limit {
            let retry = (reset_ms - now).div_ceil(1000).max(1);
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"message": "Over rate limit"}),
                &[("x-ratelimit-retry-after", retry.to_string())],
            );
        }
        w.used += 1;
        limit_headers = vec![
            ("x-ratelimit-limit", w.limit.to_string()),
            ("x-ratelimit-remaining", (w.limit - w.used).to_string()),
            ("x-ratelimit-reset", reset_ms.div_ceil(1000).to_string()),
        ];
    }
    if body_len > state.max_body_bytes.load(Ordering::Relaxed) {
        return json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"message": "Payload Too Large"}),
            &limit_headers,
        );
    }
    let Some(parsed) = parsed else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"message": "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."}),
            &limit_headers,
        );
    };
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
            json!({"message": "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.", "errors": errors}),
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
