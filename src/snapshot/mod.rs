//! Compiled, immutable snapshots of the configuration and the publisher that swaps them.
//!
//! `compile` does all the per-config work once (route table, regexes, header values,
//! pools bound to registry entries); the data plane loads the current snapshot once per
//! request or connection and decides everything from that view. A config that fails to
//! compile changes nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use ipnet::IpNet;
use regex::Regex;

use crate::config::{
    Config, ListenerConfig, ListenerProtocol, ProxyProtocolVersion, RouteConfig, UnknownSni,
    XffMode,
};
use crate::firewall::{Firewall, FirewallError, FirewallRegistries};
use crate::route::{RouteError, Router};
use crate::tls::{CertStore, CertTable, SessionState, TlsError};
use crate::upstream::{Pool, UpstreamRegistry};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{path}: {source}")]
    Tls {
        path: String,
        #[source]
        source: Box<TlsError>,
    },
    #[error("{path}: {source}")]
    Firewall {
        path: String,
        #[source]
        source: Box<FirewallError>,
    },
    #[error("{path}: unknown pool {pool:?}")]
    UnknownPool { path: String, pool: String },
    #[error(transparent)]
    Traffic(#[from] crate::traffic::TrafficError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error("routes[{index}].{field}: {message}")]
    Invalid {
        index: usize,
        field: &'static str,
        message: String,
    },
}

/// How a matched route answers.
pub enum Action {
    Forward(Arc<Pool>),
    Redirect {
        status: StatusCode,
        location: String,
    },
    Direct {
        status: StatusCode,
        body: Bytes,
        content_type: HeaderValue,
    },
}

pub enum PathRewrite {
    None,
    StripPrefix(String),
    ReplacePrefix { from: String, to: String },
    Regex { pattern: Regex, replacement: String },
}

pub struct RouteTimeouts {
    pub response_header: Duration,
    pub idle: Option<Duration>,
    pub total: Option<Duration>,
}

/// A compiled route: everything the request path needs, with no string lookups left.
pub struct Route {
    pub name: Arc<str>,
    pub action: Action,
    pub rewrite: PathRewrite,
    pub host_rewrite: Option<HeaderValue>,
    pub preserve_host: bool,
    pub timeouts: RouteTimeouts,
    /// `Some(None)`: explicitly unlimited; `None`: use the listener's default.
    pub max_request_body: Option<Option<u64>>,
    pub require_client_cert: bool,
    /// This route's request counters and latency histogram (labels resolved at compile).
    pub metrics: Arc<crate::telemetry::RouteMetrics>,
    /// Retry policy (SPEC UP-7); the budget belongs to the pool.
    pub retry: crate::config::RetryConfig,
    pub hedge: Option<crate::config::HedgeConfig>,
    /// Request policies (SPEC POLICY-1..4); none when the route uses none.
    pub policy: Option<Box<crate::policy::RouteFilters>>,
    /// Weighted split between pools (SPEC TRAFFIC-1..3); the action then names the
    /// baseline pool.
    pub split: Option<crate::traffic::Split>,
    /// Mirroring to a shadow pool (SPEC TRAFFIC-4).
    pub mirror: Option<crate::traffic::mirror::Mirror>,
    /// Header transforms, CORS and compression (SPEC POLICY-5, POLICY-6).
    pub filters: Option<crate::policy::Filters>,
    /// The route's own breaker for its pool, overriding the pool's (`routes[].circuit_breaker`).
    pub breaker: Option<crate::upstream::RouteBreaker>,
}

/// Global HTTP header behaviour, compiled.
pub struct HttpSettings {
    pub xff_mode: XffMode,
    pub trusted_proxies: Vec<IpNet>,
    pub request_id_header: HeaderName,
    pub add_forwarded: bool,
    pub add_via: bool,
    pub hide_upstream_server: bool,
    /// `tracing.sample_ratio` when trace propagation is on.
    pub tracing: Option<f64>,
}

