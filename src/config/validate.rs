//! Semantic checks over a parsed config. Every check pushes an error and carries on, so one
//! run reports every mistake with its field path.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::load::{ConfigError, FileIndexes};
use super::{
    BalancerKind, Config, Dur, HashOn, HealthCheckKind, ListenerConfig, ListenerLimits,
    ListenerProtocol, MatchConfig, PlaintextAction, PoolConfig, RetryConfig, RetryOn, RouteConfig,
    UnknownSni, UpstreamProtocol, ValueMatchConfig,
};

/// hyper refuses HTTP/1 read buffers smaller than this.
const MIN_HEADER_BYTES: u64 = 8192;
const MAX_WEIGHT: u32 = 10_000;
const MAX_CONCURRENT: u32 = 1_000_000;
const MAX_RETRIES: u32 = 10;
const MAX_WORKERS: usize = 1024;
const H2_MAX_WINDOW: u64 = (1 << 31) - 1;

struct Errors<'a>(&'a mut Vec<ConfigError>);

impl Errors<'_> {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }
}

pub(super) fn validate(config: &Config, indexes: &FileIndexes, errors: &mut Vec<ConfigError>) {
    let mut errors = Errors(errors);
    if let Some(workers) = config.workers {
        if workers == 0 || workers > MAX_WORKERS {
            errors.push("workers", format!("must be between 1 and {MAX_WORKERS}"));
        }
    }
    if config.log.level.trim().is_empty() {
        errors.push("log.level", "must not be empty");
    }
    if config.access_log.buffer_lines == 0 {
        errors.push("access_log.buffer_lines", "must be at least 1");
    }
    if config.access_log.path.trim().is_empty() {
        errors.push("access_log.path", "must be a file path or \"stdout\"");
    }
    validate_metrics(config, &mut errors);
    let ratio = config.tracing.sample_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        errors.push("tracing.sample_ratio", "must be between 0.0 and 1.0");
    }
    if let Some(url) = &config.tracing.otlp_endpoint {
        if let Err(err) = crate::telemetry::otlp::check_endpoint(url) {
            errors.push("tracing.otlp_endpoint", err.to_string());
        }
    }
    let https = config
        .tracing
        .otlp_endpoint
        .as_deref()
        .is_some_and(|url| url.starts_with("https://"));
    if config.tracing.otlp_ca.is_some() && !https {
        errors.push(
            "tracing.otlp_ca",
            "only for an https:// tracing.otlp_endpoint",
        );
    }
    if config.tracing.export_interval.0.is_zero() {
        errors.push("tracing.export_interval", "must be more than 0s");
    }
    if http::HeaderName::from_bytes(config.http.request_id_header.as_bytes()).is_err() {
        errors.push(
            "http.request_id_header",
            format!(
                "{:?} is not a valid header name",
                config.http.request_id_header
            ),
        );
    }
    if let Some(demo) = &config.demo {
        check_socket_addr(&demo.bind, "demo.bind", &mut errors);
    }
    let pool_names = validate_pools(config, indexes, &mut errors);
    validate_listeners(config, indexes, &pool_names, &mut errors);
    validate_tls(config, &mut errors);
    for (path, message) in config.firewall.validate("firewall") {
        errors.push(path, message);
    }
    validate_control(config, &mut errors);
    let mut route_names = HashSet::new();
    for (route, &index) in config.routes.iter().zip(&indexes.routes) {
        let path = format!("routes[{index}]");
        if let Some(name) = &route.name {
            if name.is_empty() {
                errors.push(format!("{path}.name"), "must not be empty");
            } else if !route_names.insert(name.as_str()) {
                errors.push(
                    format!("{path}.name"),
                    format!("duplicate route name {name:?}"),
                );
            }
        }
        validate_route(route, &path, &pool_names, &mut errors);
        let mut found = Vec::new();
        super::policy::validate_route_policies(route, &path, &mut found);
        for (field, message) in found {
            errors.push(field, message);
        }
    }
    if let Some(limit) = &config.http.rate_limit {
        let mut found = Vec::new();
        super::policy::validate_rate_limit(limit, "http.rate_limit", &mut found);
        if limit.key == super::policy::RateLimitKey::Identity {
            found.push((
                "http.rate_limit.key".into(),
                "the global limit runs before authentication: use client_ip or header".into(),
            ));
        }
        for (field, message) in found {
            errors.push(field, message);
        }
    }
}

