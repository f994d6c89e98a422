//! Where Looker's API lives: the API root under `spec.looker.baseUrl`.

use reqwest::Url;

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
