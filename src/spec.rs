//! The `BrazeExport` resource: spec types with their defaults, and validation that reports
//! every problem with the path of its field.

use std::fmt;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::export::report::{Outcome, RunReport, Trigger};

/// API group and version of the resource.
pub const API_VERSION: &str = "looker-braze.dev/v1alpha1";
/// Kind of the resource.
pub const KIND: &str = "BrazeExport";

/// A recurring export of a Looker Look to Braze user flags: on each run, every user in the
/// Look gets `exportName` appended to the array attribute `attribute`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "looker-braze.dev",
    version = "v1alpha1",
    kind = "BrazeExport",
    plural = "brazeexports",
    shortname = "bzx",
    namespaced,
    status = "BrazeExportStatus",
    doc = "A recurring export of a Looker Look to Braze user flags.",
    printcolumn = r#"{"name": "Look", "type": "string", "jsonPath": ".spec.looker.lookId"}"#,
    printcolumn = r#"{"name": "Schedule", "type": "string", "jsonPath": ".spec.schedule"}"#,
    printcolumn = r#"{"name": "Suspend", "type": "boolean", "jsonPath": ".spec.suspend"}"#,
    printcolumn = r#"{"name": "Last Run", "type": "date", "jsonPath": ".status.lastRun.completionTime"}"#,
    printcolumn = r#"{"name": "Sent", "type": "integer", "jsonPath": ".status.lastRun.sent"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Status", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name": "Next Run", "type": "date", "jsonPath": ".status.nextScheduleTime", "priority": 1}"#,
    printcolumn = r#"{"name": "Removed", "type": "integer", "jsonPath": ".status.lastRun.removed", "priority": 1}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.cleanupOnDelete) || !self.cleanupOnDelete || (has(self.braze.removal) && self.braze.removal == 'Remove')").message("cleanupOnDelete needs braze.removal: Remove"))]
pub struct BrazeExportSpec {
    /// 5-field cron expression, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    #[schemars(length(min = 1))]
    pub schedule: String,
    /// IANA time zone the schedule is read in; UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// True stops scheduled runs; manual runs are still allowed.
    #[serde(default)]
    pub suspend: bool,
    /// A missed run older than this is skipped, not caught up; default one schedule interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_622_400))]
    pub starting_deadline_seconds: Option<i64>,
    /// Where the rows come from.
    pub looker: LookerSpec,
    /// Where the flags go.
    pub braze: BrazeSpec,
    /// Safety cap: rows beyond it are counted as skipped and not sent; no cap when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000_000_000u64))]
    pub max_rows: Option<u64>,
    /// With `braze.removal: Remove`: deleting the export first removes its flag from its
    /// audience.
    #[serde(default)]
    pub cleanup_on_delete: bool,
    /// Longest a run may take, start to end, however its answers trickle; past it the run is
    /// stopped and fails with `DeadlineExceeded`. 21600 (6 hours) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604_800))]
    pub active_deadline_seconds: Option<u64>,
}

/// A run's deadline when `spec.activeDeadlineSeconds` is absent: 6 hours.
pub const DEFAULT_ACTIVE_DEADLINE_SECONDS: u64 = 6 * 3600;

/// The Looker side of an export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LookerSpec {
    /// API host without `/api/4.0`, like `LOOKERSDK_BASE_URL`; `https` except on loopback.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://127.') || self.matches('^http://localhost(:[0-9]+)?(/.*)?$') || self.startsWith('http://[::1]')").message("baseUrl must use https (plain http only for loopback addresses)"))]
    pub base_url: String,
    /// The Look to run (a string, as in Looker API 4.0).
    #[serde(deserialize_with = "string_or_number")]
    #[schemars(length(min = 1))]
    pub look_id: String,
    /// Secret in the export's namespace holding the API client id and secret.
    pub credentials_secret_ref: CredentialsSecretRef,
    /// `Table`: the Look's own row limit; `All`: every row.
    #[serde(default)]
    pub results: ResultsMode,
    /// Field holding the user identifier, instead of the field tagged `braze_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_field: Option<String>,
    /// Verify Looker's TLS certificate.
    #[serde(default = "default_true")]
    pub verify_tls: bool,
    /// Seconds Looker may take to log in and deliver the whole result.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u64,
}

/// Names a Secret and the keys of the Looker API credentials in it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialsSecretRef {
    /// Secret name, in the export's namespace.
    pub name: String,
    /// Key of the client id; default `client_id`.
    #[serde(default = "default_client_id_key")]
    pub client_id_key: String,
    /// Key of the client secret; default `client_secret`.
    #[serde(default = "default_client_secret_key")]
    pub client_secret_key: String,
}

