//! Sandbox Looker API 4.0: `POST /login`, `GET /looks/{id}` (the Look's query and its row
//! limit) and `GET /looks/{id}/run/json_detail`, streamed in
//! the shape of a real result, for any number of generated rows, with optional latency and
//! bodies that slow down, stall or trickle, and with oversized parts (an array cell or a
//! `pivots` section of any size, streamed without being held). Login, the Look and the run can be made to give any answer
//! (a status, a JSON or HTML body, a redirect), and requests to any other path are recorded
//! too (answered 404), so a test can show that nothing was sent somewhere it should not be.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Rows of a sandbox Look.
#[derive(Clone, Debug)]
pub enum Rows {
    /// These row objects, as they appear in `data`.
    Fixed(Vec<Value>),
    /// Rows as raw JSON text, sent verbatim (for numbers no `Value` can hold, such as a
    /// 21-digit id, or rows that are not objects).
    Raw(Vec<String>),
    /// `count` rows made on the fly (never held in memory).
    Generated { count: u64, generator: Generator },
}

/// Generated row kinds (see [`Look::users`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    /// Row i has id `user-<i>` (zero-padded to 7 digits), a first name and an order count.
    Clean,
    /// Like `Clean`, but every 50th row repeats the previous id and every 125th has no id.
    Dirty,
    /// Like `Clean`, with ids shifted: row i has id `user-<i + n>` (an audience that moved on
    /// by n users).
    Shifted(u64),
    /// Row i has a random-looking UUID (version 4, lower case) made from `i + n`, and an
    /// order count: no attribute (see [`Look::uuids`]).
    Uuid(u64),
}

/// A Look the sandbox can run.
#[derive(Clone, Debug)]
pub struct Look {
    /// The `fields` object of the result.
    pub fields: Value,
    /// The rows.
    pub rows: Rows,
    /// The Look's own row limit, applied when the request has no `limit`; also what
    /// `GET /looks/{id}` answers as `query.limit` (a string), unless [`Look::query_limit`].
    pub table_limit: u64,
    /// `query.limit` as `GET /looks/{id}` answers it instead (`null`, `""`, …), for a Look
    /// whose saved limit is absent or odd; `None`: `table_limit` as a string.
    pub query_limit: Option<Value>,
    /// Top-level `pivots` to send (pivoted Looks).
    pub pivots: Option<Value>,
    /// Top-level `errors` to send with an empty `data` (SQL errors).
    pub errors: Option<Value>,
    /// Drop the connection after this many rows.
    pub cut_after: Option<u64>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// After this many rows, wait the duration before each further row (rows still stream).
    pub slow_after: Option<(u64, Duration)>,
    /// After this many rows, send nothing for the duration once, then go on at full speed.
    pub stall_after: Option<(u64, Duration)>,
    /// `(row, bytes)`: generated row `row` (counted from 1) carries as its `users.first_name`
    /// value an array `[0,0,…]` of about `bytes` bytes, streamed (never held in memory).
    /// Only for [`Rows::Generated`].
    pub huge_array_cell: Option<(u64, u64)>,
    /// A top-level `pivots` array of about this many bytes (entries shaped like Looker's),
    /// streamed before `data`; it replaces [`Look::pivots`].
    pub huge_pivots: Option<u64>,
    /// Send the whole body one byte at a time, waiting this long before each byte.
    pub trickle: Option<Duration>,
}

const NAMES: [&str; 8] = [
    "Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances",
];

impl Look {
    /// A Look with these fields and rows, no limit below 5,000 rows.
    pub fn new(fields: Value, rows: Rows) -> Self {
        Self {
            fields,
            rows,
            table_limit: 5000,
            query_limit: None,
            pivots: None,
            errors: None,
            cut_after: None,
            delay: None,
            slow_after: None,
            stall_after: None,
            huge_array_cell: None,
            huge_pivots: None,
            trickle: None,
        }
    }

    /// The users Look: `users.external_id` tagged `braze_id`, `users.first_name` tagged
    /// `braze[first_name]`, and the untagged measure `orders.count`.
    pub fn users(count: u64, generator: Generator) -> Self {
        Self::new(users_fields(), Rows::Generated { count, generator })
    }

