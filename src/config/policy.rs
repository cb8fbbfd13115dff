//! Schema of the request policies (SPEC POLICY-1..4): rate limits, L7 rules, JWT and basic
//! authentication, external authorization; and their semantic checks with field paths.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::units::{Dur, Size};

/// A request rate limit (nginx `limit_req zone=… rate=… burst=… nodelay`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestRateLimitConfig {
    /// `"<n>r/s"` or `"<n>r/m"`, as in nginx.
    pub rate: String,
    /// Requests beyond the rate accepted at once (nginx `burst`, always `nodelay`).
    #[serde(default)]
    pub burst: u32,
    /// What identifies a client.
    #[serde(default)]
    pub key: RateLimitKey,
    /// The header for `key = "header"`.
    #[serde(default)]
    pub header: Option<String>,
    /// Hard cap on tracked keys; idle buckets are evicted first.
    #[serde(default = "RequestRateLimitConfig::default_max_keys")]
    pub max_keys: usize,
}

impl RequestRateLimitConfig {
    pub const DEFAULT_MAX_KEYS: usize = 100_000;

    fn default_max_keys() -> usize {
        Self::DEFAULT_MAX_KEYS
    }

    /// Requests per second, from `rate`.
    pub fn per_second(&self) -> Result<f64, String> {
        parse_rate(&self.rate)
    }
}

/// Parses nginx rates: `10r/s`, `600r/m`, fractions allowed (`0.5r/s`).
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, per) = if let Some(n) = text.strip_suffix("r/s") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("r/m") {
        (n, 60.0)
    } else {
        return Err(format!(
            "{text:?} is not a rate: use \"<n>r/s\" or \"<n>r/m\""
        ));
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a rate: use \"<n>r/s\" or \"<n>r/m\""))?;
    if !(value.is_finite() && value > 0.0) {
        return Err("must be more than 0".into());
    }
    let per_second = value / per;
    if per_second > 1e9 {
        return Err("must be at most 1000000000r/s".into());
    }
    Ok(per_second)
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitKey {
    /// The client address; IPv6 grouped by /64.
    #[default]
    ClientIp,
    /// A request header's value (clients without it are keyed by address).
    Header,
    /// The authenticated identity (JWT `sub`, basic-auth user); runs after authentication,
    /// requests without one are keyed by address.
    Identity,
}

/// One L7 rule: all conditions given must hold for it to match; a rule with none matches
/// every request. The first matching rule decides.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyRuleConfig {
    pub name: String,
    #[serde(default)]
    pub action: PolicyAction,
    /// Case-insensitive substring of `User-Agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent_regex: Option<String>,
    /// Matches when the header is present (or equal to `value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderConditionConfig>,
    /// Matches when the header is missing (or not equal to `value`): with `action = "deny"`
    /// this requires the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_header: Option<HeaderConditionConfig>,
    /// Client address in one of these networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<IpNet>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    #[default]
    Deny,
    Allow,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderConditionConfig {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// JWT bearer authentication.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Accepted `alg` values; default all of HS256, RS256, ES256, EdDSA (each only with a
    /// key of its own type).
    #[serde(default = "JwtConfig::default_algorithms")]
    pub algorithms: Vec<String>,
    /// HS256 shared secret (UTF-8 bytes).
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// `http://` or `https://`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default = "JwtConfig::default_refresh")]
    pub jwks_refresh: Dur,
    #[serde(default = "JwtConfig::default_fetch_timeout")]
    pub jwks_timeout: Dur,
    #[serde(default = "JwtConfig::default_max_jwks")]
    pub jwks_max_bytes: Size,
    /// Required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The token's `aud` must contain one of these (when set).
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default = "JwtConfig::default_leeway")]
    pub leeway: Dur,
    /// Refuse tokens without `exp`.
    #[serde(default = "JwtConfig::default_true")]
    pub require_exp: bool,
    /// Claim name → request header sent upstream (client copies are removed).
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
    #[serde(default = "default_realm")]
    pub realm: String,
}

