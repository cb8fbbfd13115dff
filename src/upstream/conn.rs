//! Upstream connections for one endpoint: an idle list of HTTP/1.1 keep-alive
//! connections, or one shared multiplexed HTTP/2 (h2c) connection.
//!
//! Hand-written on hyper's low-level `client::conn` rather than hyper-util's pooled client
//! because the proxy needs control that client does not give: the upstream `:authority`
//! and `Host` independent of the dial address, per-endpoint state owned by a registry that
//! survives config swaps, and (with later features) connections keyed by client for PROXY
//! protocol and per-endpoint connection limits.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::UpstreamError;
use crate::config::UpstreamProtocol;
use crate::http::body::RequestBody;

/// Settings that govern how connections to an endpoint are made and kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnSettings {
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

/// An HTTP/1.1 connection that is not carrying a request for us: idle, or still finishing
/// the response it last carried (its body streaming to a client). hyper flips it to ready
/// by itself when the exchange completes cleanly; one that errors, is upgraded, or whose
/// response body is abandoned closes instead and is never handed out again.
struct Parked {
    sender: http1::SendRequest<RequestBody>,
    /// When the connection last delivered a response head. Idle time is counted from here,
    /// which errs towards closing a connection slightly early, never late.
    since: Instant,
}

/// The HTTP/1.1 connections of one endpoint. A plain list checked under a short lock
/// instead of a task per response that waits for readiness: the check is a few atomic
/// loads per connection, a spawned task per request costs far more.
#[derive(Default)]
struct Http1Pool {
    parked: Vec<Parked>,
}

enum Conns {
    Http1(Mutex<Http1Pool>),
    H2c {
        shared: Mutex<Option<http2::SendRequest<RequestBody>>>,
        /// Serializes dialing so a burst of requests opens one connection, not many.
        dialing: tokio::sync::Mutex<()>,
    },
}

/// Connection state for one endpoint (`host:port`) of one pool.
pub struct Connections {
    address: std::sync::Arc<str>,
    /// Set when the address is an IP literal, so connecting skips the resolver.
    literal: Option<SocketAddr>,
    conns: Conns,
}

impl Connections {
    pub fn new(address: std::sync::Arc<str>, protocol: UpstreamProtocol) -> Connections {
        let literal = address.parse().ok();
        let conns = match protocol {
            UpstreamProtocol::Http1 => Conns::Http1(Mutex::new(Http1Pool::default())),
            UpstreamProtocol::H2c => Conns::H2c {
                shared: Mutex::new(None),
                dialing: tokio::sync::Mutex::new(()),
            },
        };
        Connections {
            address,
            literal,
            conns,
        }
    }

    /// Sends one request and returns the response head with its streaming body.
    pub async fn send(
        self: &std::sync::Arc<Self>,
        request: Request<RequestBody>,
        settings: &ConnSettings,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match &self.conns {
            Conns::Http1(pool) => self.send_http1(pool, request, settings).await,
            Conns::H2c { shared, dialing } => {
                self.send_h2c(shared, dialing, request, settings).await
            }
        }
    }

    async fn send_http1(
        self: &std::sync::Arc<Self>,
        pool: &Mutex<Http1Pool>,
        mut request: Request<RequestBody>,
        settings: &ConnSettings,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // A pooled connection may have been closed by the backend a moment ago; hyper hands
        // the request back when it was not written, and it goes out on a fresh connection.
        while let Some(mut sender) = self.checkout_idle(pool, settings) {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.recycle(sender, settings);
                    return Ok(response);
                }
                Err(mut err) => match err.take_message() {
                    Some(returned) => request = returned,
                    None => return Err(UpstreamError::Request(err.into_error())),
                },
            }
        }
        let io = self.dial(settings).await?;
        let (mut sender, connection) =
            http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|source| UpstreamError::Handshake {
                    address: self.address.clone(),
                    source,
                })?;
        drive(connection.with_upgrades(), "HTTP/1");
        let response = sender
            .send_request(request)
            .await
            .map_err(UpstreamError::Request)?;
        self.recycle(sender, settings);
        Ok(response)
    }

    /// The most recently parked connection that is ready for a request and not past its
    /// idle timeout. Closed and expired connections met on the way are dropped.
    fn checkout_idle(
        &self,
        pool: &Mutex<Http1Pool>,
        settings: &ConnSettings,
    ) -> Option<http1::SendRequest<RequestBody>> {
        let mut pool = pool.lock();
        let mut index = pool.parked.len();
        while index > 0 {
            index -= 1;
            let conn = &pool.parked[index];
            if conn.sender.is_closed() {
                pool.parked.swap_remove(index);
            } else if conn.sender.is_ready() {
                let conn = pool.parked.swap_remove(index);
                if conn.since.elapsed() < settings.idle_timeout {
                    return Some(conn.sender);
                }
            }
        }
        None
    }

    /// Parks a connection that has just delivered a response head, for reuse once its
    /// exchange completes, unless `max_idle` connections are already waiting idle.
    fn recycle(&self, sender: http1::SendRequest<RequestBody>, settings: &ConnSettings) {
        let Conns::Http1(pool) = &self.conns else {
            return;
        };
        let mut pool = pool.lock();
        pool.parked.retain(|conn| !conn.sender.is_closed());
        let idle = pool
            .parked
            .iter()
            .filter(|conn| conn.sender.is_ready())
            .count();
        if idle < settings.max_idle {
            pool.parked.push(Parked {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn send_h2c(
        &self,
        shared: &Mutex<Option<http2::SendRequest<RequestBody>>>,
        dialing: &tokio::sync::Mutex<()>,
        request: Request<RequestBody>,
        settings: &ConnSettings,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = match self.live_h2(shared) {
            Some(sender) => sender,
            None => {
                let _dialing = dialing.lock().await;
                match self.live_h2(shared) {
                    Some(sender) => sender,
                    None => {
                        let sender = self.dial_h2(settings).await?;
                        *shared.lock() = Some(sender.clone());
                        sender
                    }
                }
            }
        };
        sender.ready().await.map_err(UpstreamError::Request)?;
        sender
            .send_request(request)
            .await
            .map_err(UpstreamError::Request)
    }

    fn live_h2(
        &self,
        shared: &Mutex<Option<http2::SendRequest<RequestBody>>>,
    ) -> Option<http2::SendRequest<RequestBody>> {
        let mut shared = shared.lock();
        match shared.as_ref() {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                *shared = None;
                None
            }
            None => None,
        }
    }

    async fn dial_h2(
        &self,
        settings: &ConnSettings,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = self.dial(settings).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(2 << 20)
            .initial_connection_window_size(8 << 20)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Handshake {
                address: self.address.clone(),
                source,
            })?;
        drive(connection, "HTTP/2");
        Ok(sender)
    }

    async fn dial(&self, settings: &ConnSettings) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let connect = async {
            match self.literal {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect(&*self.address).await,
            }
        };
        let stream = tokio::time::timeout(settings.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                address: self.address.clone(),
            })?
            .map_err(|source| UpstreamError::Connect {
                address: self.address.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    /// Idle HTTP/1 connections currently pooled (for tests and status).
    pub fn idle_count(&self) -> usize {
        match &self.conns {
            Conns::Http1(pool) => pool
                .lock()
                .parked
                .iter()
                .filter(|conn| conn.sender.is_ready())
                .count(),
            Conns::H2c { shared, .. } => usize::from(shared.lock().is_some()),
        }
    }
}

/// Runs an upstream connection's I/O in the background until it closes.
fn drive(
    connection: impl std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    protocol: &'static str,
) {
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, protocol, "upstream connection ended with an error");
        }
    });
}