/// Which rows of the Look are exported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ResultsMode {
    /// The Look's own row limit ("Results in Table").
    #[default]
    Table,
    /// Every row ("All Results", `limit=-1`).
    All,
}

/// The Braze side of an export.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.identifier != 'user_alias' || (has(self.aliasLabel) && self.aliasLabel != '')").message("aliasLabel is required when identifier is user_alias"))]
pub struct BrazeSpec {
    /// REST endpoint of the Braze instance, e.g. `https://rest.iad-01.braze.com`.
    #[x_kube(validation = Rule::new("self.trim().startsWith('https://') || self.startsWith('http://127.') || self.matches('^http://localhost(:[0-9]+)?(/.*)?$') || self.startsWith('http://[::1]')").message("endpoint must use https (plain http only for loopback addresses)"))]
    pub endpoint: String,
    /// Secret key holding the REST API key (permission `users.track`).
    pub api_key_secret_ref: SecretKeyRef,
    /// How users are identified.
    #[serde(default)]
    pub identifier: IdentifierKind,
    /// Alias label; required when `identifier` is `user_alias`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias_label: Option<String>,
    /// Value appended to the array attribute; default `LOOKER_EXPORT`.
    #[serde(default = "default_export_name")]
    #[schemars(length(min = 1, max = 255))]
    pub export_name: String,
    /// Array custom attribute the export name is added to; default `looker_export`.
    #[serde(default = "default_attribute")]
    #[schemars(length(min = 1, max = 255))]
    pub attribute: String,
    /// Never create users: only existing ones are flagged.
    #[serde(default = "default_true")]
    pub update_existing_only: bool,
    /// Attribute objects per request, 1 to 75.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 75))]
    pub batch_size: u32,
    /// Upper bound on requests in flight for one run, 1 to 1024 (default 512). Below it, the
    /// number in flight sizes itself from the rate limit and the latency Braze shows.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 1024))]
    pub concurrency: u32,
    /// Client-side ceiling on requests to this workspace (shared by every run using it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// `Keep`: flags are only added. `Remove`: users flagged by the previous run and absent
    /// from this run's Look lose the flag (needs the stored audience).
    #[serde(default)]
    pub removal: RemovalMode,
    /// With `Remove`: a run that would remove a larger share of the previous audience (in
    /// percent) removes nobody; default 20.
    #[serde(default = "default_removal_limit_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub removal_limit_percent: u32,
    /// True: users flagged by the last successful run are not sent again (needs the stored
    /// audience).
    #[serde(default)]
    pub delta: bool,
    /// With `delta`: how often everyone is sent again (a full resync), such as `168h` (the
    /// default, 7 days), `36h` or `1h30m`.
    #[serde(default = "default_full_resync_interval")]
    #[schemars(length(min = 2), regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"))]
    pub full_resync_interval: String,
}

/// What happens to users who leave the Look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RemovalMode {
    /// They keep the flag (flags are only added).
    #[default]
    Keep,
    /// They lose it: the run removes the export's name from their array.
    Remove,
}

/// Parses a duration written like `168h`, `36h`, `90m` or `1h30m` (hours, minutes and
/// seconds); it must be longer than zero.
pub fn parse_interval(text: &str) -> Result<jiff::SignedDuration, String> {
    let t = text.trim();
    let shaped = !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'h' | b'm' | b's'))
        && t.bytes().next().is_some_and(|b| b.is_ascii_digit());
    let d: jiff::SignedDuration =
        t.parse().ok().filter(|_| shaped).ok_or_else(|| {
            format!("{text:?} is not a duration: write it like 168h, 36h or 1h30m")
        })?;
    if d.is_zero() || d.is_negative() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(d)
}

/// A key in a Secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Secret name, in the export's namespace.
    pub name: String,
    /// Key in the Secret; default `api_key`.
    #[serde(default = "default_api_key_key")]
    pub key: String,
}

/// At most `requests` requests in any `periodSeconds` window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Requests allowed per period.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests: u32,
    /// Length of the period in seconds.
    #[schemars(range(min = 1, max = 86_400))]
    pub period_seconds: u32,
}

impl Default for RateLimitSpec {
    /// Braze's documented burst limit for `/users/track`: 3,000 requests per 3 seconds.
    fn default() -> Self {
        Self {
            requests: 3000,
            period_seconds: 3,
        }
    }
}