impl JwtConfig {
    fn default_algorithms() -> Vec<String> {
        ["HS256", "RS256", "ES256", "EdDSA"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
    fn default_refresh() -> Dur {
        Dur::secs(300)
    }
    fn default_fetch_timeout() -> Dur {
        Dur::secs(5)
    }
    fn default_max_jwks() -> Size {
        Size(1024 * 1024)
    }
    fn default_leeway() -> Dur {
        Dur::secs(60)
    }
    fn default_true() -> bool {
        true
    }
}

fn default_realm() -> String {
    "gatehouse".into()
}

/// HTTP basic authentication against bcrypt hashes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    #[serde(default = "default_realm")]
    pub realm: String,
    /// User name → bcrypt hash (`$2b$…`, `$2y$…`, `$2a$…`).
    pub users: BTreeMap<String, String>,
    /// Header carrying the authenticated user upstream (client copies are removed).
    #[serde(default)]
    pub forward_user_header: Option<String>,
}

/// External authorization over HTTP.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExtAuthzConfig {
    /// `http://host:port/path`; called with `GET` per request.
    pub url: String,
    #[serde(default = "ExtAuthzConfig::default_timeout")]
    pub timeout: Dur,
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Client request headers sent to the service.
    #[serde(default = "ExtAuthzConfig::default_forward")]
    pub forward_headers: Vec<String>,
    /// Headers of an allowing answer copied onto the upstream request.
    #[serde(default)]
    pub upstream_headers: Vec<String>,
    /// Largest denial body passed to the client; longer ones are cut.
    #[serde(default = "ExtAuthzConfig::default_max_body")]
    pub max_body: Size,
}

