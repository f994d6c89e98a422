//! The Looker API 4.0 side: login, running a Look, and reading its `json_detail` stream.

pub mod body;
pub mod cap;
pub mod client;
pub mod hosts;
pub mod json_detail;

use reqwest::{StatusCode, Url};

pub use client::LookerClient;
pub use hosts::AllowedHosts;

/// The API path every Looker call is made under.
pub const API_PREFIX: &str = "api/4.0";

/// Turns `spec.looker.baseUrl` into the API root `…/api/4.0/`. Accepts a URL that already
/// ends in `/api/4.0`; refuses anything but `https` outside loopback.
pub fn api_base(raw: &str) -> Result<Url, String> {
    let mut url = crate::http::parse_base(raw)?;
    let path = url
        .path()
        .trim_end_matches('/')
        .trim_end_matches("/api/4.0")
        .trim_end_matches('/')
        .to_owned();
    url.set_path(&format!("{path}/{API_PREFIX}/"));
    Ok(url)
}

/// What can go wrong on the Looker side of a run. Each variant has a [`LookerError::reason`]
/// for conditions and metrics; no message carries a credential, a row's data, or any part of
/// an answer's body but Looker's own error `message` (cleaned and cut): `baseUrl` is chosen
/// by whoever may create an export, so a body could be any internal service's answer.
#[derive(Debug, thiserror::Error)]
pub enum LookerError {
    /// Looker could not be reached (DNS, TCP, TLS).
    #[error("cannot reach Looker at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The client id or secret was refused (Looker answers 404 on /login for bad credentials).
    #[error(
        "Looker refused the API credentials: POST {url} answered {status}; check the client id and secret"
    )]
    AuthFailed { url: String, status: StatusCode },
    /// The Look does not exist, or the API user may not see it.
    #[error(
        "Look {look_id} was not found (GET {url} answered 404): it does not exist or the API user may not see it"
    )]
    LookNotFound { look_id: String, url: String },
    /// Looker answered 429.
    #[error("Looker rate-limited the request (GET {url} answered 429)")]
    RateLimited { url: String },
    /// Any other unexpected status. `message` is Looker's own error message, if its body
    /// was a JSON error carrying one; the body itself is never shown.
    #[error(
        "Look {look_id}: Looker answered HTTP {} to {method} {path}{}",
        .status.as_u16(),
        said(.message)
    )]
    Http {
        look_id: String,
        method: &'static str,
        path: String,
        status: StatusCode,
        message: Option<String>,
    },
    /// A 3xx. Redirects are not followed: they would lead to a host nobody allowed.
    #[error(
        "Look {look_id}: Looker answered a redirect (HTTP {}) to {method} {path}{}; redirects are not followed: spec.looker.baseUrl must be the Looker API host itself",
        .status.as_u16(),
        toward(.location_host)
    )]
    Redirect {
        look_id: String,
        method: &'static str,
        path: String,
        status: StatusCode,
        /// The host (and port) the redirect pointed to, when it is another origin.
        location_host: Option<String>,
    },
    /// A success status whose body is not what the endpoint returns (`what` says how).
    #[error("Look {look_id}: Looker answered HTTP {} to {method} {path} {what} (body not shown)", .status.as_u16())]
    BadAnswer {
        look_id: String,
        method: &'static str,
        path: String,
        status: StatusCode,
        what: &'static str,
    },
    /// The query ran but the database reported errors.
    #[error("Look {look_id} failed in Looker: {message}")]
    QueryError { look_id: String, message: String },
    /// Looker did not finish within `timeoutSeconds`.
    #[error("Looker did not deliver Look {look_id} within timeoutSeconds ({seconds} s)")]
    Timeout { look_id: String, seconds: u64 },
    /// The body was cut off or is not `json_detail`.
    #[error("the result of Look {look_id} is not readable json_detail: {detail}")]
    Body { look_id: String, detail: String },
    /// The Look is pivoted.
    #[error(
        "Look {look_id} is pivoted ({detail}): pivots are not supported, remove them from the Look"
    )]
    Pivoted { look_id: String, detail: String },
}

fn said(message: &Option<String>) -> String {
    match message {
        Some(m) => format!(", saying \"{m}\""),
        None => " (body not shown)".into(),
    }
}

fn toward(host: &Option<String>) -> String {
    match host {
        Some(h) => format!(" toward host {h}"),
        None => String::new(),
    }
}

impl LookerError {
    /// Short CamelCase reason for conditions, metrics and report errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "LookerUnreachable",
            Self::AuthFailed { .. } => "LookerAuthFailed",
            Self::LookNotFound { .. } => "LookNotFound",
            Self::RateLimited { .. } => "LookerRateLimited",
            Self::Http { .. } | Self::BadAnswer { .. } => "LookerError",
            Self::Redirect { .. } => "LookerRedirect",
            Self::QueryError { .. } => "LookerQueryError",
            Self::Timeout { .. } => "LookerTimeout",
            Self::Body { .. } => "LookerBodyInvalid",
            Self::Pivoted { .. } => "PivotNotSupported",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_base_appends_the_version_once() {
        for raw in [
            "https://acme.cloud.looker.com",
            "https://acme.cloud.looker.com/",
            " https://acme.cloud.looker.com/api/4.0/ ",
        ] {
            assert_eq!(
                api_base(raw).unwrap().as_str(),
                "https://acme.cloud.looker.com/api/4.0/",
                "{raw}"
            );
        }
        assert_eq!(
            api_base("https://h:19999").unwrap().as_str(),
            "https://h:19999/api/4.0/"
        );
        assert_eq!(
            api_base("http://127.0.0.1:5/").unwrap().as_str(),
            "http://127.0.0.1:5/api/4.0/"
        );
        assert!(
            api_base("http://acme.cloud.looker.com")
                .unwrap_err()
                .contains("https")
        );
    }
}