fn validate_listeners(
    config: &Config,
    file: &FileIndexes,
    pools: &HashSet<&str>,
    errors: &mut Errors,
) {
    let indexes = &file.listeners;
    // A listener that failed to parse has been reported already.
    if config.listeners.is_empty() && file.unparsed_in("listeners").next().is_none() {
        errors.push("listeners", "at least one listener is required");
    }
    let mut names = HashSet::new();
    let mut binds: HashMap<SocketAddr, &str> = HashMap::new();
    for (listener, &index) in config.listeners.iter().zip(indexes) {
        let path = format!("listeners[{index}]");
        check_name(&listener.name, &format!("{path}.name"), errors);
        if !names.insert(listener.name.as_str()) {
            errors.push(
                format!("{path}.name"),
                format!("duplicate listener name {:?}", listener.name),
            );
        }
        if let Some(addr) = check_socket_addr(&listener.bind, &format!("{path}.bind"), errors) {
            if addr.port() != 0 {
                if let Some(other) = binds.insert(addr, &listener.name) {
                    errors.push(
                        format!("{path}.bind"),
                        format!("{addr} is already bound by listener {other:?}"),
                    );
                }
            }
        }
        validate_limits(&listener.limits, &format!("{path}.limits"), errors);
        validate_pipeline(listener, &path, pools, errors);
    }
}

/// The connection-pipeline settings of one listener: each protocol's own table, PROXY
/// protocol, firewall, redirect.
fn validate_pipeline(
    listener: &ListenerConfig,
    path: &str,
    pools: &HashSet<&str>,
    errors: &mut Errors,
) {
    let check_pool = |field: String, pool: &str, errors: &mut Errors| {
        if !pools.contains(pool) {
            errors.push(field, format!("unknown pool {pool:?}"));
        }
    };
    match (listener.protocol, &listener.tls) {
        (ListenerProtocol::Tls, None) => {
            errors.push(format!("{path}.tls"), "required when protocol = \"tls\"");
        }
        (ListenerProtocol::Tls, Some(tls)) => {
            for (index, route) in tls.passthrough.iter().enumerate() {
                let route_path = format!("{path}.tls.passthrough[{index}]");
                if route.sni.is_empty() {
                    errors.push(format!("{route_path}.sni"), "at least one name is required");
                }
                for (name_index, name) in route.sni.iter().enumerate() {
                    if let Err(message) = check_server_name(name) {
                        errors.push(format!("{route_path}.sni[{name_index}]"), message);
                    }
                }
                check_pool(format!("{route_path}.pool"), &route.pool, errors);
                if route.idle_timeout.0.is_zero() {
                    errors.push(
                        format!("{route_path}.idle_timeout"),
                        "must be greater than zero",
                    );
                }
            }
            if let UnknownSni::Passthrough(pool) = &tls.unknown_sni {
                check_pool(format!("{path}.tls.unknown_sni.passthrough"), pool, errors);
            }
            for (field, value) in [
                ("client_hello_timeout", tls.client_hello_timeout),
                ("handshake_timeout", tls.handshake_timeout),
            ] {
                if value.0.is_zero() {
                    errors.push(format!("{path}.tls.{field}"), "must be greater than zero");
                }
            }
            for (index, proto) in tls.alpn.iter().enumerate() {
                if proto.is_empty() || proto.len() > 255 {
                    errors.push(
                        format!("{path}.tls.alpn[{index}]"),
                        "must be 1 to 255 bytes",
                    );
                }
            }
            if let Some(auth) = &tls.client_auth {
                if auth.ca.trim().is_empty() {
                    errors.push(format!("{path}.tls.client_auth.ca"), "must name a PEM file");
                }
                if http::HeaderName::from_bytes(auth.subject_header.as_bytes()).is_err() {
                    errors.push(
                        format!("{path}.tls.client_auth.subject_header"),
                        format!("{:?} is not a valid header name", auth.subject_header),
                    );
                }
            }
        }
        (_, Some(_)) => {
            errors.push(format!("{path}.tls"), "only for protocol = \"tls\"");
        }
        _ => {}
    }
    match (listener.protocol, &listener.tcp) {
        (ListenerProtocol::Tcp, None) => {
            errors.push(format!("{path}.tcp"), "required when protocol = \"tcp\"");
        }
        (ListenerProtocol::Tcp, Some(tcp)) => {
            check_pool(format!("{path}.tcp.pool"), &tcp.pool, errors);
            if tcp.idle_timeout.0.is_zero() {
                errors.push(
                    format!("{path}.tcp.idle_timeout"),
                    "must be greater than zero",
                );
            }
        }
        (_, Some(_)) => {
            errors.push(format!("{path}.tcp"), "only for protocol = \"tcp\"");
        }
        _ => {}
    }
    if let Some(receive) = &listener.proxy_protocol {
        if receive.trusted_cidrs.is_empty() {
            errors.push(
                format!("{path}.proxy_protocol.trusted_cidrs"),
                "at least one network is required",
            );
        }
        if receive.timeout.0.is_zero() {
            errors.push(
                format!("{path}.proxy_protocol.timeout"),
                "must be greater than zero",
            );
        }
    }
    if let Some(firewall) = &listener.firewall {
        for (field, message) in firewall.validate(&format!("{path}.firewall")) {
            errors.push(field, message);
        }
    }
    if let Some(redirect) = &listener.redirect_https {
        if !matches!(redirect.status, 301 | 302 | 307 | 308) {
            errors.push(
                format!("{path}.redirect_https.status"),
                "must be 301, 302, 307 or 308",
            );
        }
        if listener.protocol != ListenerProtocol::Http
            && listener
                .tls
                .as_ref()
                .is_none_or(|tls| tls.plaintext != PlaintextAction::Redirect)
        {
            errors.push(
                format!("{path}.redirect_https"),
                "only for protocol = \"http\" or tls.plaintext = \"redirect\"",
            );
        }
    }
}

