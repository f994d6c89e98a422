//! Which Looker hosts the operator may call: the list behind `--looker-allowed-hosts`.
//!
//! Whoever may create a BrazeExport chooses `spec.looker.baseUrl`, and the operator calls it
//! from inside the cluster with the export's credentials. A list such as
//! `*.looker.com,*.cloud.looker.com` keeps those calls on Looker. Entries are exact host
//! names, exact IP addresses, or `*.domain` (any name under `domain`, at any depth, but not
//! `domain` itself and never an IP address). Names compare as URLs spell them: lower case,
//! international names in their `xn--` form, without a trailing dot.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use url::{Host, Url};

/// The hosts `spec.looker.baseUrl` may name. [`AllowedHosts::any`] (the default) allows
/// every host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    /// `None`: any host.
    entries: Option<Vec<Entry>>,
}

/// One entry of the list, normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    /// `*.domain`: any name ending in `.domain`.
    Under(String),
    /// Exactly this name.
    Name(String),
    /// Exactly this address.
    Ip(IpAddr),
}

impl AllowedHosts {
    /// Every host is allowed (no `--looker-allowed-hosts`).
    pub fn any() -> Self {
        Self { entries: None }
    }

    /// True when every host is allowed.
    pub fn is_any(&self) -> bool {
        self.entries.is_none()
    }

    /// Parses a comma-separated list: `*.looker.com`, `looker.internal.example`,
    /// `10.0.0.7`, `[fd00::7]`. Case does not matter; spaces around entries and trailing dots
    /// are ignored. Refused: an empty list or entry, a port, a URL, a `*` anywhere but a
    /// leading `*.`, and `*.` before an IP address. `*` alone means any host.
    pub fn parse(list: &str) -> Result<AllowedHosts, String> {
        if list.trim().is_empty() {
            return Err(
                "the list of allowed hosts is empty: name at least one host, or leave the option out to allow any host"
                    .into(),
            );
        }
        if list.trim() == "*" {
            return Ok(Self::any());
        }
        let mut entries = Vec::new();
        for (i, raw) in list.split(',').enumerate() {
            let entry = parse_entry(raw).map_err(|why| {
                format!(
                    "entry {} ({:?}) of the allowed hosts {why}",
                    i + 1,
                    raw.trim()
                )
            })?;
            if !entries.contains(&entry) {
                entries.push(entry);
            }
        }
        Ok(Self {
            entries: Some(entries),
        })
    }

    /// Checks the host of `spec.looker.baseUrl`; the error names the field, the host and
    /// this list. Any URL passes when every host is allowed (other checks judge the URL).
    pub fn check(&self, base_url: &str) -> Result<(), String> {
        if self.is_any() {
            return Ok(());
        }
        let url = Url::parse(base_url.trim()).map_err(|_| {
            format!(
                "spec.looker.baseUrl is not a URL, so its host cannot be checked against the hosts this operator allows (--looker-allowed-hosts {self})"
            )
        })?;
        let Some(host) = url.host() else {
            return Err(format!(
                "spec.looker.baseUrl has no host, and this operator allows only some (--looker-allowed-hosts {self})"
            ));
        };
        if self.allows(&host) {
            return Ok(());
        }
        Err(format!(
            "spec.looker.baseUrl: host {host} is not allowed by this operator (--looker-allowed-hosts {self})"
        ))
    }

    fn allows(&self, host: &Host<&str>) -> bool {
        let Some(entries) = &self.entries else {
            return true;
        };
        match host {
            Host::Domain(d) => {
                let name = d.trim_end_matches('.').to_ascii_lowercase();
                entries.iter().any(|e| match e {
                    Entry::Name(n) => *n == name,
                    Entry::Under(domain) => is_under(&name, domain),
                    Entry::Ip(_) => false,
                })
            }
            Host::Ipv4(ip) => allows_ip(entries, IpAddr::V4(*ip)),
            Host::Ipv6(ip) => allows_ip(entries, IpAddr::V6(*ip)),
        }
    }
}

fn allows_ip(entries: &[Entry], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    entries
        .iter()
        .any(|e| matches!(e, Entry::Ip(allowed) if allowed.to_canonical() == ip))
}

/// `name` is `<one or more labels>.domain`.
fn is_under(name: &str, domain: &str) -> bool {
    name.strip_suffix(domain)
        .and_then(|prefix| prefix.strip_suffix('.'))
        .is_some_and(|labels| !labels.is_empty() && labels.split('.').all(|l| !l.is_empty()))
}

