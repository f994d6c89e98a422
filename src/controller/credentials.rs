//! Reading an export's credentials from its two Secrets, at the start of each run (so a
//! changed Secret is used by the next run without a restart), each read bounded in time.
//!
//! Whoever may patch a BrazeExport chooses both `spec.looker.baseUrl` and the Secret whose
//! values are posted there as the login form. So the Looker Secret's values are read only when
//! someone trusted sent them to that host: the operator's `--looker-allowed-hosts` names it, or
//! the Secret itself does, in its annotation `looker-braze.dev/allowed-hosts` (only who may
//! write the Secret can set it). Otherwise the export is refused before any value is read:
//! the annotation is looked at in the Secret's metadata alone.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use url::Url;

use super::context::Context;
use super::error::Error;
use super::status::reason;
use super::timeouts::API_TIMEOUT;
use crate::export::Credentials;
use crate::looker::hosts::AllowedHosts;
use crate::redacted::Redacted;
use crate::spec::{BrazeExport, BrazeExportSpec};

/// The annotation by which a Looker Secret names the hosts its values may be sent to.
pub const ALLOWED_HOSTS_ANNOTATION: &str = "looker-braze.dev/allowed-hosts";

const LOOKER: &str = "spec.looker.credentialsSecretRef";
const BRAZE: &str = "spec.braze.apiKeySecretRef";

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
    /// Nobody trusted allowed the export's Looker host to receive the Secret's values.
    #[error(
        "Looker host {host} may not receive the credentials in Secret {namespace}/{name} ({LOOKER}){detail}: allow it for every export with the operator's --looker-allowed-hosts (the chart's looker.allowedHosts), or for this Secret alone with its annotation {ALLOWED_HOSTS_ANNOTATION}: {host}"
    )]
    NotAllowed {
        namespace: String,
        name: String,
        host: String,
        detail: String,
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
    /// Condition reason: `SecretNotFound`, `CredentialsNotAllowed`, or `SecretUnreadable`
    /// for API errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } | Self::MissingKey { .. } => reason::SECRET_NOT_FOUND,
            Self::NotAllowed { .. } => reason::CREDENTIALS_NOT_ALLOWED,
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

/// Reads the Looker client id and secret and the Braze API key named by `spec`, once the
/// Looker host may receive them (see the module header; `operator` is the operator's list).
pub async fn credentials(
    client: &Client,
    namespace: &str,
    spec: &BrazeExportSpec,
    operator: &AllowedHosts,
) -> Result<Credentials, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let l = &spec.looker.credentials_secret_ref;
    let b = &spec.braze.api_key_secret_ref;
    let trusted = trusted_by_operator(operator, &spec.looker.base_url);
    let refused = |detail| SecretError::NotAllowed {
        namespace: namespace.into(),
        name: l.name.clone(),
        host: looker_host(&spec.looker.base_url),
        detail,
    };
    if !trusted {
        let annotation = allowed_hosts_of(&api, namespace, &l.name).await?;
        secret_allows(annotation.as_deref(), &spec.looker.base_url).map_err(refused)?;
    }
    // Both Secrets at once (each read once): 1,000 exports due together wait on fewer calls.
    let (looker, braze) = futures_util::future::join(
        fetch(&api, namespace, &l.name, LOOKER),
        fetch(&api, namespace, &b.name, BRAZE),
    )
    .await;
    let looker = looker?;
    if !trusted {
        // Looked at again on what was read: the annotation may have changed in between.
        let annotation = looker.annotations().get(ALLOWED_HOSTS_ANNOTATION);
        secret_allows(annotation.map(String::as_str), &spec.looker.base_url).map_err(refused)?;
    }
    let client_id = value(&looker, namespace, &l.client_id_key, LOOKER)?;
    let client_secret = value(&looker, namespace, &l.client_secret_key, LOOKER)?;
    let api_key = value(&braze?, namespace, &b.key, BRAZE)?;
    Ok(Credentials {
        looker_client_id: client_id.expose().to_owned(),
        looker_client_secret: client_secret,
        braze_api_key: Some(api_key),
    })
}

