//! Body types on both sides of the proxy. Bodies stream frame by frame with hyper's
//! backpressure; these wrappers add only what the proxy must enforce: the request body
//! limit, idle and total timeouts, byte counting, and writing the access-log line exactly
//! once when the response is finished or abandoned.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::telemetry::{LogGuard, RequestObserver, RouteMetrics};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a body stream stopped early. Mapped to a status in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("no body data for {0:?}")]
    IdleTimeout(Duration),
    #[error("request deadline reached while streaming the body")]
    Deadline,
    #[error("client body error: {0}")]
    Client(hyper::Error),
    #[error("client body error: {0}")]
    ClientH1(#[from] super::h1::body::BodyReadError),
    #[error("upstream body error: {0}")]
    Upstream(BoxError),
    #[error("response compression failed: {0}")]
    Encode(std::io::Error),
}

/// An idle timeout that restarts with each frame and a fixed deadline, both optional.
///
/// The timer futures are created only when a body first has to wait, and the idle timer is
/// re-armed lazily from the last activity instead of being reset on every frame: most
/// bodies finish without ever waiting, and a timer-wheel update per frame would cost more
/// than the frame itself.
pub struct Timers {
    idle: Option<IdleTimer>,
    deadline: Option<(Instant, Option<Pin<Box<Sleep>>>)>,
}

struct IdleTimer {
    period: Duration,
    last_activity: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Timers {
    pub fn new(idle: Option<Duration>, deadline: Option<Instant>) -> Timers {
        Timers {
            idle: idle.map(|period| IdleTimer {
                period,
                last_activity: crate::clock::coarse_now(),
                sleep: None,
            }),
            deadline: deadline.map(|at| (at, None)),
        }
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<BodyError> {
        if let Some((at, sleep)) = &mut self.deadline {
            let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*at)));
            if sleep.as_mut().poll(cx).is_ready() {
                return Some(BodyError::Deadline);
            }
        }
        if let Some(idle) = &mut self.idle {
            loop {
                let due = idle.last_activity + idle.period;
                let sleep = idle
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                if sleep.deadline() != due {
                    sleep.as_mut().reset(due);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    break;
                }
                if Instant::now() >= idle.last_activity + idle.period {
                    return Some(BodyError::IdleTimeout(idle.period));
                }
            }
        }
        None
    }

    fn touch(&mut self) {
        if let Some(idle) = &mut self.idle {
            idle.last_activity = crate::clock::coarse_now();
        }
    }

    /// Whether the fixed deadline has passed, polled or not.
    fn deadline_passed(&self) -> bool {
        self.deadline
            .as_ref()
            .is_some_and(|(at, _)| *at <= Instant::now())
    }
}

/// When a request body last moved a frame upstream (or ended), shared with the code that
/// waits for the response head: while a client is still uploading, the upstream cannot be
/// expected to have answered yet.
#[derive(Clone)]
pub struct BodyProgress {
    origin: Instant,
    /// Nanoseconds after `origin`; an atomic so the per-frame update costs no lock. None
    /// for a body that has nothing left to send: its progress stays at `origin`.
    last: Option<Arc<AtomicU64>>,
}

impl BodyProgress {
    fn new(moves: bool) -> BodyProgress {
        BodyProgress {
            origin: crate::clock::coarse_now(),
            last: moves.then(|| Arc::new(AtomicU64::new(0))),
        }
    }

    fn touch(&self) {
        if let Some(last) = &self.last {
            last.store(
                crate::clock::coarse_nanos_since(self.origin),
                Ordering::Relaxed,
            );
        }
    }

    pub fn last(&self) -> Instant {
        let nanos = self
            .last
            .as_ref()
            .map_or(0, |last| last.load(Ordering::Relaxed));
        self.origin + Duration::from_nanos(nanos)
    }
}

/// A client's request body as the server side read it: HTTP/2 from hyper, HTTP/1 from
/// the gateway's own server (`http::h1`).
pub enum ClientBody {
    Empty,
    H1(super::h1::body::Body),
    H2(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::H1(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(BodyError::ClientH1))),
            ClientBody::H2(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(BodyError::Client))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::H1(body) => body.is_end_stream(),
            ClientBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::H1(body) => body.size_hint(),
            ClientBody::H2(body) => body.size_hint(),
        }
    }
}

/// The request body sent upstream: the client's body with the limit and timeouts applied.
pub struct RequestBody {
    inner: Option<ClientBody>,
    /// A frame read ahead of forwarding (see `RequestBody::peek_first`).
    peeked: Option<Frame<Bytes>>,
    limit: Option<u64>,
    seen: u64,
    timers: Timers,
    progress: Option<BodyProgress>,
    /// The route whose `bytes_in` counter gets this body's size when it is dropped.
    counter: Option<Arc<RouteMetrics>>,
    /// The access-log record's request-bytes counter, kept current frame by frame.
    log_bytes: Option<Arc<AtomicU64>>,
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let (Some(counter), seen @ 1..) = (&self.counter, self.seen) {
            counter.bytes_in.fetch_add(seen, Ordering::Relaxed);
        }
    }
}

