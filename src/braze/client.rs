//! `POST /users/track`: one batch delivered with retries, splits and per-object rejections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use super::budget::Permit;
use super::dump::PayloadDump;
use super::error::BrazeError;
use super::limiter::Limiter;
use super::retry::RetryPolicy;
use crate::redacted::Redacted;
use crate::text::{error_chain, truncate};

/// The reason of objects a stopped run (shutdown) did not get to send.
pub const INTERRUPTED: &str = "Interrupted";

/// Why objects were not delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// A transient status (5xx, 408, 425) on every attempt.
    ServerError(u16),
    /// 429s with no request accepted for the run's patience.
    RateLimited(Duration),
    /// No answer in time.
    Timeout,
    /// The connection failed.
    Connection(String),
    /// An unexpected 4xx.
    ClientError(u16, String),
    /// The run stopped before they were sent (reason and sentence of the stop).
    Stopped(&'static str, String),
}

impl FailReason {
    /// CamelCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ServerError(_) => "BrazeServerError",
            Self::RateLimited(_) => "RateLimited",
            Self::Timeout => "BrazeTimeout",
            Self::Connection(_) => "BrazeConnectionError",
            Self::ClientError(..) => "BrazeClientError",
            Self::Stopped(reason, _) => reason,
        }
    }

    /// What happened, for the report.
    pub fn describe(&self, attempts: u32) -> String {
        match self {
            Self::ServerError(s) => format!("Braze answered {s} on all {attempts} attempts"),
            Self::RateLimited(patience) => format!(
                "Braze answered 429 (rate limited) and accepted no request for {} s; the run gave up waiting",
                patience.as_secs()
            ),
            Self::Timeout => format!("Braze did not answer in time on all {attempts} attempts"),
            Self::Connection(d) => {
                format!("the connection to Braze failed on all {attempts} attempts ({d})")
            }
            Self::ClientError(s, m) => format!("Braze answered {s}: {m}"),
            Self::Stopped(_, why) => format!("the run stopped before they were sent: {why}"),
        }
    }
}

/// What became of one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Objects Braze accepted.
    pub sent: u64,
    /// Rows Braze rejected, grouped by Braze's error type.
    pub rejected: Vec<(String, Vec<u64>)>,
    /// Rows not delivered, grouped by reason and description.
    pub failed: Vec<(&'static str, String, Vec<u64>)>,
    /// HTTP requests made.
    pub requests: u64,
    /// Requests that were retries.
    pub retries: u64,
    /// 429 answers.
    pub rate_limited: u64,
    /// An answer that stops the run.
    pub fatal: Option<BrazeError>,
    /// Keys of the rejected objects ([`Batch::keys`]).
    pub rejected_keys: Vec<u64>,
    /// Keys of the objects not delivered.
    pub failed_keys: Vec<u64>,
}

impl Delivery {
    /// Records object `i` of `batch` as rejected, under Braze's error type `kind`.
    fn reject(&mut self, kind: &str, batch: &Batch, i: usize) {
        let kind = truncate(kind, 200);
        let row = batch.rows()[i];
        match self.rejected.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, r)) => r.push(row),
            None => self.rejected.push((kind, vec![row])),
        }
        self.rejected_keys.push(batch.keys()[i]);
    }

    /// Marks a batch's objects as not delivered.
    pub fn fail(&mut self, batch: &Batch, reason: &FailReason, attempts: u32) {
        self.failed.push((
            reason.reason(),
            reason.describe(attempts),
            batch.rows().to_vec(),
        ));
        self.failed_keys.extend_from_slice(batch.keys());
    }
}