/// A name for SNI matching: a DNS name, or `*.` followed by one.
fn check_server_name(name: &str) -> Result<(), String> {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a server name (a DNS name or *.example.com)"
        ))
    }
}

fn validate_tls(config: &Config, errors: &mut Errors) {
    let certificates = &config.tls.certificates;
    for (index, cert) in certificates.iter().enumerate() {
        let path = format!("tls.certificates[{index}]");
        for (field, value) in [("cert", &cert.cert), ("key", &cert.key)] {
            if value.trim().is_empty() {
                errors.push(format!("{path}.{field}"), "must name a PEM file");
            }
        }
        for (name_index, name) in cert.names.iter().enumerate() {
            if let Err(message) = check_server_name(name) {
                errors.push(format!("{path}.names[{name_index}]"), message);
            }
        }
    }
    if certificates.iter().filter(|cert| cert.default).count() > 1 {
        errors.push(
            "tls.certificates",
            "at most one certificate can be the default",
        );
    }
}

fn validate_limits(limits: &ListenerLimits, path: &str, errors: &mut Errors) {
    if limits.max_request_header_bytes.0 < MIN_HEADER_BYTES {
        errors.push(
            format!("{path}.max_request_header_bytes"),
            format!("must be at least {MIN_HEADER_BYTES} bytes"),
        );
    }
    if limits.max_request_headers == 0 || limits.max_request_headers > 10_000 {
        errors.push(
            format!("{path}.max_request_headers"),
            "must be between 1 and 10000",
        );
    }
    if limits.max_uri_bytes.0 < 16 {
        errors.push(format!("{path}.max_uri_bytes"), "must be at least 16 bytes");
    }
    if limits.request_header_timeout.0.is_zero() {
        errors.push(
            format!("{path}.request_header_timeout"),
            "must be greater than zero",
        );
    }
    if limits.h2_max_concurrent_streams == 0 {
        errors.push(
            format!("{path}.h2_max_concurrent_streams"),
            "must be at least 1",
        );
    }
    for (field, size) in [
        ("h2_initial_stream_window", limits.h2_initial_stream_window),
        (
            "h2_initial_connection_window",
            limits.h2_initial_connection_window,
        ),
    ] {
        if size.0 < 65_535 || size.0 > H2_MAX_WINDOW {
            errors.push(
                format!("{path}.{field}"),
                format!("must be between 65535 and {H2_MAX_WINDOW} bytes"),
            );
        }
    }
}

