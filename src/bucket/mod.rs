//! An S3-compatible bucket for stored audiences (AWS S3, GCS through its S3 interoperability,
//! MinIO, Ceph), through `object_store`: for audiences that outgrow Secrets (etcd). The
//! controller keeps each export's audience under `<prefix>/<uid>/` (`--audience-store
//! s3://BUCKET/PREFIX`), `run` under the key it is given (`--state s3://BUCKET/KEY`); the
//! layout and its rules are in [`objects`].
//!
//! Credentials are never an argument: static keys come from the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; the chart maps them
//! from a Secret), or else the pod's workload identity (`AWS_WEB_IDENTITY_TOKEN_FILE` with
//! `AWS_ROLE_ARN`, EKS Pod Identity, the instance metadata). Requests are signed with ring
//! and sent over the process's rustls (ring too). No message of this module carries a
//! credential or a server's answer verbatim (an S3 error body may echo the access key id):
//! failures are described by their kind, status and S3 error code.

pub mod objects;
pub mod pending;

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{ClientOptions, RetryConfig};

pub use objects::{AudienceObjects, Staged};
pub use pending::PendingObjects;

use crate::redacted::Redacted;

/// The scheme of a bucket URL.
pub const SCHEME: &str = "s3://";

/// Server-side encryption values S3 accepts in `x-amz-server-side-encryption`.
pub const ENCRYPTIONS: [&str; 3] = ["AES256", "aws:kms", "aws:kms:dsse"];

/// Why the bucket could not be used. Messages name the bucket, object or setting, never a
/// credential and never a user.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// A setting is wrong (`what` names it).
    #[error("{what}: {why}")]
    Invalid {
        /// The flag, field or variable.
        what: String,
        /// What is wrong and how to mend it.
        why: String,
    },
    /// A request to the bucket failed.
    #[error("cannot {action} {object}: {why}")]
    Request {
        /// What was being done: `read`, `write`, `list`, `delete`.
        action: &'static str,
        /// `s3://bucket/key`.
        object: String,
        /// What went wrong, in words of our own.
        why: String,
    },
    /// An object is missing or does not match the manifest.
    #[error("the stored audience is damaged: {0}")]
    Damaged(String),
    /// The objects do not form an audience.
    #[error("the stored audience cannot be read: {0}")]
    Audience(#[from] crate::audience::AudienceError),
}

impl BucketError {
    /// Condition-style reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "AudienceStoreInvalid",
            Self::Request { .. } => "AudienceStoreUnavailable",
            Self::Damaged(_) | Self::Audience(_) => "AudienceDamaged",
        }
    }
}

/// How to reach the bucket, besides its URL.
#[derive(Clone, Debug, Default)]
pub struct BucketSettings {
    /// The S3 API's base URL (MinIO, Ceph, `https://storage.googleapis.com`); `None`: AWS,
    /// or `AWS_ENDPOINT_URL` when the environment is read. Plain `http` only on loopback.
    pub endpoint: Option<String>,
    /// The bucket's region (`None`: `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// Server-side encryption asked of every write: `AES256`, `aws:kms`, `aws:kms:dsse`.
    pub encryption: Option<String>,
    /// The KMS key of `aws:kms` or `aws:kms:dsse` (`None`: the bucket's default key).
    pub kms_key_id: Option<String>,
    /// Static keys given in code (tests); otherwise the environment or workload identity.
    pub keys: Option<(String, Redacted)>,
    /// Read the `AWS_*` environment (credentials, endpoint, region, encryption).
    pub from_env: bool,
}

/// An opened bucket and the prefix under which its audiences live.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    name: String,
    prefix: Path,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bucket({})", self.shown(&self.prefix))
    }
}

