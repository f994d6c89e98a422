//! `POST /users/track`: one batch delivered with retries, splits and per-object rejections.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{Batch, BrazeError, Limiter, PayloadDump, RetryPolicy};
use crate::looker::body::error_chain;
use crate::looker::json_detail::truncate;
use crate::secret::Secret;

/// Why objects were not delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// 5xx on every attempt.
    ServerError(u16),
    /// 429 on every attempt.
    RateLimited,
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
            Self::RateLimited => "BrazeRateLimited",
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
            Self::RateLimited => format!("Braze answered 429 on all {attempts} attempts"),
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
}

impl Delivery {
    fn reject(&mut self, kind: &str, rows: impl IntoIterator<Item = u64>) {
        let kind = truncate(kind, 200);
        match self.rejected.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, r)) => r.extend(rows),
            None => self.rejected.push((kind, rows.into_iter().collect())),
        }
    }

    /// Marks a batch's objects as not delivered.
    pub fn fail(&mut self, batch: &Batch, reason: &FailReason, attempts: u32) {
        self.failed.push((
            reason.reason(),
            reason.describe(attempts),
            batch.rows().to_vec(),
        ));
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
    /// Try again after the wait (or the backoff when none).
    Retry(FailReason, Option<Duration>),
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

/// Decides what an answer means (pure). `len` is the number of objects sent; `wait` is what
/// the rate-limit headers asked for.
pub fn classify(
    url: &Url,
    status: StatusCode,
    body: &[u8],
    len: usize,
    wait: Option<Duration>,
) -> Verdict {
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
        400 if message().contains("Max Input Length") => Verdict::Split,
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
        429 => Verdict::Retry(FailReason::RateLimited, wait),
        s @ 500..=599 => Verdict::Retry(FailReason::ServerError(s), wait),
        s => Verdict::Fail(FailReason::ClientError(s, message())),
    }
}

/// Sends batches to one Braze workspace.
#[derive(Clone, Debug)]
pub struct BrazeClient {
    http: reqwest::Client,
    url: Url,
    auth: HeaderValue,
    limiter: Arc<Limiter>,
    retry: RetryPolicy,
    request_timeout: Duration,
}

impl BrazeClient {
    /// A client for `url` (from [`super::endpoint::track_url`]) with the workspace's limiter.
    pub fn new(
        http: reqwest::Client,
        url: Url,
        key: &Secret,
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
        })
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
                out.fail(
                    &b,
                    &FailReason::Stopped(fatal.reason(), fatal.to_string()),
                    0,
                );
                continue;
            }
            self.deliver_one(b, cancel, dump, &mut out, &mut work).await;
        }
        out
    }

    async fn deliver_one(
        &self,
        batch: Batch,
        cancel: &CancellationToken,
        dump: Option<&PayloadDump>,
        out: &mut Delivery,
        work: &mut Vec<Batch>,
    ) {
        let body = Bytes::from(batch.body());
        if let Some(d) = dump
            && let Err(e) = d.write(&body)
        {
            tracing::warn!(error = %e, "cannot write to the payload dump");
        }
        let interrupted =
            || FailReason::Stopped("Interrupted", "the operator is shutting down".into());
        let mut last = FailReason::Timeout;
        for attempt in 1..=self.retry.max_attempts {
            tokio::select! {
                () = cancel.cancelled() => return out.fail(&batch, &interrupted(), attempt - 1),
                () = self.limiter.acquire() => {}
            }
            out.requests += 1;
            if attempt > 1 {
                out.retries += 1;
            }
            let answer = tokio::select! {
                () = cancel.cancelled() => return out.fail(&batch, &interrupted(), attempt),
                a = self.post(body.clone()) => a,
            };
            let verdict = match answer {
                Ok((status, headers, bytes)) => {
                    let wait = self.limiter.observe(status, &headers);
                    tracing::debug!(
                        status = status.as_u16(),
                        objects = batch.len(),
                        attempt,
                        "Braze answered"
                    );
                    classify(&self.url, status, &bytes, batch.len(), wait)
                }
                Err(reason) => Verdict::Retry(reason, None),
            };
            match verdict {
                Verdict::Accepted(rejected) => {
                    out.sent += (batch.len() - rejected.len()) as u64;
                    for (i, kind) in rejected {
                        out.reject(&kind, [batch.rows()[i]]);
                    }
                    return;
                }
                Verdict::RejectSome(rejected) => {
                    for (i, kind) in &rejected {
                        out.reject(kind, [batch.rows()[*i]]);
                    }
                    let rest = batch.select(|i| !rejected.iter().any(|(r, _)| *r == i));
                    if !rest.is_empty() {
                        work.push(rest);
                    }
                    return;
                }
                Verdict::RejectAll(message) => {
                    return out.reject(
                        &format!("400 Bad Request: {message}"),
                        batch.rows().iter().copied(),
                    );
                }
                Verdict::Split if batch.len() > 1 => {
                    let (a, b) = batch.split();
                    work.push(b);
                    work.push(a);
                    return;
                }
                Verdict::Split => {
                    return out.reject(
                        "the object alone is too large for Braze (413)",
                        batch.rows().iter().copied(),
                    );
                }
                Verdict::Fatal(e) => {
                    out.fail(
                        &batch,
                        &FailReason::Stopped(e.reason(), e.to_string()),
                        attempt,
                    );
                    out.fatal = Some(e);
                    return;
                }
                Verdict::Fail(reason) => return out.fail(&batch, &reason, attempt),
                Verdict::Retry(reason, wait) => {
                    if reason == FailReason::RateLimited {
                        out.rate_limited += 1;
                    }
                    tracing::debug!(
                        reason = reason.reason(),
                        attempt,
                        "Braze request will be retried"
                    );
                    last = reason;
                    if attempt == self.retry.max_attempts {
                        break;
                    }
                    // A header wait already paused the shared limiter; otherwise back off.
                    if wait.is_none() {
                        let delay = self.retry.backoff(attempt, fastrand::f64());
                        tokio::select! {
                            () = cancel.cancelled() => return out.fail(&batch, &interrupted(), attempt),
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
        out.fail(&batch, &last, self.retry.max_attempts);
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
            None,
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
        assert_eq!(
            verdict(429, "", 1),
            Verdict::Retry(FailReason::RateLimited, None)
        );
        assert_eq!(
            verdict(503, "<html>", 1),
            Verdict::Retry(FailReason::ServerError(503), None)
        );
        let w = Some(Duration::from_secs(2));
        assert_eq!(
            classify(&url(), StatusCode::TOO_MANY_REQUESTS, b"", 1, w),
            Verdict::Retry(FailReason::RateLimited, w)
        );
    }

    #[test]
    fn the_key_goes_in_a_sensitive_header_only() {
        let http = crate::http::HttpClients::new().get(true).clone();
        let c = BrazeClient::new(
            http.clone(),
            url(),
            &Secret::new("k-123"),
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
                &Secret::new("bad\nkey"),
                Arc::new(Limiter::new(Default::default())),
                RetryPolicy::default()
            ),
            Err(BrazeError::BadKey)
        ));
    }
}
