//! Looker API 4.0 client: log in with client credentials, read a Look's saved row limit
//! (`GET /looks/{id}?fields=query(limit)`), run a Look as `json_detail`.
//!
//! `baseUrl` is chosen by whoever may create an export, and the operator calls it from inside
//! the cluster. So an unexpected answer is described by its status and, at most, Looker's own
//! error `message` (cleaned, cut to [`MAX_MESSAGE_CHARS`]); its body is never echoed, and a
//! redirect is reported instead of followed (the HTTP client must not follow them: see
//! [`crate::http::HttpClients::looker`]).

use reqwest::header::{AUTHORIZATION, HeaderValue, LOCATION};
use reqwest::{Response, StatusCode, Url};
use serde::Deserialize;

use super::body::{OutOfTime, WaitBudget};
use super::error::LookerError;
use crate::redacted::Redacted;
use crate::spec::ResultsMode;
use crate::text::{clean, error_chain};

/// Longest Looker error message carried into a status, an Event or a log line, in characters.
pub const MAX_MESSAGE_CHARS: usize = 200;

/// Most bytes read of an error answer (or of a login answer): enough for any JSON error Looker
/// sends; a longer body is not read to its end, and no message is taken from it.
const MAX_SMALL_BODY: usize = 64 * 1024;

/// A client for one Looker instance and one set of API credentials.
#[derive(Clone, Debug)]
pub struct LookerClient {
    http: reqwest::Client,
    api: Url,
    client_id: String,
    client_secret: Redacted,
    timeout_seconds: u64,
}

#[derive(Deserialize)]
struct AccessToken {
    access_token: String,
}

/// The row count Looker applies to a Look's query when the Look has no limit saved (absent,
/// null, empty or `"0"`): the 5,000 rows its UI shows ("Results in Table", see the API
/// reference, 2.3).
pub const LOOKER_DEFAULT_ROW_LIMIT: u64 = 5000;

/// The row limit a `results: Table` run of a Look gets: its saved `query.limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookLimit {
    /// At most this many rows; `saved` is false when the Look has none saved and Looker's
    /// default ([`LOOKER_DEFAULT_ROW_LIMIT`]) applies.
    Rows { rows: u64, saved: bool },
    /// The saved limit is `-1`: all results.
    Unlimited,
}

impl LookLimit {
    /// Reads `query.limit` of a `GET /looks/{id}` answer: a string such as `"5000"` (a number
    /// is accepted too); absent, null, empty or `"0"` is Looker's default; a negative one is
    /// unlimited. `None`: not a Look, or a limit that is not a number.
    pub fn from_look(body: &[u8]) -> Option<Self> {
        let parsed: serde_json::Value = serde_json::from_slice(body).ok()?;
        let query = parsed.as_object()?.get("query")?.as_object()?;
        let text = match query.get("limit") {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.trim().to_owned(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => return None,
        };
        if text.is_empty() {
            return Some(Self::default_rows());
        }
        match text.parse::<i64>().ok()? {
            n if n < 0 => Some(Self::Unlimited),
            0 => Some(Self::default_rows()),
            n => Some(Self::Rows {
                rows: n.unsigned_abs(),
                saved: true,
            }),
        }
    }

    fn default_rows() -> Self {
        Self::Rows {
            rows: LOOKER_DEFAULT_ROW_LIMIT,
            saved: false,
        }
    }
}

/// A Look started: the response whose body is the streamed result, and the Look's saved
/// row limit when it was asked for.
#[derive(Debug)]
pub struct LookRun {
    /// The `json_detail` response, its body not read yet.
    pub response: Response,
    /// The Look's row limit (`None`: not asked for).
    pub limit: Option<LookLimit>,
}

impl LookerClient {
    /// `api` is the root from [`super::api::api_base`]; `timeout_seconds` is only named in errors.
    pub fn new(
        http: reqwest::Client,
        api: Url,
        client_id: String,
        client_secret: Redacted,
        timeout_seconds: u64,
    ) -> Self {
        Self {
            http,
            api,
            client_id,
            client_secret,
            timeout_seconds,
        }
    }