fn validate_pools<'a>(
    config: &'a Config,
    file: &'a FileIndexes,
    errors: &mut Errors,
) -> HashSet<&'a str> {
    let mut names = HashSet::new();
    for (pool, &index) in config.pools.iter().zip(&file.pools) {
        let path = format!("pools[{index}]");
        check_name(&pool.name, &format!("{path}.name"), errors);
        if !names.insert(pool.name.as_str()) {
            errors.push(
                format!("{path}.name"),
                format!("duplicate pool name {:?}", pool.name),
            );
        }
        if pool.endpoints.is_empty() {
            errors.push(
                format!("{path}.endpoints"),
                "at least one endpoint is required",
            );
        }
        for (endpoint_index, endpoint) in pool.endpoints.iter().enumerate() {
            let endpoint_path = format!("{path}.endpoints[{endpoint_index}]");
            if let Err(message) = check_host_port(endpoint.address()) {
                errors.push(format!("{endpoint_path}.address"), message);
            }
            if endpoint.weight() == 0 || endpoint.weight() > MAX_WEIGHT {
                errors.push(
                    format!("{endpoint_path}.weight"),
                    format!("must be between 1 and {MAX_WEIGHT}"),
                );
            }
        }
        if pool.connect_timeout.0.is_zero() {
            errors.push(
                format!("{path}.connect_timeout"),
                "must be greater than zero",
            );
        }
        validate_resilience(pool, &path, errors);
        if pool.protocol == UpstreamProtocol::H2 && pool.tls.is_none() {
            errors.push(
                format!("{path}.tls"),
                "required when protocol = \"h2\" (use \"h2c\" for HTTP/2 without TLS)",
            );
        }
        if let Some(tls) = &pool.tls {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                errors.push(
                    format!("{path}.tls.client_key"),
                    "client_cert and client_key go together",
                );
            }
            if tls.insecure_skip_verify && tls.ca.is_some() {
                errors.push(
                    format!("{path}.tls.ca"),
                    "has no effect with insecure_skip_verify = true",
                );
            }
            if let Some(sni) = &tls.sni {
                if rustls_pki_types::ServerName::try_from(sni.as_str()).is_err() {
                    errors.push(
                        format!("{path}.tls.sni"),
                        format!("{sni:?} is not a server name"),
                    );
                }
            }
        }
    }
    // A pool that failed to parse still counts as declared, so routes naming it do not
    // add a second, misleading error.
    names.extend(file.unparsed_in("pools").flatten());
    names
}

fn positive(value: Dur, path: String, errors: &mut Errors) {
    if value.0.is_zero() {
        errors.push(path, "must be greater than zero");
    }
}

fn percent(value: u32, path: String, errors: &mut Errors) {
    if value > 100 {
        errors.push(path, "must be between 0 and 100");
    }
}