impl RequestBody {
    pub fn new(inner: ClientBody, limit: Option<u64>, timers: Timers) -> RequestBody {
        RequestBody {
            inner: Some(inner),
            peeked: None,
            limit,
            seen: 0,
            timers,
            progress: None,
            counter: None,
            log_bytes: None,
        }
    }

    /// Adds each frame's bytes to `counter` as it passes (the access log's `bytes_in`).
    pub fn report_bytes_to(mut self, counter: Arc<AtomicU64>) -> RequestBody {
        self.log_bytes = Some(counter);
        self
    }

    /// Adds the bytes this body carried to `route`'s request-bytes counter when dropped.
    pub fn count_into(mut self, route: Arc<RouteMetrics>) -> RequestBody {
        self.counter = Some(route);
        self
    }

    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            peeked: None,
            limit: None,
            seen: 0,
            timers: Timers::new(None, None),
            progress: None,
            counter: None,
            log_bytes: None,
        }
    }

    /// A buffered body sent again on a retry: one data frame, then the end.
    pub fn replay(bytes: Bytes) -> RequestBody {
        let mut body = RequestBody::empty();
        if !bytes.is_empty() {
            body.peeked = Some(Frame::data(bytes));
        }
        body
    }

    /// Reads the whole body into memory, for replay on retries, under its limit and timers.
    /// `max` bounds it: a body longer than announced fails rather than growing without end.
    pub async fn buffer(mut self, max: u64) -> Result<Bytes, BodyError> {
        let mut buffer = bytes::BytesMut::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut self).poll_frame(cx)).await
        {
            if let Ok(data) = frame?.into_data() {
                if (buffer.len() + data.len()) as u64 > max {
                    return Err(BodyError::TooLarge { limit: max });
                }
                buffer.extend_from_slice(&data);
            }
        }
        Ok(buffer.freeze())
    }

    /// Starts tracking when this body last moved a frame or ended, from now on.
    pub fn track_progress(&mut self) -> BodyProgress {
        let moves = !self.is_end_stream();
        let progress = BodyProgress::new(moves);
        if moves {
            self.progress = Some(progress.clone());
        }
        progress
    }

    fn mark_progress(&self) {
        if let Some(progress) = &self.progress {
            progress.touch();
        }
    }

    /// Reads the first frame before anything is sent upstream, so a malformed chunked body
    /// is answered with 400 instead of reaching the backend as a truncated request.
    pub async fn peek_first(&mut self) -> Result<(), BodyError> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(());
        };
        match std::future::poll_fn(|cx| Pin::new(&mut *inner).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                self.count(&frame)?;
                self.peeked = Some(frame);
            }
            Some(Err(err)) => return Err(err),
            None => self.inner = None,
        }
        Ok(())
    }

    fn count(&mut self, frame: &Frame<Bytes>) -> Result<(), BodyError> {
        if let Some(data) = frame.data_ref() {
            self.seen += data.len() as u64;
            if let Some(counter) = &self.log_bytes {
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            if let Some(limit) = self.limit {
                if self.seen > limit {
                    return Err(BodyError::TooLarge { limit });
                }
            }
        }
        Ok(())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(frame) = this.peeked.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timers.touch();
                this.mark_progress();
                if let Err(err) = this.count(&frame) {
                    this.inner = None;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                this.inner = None;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.inner = None;
                this.mark_progress();
                Poll::Ready(None)
            }
            Poll::Pending => match this.timers.poll_expired(cx) {
                Some(err) => {
                    this.inner = None;
                    Poll::Ready(Some(Err(err)))
                }
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.peeked.is_none()
            && self
                .inner
                .as_ref()
                .is_none_or(|inner| inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.peeked) {
            (None, None) => SizeHint::with_exact(0),
            (None, Some(frame)) => {
                SizeHint::with_exact(frame.data_ref().map_or(0, |data| data.len() as u64))
            }
            (Some(inner), None) => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

// Inline for the reason given at `UpstreamBody`.
#[allow(clippy::large_enum_variant)]
enum Source {
    Empty,
    Full(Option<Bytes>),
    Upstream(crate::upstream::UpstreamBody),
    /// Another response body, compressed on the way (`policy::compress`).
    Encoded(Box<crate::policy::compress::Encoder<ResponseBody>>),
}

/// The response body sent to the client.
pub struct ResponseBody {
    source: Source,
    timers: Timers,
    log: Option<LogGuard>,
    observer: Option<RequestObserver>,
    /// End a failed stream with gRPC status trailers instead of an error (a reset).
    grpc: bool,
    /// Held until the body ends: the pool's concurrency slot and the endpoint's in-flight
    /// count, so both cover the whole exchange, not just the wait for the head.
    hold: Option<Hold>,
}

/// What a forwarded response keeps until its body ends (typed: no box per request).
pub struct Hold {
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
    pub in_flight: crate::upstream::InFlight,
}

impl ResponseBody {
    pub fn empty() -> ResponseBody {
        ResponseBody {
            source: Source::Empty,
            timers: Timers::new(None, None),
            log: None,
            observer: None,
            grpc: false,
            hold: None,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        ResponseBody {
            source: Source::Full(Some(bytes.into())),
            timers: Timers::new(None, None),
            log: None,
            observer: None,
            grpc: false,
            hold: None,
        }
    }

    /// An upstream's response body under `timers`, keeping `hold` until it ends. `grpc`
    /// ends a failed stream with gRPC status trailers: once the headers are out, that is
    /// the only way left to tell a gRPC client why (a bare HTTP/2 reset reads as INTERNAL).
    pub fn upstream(
        body: crate::upstream::UpstreamBody,
        timers: Timers,
        hold: Hold,
        grpc: bool,
    ) -> ResponseBody {
        ResponseBody {
            source: Source::Upstream(body),
            timers,
            log: None,
            observer: None,
            grpc,
            hold: Some(hold),
        }
    }

    /// This body compressed with `encoding` as it streams. The inner body keeps its
    /// timers and holds; the caller attaches the log and observer to the result.
    pub fn encoded(self, encoding: crate::config::Encoding) -> ResponseBody {
        ResponseBody {
            source: Source::Encoded(Box::new(crate::policy::compress::Encoder::new(
                self, encoding,
            ))),
            timers: Timers::new(None, None),
            log: None,
            observer: None,
            grpc: false,
            hold: None,
        }
    }

    /// Attaches the request's metrics; they are recorded when this body ends or is dropped.
    /// (In place, like `set_log`: the body is large to move.)
    pub fn set_observer(&mut self, observer: RequestObserver) {
        self.observer = Some(observer);
    }

    /// Attaches the access-log record; it is written when this body ends or is dropped.
    pub fn set_log(&mut self, log: LogGuard) {
        self.log = Some(log);
    }

    fn finish(&mut self, error: Option<&BodyError>) {
        self.source = Source::Empty;
        self.observer = None;
        self.hold = None;
        if let Some(mut log) = self.log.take() {
            if let Some(error) = error {
                log.body_error(error);
            }
            drop(log);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Empty => Poll::Ready(None),
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Upstream(body) => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(BodyError::Upstream(err)))),
                Poll::Ready(other) => {
                    Poll::Ready(other.map(|frame| frame.map_err(BodyError::Upstream)))
                }
                Poll::Pending => match this.timers.poll_expired(cx) {
                    Some(err) => Poll::Ready(Some(Err(err))),
                    None => Poll::Pending,
                },
            },
            Source::Encoded(encoder) => Pin::new(encoder.as_mut()).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.timers.touch();
                if let Some(data) = frame.data_ref() {
                    let bytes = data.len() as u64;
                    if let Some(log) = this.log.as_mut() {
                        log.add_bytes_out(bytes);
                    }
                    if let Some(observer) = this.observer.as_mut() {
                        observer.add_bytes_out(bytes);
                    }
                }
                if matches!(this.source, Source::Full(None)) {
                    this.finish(None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) if this.grpc => {
                // With a request body still streaming, the same deadline may have fired on
                // the request side first and reset the upstream stream: report the cause.
                let err = if this.timers.deadline_passed() {
                    BodyError::Deadline
                } else {
                    err
                };
                this.finish(Some(&err));
                Poll::Ready(Some(Ok(Frame::trailers(super::error::grpc_trailers(err)))))
            }
            Poll::Ready(Some(Err(err))) => {
                this.finish(Some(&err));
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                this.finish(None);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Empty => true,
            Source::Full(bytes) => bytes.is_none(),
            Source::Upstream(body) => body.is_end_stream(),
            Source::Encoded(encoder) => encoder.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Empty => SizeHint::with_exact(0),
            Source::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Source::Upstream(body) => body.size_hint(),
            Source::Encoded(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves when the timers report expiry.
    async fn expiry(timers: &mut Timers) -> BodyError {
        std::future::poll_fn(|cx| match timers.poll_expired(cx) {
            Some(err) => Poll::Ready(err),
            None => Poll::Pending,
        })
        .await
    }

    // Paused time: the clock only moves when every task waits, so load on the machine
    // cannot stretch one step past the next.
    #[tokio::test(start_paused = true)]
    async fn idle_timer_counts_from_the_last_activity() {
        let period = Duration::from_millis(60);
        let mut timers = Timers::new(Some(period), None);
        let started = Instant::now();
        // Activity half-way through the first period pushes expiry out.
        let waited = tokio::time::timeout(Duration::from_millis(30), expiry(&mut timers)).await;
        assert!(waited.is_err(), "expired before the idle period");
        timers.touch();
        let touched = Instant::now();
        assert!(matches!(expiry(&mut timers).await, BodyError::IdleTimeout(p) if p == period));
        assert!(touched.elapsed() >= period);
        assert!(started.elapsed() >= period + Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_fires_regardless_of_activity() {
        let at = Instant::now() + Duration::from_millis(40);
        let mut timers = Timers::new(Some(Duration::from_secs(60)), Some(at));
        timers.touch();
        assert!(matches!(expiry(&mut timers).await, BodyError::Deadline));
        assert!(Instant::now() >= at);
        assert!(timers.deadline_passed());
    }
}