    /// `POST /login` URL.
    pub fn login_url(&self) -> Url {
        self.api.join("login").expect("static path joins")
    }

    /// `GET /looks/{look_id}/run/json_detail` with the query the export needs: raw values, no
    /// visualisation, no drill links, and `limit=-1` for all results.
    pub fn run_url(api: &Url, look_id: &str, results: ResultsMode) -> Url {
        let mut url = api.clone();
        url.path_segments_mut()
            .expect("http URLs have paths")
            .pop_if_empty()
            .extend(["looks", look_id, "run", "json_detail"]);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("apply_formatting", "false")
                .append_pair("apply_vis", "false")
                .append_pair("generate_drill_links", "false");
            if results == ResultsMode::All {
                q.append_pair("limit", "-1");
            }
        }
        url
    }

    /// `GET /looks/{look_id}?fields=query(limit)`: only the saved query's row limit.
    pub fn look_url(api: &Url, look_id: &str) -> Url {
        let mut url = api.clone();
        url.path_segments_mut()
            .expect("http URLs have paths")
            .pop_if_empty()
            .extend(["looks", look_id]);
        url.query_pairs_mut().append_pair("fields", "query(limit)");
        url
    }

    /// Logs in: client id and secret in a form body, never in the URL.
    pub async fn login(
        &self,
        budget: &mut WaitBudget,
        look_id: &str,
    ) -> Result<Redacted, LookerError> {
        let url = self.login_url();
        let request = self
            .http
            .post(url.clone())
            .timeout(budget.remaining())
            .form(&[
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.expose()),
            ]);
        let response = self.send(budget, request, &url, look_id).await?;
        let status = response.status();
        match status {
            StatusCode::OK => {}
            s if s.is_redirection() => {
                return Err(redirect_error("POST", &url, &response, look_id));
            }
            StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(LookerError::AuthFailed {
                    url: url.to_string(),
                    status,
                });
            }
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(LookerError::RateLimited {
                    url: url.to_string(),
                });
            }
            _ => {
                return Err(self
                    .http_error("POST", &url, response, budget, look_id)
                    .await);
            }
        }
        let bad = |what| LookerError::BadAnswer {
            look_id: look_id.to_owned(),
            method: "POST",
            path: url.path().to_owned(),
            status,
            what,
        };
        let body = self
            .read_small(response, budget, &url, look_id)
            .await?
            .ok_or_else(|| bad("with an answer too large to be an access token"))?;
        // The parse error is not kept: it may quote the body.
        let token: AccessToken =
            serde_json::from_slice(&body).map_err(|_| bad("without an access token"))?;
        Ok(Redacted::new(token.access_token))
    }

    /// Logs in and starts running the Look; logs in once more if a token is refused (401).
    /// With `read_limit`, first reads the Look's saved row limit ([`Self::look_url`]), in
    /// the same wait budget.
    pub async fn run_look(
        &self,
        look_id: &str,
        results: ResultsMode,
        read_limit: bool,
        budget: &mut WaitBudget,
    ) -> Result<LookRun, LookerError> {
        let url = Self::run_url(&self.api, look_id, results);
        let look_url = Self::look_url(&self.api, look_id);
        let mut relogged = false;
        let mut limit = None;
        loop {
            let auth = self.authorization(budget, look_id).await?;
            if read_limit && limit.is_none() {
                let request = self
                    .http
                    .get(look_url.clone())
                    .timeout(budget.remaining())
                    .header(AUTHORIZATION, auth.clone());
                let response = self.send(budget, request, &look_url, look_id).await?;
                if retry_login(&response, &mut relogged, look_id) {
                    continue;
                }
                let response = self
                    .ok_or_error(response, &look_url, budget, look_id)
                    .await?;
                limit = Some(
                    self.read_limit(response, &look_url, budget, look_id)
                        .await?,
                );
                tracing::debug!(look_id, ?limit, "Look row limit read");
            }
            // No reqwest timeout here: it would also cover the body, which may take hours
            // when Braze paces the run. The budget bounds the wait for the answer; the body
            // reader bounds each stall (see `body::forward`).
            let request = self.http.get(url.clone()).header(AUTHORIZATION, auth);
            let response = self.send(budget, request, &url, look_id).await?;
            if retry_login(&response, &mut relogged, look_id) {
                continue;
            }
            let response = self.ok_or_error(response, &url, budget, look_id).await?;
            return Ok(LookRun { response, limit });
        }
    }

    /// Logs in, and makes the access token a sensitive `Authorization` header.
    async fn authorization(
        &self,
        budget: &mut WaitBudget,
        look_id: &str,
    ) -> Result<HeaderValue, LookerError> {
        let token = self.login(budget, look_id).await?;
        let mut auth =
            HeaderValue::from_str(&format!("token {}", token.expose())).map_err(|_| {
                LookerError::BadAnswer {
                    look_id: look_id.to_owned(),
                    method: "POST",
                    path: self.login_url().path().to_owned(),
                    status: StatusCode::OK,
                    what: "with an access token that is not a valid header value",
                }
            })?;
        auth.set_sensitive(true);
        Ok(auth)
    }

    /// A success of a `GET`, or the error its status means (a 401 here is one after the
    /// one new login).
    async fn ok_or_error(
        &self,
        response: Response,
        url: &Url,
        budget: &mut WaitBudget,
        look_id: &str,
    ) -> Result<Response, LookerError> {
        match response.status() {
            s if s.is_success() => Ok(response),
            s if s.is_redirection() => Err(redirect_error("GET", url, &response, look_id)),
            StatusCode::NOT_FOUND => Err(LookerError::LookNotFound {
                look_id: look_id.to_owned(),
                url: url.to_string(),
            }),
            StatusCode::TOO_MANY_REQUESTS => Err(LookerError::RateLimited {
                url: url.to_string(),
            }),
            _ => Err(self.http_error("GET", url, response, budget, look_id).await),
        }
    }

    /// The row limit in a `GET /looks/{id}` answer (at most [`MAX_SMALL_BODY`] read).
    async fn read_limit(
        &self,
        response: Response,
        url: &Url,
        budget: &mut WaitBudget,
        look_id: &str,
    ) -> Result<LookLimit, LookerError> {
        let status = response.status();
        let bad = |what| LookerError::BadAnswer {
            look_id: look_id.to_owned(),
            method: "GET",
            path: url.path().to_owned(),
            status,
            what,
        };
        let body = self
            .read_small(response, budget, url, look_id)
            .await?
            .ok_or_else(|| bad("with an answer too large to be a Look's row limit"))?;
        LookLimit::from_look(&body).ok_or_else(|| bad("without a Look's query row limit"))
    }

    async fn send(
        &self,
        budget: &mut WaitBudget,
        request: reqwest::RequestBuilder,
        url: &Url,
        look_id: &str,
    ) -> Result<Response, LookerError> {
        match budget.wait(request.send()).await {
            Err(OutOfTime) => Err(self.timeout(look_id)),
            Ok(Err(e)) if e.is_timeout() => Err(self.timeout(look_id)),
            Ok(Err(e)) => Err(LookerError::Unreachable {
                url: url.to_string(),
                detail: error_chain(&e.without_url()),
            }),
            Ok(Ok(r)) => Ok(r),
        }
    }

    fn timeout(&self, look_id: &str) -> LookerError {
        LookerError::Timeout {
            look_id: look_id.to_owned(),
            seconds: self.timeout_seconds,
        }
    }

    /// Reads a short answer; `None` when it is longer than [`MAX_SMALL_BODY`].
    async fn read_small(
        &self,
        mut response: Response,
        budget: &mut WaitBudget,
        url: &Url,
        look_id: &str,
    ) -> Result<Option<Vec<u8>>, LookerError> {
        let mut body = Vec::new();
        loop {
            match budget.wait(response.chunk()).await {
                Err(OutOfTime) => return Err(self.timeout(look_id)),
                Ok(Err(e)) => {
                    return Err(LookerError::Unreachable {
                        url: url.to_string(),
                        detail: error_chain(&e.without_url()),
                    });
                }
                Ok(Ok(None)) => return Ok(Some(body)),
                Ok(Ok(Some(chunk))) => {
                    if body.len() + chunk.len() > MAX_SMALL_BODY {
                        return Ok(None);
                    }
                    body.extend_from_slice(&chunk);
                }
            }
        }
    }

    /// An unexpected status, with Looker's own error message if the body carries one.
    async fn http_error(
        &self,
        method: &'static str,
        url: &Url,
        response: Response,
        budget: &mut WaitBudget,
        look_id: &str,
    ) -> LookerError {
        let status = response.status();
        // A body that cannot be read in time only loses the message: the status says enough.
        let message = match self.read_small(response, budget, url, look_id).await {
            Ok(Some(body)) => looker_message(&body),
            Ok(None) | Err(_) => None,
        };
        LookerError::Http {
            look_id: look_id.to_owned(),
            method,
            path: url.path().to_owned(),
            status,
            message,
        }
    }
}