    /// The UUID users Look: `users.external_id` tagged `braze_id`, holding random-looking
    /// UUIDs (row i: the UUID of `i + shift`), and the untagged measure `orders.count`; no
    /// attribute.
    pub fn uuids(count: u64, shift: u64) -> Self {
        let mut fields = users_fields();
        if let Some(d) = fields["dimensions"].as_array_mut() {
            d.truncate(1);
        }
        Self::new(
            fields,
            Rows::Generated {
                count,
                generator: Generator::Uuid(shift),
            },
        )
    }

    fn total(&self) -> u64 {
        match &self.rows {
            Rows::Fixed(r) => r.len() as u64,
            Rows::Raw(r) => r.len() as u64,
            Rows::Generated { count, .. } => *count,
        }
    }
}

/// Fields of [`Look::users`], shaped like Looker's (with the usual extra keys).
pub fn users_fields() -> Value {
    let field = |name: &str, label: &str, tags: &[&str], measure: bool| {
        json!({"name": name, "label": label, "label_short": label, "tags": tags, "view": name.split('.').next(),
               "type": if measure {"count"} else {"string"}, "measure": measure, "hidden": false,
               "is_numeric": measure, "sortable": true, "can_filter": true, "suggestable": !measure,
               "lookml_link": format!("/projects/sandbox/files/{}.view.lkml", name.split('.').next().unwrap_or("")),
               "enumerations": null, "value_format": null, "error": null})
    };
    json!({
        "measures": [field("orders.count", "Orders Count", &[], true)],
        "dimensions": [
            field("users.external_id", "Users External ID", &["braze_id"], false),
            field("users.first_name", "Users First Name", &["braze[first_name]"], false),
        ],
        "table_calculations": [],
        "pivots": []
    })
}

fn generated_row(i: u64, generator: Generator, out: &mut String) {
    use std::fmt::Write;
    generated_id(i, generator, out);
    if let Generator::Uuid(_) = generator {
        let _ = write!(out, r#""orders.count":{{"value":{}}}}}"#, i % 7);
        return;
    }
    let name = NAMES[(i % NAMES.len() as u64) as usize];
    let _ = write!(
        out,
        r#""users.first_name":{{"value":"{name}","rendered":"{name}"}},"orders.count":{{"value":{}}}}}"#,
        i % 7
    );
}

/// The start of generated row `i`, up to its identifier cell and the comma after it.
fn generated_id(i: u64, generator: Generator, out: &mut String) {
    use std::fmt::Write;
    if let Generator::Uuid(n) = generator {
        let _ = write!(
            out,
            r#"{{"users.external_id":{{"value":"{}"}},"#,
            uuid(i + n)
        );
        return;
    }
    let id = match generator {
        Generator::Dirty if i.is_multiple_of(125) => None,
        Generator::Dirty if i.is_multiple_of(50) => Some(i - 1),
        Generator::Shifted(n) => Some(i + n),
        _ => Some(i),
    };
    let _ = match id {
        Some(id) => write!(out, r#"{{"users.external_id":{{"value":"user-{id:07}"}},"#),
        None => write!(out, r#"{{"users.external_id":{{"value":null}},"#),
    };
}

/// A version 4 UUID made from `n` (the same `n`, the same UUID; neighbours far apart).
pub fn uuid(n: u64) -> String {
    let mix = |mut z: u64| {
        // SplitMix64.
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let (a, b) = (mix(n), mix(n ^ 0x5DEE_CE66_D1CE_4E5B));
    let a = (a & !0xF000) | 0x4000;
    let b = (b & !(0xC << 60)) | (0x8 << 60);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xFFFF,
        a & 0xFFFF,
        b >> 48,
        b & 0xFFFF_FFFF_FFFF
    )
}

/// One entry of a streamed `pivots` section, shaped like Looker's.
fn pivot_entry(n: u64, out: &mut String) {
    use std::fmt::Write;
    let _ = write!(
        out,
        r#"{{"key":"s{n:07}","is_total":false,"data":{{"orders.status":"s{n:07}"}},"sort_values":{{"orders.status":"s{n:07}"}},"labels":{{}}}}"#
    );
}

/// An answer the sandbox Looker gives instead of its own (see
/// [`LookerSandbox::answer_login_with`] and [`LookerSandbox::answer_run_with`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookerAnswer {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// `Location`, if any.
    pub location: Option<String>,
    /// The body, sent as is.
    pub body: String,
}

impl LookerAnswer {
    /// A JSON body.
    pub fn json(status: u16, body: &Value) -> Self {
        Self {
            status,
            content_type: Some("application/json".into()),
            location: None,
            body: body.to_string(),
        }
    }

    /// An HTML page, as a proxy or load balancer in front of a service sends.
    pub fn html(status: u16, page: &str) -> Self {
        Self {
            status,
            content_type: Some("text/html; charset=utf-8".into()),
            location: None,
            body: page.into(),
        }
    }

    /// A redirect to `location`, with a small HTML body as servers send.
    pub fn redirect(status: u16, location: &str) -> Self {
        Self {
            status,
            content_type: Some("text/html".into()),
            location: Some(location.into()),
            body: format!("<a href=\"{location}\">moved</a>"),
        }
    }

    fn into_response(self) -> Response {
        let mut builder = Response::builder().status(self.status);
        if let Some(t) = self.content_type {
            builder = builder.header(header::CONTENT_TYPE, t);
        }
        if let Some(l) = self.location {
            builder = builder.header(header::LOCATION, l);
        }
        builder.body(Body::from(self.body)).unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "sandbox failed to build the set answer",
            )
        })
    }
}