/// `s3://bucket/prefix` split into the bucket and the prefix (without slashes around it).
pub fn parse_url(url: &str, what: &str) -> Result<(String, String), BucketError> {
    let invalid = |why: String| BucketError::Invalid {
        what: what.to_owned(),
        why,
    };
    let rest = url
        .trim()
        .strip_prefix(SCHEME)
        .ok_or_else(|| invalid(format!("{url:?} is not an s3://BUCKET/PREFIX URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(invalid(format!(
            "{url:?} names no bucket (s3://BUCKET/PREFIX)"
        )));
    }
    if bucket.contains(['@', ':', '?', '#']) || prefix.contains(['?', '#']) {
        // Not echoed: it may hold a credential.
        return Err(invalid(
            "an s3://BUCKET/PREFIX URL holds no credentials, port, query or fragment (credentials come from the environment or the pod's identity; the endpoint from its own setting)".into(),
        ));
    }
    let prefix = prefix.trim_matches('/');
    Path::parse(prefix).map_err(|_| invalid(format!("{prefix:?} is not a valid object key")))?;
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// The endpoint to use: `https`, or `http` on loopback alone (identifiers are personal data:
/// never in clear text over a network). Answers whether plain http is allowed.
fn check_endpoint(endpoint: &str, what: &str) -> Result<bool, BucketError> {
    let url = url::Url::parse(endpoint.trim()).map_err(|e| BucketError::Invalid {
        what: what.to_owned(),
        why: format!("{endpoint:?} is not a URL ({e})"),
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(BucketError::Invalid {
            what: what.to_owned(),
            why: "must not contain a user name or password".into(),
        });
    }
    match url.scheme() {
        "https" => Ok(false),
        "http" if crate::http::is_loopback(&url) => Ok(true),
        _ => Err(BucketError::Invalid {
            what: what.to_owned(),
            why: format!(
                "{endpoint:?} must use https (plain http only on loopback): stored audiences hold personal data"
            ),
        }),
    }
}

impl Bucket {
    /// Opens `url` (`s3://BUCKET/PREFIX`; `what` names where it came from, for messages).
    /// Nothing is sent yet: an unreachable bucket shows at the first load or save.
    pub fn open(url: &str, what: &str, settings: &BucketSettings) -> Result<Self, BucketError> {
        crate::http::install_crypto_provider();
        let (name, prefix) = parse_url(url, what)?;
        let mut b = if settings.from_env {
            AmazonS3Builder::from_env()
        } else {
            AmazonS3Builder::new()
        };
        b = b.with_bucket_name(&name);
        let env_endpoint = settings.from_env.then(env_endpoint).flatten();
        let (endpoint, endpoint_what) = match (&settings.endpoint, env_endpoint) {
            (Some(e), _) => (Some(e.clone()), "--audience-store-endpoint".to_owned()),
            (None, Some((var, e))) => (Some(e), var),
            (None, None) => (None, String::new()),
        };
        let mut allow_http = false;
        if let Some(e) = &endpoint {
            allow_http = check_endpoint(e, &endpoint_what)?;
            b = b.with_endpoint(e.trim().trim_end_matches('/'));
        }
        if let Some(r) = &settings.region {
            b = b.with_region(r);
        }
        if let Some((id, secret)) = &settings.keys {
            b = b
                .with_access_key_id(id)
                .with_secret_access_key(secret.expose());
        }
        b = with_encryption(b, settings)?;
        let client = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(120));
        let retry = RetryConfig {
            max_retries: 4,
            retry_timeout: Duration::from_secs(60),
            ..RetryConfig::default()
        };
        let store = b
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| BucketError::Invalid {
                what: what.to_owned(),
                // A configuration error names a key or a value's shape, never a secret's value.
                why: config_words(&e),
            })?;
        Ok(Self {
            store: Arc::new(store),
            name,
            prefix: Path::from(prefix.as_str()),
        })
    }

    /// The objects of one audience, under `<prefix>/<key>` (`key` empty: at the prefix).
    pub fn audience(&self, key: &str) -> AudienceObjects {
        let dir = if key.is_empty() {
            self.prefix.clone()
        } else {
            self.prefix.clone().join(key)
        };
        AudienceObjects::new(self.clone(), dir)
    }

    /// `s3://bucket/path`, for messages.
    pub fn shown(&self, path: &Path) -> String {
        format!("{SCHEME}{}/{path}", self.name)
    }

    /// The bucket's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

/// The endpoint the environment names (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`,
/// `AWS_ENDPOINT`), with the variable's name.
fn env_endpoint() -> Option<(String, String)> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
        .into_iter()
        .find_map(|var| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| (var.to_owned(), v))
        })
}

fn with_encryption(
    mut b: AmazonS3Builder,
    settings: &BucketSettings,
) -> Result<AmazonS3Builder, BucketError> {
    let config = |key: &str| -> AmazonS3ConfigKey { key.parse().expect("a known S3 setting") };
    if let Some(sse) = &settings.encryption {
        if !ENCRYPTIONS.contains(&sse.as_str()) {
            return Err(BucketError::Invalid {
                what: "--audience-store-sse".into(),
                why: format!("{sse:?} is not one of {}", ENCRYPTIONS.join(", ")),
            });
        }
        b = b.with_config(config("aws_server_side_encryption"), sse);
    }
    if let Some(key) = &settings.kms_key_id {
        b = b.with_config(config("aws_sse_kms_key_id"), key);
    }
    Ok(b)
}