/// How a row's identifier is sent to Braze.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IdentifierKind {
    /// `{"external_id": "u1"}`
    #[default]
    ExternalId,
    /// `{"braze_id": "u1"}`
    BrazeId,
    /// `{"user_alias": {"alias_name": "u1", "alias_label": "<aliasLabel>"}}`
    UserAlias,
}

impl IdentifierKind {
    /// The key of the identifier in a Braze attributes object.
    pub fn key(self) -> &'static str {
        match self {
            Self::ExternalId => "external_id",
            Self::BrazeId => "braze_id",
            Self::UserAlias => "user_alias",
        }
    }
}

/// Attribute names an export may never write: Braze's primary identifier keys and the
/// update-only flag.
pub const RESERVED_ATTRIBUTES: [&str; 4] = [
    "external_id",
    "braze_id",
    "user_alias",
    "_update_existing_only",
];

/// Braze's limit for custom attribute keys and string values.
pub const MAX_ATTRIBUTE_CHARS: usize = 255;

/// What the controller observed and did; written through the status subresource only, by
/// server-side apply: a field absent here is removed from the object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrazeExportStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (spec valid and the last run succeeded) and `Running` (a run is in progress).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The operator instance running the export now (absent when no run is in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    /// When the last scheduled run was due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Timestamp>,
    /// When the next scheduled run is due (absent when suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Timestamp>,
    /// When a run last succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Timestamp>,
    /// The value of the `looker-braze.dev/run-now` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_run_request: Option<String>,
    /// The last (or current) run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunReport>,
    /// The last 10 runs, newest first.
    #[serde(default)]
    pub history: Vec<RunSummary>,
}

/// One line of the run history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    /// When the run started.
    pub start_time: Timestamp,
    /// What started it.
    pub trigger: Trigger,
    /// How it ended.
    pub outcome: Outcome,
    /// Objects Braze accepted.
    pub sent: u64,
    /// How long it took.
    pub duration_seconds: f64,
}

/// One problem in a spec: the field's path and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path such as `spec.braze.endpoint`.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl FieldError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Joins field errors into one message, `; `-separated.
pub fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl BrazeExportSpec {
    /// Checks what the CRD schema cannot: cron syntax, time zone, URLs, names and ranges.
    /// Returns every problem found, each naming its field.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Err(e) = crate::cron::parse_cron(&self.schedule) {
            errors.push(FieldError::new("spec.schedule", e));
        }
        if let Some(tz) = &self.time_zone
            && jiff::tz::TimeZone::get(tz).is_err()
        {
            errors.push(FieldError::new(
                "spec.timeZone",
                format!("unknown time zone {tz:?}: use an IANA name such as Europe/Berlin"),
            ));
        }
        if let Some(d) = self.starting_deadline_seconds
            && !(0..=31_622_400).contains(&d)
        {
            errors.push(FieldError::new(
                "spec.startingDeadlineSeconds",
                "must be 0 to 31622400 (one year)",
            ));
        }
        if let Some(d) = self.active_deadline_seconds
            && !(1..=604_800).contains(&d)
        {
            errors.push(FieldError::new(
                "spec.activeDeadlineSeconds",
                "must be 1 to 604800 (one week) when set",
            ));
        }
        if let Some(n) = self.max_rows
            && !(1..=1_000_000_000_000).contains(&n)
        {
            errors.push(FieldError::new(
                "spec.maxRows",
                "must be 1 to 1000000000000 when set",
            ));
        }
        self.looker.validate(&mut errors);
        self.braze.validate(&mut errors);
        if self.cleanup_on_delete && self.braze.removal != RemovalMode::Remove {
            errors.push(FieldError::new(
                "spec.cleanupOnDelete",
                "needs spec.braze.removal: Remove (with Keep the export never removes its flag)",
            ));
        }
        errors
    }
}

impl LookerSpec {
    fn validate(&self, errors: &mut Vec<FieldError>) {
        if let Err(e) = crate::looker::api_base(&self.base_url) {
            errors.push(FieldError::new("spec.looker.baseUrl", e));
        }
        if self.look_id.trim().is_empty() {
            errors.push(FieldError::new("spec.looker.lookId", "must not be empty"));
        }
        require_name(
            errors,
            "spec.looker.credentialsSecretRef.name",
            &self.credentials_secret_ref.name,
        );
        require_name(
            errors,
            "spec.looker.credentialsSecretRef.clientIdKey",
            &self.credentials_secret_ref.client_id_key,
        );
        require_name(
            errors,
            "spec.looker.credentialsSecretRef.clientSecretKey",
            &self.credentials_secret_ref.client_secret_key,
        );
        if let Some(f) = &self.id_field
            && f.trim().is_empty()
        {
            errors.push(FieldError::new(
                "spec.looker.idField",
                "must not be empty when set",
            ));
        }
        if !(1..=86_400).contains(&self.timeout_seconds) {
            errors.push(FieldError::new(
                "spec.looker.timeoutSeconds",
                "must be between 1 and 86400",
            ));
        }
    }
}