/// Balancer, health, outlier, breaker, limiter and budget settings of one pool.
fn validate_resilience(pool: &PoolConfig, path: &str, errors: &mut Errors) {
    match (pool.balancer, &pool.hash) {
        (BalancerKind::ConsistentHash, None) => errors.push(
            format!("{path}.hash"),
            "required when balancer = \"consistent_hash\"",
        ),
        (BalancerKind::ConsistentHash, Some(hash)) => match (hash.on, &hash.name) {
            (HashOn::Header, Some(name))
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() =>
            {
                errors.push(
                    format!("{path}.hash.name"),
                    format!("{name:?} is not a valid header name"),
                )
            }
            (HashOn::Header | HashOn::Cookie, None) => errors.push(
                format!("{path}.hash.name"),
                "required when hash.on is \"header\" or \"cookie\"",
            ),
            (HashOn::Cookie, Some(name)) if name.is_empty() => {
                errors.push(format!("{path}.hash.name"), "must not be empty")
            }
            _ => {}
        },
        (_, Some(_)) => errors.push(
            format!("{path}.hash"),
            "only used with balancer = \"consistent_hash\"",
        ),
        _ => {}
    }
    percent(
        pool.panic_threshold,
        format!("{path}.panic_threshold"),
        errors,
    );
    if let Some(check) = &pool.health_check {
        let at = format!("{path}.health_check");
        positive(check.interval, format!("{at}.interval"), errors);
        positive(check.timeout, format!("{at}.timeout"), errors);
        if check.kind == HealthCheckKind::Http
            && http::uri::PathAndQuery::try_from(check.path.as_str())
                .map_or(true, |_| !check.path.starts_with('/'))
        {
            errors.push(format!("{at}.path"), "must be a path starting with \"/\"");
        }
        let [low, high] = check.expected_status;
        if !(100..=599).contains(&low) || !(100..=599).contains(&high) || low > high {
            errors.push(
                format!("{at}.expected_status"),
                "must be [low, high] with 100 <= low <= high <= 599",
            );
        }
        if check.unhealthy_threshold == 0 {
            errors.push(format!("{at}.unhealthy_threshold"), "must be at least 1");
        }
        if check.healthy_threshold == 0 {
            errors.push(format!("{at}.healthy_threshold"), "must be at least 1");
        }
        if let Some(host) = &check.host {
            if http::HeaderValue::from_str(host).is_err() || host.is_empty() {
                errors.push(
                    format!("{at}.host"),
                    format!("{host:?} is not a valid host"),
                );
            }
        }
    }
    if pool.passive_health.consecutive_failures > 0 {
        positive(
            pool.passive_health.ejection_time,
            format!("{path}.passive_health.ejection_time"),
            errors,
        );
    }
    if let Some(outlier) = &pool.outlier_detection {
        let at = format!("{path}.outlier_detection");
        if outlier.consecutive_5xx == 0
            && outlier.failure_percent == 0
            && outlier.latency_percent == 0
        {
            errors.push(
                format!("{at}.consecutive_5xx"),
                "must be at least 1 unless failure_percent or latency_percent is set",
            );
        }
        if outlier.latency_percent > 0 {
            if outlier.latency_percent <= 100 {
                errors.push(
                    format!("{at}.latency_percent"),
                    "must be above 100 (a multiple of the pool's median latency)",
                );
            }
            positive(outlier.interval, format!("{at}.interval"), errors);
            if outlier.latency_min_requests == 0 {
                errors.push(format!("{at}.latency_min_requests"), "must be at least 1");
            }
        }
        percent(
            outlier.failure_percent,
            format!("{at}.failure_percent"),
            errors,
        );
        if outlier.failure_percent > 0 {
            positive(outlier.interval, format!("{at}.interval"), errors);
            if outlier.failure_min_requests == 0 {
                errors.push(format!("{at}.failure_min_requests"), "must be at least 1");
            }
        }
        positive(
            outlier.base_ejection_time,
            format!("{at}.base_ejection_time"),
            errors,
        );
        if outlier.max_ejection_time.0 < outlier.base_ejection_time.0 {
            errors.push(
                format!("{at}.max_ejection_time"),
                "must be at least base_ejection_time",
            );
        }
        percent(
            outlier.max_ejection_percent,
            format!("{at}.max_ejection_percent"),
            errors,
        );
    }
    if let Some(breaker) = &pool.circuit_breaker {
        validate_breaker(breaker, &format!("{path}.circuit_breaker"), errors);
    }
    if let Some(limits) = &pool.concurrency {
        let at = format!("{path}.concurrency");
        if limits.max_concurrent == 0 || limits.max_concurrent > MAX_CONCURRENT {
            errors.push(
                format!("{at}.max_concurrent"),
                format!("must be between 1 and {MAX_CONCURRENT}"),
            );
        }
        if limits.max_queue > MAX_CONCURRENT {
            errors.push(
                format!("{at}.max_queue"),
                format!("must be at most {MAX_CONCURRENT}"),
            );
        }
        if limits.max_queue > 0 {
            positive(limits.queue_timeout, format!("{at}.queue_timeout"), errors);
        }
    }
    if pool.max_connections_per_endpoint > MAX_CONCURRENT {
        errors.push(
            format!("{path}.max_connections_per_endpoint"),
            format!("must be at most {MAX_CONCURRENT}"),
        );
    }
    if pool.connection_queue.max_queue > MAX_CONCURRENT {
        errors.push(
            format!("{path}.connection_queue.max_queue"),
            format!("must be at most {MAX_CONCURRENT}"),
        );
    }
    if pool.max_connections_per_endpoint > 0 && pool.connection_queue.max_queue > 0 {
        positive(
            pool.connection_queue.queue_timeout,
            format!("{path}.connection_queue.queue_timeout"),
            errors,
        );
    }
    percent(
        pool.retry_budget.percent,
        format!("{path}.retry_budget.percent"),
        errors,
    );
    positive(
        pool.retry_budget.window,
        format!("{path}.retry_budget.window"),
        errors,
    );
}

fn validate_breaker(breaker: &crate::config::CircuitBreakerConfig, at: &str, errors: &mut Errors) {
    if breaker.error_percent == 0 {
        errors.push(format!("{at}.error_percent"), "must be between 1 and 100");
    }
    percent(breaker.error_percent, format!("{at}.error_percent"), errors);
    if breaker.min_requests == 0 {
        errors.push(format!("{at}.min_requests"), "must be at least 1");
    }
    positive(breaker.window, format!("{at}.window"), errors);
    positive(breaker.open_for, format!("{at}.open_for"), errors);
    if breaker.half_open_probes == 0 {
        errors.push(format!("{at}.half_open_probes"), "must be at least 1");
    }
}

