//! Listening sockets and accept loops: binding (with `SO_REUSEPORT` when asked), the
//! per-listener connection limit, and handing each accepted connection to the connection
//! pipeline (`pipeline`: PROXY header, firewall, TLS sniffing, relay or HTTP). Listener
//! state (live connection counts, the limit, counters) is keyed by listener name and
//! survives reloads.

mod pipeline;
pub mod prefixed;
pub mod proxy_protocol;

pub use pipeline::Refusal;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::http::Proxy;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("listeners[{name}]: cannot bind {address}: {source}")]
    Bind {
        name: String,
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Live counters for one listener.
#[derive(Default)]
pub struct ListenerStats {
    pub active: AtomicUsize,
    /// `max_connections` in force; 0 means unlimited. Set from each applied config and
    /// changeable at runtime (`Listeners::set_max_connections`).
    pub limit: AtomicUsize,
    pub accepted: AtomicU64,
    pub rejected_limit: AtomicU64,
    pub rejected_proxy_untrusted: AtomicU64,
    pub rejected_proxy_header: AtomicU64,
    pub rejected_firewall: AtomicU64,
    pub rejected_client_hello: AtomicU64,
    pub rejected_plaintext: AtomicU64,
    pub rejected_unknown_sni: AtomicU64,
    /// TLS handshakes completed on terminated TLS.
    pub tls_handshakes: AtomicU64,
    pub failed_handshakes: AtomicU64,
    pub failed_upstream: AtomicU64,
    pub relays: AtomicU64,
    pub relayed_from_clients: AtomicU64,
    pub relayed_to_clients: AtomicU64,
}

impl ListenerStats {
    fn refused(&self, reason: Refusal) {
        let counter = match reason {
            Refusal::ProxyUntrusted => &self.rejected_proxy_untrusted,
            Refusal::ProxyHeader => &self.rejected_proxy_header,
            Refusal::Firewall => &self.rejected_firewall,
            Refusal::ClientHello => &self.rejected_client_hello,
            Refusal::Plaintext => &self.rejected_plaintext,
            Refusal::UnknownSni => &self.rejected_unknown_sni,
            Refusal::Handshake => &self.failed_handshakes,
            Refusal::Upstream => &self.failed_upstream,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Decrements the active count when a connection ends, however it ends.
struct ActiveGuard(Arc<ListenerStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Running {
    bind: String,
    reuse_port: bool,
    local_addr: SocketAddr,
    stop: CancellationToken,
}

/// The set of listeners currently accepting.
pub struct Listeners {
    proxy: Arc<Proxy>,
    /// Fired once at shutdown: every connection finishes in-flight work and closes.
    drain: CancellationToken,
    /// The accept loops; each owns its listening socket and closes it when it exits.
    accepting: TaskTracker,
    connections: TaskTracker,
    running: HashMap<String, Running>,
    stats: HashMap<String, Arc<ListenerStats>>,
}

/// What `Listeners::stop_all` started, to wait for.
pub struct Stopping {
    /// Completes once every accept loop has exited and closed its socket. Cancelling an
    /// accept loop only asks it to stop; until it has, a connection may still be accepted
    /// (and must be tracked below) or sit in the kernel's backlog.
    pub sockets_closed: TaskTracker,
    /// Completes when the last connection has ended. Wait for `sockets_closed` first: an
    /// accept loop that is still running can add a connection to it.
    pub connections: TaskTracker,
}

/// Sockets bound for a new config but not yet accepting; dropping it releases them.
pub struct Pending {
    bound: Vec<(Arc<ListenerConfig>, TcpListener)>,
}

impl Listeners {
    pub fn new(proxy: Arc<Proxy>) -> Listeners {
        Listeners {
            proxy,
            drain: CancellationToken::new(),
            accepting: TaskTracker::new(),
            connections: TaskTracker::new(),
            running: HashMap::new(),
            stats: HashMap::new(),
        }
    }

    /// Binds every listener in `configs` that is not already running with the same
    /// address. Nothing starts accepting until `activate`; on error nothing changes.
    pub fn prepare(&self, configs: &[ListenerConfig]) -> Result<Pending, ListenerError> {
        let mut bound = Vec::new();
        for config in configs {
            let unchanged = self.running.get(&config.name).is_some_and(|running| {
                running.bind == config.bind && running.reuse_port == config.reuse_port
            });
            if unchanged {
                continue;
            }
            let listener = bind(config).map_err(|source| ListenerError::Bind {
                name: config.name.clone(),
                address: config.bind.clone(),
                source,
            })?;
            bound.push((Arc::new(config.clone()), listener));
        }
        Ok(Pending { bound })
    }

    /// Starts the newly bound listeners and stops those no longer in `configs`
    /// (or replaced by a new address). Connections already accepted keep running.
    pub fn activate(&mut self, pending: Pending, configs: &[ListenerConfig]) {
        let replaced: Vec<String> = pending
            .bound
            .iter()
            .map(|(config, _)| config.name.clone())
            .collect();
        let removed: Vec<String> = self
            .running
            .keys()
            .filter(|name| replaced.contains(name) || !configs.iter().any(|c| &c.name == *name))
            .cloned()
            .collect();
        for name in removed {
            crate::ops::upgrade::unregister(&upgrade_name(&name));
            if let Some(running) = self.running.remove(&name) {
                running.stop.cancel();
                tracing::info!(name = %name, addr = %running.local_addr, "listener stopped");
            }
        }
        self.stats
            .retain(|name, _| configs.iter().any(|c| &c.name == name));
        for config in configs {
            self.stats
                .entry(config.name.clone())
                .or_default()
                .limit
                .store(config.max_connections as usize, Ordering::Relaxed);
        }
        for (config, listener) in pending.bound {
            let Ok(local_addr) = listener.local_addr() else {
                continue;
            };
            let stop = CancellationToken::new();
            crate::ops::upgrade::register(
                &upgrade_name(&config.name),
                std::os::fd::AsRawFd::as_raw_fd(&listener),
            );
            let stats = self.stats.entry(config.name.clone()).or_default().clone();
            tracing::info!(name = %config.name, addr = %local_addr, "listener bound");
            let conns = Connections {
                drain: self.drain.clone(),
                tracker: self.connections.clone(),
            };
            self.accepting.spawn(accept_loop(
                self.proxy.clone(),
                config.name.clone(),
                listener,
                stats,
                stop.clone(),
                conns,
            ));
            self.running.insert(
                config.name.clone(),
                Running {
                    bind: config.bind.clone(),
                    reuse_port: config.reuse_port,
                    local_addr,
                    stop,
                },
            );
        }
    }

    /// Stops accepting everywhere (the sockets close, so new connections are refused) and
    /// asks every open connection to finish its in-flight work and close.
    pub fn stop_all(&mut self) -> Stopping {
        for (name, running) in self.running.drain() {
            crate::ops::upgrade::unregister(&upgrade_name(&name));
            running.stop.cancel();
        }
        self.drain.cancel();
        self.accepting.close();
        self.connections.close();
        Stopping {
            sockets_closed: self.accepting.clone(),
            connections: self.connections.clone(),
        }
    }

    pub fn local_addrs(&self) -> HashMap<String, SocketAddr> {
        self.running
            .iter()
            .map(|(name, running)| (name.clone(), running.local_addr))
            .collect()
    }

    pub fn stats(&self, name: &str) -> Option<Arc<ListenerStats>> {
        self.stats.get(name).cloned()
    }

    /// Every listener's counters, sorted by name (for metrics).
    pub fn all_stats(&self) -> Vec<(String, Arc<ListenerStats>)> {
        let mut all: Vec<_> = self
            .stats
            .iter()
            .map(|(name, stats)| (name.clone(), stats.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Changes a listener's connection limit now (0: unlimited). Connections already open
    /// stay; the next config applied sets the limit it names. Returns false for an unknown
    /// listener.
    pub fn set_max_connections(&self, name: &str, limit: usize) -> bool {
        match self.stats.get(name) {
            Some(stats) => {
                stats.limit.store(limit, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// The name a listener's socket is handed over under in an upgrade.
fn upgrade_name(name: &str) -> String {
    format!("listener:{name}")
}

fn bind(config: &ListenerConfig) -> std::io::Result<TcpListener> {
    // A socket the previous process handed over (binary upgrade) is used as it is.
    if let Some(fd) = crate::ops::upgrade::take(&upgrade_name(&config.name)) {
        let listener = crate::ops::upgrade::tcp_listener(fd)?;
        let wanted: Option<SocketAddr> = config.bind.parse().ok();
        let local = listener.local_addr()?;
        if wanted.is_some_and(|w| w.port() == 0 || w == local) {
            return TcpListener::from_std(listener);
        }
        // The config moved the listener: bind the new address instead.
    }
    let addr: SocketAddr = config
        .bind
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "invalid address"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if config.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `[::]` means IPv6 only unless an operator binds 0.0.0.0 separately; explicit is
        // better than the kernel's default varying by sysctl.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Where an accept loop registers the connections it starts.
struct Connections {
    drain: CancellationToken,
    tracker: TaskTracker,
}

async fn accept_loop(
    proxy: Arc<Proxy>,
    name: String,
    listener: TcpListener,
    stats: Arc<ListenerStats>,
    stop: CancellationToken,
    conns: Connections,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = %name, error = %err, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let limit = stats.limit.load(Ordering::Relaxed);
        let active = stats.active.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard(stats.clone());
        if limit != 0 && active >= limit {
            stats.rejected_limit.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            drop(guard);
            continue;
        }
        let snapshot = proxy.publisher.load();
        let Some(listener) = snapshot.listener(&name).cloned() else {
            continue;
        };
        let accepted = pipeline::Accepted {
            proxy: proxy.clone(),
            listener,
            stats: stats.clone(),
            drain: conns.drain.clone(),
        };
        crate::workers::spawn_connection(&conns.tracker, stream, move |stream| async move {
            pipeline::run(accepted, snapshot, stream, peer).await;
            drop(guard);
        });
    }
}
