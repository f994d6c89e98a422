//! What can go wrong on the Looker side of a run, each with its reason.

use reqwest::StatusCode;

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