fn validate_retry(retry: &RetryConfig, path: &str, errors: &mut Errors) {
    let at = format!("{path}.retry");
    if retry.max_retries > MAX_RETRIES {
        errors.push(
            format!("{at}.max_retries"),
            format!("must be at most {MAX_RETRIES}"),
        );
    }
    if retry.on.contains(&RetryOn::RetriableStatus) && retry.statuses.is_empty() {
        errors.push(
            format!("{at}.statuses"),
            "required with on = [\"retriable_status\"]",
        );
    }
    for (index, status) in retry.statuses.iter().enumerate() {
        if !(100..=599).contains(status) {
            errors.push(
                format!("{at}.statuses[{index}]"),
                "must be between 100 and 599",
            );
        }
    }
    if retry.backoff_max.0 < retry.backoff_base.0 {
        errors.push(format!("{at}.backoff_max"), "must be at least backoff_base");
    }
}

fn validate_route(route: &RouteConfig, path: &str, pools: &HashSet<&str>, errors: &mut Errors) {
    validate_retry(&route.retry, path, errors);
    if let Some(breaker) = &route.circuit_breaker {
        let at = format!("{path}.circuit_breaker");
        validate_breaker(breaker, &at, errors);
        if route.pool.is_none() {
            errors.push(
                at,
                "only routes that forward to a pool have a circuit breaker",
            );
        }
    }
    if let Some(hedge) = &route.hedge {
        positive(hedge.delay, format!("{path}.hedge.delay"), errors);
        if hedge.percentile.is_some_and(|p| !(1..=99).contains(&p)) {
            errors.push(
                format!("{path}.hedge.percentile"),
                "must be between 1 and 99",
            );
        }
    }
    for (field, message) in super::traffic::validate_route(route, path, pools) {
        errors.push(field, message);
    }
    if route.pool.is_some() && !route.split.is_empty() {
        errors.push(
            format!("{path}.split"),
            "pool and split are mutually exclusive",
        );
    }
    let actions = [
        super::traffic::forwards(route),
        route.redirect.is_some(),
        route.direct_response.is_some(),
    ];
    match actions.iter().filter(|set| **set).count() {
        0 => errors.push(path, "needs one of pool, redirect or direct_response"),
        1 => {}
        _ => errors.push(
            path,
            "pool, redirect and direct_response are mutually exclusive",
        ),
    }
    if let Some(pool) = &route.pool {
        if !pools.contains(pool.as_str()) {
            errors.push(format!("{path}.pool"), format!("unknown pool {pool:?}"));
        }
    }
    if let Some(redirect) = &route.redirect {
        if ![301, 302, 303, 307, 308].contains(&redirect.status) {
            errors.push(
                format!("{path}.redirect.status"),
                "must be one of 301, 302, 303, 307, 308",
            );
        }
        if redirect.location.is_empty() {
            errors.push(format!("{path}.redirect.location"), "must not be empty");
        }
    }
    if let Some(direct) = &route.direct_response {
        if !(200..=599).contains(&direct.status) {
            errors.push(
                format!("{path}.direct_response.status"),
                "must be between 200 and 599",
            );
        }
        if http::HeaderValue::from_str(&direct.content_type).is_err() {
            errors.push(
                format!("{path}.direct_response.content_type"),
                "is not a valid header value",
            );
        }
    }
    validate_match(&route.matcher, &format!("{path}.match"), errors);
    let rewrites = [
        route.strip_prefix.is_some(),
        route.rewrite_prefix.is_some(),
        route.rewrite_regex.is_some(),
    ];
    if rewrites.iter().filter(|set| **set).count() > 1 {
        errors.push(
            path,
            "strip_prefix, rewrite_prefix and rewrite_regex are mutually exclusive",
        );
    }
    if let Some(prefix) = &route.strip_prefix {
        if !prefix.starts_with('/') {
            errors.push(format!("{path}.strip_prefix"), "must start with \"/\"");
        }
    }
    if let Some(prefix) = &route.rewrite_prefix {
        if route.matcher.path_prefix.is_none() {
            errors.push(
                format!("{path}.rewrite_prefix"),
                "needs match.path_prefix to replace",
            );
        }
        if !prefix.starts_with('/') {
            errors.push(format!("{path}.rewrite_prefix"), "must start with \"/\"");
        }
    }
    if let Some(rewrite) = &route.rewrite_regex {
        check_regex(
            &rewrite.pattern,
            &format!("{path}.rewrite_regex.pattern"),
            errors,
        );
    }
    if let Some(host) = &route.host_rewrite {
        if host.is_empty() || http::uri::Authority::try_from(host.as_str()).is_err() {
            errors.push(
                format!("{path}.host_rewrite"),
                format!("{host:?} is not a valid host"),
            );
        }
    }
    if route.timeouts.response_header.0.is_zero() {
        errors.push(
            format!("{path}.timeouts.response_header"),
            "must be greater than zero",
        );
    }
}

