//! The connection firewall's config (SPEC CONN-6): allow/deny by IP, CIDR and GeoIP country,
//! plus a per-IP new-connection rate limit. Used both as the top-level `[firewall]` and per
//! listener as `[listeners.firewall]`; `crate::firewall::Firewall::compile` turns it into rules.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::Dur;

/// Default bound on the rate limiter's per-IP map; see [`FirewallConfig::max_tracked_ips`].
pub const DEFAULT_MAX_TRACKED_IPS: usize = 100_000;

/// Whether listed entries are blocked, or everything not listed is.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FirewallMode {
    /// Block sources matching `deny_*`; everything else passes.
    #[default]
    Deny,
    /// Block every source not matching `allow_*`. `deny_*` still applies on top, so a
    /// single address inside an allowed range can be carved out.
    AllowOnly,
}

/// The firewall for one scope (global or one listener).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FirewallConfig {
    pub mode: FirewallMode,
    /// Single source addresses to block.
    pub deny_ips: Vec<IpAddr>,
    /// Source networks to block, e.g. `"198.51.100.0/24"`.
    pub deny_cidrs: Vec<IpNet>,
    /// ISO 3166-1 alpha-2 country codes to block (case-insensitive); needs `geoip_db`.
    pub deny_countries: Vec<String>,
    /// With `mode = "allow_only"`: the only source addresses let through.
    pub allow_ips: Vec<IpAddr>,
    /// With `mode = "allow_only"`: the only source networks let through.
    pub allow_cidrs: Vec<IpNet>,
    /// With `mode = "allow_only"`: the only countries let through; needs `geoip_db`.
    pub allow_countries: Vec<String>,
    /// A MaxMind country (or city) database, `.mmdb`. Reloaded without a restart when the
    /// file changes. Resolving a relative path against the config directory is the caller's job.
    pub geoip_db: Option<PathBuf>,
    /// Per source IP new-connection limit over a sliding window; absent means off.
    pub rate_limit: Option<RateLimitConfig>,
    /// Upper bound on how many source IPs the rate limiter remembers. When full, the
    /// addresses not seen for longest are forgotten first (they lose their count, which only
    /// ever errs towards letting a connection through).
    pub max_tracked_ips: usize,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig {
            mode: FirewallMode::Deny,
            deny_ips: Vec::new(),
            deny_cidrs: Vec::new(),
            deny_countries: Vec::new(),
            allow_ips: Vec::new(),
            allow_cidrs: Vec::new(),
            allow_countries: Vec::new(),
            geoip_db: None,
            rate_limit: None,
            max_tracked_ips: DEFAULT_MAX_TRACKED_IPS,
        }
    }
}

/// `rate_limit = { connections = 20, window = "10s" }`: at most `connections` new connections
/// per source IP in any `window`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub connections: u32,
    pub window: Dur,
}

impl FirewallConfig {
    /// True when the config blocks nothing, so the accept path can skip the firewall.
    pub fn is_noop(&self) -> bool {
        self.mode == FirewallMode::Deny
            && self.deny_ips.is_empty()
            && self.deny_cidrs.is_empty()
            && self.deny_countries.is_empty()
            && self.rate_limit.is_none()
    }

    /// True when any rule needs a country lookup.
    pub fn uses_countries(&self) -> bool {
        !self.deny_countries.is_empty()
            || (self.mode == FirewallMode::AllowOnly && !self.allow_countries.is_empty())
    }

    /// Every mistake as `(field path, message)`, with `path` the prefix for this table, e.g.
    /// `"firewall"` or `"listeners[0].firewall"`. Empty when the config is valid.
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        let mut push = |field: String, message: String| errors.push((field, message));

        for (name, list) in [
            ("deny_countries", &self.deny_countries),
            ("allow_countries", &self.allow_countries),
        ] {
            for (index, code) in list.iter().enumerate() {
                if !is_country_code(code) {
                    push(
                        format!("{path}.{name}[{index}]"),
                        format!("{code:?} is not a two-letter country code"),
                    );
                }
            }
        }
        for (name, list) in [
            ("deny_cidrs", &self.deny_cidrs),
            ("allow_cidrs", &self.allow_cidrs),
        ] {
            for (index, net) in list.iter().enumerate() {
                // Host bits set usually means a typo for a narrower or wider prefix.
                if *net != net.trunc() {
                    push(
                        format!("{path}.{name}[{index}]"),
                        format!(
                            "\"{net}\" has host bits set; write \"{}\" to mean the whole network",
                            net.trunc()
                        ),
                    );
                }
            }
        }