/// The Secret's allowed-hosts annotation, read from its metadata alone (its values never
/// reach the operator for it).
async fn allowed_hosts_of(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> Result<Option<String>, SecretError> {
    let meta = api
        .get_metadata_opt(name)
        .await
        .map_err(|source| SecretError::Api {
            namespace: namespace.into(),
            name: name.into(),
            source,
        })?
        .ok_or_else(|| SecretError::NotFound {
            namespace: namespace.into(),
            name: name.into(),
            field: LOOKER,
        })?;
    Ok(meta.annotations().get(ALLOWED_HOSTS_ANNOTATION).cloned())
}

/// The operator's own list names the host (an empty list, allowing any host to be called,
/// trusts none with credentials).
pub fn trusted_by_operator(operator: &AllowedHosts, base_url: &str) -> bool {
    !operator.is_any() && operator.check(base_url).is_ok()
}

/// Whether a Secret whose allowed-hosts annotation is `annotation` lets its values go to the
/// host of `base_url`; else what to add to the refusal (", whose annotation … lists …").
pub fn secret_allows(annotation: Option<&str>, base_url: &str) -> Result<(), String> {
    let Some(listed) = annotation.map(str::trim).filter(|a| !a.is_empty()) else {
        return Err(String::new());
    };
    let hosts = AllowedHosts::parse(listed).map_err(|why| {
        format!(", whose annotation {ALLOWED_HOSTS_ANNOTATION} is invalid ({why})")
    })?;
    if hosts.is_any() {
        // `*` lets the operator call any host, and so trusts none: here too.
        return Err(format!(
            ", whose annotation {ALLOWED_HOSTS_ANNOTATION} is * (name the hosts instead)"
        ));
    }
    hosts
        .check(base_url)
        .map_err(|_| format!(", whose annotation {ALLOWED_HOSTS_ANNOTATION} lists only {hosts}"))
}

/// The host of `spec.looker.baseUrl`, as shown in messages.
fn looker_host(base_url: &str) -> String {
    Url::parse(base_url.trim())
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| base_url.trim().to_owned())
}

/// Reads only the Braze API key named by `spec` (a cleanup on delete needs nothing else).
pub async fn braze_key(
    client: &Client,
    namespace: &str,
    spec: &BrazeExportSpec,
) -> Result<Credentials, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let b = &spec.braze.api_key_secret_ref;
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
        credentials(&ctx.client, &namespace, &export.spec, &ctx.allowed_hosts),
    )
    .await
    .map_err(|_| Error::Timeout("reading the export's Secrets"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOKER_URL: &str = "https://acme.cloud.looker.com";

    #[test]
    fn only_an_operator_list_naming_the_host_trusts_it() {
        let list = AllowedHosts::parse("*.cloud.looker.com").unwrap();
        assert!(trusted_by_operator(&list, LOOKER_URL));
        assert!(!trusted_by_operator(&list, "https://evil.example.com"));
        assert!(
            !trusted_by_operator(&AllowedHosts::any(), LOOKER_URL),
            "any host may be called, none is trusted with credentials"
        );
    }

    #[test]
    fn a_secret_allows_the_hosts_its_annotation_lists() {
        assert_eq!(
            secret_allows(Some("acme.cloud.looker.com"), LOOKER_URL),
            Ok(())
        );
        assert_eq!(
            secret_allows(Some(" other.looker.com , *.cloud.looker.com "), LOOKER_URL),
            Ok(())
        );
        assert_eq!(
            secret_allows(Some("127.0.0.1"), "http://127.0.0.1:8080"),
            Ok(())
        );
        assert_eq!(secret_allows(None, LOOKER_URL), Err(String::new()));
        assert_eq!(
            secret_allows(Some("*"), LOOKER_URL),
            Err(
                ", whose annotation looker-braze.dev/allowed-hosts is * (name the hosts instead)"
                    .into()
            )
        );
        assert_eq!(secret_allows(Some("  "), LOOKER_URL), Err(String::new()));
        assert_eq!(
            secret_allows(Some("other.looker.com"), LOOKER_URL),
            Err(
                ", whose annotation looker-braze.dev/allowed-hosts lists only other.looker.com"
                    .into()
            )
        );
        let bad = secret_allows(Some("https://acme.cloud.looker.com"), LOOKER_URL).unwrap_err();
        assert!(
            bad.starts_with(
                ", whose annotation looker-braze.dev/allowed-hosts is invalid (entry 1"
            ),
            "{bad}"
        );
    }

    #[test]
    fn the_refusal_names_the_host_the_secret_and_both_ways_to_allow_it() {
        let e = SecretError::NotAllowed {
            namespace: "marketing".into(),
            name: "app-db".into(),
            host: looker_host("https://evil.example.com/api/4.0"),
            detail: String::new(),
        };
        assert_eq!(e.reason(), "CredentialsNotAllowed");
        assert_eq!(
            e.to_string(),
            "Looker host evil.example.com may not receive the credentials in Secret marketing/app-db (spec.looker.credentialsSecretRef): allow it for every export with the operator's --looker-allowed-hosts (the chart's looker.allowedHosts), or for this Secret alone with its annotation looker-braze.dev/allowed-hosts: evil.example.com"
        );
    }
}