fn validate_match(matcher: &MatchConfig, path: &str, errors: &mut Errors) {
    for (index, host) in matcher.hosts.iter().enumerate() {
        if let Err(message) = check_host_pattern(host) {
            errors.push(format!("{path}.hosts[{index}]"), message);
        }
    }
    let path_forms = [&matcher.path, &matcher.path_prefix, &matcher.path_regex];
    if path_forms.iter().filter(|form| form.is_some()).count() > 1 {
        errors.push(
            path,
            "path, path_prefix and path_regex are mutually exclusive",
        );
    }
    for (field, value) in [
        ("path", &matcher.path),
        ("path_prefix", &matcher.path_prefix),
    ] {
        if let Some(value) = value {
            if !value.starts_with('/') {
                errors.push(format!("{path}.{field}"), "must start with \"/\"");
            }
        }
    }
    if let Some(regex) = &matcher.path_regex {
        check_regex(regex, &format!("{path}.path_regex"), errors);
    }
    for (index, method) in matcher.methods.iter().enumerate() {
        if method.is_empty() || http::Method::from_bytes(method.as_bytes()).is_err() {
            errors.push(
                format!("{path}.methods[{index}]"),
                format!("{method:?} is not a valid method"),
            );
        }
    }
    for (index, header) in matcher.headers.iter().enumerate() {
        let header_path = format!("{path}.headers[{index}]");
        if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
            errors.push(
                format!("{header_path}.name"),
                format!("{:?} is not a valid header name", header.name),
            );
        }
        validate_value_match(header, &header_path, errors);
    }
    for (index, param) in matcher.query.iter().enumerate() {
        let param_path = format!("{path}.query[{index}]");
        if param.name.is_empty() {
            errors.push(format!("{param_path}.name"), "must not be empty");
        }
        validate_value_match(param, &param_path, errors);
    }
}

fn validate_value_match(condition: &ValueMatchConfig, path: &str, errors: &mut Errors) {
    let forms = [
        condition.value.is_some(),
        condition.regex.is_some(),
        condition.present.is_some(),
    ];
    if forms.iter().filter(|set| **set).count() != 1 {
        errors.push(path, "needs exactly one of value, regex or present");
    }
    if let Some(regex) = &condition.regex {
        check_regex(regex, &format!("{path}.regex"), errors);
    }
}

fn check_name(name: &str, path: &str, errors: &mut Errors) {
    if name.is_empty() {
        errors.push(path, "must not be empty");
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        errors.push(
            path,
            format!("{name:?} may only contain letters, digits, '-', '_' and '.'"),
        );
    }
}

fn check_regex(pattern: &str, path: &str, errors: &mut Errors) {
    if let Err(err) = regex::Regex::new(pattern) {
        // The last line of regex's multi-line report: "error: unclosed group".
        let report = err.to_string();
        let last_line = report.lines().last().unwrap_or("invalid").trim();
        let reason = last_line.strip_prefix("error: ").unwrap_or(last_line);
        errors.push(path, format!("invalid regex {pattern:?}: {reason}"));
    }
}

