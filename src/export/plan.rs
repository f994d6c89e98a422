//! A validated export: everything a run needs from the spec, checked once.

use std::time::Duration;

use reqwest::Url;

use super::mapping::ObjectShape;
use crate::audience::{Flag, workspace_fingerprint};
use crate::redacted::Redacted;
use crate::spec::{
    BrazeExportSpec, DEFAULT_ACTIVE_DEADLINE_SECONDS, FieldError, RateLimitSpec, RemovalMode,
    ResultsMode,
};

/// The credentials of a run, read from Secrets or the environment.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Looker API client id.
    pub looker_client_id: String,
    /// Looker API client secret.
    pub looker_client_secret: Redacted,
    /// Braze REST API key; not needed for a dry run.
    pub braze_api_key: Option<Redacted>,
}

/// A spec that passed validation, in the shape the pipeline uses.
#[derive(Clone, Debug)]
pub struct ExportPlan {
    /// The export's name (for logs).
    pub name: String,
    /// Looker API root, `…/api/4.0/`.
    pub looker_api: Url,
    /// The Look.
    pub look_id: String,
    /// Table or all results.
    pub results: ResultsMode,
    /// Identifier field instead of the `braze_id` tag.
    pub id_field: Option<String>,
    /// Check Looker's certificate.
    pub verify_tls: bool,
    /// Time Looker may take.
    pub looker_timeout_seconds: u64,
    /// `spec.activeDeadlineSeconds`, or its default.
    pub active_deadline_seconds: u64,
    /// Braze `/users/track` URL.
    pub track_url: Url,
    /// What every object shares.
    pub shape: ObjectShape,
    /// Objects per request.
    pub batch_size: usize,
    /// Requests in flight.
    pub concurrency: usize,
    /// Ceiling for the workspace.
    pub rate_limit: RateLimitSpec,
    /// Rows beyond this are skipped.
    pub max_rows: Option<u64>,
    /// Whether users who leave the Look lose the flag.
    pub removal: RemovalMode,
    /// A run removing a larger share of the audience (percent) removes nobody.
    pub removal_limit_percent: u32,
    /// Users flagged by the last successful run are not sent again.
    pub delta: bool,
    /// How often a delta export sends everyone again.
    pub full_resync_interval: jiff::SignedDuration,
}

impl ExportPlan {
    /// Validates `spec` and builds the plan, or returns every problem.
    pub fn new(name: &str, spec: &BrazeExportSpec) -> Result<Self, Vec<FieldError>> {
        let errors = spec.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        let invalid = |field: &str, message: String| {
            vec![FieldError {
                field: field.into(),
                message,
            }]
        };
        let looker_api = crate::looker::api_base(&spec.looker.base_url)
            .map_err(|e| invalid("spec.looker.baseUrl", e))?;
        let track_url = crate::braze::endpoint::track_url(&spec.braze.endpoint)
            .map_err(|e| invalid("spec.braze.endpoint", e))?;
        let full_resync_interval = crate::spec::parse_interval(&spec.braze.full_resync_interval)
            .map_err(|e| invalid("spec.braze.fullResyncInterval", e))?;
        Ok(Self {
            name: name.to_owned(),
            looker_api,
            look_id: spec.looker.look_id.trim().to_owned(),
            results: spec.looker.results,
            id_field: spec.looker.id_field.clone(),
            verify_tls: spec.looker.verify_tls,
            looker_timeout_seconds: spec.looker.timeout_seconds,
            active_deadline_seconds: spec
                .active_deadline_seconds
                .unwrap_or(DEFAULT_ACTIVE_DEADLINE_SECONDS),
            track_url,
            shape: ObjectShape {
                identifier: spec.braze.identifier,
                alias_label: spec.braze.alias_label.clone().unwrap_or_default(),
                update_existing_only: spec.braze.update_existing_only,
                attribute: spec.braze.attribute.clone(),
                export_name: spec.braze.export_name.clone(),
            },
            batch_size: spec.braze.batch_size as usize,
            concurrency: spec.braze.concurrency as usize,
            rate_limit: spec.braze.rate_limit.unwrap_or_default(),
            max_rows: spec.max_rows,
            removal: spec.braze.removal,
            removal_limit_percent: spec.braze.removal_limit_percent,
            delta: spec.braze.delta,
            full_resync_interval,
        })
    }

    /// Whether runs need the stored audience (`removal: Remove` or `delta: true`).
    pub fn needs_audience(&self) -> bool {
        self.removal == RemovalMode::Remove || self.delta
    }

    /// The flag this export gives.
    pub fn flag(&self) -> Flag {
        Flag {
            attribute: self.shape.attribute.clone(),
            export_name: self.shape.export_name.clone(),
        }
    }

    /// The fingerprint of the Braze workspace a run with `creds` writes to (`None` without
    /// a key: a dry run).
    pub fn workspace(&self, creds: &Credentials) -> Option<String> {
        let key = creds.braze_api_key.as_ref()?;
        Some(workspace_fingerprint(self.track_url.as_str(), key.expose()))
    }

    /// The Looker timeout as a duration.
    pub fn looker_timeout(&self) -> Duration {
        Duration::from_secs(self.looker_timeout_seconds)
    }

    /// The whole run's deadline.
    pub fn active_deadline(&self) -> Duration {
        Duration::from_secs(self.active_deadline_seconds)
    }
}