        let any_countries = !self.deny_countries.is_empty() || !self.allow_countries.is_empty();
        match &self.geoip_db {
            None if any_countries => push(
                format!("{path}.geoip_db"),
                "is required when deny_countries or allow_countries is set".into(),
            ),
            Some(db) if db.as_os_str().is_empty() => {
                push(format!("{path}.geoip_db"), "must not be empty".into())
            }
            _ => {}
        }

        let any_allow = !self.allow_ips.is_empty()
            || !self.allow_cidrs.is_empty()
            || !self.allow_countries.is_empty();
        match self.mode {
            FirewallMode::AllowOnly if !any_allow => push(
                format!("{path}.mode"),
                "\"allow_only\" needs at least one entry in allow_ips, allow_cidrs or allow_countries (otherwise it blocks everything)".into(),
            ),
            // Silently ignoring an allow list would surprise whoever wrote it.
            FirewallMode::Deny if any_allow => push(
                format!("{path}.mode"),
                "allow_ips, allow_cidrs and allow_countries only apply with mode = \"allow_only\"".into(),
            ),
            _ => {}
        }

        if let Some(rate) = &self.rate_limit {
            if rate.connections == 0 {
                push(
                    format!("{path}.rate_limit.connections"),
                    "must be at least 1 (remove rate_limit to turn it off)".into(),
                );
            }
            if rate.window.0.is_zero() {
                push(
                    format!("{path}.rate_limit.window"),
                    "must be longer than zero".into(),
                );
            }
        }
        if self.max_tracked_ips == 0 {
            push(
                format!("{path}.max_tracked_ips"),
                "must be at least 1".into(),
            );
        }
        errors
    }
}

/// Two ASCII letters; case is folded later.
pub(crate) fn is_country_code(code: &str) -> bool {
    code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> FirewallConfig {
        #[derive(Deserialize)]
        struct Wrapper {
            firewall: FirewallConfig,
        }
        match toml::from_str::<Wrapper>(text) {
            Ok(wrapper) => wrapper.firewall,
            Err(err) => panic!("parse failed: {err}"),
        }
    }

    #[test]
    fn firewall_config_parses_the_documented_example() {
        let config = parse(
            r#"
            [firewall]
            mode = "deny"
            deny_ips = ["203.0.113.7"]
            deny_cidrs = ["198.51.100.0/24"]
            deny_countries = ["cn"]
            geoip_db = "/path/GeoLite2-Country.mmdb"
            rate_limit = { connections = 20, window = "10s" }
            max_tracked_ips = 5000
            "#,
        );
        assert_eq!(
            config.deny_ips,
            vec!["203.0.113.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(config.rate_limit.as_ref().map(|r| r.connections), Some(20));
        assert_eq!(config.max_tracked_ips, 5000);
        assert!(config.validate("firewall").is_empty());
        assert!(!config.is_noop());
        assert_eq!(
            FirewallConfig::default().max_tracked_ips,
            DEFAULT_MAX_TRACKED_IPS
        );
        assert!(FirewallConfig::default().is_noop());
    }

    #[test]
    fn firewall_config_rejects_unknown_fields() {
        let result = toml::from_str::<FirewallConfig>("deny_ip = [\"1.2.3.4\"]");
        assert!(result.is_err());
    }

    #[test]
    fn firewall_config_validate_reports_every_mistake_with_its_path() {
        let config = parse(
            r#"
            [firewall]
            mode = "allow_only"
            deny_countries = ["GB", "XYZ"]
            deny_cidrs = ["10.0.0.1/8"]
            rate_limit = { connections = 0, window = "0s" }
            max_tracked_ips = 0
            "#,
        );
        let errors = config.validate("listeners[0].firewall");
        let expect = [
            (
                "listeners[0].firewall.deny_countries[1]",
                "\"XYZ\" is not a two-letter country code",
            ),
            ("listeners[0].firewall.deny_cidrs[0]", "host bits"),
            ("listeners[0].firewall.geoip_db", "is required"),
            ("listeners[0].firewall.mode", "needs at least one entry"),
            ("listeners[0].firewall.rate_limit.connections", "at least 1"),
            (
                "listeners[0].firewall.rate_limit.window",
                "longer than zero",
            ),
            ("listeners[0].firewall.max_tracked_ips", "at least 1"),
        ];
        assert_eq!(errors.len(), expect.len(), "{errors:?}");
        for ((path, message), (want_path, want_message)) in errors.iter().zip(expect) {
            assert_eq!(path, want_path);
            assert!(message.contains(want_message), "{message}");
        }
    }

    #[test]
    fn firewall_config_allow_lists_need_allow_only() {
        let config = FirewallConfig {
            allow_ips: vec!["192.0.2.1".parse().unwrap()],
            ..FirewallConfig::default()
        };
        let errors = config.validate("firewall");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, "firewall.mode");
    }
}
