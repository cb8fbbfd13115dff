//! Request policies (SPEC POLICY-1..4): the per-route filter chain that runs after routing
//! and before upstream selection, compiled once per snapshot into `snapshot::Route::policy`;
//! and the response-side filters (SPEC POLICY-5, POLICY-6: `filters.rs`).
//!
//! Order, fixed: global rate limit (`http.rate_limit`, every request) → the route's rate
//! limit keyed by address or header → L7 rules → authentication (JWT or basic) → the
//! route's rate limit keyed by identity → external authorization. Each step may refuse
//! with a [`Rejection`]; `http::error` maps it to its status. A route without any of these
//! has `policy: None` and pays one branch.
//!
//! State that must outlive snapshots (rate-limit buckets, JWKS keys) lives in
//! [`PolicyRegistry`], keyed by scope and settings.

pub mod auth;
pub mod client;
pub mod compress;
pub mod cors;
pub mod ext_authz;
mod filters;
pub mod rate_limit;
pub mod rules;
pub mod transform;

pub use filters::{append_vary, Captured, Filters};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use parking_lot::Mutex;

use crate::config::policy::{RateLimitKey, RequestRateLimitConfig};
use crate::config::RouteConfig;
use crate::telemetry::metrics::{Labeled, Metrics, PolicyFamily};
use rate_limit::{Decision, Key, Limiter};

/// Why a policy refused a request. `http::error` maps each to its status and code.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// 429 with `Retry-After` (seconds, rounded up).
    #[error("rate limit exceeded")]
    RateLimited { retry_after: u64 },
    /// 403.
    #[error("denied by policy {policy}")]
    Policy { policy: Arc<str> },
    /// 401 with `WWW-Authenticate`.
    #[error("unauthorized: {reason}")]
    Unauthenticated {
        challenge: HeaderValue,
        reason: String,
    },
    /// The authorization service's own status, headers and body.
    #[error("denied by the authorization service ({})", .0.status)]
    ExtAuthzDenied(Box<Denial>),
    /// 503: the authorization service failed and `fail_mode = "closed"`.
    #[error("authorization service unavailable: {0}")]
    ExtAuthzUnavailable(String),
}