/// One entry, or why it is refused (the sentence follows "entry N (…) of the allowed hosts").
fn parse_entry(raw: &str) -> Result<Entry, String> {
    let entry = raw.trim().trim_end_matches('.').trim_end();
    if entry.is_empty() {
        return Err("is empty: separate hosts with single commas".into());
    }
    if entry == "*" {
        return Err("is * (any host): write it alone, or name hosts".into());
    }
    if entry.contains('/') {
        return Err("is a URL: write the host name alone, as in *.looker.com".into());
    }
    if let Some(domain) = entry.strip_prefix("*.") {
        if domain.contains('*') {
            return Err("has a * after the leading *.".into());
        }
        return match parse_host(domain)? {
            Entry::Name(d) => Ok(Entry::Under(d)),
            _ => Err("puts *. before an IP address: *. patterns match names only".into()),
        };
    }
    if entry.contains('*') {
        return Err("has a * that is not a leading *. (as in *.looker.com)".into());
    }
    parse_host(entry)
}

/// A host name or IP address without wildcard.
fn parse_host(text: &str) -> Result<Entry, String> {
    if let Ok(ip) = text.parse::<Ipv6Addr>() {
        return Ok(Entry::Ip(IpAddr::V6(ip)));
    }
    let bracketed = text.starts_with('[') && text.ends_with(']');
    if text.contains(':') && !bracketed {
        return Err(
            "has a port: ports are not part of the allowed hosts, write the host alone".into(),
        );
    }
    match Host::parse(text) {
        Ok(Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_owned();
            check_name(&d)?;
            Ok(Entry::Name(d))
        }
        Ok(Host::Ipv4(ip)) => Ok(Entry::Ip(IpAddr::V4(ip))),
        Ok(Host::Ipv6(ip)) => Ok(Entry::Ip(IpAddr::V6(ip))),
        Err(e) => Err(format!("is not a host name or IP address ({e})")),
    }
}

/// A DNS name: labels of letters, digits and inner hyphens, 1 to 63 long, 253 in all.
fn check_name(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err("is longer than a host name may be (253 characters)".into());
    }
    for label in name.split('.') {
        let fine = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !fine {
            return Err(format!(
                "is not a host name: label {label:?} must be 1 to 63 letters, digits or inner hyphens"
            ));
        }
    }
    Ok(())
}

impl fmt::Display for AllowedHosts {
    /// The normalised list, comma-separated as the option takes it; `*` for any host.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(entries) = &self.entries else {
            return f.write_str("*");
        };
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match e {
                Entry::Under(d) => write!(f, "*.{d}")?,
                Entry::Name(n) => f.write_str(n)?,
                Entry::Ip(IpAddr::V4(ip)) => write!(f, "{ip}")?,
                Entry::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]")?,
            }
        }
        Ok(())
    }
}

