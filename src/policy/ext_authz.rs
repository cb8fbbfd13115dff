//! External authorization over HTTP (SPEC POLICY-4), in the style of nginx `auth_request`
//! and Traefik's forward auth: a `GET` to the service per request carrying the original
//! method, URI, host and client address as `X-Forwarded-*` headers plus chosen request
//! headers. 2xx allows (optionally copying headers onto the upstream request); 5xx, a
//! refused connection or the timeout are failures decided by `fail_mode`; any other status
//! is a denial passed to the client with the service's status and (bounded) body.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::client::{self, Target};
use crate::config::policy::{ExtAuthzConfig, FailMode};

/// Headers of a denial passed on to the client.
const DENIAL_HEADERS: [HeaderName; 4] = [
    http::header::CONTENT_TYPE,
    http::header::WWW_AUTHENTICATE,
    http::header::LOCATION,
    http::header::SET_COOKIE,
];

/// Checks an `ext_authz.url` (http or https, with a host).
pub fn parse_url(url: &str) -> Result<Target, String> {
    Target::parse(url)
}

/// Counters by result (`gatehouse_ext_authz_total{route,result}`).
pub struct Counters {
    pub allowed: Arc<crate::telemetry::metrics::Labeled>,
    pub denied: Arc<crate::telemetry::metrics::Labeled>,
    pub failed_open: Arc<crate::telemetry::metrics::Labeled>,
    pub failed_closed: Arc<crate::telemetry::metrics::Labeled>,
}

pub struct ExtAuthz {
    target: Target,
    timeout: Duration,
    fail_open: bool,
    forward: Vec<HeaderName>,
    upstream: Vec<HeaderName>,
    max_body: u64,
    counters: Counters,
}

/// The request facts sent to the service.
pub struct Facts<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub host: &'a str,
    pub scheme: &'static str,
    pub client_ip: IpAddr,
    pub request_id: (&'a HeaderName, &'a HeaderValue),
}

/// A denial or failure, for the client.
#[derive(Debug)]
pub enum Refusal {
    Denied {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    Unavailable(String),
}

fn names(list: &[String]) -> Vec<HeaderName> {
    list.iter()
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

fn add(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

impl ExtAuthz {
    pub fn compile(config: &ExtAuthzConfig, counters: Counters) -> Result<ExtAuthz, String> {
        Ok(ExtAuthz {
            target: Target::parse(&config.url)?,
            timeout: config.timeout.0,
            fail_open: config.fail_mode == FailMode::Open,
            forward: names(&config.forward_headers),
            upstream: names(&config.upstream_headers),
            max_body: config.max_body.0,
            counters,
        })
    }

    /// Asks the service; on allow, applies its upstream headers to `headers`.
    pub async fn check(&self, headers: &mut HeaderMap, facts: &Facts<'_>) -> Result<(), Refusal> {
        let mut ask = HeaderMap::new();
        for name in &self.forward {
            for value in headers.get_all(name) {
                ask.append(name.clone(), value.clone());
            }
        }
        add(&mut ask, "x-forwarded-method", facts.method.as_str());
        add(&mut ask, "x-forwarded-proto", facts.scheme);
        add(&mut ask, "x-forwarded-host", facts.host);
        add(
            &mut ask,
            "x-forwarded-uri",
            facts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        );
        add(&mut ask, "x-forwarded-for", &facts.client_ip.to_string());
        ask.insert(facts.request_id.0.clone(), facts.request_id.1.clone());
        let answer = client::get(&self.target, ask, self.timeout, self.max_body, false).await;
        let failure = match answer {
            Ok(answer) if answer.status.is_success() => {
                for name in &self.upstream {
                    headers.remove(name);
                    for value in answer.headers.get_all(name) {
                        headers.append(name.clone(), value.clone());
                    }
                }
                self.counters.allowed.count.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Ok(answer) if !answer.status.is_server_error() => {
                self.counters.denied.count.fetch_add(1, Ordering::Relaxed);
                let mut passed = HeaderMap::new();
                for name in &DENIAL_HEADERS {
                    for value in answer.headers.get_all(name) {
                        passed.append(name.clone(), value.clone());
                    }
                }
                return Err(Refusal::Denied {
                    status: answer.status,
                    headers: passed,
                    body: answer.body,
                });
            }
            Ok(answer) => format!("authorization service answered {}", answer.status),
            Err(error) => error.to_string(),
        };
        if self.fail_open {
            self.counters
                .failed_open
                .count
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(url = %self.target.path, error = %failure, "ext_authz failed; allowing (fail_mode = open)");
            Ok(())
        } else {
            self.counters
                .failed_closed
                .count
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(url = %self.target.path, error = %failure, "ext_authz failed; refusing (fail_mode = closed)");
            Err(Refusal::Unavailable(failure))
        }
    }
}