/// An external authorization service's denial, passed to the client.
#[derive(Debug)]
pub struct Denial {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    Transform(#[from] transform::TransformError),
    #[error(transparent)]
    Cors(#[from] cors::CorsError),
}

/// State that outlives snapshots.
#[derive(Default)]
pub struct PolicyRegistry {
    /// Rate limiters by scope (`http` or `route:<name>`) and settings.
    limiters: Mutex<HashMap<String, Weak<Limiter>>>,
    pub jwks: auth::JwksRegistry,
}

impl PolicyRegistry {
    fn limiter(&self, scope: &str, settings: &RequestRateLimitConfig) -> Arc<Limiter> {
        // Keyed by settings too, so compiling a config that is then rejected (or only
        // validated) never displaces the running snapshot's buckets.
        let key = format!("{scope}\u{0}{settings:?}");
        let mut limiters = self.limiters.lock();
        limiters.retain(|_, weak| weak.strong_count() > 0);
        if let Some(found) = limiters.get(&key).and_then(Weak::upgrade) {
            return found;
        }
        let limiter = Arc::new(Limiter::new(settings));
        limiters.insert(key, Arc::downgrade(&limiter));
        limiter
    }
}

enum KeySource {
    ClientIp,
    Header(HeaderName),
    Identity,
}

/// A compiled rate limit.
pub struct RateLimit {
    limiter: Arc<Limiter>,
    key: KeySource,
}

impl RateLimit {
    fn compile(scope: &str, config: &RequestRateLimitConfig, registry: &PolicyRegistry) -> Self {
        let key = match (config.key, &config.header) {
            (RateLimitKey::Header, Some(name)) => HeaderName::from_bytes(name.as_bytes())
                .map_or(KeySource::ClientIp, KeySource::Header),
            (RateLimitKey::Identity, _) => KeySource::Identity,
            _ => KeySource::ClientIp,
        };
        RateLimit {
            limiter: registry.limiter(scope, config),
            key,
        }
    }

    fn check(
        &self,
        request: &RequestFacts<'_>,
        identity: Option<&str>,
        rejected: &Labeled,
    ) -> Result<(), Rejection> {
        let address = || Key::ip(request.client_ip);
        let key = match &self.key {
            KeySource::ClientIp => address(),
            KeySource::Header(name) => request
                .headers
                .get(name)
                .map_or_else(address, |value| self.limiter.text_key(value.as_bytes())),
            KeySource::Identity => identity.map_or_else(address, |identity| {
                self.limiter.text_key(identity.as_bytes())
            }),
        };
        match self.limiter.check(key) {
            Decision::Allow => Ok(()),
            Decision::Reject(wait) => {
                rejected.count.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "gatehouse::policy",
                    "{}",
                    rate_limit_line(request.client_ip, request.host, request.path)
                );
                Err(Rejection::RateLimited {
                    retry_after: rate_limit::retry_after_secs(wait),
                })
            }
        }
    }
}

/// The stable line each rate-limit rejection writes (SPEC POLICY-1):
///
/// ```text
/// RATE_LIMIT client_ip=<ip> host=<host> path=<path> status=429
/// ```
///
/// `packaging/fail2ban/filter.d/gatehouse-ratelimit.conf` matches it. The host and path are
/// client text: anything outside a conservative character set becomes `_`, an empty value
/// `-`, and both are cut at 256 bytes, so the line keeps its shape whatever was sent.
pub fn rate_limit_line(client_ip: IpAddr, host: &str, path: &str) -> String {
    format!(
        "RATE_LIMIT client_ip={client_ip} host={} path={} status=429",
        clean(host),
        clean(path)
    )
}

fn clean(text: &str) -> String {
    if text.is_empty() {
        return "-".into();
    }
    text.chars()
        .take(256)
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' && c != '=' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The global limit (`http.rate_limit`).
pub struct GlobalLimit {
    limit: RateLimit,
    /// `gatehouse_rate_limited_total` by route index, then the unmatched series.
    rejected: Vec<Arc<Labeled>>,
}

impl GlobalLimit {
    /// `route`: the matched route's index in the snapshot, if any.
    pub fn check(&self, request: &RequestFacts<'_>, route: Option<usize>) -> Result<(), Rejection> {
        let counter = route
            .and_then(|index| self.rejected.get(index))
            .or(self.rejected.last());
        match counter {
            Some(counter) => self.limit.check(request, None, counter),
            None => Ok(()),
        }
    }
}

/// What the filters read from the request.
pub struct RequestFacts<'a> {
    pub client_ip: IpAddr,
    /// Normalized host (for logs and ext-authz).
    pub host: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

enum Authenticator {
    Jwt(auth::Jwt),
    Basic(auth::Basic),
}

/// One route's compiled filter chain.
pub struct RouteFilters {
    address_limit: Option<RateLimit>,
    identity_limit: Option<RateLimit>,
    rules: Vec<rules::Rule>,
    auth: Option<Authenticator>,
    auth_failures: Option<Arc<Labeled>>,
    ext_authz: Option<ext_authz::ExtAuthz>,
    /// `gatehouse_rate_limited_total{route}`.
    pub rate_limited: Arc<Labeled>,
}

/// Compiles the global limit; none when not configured.
pub fn compile_global<'a>(
    config: &crate::config::Config,
    registry: &PolicyRegistry,
    metrics: &Metrics,
    routes: impl Iterator<Item = &'a str>,
) -> Option<GlobalLimit> {
    let limit = config.http.rate_limit.as_ref()?;
    let mut rejected: Vec<Arc<Labeled>> = routes
        .map(|name| metrics.policy_counter(PolicyFamily::RateLimited, name, ""))
        .collect();
    rejected.push(metrics.policy_counter(
        PolicyFamily::RateLimited,
        crate::telemetry::metrics::UNMATCHED,
        "",
    ));
    Some(GlobalLimit {
        limit: RateLimit::compile("http", limit, registry),
        rejected,
    })
}

/// Compiles a route's filters; none when the route uses no policy.
pub fn compile_route(
    index: usize,
    name: &str,
    route: &RouteConfig,
    registry: &PolicyRegistry,
    metrics: &Metrics,
) -> Result<Option<RouteFilters>, PolicyError> {
    if route.rate_limit.is_none()
        && route.policies.is_empty()
        && route.jwt.is_none()
        && route.basic_auth.is_none()
        && route.ext_authz.is_none()
    {
        return Ok(None);
    }
    let path = format!("routes[{index}]");
    let invalid = |field: &str, message: String| PolicyError::Invalid {
        path: format!("{path}.{field}"),
        message,
    };
    let scope = format!("route:{name}");
    let (address_limit, identity_limit) = match &route.rate_limit {
        Some(limit) if limit.key == RateLimitKey::Identity => {
            (None, Some(RateLimit::compile(&scope, limit, registry)))
        }
        Some(limit) => (Some(RateLimit::compile(&scope, limit, registry)), None),
        None => (None, None),
    };
    let rules = route
        .policies
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let blocks = metrics.policy_counter(PolicyFamily::PolicyBlocks, name, &rule.name);
            rules::Rule::compile(rule, blocks).map_err(|m| invalid(&format!("policies[{i}]"), m))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let auth = match (&route.jwt, &route.basic_auth) {
        (Some(jwt), _) => Some(Authenticator::Jwt(
            auth::Jwt::compile(jwt, &registry.jwks).map_err(|e| invalid("jwt", e.to_string()))?,
        )),
        (None, Some(basic)) => Some(Authenticator::Basic(
            auth::Basic::compile(basic).map_err(|e| invalid("basic_auth", e.to_string()))?,
        )),
        (None, None) => None,
    };
    let auth_failures = auth.as_ref().map(|auth| {
        let scheme = match auth {
            Authenticator::Jwt(_) => "bearer",
            Authenticator::Basic(_) => "basic",
        };
        metrics.policy_counter(PolicyFamily::AuthFailures, name, scheme)
    });
    let ext_authz = route
        .ext_authz
        .as_ref()
        .map(|config| {
            let counter = |result| metrics.policy_counter(PolicyFamily::ExtAuthz, name, result);
            ext_authz::ExtAuthz::compile(
                config,
                ext_authz::Counters {
                    allowed: counter("allowed"),
                    denied: counter("denied"),
                    failed_open: counter("failed_open"),
                    failed_closed: counter("failed_closed"),
                },
            )
            .map_err(|m| invalid("ext_authz.url", m))
        })
        .transpose()?;
    Ok(Some(RouteFilters {
        address_limit,
        identity_limit,
        rules,
        auth,
        auth_failures,
        ext_authz,
        rate_limited: metrics.policy_counter(PolicyFamily::RateLimited, name, ""),
    }))
}

/// Per-request facts for the asynchronous steps.
pub struct Context<'a> {
    pub client_ip: IpAddr,
    pub host: &'a str,
    pub scheme: &'static str,
    pub request_id: (&'a HeaderName, &'a HeaderValue),
}

