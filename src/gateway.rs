//! The running gateway: ties the snapshot publisher, the HTTP engine and the listeners
//! together, and exposes the operations the CLI, signals and tests drive — start, reload,
//! apply a config, and drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config, ConfigErrors};
use crate::http::Proxy;
use crate::listener::{ListenerError, ListenerStats, Listeners};
use crate::snapshot::{CompileError, Publisher};
use crate::telemetry::AccessLog;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
    #[error(transparent)]
    Tracing(crate::telemetry::otlp::OtlpError),
    #[error("cannot start the demo upstream on {bind}: {source}")]
    Demo {
        bind: String,
        source: std::io::Error,
    },
    #[error("no config file to reload (started without --config)")]
    NoConfigFile,
}

pub struct Gateway {
    publisher: Arc<Publisher>,
    proxy: Arc<Proxy>,
    listeners: Mutex<Listeners>,
    config_path: Option<PathBuf>,
    demo_addr: Option<SocketAddr>,
    /// Set when a drain starts; `/ready` reports false from then on (SPEC OPS-4).
    draining: AtomicBool,
}

impl Gateway {
    /// Compiles `config`, starts the demo upstream if configured, binds every listener and
    /// starts accepting. Must run inside a Tokio runtime.
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
    ) -> Result<Gateway, GatewayError> {
        let demo_addr =
            match &config.demo {
                Some(demo) => Some(crate::demo::start(&demo.bind).await.map_err(|source| {
                    GatewayError::Demo {
                        bind: demo.bind.clone(),
                        source,
                    }
                })?),
                None => None,
            };
        let access_log = AccessLog::start(&config.access_log).map_err(GatewayError::AccessLog)?;
        let listener_configs = config.listeners.clone();
        let config_tracing = config.tracing.clone();
        let publisher = Arc::new(Publisher::new(config)?);
        let spans = match &config_tracing.otlp_endpoint {
            Some(url) if config_tracing.enabled => Some(Arc::new(
                crate::telemetry::otlp::Exporter::start(
                    url,
                    config_tracing.export_interval.0,
                    config_tracing.otlp_protocol,
                    config_tracing.otlp_ca.as_deref(),
                )
                .map_err(GatewayError::Tracing)?,
            )),
            _ => None,
        };
        let proxy = Arc::new(Proxy {
            publisher: publisher.clone(),
            access_log,
            spans,
            tunnels: TaskTracker::new(),
            stats: Arc::default(),
        });
        let mut listeners = Listeners::new(proxy.clone());
        let pending = listeners.prepare(&listener_configs)?;
        listeners.activate(pending, &listener_configs);
        spawn_file_watch(Arc::downgrade(&publisher));
        crate::acme::spawn(Arc::downgrade(&publisher));
        Ok(Gateway {
            publisher,
            proxy,
            listeners: Mutex::new(listeners),
            config_path,
            demo_addr,
            draining: AtomicBool::new(false),
        })
    }

    /// Re-reads the config file and applies it (SIGHUP). On any error the running
    /// configuration stays as it was.
    pub fn reload(&self) -> Result<u64, GatewayError> {
        let path = self
            .config_path
            .as_ref()
            .ok_or(GatewayError::NoConfigFile)?;
        let config = config::load_file(path)?;
        self.apply(config)
    }

    /// Applies a validated config: binds new listeners, swaps the snapshot, then stops
    /// listeners that left. Returns the new snapshot version.
    pub fn apply(&self, config: Config) -> Result<u64, GatewayError> {
        let current = self.publisher.load();
        if current.config.access_log != config.access_log
            || current.config.demo != config.demo
            || current.config.metrics.bind != config.metrics.bind
            || current.config.metrics.require_token != config.metrics.require_token
            || current.config.tracing.otlp_endpoint != config.tracing.otlp_endpoint
            || current.config.tracing.export_interval != config.tracing.export_interval
            || current.config.tracing.otlp_protocol != config.tracing.otlp_protocol
            || current.config.tracing.otlp_ca != config.tracing.otlp_ca
        {
            tracing::warn!(
                "access_log, demo, metrics.bind, metrics.require_token, tracing.otlp_endpoint, tracing.otlp_protocol and tracing.export_interval changes take effect at the next restart"
            );
        }
        let listener_configs = config.listeners.clone();
        let mut listeners = self.listeners.lock();
        let pending = listeners.prepare(&listener_configs)?;
        let snapshot = self.publisher.apply(config)?;
        listeners.activate(pending, &listener_configs);
        tracing::info!(version = snapshot.version, "configuration applied");
        Ok(snapshot.version)
    }

    /// The metrics registry (SPEC OPS-1).
    pub fn metrics(&self) -> &Arc<crate::telemetry::Metrics> {
        &self.publisher.registries.metrics
    }

    /// The Prometheus exposition; `config_version` is the stored version running.
    pub fn render_metrics(&self, config_version: u64) -> String {
        let snapshot = self.publisher.load();
        let scrape = crate::telemetry::Scrape {
            config_version,
            snapshot_version: self.version(),
            draining: self.is_draining(),
            listeners: self.listeners.lock().all_stats(),
            firewall: Some(self.firewall_stats()),
            access_log_dropped: self.proxy.access_log.dropped(),
            traffic: self.publisher.registries.traffic.metric_rows(),
            pools: snapshot.pools.values().cloned().collect(),
            route_breakers: snapshot
                .routes
                .iter()
                .filter_map(|route| {
                    let breaker = route.breaker.as_ref()?;
                    let crate::snapshot::Action::Forward(pool) = &route.action else {
                        return None;
                    };
                    Some((
                        route.name.clone(),
                        pool.name.clone(),
                        breaker.state.lock().code(),
                    ))
                })
                .collect(),
        };
        self.metrics().render(&scrape)
    }

    pub fn version(&self) -> u64 {
        self.publisher.load().version
    }

    /// Live upstream state (health, ejections, breakers, counters) per pool, by name.
    pub fn upstream_status(&self) -> Vec<serde_json::Value> {
        let snapshot = self.publisher.load();
        let mut pools: Vec<_> = snapshot.pools.values().map(|pool| pool.status()).collect();
        pools.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        pools
    }

    /// Weighted splits (weights, brake state, counters) by route, and the recent brake
    /// events (SPEC TRAFFIC-3).
    pub fn traffic_status(&self) -> serde_json::Value {
        let snapshot = self.publisher.load();
        let splits: Vec<_> = snapshot
            .routes
            .iter()
            .filter_map(|route| route.split.as_ref().map(|split| split.status()))
            .collect();
        serde_json::json!({
            "splits": splits,
            "brake_events": self.publisher.registries.traffic.events(),
        })
    }

    /// Releases the engaged canary brakes of `route`; none when it has no split.
    pub fn reset_brakes(&self, route: &str) -> Option<usize> {
        let snapshot = self.publisher.load();
        snapshot
            .routes
            .iter()
            .any(|r| &*r.name == route && r.split.is_some())
            .then(|| self.publisher.registries.traffic.reset(route))
    }

    /// Addresses the listeners are bound to, by listener name.
    pub fn local_addrs(&self) -> HashMap<String, SocketAddr> {
        self.listeners.lock().local_addrs()
    }

    pub fn listener_stats(&self, name: &str) -> Option<Arc<ListenerStats>> {
        self.listeners.lock().stats(name)
    }

    /// Changes a listener's `max_connections` now (SPEC CONN-3); false for an unknown
    /// listener. The next config applied sets the limit it names.
    pub fn set_max_connections(&self, listener: &str, limit: usize) -> bool {
        self.listeners.lock().set_max_connections(listener, limit)
    }

    /// Re-reads the certificate and GeoIP files the running config names, as SIGHUP does
    /// even when the config itself is unchanged. On error the current ones stay.
    pub fn reload_files(&self) -> Result<(), GatewayError> {
        let registries = &self.publisher.registries;
        registries.certs.reload(true).map_err(|source| {
            GatewayError::Compile(CompileError::Tls {
                path: "tls.certificates".into(),
                source: Box::new(source),
            })
        })?;
        registries.firewall.geoip().reload_all();
        Ok(())
    }

    /// Every ACME certificate: names, issuer, expiry, next renewal, last error.
    pub fn acme_status(&self) -> Vec<crate::acme::AcmeStatus> {
        self.publisher.registries.acme.status()
    }

    /// The certificates new handshakes are served from.
    pub fn certificates(&self) -> Arc<crate::tls::CertTable> {
        self.publisher.registries.certs.current()
    }

    /// Firewall block counters since start.
    pub fn firewall_stats(&self) -> Arc<crate::firewall::FirewallStats> {
        self.publisher.registries.firewall.stats.clone()
    }

    /// Responses since start by outcome and latency (for guarded applies).
    pub fn request_stats(&self) -> crate::telemetry::StatsSnapshot {
        self.proxy.stats.snapshot()
    }

    pub fn demo_addr(&self) -> Option<SocketAddr> {
        self.demo_addr
    }

    pub fn reopen_access_log(&self) {
        self.proxy.access_log.reopen();
    }

    /// Whether a drain has started (the process is shutting down).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn drain_timeout(&self) -> Duration {
        self.publisher.load().config.drain_timeout.0 .0
    }

    /// Graceful shutdown: stop accepting (new connections are refused), let in-flight
    /// requests and upgraded streams finish up to `timeout`, then return. Returns whether
    /// everything finished inside the window.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.draining.store(true, Ordering::Relaxed);
        let stopping = self.listeners.lock().stop_all();
        let deadline = tokio::time::Instant::now() + timeout;
        // Accept loops exit at their next poll; until then a connection can still be
        // accepted and join the tracker, so waiting on connections first could return while
        // one is being added (and an operator reading the log could still get connected).
        let sockets_closed = tokio::time::timeout_at(deadline, stopping.sockets_closed.wait())
            .await
            .is_ok();
        if sockets_closed {
            tracing::info!("listeners closed; new connections are refused");
        }
        let connections_done = tokio::time::timeout_at(deadline, stopping.connections.wait())
            .await
            .is_ok();
        self.proxy.tunnels.close();
        let tunnels_done = tokio::time::timeout_at(deadline, self.proxy.tunnels.wait())
            .await
            .is_ok();
        // Last stage (SPEC OPS-6): nothing is in flight any more, so the pooled keep-alive
        // connections to the backends are closed instead of left to the process exit.
        let closed = self.publisher.registries.upstreams.close_idle();
        tracing::info!(closed, "idle upstream connections closed");
        sockets_closed && connections_done && tunnels_done
    }
}