/// What to do with an answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// 2xx: accepted, except the listed object indexes (with Braze's error type).
    Accepted(Vec<(usize, String)>),
    /// 400 naming objects: those are rejected; the others were not processed.
    RejectSome(Vec<(usize, String)>),
    /// 400 without objects named: all rejected, with Braze's message.
    RejectAll(String),
    /// Too large: send it in two halves.
    Split,
    /// Wait as the limiter says and send again; spends no attempt.
    RateLimited,
    /// A transient failure: back off and try again, spending an attempt.
    Retry(FailReason),
    /// Stop the run.
    Fatal(BrazeError),
    /// Give up on this batch.
    Fail(FailReason),
}

#[derive(Deserialize, Default)]
struct TrackAnswer {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errors: Option<Vec<ObjectError>>,
}

#[derive(Deserialize)]
struct ObjectError {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    input_array: Option<String>,
    #[serde(default)]
    index: Option<u64>,
}

/// Decides what an answer means (pure). `len` is the number of objects sent.
pub fn classify(url: &Url, status: StatusCode, body: &[u8], len: usize) -> Verdict {
    let answer: TrackAnswer = serde_json::from_slice(body).unwrap_or_default();
    let mut named: Vec<(usize, String)> = Vec::new();
    for e in answer.errors.iter().flatten() {
        if e.input_array.as_deref().is_some_and(|a| a != "attributes") {
            continue;
        }
        if let Some(i) = e
            .index
            .and_then(|i| usize::try_from(i).ok())
            .filter(|i| *i < len)
            && !named.iter().any(|(n, _)| *n == i)
        {
            named.push((
                i,
                e.kind.clone().unwrap_or_else(|| "unspecified error".into()),
            ));
        }
    }
    let message = || {
        answer
            .message
            .clone()
            .map(|m| truncate(&m, 200))
            .unwrap_or_else(|| "no message".into())
    };
    match status.as_u16() {
        200..=299 => Verdict::Accepted(named),
        400 if !named.is_empty() => Verdict::RejectSome(named),
        400 if says_too_large(&message()) => Verdict::Split,
        400 => Verdict::RejectAll(message()),
        401 => Verdict::Fatal(BrazeError::Unauthorized {
            url: url.to_string(),
            host: url.host_str().unwrap_or_default().to_owned(),
        }),
        403 => {
            let m = message();
            let detail = if m == "no message" {
                String::new()
            } else {
                format!("; Braze says: {m}")
            };
            Verdict::Fatal(BrazeError::Forbidden {
                url: url.to_string(),
                detail,
            })
        }
        404 => Verdict::Fatal(BrazeError::NotFound {
            url: url.to_string(),
        }),
        413 => Verdict::Split,
        429 => Verdict::RateLimited,
        s @ (408 | 425 | 500..=599) => Verdict::Retry(FailReason::ServerError(s)),
        s => Verdict::Fail(FailReason::ClientError(s, message())),
    }
}

/// A 400 whose message says the request was too big (too many objects or too many bytes):
/// the batch is split, not rejected.
fn says_too_large(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("max input length") || m.contains("too large")
}

/// Sends batches to one Braze workspace for one run.
#[derive(Debug)]
pub struct BrazeClient {
    http: reqwest::Client,
    url: Url,
    auth: HeaderValue,
    limiter: Arc<Limiter>,
    retry: RetryPolicy,
    request_timeout: Duration,
    /// When the current streak of 429s began (none since Braze last accepted a request).
    limited_since: Mutex<Option<Instant>>,
    /// The run gave up on rate limits: later batches fail without sending.
    gave_up: AtomicBool,
}

/// A batch that got no settling answer: retries ran out, the run's patience with 429s ran
/// out, or the run stopped. With the number of attempts spent.
struct Unsettled(FailReason, u32);