/// Looker's own error message: the `message` string of a JSON error body such as
/// `{"message": "Not found", "documentation_url": "…"}`, cleaned and cut to
/// [`MAX_MESSAGE_CHARS`]. Anything else (HTML, plain text, other JSON) gives `None`.
pub fn looker_message(body: &[u8]) -> Option<String> {
    // A `Value`, not a struct: serde would also read a struct from an array such as `["…"]`.
    let parsed: serde_json::Value = serde_json::from_slice(body).ok()?;
    let message = clean(
        parsed.as_object()?.get("message")?.as_str()?,
        MAX_MESSAGE_CHARS,
    );
    (!message.is_empty()).then_some(message)
}

/// A 3xx, reported rather than followed. The Location's host (and port) is named when it is
/// another origin (it says where the redirect went); its path and query are not (they may
/// carry data).
fn redirect_error(
    method: &'static str,
    url: &Url,
    response: &Response,
    look_id: &str,
) -> LookerError {
    let location_host = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| url.join(v).ok())
        .filter(|target| target.origin() != url.origin())
        .and_then(|target| {
            let host = target.host_str()?;
            Some(match target.port() {
                Some(port) => clean(&format!("{host}:{port}"), 100),
                None => clean(host, 100),
            })
        });
    LookerError::Redirect {
        look_id: look_id.to_owned(),
        method,
        path: url.path().to_owned(),
        status: response.status(),
        location_host,
    }
}

