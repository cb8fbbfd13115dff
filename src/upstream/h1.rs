//! HTTP/1.1 to upstreams, driven in the task of the request that uses the connection.
//!
//! hyper's client runs every connection in a task of its own and passes requests and
//! responses through channels: two task switches and a channel round trip per request, a
//! large share of the proxy's per-request CPU (docs/BENCHMARKS.md, PERF-1). Here the
//! request's task writes the head and the body and reads the response itself; the
//! response body owns the connection while it streams (finishing the request body too,
//! for exchanges that overlap) and parks it for reuse when both ends finished cleanly.

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::conn::{ConnSettings, Connections, UpstreamIo};
use crate::http::body::{BodyError, RequestBody};
use crate::http::h1::body::{poll_fill, BodyReadError, Decoder};
use crate::http::h1::head::{
    field_spans, header_map, parse_content_length, push_chunk_size, push_field, push_last_chunk,
    FieldSpans, Framing,
};
use crate::listener::prefixed::Prefixed;

/// Largest response head accepted from a backend, and its most header fields.
const MAX_RESPONSE_HEAD: usize = 128 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;
/// Request body chunks up to this size are copied behind the head or chunk header.
const COALESCE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("writing the request: {0}")]
    Write(#[source] std::io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] std::io::Error),
    #[error("the backend closed the connection before a response")]
    ClosedBeforeResponse,
    #[error("the backend closed the connection mid-response")]
    Incomplete,
    #[error("malformed response from the backend: {0}")]
    Malformed(&'static str),
    #[error("request body: {0}")]
    RequestBody(#[source] BodyError),
    #[error("response body: {0}")]
    ResponseBody(#[source] BodyReadError),
}

/// Why an exchange failed.
pub enum Failure {
    /// Nothing of the request was consumed: it may go out on another connection.
    Unsent(Box<Outgoing>, ClientError),
    /// The request was (at least partly) sent. `answered`: response bytes had arrived.
    Failed { error: ClientError, answered: bool },
}

/// An open HTTP/1.1 connection to a backend, idle or carrying one exchange.
pub struct Conn {
    io: UpstreamIo,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// With `max_connections`: released when the connection closes.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The thread that opened it: its socket belongs to that thread's reactor.
    thread: std::thread::ThreadId,
}

impl Conn {
    pub fn new(io: UpstreamIo, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            _permit: permit,
            thread: Conn::this_thread(),
        }
    }

    /// The calling thread's id, cached (`thread::current()` clones a handle).
    pub fn this_thread() -> std::thread::ThreadId {
        thread_local! {
            static THIS: std::thread::ThreadId = std::thread::current().id();
        }
        THIS.with(|id| *id)
    }

    pub fn thread(&self) -> std::thread::ThreadId {
        self.thread
    }

    /// Whether the backend closed this idle connection (or sent something unasked, which
    /// makes it unusable too). Never waits; `waker` is woken when that may have changed.
    pub fn is_closed(&mut self, waker: &std::task::Waker) -> bool {
        let mut cx = Context::from_waker(waker);
        let mut probe = [MaybeUninit::<u8>::uninit(); 64];
        let mut read = ReadBuf::uninit(&mut probe);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut read)
            .is_ready()
    }
}

/// Where a connection goes when its exchange ended cleanly.
pub struct Park {
    pub connections: Arc<Connections>,
    pub settings: ConnSettings,
    pub owner: Option<SocketAddr>,
    pub born: Instant,
    /// Requests carried, this one included.
    pub served: u32,
}

/// The request body still being written, with its framing.
struct Pump {
    /// Bytes to write before anything else: the head, chunk headers, small data.
    out: Vec<u8>,
    written: usize,
    /// A large data chunk written after `out`, from where it is.
    data: Option<Bytes>,
    /// A chunk's closing CRLF is due before the next bytes.
    chunk_end: bool,
    chunked: bool,
    /// Bytes the framing still expects (`Content-Length`); none for chunked.
    remaining: Option<u64>,
    trailers: Option<HeaderMap>,
    body_done: bool,
}

impl Pump {
    /// Writes what is pending and pulls the body until it ends (`Ready(Ok)`) or has
    /// nothing more for now (`Pending`).
    fn poll(
        &mut self,
        io: &mut UpstreamIo,
        cx: &mut Context<'_>,
        body: &mut RequestBody,
    ) -> Poll<Result<(), ClientError>> {
        loop {
            std::task::ready!(self.poll_write_pending(io, cx)).map_err(ClientError::Write)?;
            if self.body_done {
                return Pin::new(&mut *io)
                    .poll_flush(cx)
                    .map_err(ClientError::Write);
            }
            let frame = match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => {
                    std::task::ready!(Pin::new(&mut *io).poll_flush(cx))
                        .map_err(ClientError::Write)?;
                    return Poll::Pending;
                }
                Poll::Ready(frame) => frame,
            };
            match frame {
                None => self.finish_body()?,
                Some(Err(err)) => return Poll::Ready(Err(ClientError::RequestBody(err))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.queue(data)?,
                    Err(frame) => self.trailers = frame.into_trailers().ok(),
                },
            }
        }
    }

    fn queue(&mut self, data: Bytes) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        if let Some(remaining) = self.remaining.as_mut() {
            *remaining = remaining.checked_sub(data.len() as u64).ok_or_else(|| {
                ClientError::Write(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "request body longer than its Content-Length",
                ))
            })?;
        }
        if self.chunked {
            push_chunk_size(&mut self.out, data.len());
            self.chunk_end = true;
        }
        if self.out.len() - self.written + data.len() <= COALESCE {
            self.out.extend_from_slice(&data);
            if std::mem::take(&mut self.chunk_end) {
                self.out.extend_from_slice(b"\r\n");
            }
        } else {
            self.data = Some(data);
        }
        Ok(())
    }

    fn finish_body(&mut self) -> Result<(), ClientError> {
        self.body_done = true;
        if self.remaining.is_some_and(|left| left > 0) {
            return Err(ClientError::Write(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "request body shorter than its Content-Length",
            )));
        }
        if self.chunked {
            push_last_chunk(&mut self.out, self.trailers.as_ref());
        }
        Ok(())
    }

    fn poll_write_pending(
        &mut self,
        io: &mut UpstreamIo,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let head = &self.out[self.written..];
            let n = match &self.data {
                None if head.is_empty() => break,
                None => std::task::ready!(Pin::new(&mut *io).poll_write(cx, head))?,
                Some(data) => {
                    let slices = [std::io::IoSlice::new(head), std::io::IoSlice::new(data)];
                    std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?
                }
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let from_head = n.min(head.len());
            self.written += from_head;
            if let Some(data) = self.data.as_mut() {
                data.advance(n - from_head);
                if data.is_empty() {
                    self.data = None;
                    self.out.clear();
                    self.written = 0;
                    if std::mem::take(&mut self.chunk_end) {
                        self.out.extend_from_slice(b"\r\n");
                    }
                }
            }
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

/// A request for an HTTP/1.1 backend with its head already encoded. The proxy encodes it
/// straight from the client's parsed head, with the backend's `Host` put in: no copy of
/// the header map per attempt (the copy, its `Host` insert and its drop were 5 % of a
/// proxied request's instructions).
pub struct Outgoing {
    method: Method,
    pump: Pump,
    body: RequestBody,
}

impl Outgoing {
    /// `request` as it stands: its URI's path and query and its own `Host` field.
    pub fn from_request(request: Request<RequestBody>) -> Outgoing {
        let (parts, body) = request.into_parts();
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |path_and_query| path_and_query.as_str());
        let pump = encode_head(&parts.method, target, None, &parts.headers, &body);
        Outgoing {
            method: parts.method,
            pump,
            body,
        }
    }

    /// The request of `parts` with `target` as its request target and `host` as its
    /// `Host` field (first, as RFC 9110 §7.2 asks), in place of the client's own.
    pub fn encode(
        parts: &http::request::Parts,
        target: &str,
        host: &HeaderValue,
        body: RequestBody,
    ) -> Outgoing {
        let pump = encode_head(&parts.method, target, Some(host), &parts.headers, &body);
        Outgoing {
            method: parts.method.clone(),
            pump,
            body,
        }
    }

    pub fn into_body(self) -> RequestBody {
        self.body
    }
}

/// The request head, with the framing its body gets. With `host`, that value replaces
/// any `Host` among `headers`.
fn encode_head(
    method: &Method,
    target: &str,
    host: Option<&HeaderValue>,
    headers: &HeaderMap,
    body: &RequestBody,
) -> Pump {
    let size = 32
        + method.as_str().len()
        + target.len()
        + host.map_or(0, |host| host.len() + 8)
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| parse_content_length(value.as_bytes()));
    let (remaining, chunked, extra): (Option<u64>, bool, Option<(HeaderName, HeaderValue)>) =
        if let Some(length) = declared {
            (Some(length), false, None)
        } else if body.is_end_stream() {
            // RFC 9110 §8.6: a method that usually has content says it has none.
            let zero = matches!(*method, Method::POST | Method::PUT | Method::PATCH)
                .then(|| (CONTENT_LENGTH, HeaderValue::from_static("0")));
            (Some(0), false, zero)
        } else if let Some(exact) = body.size_hint().exact() {
            (
                Some(exact),
                false,
                Some((CONTENT_LENGTH, HeaderValue::from(exact))),
            )
        } else {
            (
                None,
                true,
                Some((TRANSFER_ENCODING, HeaderValue::from_static("chunked"))),
            )
        };
    let small_body = body.size_hint().exact().filter(|&n| n as usize <= COALESCE);
    let mut out = Vec::with_capacity(size + 32 + small_body.unwrap_or(0) as usize);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        push_field(&mut out, &HOST, host);
    }
    for (name, value) in headers.iter() {
        if name != TRANSFER_ENCODING && !(host.is_some() && name == HOST) {
            push_field(&mut out, name, value);
        }
    }
    if let Some((name, value)) = &extra {
        push_field(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    Pump {
        out,
        written: 0,
        data: None,
        chunk_end: false,
        chunked,
        remaining,
        trailers: None,
        body_done: body.is_end_stream(),
    }
}

/// A parsed response head.
struct ResponseHead {
    response: Response<()>,
    decoder: Decoder,
    keep_alive: bool,
}

/// Parses a response head from the front of `buf`; `Ok(None)`: read more. Interim (1xx)
/// responses other than `101` are skipped.
fn parse_response(
    buf: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<ResponseHead>, ClientError> {
    loop {
        let mut slots =
            [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
                return Err(ClientError::Malformed("response head too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ClientError::Malformed("invalid status line or header")),
        };
        let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
            .map_err(|_| ClientError::Malformed("invalid status code"))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            continue;
        }
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let mut spans = FieldSpans::new();
        field_spans(parsed.headers, buf.as_ptr() as usize, &mut spans)
            .map_err(ClientError::Malformed)?;
        let head = buf.split_to(len).freeze();
        let (headers, fields) = header_map(&head, &mut spans, 4).map_err(ClientError::Malformed)?;
        let no_body = *request_method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::SWITCHING_PROTOCOLS;
        let decoder = if no_body {
            Decoder::Done
        } else if fields.transfer_encoding && fields.chunked {
            Decoder::new(Framing::Chunked)
        } else if fields.transfer_encoding {
            Decoder::UntilClose
        } else if let Some(length) = fields.content_length {
            Decoder::new(Framing::Length(length))
        } else {
            Decoder::UntilClose
        };
        let keep_alive = fields.keep_alive(version)
            && decoder != Decoder::UntilClose
            // Both framing headers: the connection cannot be trusted to be in step.
            && !(fields.transfer_encoding && fields.content_length.is_some());
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(ResponseHead {
            response,
            decoder,
            keep_alive,
        }));
    }
}

/// Sends `outgoing` on `conn` and returns the response head; the body streams from the
/// connection and parks it in `park` when the exchange ends cleanly.
pub async fn send(
    mut conn: Conn,
    outgoing: Outgoing,
    park: Park,
) -> Result<Response<Box<Body>>, Failure> {
    let Outgoing {
        method,
        mut pump,
        mut body,
    } = outgoing;
    // The head alone first: if the connection fails before it is out, the request is
    // handed back untouched (the backend closed a pooled connection as it was reused).
    let head_written = std::future::poll_fn(|cx| pump.poll_write_pending(&mut conn.io, cx)).await;
    if let Err(err) = head_written {
        // Whatever part of the head went out, went to a connection now dead.
        pump.written = 0;
        return Err(Failure::Unsent(
            Box::new(Outgoing { method, pump, body }),
            ClientError::Write(err),
        ));
    }
    let mut pump_done = false;
    let head = std::future::poll_fn(|cx| {
        if !pump_done {
            match pump.poll(&mut conn.io, cx, &mut body) {
                Poll::Ready(Ok(())) => pump_done = true,
                Poll::Ready(Err(error)) => {
                    return Poll::Ready(Err(Failure::Failed {
                        error,
                        answered: !conn.buf.is_empty(),
                    }))
                }
                Poll::Pending => {}
            }
        }
        loop {
            if !conn.buf.is_empty() {
                match parse_response(&mut conn.buf, &method) {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => {
                        return Poll::Ready(Err(Failure::Failed {
                            error,
                            answered: true,
                        }))
                    }
                }
            }
            let answered = !conn.buf.is_empty();
            match std::task::ready!(poll_fill(&mut conn.io, &mut conn.buf, cx, 4096)) {
                Ok(0) => {
                    return Poll::Ready(Err(Failure::Failed {
                        error: if answered {
                            ClientError::Incomplete
                        } else {
                            ClientError::ClosedBeforeResponse
                        },
                        answered,
                    }))
                }
                Ok(_) => {}
                Err(err) => {
                    return Poll::Ready(Err(Failure::Failed {
                        error: ClientError::Read(err),
                        answered,
                    }))
                }
            }
        }
    })
    .await?;
    let ResponseHead {
        response,
        decoder,
        keep_alive,
    } = head;
    let (mut parts, ()) = response.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        let io = Prefixed::new(std::mem::take(&mut conn.buf), conn.io);
        parts
            .extensions
            .insert(Upgrade(Arc::new(std::sync::Mutex::new(Some(io)))));
        return Ok(Response::from_parts(parts, Box::new(Body::empty())));
    }
    // Boxed: only exchanges whose response begins before the request body ends need it.
    let request = (!pump_done).then(|| Box::new((pump, body)));
    // Boxed: the response moves through every layer of the proxy, and the body is most of
    // its size (the connection, its parking instructions).
    let mut response_body = Box::new(Body {
        conn: Some(conn),
        decoder,
        request,
        keep_alive,
        park: Some(park),
    });
    if response_body.decoder.is_done() {
        response_body.finish();
    }
    Ok(Response::from_parts(parts, response_body))
}

/// A backend connection handed over after `101 Switching Protocols`, with any bytes the
/// backend sent after its response head.
pub type Upgraded = Prefixed<UpstreamIo>;

/// The upgraded connection in a `101` response's extensions (extensions must be `Clone`;
/// one clone takes it).
#[derive(Clone)]
pub struct Upgrade(Arc<std::sync::Mutex<Option<Upgraded>>>);

impl Upgrade {
    pub fn take(&self) -> Option<Upgraded> {
        self.0.lock().ok().and_then(|mut io| io.take())
    }
}

/// A response body streaming from a backend connection.
pub struct Body {
    conn: Option<Conn>,
    decoder: Decoder,
    /// The request body, when the response began before it was all sent.
    request: Option<Box<(Pump, RequestBody)>>,
    keep_alive: bool,
    park: Option<Park>,
}

impl Body {
    fn empty() -> Body {
        Body {
            conn: None,
            decoder: Decoder::Done,
            request: None,
            keep_alive: false,
            park: None,
        }
    }

    /// The exchange is over: the connection is parked if it is still in step.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if let (true, None, Some(park)) = (self.keep_alive, &self.request, self.park.take()) {
            if conn.buf.is_empty() {
                park.connections.park(conn, &park);
            }
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(request) = this.request.as_mut() {
            let (pump, body) = &mut **request;
            match pump.poll(&mut conn.io, cx, body) {
                Poll::Ready(Ok(())) => this.request = None,
                // The backend answers regardless; the connection is not reused.
                Poll::Ready(Err(_)) => {
                    this.request = None;
                    this.keep_alive = false;
                }
                Poll::Pending => {}
            }
        }
        let frame = std::task::ready!(this.decoder.poll_frame(
            &mut conn.io,
            &mut conn.buf,
            cx,
            MAX_RESPONSE_HEAD
        ));
        match &frame {
            Some(Ok(_)) if this.decoder.is_done() => this.finish(),
            Some(Ok(_)) => {}
            None => this.finish(),
            Some(Err(_)) => this.conn = None,
        }
        Poll::Ready(frame.map(|frame| {
            frame.map_err(|err| match err {
                BodyReadError::Incomplete => ClientError::Incomplete,
                BodyReadError::Io(err) => ClientError::Read(err),
                err => ClientError::ResponseBody(err),
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interim_responses_are_skipped_and_framing_follows_the_headers() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        );
        let head = parse_response(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.response.status(), 200);
        assert_eq!(head.decoder, Decoder::Length(3));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"abc");

        let mut head_only = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n");
        let head = parse_response(&mut head_only, &Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(head.decoder, Decoder::Done);

        let mut until_close = BytesMut::from("HTTP/1.0 200 OK\r\n\r\nabc");
        let head = parse_response(&mut until_close, &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(head.decoder, Decoder::UntilClose);
        assert!(!head.keep_alive);

        let mut both = BytesMut::from(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let head = parse_response(&mut both, &Method::GET).unwrap().unwrap();
        assert_eq!(head.decoder, Decoder::ChunkSize);
        assert!(!head.keep_alive);
    }

    #[test]
    fn an_encoded_head_carries_the_backends_host_first_and_its_own_framing() {
        let request = Request::post("http://client.example/old?q=1")
            .header("x-a", "1")
            .header(HOST, "client.example")
            .header(TRANSFER_ENCODING, "chunked")
            .header("x-b", "2")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let body = RequestBody::replay(Bytes::from_static(b"hello"));
        let host = HeaderValue::from_static("10.0.0.7:8080");
        let outgoing = Outgoing::encode(&parts, "/new?q=1", &host, body);
        assert_eq!(
            String::from_utf8_lossy(&outgoing.pump.out),
            "POST /new?q=1 HTTP/1.1\r\nhost: 10.0.0.7:8080\r\nx-a: 1\r\nx-b: 2\r\n\
             content-length: 5\r\n\r\n"
        );
        assert_eq!(outgoing.pump.remaining, Some(5));
        assert!(!outgoing.pump.chunked);

        // As it stands: its own Host and target.
        let request = Request::get("/as-is")
            .header(HOST, "client.example")
            .body(RequestBody::empty())
            .unwrap();
        let outgoing = Outgoing::from_request(request);
        assert_eq!(
            String::from_utf8_lossy(&outgoing.pump.out),
            "GET /as-is HTTP/1.1\r\nhost: client.example\r\n\r\n"
        );
    }

    #[test]
    fn malformed_responses_are_errors() {
        for bad in [
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(
                parse_response(&mut BytesMut::from(bad), &Method::GET).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(
            parse_response(&mut BytesMut::from("HTTP/1.1 200 OK\r\n"), &Method::GET)
                .unwrap()
                .is_none()
        );
    }
}
