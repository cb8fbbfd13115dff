//! Upstream connections for one endpoint: an idle list of HTTP/1.1 keep-alive
//! connections, or one shared multiplexed HTTP/2 (h2c) connection.
//!
//! Hand-written on hyper's low-level `client::conn` rather than hyper-util's pooled client
//! because the proxy needs control that client does not give: the upstream `:authority`
//! and `Host` independent of the dial address, per-endpoint state owned by a registry that
//! survives config swaps, and (with later features) connections keyed by client for PROXY
//! protocol and per-endpoint connection limits.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::{Request, Response};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::h1;
use super::{UpstreamBody, UpstreamError};
use crate::config::{HealthCheckConfig, HealthCheckKind, ProxyProtocolVersion, UpstreamProtocol};
use crate::http::body::RequestBody;
use crate::listener::proxy_protocol;
use crate::tls::UpstreamTlsConnector;

/// How connections to an endpoint are set up beyond TCP: TLS, and a PROXY header first.
#[derive(Default)]
pub struct Transport {
    pub tls: Option<Arc<UpstreamTlsConnector>>,
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

/// The downstream connection a request came in on, for the PROXY header and for keeping
/// such connections to one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddrs {
    /// The client's address (from the PROXY header when one was received).
    pub client: SocketAddr,
    /// The gateway's own address the client connected to.
    pub local: SocketAddr,
}

/// Settings that govern how connections to an endpoint are made and kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnSettings {
    pub connect_timeout: Duration,
    pub max_idle: usize,
    pub idle_timeout: Duration,
    /// Requests an HTTP/1.1 connection carries before it is closed; `None`: unlimited.
    pub max_requests: Option<u32>,
    /// Age after which a connection takes no new requests; `None`: unlimited.
    pub max_lifetime: Option<Duration>,
    /// Open HTTP/1.1 connections to the endpoint, busy or idle; 0: unlimited.
    pub max_connections: usize,
}

/// A request `send` could not hand to a connection, returned with its error so the caller
/// can send it elsewhere (a streamed body not yet read is not lost to a connect failure).
/// The request is boxed: failures are rare, and the result of every send moves through
/// several futures.
pub struct SendFailure {
    pub error: UpstreamError,
    pub unsent: Option<Box<UpstreamRequest>>,
}

/// Which HTTP/1.1 connection a request may go out on.
///
/// `usize`-sized on purpose, like every argument of the pipeline's `async fn`s: the
/// arguments are copied as one block when a future is built, and a one-byte argument is
/// placed after the future's largest state, which stretches that block to nearly the
/// whole future (3.7 KiB for the proxy's `Attempt::send`; docs/BENCHMARKS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Reuse {
    /// A pooled connection when one is idle, else a new one.
    Pooled,
    /// A new connection: the pooled one just failed as it was reused.
    Fresh,
}

/// A request for an endpoint: HTTP/1.1 endpoints take it with its head already encoded
/// (`h1::Outgoing`, as the proxy prepares it), or as an `http::Request`, encoded on
/// sending; HTTP/2 endpoints take an `http::Request`.
pub enum UpstreamRequest {
    Encoded(h1::Outgoing),
    Request(Request<RequestBody>),
}

impl UpstreamRequest {
    pub fn into_body(self) -> RequestBody {
        match self {
            UpstreamRequest::Encoded(outgoing) => outgoing.into_body(),
            UpstreamRequest::Request(request) => request.into_body(),
        }
    }

    fn into_http1(self) -> h1::Outgoing {
        match self {
            UpstreamRequest::Encoded(outgoing) => outgoing,
            UpstreamRequest::Request(request) => h1::Outgoing::from_request(request),
        }
    }
}

impl From<Request<RequestBody>> for UpstreamRequest {
    fn from(request: Request<RequestBody>) -> Self {
        UpstreamRequest::Request(request)
    }
}