impl FromStr for AllowedHosts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(list: &str) -> AllowedHosts {
        AllowedHosts::parse(list).unwrap_or_else(|e| panic!("{list}: {e}"))
    }

    fn allowed(list: &str, url: &str) -> bool {
        hosts(list).check(url).is_ok()
    }

    #[test]
    fn any_allows_everything_and_says_so() {
        let any = AllowedHosts::any();
        assert!(any.is_any());
        assert_eq!(any, AllowedHosts::default());
        assert_eq!(any.to_string(), "*");
        for url in [
            "https://acme.cloud.looker.com",
            "https://internal.svc.cluster.local",
            "https://10.0.0.1",
            "not a url",
            "",
        ] {
            assert!(any.check(url).is_ok(), "{url}");
        }
        assert!(hosts("*").is_any());
        assert!(hosts(" * ").is_any());
        assert!(!hosts("*.looker.com").is_any());
    }

    #[test]
    fn a_star_pattern_matches_subdomains_at_any_depth_but_not_the_domain() {
        let list = "*.looker.com";
        for url in [
            "https://acme.looker.com",
            "https://acme.cloud.looker.com",
            "https://a.b.c.looker.com/",
            "https://ACME.Looker.COM",
            "https://acme.looker.com.",
            "https://acme.looker.com:19999",
            "https://acme.looker.com/api/4.0",
            " https://acme.looker.com ",
        ] {
            assert!(allowed(list, url), "{url}");
        }
        for url in [
            "https://looker.com",
            "https://looker.com.",
            "https://evillooker.com",
            "https://acme.looker.com.evil.example",
            "https://looker.com.evil.example",
            "https://acme.looker.co",
            "https://xlooker.com",
            "https://127.0.0.1",
        ] {
            assert!(!allowed(list, url), "{url}");
        }
    }

    #[test]
    fn exact_names_match_only_themselves() {
        let list = "looker.internal.example, Other.Example.";
        for url in [
            "https://looker.internal.example",
            "https://LOOKER.internal.example.",
            "https://other.example:8443/",
        ] {
            assert!(allowed(list, url), "{url}");
        }
        for url in [
            "https://a.looker.internal.example",
            "https://internal.example",
            "https://looker.internal.example.evil",
            "https://other.example.com",
        ] {
            assert!(!allowed(list, url), "{url}");
        }
    }

    #[test]
    fn ip_addresses_match_exact_ip_entries_only() {
        let list = "10.0.0.7,[fd00::7],::1,*.looker.com";
        for url in [
            "https://10.0.0.7",
            "https://10.0.0.7:443/",
            "https://[fd00::7]",
            "https://[FD00:0:0::7]",
            "http://[::1]:8080",
            "https://[::ffff:10.0.0.7]",
            "https://0x0a.0.0.7",
            "https://167772167",
        ] {
            assert!(allowed(list, url), "{url}");
        }
        for url in [
            "https://10.0.0.8",
            "https://[fd00::8]",
            "https://127.0.0.1",
            "https://0.0.0.0",
        ] {
            assert!(!allowed(list, url), "{url}");
        }
        for url in ["https://[::1]", "https://10.0.0.7", "https://1.2.3.4"] {
            assert!(
                !allowed("*.example,*.com", url),
                "*. never matches an IP: {url}"
            );
        }
    }

    #[test]
    fn international_names_compare_in_their_ascii_form() {
        assert!(allowed(
            "*.bücher.example",
            "https://looker.xn--bcher-kva.example"
        ));
        assert!(allowed(
            "*.xn--bcher-kva.example",
            "https://looker.BÜCHER.example"
        ));
        assert_eq!(hosts("Bücher.example").to_string(), "xn--bcher-kva.example");
    }

    #[test]
    fn the_refusal_names_the_field_the_host_and_the_list() {
        let list = hosts("*.looker.com, *.cloud.looker.com");
        assert_eq!(
            list.check("https://internal.svc.cluster.local/api/4.0")
                .unwrap_err(),
            "spec.looker.baseUrl: host internal.svc.cluster.local is not allowed by this operator (--looker-allowed-hosts *.looker.com,*.cloud.looker.com)"
        );
        assert_eq!(
            hosts("10.0.0.7")
                .check("https://[fd00::1]:443")
                .unwrap_err(),
            "spec.looker.baseUrl: host [fd00::1] is not allowed by this operator (--looker-allowed-hosts 10.0.0.7)"
        );
        let not_url = list.check("acme.looker.com").unwrap_err();
        assert!(
            not_url.starts_with("spec.looker.baseUrl is not a URL")
                && not_url.contains("*.looker.com,*.cloud.looker.com"),
            "{not_url}"
        );
        assert!(
            list.check("mailto:someone@acme.looker.com")
                .unwrap_err()
                .starts_with("spec.looker.baseUrl has no host")
        );
    }

    #[test]
    fn display_is_the_normalised_list_and_parses_back() {
        let list = hosts(" *.Looker.com. , LOOKER.example ,10.0.0.7, [FD00::7] ,::1, *.looker.com");
        let shown = list.to_string();
        assert_eq!(
            shown, "*.looker.com,looker.example,10.0.0.7,[fd00::7],[::1]",
            "normalised, duplicates once"
        );
        assert_eq!(hosts(&shown), list);
        assert_eq!(
            "*.looker.com".parse::<AllowedHosts>(),
            Ok(hosts("*.looker.com"))
        );
    }

    #[test]
    fn bad_lists_are_refused_with_the_entry_and_why() {
        for (list, why) in [
            ("", "the list of allowed hosts is empty"),
            ("  ", "the list of allowed hosts is empty"),
            ("a.example,", "entry 2 (\"\") of the allowed hosts is empty"),
            (
                "a.example,,b.example",
                "entry 2 (\"\") of the allowed hosts is empty",
            ),
            (",a.example", "entry 1 (\"\") of the allowed hosts is empty"),
            (".", "entry 1 (\".\") of the allowed hosts is empty"),
            ("a.example:443", "has a port"),
            ("*.looker.com:443", "has a port"),
            ("10.0.0.7:443", "has a port"),
            ("[fd00::7]:443", "has a port"),
            ("https://acme.looker.com", "is a URL"),
            ("acme.looker.com/api", "is a URL"),
            ("*,*.looker.com", "is * (any host): write it alone"),
            ("*.", "is * (any host): write it alone"),
            ("*looker.com", "has a * that is not a leading *."),
            ("a.*.looker.com", "has a * that is not a leading *."),
            ("*.*.looker.com", "has a * after the leading *."),
            ("**.looker.com", "has a * that is not a leading *."),
            ("*.10.0.0.7", "*. patterns match names only"),
            ("*.7", "*. patterns match names only"),
            ("*.[fd00::7]", "*. patterns match names only"),
            ("looker com", "is not a host name or IP address"),
            ("user@looker.com", "is not a host name or IP address"),
            ("-looker.com", "is not a host name: label \"-looker\""),
            ("looker_x.com", "is not a host name: label \"looker_x\""),
            ("a..b", "is not a host name: label \"\""),
            ("looker.123", "is not a host name or IP address"),
        ] {
            let e = AllowedHosts::parse(list).expect_err(list);
            assert!(e.contains(why), "{list}: {e}");
        }
        let long = format!("{}.example", vec!["a".repeat(63); 4].join("."));
        assert!(
            AllowedHosts::parse(&long)
                .unwrap_err()
                .contains("longer than a host name may be")
        );
        assert!(
            AllowedHosts::parse(&format!("{}.example", "a".repeat(64)))
                .unwrap_err()
                .contains("1 to 63")
        );
    }
}