/// One request the sandbox Looker received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookerRequest {
    /// HTTP method.
    pub method: String,
    /// Path, e.g. `/api/4.0/looks/42/run/json_detail`.
    pub path: String,
    /// Query pairs in order.
    pub query: Vec<(String, String)>,
    /// `Authorization` header.
    pub authorization: Option<String>,
    /// `Content-Type` header.
    pub content_type: Option<String>,
    /// Form body pairs (login).
    pub form: Vec<(String, String)>,
}

#[derive(Debug)]
struct LookerState {
    client_id: String,
    client_secret: String,
    looks: Mutex<HashMap<String, Look>>,
    tokens: Mutex<HashMap<String, Instant>>,
    next_ttls: Mutex<VecDeque<Duration>>,
    requests: Mutex<Vec<LookerRequest>>,
    issued: AtomicU64,
    latency: Mutex<Duration>,
    login_answer: Mutex<Option<LookerAnswer>>,
    run_answer: Mutex<Option<LookerAnswer>>,
    look_answer: Mutex<Option<LookerAnswer>>,
}

/// A running sandbox Looker.
#[derive(Debug)]
pub struct LookerSandbox {
    /// Base URL, like `LOOKERSDK_BASE_URL` (`http://127.0.0.1:PORT`).
    pub url: String,
    state: Arc<LookerState>,
    task: JoinHandle<()>,
}

impl Drop for LookerSandbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LookerSandbox {
    /// Starts a Looker that accepts these API credentials.
    pub async fn start(client_id: &str, client_secret: &str) -> io::Result<Self> {
        let state = Arc::new(LookerState {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            looks: Mutex::default(),
            tokens: Mutex::default(),
            next_ttls: Mutex::default(),
            requests: Mutex::default(),
            issued: AtomicU64::new(0),
            latency: Mutex::default(),
            login_answer: Mutex::default(),
            run_answer: Mutex::default(),
            look_answer: Mutex::default(),
        });
        let router = Router::new()
            .route("/api/4.0/login", post(login))
            .route("/api/4.0/looks/{look_id}", get(look))
            .route("/api/4.0/looks/{look_id}/run/{format}", get(run_look))
            .fallback(unknown)
            .method_not_allowed_fallback(unknown)
            .with_state(Arc::clone(&state));
        let (addr, task) = super::listen::serve(router).await?;
        Ok(Self {
            url: format!("http://{addr}"),
            state,
            task,
        })
    }

    /// Adds or replaces a Look.
    pub fn add_look(&self, id: &str, look: Look) {
        lock(&self.state.looks).insert(id.into(), look);
    }

    /// The next tokens issued live only this long (then answer 401), one per entry.
    pub fn expire_next_tokens_after(&self, ttl: Duration) {
        lock(&self.state.next_ttls).push_back(ttl);
    }

    /// Every request (login and run) waits `fixed` before it is answered. Default zero.
    pub fn set_latency(&self, fixed: Duration) {
        *lock(&self.state.latency) = fixed;
    }

