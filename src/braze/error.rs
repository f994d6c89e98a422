//! The Braze answers that stop a whole run, each with its reason.

/// An answer from Braze that stops the whole run: more requests would fail the same way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrazeError {
    /// 401: bad key, or a key of another instance.
    #[error(
        "Braze refused the API key: POST {url} answered 401 (the key is invalid or belongs to another Braze instance than {host})"
    )]
    Unauthorized { url: String, host: String },
    /// 403: the key lacks `users.track`, or the account may not use the endpoint.
    #[error(
        "Braze denied access: POST {url} answered 403 (the API key needs the users.track permission{detail})"
    )]
    Forbidden { url: String, detail: String },
    /// 404: not a Braze REST endpoint.
    #[error(
        "Braze answered 404 to POST {url}: spec.braze.endpoint must be the instance's REST endpoint, e.g. https://rest.iad-01.braze.com"
    )]
    NotFound { url: String },
    /// The API key cannot be put in a header.
    #[error("the Braze API key contains characters that are not allowed in an HTTP header")]
    BadKey,
}

impl BrazeError {
    /// Short CamelCase reason for conditions, metrics and report errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized { .. } => "BrazeUnauthorized",
            Self::Forbidden { .. } => "BrazeForbidden",
            Self::NotFound { .. } => "BrazeEndpointNotFound",
            Self::BadKey => "InvalidSecret",
        }
    }
}