impl RouteFilters {
    /// Runs the chain over the request head. Headers may change (forwarded claims,
    /// ext-authz headers). Returns the authenticated identity, if any.
    pub async fn run(
        &self,
        parts: &mut http::request::Parts,
        context: &Context<'_>,
    ) -> Result<Option<String>, Rejection> {
        let facts = RequestFacts {
            client_ip: context.client_ip,
            host: context.host,
            path: parts.uri.path(),
            headers: &parts.headers,
        };
        if let Some(limit) = &self.address_limit {
            limit.check(&facts, None, &self.rate_limited)?;
        }
        if let Some(rule) = rules::first_denial(&self.rules, &parts.headers, context.client_ip) {
            rule.blocks.count.fetch_add(1, Ordering::Relaxed);
            return Err(Rejection::Policy {
                policy: rule.name.clone(),
            });
        }
        let identity = match &self.auth {
            None => None,
            Some(authenticator) => {
                let result = match authenticator {
                    Authenticator::Jwt(jwt) => jwt.authenticate(&mut parts.headers),
                    Authenticator::Basic(basic) => basic.authenticate(&mut parts.headers).await,
                };
                match result {
                    Ok(identity) => identity,
                    Err(failure) => {
                        if let Some(counter) = &self.auth_failures {
                            counter.count.fetch_add(1, Ordering::Relaxed);
                        }
                        return Err(Rejection::Unauthenticated {
                            challenge: failure.challenge,
                            reason: failure.reason,
                        });
                    }
                }
            }
        };
        if let Some(limit) = &self.identity_limit {
            let facts = RequestFacts {
                client_ip: context.client_ip,
                host: context.host,
                path: parts.uri.path(),
                headers: &parts.headers,
            };
            limit.check(&facts, identity.as_deref(), &self.rate_limited)?;
        }
        if let Some(authz) = &self.ext_authz {
            let facts = ext_authz::Facts {
                method: &parts.method,
                uri: &parts.uri,
                host: context.host,
                scheme: context.scheme,
                client_ip: context.client_ip,
                request_id: context.request_id,
            };
            authz
                .check(&mut parts.headers, &facts)
                .await
                .map_err(|refusal| match refusal {
                    ext_authz::Refusal::Denied {
                        status,
                        headers,
                        body,
                    } => Rejection::ExtAuthzDenied(Box::new(Denial {
                        status,
                        headers,
                        body,
                    })),
                    ext_authz::Refusal::Unavailable(reason) => {
                        Rejection::ExtAuthzUnavailable(reason)
                    }
                })?;
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_line_is_stable_and_clean() {
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            rate_limit_line(ip, "example.com", "/api/x"),
            "RATE_LIMIT client_ip=203.0.113.9 host=example.com path=/api/x status=429"
        );
        assert_eq!(
            rate_limit_line(ip, "a b status=429 client_ip=1.2.3.4", ""),
            "RATE_LIMIT client_ip=203.0.113.9 host=a_b_status_429_client_ip_1.2.3.4 path=- status=429"
        );
    }
}