impl HttpSettings {
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

pub struct Snapshot {
    pub version: u64,
    pub config: Arc<Config>,
    pub router: Router,
    /// In config order; `Router::lookup` returns an index into this.
    pub routes: Vec<Arc<Route>>,
    pub pools: HashMap<String, Arc<Pool>>,
    pub http: HttpSettings,
    pub listeners: HashMap<String, Arc<CompiledListener>>,
    /// The certificates this config names, installed in the `CertStore` when it goes live.
    pub certificates: Arc<CertTable>,
    /// The global firewall; none when it blocks nothing.
    pub firewall: Option<Firewall>,
    /// `http.rate_limit`; none when not configured.
    pub rate_limit: Option<crate::policy::GlobalLimit>,
}

impl Snapshot {
    pub fn listener(&self, name: &str) -> Option<&Arc<CompiledListener>> {
        self.listeners.get(name)
    }
}

/// Where an L4 relay goes.
pub struct RelayTarget {
    pub pool: Arc<Pool>,
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    pub idle_timeout: Duration,
    /// Relay with `splice(2)` (the listener's `splice`).
    pub splice: bool,
}

/// What a TLS listener does with a ClientHello.
pub struct TlsPlan {
    pub acceptor: tokio_rustls::TlsAcceptor,
    passthrough_exact: HashMap<String, usize>,
    passthrough_wildcard: HashMap<String, usize>,
    targets: Vec<RelayTarget>,
    unknown: UnknownPlan,
}

enum UnknownPlan {
    Terminate,
    Reset,
    Passthrough(usize),
}

/// The decision for one ClientHello (SPEC CONN-7).
pub enum SniDecision<'a> {
    Passthrough(&'a RelayTarget),
    Terminate,
    Reset,
}

impl TlsPlan {
    /// Passthrough routes first (exact, then `*.` wildcard), then a certificate that covers
    /// the name, then the listener's `unknown_sni` behaviour.
    pub fn decide(&self, sni: Option<&str>, certs: &CertStore) -> SniDecision<'_> {
        if let Some(name) = sni {
            let index = self.passthrough_exact.get(name).or_else(|| {
                name.split_once('.')
                    .and_then(|(_, parent)| self.passthrough_wildcard.get(parent))
            });
            if let Some(&index) = index {
                return SniDecision::Passthrough(&self.targets[index]);
            }
            if certs.covers(Some(name), false) {
                return SniDecision::Terminate;
            }
        }
        match self.unknown {
            UnknownPlan::Terminate if certs.covers(None, true) => SniDecision::Terminate,
            UnknownPlan::Terminate | UnknownPlan::Reset => SniDecision::Reset,
            UnknownPlan::Passthrough(index) => SniDecision::Passthrough(&self.targets[index]),
        }
    }
}

/// A listener's config with what its connection pipeline needs compiled.
pub struct CompiledListener {
    pub config: Arc<ListenerConfig>,
    pub tls: Option<TlsPlan>,
    /// For `protocol = "tcp"`.
    pub relay: Option<RelayTarget>,
    pub firewall: Option<Firewall>,
    /// The header carrying a verified client certificate's subject upstream, parsed once.
    pub client_cert_header: Option<HeaderName>,
}

/// State that outlives snapshots: connections, certificates, TLS sessions.
#[derive(Default)]
pub struct Registries {
    pub upstreams: UpstreamRegistry,
    pub certs: Arc<CertStore>,
    pub sessions: SessionState,
    pub firewall: FirewallRegistries,
    pub acme: crate::acme::AcmeRegistry,
    pub metrics: Arc<crate::telemetry::Metrics>,
    pub policy: crate::policy::PolicyRegistry,
    pub traffic: crate::traffic::TrafficRegistry,
}

fn compile_firewall(
    config: &crate::config::FirewallConfig,
    path: &str,
    scope: &str,
    registries: &Registries,
) -> Result<Option<Firewall>, CompileError> {
    if config.is_noop() {
        return Ok(None);
    }
    Firewall::compile(config, scope, &registries.firewall)
        .map(Some)
        .map_err(|source| CompileError::Firewall {
            path: path.into(),
            source: Box::new(source),
        })
}