impl From<UpstreamError> for SendFailure {
    fn from(error: UpstreamError) -> Self {
        SendFailure {
            error,
            unsent: None,
        }
    }
}

/// What `wait_for_connection` found: a connection ready for the request, or a permit to
/// open a new one.
enum Freed {
    Ready((h1::Conn, Instant, u32)),
    Permit(tokio::sync::OwnedSemaphorePermit),
}

/// An idle HTTP/1.1 connection. Only connections whose exchange ended cleanly are parked
/// (by the response body, `h1::Body`); one that errors, is upgraded, or whose response
/// body is abandoned closes instead.
struct Parked {
    conn: h1::Conn,
    /// Set when the connection began with a PROXY header: only this client may use it.
    client: Option<SocketAddr>,
    /// When `idle_timeout` runs out for it.
    expires: Instant,
    /// The address generation it was dialled in; older ones are not reused (DNS changed).
    generation: u64,
    /// When the connection was dialled, for `max_lifetime`.
    born: Instant,
    /// Requests it has carried, for `max_requests`.
    served: u32,
}

/// The idle HTTP/1.1 connections of one endpoint, most recently parked last.
#[derive(Default)]
struct Http1Pool {
    parked: Vec<Parked>,
    /// A sweeper task is running (see `sweep_idle`).
    sweeping: bool,
}

/// Wakes the endpoint's sweeper when the reactor sees activity on a parked connection:
/// a backend that closes an idle connection gets it closed here at once, as nginx and
/// HAProxy do, without a task per idle connection.
#[derive(Default)]
struct SweepSignal(tokio::sync::Notify);

impl std::task::Wake for SweepSignal {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// How often parked connections are checked for their idle timeout.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// The multiplexed HTTP/2 connections of one endpoint: one shared by every client, or with
/// a PROXY header one per client (at most `max_idle`, the oldest replaced first).
type SharedH2 = Vec<(
    Option<SocketAddr>,
    u64,
    Instant,
    http2::SendRequest<RequestBody>,
)>;

enum Conns {
    Http1(Mutex<Http1Pool>),
    H2 {
        shared: Mutex<SharedH2>,
        /// Serializes dialing so a burst of requests opens one connection, not many.
        dialing: tokio::sync::Mutex<()>,
    },
}

/// Connection state for one endpoint (`host:port`) of one pool.
pub struct Connections {
    address: Arc<str>,
    /// Set when the address is an IP literal, so connecting skips the resolver.
    literal: Option<SocketAddr>,
    conns: Conns,
    transport: Transport,
    /// Connect latency is observed here; set by the registry that creates the endpoint.
    metrics: Option<Arc<crate::telemetry::EndpointMetrics>>,
    /// For DNS names: the addresses last resolved by the refresher (`upstream::dns`),
    /// dialled in order; empty until the first refresh, when the name is resolved per dial.
    resolved: Mutex<Vec<SocketAddr>>,
    /// Bumped when the resolved addresses change: pooled connections of an older
    /// generation are closed instead of reused, so traffic follows the new addresses.
    generation: AtomicU64,
    /// The DNS refresh task and its interval.
    pub(super) refresher: Mutex<Option<(Duration, tokio::task::AbortHandle)>>,
    /// With `max_connections`: one permit per open HTTP/1.1 connection, held by the
    /// connection. A changed limit starts a new semaphore (connections of the old one
    /// keep their permits until they close).
    slots: Mutex<Option<(usize, Arc<tokio::sync::Semaphore>)>>,
    /// Signalled when an HTTP/1.1 connection is parked (a request waiting for a
    /// connection under `max_connections` takes it).
    parked_one: tokio::sync::Notify,
    sweep: Arc<SweepSignal>,
    /// `sweep` as a waker, registered on every parked connection.
    sweep_waker: std::task::Waker,
}

impl Connections {
    pub fn new(address: Arc<str>, protocol: UpstreamProtocol, transport: Transport) -> Connections {
        let literal = address.parse().ok();
        let sweep = Arc::new(SweepSignal::default());
        let conns = match protocol {
            UpstreamProtocol::Http1 => Conns::Http1(Mutex::new(Http1Pool::default())),
            UpstreamProtocol::H2c | UpstreamProtocol::H2 => Conns::H2 {
                shared: Mutex::new(Vec::new()),
                dialing: tokio::sync::Mutex::new(()),
            },
        };
        Connections {
            address,
            literal,
            conns,
            transport,
            resolved: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            refresher: Mutex::new(None),
            metrics: None,
            slots: Mutex::new(None),
            parked_one: tokio::sync::Notify::new(),
            sweep_waker: std::task::Waker::from(sweep.clone()),
            sweep,
        }
    }

