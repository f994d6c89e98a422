//! The process's HTTP clients (one pool each for verified and unverified TLS, and for Looker
//! a pair that never follows redirects) and the loopback rule that lets tests and sandboxes
//! use plain `http`.

use std::sync::OnceLock;
use std::time::Duration;

use reqwest::Url;
use url::Host;

/// HTTP clients shared by every run in the process.
#[derive(Clone, Debug)]
pub struct HttpClients {
    verified: reqwest::Client,
    unverified: OnceLockClient,
    looker_verified: OnceLockClient,
    looker_unverified: OnceLockClient,
}

#[derive(Clone, Debug, Default)]
struct OnceLockClient(std::sync::Arc<OnceLock<reqwest::Client>>);

impl OnceLockClient {
    fn get_or_build(&self, build: impl FnOnce() -> reqwest::ClientBuilder) -> &reqwest::Client {
        self.0
            .get_or_init(|| build().build().expect("HTTP client builds"))
    }
}

impl HttpClients {
    /// Builds the clients (TLS via rustls with the ring provider).
    pub fn new() -> Self {
        install_crypto_provider();
        Self {
            verified: builder().build().expect("HTTP client builds"),
            unverified: OnceLockClient::default(),
            looker_verified: OnceLockClient::default(),
            looker_unverified: OnceLockClient::default(),
        }
    }

    /// The client for Braze (and the tests' own calls): certificate checks on unless
    /// `verify_tls` is false; redirects followed as reqwest does by default.
    pub fn get(&self, verify_tls: bool) -> &reqwest::Client {
        if verify_tls {
            &self.verified
        } else {
            self.unverified
                .get_or_build(|| builder().tls_danger_accept_invalid_certs(true))
        }
    }

    /// The client for Looker: like [`HttpClients::get`], but a 3xx is returned as it is,
    /// never followed. `baseUrl` is checked (and may be limited to allowed hosts); a redirect
    /// would carry the credentials and the request to a host nobody checked.
    pub fn looker(&self, verify_tls: bool) -> &reqwest::Client {
        let no_redirects = || builder().redirect(reqwest::redirect::Policy::none());
        if verify_tls {
            self.looker_verified.get_or_build(no_redirects)
        } else {
            self.looker_unverified
                .get_or_build(|| no_redirects().tls_danger_accept_invalid_certs(true))
        }
    }
}

impl Default for HttpClients {
    fn default() -> Self {
        Self::new()
    }
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("braze-export-operator/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        // HTTP/1.1 as before object_store turned reqwest's `http2` feature on: the in-flight
        // budget and the connection pools are sized for one request per connection.
        .http1_only()
}

/// Installs rustls' ring provider once per process (the one kube uses too).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// True when the URL's host is a loopback address (127.0.0.0/8, ::1) or exactly `localhost`.
/// Names under `.localhost` are not: some resolvers send them to DNS, and a key would then
/// travel in clear text to whoever answers.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Parses a user-written URL after trimming spaces and trailing slashes, refusing user info,
/// queries and fragments (they are how hosts get smuggled).
pub fn parse_base(raw: &str) -> Result<Url, String> {
    let trimmed = raw.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("must not be empty".into());
    }
    let url = Url::parse(trimmed).map_err(|e| format!("{trimmed:?} is not a URL ({e})"))?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{trimmed:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain a user name or password".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not contain a query (?) or fragment (#)".into());
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err("must use https (plain http is allowed only for loopback addresses), so credentials never travel in clear text".into()),
        other => Err(format!("unsupported scheme {other:?}: use https")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for u in [
            "http://127.0.0.1:8080",
            "http://127.9.9.9",
            "http://[::1]:1",
            "http://localhost:3",
            "http://LOCALHOST:3",
        ] {
            assert!(is_loopback(&Url::parse(u).unwrap()), "{u}");
        }
        for u in [
            "http://10.0.0.1",
            "http://example.com",
            "http://localhost.example.com",
            "http://a.localhost",
            "http://x.localhost:8080",
            "http://[::2]",
        ] {
            assert!(!is_loopback(&Url::parse(u).unwrap()), "{u}");
        }
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base(" https://a.example.com/ ").unwrap().as_str(),
            "https://a.example.com/"
        );
        assert!(
            parse_base("http://a.example.com")
                .unwrap_err()
                .contains("https")
        );
        assert!(parse_base("http://127.0.0.1:9").is_ok());
        assert!(parse_base("https://u:p@a.example.com").is_err());
        assert!(parse_base("https://a.example.com?x=1").is_err());
        assert!(parse_base("ftp://a.example.com").is_err());
        assert!(parse_base("not a url").is_err());
        assert!(parse_base("").is_err());
    }
}
