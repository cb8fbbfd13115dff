//! The HTTP/1 server side of a client connection: reads request heads, hands each request
//! to the proxy, writes its response, keeps the connection alive between requests, and
//! hands it over after a `101 Switching Protocols`.
//!
//! Hand-written rather than hyper's server because of what the hot path and idle
//! connections cost there (docs/BENCHMARKS.md, PERF-1 and PERF-5): hyper holds an 8 KiB
//! read buffer and an 8 KiB write buffer for a connection's whole life, idle or not, and
//! hides request framing the proxy must see (RFC 9112 §6.1). Here an idle keep-alive
//! connection holds no buffer at all, the head is parsed once, and the request body is
//! read by whoever consumes it, straight from the socket (see `body`).

pub mod body;
pub mod head;

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode, Version};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, WriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use self::body::{ReadSide, Shared};
use self::head::{BodyFraming, Head, ResponseContext};
use super::body::{ClientBody, ResponseBody};
use super::proxy::{Connection, Proxy};
use crate::listener::prefixed::Prefixed;

/// Any client stream (TCP, TLS, after a PROXY header), boxed once per connection.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub type BoxedIo = Box<dyn Io>;

/// A connection handed over after `101 Switching Protocols`, with any bytes the client
/// sent after its request head.
pub type Upgraded = Prefixed<BoxedIo>;

/// Marks a request that carried both `Content-Length` and `Transfer-Encoding`; the proxy
/// refuses it and the connection closes after the answer.
#[derive(Clone, Copy, Debug)]
pub struct AmbiguousFraming;

/// Resolves to the client connection once a `101` answer to this request has been sent.
/// Shared because request extensions must be `Clone`; one clone receives the connection.
#[derive(Clone)]
pub struct OnUpgrade(Arc<std::sync::Mutex<oneshot::Receiver<Upgraded>>>);

#[derive(Debug, thiserror::Error)]
#[error("the connection was not handed over")]
pub struct NotUpgraded;

impl Future for OnUpgrade {
    type Output = Result<Upgraded, NotUpgraded>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.lock() {
            Ok(mut receiver) => Pin::new(&mut *receiver).poll(cx).map_err(|_| NotUpgraded),
            Err(_) => Poll::Ready(Err(NotUpgraded)),
        }
    }
}

/// Responses and body chunks up to this size are copied into one buffer and written with
/// one system call; larger chunks are written from where they are.
pub(super) const COALESCE: usize = 16 * 1024;

/// Why a connection ended early (logged at debug level).
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("no complete request head before the header timeout")]
    HeadTimeout,
    #[error("refused request head: {0}")]
    Head(#[from] head::HeadError),
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("response body failed: {0}")]
    ResponseBody(super::body::BodyError),
    #[error("response body length differs from its Content-Length")]
    LengthMismatch,
    #[error("the request body was not given back in time")]
    BodyOutstanding,
}

/// Serves HTTP/1 on `io` until the connection closes. `first` holds bytes already read.
pub async fn serve(
    proxy: Arc<Proxy>,
    conn: Arc<Connection>,
    io: BoxedIo,
    first: BytesMut,
    first_head_deadline: Instant,
    drain: CancellationToken,
) {
    let peer = conn.peer;
    if let Err(err) = Server::new(proxy, conn, io, first)
        .run(first_head_deadline, drain)
        .await
    {
        tracing::debug!(peer = %peer, error = %err, "connection ended with an error");
    }
}

struct Server {
    proxy: Arc<Proxy>,
    conn: Arc<Connection>,
    /// Home of the read side between requests; a request body borrows it.
    side: Option<ReadSide>,
    writer: WriteHalf<BoxedIo>,
    shared: Arc<Shared>,
    max_head: usize,
    max_headers: usize,
}