    /// Observes connect latency into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::EndpointMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Closes every idle connection (at shutdown, after the drain): parked HTTP/1.1
    /// connections are dropped, which closes them; connections still carrying a response
    /// close with it. Shared HTTP/2 connections are dropped too; hyper closes them once
    /// their open streams finish.
    pub fn close_idle(&self) -> usize {
        match &self.conns {
            Conns::Http1(pool) => {
                let mut pool = pool.lock();
                let closed = pool.parked.len();
                pool.parked.clear();
                closed
            }
            Conns::H2 { shared, .. } => {
                let mut shared = shared.lock();
                let closed = shared.len();
                shared.clear();
                closed
            }
        }
    }

    pub fn address(&self) -> &Arc<str> {
        &self.address
    }

    /// Whether the endpoint is a DNS name (not an IP literal).
    pub fn is_name(&self) -> bool {
        self.literal.is_none()
    }

    /// Records a fresh resolution of the endpoint's name. When the addresses changed from
    /// the last known ones, pooled connections are retired and true is returned.
    pub fn update_resolved(&self, mut addrs: Vec<SocketAddr>) -> bool {
        addrs.sort_unstable();
        addrs.dedup();
        if addrs.is_empty() {
            // A failed or empty lookup keeps the last good answer (as nginx and HAProxy do).
            return false;
        }
        let mut resolved = self.resolved.lock();
        if *resolved == addrs {
            return false;
        }
        let first = resolved.is_empty();
        *resolved = addrs;
        drop(resolved);
        if first {
            return false;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Conns::H2 { shared, .. } = &self.conns {
            shared.lock().clear();
        }
        true
    }

    /// Sends one request and returns the response head with its streaming body.
    pub async fn send(
        self: &Arc<Self>,
        request: impl Into<UpstreamRequest>,
        settings: &ConnSettings,
        addrs: ClientAddrs,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        self.send_returning(request.into(), settings, addrs, Reuse::Pooled)
            .await
            .map_err(|failure| failure.error)
    }

    /// `send`, handing the request back when it never reached a connection (connect,
    /// handshake or TLS failure). `Reuse::Fresh` skips pooled connections.
    ///
    /// Not an `async fn`: it only picks the protocol's future, and one async layer fewer
    /// is one copy fewer of the request and of the response on every exchange.
    pub fn send_returning<'a>(
        self: &'a Arc<Self>,
        request: UpstreamRequest,
        settings: &'a ConnSettings,
        addrs: ClientAddrs,
        reuse: Reuse,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendFailure>> + Send + 'a {
        // Connections that began with a PROXY header carry one client's address.
        let owner = self.transport.proxy_protocol.map(|_| addrs.client);
        match &self.conns {
            Conns::Http1(pool) => Either::Left(self.send_http1(
                pool,
                request.into_http1(),
                settings,
                addrs,
                owner,
                reuse,
            )),
            Conns::H2 { shared, dialing } => {
                Either::Right(self.send_h2(shared, dialing, request, settings, addrs, owner))
            }
        }
    }