/// Compiles a validated config. Pools take their connection state from `registries`.
pub fn compile(
    config: Config,
    version: u64,
    registries: &Registries,
) -> Result<Snapshot, CompileError> {
    let router = Router::for_routes(&config.routes)?;
    registries
        .metrics
        .set_caps(config.metrics.max_routes, config.metrics.max_endpoints);
    let pools = config
        .pools
        .iter()
        .enumerate()
        .map(|(index, pool)| {
            registries
                .upstreams
                .pool(pool, &registries.metrics)
                .map(|compiled| (pool.name.clone(), Arc::new(compiled)))
                .map_err(|source| CompileError::Tls {
                    path: format!("pools[{index}].tls"),
                    source: Box::new(source),
                })
        })
        .collect::<Result<HashMap<String, Arc<Pool>>, _>>()?;
    let certificates = Arc::new(CertTable::load(&config.tls.certificates).map_err(|source| {
        CompileError::Tls {
            path: "tls.certificates".into(),
            source: Box::new(source),
        }
    })?);
    let routes = config
        .routes
        .iter()
        .enumerate()
        .map(|(index, route)| compile_route(index, route, &pools, registries).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let request_id_header = HeaderName::from_bytes(config.http.request_id_header.as_bytes())
        .map_err(|e| CompileError::Invalid {
            index: 0,
            field: "http.request_id_header",
            message: e.to_string(),
        })?;
    let http = HttpSettings {
        xff_mode: config.http.x_forwarded_for,
        trusted_proxies: config.http.trusted_proxies.clone(),
        request_id_header,
        add_forwarded: config.http.add_forwarded,
        add_via: config.http.add_via,
        hide_upstream_server: config.http.hide_upstream_server,
        tracing: config
            .tracing
            .enabled
            .then_some(config.tracing.sample_ratio),
    };
    let firewall = compile_firewall(&config.firewall, "firewall", "global", registries)?;
    let rate_limit = crate::policy::compile_global(
        &config,
        &registries.policy,
        &registries.metrics,
        routes.iter().map(|route| &*route.name),
    );
    let listeners = config
        .listeners
        .iter()
        .enumerate()
        .map(|(index, listener)| {
            compile_listener(index, listener, &pools, registries, config.acme.is_some())
                .map(|compiled| (listener.name.clone(), Arc::new(compiled)))
        })
        .collect::<Result<_, _>>()?;
    Ok(Snapshot {
        version,
        router,
        routes,
        pools,
        http,
        listeners,
        certificates,
        firewall,
        rate_limit,
        config: Arc::new(config),
    })
}

fn compile_listener(
    index: usize,
    config: &ListenerConfig,
    pools: &HashMap<String, Arc<Pool>>,
    registries: &Registries,
    acme: bool,
) -> Result<CompiledListener, CompileError> {
    let path = format!("listeners[{index}]");
    let target = |field: String, pool: &str, send, idle: crate::config::Dur| {
        pools
            .get(pool)
            .map(|pool| RelayTarget {
                pool: pool.clone(),
                send_proxy_protocol: send,
                idle_timeout: idle.0,
                splice: config.splice,
            })
            .ok_or_else(|| CompileError::UnknownPool {
                path: field,
                pool: pool.into(),
            })
    };
    let tls = match (config.protocol, &config.tls) {
        (ListenerProtocol::Tls, Some(settings)) => {
            let server =
                crate::tls::server_config(settings, &registries.certs, &registries.sessions, acme)
                    .map_err(|source| CompileError::Tls {
                        path: format!("{path}.tls"),
                        source: Box::new(source),
                    })?;
            let mut plan = TlsPlan {
                acceptor: tokio_rustls::TlsAcceptor::from(server),
                passthrough_exact: HashMap::new(),
                passthrough_wildcard: HashMap::new(),
                targets: Vec::new(),
                unknown: UnknownPlan::Terminate,
            };
            for (route_index, route) in settings.passthrough.iter().enumerate() {
                let field = format!("{path}.tls.passthrough[{route_index}].pool");
                plan.targets.push(target(
                    field,
                    &route.pool,
                    route.send_proxy_protocol,
                    route.idle_timeout,
                )?);
                let slot = plan.targets.len() - 1;
                for name in &route.sni {
                    let name = name.to_ascii_lowercase();
                    match name.strip_prefix("*.") {
                        Some(parent) => plan.passthrough_wildcard.entry(parent.to_string()),
                        None => plan.passthrough_exact.entry(name),
                    }
                    .or_insert(slot);
                }
            }
            plan.unknown = match &settings.unknown_sni {
                UnknownSni::Terminate => UnknownPlan::Terminate,
                UnknownSni::Reset => UnknownPlan::Reset,
                UnknownSni::Passthrough(pool) => {
                    let field = format!("{path}.tls.unknown_sni.passthrough");
                    plan.targets
                        .push(target(field, pool, None, crate::config::Dur::secs(300))?);
                    UnknownPlan::Passthrough(plan.targets.len() - 1)
                }
            };
            Some(plan)
        }
        _ => None,
    };
    let relay = match (config.protocol, &config.tcp) {
        (ListenerProtocol::Tcp, Some(tcp)) => Some(target(
            format!("{path}.tcp.pool"),
            &tcp.pool,
            tcp.send_proxy_protocol,
            tcp.idle_timeout,
        )?),
        _ => None,
    };
    let firewall = match &config.firewall {
        Some(rules) => {
            compile_firewall(rules, &format!("{path}.firewall"), &config.name, registries)?
        }
        None => None,
    };
    let client_cert_header = config
        .tls
        .as_ref()
        .and_then(|tls| tls.client_auth.as_ref())
        .and_then(|auth| HeaderName::from_bytes(auth.subject_header.as_bytes()).ok());
    Ok(CompiledListener {
        client_cert_header,
        config: Arc::new(config.clone()),
        tls,
        relay,
        firewall,
    })
}

fn compile_route(
    index: usize,
    route: &RouteConfig,
    pools: &HashMap<String, Arc<Pool>>,
    registries: &Registries,
) -> Result<Route, CompileError> {
    let metrics = &*registries.metrics;
    let invalid = |field: &'static str, message: String| CompileError::Invalid {
        index,
        field,
        message,
    };
    let baseline = route.split.first().map(|target| &target.pool);
    let action = if let Some(pool_name) = route.pool.as_ref().or(baseline) {
        let pool = pools
            .get(pool_name)
            .ok_or_else(|| invalid("pool", format!("unknown pool {pool_name:?}")))?;
        Action::Forward(pool.clone())
    } else if let Some(redirect) = &route.redirect {
        Action::Redirect {
            status: StatusCode::from_u16(redirect.status)
                .map_err(|e| invalid("redirect.status", e.to_string()))?,
            location: redirect.location.clone(),
        }
    } else if let Some(direct) = &route.direct_response {
        Action::Direct {
            status: StatusCode::from_u16(direct.status)
                .map_err(|e| invalid("direct_response.status", e.to_string()))?,
            body: Bytes::from(direct.body.clone()),
            content_type: HeaderValue::from_str(&direct.content_type)
                .map_err(|e| invalid("direct_response.content_type", e.to_string()))?,
        }
    } else {
        return Err(invalid(
            "pool",
            "needs one of pool, redirect or direct_response".into(),
        ));
    };
    let rewrite = if let Some(prefix) = &route.strip_prefix {
        PathRewrite::StripPrefix(prefix.trim_end_matches('/').to_string())
    } else if let (Some(to), Some(from)) = (&route.rewrite_prefix, &route.matcher.path_prefix) {
        PathRewrite::ReplacePrefix {
            from: from.trim_end_matches('/').to_string(),
            to: to.clone(),
        }
    } else if let Some(rewrite) = &route.rewrite_regex {
        PathRewrite::Regex {
            pattern: Regex::new(&rewrite.pattern)
                .map_err(|e| invalid("rewrite_regex.pattern", e.to_string()))?,
            replacement: rewrite.replacement.clone(),
        }
    } else {
        PathRewrite::None
    };
    let host_rewrite = match &route.host_rewrite {
        Some(host) => {
            Some(HeaderValue::from_str(host).map_err(|e| invalid("host_rewrite", e.to_string()))?)
        }
        None => None,
    };
    let name: Arc<str> = route
        .name
        .clone()
        .unwrap_or_else(|| format!("route{index}"))
        .into();
    let policy = crate::policy::compile_route(index, &name, route, &registries.policy, metrics)?
        .map(Box::new);
    let metrics = metrics.route(&name, route.pool.as_deref().unwrap_or(""));
    let path = format!("routes[{index}]");
    let split = crate::traffic::Split::compile(&name, route, &path, pools, &registries.traffic)?;
    let mirror = match &route.mirror {
        Some(mirror) => {
            let pool = pools
                .get(&mirror.pool)
                .ok_or_else(|| CompileError::UnknownPool {
                    path: format!("{path}.mirror.pool"),
                    pool: mirror.pool.clone(),
                })?;
            let state = registries
                .traffic
                .mirror(&name, &mirror.pool, mirror.max_in_flight);
            Some(crate::traffic::mirror::Mirror::compile(
                mirror,
                pool.clone(),
                state,
            ))
        }
        None => None,
    };
    let filters = crate::policy::Filters::compile(route, &path)?;
    let breaker = match (&route.circuit_breaker, &action) {
        (Some(config), Action::Forward(pool)) => Some(
            registries
                .upstreams
                .route_breaker(&name, &pool.name, config),
        ),
        _ => None,
    };
    Ok(Route {
        policy,
        split,
        mirror,
        filters,
        breaker,
        name,
        metrics,
        action,
        rewrite,
        host_rewrite,
        preserve_host: route.preserve_host,
        timeouts: RouteTimeouts {
            response_header: route.timeouts.response_header.0,
            idle: route.timeouts.idle.non_zero(),
            total: route.timeouts.request.non_zero(),
        },
        max_request_body: route.max_request_body.map(|size| size.non_zero()),
        require_client_cert: route.require_client_cert,
        retry: route.retry.clone(),
        hedge: route.hedge.clone(),
    })
}

