//! Reading an export's credentials from its two Secrets, at the start of each run (so a
//! changed Secret is used by the next run without a restart), each read bounded in time.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::context::Context;
use super::error::Error;
use super::status::reason;
use super::timeouts::API_TIMEOUT;
use crate::export::Credentials;
use crate::redacted::Redacted;
use crate::spec::{BrazeExport, BrazeExportSpec};

/// Why the credentials cannot be read. Messages name the Secret, key and field, never a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The Secret does not exist.
    #[error("Secret {namespace}/{name} not found ({field})")]
    NotFound {
        namespace: String,
        name: String,
        field: &'static str,
    },
    /// The key is missing or empty.
    #[error("Secret {namespace}/{name} has no key {key:?} ({field})")]
    MissingKey {
        namespace: String,
        name: String,
        key: String,
        field: &'static str,
    },
    /// The API call failed.
    #[error("cannot read Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

impl SecretError {
    /// Condition reason: `SecretNotFound`, or `SecretUnreadable` for API errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } | Self::MissingKey { .. } => reason::SECRET_NOT_FOUND,
            Self::Api { .. } => reason::SECRET_UNREADABLE,
        }
    }
}

/// One Secret, read once.
async fn fetch(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    field: &'static str,
) -> Result<Secret, SecretError> {
    let secret = api.get_opt(name).await.map_err(|source| SecretError::Api {
        namespace: namespace.into(),
        name: name.into(),
        source,
    })?;
    secret.ok_or_else(|| SecretError::NotFound {
        namespace: namespace.into(),
        name: name.into(),
        field,
    })
}

/// The trimmed, non-empty value of `key` in `secret`.
fn value(
    secret: &Secret,
    namespace: &str,
    key: &str,
    field: &'static str,
) -> Result<Redacted, SecretError> {
    let text = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .map(|s| s.trim().to_owned());
    match text {
        Some(t) if !t.is_empty() => Ok(Redacted::new(t)),
        _ => Err(SecretError::MissingKey {
            namespace: namespace.into(),
            name: secret.metadata.name.clone().unwrap_or_default(),
            key: key.into(),
            field,
        }),
    }
}

/// Reads the Looker client id and secret and the Braze API key named by `spec`.
pub async fn credentials(
    client: &Client,
    namespace: &str,
    spec: &BrazeExportSpec,
) -> Result<Credentials, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let l = &spec.looker.credentials_secret_ref;
    let b = &spec.braze.api_key_secret_ref;
    const LOOKER: &str = "spec.looker.credentialsSecretRef";
    const BRAZE: &str = "spec.braze.apiKeySecretRef";
    // Both Secrets at once (each read once): 1,000 exports due together wait on fewer calls.
    let (looker, braze) = futures_util::future::join(
        fetch(&api, namespace, &l.name, LOOKER),
        fetch(&api, namespace, &b.name, BRAZE),
    )
    .await;
    let looker = looker?;
    let client_id = value(&looker, namespace, &l.client_id_key, LOOKER)?;
    let client_secret = value(&looker, namespace, &l.client_secret_key, LOOKER)?;
    let api_key = value(&braze?, namespace, &b.key, BRAZE)?;
    Ok(Credentials {
        looker_client_id: client_id.expose().to_owned(),
        looker_client_secret: client_secret,
        braze_api_key: Some(api_key),
    })
}

/// Reads only the Braze API key named by `spec` (a cleanup on delete needs nothing else).
pub async fn braze_key(
    client: &Client,
    namespace: &str,
    spec: &BrazeExportSpec,
) -> Result<Credentials, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let b = &spec.braze.api_key_secret_ref;
    const BRAZE: &str = "spec.braze.apiKeySecretRef";
    let secret = fetch(&api, namespace, &b.name, BRAZE).await?;
    Ok(Credentials {
        looker_client_id: String::new(),
        looker_client_secret: Redacted::new(String::new()),
        braze_api_key: Some(value(&secret, namespace, &b.key, BRAZE)?),
    })
}

/// The export's credentials, or why not; `Err` only when the API does not answer in time.
pub async fn read_credentials(
    ctx: &Context,
    export: &BrazeExport,
) -> Result<Result<Credentials, SecretError>, Error> {
    let namespace = export.namespace().unwrap_or_default();
    tokio::time::timeout(
        API_TIMEOUT,
        credentials(&ctx.client, &namespace, &export.spec),
    )
    .await
    .map_err(|_| Error::Timeout("reading the export's Secrets"))
}
