//! Placeholder; replaced by the looker-sec branch.

/// Looker hosts the operator may call.
#[derive(Clone, Debug, Default)]
pub struct AllowedHosts(Option<Vec<String>>);

impl AllowedHosts {
    /// Any host.
    pub fn any() -> Self {
        Self(None)
    }
    /// Parses a list.
    pub fn parse(list: &str) -> Result<Self, String> {
        Ok(Self(Some(
            list.split(',').map(|s| s.trim().to_lowercase()).collect(),
        )))
    }
    /// Checks a base URL.
    pub fn check(&self, base_url: &str) -> Result<(), String> {
        let Some(list) = &self.0 else { return Ok(()) };
        let host = url::Url::parse(base_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        if list.iter().any(|p| {
            p.strip_prefix("*.")
                .map_or(*p == host, |d| host.ends_with(&format!(".{d}")))
        }) {
            Ok(())
        } else {
            Err(format!("spec.looker.baseUrl: host {host} is not allowed"))
        }
    }
}