/// Polls certificate, key and GeoIP files every `watch_interval` (re-read each round, so a
/// reload can change it) and loads what changed; a file that fails to load leaves the
/// previous contents serving. Ends with the gateway.
fn spawn_file_watch(publisher: std::sync::Weak<Publisher>) {
    tokio::spawn(async move {
        loop {
            let every = match publisher.upgrade() {
                Some(publisher) => publisher.load().config.watch_interval.0 .0,
                None => return,
            };
            // Off: look again soon in case a reload turns it on.
            tokio::time::sleep(if every.is_zero() {
                Duration::from_secs(1)
            } else {
                every
            })
            .await;
            if every.is_zero() {
                continue;
            }
            let Some(publisher) = publisher.upgrade() else {
                return;
            };
            // File reads and parsing: keep them off the runtime's worker threads.
            let _ = tokio::task::spawn_blocking(move || {
                let registries = &publisher.registries;
                match registries.certs.reload(false) {
                    Ok(true) => tracing::info!("certificate files changed; reloaded"),
                    Ok(false) => {}
                    Err(err) => tracing::warn!(
                        error = %err,
                        "certificate files changed but cannot be loaded; keeping the current ones"
                    ),
                }
                registries.firewall.geoip().reload_all();
            })
            .await;
        }
    });
}
