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

use crate::config::{Config, ListenerConfig, RouteConfig, XffMode};
use crate::route::{RouteError, Router};
use crate::upstream::{Pool, UpstreamRegistry};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Route(#[from] RouteError),
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
}

/// Global HTTP header behaviour, compiled.
pub struct HttpSettings {
    pub xff_mode: XffMode,
    pub trusted_proxies: Vec<IpNet>,
    pub request_id_header: HeaderName,
    pub add_forwarded: bool,
    pub add_via: bool,
    pub hide_upstream_server: bool,
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
    pub listeners: HashMap<String, Arc<ListenerConfig>>,
}

impl Snapshot {
    pub fn listener(&self, name: &str) -> Option<&Arc<ListenerConfig>> {
        self.listeners.get(name)
    }
}

/// Compiles a validated config. Pools take their connection state from `registry`.
pub fn compile(
    config: Config,
    version: u64,
    registry: &UpstreamRegistry,
) -> Result<Snapshot, CompileError> {
    let router = Router::for_routes(&config.routes)?;
    let pools: HashMap<String, Arc<Pool>> = config
        .pools
        .iter()
        .map(|pool| (pool.name.clone(), Arc::new(registry.pool(pool))))
        .collect();
    let routes = config
        .routes
        .iter()
        .enumerate()
        .map(|(index, route)| compile_route(index, route, &pools).map(Arc::new))
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
    };
    let listeners = config
        .listeners
        .iter()
        .map(|listener| (listener.name.clone(), Arc::new(listener.clone())))
        .collect();
    Ok(Snapshot {
        version,
        router,
        routes,
        pools,
        http,
        listeners,
        config: Arc::new(config),
    })
}

fn compile_route(
    index: usize,
    route: &RouteConfig,
    pools: &HashMap<String, Arc<Pool>>,
) -> Result<Route, CompileError> {
    let invalid = |field: &'static str, message: String| CompileError::Invalid {
        index,
        field,
        message,
    };
    let action = if let Some(pool_name) = &route.pool {
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
    Ok(Route {
        name: route
            .name
            .clone()
            .unwrap_or_else(|| format!("route{index}"))
            .into(),
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
    })
}

/// Holds the current snapshot and the registries that outlive snapshots.
pub struct Publisher {
    current: ArcSwap<Snapshot>,
    pub upstreams: UpstreamRegistry,
    next_version: AtomicU64,
    /// Serializes compile-and-swap so two reloads never interleave.
    apply_lock: parking_lot::Mutex<()>,
}

impl Publisher {
    pub fn new(config: Config) -> Result<Publisher, CompileError> {
        let upstreams = UpstreamRegistry::default();
        let snapshot = compile(config, 1, &upstreams)?;
        Ok(Publisher {
            current: ArcSwap::from_pointee(snapshot),
            upstreams,
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
        let snapshot = match compile(config, version, &self.upstreams) {
            Ok(snapshot) => Arc::new(snapshot),
            Err(err) => {
                // Forget registry entries the rejected config created.
                self.upstreams.retain(&self.current.load().config.pools);
                return Err(err);
            }
        };
        self.current.store(snapshot.clone());
        self.upstreams.retain(&pools);
        Ok(snapshot)
    }
}