impl BrazeSpec {
    fn validate(&self, errors: &mut Vec<FieldError>) {
        if let Err(e) = crate::braze::endpoint::track_url(&self.endpoint) {
            errors.push(FieldError::new("spec.braze.endpoint", e));
        }
        require_name(
            errors,
            "spec.braze.apiKeySecretRef.name",
            &self.api_key_secret_ref.name,
        );
        require_name(
            errors,
            "spec.braze.apiKeySecretRef.key",
            &self.api_key_secret_ref.key,
        );
        match (&self.identifier, &self.alias_label) {
            (IdentifierKind::UserAlias, None) => errors.push(FieldError::new(
                "spec.braze.aliasLabel",
                "is required when identifier is user_alias",
            )),
            (IdentifierKind::UserAlias, Some(l)) if l.trim().is_empty() => errors.push(
                FieldError::new("spec.braze.aliasLabel", "must not be empty"),
            ),
            _ => {}
        }
        check_braze_string(errors, "spec.braze.exportName", &self.export_name);
        check_braze_string(errors, "spec.braze.attribute", &self.attribute);
        if self.attribute.starts_with('$') {
            errors.push(FieldError::new(
                "spec.braze.attribute",
                "must not start with $",
            ));
        }
        if RESERVED_ATTRIBUTES.contains(&self.attribute.as_str()) {
            errors.push(FieldError::new(
                "spec.braze.attribute",
                format!(
                    "{:?} is reserved by Braze and cannot hold the export flag",
                    self.attribute
                ),
            ));
        }
        if !(1..=75).contains(&self.batch_size) {
            errors.push(FieldError::new(
                "spec.braze.batchSize",
                "must be between 1 and 75 (Braze's limit per request)",
            ));
        }
        if !(1..=1024).contains(&self.concurrency) {
            errors.push(FieldError::new(
                "spec.braze.concurrency",
                "must be between 1 and 1024",
            ));
        }
        if self.removal_limit_percent > 100 {
            errors.push(FieldError::new(
                "spec.braze.removalLimitPercent",
                "must be between 0 and 100",
            ));
        }
        if let Err(e) = parse_interval(&self.full_resync_interval) {
            errors.push(FieldError::new("spec.braze.fullResyncInterval", e));
        }
        if let Some(r) = &self.rate_limit {
            if !(1..=1_000_000).contains(&r.requests) {
                errors.push(FieldError::new(
                    "spec.braze.rateLimit.requests",
                    "must be 1 to 1000000",
                ));
            }
            if !(1..=86_400).contains(&r.period_seconds) {
                errors.push(FieldError::new(
                    "spec.braze.rateLimit.periodSeconds",
                    "must be 1 to 86400",
                ));
            }
        }
    }
}

fn require_name(errors: &mut Vec<FieldError>, field: &str, value: &str) {
    if value.trim().is_empty() {
        errors.push(FieldError::new(field, "must not be empty"));
    }
}

fn check_braze_string(errors: &mut Vec<FieldError>, field: &str, value: &str) {
    if value.trim().is_empty() {
        errors.push(FieldError::new(field, "must not be empty"));
    } else if value.chars().count() > MAX_ATTRIBUTE_CHARS {
        errors.push(FieldError::new(
            field,
            format!("must be at most {MAX_ATTRIBUTE_CHARS} characters (Braze's limit)"),
        ));
    }
}

fn default_true() -> bool {
    true
}
fn default_timeout_seconds() -> u64 {
    300
}
fn default_client_id_key() -> String {
    "client_id".into()
}
fn default_client_secret_key() -> String {
    "client_secret".into()
}
fn default_api_key_key() -> String {
    "api_key".into()
}
fn default_export_name() -> String {
    "LOOKER_EXPORT".into()
}
fn default_attribute() -> String {
    "looker_export".into()
}
fn default_batch_size() -> u32 {
    75
}
fn default_concurrency() -> u32 {
    512
}
fn default_removal_limit_percent() -> u32 {
    20
}
fn default_full_resync_interval() -> String {
    "168h".into()
}