    /// The semaphore of open-connection permits for `max_connections`, if limited.
    fn slots(&self, max: usize) -> Option<Arc<tokio::sync::Semaphore>> {
        if max == 0 {
            return None;
        }
        let mut slots = self.slots.lock();
        match &*slots {
            Some((current, semaphore)) if *current == max => Some(semaphore.clone()),
            _ => {
                let semaphore = Arc::new(tokio::sync::Semaphore::new(max));
                *slots = Some((max, semaphore.clone()));
                Some(semaphore)
            }
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        pool: &Mutex<Http1Pool>,
        mut request: h1::Outgoing,
        settings: &ConnSettings,
        addrs: ClientAddrs,
        owner: Option<SocketAddr>,
        reuse: Reuse,
    ) -> Result<Response<UpstreamBody>, SendFailure> {
        // A pooled connection may have been closed by the backend a moment ago: when the
        // request head could not be written it goes out on another connection. Once
        // written, the error says the reused connection failed (`Stale`), so the caller
        // can send a safe request again on a fresh one.
        let mut reusable = if reuse == Reuse::Fresh {
            None
        } else {
            self.checkout_idle(pool, settings, owner)
        };
        let slots = self.slots(settings.max_connections);
        let permit = loop {
            if let Some((conn, born, served)) = reusable.take() {
                let park = self.park_for(settings, owner, born, served + 1);
                match h1::send(conn, request, park).await {
                    Ok(response) => return Ok(response.map(UpstreamBody::H1)),
                    Err(h1::Failure::Unsent(returned, _)) => request = *returned,
                    Err(h1::Failure::Failed { error, answered }) => {
                        let error = Box::new(error);
                        return Err(match answered {
                            false => UpstreamError::Stale(error),
                            true => UpstreamError::Request(error),
                        }
                        .into());
                    }
                }
                reusable = self.checkout_idle(pool, settings, owner);
                continue;
            }
            let Some(slots) = &slots else {
                break None;
            };
            if let Ok(permit) = slots.clone().try_acquire_owned() {
                break Some(permit);
            }
            // Every allowed connection is open: wait for one to be parked, or to close.
            // Requests in flight are capped at the same number (`Pool::reserve`), so one of
            // them is about to become free.
            // Boxed, like the dial below: rare paths whose state would otherwise widen
            // every request's future (which is moved, whole, whenever it starts).
            match Box::pin(self.wait_for_connection(pool, slots, settings, owner)).await {
                Ok(Freed::Permit(permit)) => break Some(permit),
                Ok(Freed::Ready(conn)) => reusable = Some(conn),
                Err(error) => {
                    return Err(SendFailure {
                        error,
                        unsent: Some(Box::new(UpstreamRequest::Encoded(request))),
                    })
                }
            }
        };
        let io = match Box::pin(self.dial(settings, addrs)).await {
            Ok(io) => io.into_inner(),
            Err(error) => {
                return Err(SendFailure {
                    error,
                    unsent: Some(Box::new(UpstreamRequest::Encoded(request))),
                })
            }
        };
        let park = self.park_for(settings, owner, Instant::now(), 1);
        match h1::send(h1::Conn::new(io, permit), request, park).await {
            Ok(response) => Ok(response.map(UpstreamBody::H1)),
            Err(h1::Failure::Unsent(returned, error)) => Err(SendFailure {
                error: UpstreamError::Request(Box::new(error)),
                unsent: Some(Box::new(UpstreamRequest::Encoded(*returned))),
            }),
            Err(h1::Failure::Failed { error, .. }) => {
                Err(UpstreamError::Request(Box::new(error)).into())
            }
        }
    }

    fn park_for(
        self: &Arc<Self>,
        settings: &ConnSettings,
        owner: Option<SocketAddr>,
        born: Instant,
        served: u32,
    ) -> h1::Park {
        h1::Park {
            connections: self.clone(),
            settings: settings.clone(),
            owner,
            born,
            served,
        }
    }

    /// Waits, within the connect timeout, until a connection is parked (ready for this
    /// request) or one closes (its permit is free for a new one).
    async fn wait_for_connection(
        &self,
        pool: &Mutex<Http1Pool>,
        slots: &Arc<tokio::sync::Semaphore>,
        settings: &ConnSettings,
        owner: Option<SocketAddr>,
    ) -> Result<Freed, UpstreamError> {
        let wait = async {
            loop {
                let parked = self.parked_one.notified();
                let mut parked = std::pin::pin!(parked);
                parked.as_mut().enable();
                if let Some(conn) = self.checkout_idle(pool, settings, owner) {
                    return Some(Freed::Ready(conn));
                }
                tokio::select! {
                    () = parked => {}
                    permit = slots.clone().acquire_owned() => {
                        return permit.map(Freed::Permit).ok();
                    }
                }
            }
        };
        match tokio::time::timeout(settings.connect_timeout, wait).await {
            Ok(Some(freed)) => Ok(freed),
            _ => Err(UpstreamError::ConnectTimeout {
                address: self.address.clone(),
            }),
        }
    }

    /// The most recently parked connection that is still open and not past its idle
    /// timeout or lifetime, preferring one opened on this worker thread: its socket is
    /// registered with this thread's reactor, so its wake-ups stay on the thread (with
    /// several workers, a connection from another worker works but every wake-up crosses
    /// threads). Closed and expired connections met on the way are dropped.
    fn checkout_idle(
        &self,
        pool: &Mutex<Http1Pool>,
        settings: &ConnSettings,
        owner: Option<SocketAddr>,
    ) -> Option<(h1::Conn, Instant, u32)> {
        let generation = self.generation.load(Ordering::Acquire);
        let here = h1::Conn::this_thread();
        let mut pool = pool.lock();
        loop {
            let mut pick = None;
            for (index, parked) in pool.parked.iter().enumerate().rev() {
                if parked.client != owner {
                    continue;
                }
                if parked.conn.thread() == here {
                    pick = Some(index);
                    break;
                }
                pick.get_or_insert(index);
            }
            let index = pick?;
            let parked = &mut pool.parked[index];
            let expired = crate::clock::coarse_now() >= parked.expires
                || settings
                    .max_lifetime
                    .is_some_and(|lifetime| parked.born.elapsed() >= lifetime);
            let usable = parked.generation == generation
                && !expired
                && !parked.conn.is_closed(&self.sweep_waker);
            let parked = pool.parked.swap_remove(index);
            if usable {
                return Some((parked.conn, parked.born, parked.served));
            }
        }
    }

    /// Parks a connection whose exchange ended cleanly, for reuse, unless it carried its
    /// last request or `max_idle` connections are already waiting.
    pub(super) fn park(self: &Arc<Self>, mut conn: h1::Conn, park: &h1::Park) {
        let Conns::Http1(pool) = &self.conns else {
            return;
        };
        let settings = &park.settings;
        if settings.max_requests.is_some_and(|max| park.served >= max)
            || conn.is_closed(&self.sweep_waker)
        {
            return;
        }
        {
            let mut pool = pool.lock();
            if pool.parked.len() >= settings.max_idle {
                // The oldest goes: the most recently used are the likeliest to stay open.
                if settings.max_idle == 0 {
                    return;
                }
                pool.parked.remove(0);
            }
            if !std::mem::replace(&mut pool.sweeping, true) {
                tokio::spawn(sweep_idle(Arc::downgrade(self), self.sweep.clone()));
            }
            pool.parked.push(Parked {
                conn,
                client: park.owner,
                expires: crate::clock::coarse_now() + settings.idle_timeout,
                generation: self.generation.load(Ordering::Acquire),
                born: park.born,
                served: park.served,
            });
        }
        self.parked_one.notify_one();
    }

    async fn send_h2(
        &self,
        shared: &Mutex<SharedH2>,
        dialing: &tokio::sync::Mutex<()>,
        request: UpstreamRequest,
        settings: &ConnSettings,
        addrs: ClientAddrs,
        owner: Option<SocketAddr>,
    ) -> Result<Response<UpstreamBody>, SendFailure> {
        // The proxy encodes heads only for HTTP/1.1 endpoints; an encoded one here would be
        // a mix-up of endpoints, refused rather than sent in the wrong protocol.
        let request = match request {
            UpstreamRequest::Request(request) => request,
            encoded @ UpstreamRequest::Encoded(_) => {
                return Err(SendFailure {
                    error: UpstreamError::Request(
                        "an HTTP/1.1 request head prepared for an HTTP/2 endpoint".into(),
                    ),
                    unsent: Some(Box::new(encoded)),
                })
            }
        };
        let mut sender = match self.live_h2(shared, owner, settings) {
            Some(sender) => sender,
            None => {
                let _dialing = dialing.lock().await;
                match self.live_h2(shared, owner, settings) {
                    Some(sender) => sender,
                    None => {
                        let sender = match Box::pin(self.dial_h2(settings, addrs)).await {
                            Ok(sender) => sender,
                            Err(error) => {
                                return Err(SendFailure {
                                    error,
                                    unsent: Some(Box::new(UpstreamRequest::Request(request))),
                                })
                            }
                        };
                        let mut shared = shared.lock();
                        if shared.len() >= settings.max_idle.max(1) {
                            shared.remove(0);
                        }
                        shared.push((
                            owner,
                            self.generation.load(Ordering::Acquire),
                            Instant::now(),
                            sender.clone(),
                        ));
                        sender
                    }
                }
            }
        };
        let boxed = |err: hyper::Error| UpstreamError::Request(Box::new(err));
        sender.ready().await.map_err(boxed)?;
        Ok(sender
            .send_request(request)
            .await
            .map_err(boxed)?
            .map(UpstreamBody::H2))
    }

    fn live_h2(
        &self,
        shared: &Mutex<SharedH2>,
        owner: Option<SocketAddr>,
        settings: &ConnSettings,
    ) -> Option<http2::SendRequest<RequestBody>> {
        let generation = self.generation.load(Ordering::Acquire);
        let mut shared = shared.lock();
        // Streams already open on a retired connection keep their own handle and finish.
        shared.retain(|(_, dialled_in, born, sender)| {
            !sender.is_closed()
                && *dialled_in == generation
                && settings
                    .max_lifetime
                    .is_none_or(|lifetime| born.elapsed() < lifetime)
        });
        shared
            .iter()
            .find(|(client, _, _, _)| *client == owner)
            .map(|(_, _, _, sender)| sender.clone())
    }

    async fn dial_h2(
        &self,
        settings: &ConnSettings,
        addrs: ClientAddrs,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = self.dial(settings, addrs).await?;
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
        drive(connection, "HTTP/2", None);
        Ok(sender)
    }

    /// TCP connect, then the PROXY header and the TLS handshake when configured, all
    /// inside the connect timeout.
    async fn dial(
        &self,
        settings: &ConnSettings,
        addrs: ClientAddrs,
    ) -> Result<TokioIo<UpstreamIo>, UpstreamError> {
        let connect = async {
            let resolved = self.resolved.lock().clone();
            let mut stream = match self.literal {
                Some(addr) => TcpStream::connect(addr).await,
                None if !resolved.is_empty() => TcpStream::connect(&resolved[..]).await,
                None => TcpStream::connect(&*self.address).await,
            }
            .map_err(|source| UpstreamError::Connect {
                address: self.address.clone(),
                source,
            })?;
            let _ = stream.set_nodelay(true);
            if let Some(version) = self.transport.proxy_protocol {
                let header = proxy_protocol::encode(version, addrs.client, addrs.local);
                stream
                    .write_all(&header)
                    .await
                    .map_err(|source| UpstreamError::Connect {
                        address: self.address.clone(),
                        source,
                    })?;
            }
            match &self.transport.tls {
                None => Ok(UpstreamIo::Plain(stream)),
                Some(tls) => {
                    let name =
                        tls.server_name_for(&self.address)
                            .map_err(|err| UpstreamError::Tls {
                                address: self.address.clone(),
                                message: err.to_string(),
                            })?;
                    let stream = tls.connector.connect(name, stream).await.map_err(|err| {
                        UpstreamError::Tls {
                            address: self.address.clone(),
                            message: err.to_string(),
                        }
                    })?;
                    Ok(UpstreamIo::Tls(Box::new(stream)))
                }
            }
        };
        let started = Instant::now();
        let io = tokio::time::timeout(settings.connect_timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                address: self.address.clone(),
            })??;
        if let Some(metrics) = &self.metrics {
            metrics.connect.observe(started.elapsed());
        }
        Ok(TokioIo::new(io))
    }

