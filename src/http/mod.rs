//! The L7 engine: HTTP/1.x (`h1`) and h2c/h2 (hyper) on one port, the per-request
//! proxy pipeline, header hygiene, body wrappers and the error-to-status map.
//! It never picks endpoints itself (that is `upstream`) or parses config (`config`).

pub mod body;
pub mod error;
pub mod h1;
pub mod headers;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use bytes::BytesMut;
use http::HeaderName;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::config::{ListenerConfig, RedirectHttpsConfig};
use crate::listener::prefixed::Prefixed;
pub use proxy::{Connection, Proxy};

/// What the connection pipeline learned before HTTP began.
pub struct ConnInfo {
    /// The client: the socket peer, or the address a trusted PROXY header carried.
    pub client: SocketAddr,
    /// The gateway address the client connected to.
    pub local: SocketAddr,
    /// Set on terminated TLS connections.
    pub tls: Option<TlsInfo>,
    /// Answer every request with a redirect to `https://` (SPEC TLS-6).
    pub redirect_https: Option<RedirectHttpsConfig>,
    /// The header that carries a verified client certificate's subject upstream; removed
    /// from every client request on a listener that verifies client certificates.
    pub client_cert_header: Option<HeaderName>,
}

pub struct TlsInfo {
    pub sni: Option<Arc<str>>,
    /// The negotiated version, e.g. `TLSv1.3`.
    pub version: Option<&'static str>,
    /// Subject of the client certificate rustls verified, if the client sent one.
    pub client_subject: Option<Arc<str>>,
}

/// Serves one connection until it closes. When `drain` fires, the connection finishes
/// its in-flight requests and closes (HTTP/2 sends GOAWAY).
pub async fn serve_connection<S>(
    proxy: Arc<Proxy>,
    mut stream: S,
    info: ConnInfo,
    listener: Arc<ListenerConfig>,
    drain: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &listener.limits;
    let header_timeout = limits.request_header_timeout.0;
    // The first request head must be complete this long after HTTP begins, the wait for
    // its first bytes included.
    let first_head_deadline = tokio::time::Instant::now() + header_timeout;
    let peer = info.client;
    // HTTP/1 or h2c is decided here from the first bytes; HTTP/1 parses them in place and
    // h2c gets them replayed to hyper in one read.
    let (first, h2) =
        match tokio::time::timeout_at(first_head_deadline, read_first(&mut stream)).await {
            Ok(Ok(first)) => first,
            Ok(Err(err)) => return log_end(peer, Err(err)),
            Err(_) => return log_end(peer, Err("no request before the header timeout")),
        };
    let conn = Arc::new(Connection {
        peer,
        peer_value: peer_header_value(peer.ip()),
        local: info.local,
        listener_name: listener.name.as_str().into(),
        listener: listener.clone(),
        scheme: if info.tls.is_some() { "https" } else { "http" },
        requests: AtomicU64::new(0),
        first_request: tokio::sync::Notify::new(),
        tls_version: info.tls.as_ref().and_then(|tls| tls.version),
        sni: info.tls.as_ref().and_then(|tls| tls.sni.clone()),
        client_subject: info.tls.and_then(|tls| tls.client_subject),
        client_cert_header: info.client_cert_header,
        redirect_https: info.redirect_https,
    });
    if !h2 {
        h1::serve(
            proxy,
            conn,
            Box::new(stream),
            first,
            first_head_deadline,
            drain,
        )
        .await;
        return;
    }
    let stream = TokioIo::new(Prefixed::new(first, stream));
    let conn_for_drain = conn.clone();
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let request = request.map(body::ClientBody::H2);
        pin_box_in_place(|| proxy.clone().handle(conn.clone(), request))
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .initial_stream_window_size(clamp_window(limits.h2_initial_stream_window.0))
        .initial_connection_window_size(clamp_window(limits.h2_initial_connection_window.0))
        .max_header_list_size(limits.max_request_header_bytes.0.min(u64::from(u32::MAX)) as u32)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(Some(limits.h2_max_pending_reset_streams.max(1) * 16));
    let connection = builder.serve_connection(stream, service);
    drive(
        connection,
        &conn_for_drain,
        first_head_deadline,
        drain,
        peer,
    )
    .await;
}

/// Reads until the first bytes tell HTTP/1 from the h2c preface (usually one read);
/// returns them and whether they are the preface. End of stream counts as HTTP/1, whose
/// server then sees the end itself.
async fn read_first<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<(BytesMut, bool)> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut first = BytesMut::with_capacity(4096);
    loop {
        let read = stream.read_buf(&mut first).await?;
        let common = first.len().min(PREFACE.len());
        if first[..common] != PREFACE[..common] || read == 0 {
            return Ok((first, false));
        }
        if first.len() >= PREFACE.len() {
            return Ok((first, true));
        }
    }
}

/// A hyper (HTTP/2) connection future that can be asked to finish gracefully.
trait Graceful: std::future::Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}

/// Runs a connection to its end; when `drain` fires it finishes gracefully.
async fn drive(
    connection: impl Graceful,
    conn: &Connection,
    first_head_deadline: tokio::time::Instant,
    drain: CancellationToken,
    peer: SocketAddr,
) {
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = first_head_missed(conn, first_head_deadline) => {
            return log_end(peer, Err("no complete request head before the header timeout"));
        }
        _ = drain.cancelled() => {
            // A connection accepted just before the drain began has usually not sent its
            // request yet, and hyper would close it at once as idle: the client, who did
            // nothing wrong, would see its request fail. Serve that first request (bounded
            // by the header timeout), then close; connections that already served requests
            // and sit idle close now.
            if conn.requests.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                let first = tokio::time::timeout_at(first_head_deadline, conn.first_request.notified());
                tokio::select! {
                    result = connection.as_mut() => return log_end(peer, result),
                    _ = first => {}
                }
            }
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    log_end(peer, result);
}

/// Resolves if the connection's first request head has not arrived by `deadline`; stays
/// pending once it has.
async fn first_head_missed(conn: &Connection, deadline: tokio::time::Instant) {
    let served = || conn.requests.load(std::sync::atomic::Ordering::Relaxed) > 0;
    if !served() {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                if !served() {
                    return;
                }
            }
            () = conn.first_request.notified() => {}
        }
    }
    std::future::pending().await
}

fn log_end<E: std::fmt::Display>(peer: std::net::SocketAddr, result: Result<(), E>) {
    if let Err(err) = result {
        tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
    }
}

fn clamp_window(bytes: u64) -> u32 {
    bytes.clamp(65_535, (1 << 31) - 1) as u32
}

/// An IP address as a header value; every IP's text is a valid header value.
fn peer_header_value(ip: std::net::IpAddr) -> http::HeaderValue {
    http::HeaderValue::try_from(ip.to_string())
        .unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

/// Boxes the future `make` returns, building it in its heap slot: `Box::pin(make())`
/// builds the future on the stack and copies it, and the proxy future is KiB large and
/// boxed per request — that copy was the largest `memcpy` in profiles (BENCHMARKS.md).
fn pin_box_in_place<F>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    let mut slot = Box::<F>::new_uninit();
    slot.write(make());
    // SAFETY: `write` initialised the slot.
    Box::into_pin(unsafe { slot.assume_init() })
}