/// The metrics section (SPEC OPS-1).
fn validate_metrics(config: &Config, errors: &mut Errors) {
    let metrics = &config.metrics;
    if metrics.max_routes == 0 {
        errors.push("metrics.max_routes", "must be at least 1");
    }
    if metrics.max_endpoints == 0 {
        errors.push("metrics.max_endpoints", "must be at least 1");
    }
    let has_tokens = config
        .admin
        .as_ref()
        .is_some_and(|admin| !admin.tokens.is_empty());
    if metrics.require_token && !has_tokens {
        errors.push(
            "metrics.require_token",
            "needs at least one admin.tokens entry to check the token against",
        );
    }
    if let Some(bind) = &metrics.bind {
        if let Some(addr) = check_socket_addr(bind, "metrics.bind", errors) {
            if addr.port() != 0 {
                let clash = config
                    .listeners
                    .iter()
                    .position(|listener| listener.bind.parse::<SocketAddr>() == Ok(addr));
                if let Some(index) = clash {
                    errors.push(
                        "metrics.bind",
                        format!("{addr} is also listeners[{index}].bind"),
                    );
                }
                if config
                    .admin
                    .as_ref()
                    .is_some_and(|admin| admin.bind.parse::<SocketAddr>() == Ok(addr))
                {
                    errors.push("metrics.bind", format!("{addr} is also admin.bind"));
                }
            }
        }
    }
}

/// The store and admin sections (SPEC CTRL-3, CTRL-4, CTRL-5).
fn validate_control(config: &Config, errors: &mut Errors) {
    for (path, message) in crate::control::bundle::validate_config(config) {
        errors.push(path, message);
    }
    if config.store.path.trim().is_empty() {
        errors.push("store.path", "must be a file path");
    }
    let Some(admin) = &config.admin else {
        return;
    };
    let mutual_tls = admin
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca.is_some());
    if let Some(tls) = &admin.tls {
        if admin.bind.starts_with("unix:") {
            errors.push(
                "admin.tls",
                "TLS is for a TCP admin.bind; a unix: socket is protected by its mode (0600)",
            );
        }
        for (field, value) in [("cert", &tls.cert), ("key", &tls.key)] {
            if value.trim().is_empty() {
                errors.push(format!("admin.tls.{field}"), "must be a file path");
            }
        }
        if tls
            .client_ca
            .as_ref()
            .is_some_and(|ca| ca.trim().is_empty())
        {
            errors.push("admin.tls.client_ca", "must be a file path");
        }
    }
    if let Some(path) = admin.bind.strip_prefix("unix:") {
        // A 0600 socket is reachable by the gateway's own user only, like loopback.
        if !std::path::Path::new(path).is_absolute() {
            errors.push(
                "admin.bind",
                format!(
                    "{path:?} must be an absolute path, such as unix:/run/gatehouse/admin.sock"
                ),
            );
        }
    } else if let Some(addr) = check_socket_addr(&admin.bind, "admin.bind", errors) {
        if admin.tokens.is_empty() && !mutual_tls && !addr.ip().is_loopback() {
            errors.push(
                "admin.tokens",
                "at least one token is required when admin.bind is not a loopback address (or admin.tls.client_ca, for client certificates)",
            );
        }
        if addr.port() != 0 {
            for (index, listener) in config.listeners.iter().enumerate() {
                if listener.bind.parse::<SocketAddr>() == Ok(addr) {
                    errors.push(
                        "admin.bind",
                        format!(
                            "{addr} is also listeners[{index}].bind; the admin API needs its own listener"
                        ),
                    );
                }
            }
        }
    }
    let mut names = HashSet::new();
    for (index, token) in admin.tokens.iter().enumerate() {
        let path = format!("admin.tokens[{index}]");
        if token.name.trim().is_empty() {
            errors.push(format!("{path}.name"), "must not be empty");
        } else if !names.insert(token.name.as_str()) {
            errors.push(
                format!("{path}.name"),
                format!("duplicate token name {:?}", token.name),
            );
        }
        let is_hex = token.sha256.len() == 64
            && token
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !is_hex {
            errors.push(
                format!("{path}.sha256"),
                "must be 64 lower-case hex digits: the SHA-256 of the token, not the token itself",
            );
        }
    }
}

fn check_socket_addr(text: &str, path: &str, errors: &mut Errors) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            errors.push(
                path,
                format!(
                    "invalid address {text:?}; expected ip:port such as 127.0.0.1:8080 or [::]:443"
                ),
            );
            None
        }
    }
}

/// `host:port` where host is an IP literal (IPv6 in brackets) or a DNS name.
pub(crate) fn check_host_port(text: &str) -> Result<(), String> {
    let invalid = || {
        format!("invalid endpoint {text:?}; expected host:port such as 10.0.0.5:8080 or app.internal:80")
    };
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    port.parse::<u16>().map_err(|_| invalid())?;
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(valid_label) {
        return Err(invalid());
    }
    Ok(())
}

fn check_host_pattern(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']'))
        && !name.contains('*');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host name; use an exact name or a leading wildcard such as \"*.example.com\""
        ))
    }
}