    /// One active health check over a fresh connection (never a pooled one: a check must
    /// see what a new request would see). TCP checks pass once connected (TLS and PROXY
    /// header included); HTTP checks need a status in the expected range within the timeout.
    pub async fn probe(&self, config: &HealthCheckConfig, settings: &ConnSettings) -> bool {
        let unspecified = SocketAddr::from(([127, 0, 0, 1], 0));
        let addrs = ClientAddrs {
            client: unspecified,
            local: unspecified,
        };
        let check = async {
            let io = self.dial(settings, addrs).await.ok()?;
            if config.kind == HealthCheckKind::Tcp {
                return Some(true);
            }
            let host = config.host.as_deref().unwrap_or(&self.address);
            let status = if matches!(self.conns, Conns::H2 { .. }) {
                let scheme = if self.transport.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                let uri = format!("{scheme}://{host}{}", config.path);
                let request = Request::get(uri).body(RequestBody::empty()).ok()?;
                let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(io)
                    .await
                    .ok()?;
                drive(connection, "HTTP/2 health check", None);
                sender.send_request(request).await.ok()?.status()
            } else {
                let request = Request::get(config.path.as_str())
                    .header(http::header::HOST, host)
                    .header(http::header::CONNECTION, "close")
                    .body(RequestBody::empty())
                    .ok()?;
                let (mut sender, connection) = http1::Builder::new().handshake(io).await.ok()?;
                drive(connection, "HTTP/1 health check", None);
                sender.send_request(request).await.ok()?.status()
            };
            let [low, high] = config.expected_status;
            Some((low..=high).contains(&status.as_u16()))
        };
        // The connect timeout applies inside; this bounds the whole check.
        matches!(
            tokio::time::timeout(config.timeout.0, check).await,
            Ok(Some(true))
        )
    }