/// A configuration error in words: its first line, which names the setting.
fn config_words(e: &object_store::Error) -> String {
    match e {
        object_store::Error::Generic { source, .. } => source.to_string(),
        other => other.to_string(),
    }
    .lines()
    .next()
    .unwrap_or_default()
    .to_owned()
}

/// A request's failure in words of our own: its kind, the HTTP status and the S3 error code,
/// never the server's body (it may echo the access key id) nor a URL's query.
pub(crate) fn describe(e: &object_store::Error) -> String {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => return "not found".into(),
        E::PermissionDenied { .. } => {
            return "access denied (403): the credentials may not do this; see the bucket's and the role's policy".into();
        }
        E::Unauthenticated { .. } => {
            return "the credentials were refused (401): check the access key or the pod's identity".into();
        }
        E::Precondition { .. } => return "it changed meanwhile (412)".into(),
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            return "the server does not support this request".into();
        }
        _ => {}
    }
    let mut cause: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind as K;
            return match h.kind() {
                K::Connect => {
                    "cannot connect to the endpoint (is the address right, and the server up?)"
                }
                K::Timeout => "the server did not answer in time",
                K::Interrupted => "the connection broke",
                K::Decode => "the answer could not be read",
                _ => "the request failed",
            }
            .into();
        }
        cause = c.source();
    }
    let text = e.to_string();
    let status = text
        .split_once("status code: ")
        .map(|(_, rest)| rest.split(':').next().unwrap_or_default().trim().to_owned());
    let code = s3_code(&text);
    match (status, code) {
        (Some(s), Some(c)) => format!("the server answered {s} ({c})"),
        (Some(s), None) => format!("the server answered {s}"),
        (None, Some(c)) => format!("the server answered {c}"),
        (None, None) => "the request failed".into(),
    }
}

/// The S3 error code of an XML error body (`<Code>AccessDenied</Code>`), when it is one.
fn s3_code(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("<Code>")?;
    let (code, _) = rest.split_once("</Code>")?;
    (!code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| code.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_urls_name_a_bucket_and_nothing_secret() {
        assert_eq!(
            parse_url("s3://audiences/prod/", "--audience-store").unwrap(),
            ("audiences".into(), "prod".into())
        );
        assert_eq!(
            parse_url("s3://audiences", "x").unwrap(),
            ("audiences".into(), String::new())
        );
        for bad in [
            "audiences/prod",
            "https://s3.amazonaws.com/a",
            "s3:///prod",
            "s3://key:secret@audiences/prod",
            "s3://audiences/prod?x=1",
        ] {
            let e = parse_url(bad, "--audience-store").unwrap_err().to_string();
            assert!(e.starts_with("--audience-store: "), "{e}");
            assert!(!e.contains("secret@"), "{e}");
        }
    }

    #[test]
    fn endpoints_are_https_or_loopback_http() {
        assert!(!check_endpoint("https://minio.storage:9000", "e").unwrap());
        assert!(check_endpoint("http://127.0.0.1:9000", "e").unwrap());
        let e = check_endpoint("http://minio.storage:9000", "the endpoint").unwrap_err();
        assert!(e.to_string().contains("must use https"), "{e}");
        assert!(check_endpoint("https://u:p@minio", "e").is_err());
    }

    #[test]
    fn s3_codes_are_taken_only_when_they_are_codes() {
        assert_eq!(
            s3_code("...<Error><Code>AccessDenied</Code><AWSAccessKeyId>AKIA</AWSAccessKeyId>"),
            Some("AccessDenied".into())
        );
        assert_eq!(s3_code("<Code>a b</Code>"), None);
        assert_eq!(s3_code("no body"), None);
    }

    #[test]
    fn an_unknown_encryption_is_refused_naming_the_choices() {
        let settings = BucketSettings {
            encryption: Some("rot13".into()),
            ..BucketSettings::default()
        };
        let e = Bucket::open("s3://b/p", "x", &settings).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--audience-store-sse: \"rot13\" is not one of AES256, aws:kms, aws:kms:dsse"
        );
    }
}
