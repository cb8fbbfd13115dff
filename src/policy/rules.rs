//! L7 rules (SPEC POLICY-2): user-agent substring or regex, header present / equal /
//! missing, source CIDRs; all conditions of a rule AND-ed, the first matching rule decides.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use regex::Regex;

use crate::config::policy::{HeaderConditionConfig, PolicyAction, PolicyRuleConfig};

struct HeaderCondition {
    name: HeaderName,
    value: Option<HeaderValue>,
}

impl HeaderCondition {
    fn compile(config: &HeaderConditionConfig) -> Result<HeaderCondition, String> {
        let name = HeaderName::from_bytes(config.name.as_bytes())
            .map_err(|_| format!("{:?} is not a valid header name", config.name))?;
        let value = config
            .value
            .as_deref()
            .map(HeaderValue::from_str)
            .transpose()
            .map_err(|_| "value is not a valid header value".to_string())?;
        Ok(HeaderCondition { name, value })
    }

    fn holds(&self, headers: &HeaderMap) -> bool {
        match &self.value {
            None => headers.contains_key(&self.name),
            Some(want) => headers.get_all(&self.name).iter().any(|v| v == want),
        }
    }
}

pub struct Rule {
    pub name: Arc<str>,
    pub allow: bool,
    /// Lower-cased needle.
    user_agent: Option<String>,
    user_agent_regex: Option<Regex>,
    header: Option<HeaderCondition>,
    require_header: Option<HeaderCondition>,
    sources: Vec<IpNet>,
    /// `gatehouse_policy_blocks_total{route,policy}`.
    pub blocks: Arc<crate::telemetry::metrics::Labeled>,
}

impl Rule {
    pub fn compile(
        config: &PolicyRuleConfig,
        blocks: Arc<crate::telemetry::metrics::Labeled>,
    ) -> Result<Rule, String> {
        let user_agent_regex = config
            .user_agent_regex
            .as_deref()
            .map(|pattern| {
                regex::RegexBuilder::new(pattern)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("user_agent_regex: {e}"))
            })
            .transpose()?;
        Ok(Rule {
            name: config.name.as_str().into(),
            allow: config.action == PolicyAction::Allow,
            user_agent: config.user_agent.as_deref().map(str::to_ascii_lowercase),
            user_agent_regex,
            header: config
                .header
                .as_ref()
                .map(HeaderCondition::compile)
                .transpose()?,
            require_header: config
                .require_header
                .as_ref()
                .map(HeaderCondition::compile)
                .transpose()?,
            sources: config.sources.clone(),
            blocks,
        })
    }

    pub fn matches(&self, headers: &HeaderMap, client_ip: IpAddr) -> bool {
        if !self.sources.is_empty() && !self.sources.iter().any(|net| net.contains(&client_ip)) {
            return false;
        }
        if let Some(condition) = &self.header {
            if !condition.holds(headers) {
                return false;
            }
        }
        if let Some(condition) = &self.require_header {
            if condition.holds(headers) {
                return false;
            }
        }
        if self.user_agent.is_some() || self.user_agent_regex.is_some() {
            let agent = headers
                .get(http::header::USER_AGENT)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if let Some(needle) = &self.user_agent {
                if !contains_ignore_ascii_case(agent, needle.as_bytes()) {
                    return false;
                }
            }
            if let Some(regex) = &self.user_agent_regex {
                match std::str::from_utf8(agent) {
                    Ok(text) if regex.is_match(text) => {}
                    _ => return false,
                }
            }
        }
        true
    }
}

/// `needle` is already lower case.
fn contains_ignore_ascii_case(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window.eq_ignore_ascii_case(needle))
}

/// The first matching rule, if it denies.
pub fn first_denial<'a>(
    rules: &'a [Rule],
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Option<&'a Rule> {
    rules
        .iter()
        .find(|rule| rule.matches(headers, client_ip))
        .filter(|rule| !rule.allow)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> Rule {
        let config: PolicyRuleConfig = toml::from_str(toml_text).expect("rule");
        Rule::compile(
            &config,
            crate::telemetry::Metrics::default().policy_counter(
                crate::telemetry::metrics::PolicyFamily::PolicyBlocks,
                "r",
                "p",
            ),
        )
        .expect("compile")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    const IP: &str = "192.0.2.10";

    #[test]
    fn conditions() {
        let ip: IpAddr = IP.parse().unwrap();
        let ua = rule("name = \"bots\"\nuser_agent = \"CURL\"");
        assert!(ua.matches(&headers(&[("user-agent", "curl/8.0")]), ip));
        assert!(!ua.matches(&headers(&[("user-agent", "firefox")]), ip));
        assert!(!ua.matches(&headers(&[]), ip));
        let re = rule("name = \"re\"\nuser_agent_regex = \"^python-requests/2\\\\.\"");
        assert!(re.matches(&headers(&[("user-agent", "python-requests/2.31")]), ip));
        assert!(!re.matches(&headers(&[("user-agent", "xpython-requests/2.31")]), ip));
        let need = rule("name = \"key\"\nrequire_header = { name = \"x-api-key\" }");
        assert!(need.matches(&headers(&[]), ip));
        assert!(!need.matches(&headers(&[("x-api-key", "k")]), ip));
        let equal = rule("name = \"v\"\nrequire_header = { name = \"x-env\", value = \"prod\" }");
        assert!(equal.matches(&headers(&[("x-env", "dev")]), ip));
        assert!(!equal.matches(&headers(&[("x-env", "prod")]), ip));
        let src = rule("name = \"office\"\naction = \"allow\"\nsources = [\"192.0.2.0/24\"]");
        assert!(src.matches(&headers(&[]), ip));
        assert!(!src.matches(&headers(&[]), "198.51.100.1".parse().unwrap()));
    }

    #[test]
    fn first_match_wins() {
        let ip: IpAddr = IP.parse().unwrap();
        let rules = vec![
            rule("name = \"office\"\naction = \"allow\"\nsources = [\"192.0.2.0/24\"]"),
            rule("name = \"everyone-else\""),
        ];
        assert!(first_denial(&rules, &headers(&[]), ip).is_none());
        let denied = first_denial(&rules, &headers(&[]), "203.0.113.1".parse().unwrap());
        assert_eq!(denied.map(|r| &*r.name), Some("everyone-else"));
    }
}