/// A 401 to a call made with the token: true the first time (the caller logs in again and
/// repeats the call), false after that (the 401 is then the answer).
fn retry_login(response: &reqwest::Response, relogged: &mut bool, look_id: &str) -> bool {
    if response.status() != StatusCode::UNAUTHORIZED || *relogged {
        return false;
    }
    tracing::info!(
        look_id,
        "Looker refused the access token (401); logging in again"
    );
    *relogged = true;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_url_carries_the_spec_s_query() {
        let api = super::super::api::api_base("https://acme.cloud.looker.com").unwrap();
        assert_eq!(
            LookerClient::run_url(&api, "42", ResultsMode::Table).as_str(),
            "https://acme.cloud.looker.com/api/4.0/looks/42/run/json_detail?apply_formatting=false&apply_vis=false&generate_drill_links=false"
        );
        assert_eq!(
            LookerClient::run_url(&api, "a/b c", ResultsMode::All).as_str(),
            "https://acme.cloud.looker.com/api/4.0/looks/a%2Fb%20c/run/json_detail?apply_formatting=false&apply_vis=false&generate_drill_links=false&limit=-1"
        );
    }

    #[test]
    fn look_url_asks_only_for_the_query_limit() {
        let api = super::super::api::api_base("https://acme.cloud.looker.com").unwrap();
        assert_eq!(
            LookerClient::look_url(&api, "42").as_str(),
            "https://acme.cloud.looker.com/api/4.0/looks/42?fields=query%28limit%29"
        );
    }

    #[test]
    fn a_look_s_limit_is_read_leniently_and_never_guessed() {
        let l = |b: &str| LookLimit::from_look(b.as_bytes());
        let rows = |rows, saved| Some(LookLimit::Rows { rows, saved });
        assert_eq!(l(r#"{"query": {"limit": "5000"}}"#), rows(5000, true));
        assert_eq!(l(r#"{"query": {"limit": " 500 "}}"#), rows(500, true));
        assert_eq!(l(r#"{"query": {"limit": 250}}"#), rows(250, true));
        for default in [
            r#"{"query": {}}"#,
            r#"{"query": {"limit": null}}"#,
            r#"{"query": {"limit": ""}}"#,
            r#"{"query": {"limit": "0"}}"#,
        ] {
            assert_eq!(
                l(default),
                rows(LOOKER_DEFAULT_ROW_LIMIT, false),
                "{default}"
            );
        }
        assert_eq!(
            l(r#"{"query": {"limit": "-1"}}"#),
            Some(LookLimit::Unlimited)
        );
        for bad in [
            r#"{"query": {"limit": "lots"}}"#,
            r#"{"query": {"limit": true}}"#,
            r#"{"query": null}"#,
            r#"{"id": "42"}"#,
            r#"[{"query": {"limit": "5"}}]"#,
            "<html></html>",
        ] {
            assert_eq!(l(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_redirect_names_only_another_origin_s_host() {
        let url = Url::parse("https://acme.looker.com/api/4.0/login").unwrap();
        let toward = |location: Option<&str>| {
            let mut answer = axum::http::Response::builder().status(302);
            if let Some(l) = location {
                answer = answer.header(LOCATION, l);
            }
            let response = Response::from(answer.body(Vec::<u8>::new()).unwrap());
            match redirect_error("POST", &url, &response, "42") {
                LookerError::Redirect { location_host, .. } => location_host,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(toward(None), None);
        assert_eq!(toward(Some("/login?next=tok-LEAK")), None, "same origin");
        assert_eq!(toward(Some("https://ACME.looker.com:443/x")), None);
        assert_eq!(toward(Some("http://[::1")), None, "unparsable");
        assert_eq!(
            toward(Some(
                "https://user:tok-LEAK@evil.example/a?tok-LEAK#tok-LEAK"
            )),
            Some("evil.example".into())
        );
        assert_eq!(
            toward(Some("https://acme.looker.com:8443/")),
            Some("acme.looker.com:8443".into())
        );
        assert_eq!(
            toward(Some("http://acme.looker.com/")),
            Some("acme.looker.com".into()),
            "to plain http"
        );
        let e = redirect_error(
            "POST",
            &url,
            &Response::from(
                axum::http::Response::builder()
                    .status(301)
                    .header(LOCATION, "https://evil.example/tok-LEAK")
                    .body(Vec::<u8>::new())
                    .unwrap(),
            ),
            "42",
        );
        assert_eq!(e.reason(), "LookerRedirect");
        assert_eq!(
            e.to_string(),
            "Look 42: Looker answered a redirect (HTTP 301) to POST /api/4.0/login toward host evil.example; redirects are not followed: spec.looker.baseUrl must be the Looker API host itself"
        );
    }

    #[test]
    fn only_looker_s_own_message_is_taken_from_a_body() {
        let m = |b: &str| looker_message(b.as_bytes());
        assert_eq!(
            m(
                r#"{"message": "Not found", "documentation_url": "https://cloud.google.com/looker/docs/"}"#
            ),
            Some("Not found".into())
        );
        assert_eq!(
            m("{\"message\": \" line one\\n\\u001b[2Jline two \"}"),
            Some("line one [2Jline two".into()),
            "control characters removed"
        );
        let long = m(&format!(r#"{{"message": "{}"}}"#, "x".repeat(500))).unwrap();
        assert_eq!(
            long.chars().count(),
            MAX_MESSAGE_CHARS + 1,
            "cut and marked"
        );
        for other in [
            r#"{"access_token": "tok-LEAK", "error": "boom"}"#,
            r#"{"message": {"access_token": "tok-LEAK"}}"#,
            r#"{"message": 5}"#,
            r#"{"message": "   "}"#,
            r#"[{"message": "tok-LEAK"}]"#,
            r#"["tok-LEAK"]"#,
            "<html><body>tok-LEAK</body></html>",
            "tok-LEAK",
            "",
        ] {
            assert_eq!(m(other), None, "{other}");
        }
    }
}