impl BrazeClient {
    /// A client for `url` (from [`super::endpoint::track_url`]) with the workspace's limiter.
    pub fn new(
        http: reqwest::Client,
        url: Url,
        key: &Redacted,
        limiter: Arc<Limiter>,
        retry: RetryPolicy,
    ) -> Result<Self, BrazeError> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| BrazeError::BadKey)?;
        auth.set_sensitive(true);
        Ok(Self {
            http,
            url,
            auth,
            limiter,
            retry,
            request_timeout: Duration::from_secs(30),
            limited_since: Mutex::new(None),
            gave_up: AtomicBool::new(false),
        })
    }

    /// Waits for the workspace's in-flight budget to admit a delivery of `bytes` from a
    /// run allowed `cap` in flight; the delivery holds the permit until it ends.
    pub async fn permit(&self, cap: usize, bytes: usize) -> Permit {
        let rate = self.limiter.rate_per_second();
        self.limiter.budget().acquire(rate, cap, bytes).await
    }

    /// Delivers `batch`: retries what can be retried, splits what is too large, and stops at
    /// the first answer that ends the run. Every object ends up sent, rejected or failed.
    pub async fn deliver(
        &self,
        batch: Batch,
        cancel: &CancellationToken,
        dump: Option<&PayloadDump>,
    ) -> Delivery {
        let mut out = Delivery::default();
        let mut work = vec![batch];
        while let Some(b) = work.pop() {
            if let Some(fatal) = &out.fatal {
                let stop = FailReason::Stopped(fatal.reason(), fatal.to_string());
                out.fail(&b, &stop, 0);
                continue;
            }
            match self.send(&b, cancel, dump, &mut out).await {
                Ok(verdict) => settle(b, verdict, &mut out, &mut work),
                Err(Unsettled(reason, attempts)) => out.fail(&b, &reason, attempts),
            }
        }
        out
    }

    /// Sends one batch until Braze gives an answer that settles it. 429s wait for the
    /// limiter and spend no attempt; transient failures back off and spend one.
    async fn send(
        &self,
        batch: &Batch,
        cancel: &CancellationToken,
        dump: Option<&PayloadDump>,
        out: &mut Delivery,
    ) -> Result<Verdict, Unsettled> {
        let body = Bytes::from(batch.body());
        if let Some(d) = dump
            && let Err(e) = d.write(&body)
        {
            tracing::warn!(error = %e, "cannot write to the payload dump");
        }
        let interrupted = |attempts| {
            let why = "the operator is shutting down".into();
            Unsettled(FailReason::Stopped(INTERRUPTED, why), attempts)
        };
        let mut attempts = 0;
        let mut first = true;
        loop {
            if self.gave_up.load(Ordering::Relaxed) {
                return Err(self.give_up(attempts));
            }
            // The patience also runs out while waiting for a slot (a long pause).
            let deadline = self.patience_deadline();
            tokio::select! {
                () = cancel.cancelled() => return Err(interrupted(attempts)),
                () = self.limiter.acquire() => {}
                () = sleep_until_some(deadline) => return Err(self.give_up(attempts)),
            }
            if !first {
                out.retries += 1;
            }
            first = false;
            out.requests += 1;
            let verdict = tokio::select! {
                () = cancel.cancelled() => return Err(interrupted(attempts + 1)),
                v = self.exchange(body.clone(), batch.len()) => v,
            };
            match verdict {
                Verdict::RateLimited => {
                    out.rate_limited += 1;
                    let since = *lock(&self.limited_since).get_or_insert_with(Instant::now);
                    if since.elapsed() > self.retry.rate_limit_patience {
                        return Err(self.give_up(attempts));
                    }
                }
                Verdict::Retry(reason) => {
                    attempts += 1;
                    tracing::debug!(
                        reason = reason.reason(),
                        attempts,
                        "Braze request will be retried"
                    );
                    if attempts >= self.retry.max_attempts {
                        return Err(Unsettled(reason, attempts));
                    }
                    let delay = self.retry.backoff(attempts, fastrand::f64());
                    tokio::select! {
                        () = cancel.cancelled() => return Err(interrupted(attempts)),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                settled => {
                    if matches!(settled, Verdict::Accepted(_) | Verdict::RejectSome(_)) {
                        *lock(&self.limited_since) = None;
                    }
                    return Ok(settled);
                }
            }
        }
    }

    /// One request and what its answer means; teaches the limiter and the in-flight budget
    /// (a 429 says nothing of what Braze can serve).
    async fn exchange(&self, body: Bytes, len: usize) -> Verdict {
        let started = Instant::now();
        let (status, headers, bytes) = match self.post(body).await {
            Ok(answer) => answer,
            Err(reason) => return Verdict::Retry(reason),
        };
        if status != StatusCode::TOO_MANY_REQUESTS {
            let rate = self.limiter.rate_per_second();
            self.limiter.budget().answered(started.elapsed(), rate);
        }
        self.limiter
            .observe(status, &headers, &self.retry, fastrand::f64());
        tracing::debug!(status = status.as_u16(), objects = len, "Braze answered");
        classify(&self.url, status, &bytes, len)
    }

    /// When the run's patience with 429s runs out, during a streak of them.
    fn patience_deadline(&self) -> Option<Instant> {
        lock(&self.limited_since).map(|since| since + self.retry.rate_limit_patience)
    }

    fn give_up(&self, attempts: u32) -> Unsettled {
        if !self.gave_up.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                patience_seconds = self.retry.rate_limit_patience.as_secs(),
                "Braze has answered only 429 for too long; the run stops sending"
            );
        }
        Unsettled(
            FailReason::RateLimited(self.retry.rate_limit_patience),
            attempts,
        )
    }

    async fn post(&self, body: Bytes) -> Result<(StatusCode, HeaderMap, Bytes), FailReason> {
        let classify_err = |e: reqwest::Error| {
            if e.is_timeout() {
                FailReason::Timeout
            } else {
                FailReason::Connection(error_chain(&e.without_url()))
            }
        };
        let response = self
            .http
            .post(self.url.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .timeout(self.request_timeout)
            .body(body)
            .send()
            .await
            .map_err(classify_err)?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(classify_err)?;
        Ok((status, headers, bytes))
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Applies a settled answer to one batch: counts, splits and rejections.
fn settle(batch: Batch, verdict: Verdict, out: &mut Delivery, work: &mut Vec<Batch>) {
    match verdict {
        Verdict::Accepted(rejected) => {
            out.sent += (batch.len() - rejected.len()) as u64;
            for (i, kind) in rejected {
                out.reject(&kind, &batch, i);
            }
        }
        Verdict::RejectSome(rejected) => {
            for (i, kind) in &rejected {
                out.reject(kind, &batch, *i);
            }
            // Braze processed none of the others: send them again without the bad ones.
            let rest = batch.select(|i| !rejected.iter().any(|(r, _)| *r == i));
            if !rest.is_empty() {
                work.push(rest);
            }
        }
        Verdict::RejectAll(message) => {
            let kind = format!("400 Bad Request: {message}");
            for i in 0..batch.len() {
                out.reject(&kind, &batch, i);
            }
        }
        Verdict::Split if batch.len() > 1 => {
            let (a, b) = batch.split();
            // `work` is a stack: push the second half first so rows go out in order.
            work.push(b);
            work.push(a);
        }
        Verdict::Split => {
            for i in 0..batch.len() {
                out.reject("the object alone is too large for Braze (413)", &batch, i);
            }
        }
        Verdict::Fatal(e) => {
            out.fail(&batch, &FailReason::Stopped(e.reason(), e.to_string()), 1);
            out.fatal = Some(e);
        }
        Verdict::Fail(reason) => out.fail(&batch, &reason, 1),
        Verdict::RateLimited | Verdict::Retry(_) => {
            unreachable!("`send` settles only final answers")
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> Url {
        "https://rest.iad-01.braze.com/users/track".parse().unwrap()
    }

    fn verdict(status: u16, body: &str, len: usize) -> Verdict {
        classify(
            &url(),
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            len,
        )
    }

    #[test]
    fn success_with_and_without_object_errors() {
        assert_eq!(
            verdict(201, r#"{"message":"success","attributes_processed":3}"#, 3),
            Verdict::Accepted(vec![])
        );
        assert_eq!(verdict(200, "not json", 3), Verdict::Accepted(vec![]));
        let partial = r#"{"message":"success","errors":[
            {"type":"'external_id' or 'braze_id' or 'user_alias' is required","input_array":"attributes","index":1},
            {"type":"dup","input_array":"attributes","index":1},
            {"type":"event","input_array":"events","index":0},
            {"type":"out of range","input_array":"attributes","index":9}]}"#;
        assert_eq!(
            verdict(201, partial, 3),
            Verdict::Accepted(vec![(
                1,
                "'external_id' or 'braze_id' or 'user_alias' is required".into()
            )])
        );
    }

    #[test]
    fn client_errors() {
        let all_bad = r#"{"message":"Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.","errors":[{"type":"x","input_array":"attributes","index":0}]}"#;
        assert_eq!(
            verdict(400, all_bad, 2),
            Verdict::RejectSome(vec![(0, "x".into())])
        );
        assert_eq!(
            verdict(400, r#"{"message":"Max Input Length Exceeded"}"#, 76),
            Verdict::Split
        );
        assert_eq!(
            verdict(400, r#"{"message":"Bad syntax"}"#, 2),
            Verdict::RejectAll("Bad syntax".into())
        );
        assert_eq!(verdict(413, "", 2), Verdict::Split);
        assert_eq!(
            verdict(422, r#"{"message":"nope"}"#, 2),
            Verdict::Fail(FailReason::ClientError(422, "nope".into()))
        );
    }

    #[test]
    fn fatal_answers_name_the_permission_or_instance() {
        let Verdict::Fatal(e) = verdict(401, "{}", 1) else {
            panic!()
        };
        assert_eq!(e.reason(), "BrazeUnauthorized");
        assert!(
            e.to_string()
                .contains("another Braze instance than rest.iad-01.braze.com"),
            "{e}"
        );
        let Verdict::Fatal(e) = verdict(403, r#"{"message":"Access Denied"}"#, 1) else {
            panic!()
        };
        assert_eq!(
            e.to_string(),
            "Braze denied access: POST https://rest.iad-01.braze.com/users/track answered 403 (the API key needs the users.track permission; Braze says: Access Denied)"
        );
        assert!(matches!(
            verdict(404, "", 1),
            Verdict::Fatal(BrazeError::NotFound { .. })
        ));
    }

    #[test]
    fn retryable_answers() {
        assert_eq!(verdict(429, "", 1), Verdict::RateLimited);
        assert_eq!(
            verdict(503, "<html><body>503 Service Unavailable</body></html>", 1),
            Verdict::Retry(FailReason::ServerError(503))
        );
        for s in [408, 425, 500, 502, 504] {
            assert_eq!(
                verdict(s, "", 1),
                Verdict::Retry(FailReason::ServerError(s)),
                "{s}"
            );
        }
        assert_eq!(
            verdict(
                400,
                r#"{"message":"Request body too large: the payload exceeds the 4 MB limit"}"#,
                9
            ),
            Verdict::Split
        );
    }

    #[test]
    fn the_key_goes_in_a_sensitive_header_only() {
        let http = crate::http::HttpClients::new().get(true).clone();
        let c = BrazeClient::new(
            http.clone(),
            url(),
            &Redacted::new("k-123"),
            Arc::new(Limiter::new(Default::default())),
            RetryPolicy::default(),
        )
        .unwrap();
        assert!(c.auth.is_sensitive());
        assert!(!format!("{c:?}").contains("k-123"));
        assert!(matches!(
            BrazeClient::new(
                http,
                url(),
                &Redacted::new("bad\nkey"),
                Arc::new(Limiter::new(Default::default())),
                RetryPolicy::default()
            ),
            Err(BrazeError::BadKey)
        ));
    }
}