    /// Every login is answered with `answer` (whatever the credentials), until `None`.
    pub fn answer_login_with(&self, answer: Option<LookerAnswer>) {
        *lock(&self.state.login_answer) = answer;
    }

    /// Every run request is answered with `answer` (whatever the token and Look), until
    /// `None`.
    pub fn answer_run_with(&self, answer: Option<LookerAnswer>) {
        *lock(&self.state.run_answer) = answer;
    }

    /// Every `GET /looks/{id}` is answered with `answer` (whatever the token and Look),
    /// until `None`.
    pub fn answer_look_with(&self, answer: Option<LookerAnswer>) {
        *lock(&self.state.look_answer) = answer;
    }

    /// Every request so far (also those to paths the sandbox does not serve).
    pub fn requests(&self) -> Vec<LookerRequest> {
        lock(&self.state.requests).clone()
    }

    /// Requests whose path ends with `suffix`.
    pub fn requests_to(&self, suffix: &str) -> Vec<LookerRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.ends_with(suffix))
            .collect()
    }
}

fn record(
    state: &LookerState,
    method: &str,
    path: String,
    query: &str,
    headers: &HeaderMap,
    form: Vec<(String, String)>,
) {
    let h = |name| {
        headers
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    lock(&state.requests).push(LookerRequest {
        method: method.into(),
        path,
        query: url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect(),
        authorization: h(header::AUTHORIZATION),
        content_type: h(header::CONTENT_TYPE),
        form,
    });
}

async fn latency(state: &LookerState) {
    let fixed = *lock(&state.latency);
    if !fixed.is_zero() {
        tokio::time::sleep(fixed).await;
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    let body =
        json!({"message": message, "documentation_url": "https://cloud.google.com/looker/docs/"});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn login(
    State(state): State<Arc<LookerState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    record(
        &state,
        "POST",
        "/api/4.0/login".into(),
        query.as_deref().unwrap_or(""),
        &headers,
        form.clone(),
    );
    latency(&state).await;
    if let Some(answer) = lock(&state.login_answer).clone() {
        return answer.into_response();
    }
    let get = |k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    if get("client_id") != Some(state.client_id.as_str())
        || get("client_secret") != Some(state.client_secret.as_str())
    {
        return error(StatusCode::NOT_FOUND, "Not found");
    }
    let n = state.issued.fetch_add(1, Ordering::Relaxed);
    let token = format!("sandbox-token-{n}-{}", fastrand::u64(..));
    let ttl = lock(&state.next_ttls)
        .pop_front()
        .unwrap_or(Duration::from_secs(3600));
    lock(&state.tokens).insert(token.clone(), Instant::now() + ttl);
    let body = json!({"access_token": token, "token_type": "Bearer", "expires_in": ttl.as_secs(), "refresh_token": null});
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Any other path or method: recorded, then 404 as Looker answers.
async fn unknown(
    State(state): State<Arc<LookerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(
        &state,
        method.as_str(),
        uri.path().to_owned(),
        uri.query().unwrap_or(""),
        &headers,
        vec![],
    );
    error(StatusCode::NOT_FOUND, "Not found")
}

/// Whether the request carries a token the sandbox issued and that has not expired.
fn authorized(state: &LookerState, headers: &HeaderMap) -> bool {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("token ")
                .or_else(|| v.strip_prefix("Bearer "))
        })
        .unwrap_or_default()
        .to_owned();
    lock(&state.tokens)
        .get(&token)
        .is_some_and(|exp| *exp > Instant::now())
}

/// `GET /looks/{id}`: a `LookWithQuery` with the Look's query, whose `limit` is the Look's
/// saved row limit (the `fields` parameter is recorded, not applied).
async fn look(
    State(state): State<Arc<LookerState>>,
    Path(look_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    record(
        &state,
        "GET",
        format!("/api/4.0/looks/{look_id}"),
        query.as_deref().unwrap_or(""),
        &headers,
        vec![],
    );
    latency(&state).await;
    if let Some(answer) = lock(&state.look_answer).clone() {
        return answer.into_response();
    }
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Requires authentication.");
    }
    let Some(look) = lock(&state.looks).get(&look_id).cloned() else {
        return error(StatusCode::NOT_FOUND, "Not found");
    };
    let limit = look
        .query_limit
        .unwrap_or_else(|| Value::String(look.table_limit.to_string()));
    let body = json!({
        "id": look_id,
        "title": format!("Sandbox Look {look_id}"),
        "query_id": "1",
        "query": {"id": "1", "model": "sandbox", "view": "users", "limit": limit},
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn run_look(
    State(state): State<Arc<LookerState>>,
    Path((look_id, format)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = query.unwrap_or_default();
    record(
        &state,
        "GET",
        format!("/api/4.0/looks/{look_id}/run/{format}"),
        &query,
        &headers,
        vec![],
    );
    latency(&state).await;
    if let Some(answer) = lock(&state.run_answer).clone() {
        return answer.into_response();
    }
    if !authorized(&state, &headers) {
        return error(StatusCode::UNAUTHORIZED, "Requires authentication.");
    }
    let Some(look) = lock(&state.looks).get(&look_id).cloned() else {
        return error(StatusCode::NOT_FOUND, "Not found");
    };
    if format != "json_detail" {
        return error(
            StatusCode::BAD_REQUEST,
            "the sandbox serves json_detail only",
        );
    }
    if let Some(d) = look.delay {
        tokio::time::sleep(d).await;
    }
    let limit = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "limit")
        .map(|(_, v)| v.parse::<i64>().unwrap_or(0));
    let rows = match limit {
        None => look.total().min(look.table_limit),
        Some(-1) => look.total(),
        Some(n) => look.total().min(n.max(0) as u64),
    };
    let trickle = look.trickle;
    let writer = BodyWriter::new(look, rows);
    let body = match trickle {
        Some(every) => Body::from_stream(trickled(writer, every)),
        None => Body::from_stream(futures_util::stream::unfold(writer, |mut w| async move {
            if let Some(d) = w.delay_before_next() {
                tokio::time::sleep(d).await;
            }
            let item = w.next_chunk()?;
            if item.is_err() {
                // Let the client read what was sent, as when a real connection drops mid-body.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some((item, w))
        })),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "sandbox failed to build a response",
            )
        })
}

/// The body one byte at a time, `every` before each byte (a connection that never stalls
/// outright but never gets anywhere either).
fn trickled(
    writer: BodyWriter,
    every: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, io::Error>> {
    futures_util::stream::unfold(
        (writer, Bytes::new()),
        move |(mut w, mut held)| async move {
            while held.is_empty() {
                match w.next_chunk()? {
                    Ok(chunk) => held = chunk,
                    Err(e) => return Some((Err(e), (w, held))),
                }
            }
            tokio::time::sleep(every).await;
            let byte = held.split_to(1);
            Some((Ok(byte), (w, held)))
        },
    )
}

/// Writes a result body in chunks of about 32 KiB; a chunk also ends where the Look slows
/// down or stalls, so the rows before reach the client before the wait.
struct BodyWriter {
    look: Look,
    rows: u64,
    next: u64,
    stage: u8,
    stalled: bool,
    /// An oversized part being streamed, before the rest of the body goes on.
    filler: Option<Filler>,
}

/// An oversized part of the body, written a chunk at a time.
struct Filler {
    /// What each further element is.
    kind: FillerKind,
    /// Bytes still to write (about: the last element may go past).
    left: u64,
    /// Elements written so far.
    written: u64,
    /// What follows the part.
    tail: String,
}

#[derive(Clone, Copy)]
enum FillerKind {
    /// `,0` after the array's first `0`.
    Zeros,
    /// `,{pivot entry}` after the first entry.
    Pivots,
}

impl Filler {
    /// Appends up to about 32 KiB of the part to `out`; true when the part is done (its tail
    /// appended).
    fn fill(&mut self, out: &mut String) -> bool {
        while self.left > 0 && out.len() < 32 * 1024 {
            let before = out.len();
            self.written += 1;
            match self.kind {
                FillerKind::Zeros => out.push_str(",0"),
                FillerKind::Pivots => {
                    out.push(',');
                    pivot_entry(self.written, out);
                }
            }
            self.left = self.left.saturating_sub((out.len() - before) as u64);
        }
        if self.left == 0 {
            out.push_str(&self.tail);
            return true;
        }
        false
    }
}

impl BodyWriter {
    fn new(look: Look, rows: u64) -> Self {
        Self {
            look,
            rows,
            next: 0,
            stage: 0,
            stalled: false,
            filler: None,
        }
    }

    /// Rows the body will carry.
    fn row_count(&self) -> u64 {
        if self.look.errors.is_some() {
            0
        } else {
            self.rows
        }
    }

    /// Whether a wait falls before row index `i` (so a chunk must end there).
    fn waits_before(&self, i: u64) -> bool {
        self.look.slow_after.is_some_and(|(n, _)| i >= n)
            || (!self.stalled && self.look.stall_after.is_some_and(|(n, _)| i == n))
    }

    /// The wait before the next chunk (rows after a slow-down or at the stall).
    fn delay_before_next(&mut self) -> Option<Duration> {
        if self.stage != 1 || self.next >= self.row_count() || !self.waits_before(self.next) {
            return None;
        }
        let mut wait = Duration::ZERO;
        if let Some((n, d)) = self.look.stall_after
            && !self.stalled
            && self.next == n
        {
            self.stalled = true;
            wait += d;
        }
        if let Some((n, d)) = self.look.slow_after
            && self.next >= n
        {
            wait += d;
        }
        Some(wait)
    }

    fn next_chunk(&mut self) -> Option<Result<Bytes, io::Error>> {
        let mut out = String::with_capacity(40 * 1024);
        if let Some(filler) = &mut self.filler {
            if filler.fill(&mut out) {
                self.filler = None;
            }
            return Some(Ok(Bytes::from(out)));
        }
        match self.stage {
            0 => {
                out.push_str(r#"{"status":"complete","from_cache":false,"id":"sandbox","result_source":"query","null_sort_treatment":"low","expired":false,"ran_at":"2026-11-29T10:00:00+00:00","runtime":"0.042","sql":"SELECT 1","fields":"#);
                out.push_str(&self.look.fields.to_string());
                const DATA: &str = r#","has_totals":false,"has_row_totals":false,"data":["#;
                self.stage = 1;
                if let Some(bytes) = self.look.huge_pivots {
                    out.push_str(r#","pivots":["#);
                    pivot_entry(0, &mut out);
                    self.filler = Some(Filler {
                        kind: FillerKind::Pivots,
                        left: bytes,
                        written: 0,
                        tail: format!("]{DATA}"),
                    });
                    return Some(Ok(Bytes::from(out)));
                }
                if let Some(p) = &self.look.pivots {
                    out.push_str(r#","pivots":"#);
                    out.push_str(&p.to_string());
                }
                out.push_str(DATA);
            }
            1 => {
                let rows = self.row_count();
                let first = self.next;
                while self.next < rows && out.len() < 32 * 1024 {
                    if self.next > first && self.waits_before(self.next) {
                        break;
                    }
                    if self.look.cut_after == Some(self.next) {
                        return Some(Err(io::Error::other("sandbox dropped the connection")));
                    }
                    if self.next > 0 {
                        out.push(',');
                    }
                    self.next += 1;
                    match &self.look.rows {
                        Rows::Fixed(r) => out.push_str(&r[(self.next - 1) as usize].to_string()),
                        Rows::Raw(r) => out.push_str(&r[(self.next - 1) as usize]),
                        Rows::Generated { generator, .. } => match self.look.huge_array_cell {
                            Some((row, bytes)) if row == self.next => {
                                generated_id(self.next, *generator, &mut out);
                                out.push_str(r#""users.first_name":{"value":[0"#);
                                self.filler = Some(Filler {
                                    kind: FillerKind::Zeros,
                                    left: bytes,
                                    written: 0,
                                    tail: format!(
                                        r#"]}},"orders.count":{{"value":{}}}}}"#,
                                        row % 7
                                    ),
                                });
                                break;
                            }
                            _ => generated_row(self.next, *generator, &mut out),
                        },
                    }
                }
                if self.filler.is_none() && self.next >= rows {
                    out.push(']');
                    if let Some(e) = &self.look.errors {
                        out.push_str(r#","errors":"#);
                        out.push_str(&e.to_string());
                    }
                    out.push_str(r#","timezone":"UTC","supports_pivot_in_db":true,"drill_menu_build_time":0.1}"#);
                    self.stage = 2;
                }
            }
            _ => return None,
        }
        Some(Ok(Bytes::from(out)))
    }
}
