//! Upstream pools: endpoints, load balancing and connections.
//!
//! A `Pool` is compiled into each snapshot; the per-endpoint `Connections` it points to
//! live in the `UpstreamRegistry`, keyed by (pool name, address, protocol), so keep-alive
//! connections survive config swaps and are released when an endpoint leaves the config.

mod conn;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

pub use conn::{ClientAddrs, ConnSettings, Connections, Transport};

use crate::config::{PoolConfig, UpstreamProtocol};
use crate::tls::{TlsError, UpstreamTlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {address} failed: {source}")]
    Connect {
        address: Arc<str>,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {address} timed out")]
    ConnectTimeout { address: Arc<str> },
    #[error("handshake with {address} failed: {source}")]
    Handshake {
        address: Arc<str>,
        #[source]
        source: hyper::Error,
    },
    #[error("TLS to {address} failed: {message}")]
    Tls { address: Arc<str>, message: String },
    #[error("upstream request failed: {0}")]
    Request(#[source] hyper::Error),
    #[error("no response header within {0:?}")]
    ResponseTimeout(std::time::Duration),
    #[error("pool {0} has no endpoint")]
    NoEndpoint(Arc<str>),
}

pub struct Endpoint {
    pub address: Arc<str>,
    pub weight: u32,
    pub connections: Arc<Connections>,
    /// Attempts, errors and latencies, labelled by pool and endpoint.
    pub metrics: Arc<crate::telemetry::EndpointMetrics>,
}

/// Smooth weighted round robin, as nginx does it: every pick adds each weight to its
/// endpoint's current value, takes the largest, and subtracts the total from it. Picks are
/// spread evenly instead of in bursts.
struct SmoothWeightedRoundRobin {
    current: Mutex<Vec<i64>>,
    total: i64,
}

impl SmoothWeightedRoundRobin {
    fn new(count: usize, total: i64) -> Self {
        SmoothWeightedRoundRobin {
            current: Mutex::new(vec![0; count]),
            total,
        }
    }

    fn pick(&self, endpoints: &[Endpoint]) -> usize {
        let mut current = self.current.lock();
        let mut best = 0;
        for (index, endpoint) in endpoints.iter().enumerate() {
            current[index] += i64::from(endpoint.weight);
            if current[index] > current[best] {
                best = index;
            }
        }
        current[best] -= self.total;
        best
    }
}

pub struct Pool {
    pub name: Arc<str>,
    pub protocol: UpstreamProtocol,
    pub settings: ConnSettings,
    endpoints: Vec<Endpoint>,
    balancer: SmoothWeightedRoundRobin,
}

impl Pool {
    pub fn pick(&self) -> Result<&Endpoint, UpstreamError> {
        match self.endpoints.len() {
            0 => Err(UpstreamError::NoEndpoint(self.name.clone())),
            1 => Ok(&self.endpoints[0]),
            _ => Ok(&self.endpoints[self.balancer.pick(&self.endpoints)]),
        }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }
}

/// Pool name, endpoint address, protocol, and the transport settings (TLS, PROXY) as
/// written: a change to any of them starts fresh connections.
type EndpointKey = (Arc<str>, Arc<str>, UpstreamProtocol, String);

fn transport_key(config: &PoolConfig) -> String {
    if config.tls.is_none() && config.send_proxy_protocol.is_none() {
        return String::new();
    }
    serde_json::to_string(&(&config.tls, &config.send_proxy_protocol)).unwrap_or_default()
}

/// Long-lived per-endpoint connection state, shared by every snapshot that names it.
#[derive(Default)]
pub struct UpstreamRegistry {
    endpoints: Mutex<HashMap<EndpointKey, Arc<Connections>>>,
}

impl UpstreamRegistry {
    /// Builds a snapshot's pool, reusing the connections of endpoints already known.
    pub fn pool(
        &self,
        config: &PoolConfig,
        metrics: &crate::telemetry::Metrics,
    ) -> Result<Pool, TlsError> {
        let name: Arc<str> = config.name.as_str().into();
        let tls = match &config.tls {
            Some(settings) => {
                if settings.insecure_skip_verify {
                    tracing::warn!(
                        pool = %config.name,
                        "tls.insecure_skip_verify: endpoint certificates are not verified"
                    );
                }
                let alpn: &[&[u8]] = match config.protocol {
                    UpstreamProtocol::H2 | UpstreamProtocol::H2c => &[b"h2"],
                    UpstreamProtocol::Http1 => &[b"http/1.1"],
                };
                Some(Arc::new(UpstreamTlsConnector::new(settings, alpn)?))
            }
            None => None,
        };
        let transport_key = transport_key(config);
        let mut registry = self.endpoints.lock();
        let endpoints: Vec<Endpoint> = config
            .endpoints
            .iter()
            .map(|endpoint| {
                let address: Arc<str> = endpoint.address().into();
                let key = (
                    name.clone(),
                    address.clone(),
                    config.protocol,
                    transport_key.clone(),
                );
                let connections = registry
                    .entry(key)
                    .or_insert_with(|| {
                        let transport = Transport {
                            tls: tls.clone(),
                            proxy_protocol: config.send_proxy_protocol,
                        };
                        let endpoint_metrics = metrics.endpoint(&name, &address);
                        let connections = Arc::new(
                            Connections::new(address.clone(), config.protocol, transport)
                                .with_metrics(endpoint_metrics.clone()),
                        );
                        endpoint_metrics.set_connections(&connections);
                        connections
                    })
                    .clone();
                let endpoint_metrics = metrics.endpoint(&name, &address);
                Endpoint {
                    address,
                    weight: endpoint.weight(),
                    connections,
                    metrics: endpoint_metrics,
                }
            })
            .collect();
        let total = endpoints.iter().map(|e| i64::from(e.weight)).sum();
        Ok(Pool {
            name,
            protocol: config.protocol,
            settings: ConnSettings {
                connect_timeout: config.connect_timeout.0,
                max_idle: config.max_idle_per_endpoint,
                idle_timeout: config.idle_timeout.0,
            },
            balancer: SmoothWeightedRoundRobin::new(endpoints.len(), total),
            endpoints,
        })
    }

    /// Drops the connection state of endpoints no pool in `pools` names any more. Requests
    /// still running on an older snapshot keep their own references until they finish.
    pub fn retain(&self, pools: &[PoolConfig]) {
        let keys: Vec<String> = pools.iter().map(transport_key).collect();
        let live: HashSet<(&str, &str, UpstreamProtocol, &str)> = pools
            .iter()
            .zip(&keys)
            .flat_map(|(pool, key)| {
                pool.endpoints
                    .iter()
                    .map(move |e| (pool.name.as_str(), e.address(), pool.protocol, key.as_str()))
            })
            .collect();
        self.endpoints
            .lock()
            .retain(|(pool, address, protocol, key), _| {
                live.contains(&(&**pool, &**address, *protocol, key.as_str()))
            });
    }

    pub fn len(&self) -> usize {
        self.endpoints.lock().len()
    }

    /// Closes every idle upstream connection (the last stage of a drain). Returns how many.
    pub fn close_idle(&self) -> usize {
        let endpoints: Vec<Arc<Connections>> = self.endpoints.lock().values().cloned().collect();
        endpoints.iter().map(|c| c.close_idle()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32]) -> Pool {
        let endpoints = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let address: Arc<str> = format!("127.0.0.1:{}", 9000 + i).into();
                Endpoint {
                    connections: Arc::new(Connections::new(
                        address.clone(),
                        UpstreamProtocol::Http1,
                        Transport::default(),
                    )),
                    metrics: crate::telemetry::Metrics::default().endpoint("p", &address),
                    address,
                    weight: *w,
                }
            })
            .collect::<Vec<_>>();
        let total = weights.iter().map(|w| i64::from(*w)).sum();
        Pool {
            name: "p".into(),
            protocol: UpstreamProtocol::Http1,
            settings: ConnSettings {
                connect_timeout: std::time::Duration::from_secs(1),
                max_idle: 1,
                idle_timeout: std::time::Duration::from_secs(1),
            },
            balancer: SmoothWeightedRoundRobin::new(endpoints.len(), total),
            endpoints,
        }
    }

    #[test]
    fn smooth_wrr_is_exact_per_cycle_and_interleaved() {
        let pool = pool(&[5, 1, 1]);
        let picks: Vec<&str> = (0..7).map(|_| &*pool.pick().unwrap().address).collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a
        let a = "127.0.0.1:9000";
        let b = "127.0.0.1:9001";
        let c = "127.0.0.1:9002";
        assert_eq!(picks, vec![a, a, b, a, c, a, a]);
    }

    #[test]
    fn registry_reuses_and_releases_endpoints() {
        let registry = UpstreamRegistry::default();
        let config: PoolConfig =
            toml::from_str("name = \"p\"\nendpoints = [\"127.0.0.1:1\", \"127.0.0.1:2\"]").unwrap();
        let metrics = crate::telemetry::Metrics::default();
        let first = registry.pool(&config, &metrics).unwrap();
        let second = registry.pool(&config, &metrics).unwrap();
        assert!(Arc::ptr_eq(
            &first.endpoints[0].connections,
            &second.endpoints[0].connections
        ));
        assert_eq!(registry.len(), 2);
        let smaller: PoolConfig =
            toml::from_str("name = \"p\"\nendpoints = [\"127.0.0.1:2\"]").unwrap();
        registry.retain(std::slice::from_ref(&smaller));
        assert_eq!(registry.len(), 1);
    }
}