impl Server {
    fn new(proxy: Arc<Proxy>, conn: Arc<Connection>, io: BoxedIo, first: BytesMut) -> Server {
        let limits = &conn.listener.limits;
        let max_head = limits.max_request_header_bytes.0.max(8192) as usize;
        let max_headers = limits.max_request_headers;
        let (reader, writer) = tokio::io::split(io);
        Server {
            proxy,
            side: Some(ReadSide {
                reader: sync_wrapper::SyncWrapper::new(reader),
                buf: first,
            }),
            writer,
            shared: Arc::new(Shared::default()),
            max_head,
            max_headers,
            conn,
        }
    }

    async fn run(
        mut self,
        first_head_deadline: Instant,
        drain: CancellationToken,
    ) -> Result<(), ConnError> {
        let header_timeout = self.conn.listener.limits.request_header_timeout.0;
        // One wait for the drain and one header timer per connection, not one each per
        // request: the drain wait stays registered with the token between requests, and
        // the timer is moved to each new deadline, which for a later deadline is one store
        // (tokio's timer re-files the entry when the old deadline comes) instead of filing
        // and removing a timer-wheel entry per request.
        let mut drained = pin!(drain.cancelled());
        let mut header_deadline = pin!(tokio::time::sleep_until(first_head_deadline));
        loop {
            let head = match self
                .read_head(header_deadline.as_mut(), drained.as_mut())
                .await
            {
                Ok(Some(head)) => head,
                Ok(None) => return Ok(()),
                Err(ConnError::Head(err)) => {
                    let _ = self.writer.write_all(&head::refusal(err.status())).await;
                    let _ = self.writer.shutdown().await;
                    return Err(err.into());
                }
                Err(err) => return Err(err),
            };
            if !self.exchange(head, &drain).await? {
                let _ = self.writer.shutdown().await;
                return Ok(());
            }
            header_deadline
                .as_mut()
                .reset(crate::clock::coarse_now() + header_timeout);
        }
    }