    /// Idle HTTP/1 connections currently pooled (for tests and status).
    pub fn idle_count(&self) -> usize {
        match &self.conns {
            Conns::Http1(pool) => pool.lock().parked.len(),
            Conns::H2 { shared, .. } => shared.lock().len(),
        }
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        if let Some((_, task)) = self.refresher.get_mut().take() {
            task.abort();
        }
    }
}

/// Closes parked HTTP/1.1 connections the backend closed (woken through `SweepSignal`)
/// and those past their idle timeout (checked every `SWEEP_PERIOD`); ends when the
/// endpoint has no parked connection left or is gone.
async fn sweep_idle(connections: std::sync::Weak<Connections>, signal: Arc<SweepSignal>) {
    loop {
        tokio::select! {
            () = signal.0.notified() => {}
            () = tokio::time::sleep(SWEEP_PERIOD) => {}
        }
        let Some(connections) = connections.upgrade() else {
            return;
        };
        let Conns::Http1(pool) = &connections.conns else {
            return;
        };
        let now = Instant::now();
        let mut pool = pool.lock();
        pool.parked.retain_mut(|parked| {
            now < parked.expires && !parked.conn.is_closed(&connections.sweep_waker)
        });
        if pool.parked.is_empty() {
            pool.sweeping = false;
            return;
        }
    }
}

/// Runs an upstream connection's I/O in the background until it closes; its connection
/// permit (with `max_connections`) is released when it does.
fn drive(
    connection: impl std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    protocol: &'static str,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, protocol, "upstream connection ended with an error");
        }
        drop(permit);
    });
}