/// Accepts `lookId: 42` as well as `lookId: "42"`: Looker ids are strings, YAML makes
/// numbers of them easily.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        S(String),
        N(u64),
    }
    Ok(match Id::deserialize(d)? {
        Id::S(s) => s,
        Id::N(n) => n.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> BrazeExportSpec {
        serde_saphyr::from_str(yaml).expect("spec parses")
    }

    const MINIMAL: &str = r#"
schedule: "0 6 * * *"
looker:
  baseUrl: https://acme.cloud.looker.com
  lookId: 42
  credentialsSecretRef: {name: looker-api}
braze:
  endpoint: https://rest.iad-01.braze.com
  apiKeySecretRef: {name: braze-api}
"#;

    #[test]
    fn defaults_follow_the_spec() {
        let s = spec(MINIMAL);
        assert_eq!(s.looker.look_id, "42");
        assert_eq!(s.looker.results, ResultsMode::Table);
        assert!(s.looker.verify_tls);
        assert_eq!(s.looker.timeout_seconds, 300);
        assert_eq!(s.looker.credentials_secret_ref.client_id_key, "client_id");
        assert_eq!(
            s.looker.credentials_secret_ref.client_secret_key,
            "client_secret"
        );
        assert_eq!(s.braze.api_key_secret_ref.key, "api_key");
        assert_eq!(s.braze.identifier, IdentifierKind::ExternalId);
        assert_eq!(s.braze.export_name, "LOOKER_EXPORT");
        assert_eq!(s.braze.attribute, "looker_export");
        assert!(s.braze.update_existing_only);
        assert_eq!(s.braze.batch_size, 75);
        assert!(!s.suspend);
        assert_eq!(s.max_rows, None);
        assert_eq!(s.braze.removal, RemovalMode::Keep);
        assert_eq!(s.braze.removal_limit_percent, 20);
        assert!(!s.braze.delta);
        assert_eq!(s.braze.full_resync_interval, "168h");
        assert!(!s.cleanup_on_delete);
        assert!(s.validate().is_empty(), "{:?}", s.validate());
    }

    #[test]
    fn validation_names_every_bad_field() {
        let mut s = spec(MINIMAL);
        s.schedule = "61 * * * *".into();
        s.time_zone = Some("Mars/Olympus".into());
        s.looker.base_url = "http://acme.cloud.looker.com".into();
        s.braze.endpoint = "https://evil.example/?x=.braze.com".into();
        s.braze.identifier = IdentifierKind::UserAlias;
        s.braze.batch_size = 76;
        s.braze.attribute = "external_id".into();
        s.max_rows = Some(0);
        let fields: Vec<String> = s.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "spec.schedule",
                "spec.timeZone",
                "spec.maxRows",
                "spec.looker.baseUrl",
                "spec.braze.endpoint",
                "spec.braze.aliasLabel",
                "spec.braze.attribute",
                "spec.braze.batchSize",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_saphyr::from_str::<BrazeExportSpec>(
            &MINIMAL.replace("schedule:", "schedul: x\nschedule:"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("schedul"), "{err}");
    }

    #[test]
    fn export_name_and_attribute_respect_braze_limits() {
        let mut s = spec(MINIMAL);
        s.braze.export_name = "x".repeat(256);
        s.braze.attribute = "$flags".into();
        let errs = s.validate();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0]
                .to_string()
                .starts_with("spec.braze.exportName: must be at most 255")
        );
        assert_eq!(
            errs[1].to_string(),
            "spec.braze.attribute: must not start with $"
        );
    }

    #[test]
    fn audience_fields_are_checked() {
        let mut s = spec(MINIMAL);
        s.braze.removal_limit_percent = 101;
        s.braze.full_resync_interval = "7d".into();
        s.cleanup_on_delete = true;
        let errs: Vec<String> = s.validate().iter().map(ToString::to_string).collect();
        assert_eq!(
            errs,
            [
                "spec.braze.removalLimitPercent: must be between 0 and 100",
                "spec.braze.fullResyncInterval: \"7d\" is not a duration: write it like 168h, 36h or 1h30m",
                "spec.cleanupOnDelete: needs spec.braze.removal: Remove (with Keep the export never removes its flag)",
            ]
        );
        s.braze.removal = RemovalMode::Remove;
        s.braze.removal_limit_percent = 100;
        s.braze.full_resync_interval = "1h30m".into();
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        for ok in ["168h", "36h", "90m", "1h30m", "45s"] {
            assert!(parse_interval(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            parse_interval("168h").unwrap(),
            jiff::SignedDuration::from_hours(168)
        );
        for bad in ["", "0h", "h", "-1h", "1 hour", "PT1H", "1d", "1.5h"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
