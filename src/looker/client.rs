//! Looker API 4.0 client: log in with client credentials, run a Look as `json_detail`.

use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Response, StatusCode, Url};
use serde::Deserialize;

use super::LookerError;
use super::body::{OutOfTime, WaitBudget};
use crate::secret::Secret;
use crate::spec::ResultsMode;
use crate::text::{error_chain, truncate};

/// A client for one Looker instance and one set of API credentials.
#[derive(Clone, Debug)]
pub struct LookerClient {
    http: reqwest::Client,
    api: Url,
    client_id: String,
    client_secret: Secret,
    timeout_seconds: u64,
}

#[derive(Deserialize)]
struct AccessToken {
    access_token: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: Option<String>,
}

impl LookerClient {
    /// `api` is the root from [`super::api_base`]; `timeout_seconds` is only named in errors.
    pub fn new(
        http: reqwest::Client,
        api: Url,
        client_id: String,
        client_secret: Secret,
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

    /// Logs in: client id and secret in a form body, never in the URL.
    pub async fn login(
        &self,
        budget: &mut WaitBudget,
        look_id: &str,
    ) -> Result<Secret, LookerError> {
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
        let body = self.read_small(response, budget, &url, look_id).await?;
        let token: AccessToken = serde_json::from_slice(&body).map_err(|e| LookerError::Http {
            method: "POST",
            url: url.to_string(),
            status,
            message: format!("the answer is not an AccessToken ({e})"),
        })?;
        Ok(Secret::new(token.access_token))
    }

    /// Logs in and starts running the Look; logs in once more if the token is refused (401).
    /// Returns the response whose body is the streamed result.
    pub async fn run_look(
        &self,
        look_id: &str,
        results: ResultsMode,
        budget: &mut WaitBudget,
    ) -> Result<Response, LookerError> {
        let url = Self::run_url(&self.api, look_id, results);
        let mut relogged = false;
        loop {
            let token = self.login(budget, look_id).await?;
            let mut auth =
                HeaderValue::from_str(&format!("token {}", token.expose())).map_err(|_| {
                    LookerError::Http {
                        method: "POST",
                        url: self.login_url().to_string(),
                        status: StatusCode::OK,
                        message: "the access token is not a valid header value".into(),
                    }
                })?;
            auth.set_sensitive(true);
            // No reqwest timeout here: it would also cover the body, which may take hours
            // when Braze paces the run. The budget bounds the wait for the answer; the body
            // reader bounds each stall (see `body::forward`).
            let request = self.http.get(url.clone()).header(AUTHORIZATION, auth);
            let response = self.send(budget, request, &url, look_id).await?;
            match response.status() {
                s if s.is_success() => return Ok(response),
                StatusCode::UNAUTHORIZED if !relogged => {
                    tracing::info!(
                        look_id,
                        "Looker refused the access token (401); logging in again"
                    );
                    relogged = true;
                }
                StatusCode::NOT_FOUND => {
                    return Err(LookerError::LookNotFound {
                        look_id: look_id.to_owned(),
                        url: url.to_string(),
                    });
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    return Err(LookerError::RateLimited {
                        url: url.to_string(),
                    });
                }
                _ => {
                    return Err(self
                        .http_error("GET", &url, response, budget, look_id)
                        .await);
                }
            }
        }
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

    async fn read_small(
        &self,
        response: Response,
        budget: &mut WaitBudget,
        url: &Url,
        look_id: &str,
    ) -> Result<bytes::Bytes, LookerError> {
        match budget.wait(response.bytes()).await {
            Err(OutOfTime) => Err(self.timeout(look_id)),
            Ok(Err(e)) => Err(LookerError::Unreachable {
                url: url.to_string(),
                detail: error_chain(&e.without_url()),
            }),
            Ok(Ok(b)) => Ok(b),
        }
    }

    async fn http_error(
        &self,
        method: &'static str,
        url: &Url,
        response: Response,
        budget: &mut WaitBudget,
        look_id: &str,
    ) -> LookerError {
        let status = response.status();
        let message = match self.read_small(response, budget, url, look_id).await {
            Ok(body) => match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(ErrorBody { message: Some(m) }) => truncate(&m, 300),
                _ => truncate(String::from_utf8_lossy(&body).trim(), 200),
            },
            Err(e) => e.to_string(),
        };
        LookerError::Http {
            method,
            url: url.to_string(),
            status,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_url_carries_the_spec_s_query() {
        let api = super::super::api_base("https://acme.cloud.looker.com").unwrap();
        assert_eq!(
            LookerClient::run_url(&api, "42", ResultsMode::Table).as_str(),
            "https://acme.cloud.looker.com/api/4.0/looks/42/run/json_detail?apply_formatting=false&apply_vis=false&generate_drill_links=false"
        );
        assert_eq!(
            LookerClient::run_url(&api, "a/b c", ResultsMode::All).as_str(),
            "https://acme.cloud.looker.com/api/4.0/looks/a%2Fb%20c/run/json_detail?apply_formatting=false&apply_vis=false&generate_drill_links=false&limit=-1"
        );
    }
}