/// An upstream byte stream: plain TCP or TLS over it.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(stream) => stream.is_write_vectored(),
            UpstreamIo::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_flush(cx),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            UpstreamIo::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;

    /// A keep-alive HTTP/1.1 server that answers every request with `name`.
    async fn named_server(name: &'static str) -> SocketAddr {
        counted_server(name, Arc::new(std::sync::atomic::AtomicUsize::new(0))).await
    }

    /// Like `named_server`, counting accepted connections in `accepted`.
    async fn counted_server(
        name: &'static str,
        accepted: Arc<std::sync::atomic::AtomicUsize>,
    ) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buffer[..n]),
                        }
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                                name.len()
                            );
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn settings(max_requests: Option<u32>) -> ConnSettings {
        ConnSettings {
            connect_timeout: Duration::from_secs(5),
            max_idle: 4,
            idle_timeout: Duration::from_secs(60),
            max_requests,
            max_lifetime: None,
            max_connections: 0,
        }
    }

    async fn fetch(conns: &Arc<Connections>) -> String {
        fetch_with(conns, &settings(None)).await
    }

    async fn fetch_with(conns: &Arc<Connections>, settings: &ConnSettings) -> String {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let request = Request::get("/")
            .header(http::header::HOST, "backend.invalid")
            .body(RequestBody::empty())
            .unwrap();
        let response = conns
            .send(
                request,
                settings,
                ClientAddrs {
                    client: local,
                    local,
                },
            )
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn a_changed_dns_answer_retires_pooled_connections_and_new_dials_follow_it() {
        let a = named_server("a").await;
        let b = named_server("b").await;
        // `.invalid` never resolves (RFC 6761): every dial must use the refreshed answer.
        let conns = Arc::new(Connections::new(
            "backend.invalid:80".into(),
            UpstreamProtocol::Http1,
            Transport::default(),
        ));
        assert!(
            !conns.update_resolved(vec![a]),
            "a first answer retires nothing"
        );
        assert_eq!(fetch(&conns).await, "a");
        assert_eq!(fetch(&conns).await, "a");
        assert!(!conns.update_resolved(vec![a]), "same answer");
        assert!(
            !conns.update_resolved(Vec::new()),
            "a failed lookup keeps the last answer"
        );
        assert_eq!(fetch(&conns).await, "a");
        assert!(conns.update_resolved(vec![b]));
        // The pooled connection to `a` is not reused: the request goes to `b`.
        assert_eq!(fetch(&conns).await, "b");
        assert_eq!(fetch(&conns).await, "b");
    }

    #[tokio::test]
    async fn a_connection_carries_at_most_max_requests() {
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = counted_server("x", accepted.clone()).await;
        let conns = Arc::new(Connections::new(
            addr.to_string().into(),
            UpstreamProtocol::Http1,
            Transport::default(),
        ));
        let limited = settings(Some(2));
        for _ in 0..6 {
            assert_eq!(fetch_with(&conns, &limited).await, "x");
        }
        // Two requests per connection: at least three connections. (More only if a
        // finished exchange was not yet flagged ready when the next request came.)
        assert!(accepted.load(Ordering::SeqCst) >= 3);
        let unlimited = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let addr = counted_server("y", unlimited.clone()).await;
        let conns = Arc::new(Connections::new(
            addr.to_string().into(),
            UpstreamProtocol::Http1,
            Transport::default(),
        ));
        for _ in 0..6 {
            assert_eq!(fetch(&conns).await, "y");
        }
        assert!(
            unlimited.load(Ordering::SeqCst) < 6,
            "keep-alive reuse expected"
        );
    }
}
