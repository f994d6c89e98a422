//! Where a Braze API key may be sent: the instance's REST endpoint and nowhere else.

use reqwest::Url;

use crate::http::{is_loopback, parse_base};

/// The `/users/track` URL for `spec.braze.endpoint`: `https` with a host under `braze.com` or
/// `braze.eu` (spaces and trailing slashes trimmed), or any loopback address. Anything else
/// is refused, so a key never goes to a stranger.
pub fn track_url(raw: &str) -> Result<Url, String> {
    let url = parse_base(raw)?;
    if url.path() != "/" {
        return Err(format!(
            "must be the instance's REST endpoint without a path, e.g. https://rest.iad-01.braze.com (found path {})",
            url.path()
        ));
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let braze_host = ["braze.com", "braze.eu"]
        .iter()
        .any(|d| host == *d || host.ends_with(&format!(".{d}")));
    if !braze_host && !is_loopback(&url) {
        return Err(format!(
            "host {host} is not a Braze host (…braze.com or …braze.eu): the API key is only ever sent to Braze"
        ));
    }
    url.join("users/track").map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_braze_rest_hosts_and_trims() {
        for (raw, want) in [
            (
                "https://rest.iad-01.braze.com",
                "https://rest.iad-01.braze.com/users/track",
            ),
            (
                "https://rest.iad-01.braze.com/",
                "https://rest.iad-01.braze.com/users/track",
            ),
            (
                "  https://rest.fra-01.braze.eu// ",
                "https://rest.fra-01.braze.eu/users/track",
            ),
            (
                "HTTPS://REST.BRAZE.COM",
                "https://rest.braze.com/users/track",
            ),
            (
                "https://rest.us-10.braze.com:443",
                "https://rest.us-10.braze.com/users/track",
            ),
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/users/track"),
            ("http://localhost:9/", "http://localhost:9/users/track"),
        ] {
            assert_eq!(track_url(raw).unwrap().as_str(), want, "{raw}");
        }
    }

    #[test]
    fn refuses_strangers_and_smuggled_hosts() {
        for raw in [
            "https://evil.example/?x=.braze.com",
            "https://evil.example/.braze.com",
            "https://rest.notbraze.com",
            "https://braze.com.evil.example",
            "https://rest.braze.com@evil.example",
            "https://rest.iad-01.braze.com/users/track",
            "http://rest.iad-01.braze.com",
            "rest.iad-01.braze.com",
            "https://evil.example#.braze.com",
            "http://10.0.0.1",
            "",
        ] {
            assert!(track_url(raw).is_err(), "{raw} must be refused");
        }
        assert!(
            track_url("https://rest.notbraze.com")
                .unwrap_err()
                .contains("rest.notbraze.com is not a Braze host")
        );
    }
}