impl ExtAuthzConfig {
    fn default_timeout() -> Dur {
        Dur(std::time::Duration::from_millis(1000))
    }
    fn default_forward() -> Vec<String> {
        vec!["authorization".into(), "cookie".into()]
    }
    fn default_max_body() -> Size {
        Size(64 * 1024)
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The service unreachable, timing out or answering 5xx → 503.
    #[default]
    Closed,
    /// … → the request goes on as allowed.
    Open,
}

fn header_name_ok(name: &str) -> bool {
    http::HeaderName::from_bytes(name.as_bytes()).is_ok()
}

/// Checks a rate limit; pushes `(path, message)`.
pub fn validate_rate_limit(
    limit: &RequestRateLimitConfig,
    path: &str,
    out: &mut Vec<(String, String)>,
) {
    if let Err(message) = limit.per_second() {
        out.push((format!("{path}.rate"), message));
    }
    if limit.max_keys < 16 {
        out.push((format!("{path}.max_keys"), "must be at least 16".into()));
    }
    match (&limit.key, &limit.header) {
        (RateLimitKey::Header, None) => out.push((
            format!("{path}.header"),
            "required when key = \"header\"".into(),
        )),
        (RateLimitKey::Header, Some(name)) if !header_name_ok(name) => out.push((
            format!("{path}.header"),
            format!("{name:?} is not a valid header name"),
        )),
        (RateLimitKey::ClientIp | RateLimitKey::Identity, Some(_)) => out.push((
            format!("{path}.header"),
            "only with key = \"header\"".into(),
        )),
        _ => {}
    }
}

/// Checks one route's policy settings; pushes `(path, message)` for every mistake.
pub fn validate_route_policies(
    route: &super::RouteConfig,
    path: &str,
    out: &mut Vec<(String, String)>,
) {
    if let Some(limit) = &route.rate_limit {
        validate_rate_limit(limit, &format!("{path}.rate_limit"), out);
        if limit.key == RateLimitKey::Identity && route.jwt.is_none() && route.basic_auth.is_none()
        {
            out.push((
                format!("{path}.rate_limit.key"),
                "\"identity\" needs jwt or basic_auth on the route".into(),
            ));
        }
    }
    validate_rules(&route.policies, &format!("{path}.policies"), out);
    if route.jwt.is_some() && route.basic_auth.is_some() {
        out.push((
            format!("{path}.basic_auth"),
            "a route uses one of jwt and basic_auth".into(),
        ));
    }
    if let Some(jwt) = &route.jwt {
        validate_jwt(jwt, &format!("{path}.jwt"), out);
    }
    if let Some(basic) = &route.basic_auth {
        let path = format!("{path}.basic_auth");
        if basic.users.is_empty() {
            out.push((
                format!("{path}.users"),
                "must name at least one user".into(),
            ));
        }
        for (user, hash) in &basic.users {
            if user.is_empty() || user.contains(':') {
                out.push((
                    format!("{path}.users.{user}"),
                    "user names are non-empty and contain no ':'".into(),
                ));
            }
            if bcrypt_parts(hash).is_none() {
                out.push((
                    format!("{path}.users.{user}"),
                    "must be a bcrypt hash ($2a$, $2b$ or $2y$)".into(),
                ));
            }
        }
        check_realm(&basic.realm, &format!("{path}.realm"), out);
        if let Some(name) = &basic.forward_user_header {
            if !header_name_ok(name) {
                out.push((
                    format!("{path}.forward_user_header"),
                    format!("{name:?} is not a valid header name"),
                ));
            }
        }
    }
    if let Some(authz) = &route.ext_authz {
        let path = format!("{path}.ext_authz");
        if let Err(message) = crate::policy::ext_authz::parse_url(&authz.url) {
            out.push((format!("{path}.url"), message));
        }
        if authz.timeout.0.is_zero() {
            out.push((format!("{path}.timeout"), "must be more than 0s".into()));
        }
        for (field, list) in [
            ("forward_headers", &authz.forward_headers),
            ("upstream_headers", &authz.upstream_headers),
        ] {
            for (index, name) in list.iter().enumerate() {
                if !header_name_ok(name) {
                    out.push((
                        format!("{path}.{field}[{index}]"),
                        format!("{name:?} is not a valid header name"),
                    ));
                }
            }
        }
    }
}

fn bcrypt_parts(hash: &str) -> Option<()> {
    let rest = hash
        .strip_prefix("$2b$")
        .or_else(|| hash.strip_prefix("$2y$"))
        .or_else(|| hash.strip_prefix("$2a$"))?;
    (rest.len() == 56 && rest.as_bytes()[2] == b'$').then_some(())
}

fn check_realm(realm: &str, path: &str, out: &mut Vec<(String, String)>) {
    if realm.contains('"') || realm.contains('\\') || http::HeaderValue::from_str(realm).is_err() {
        out.push((
            path.into(),
            "must be printable text without quotes or backslashes".into(),
        ));
    }
}

/// Checks an ordered rule list (also used by the admin API's policy edits).
pub fn validate_rules(rules: &[PolicyRuleConfig], path: &str, out: &mut Vec<(String, String)>) {
    let mut names = std::collections::HashSet::new();
    for (index, rule) in rules.iter().enumerate() {
        let path = format!("{path}[{index}]");
        if rule.name.is_empty() || rule.name.contains('/') {
            out.push((
                format!("{path}.name"),
                "must be non-empty and contain no '/'".into(),
            ));
        } else if !names.insert(rule.name.as_str()) {
            out.push((
                format!("{path}.name"),
                format!("duplicate policy name {:?}", rule.name),
            ));
        }
        if rule.user_agent.as_deref() == Some("") {
            out.push((format!("{path}.user_agent"), "must not be empty".into()));
        }
        if let Some(pattern) = &rule.user_agent_regex {
            if let Err(err) = regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
            {
                out.push((format!("{path}.user_agent_regex"), err.to_string()));
            }
        }
        for (field, condition) in [
            ("header", &rule.header),
            ("require_header", &rule.require_header),
        ] {
            if let Some(condition) = condition {
                if !header_name_ok(&condition.name) {
                    out.push((
                        format!("{path}.{field}.name"),
                        format!("{:?} is not a valid header name", condition.name),
                    ));
                }
            }
        }
    }
}

fn validate_jwt(jwt: &JwtConfig, path: &str, out: &mut Vec<(String, String)>) {
    for (index, alg) in jwt.algorithms.iter().enumerate() {
        if !["HS256", "RS256", "ES256", "EdDSA"].contains(&alg.as_str()) {
            out.push((
                format!("{path}.algorithms[{index}]"),
                format!("{alg:?} is not one of HS256, RS256, ES256, EdDSA"),
            ));
        }
    }
    if jwt.algorithms.is_empty() {
        out.push((
            format!("{path}.algorithms"),
            "must name at least one".into(),
        ));
    }
    let sources = [
        jwt.secret.is_some(),
        jwt.jwks_file.is_some(),
        jwt.jwks_url.is_some(),
    ];
    if !sources.contains(&true) {
        out.push((
            path.into(),
            "needs keys: secret, jwks_file or jwks_url".into(),
        ));
    }
    if jwt.jwks_file.is_some() && jwt.jwks_url.is_some() {
        out.push((
            format!("{path}.jwks_url"),
            "use one of jwks_file and jwks_url".into(),
        ));
    }
    if jwt.secret.as_deref().is_some_and(|s| s.len() < 16) {
        out.push((format!("{path}.secret"), "must be at least 16 bytes".into()));
    }
    if let Some(url) = &jwt.jwks_url {
        if let Err(message) = crate::policy::client::Target::parse(url) {
            out.push((format!("{path}.jwks_url"), message));
        }
    }
    if jwt.jwks_refresh.0 < std::time::Duration::from_secs(1) {
        out.push((format!("{path}.jwks_refresh"), "must be at least 1s".into()));
    }
    if jwt.jwks_timeout.0.is_zero() {
        out.push((
            format!("{path}.jwks_timeout"),
            "must be more than 0s".into(),
        ));
    }
    for (claim, header) in &jwt.forward_claims {
        if !header_name_ok(header) {
            out.push((
                format!("{path}.forward_claims.{claim}"),
                format!("{header:?} is not a valid header name"),
            ));
        }
    }
    check_realm(&jwt.realm, &format!("{path}.realm"), out);
}