    /// Waits for the next request head, until `deadline` fires; `None` when the client
    /// closed or a drain ended the idle connection. An idle connection holds no buffer
    /// while it waits.
    async fn read_head(
        &mut self,
        mut deadline: Pin<&mut tokio::time::Sleep>,
        mut drained: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Result<Option<Head>, ConnError> {
        let Some(side) = self.side.as_mut() else {
            return Ok(None);
        };
        let served_before = self
            .conn
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0;
        loop {
            if !side.buf.is_empty() {
                if let Some(head) = head::parse(&mut side.buf, self.max_head, self.max_headers)? {
                    return Ok(Some(head));
                }
            } else if side.buf.capacity() > 0 {
                side.buf = BytesMut::new();
            }
            let idle = side.buf.is_empty();
            let read = std::future::poll_fn(|cx| {
                if idle && served_before && drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(None));
                }
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(ConnError::HeadTimeout));
                }
                let read = if idle {
                    poll_read_append(side, cx)
                } else {
                    body::poll_fill(side.reader.get_mut(), &mut side.buf, cx, 4096)
                };
                read.map(|result| result.map(Some).map_err(ConnError::Io))
            })
            .await?;
            match read {
                None | Some(0) => return Ok(None),
                Some(_) => {}
            }
        }
    }

    /// Serves one request. Returns whether the connection stays open for another.
    async fn exchange(&mut self, head: Head, drain: &CancellationToken) -> Result<bool, ConnError> {
        let Head {
            request,
            framing,
            keep_alive,
            expect_continue,
            ambiguous,
            upgrade,
        } = head;
        let version = request.version();
        let method = request.method().clone();
        let te_trailers = request
            .headers()
            .get_all(http::header::TE)
            .iter()
            .any(|value| {
                value
                    .as_bytes()
                    .windows(8)
                    .any(|w| w.eq_ignore_ascii_case(b"trailers"))
            });
        let (mut parts, ()) = request.into_parts();
        let body = match framing {
            head::Framing::None => ClientBody::Empty,
            framing => match self.side.take() {
                Some(side) => ClientBody::H1(body::Body::new(
                    side,
                    framing,
                    self.shared.clone(),
                    expect_continue,
                    self.max_head,
                )),
                None => return Ok(false),
            },
        };
        if ambiguous {
            parts.extensions.insert(AmbiguousFraming);
        }
        let upgrade_to = upgrade.then(|| {
            let (sender, receiver) = oneshot::channel();
            parts
                .extensions
                .insert(OnUpgrade(Arc::new(std::sync::Mutex::new(receiver))));
            sender
        });
        let request = Request::from_parts(parts, body);

        // Boxed: this loop lives as long as the connection, and an inline proxy future
        // (several KiB) would be carried by every idle connection.
        let proxy = self.proxy.clone();
        let conn = self.conn.clone();
        let mut service = super::pin_box_in_place(|| proxy.handle(conn, request));
        let mut continue_sent = !expect_continue;
        let response = loop {
            let watch_close = self.side.is_some();
            tokio::select! {
                biased;
                response = service.as_mut() => break response,
                () = self.shared.continue_wanted.notified(), if !continue_sent => {
                    continue_sent = true;
                    self.writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                    self.writer.flush().await?;
                }
                closed = watch_for_close(self.side.as_mut(), self.max_head), if watch_close => {
                    if closed {
                        // The client went away mid-request: dropping the service future
                        // cancels the upstream exchange, as nginx does by default.
                        return Ok(false);
                    }
                }
            }
        };
        let Ok(response) = response;
        drop(service);
        let (mut parts, body) = response.into_parts();

        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            return self.upgrade(parts, upgrade_to, version).await;
        }
        // A body the proxy dropped unread leaves the connection out of step: say it closes.
        let body_dropped = match self.side.is_none() {
            true => match self.shared.take() {
                Some((side, complete)) => {
                    self.side = Some(side);
                    !complete
                }
                None => false,
            },
            false => false,
        };
        let context = ResponseContext {
            version,
            head_request: method == Method::HEAD,
            keep_alive: keep_alive
                // A drain that began during the exchange closes the connection after it.
                && !drain.is_cancelled()
                && !ambiguous
                && !body_dropped
                && method != Method::CONNECT,
        };
        let mut out = Vec::new();
        let (framing, mut keep) = head::encode_response(
            &mut out,
            parts.status,
            &mut parts.headers,
            body.size_hint(),
            body.is_end_stream(),
            &context,
        );
        self.write_body(
            out,
            body,
            framing,
            te_trailers && version == Version::HTTP_11,
        )
        .await?;

        if self.side.is_none() {
            let wait = self.conn.listener.limits.request_header_timeout.0;
            let returned = tokio::time::timeout(wait, async {
                loop {
                    if let Some(returned) = self.shared.take() {
                        return returned;
                    }
                    self.shared.back.notified().await;
                }
            })
            .await
            .map_err(|_| ConnError::BodyOutstanding)?;
            keep &= returned.1;
            self.side = Some(returned.0);
        }
        Ok(keep)
    }

    /// Sends the `101` head and hands the connection to the tunnel waiting for it.
    async fn upgrade(
        &mut self,
        mut parts: http::response::Parts,
        upgrade_to: Option<oneshot::Sender<Upgraded>>,
        version: Version,
    ) -> Result<bool, ConnError> {
        let (Some(sender), Some(side)) = (upgrade_to, self.side.take()) else {
            return Ok(false);
        };
        let mut out = Vec::new();
        head::encode_response(
            &mut out,
            parts.status,
            &mut parts.headers,
            http_body::SizeHint::with_exact(0),
            true,
            &ResponseContext {
                version,
                head_request: false,
                keep_alive: true,
            },
        );
        self.writer.write_all(&out).await?;
        self.writer.flush().await?;
        let placeholder = tokio::io::split(Box::new(tokio::io::empty()) as BoxedIo).1;
        let writer = std::mem::replace(&mut self.writer, placeholder);
        let io = side.reader.into_inner().unsplit(writer);
        let _ = sender.send(Prefixed::new(side.buf, io));
        Ok(false)
    }

    /// Writes the response head in `out` and streams the body after it.
    async fn write_body(
        &mut self,
        mut out: Vec<u8>,
        body: ResponseBody,
        framing: BodyFraming,
        trailers_allowed: bool,
    ) -> Result<(), ConnError> {
        let mut body = pin!(body);
        let mut written: u64 = 0;
        let mut trailers = None;
        if framing != BodyFraming::Nothing {
            loop {
                let next = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                    Poll::Ready(frame) => Poll::Ready(Some(frame)),
                    // Nothing more right now: send what is buffered before waiting.
                    Poll::Pending if !out.is_empty() => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                })
                .await;
                let frame = match next {
                    None => {
                        self.writer.write_all(&out).await?;
                        out.clear();
                        self.writer.flush().await?;
                        continue;
                    }
                    Some(None) => break,
                    Some(Some(Err(err))) => {
                        // What arrived goes out; the close tells the client the rest won't.
                        let _ = self.writer.write_all(&out).await;
                        return Err(ConnError::ResponseBody(err));
                    }
                    Some(Some(Ok(frame))) => frame,
                };
                let data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        if trailers_allowed {
                            trailers = frame.into_trailers().ok();
                        }
                        continue;
                    }
                };
                if data.is_empty() {
                    continue;
                }
                written += data.len() as u64;
                match framing {
                    BodyFraming::Length(length) if written > length => {
                        let _ = self.writer.write_all(&out).await;
                        return Err(ConnError::LengthMismatch);
                    }
                    BodyFraming::Chunked => {
                        head::push_chunk_size(&mut out, data.len());
                        self.send(&mut out, data).await?;
                        out.extend_from_slice(b"\r\n");
                    }
                    _ => self.send(&mut out, data).await?,
                }
            }
        }
        match framing {
            BodyFraming::Length(length) if written != length => {
                self.writer.write_all(&out).await?;
                return Err(ConnError::LengthMismatch);
            }
            BodyFraming::Chunked => head::push_last_chunk(&mut out, trailers.as_ref()),
            _ => {}
        }
        self.writer.write_all(&out).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Appends `data` to `out`, or writes both when `data` is large.
    async fn send(&mut self, out: &mut Vec<u8>, mut data: Bytes) -> Result<(), ConnError> {
        if out.len() + data.len() <= COALESCE {
            out.extend_from_slice(&data);
            return Ok(());
        }
        let mut head = &out[..];
        while !head.is_empty() || !data.is_empty() {
            let slices = [std::io::IoSlice::new(head), std::io::IoSlice::new(&data)];
            let n = self.writer.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            let from_head = n.min(head.len());
            head = &head[from_head..];
            data.advance(n - from_head);
        }
        out.clear();
        Ok(())
    }
}

/// Reads into a stack buffer and appends only what arrived, so a connection waiting for
/// its next request holds no read buffer (and one watched mid-request allocates nothing).
fn poll_read_append(side: &mut ReadSide, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    let mut stack = [MaybeUninit::<u8>::uninit(); 4096];
    let mut read = ReadBuf::uninit(&mut stack);
    match Pin::new(side.reader.get_mut()).poll_read(cx, &mut read) {
        Poll::Ready(Ok(())) => {
            let filled = read.filled();
            side.buf.extend_from_slice(filled);
            Poll::Ready(Ok(filled.len()))
        }
        Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
        Poll::Pending => Poll::Pending,
    }
}

/// While a bodiless request is served, reads ahead (pipelined requests, up to `max`
/// bytes) to notice a client that closed. Resolves `true` when it did.
async fn watch_for_close(side: Option<&mut ReadSide>, max: usize) -> bool {
    let Some(side) = side else {
        return std::future::pending().await;
    };
    std::future::poll_fn(|cx| loop {
        if side.buf.len() >= max {
            return Poll::Pending;
        }
        match poll_read_append(side, cx) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(true),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}