fn install_certificates(registries: &Registries, snapshot: &Snapshot) {
    registries.certs.install(
        snapshot.certificates.clone(),
        &snapshot.config.tls.certificates,
    );
    let acme_names = snapshot
        .config
        .acme
        .iter()
        .flat_map(|acme| &acme.certificates)
        .flat_map(|cert| &cert.names)
        .map(|name| name.to_ascii_lowercase());
    registries.certs.set_managed_names(acme_names);
}

/// Holds the current snapshot and the registries that outlive snapshots.
pub struct Publisher {
    current: ArcSwap<Snapshot>,
    pub registries: Registries,
    next_version: AtomicU64,
    /// Serializes compile-and-swap so two reloads never interleave.
    apply_lock: parking_lot::Mutex<()>,
}

impl Publisher {
    pub fn new(config: Config) -> Result<Publisher, CompileError> {
        let registries = Registries::default();
        let snapshot = compile(config, 1, &registries)?;
        install_certificates(&registries, &snapshot);
        registries.upstreams.start_checks(snapshot.pools.values());
        Ok(Publisher {
            current: ArcSwap::from_pointee(snapshot),
            registries,
            next_version: AtomicU64::new(2),
            apply_lock: parking_lot::Mutex::new(()),
        })
    }

    /// The snapshot in force now. Callers keep the `Arc` for the whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Compiles `config` and swaps it in; on error nothing changes.
    pub fn apply(&self, config: Config) -> Result<Arc<Snapshot>, CompileError> {
        let _serialized = self.apply_lock.lock();
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        let pools = config.pools.clone();
        let upstreams = &self.registries.upstreams;
        let snapshot = match compile(config, version, &self.registries) {
            Ok(snapshot) => Arc::new(snapshot),
            Err(err) => {
                // Forget registry entries the rejected config created.
                let current = self.current.load();
                upstreams.retain(&current.config.pools);
                upstreams.retain_route_breakers(&current.config.routes);
                self.registries.traffic.retain(&current.config);
                return Err(err);
            }
        };
        // Certificates first: a listener that starts terminating a new name must find it.
        install_certificates(&self.registries, &snapshot);
        self.current.store(snapshot.clone());
        upstreams.retain(&pools);
        self.registries.traffic.retain(&snapshot.config);
        upstreams.retain_route_breakers(&snapshot.config.routes);
        upstreams.start_checks(snapshot.pools.values());
        Ok(snapshot)
    }
}
