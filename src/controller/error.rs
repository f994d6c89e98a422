//! The controller layer's error: what a reconcile, a run task or a cleanup can fail with, each
//! with a reason for metrics. Conflicts and missing objects are answers, sorted out of kube's
//! errors here so every caller reads them the same way.

/// Errors of the controller layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// The object changed since it was read (409): the write was refused.
    #[error("the export changed since it was read: {0}")]
    Conflict(String),
    /// The object is gone (404).
    #[error("the export no longer exists")]
    Gone,
    /// The run is no longer this instance's: the export was recreated or taken over.
    #[error("the run is no longer this operator's")]
    Lost,
    /// An API call took too long.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The leader election task stopped.
    #[error("leader election stopped")]
    Election,
}

impl Error {
    /// Sorts a kube error: conflicts and missing objects are answers, not failures.
    pub fn from_kube(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 409 => Self::Conflict(s.message),
            kube::Error::Api(s) if s.code == 404 => Self::Gone,
            e => Self::Kube(e),
        }
    }

    /// When the apiserver refused the write for good: `Forbidden` (403, RBAC) or `Invalid`
    /// (422, the object cannot take it), as its `Status` names them. Trying again does not
    /// change such an answer; a person must.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            Self::Kube(kube::Error::Api(s)) if s.code == 403 => Some("Forbidden"),
            Self::Kube(kube::Error::Api(s)) if s.code == 422 => Some("Invalid"),
            _ => None,
        }
    }

    /// Reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "ApiError",
            Self::Kube(_) => "KubeError",
            Self::Conflict(_) => "Conflict",
            Self::Gone => "Gone",
            Self::Lost => "Lost",
            Self::Timeout(_) => "Timeout",
            Self::Election => "Election",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::from_kube(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> Error {
        Error::from_kube(kube::Error::Api(
            kube::core::Status::failure("refused", "Refused")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn only_403_and_422_are_refusals_a_retry_cannot_change() {
        assert_eq!(api_error(403).refusal(), Some("Forbidden"));
        assert_eq!(api_error(422).refusal(), Some("Invalid"));
        assert_eq!(api_error(500).refusal(), None);
        assert!(matches!(api_error(409), Error::Conflict(_)));
        assert!(matches!(api_error(404), Error::Gone));
        assert_eq!(Error::Timeout("x").refusal(), None);
    }
}
