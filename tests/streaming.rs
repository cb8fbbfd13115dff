//! Streaming through the proxy over real sockets (SPEC HTTP-1, HTTP-2, UP-9): multi-gigabyte
//! bodies in both directions with flat gateway memory, server-sent events delivered one by
//! one, HTTP/1.1 ⇄ h2c translation both ways, many concurrent streams on one HTTP/2
//! connection, full-duplex exchanges where the response starts before the request ends, and
//! slow uploads that outlast the response-header timeout.
//!
//! Nothing here sleeps to synchronise: each side waits on the other's events, and every wait
//! is bounded so a regression fails instead of hanging. (The slow-upload test paces its
//! client on purpose: elapsed time is what it is about.)
mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Barrier};

use support::{echoed_header, full, Backend, Gateway, TestBody, PATIENCE};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// SPEC HTTP-2 asks for a multi-gigabyte body; 2 GiB = 2^31 bytes also overflows any signed
/// 32-bit byte count on the way.
const BIG_BODY: u64 = 2 << 30;
const CHUNK: usize = 1 << 20;
/// Memory "stays flat": the gateway may grow by less than this while a big body passes.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;
/// Upper bound for one 2 GiB transfer, so a stalled stream fails rather than hangs.
const TRANSFER_PATIENCE: Duration = Duration::from_secs(600);
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Fails the test if `future` does not finish within `patience`.
async fn within<F: Future>(patience: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(patience, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: nothing happened within {patience:?}"),
    }
}

fn config_with_route(backend: SocketAddr) -> String {
    support::config_with_pool(&[backend], "[[routes]]\npool = \"app\"\n")
}

/// One listener `public` and one pool `app` speaking `protocol` upstream.
fn config_with_protocol(backend: SocketAddr, protocol: &str, extra_routes: &str) -> String {
    format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n\
         [[pools]]\nname = \"app\"\nprotocol = \"{protocol}\"\nendpoints = [\"{backend}\"]\n\n\
         {extra_routes}\n[[routes]]\npool = \"app\"\n"
    )
}

/// A single HTTP/1.1 client connection (hyper, no pool), so the test controls framing.
async fn http1_connection(addr: SocketAddr) -> http1::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.expect("connect to gateway");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

/// A single HTTP/2 prior-knowledge client connection: every request on it is a stream of
/// this one TCP connection, which a pooling client could not guarantee.
async fn h2c_connection(addr: SocketAddr) -> http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.expect("connect to gateway");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    tokio::spawn(connection);
    sender
}

/// `total` bytes as a stream of 1 MiB frames that all share one buffer, so the sender never
/// holds more than one chunk.
fn generated_body(total: u64) -> TestBody {
    assert_eq!(total % CHUNK as u64, 0);
    let chunk = Bytes::from((0..CHUNK).map(|i| i as u8).collect::<Vec<u8>>());
    let frames =
        (0..total / CHUNK as u64).map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone())));
    StreamBody::new(stream::iter(frames)).boxed()
}

/// Counts a body's bytes frame by frame without keeping any of them.
async fn count_bytes<B>(mut body: B) -> Result<u64, B::Error>
where
    B: hyper::body::Body + Unpin,
{
    let mut count = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            count += bytes::Buf::remaining(data) as u64;
        }
    }
    Ok(count)
}

/// A body fed by the test through a channel: each `send` becomes one frame.
fn channel_body() -> (mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let frames = stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, BoxError>(Frame::data(chunk)), rx))
    });
    (tx, StreamBody::new(frames).boxed())
}

fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

async fn read_text(body: Incoming) -> String {
    let bytes = within(PATIENCE, "response body", body.collect())
        .await
        .expect("response body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8 body")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------
// Multi-gigabyte bodies with flat memory
// ---------------------------------------------------------------------------------------

/// The protocol a test speaks on one leg of the proxy.
#[derive(Clone, Copy, Debug)]
enum Proto {
    Http1,
    H2c,
}

impl Proto {
    fn pool_protocol(self) -> &'static str {
        match self {
            Proto::Http1 => "http1",
            Proto::H2c => "h2c",
        }
    }
}

/// One client connection of either protocol.
enum Client {
    Http1(http1::SendRequest<TestBody>),
    H2c(http2::SendRequest<TestBody>, SocketAddr),
}

impl Client {
    async fn connect(proto: Proto, addr: SocketAddr) -> Client {
        match proto {
            Proto::Http1 => Client::Http1(http1_connection(addr).await),
            Proto::H2c => Client::H2c(h2c_connection(addr).await, addr),
        }
    }

    /// A request for `path`: origin-form with a Host header for HTTP/1.1, absolute-form
    /// (becoming :scheme/:authority/:path) for HTTP/2.
    fn request(&self, method: http::Method, path: &str, body: TestBody) -> Request<TestBody> {
        let builder = match self {
            Client::Http1(_) => Request::builder().uri(path).header(HOST, "streaming.test"),
            Client::H2c(_, addr) => Request::builder().uri(format!("http://{addr}{path}")),
        };
        builder.method(method).body(body).expect("request")
    }

    fn send(
        &mut self,
        request: Request<TestBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper::Error>> + 'static {
        match self {
            Client::Http1(sender) => {
                futures_util::future::Either::Left(sender.send_request(request))
            }
            Client::H2c(sender, _) => {
                futures_util::future::Either::Right(sender.send_request(request))
            }
        }
    }
}

fn report_big_transfer(what: &str, elapsed: Duration, baseline: u64, peak: u64) {
    eprintln!(
        "{what}: 2 GiB in {elapsed:.2?} ({:.0} MiB/s); gateway RSS {:.1} MiB before, \
         {:.1} MiB peak, growth {:.1} MiB",
        (BIG_BODY >> 20) as f64 / elapsed.as_secs_f64(),
        mib(baseline),
        mib(peak),
        mib(peak.saturating_sub(baseline)),
    );
}

/// Uploads `BIG_BODY` bytes generated on the fly; the backend counts them without keeping
/// them and answers with the count. The gateway's RSS is sampled throughout.
async fn big_request_body_streams_with_flat_memory(downstream: Proto, upstream: Proto) {
    let backend = Backend::start(Arc::new(|request| {
        Box::pin(async move {
            match count_bytes(request.into_body()).await {
                Ok(count) => Response::new(full(count.to_string())),
                Err(err) => {
                    let mut response = Response::new(full(format!("body error: {err}")));
                    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    response
                }
            }
        })
    }))
    .await;
    let gateway = Gateway::start(&config_with_protocol(
        backend.addr,
        upstream.pool_protocol(),
        "",
    ));
    let baseline = gateway.rss_kib();
    let sampler = gateway.sample_rss(RSS_SAMPLE_EVERY);
    let started = Instant::now();

    let mut client = Client::connect(downstream, gateway.addr("public")).await;
    let request = client.request(http::Method::POST, "/upload", generated_body(BIG_BODY));
    let response = within(TRANSFER_PATIENCE, "2 GiB upload", client.send(request))
        .await
        .expect("upload response");
    let status = response.status();
    let answer = read_text(response.into_body()).await;
    let elapsed = started.elapsed();
    let peak = sampler.stop().await;

    report_big_transfer(
        &format!("request body {downstream:?} -> {upstream:?}"),
        elapsed,
        baseline,
        peak,
    );
    assert_eq!(status, StatusCode::OK, "backend answered {answer}");
    assert_eq!(answer, BIG_BODY.to_string(), "backend byte count");
    assert!(
        peak.saturating_sub(baseline) < RSS_GROWTH_LIMIT_KIB,
        "gateway RSS grew from {baseline} KiB to {peak} KiB while streaming the request body"
    );
}

/// The backend generates `BIG_BODY` bytes on the fly (with a Content-Length); the client
/// counts them without keeping them. The gateway's RSS is sampled throughout.
async fn big_response_body_streams_with_flat_memory(downstream: Proto, upstream: Proto) {
    let backend = Backend::start(Arc::new(|_request| {
        Box::pin(async move {
            let mut response = Response::new(generated_body(BIG_BODY));
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, BIG_BODY.into());
            response
        })
    }))
    .await;
    let gateway = Gateway::start(&config_with_protocol(
        backend.addr,
        upstream.pool_protocol(),
        "",
    ));
    let baseline = gateway.rss_kib();
    let sampler = gateway.sample_rss(RSS_SAMPLE_EVERY);
    let started = Instant::now();

    let mut client = Client::connect(downstream, gateway.addr("public")).await;
    let request = client.request(http::Method::GET, "/download", empty());
    let response = within(PATIENCE, "download response head", client.send(request))
        .await
        .expect("download response");
    assert_eq!(response.status(), StatusCode::OK);
    let count = within(
        TRANSFER_PATIENCE,
        "2 GiB download",
        count_bytes(response.into_body()),
    )
    .await
    .expect("download body");
    let elapsed = started.elapsed();
    let peak = sampler.stop().await;

    report_big_transfer(
        &format!("response body {upstream:?} -> {downstream:?}"),
        elapsed,
        baseline,
        peak,
    );
    assert_eq!(count, BIG_BODY, "client byte count");
    assert!(
        peak.saturating_sub(baseline) < RSS_GROWTH_LIMIT_KIB,
        "gateway RSS grew from {baseline} KiB to {peak} KiB while streaming the response body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_request_body_streams_over_http1_with_flat_gateway_memory() {
    big_request_body_streams_with_flat_memory(Proto::Http1, Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_request_body_streams_over_h2c_with_flat_gateway_memory() {
    big_request_body_streams_with_flat_memory(Proto::H2c, Proto::H2c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_response_body_streams_over_http1_with_flat_gateway_memory() {
    big_response_body_streams_with_flat_memory(Proto::Http1, Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_response_body_streams_over_h2c_with_flat_gateway_memory() {
    big_response_body_streams_with_flat_memory(Proto::H2c, Proto::H2c).await;
}

// ---------------------------------------------------------------------------------------
// Server-sent events are not batched
// ---------------------------------------------------------------------------------------

const EVENTS: usize = 5;

fn sse_event(index: usize) -> String {
    format!("id: {index}\nevent: tick\ndata: event number {index}\n\n")
}

/// A backend that sends one event, then waits for the test's acknowledgement (sent only
/// after the event came out of the gateway) before sending the next. If the gateway held
/// events back, the first one would never arrive and the exchange would stall.
async fn sse_backend() -> (Backend, mpsc::Sender<()>) {
    let (ack_tx, ack_rx) = mpsc::channel::<()>(1);
    let acks = Arc::new(Mutex::new(Some(ack_rx)));
    let backend = Backend::start(Arc::new(move |_request| {
        let acks = acks.lock().expect("acks lock").take();
        Box::pin(async move {
            let Some(acks) = acks else {
                let mut response = Response::new(full("only one event stream per test"));
                *response.status_mut() = StatusCode::CONFLICT;
                return response;
            };
            let events = stream::unfold((0, acks), |(index, mut acks)| async move {
                // Every event, the last included, waits for its acknowledgement first.
                if (index > 0 && acks.recv().await.is_none()) || index == EVENTS {
                    return None;
                }
                let frame = Frame::data(Bytes::from(sse_event(index)));
                Some((Ok::<_, BoxError>(frame), (index + 1, acks)))
            });
            let mut response = Response::new(StreamBody::new(events).boxed());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, "text/event-stream".parse().expect("value"));
            response
        })
    }))
    .await;
    (backend, ack_tx)
}

async fn assert_events_arrive_one_by_one(client: reqwest::Client, expect_version: Version) {
    let (backend, ack) = sse_backend().await;
    let gateway = Gateway::start(&config_with_route(backend.addr));
    let mut response = within(
        PATIENCE,
        "event stream head",
        client.get(gateway.url("public", "/events")).send(),
    )
    .await
    .expect("event stream request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), expect_version);
    assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");

    let mut pending = BytesMut::new();
    for index in 0..EVENTS {
        // Read until one whole event (terminated by a blank line) is in hand.
        let event = loop {
            if let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                break pending.split_to(end + 2);
            }
            let chunk = within(PATIENCE, &format!("event {index}"), response.chunk())
                .await
                .expect("event stream chunk")
                .unwrap_or_else(|| panic!("stream ended before event {index}"));
            pending.extend_from_slice(&chunk);
        };
        assert_eq!(
            std::str::from_utf8(&event).expect("utf-8"),
            sse_event(index)
        );
        // The backend cannot have produced more than this event yet.
        assert!(pending.is_empty(), "unexpected bytes after event {index}");
        ack.send(()).await.expect("backend still waiting for acks");
    }
    // HTTP/2 may close the stream with an empty DATA frame; no event data may follow.
    while let Some(tail) = within(PATIENCE, "end of event stream", response.chunk())
        .await
        .expect("event stream end")
    {
        assert!(tail.is_empty(), "bytes after the last event: {tail:?}");
    }
    assert_eq!(backend.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_one_by_one_over_http1() {
    assert_events_arrive_one_by_one(support::http1_client(), Version::HTTP_11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_one_by_one_over_h2c() {
    assert_events_arrive_one_by_one(support::h2c_client(), Version::HTTP_2).await;
}

// ---------------------------------------------------------------------------------------
// Any downstream protocol meets any upstream protocol
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_client_reaches_http1_backend_with_the_client_authority_as_host() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_route(backend.addr));
    let port = gateway.addr("public").port();
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .resolve("app.test", gateway.addr("public"))
        .build()
        .expect("client");
    let response = client
        .post(format!("http://app.test:{port}/h2-to-h1?q=1"))
        .body("hello")
        .send()
        .await
        .expect("request");
    assert_eq!(response.version(), Version::HTTP_2, "downstream leg is h2c");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-backend"], "echo");
    let answer: serde_json::Value = response.json().await.expect("echo json");
    assert_eq!(answer["version"], "HTTP/1.1", "upstream leg is HTTP/1.1");
    assert_eq!(answer["method"], "POST");
    assert_eq!(
        answer["uri"], "/h2-to-h1?q=1",
        "origin-form target upstream"
    );
    assert_eq!(
        echoed_header(&answer, "host"),
        vec![format!("app.test:{port}")],
        ":authority becomes exactly one Host header"
    );
    assert_eq!(answer["body_len"], 5);
}

#[tokio::test]
async fn http1_client_reaches_h2c_backend_with_configured_authority() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_protocol(
        backend.addr,
        "h2c",
        "[[routes]]\nname = \"rewritten\"\nmatch = { path_prefix = \"/rewritten\" }\n\
         pool = \"app\"\nhost_rewrite = \"api.internal\"\n",
    ));
    let port = gateway.addr("public").port();
    let client = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .resolve("app.test", gateway.addr("public"))
        .build()
        .expect("client");

    for (path, authority) in [
        ("/preserved/x?q=1", format!("app.test:{port}")),
        ("/rewritten/y?q=2", "api.internal".to_string()),
    ] {
        let response = client
            .post(format!("http://app.test:{port}{path}"))
            .body("hello")
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.version(),
            Version::HTTP_11,
            "downstream leg is HTTP/1.1"
        );
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let answer: serde_json::Value = response.json().await.expect("echo json");
        assert_eq!(
            answer["version"], "HTTP/2.0",
            "upstream leg is h2c for {path}"
        );
        let uri: http::Uri = answer["uri"].as_str().expect("uri").parse().expect("uri");
        assert_eq!(uri.scheme_str(), Some("http"), "{path}");
        assert_eq!(
            uri.authority().map(|a| a.as_str()),
            Some(authority.as_str()),
            ":authority for {path}"
        );
        assert_eq!(uri.path_and_query().map(|pq| pq.as_str()), Some(path));
        // RFC 9113 §8.3.1: a Host header next to :authority must carry the same value.
        for host in echoed_header(&answer, "host") {
            assert_eq!(host, authority, "Host header for {path}");
        }
        assert_eq!(answer["body_len"], 5);
    }
    assert_eq!(backend.count(), 2);
}

// ---------------------------------------------------------------------------------------
// Many concurrent streams on one client connection
// ---------------------------------------------------------------------------------------

const STREAMS: usize = 100;

/// Sends `STREAMS` requests as concurrent streams of ONE h2c connection. The backend holds
/// every request until all of them are in flight at once, so the test can only pass if the
/// gateway forwards the streams concurrently (serialising them would stall at the barrier).
async fn concurrent_streams_on_one_connection(upstream_protocol: &str) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(Barrier::new(STREAMS));
    let backend = {
        let (in_flight, max_in_flight) = (in_flight.clone(), max_in_flight.clone());
        Backend::start(Arc::new(move |request| {
            let (in_flight, max_in_flight, all_in) =
                (in_flight.clone(), max_in_flight.clone(), all_in.clone());
            Box::pin(async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max_in_flight.fetch_max(now, Ordering::SeqCst);
                all_in.wait().await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let stream_id = request
                    .headers()
                    .get("x-stream")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                let answer = format!(
                    "{} {stream_id} {:?}",
                    request.uri().path(),
                    request.version()
                );
                Response::new(full(answer))
            })
        }))
        .await
    };
    let gateway = Gateway::start(&config_with_protocol(backend.addr, upstream_protocol, ""));
    let addr = gateway.addr("public");
    let sender = h2c_connection(addr).await;

    let mut tasks = Vec::new();
    for index in 0..STREAMS {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let request = Request::get(format!("http://{addr}/item/{index}"))
                .header("x-stream", index.to_string())
                .body(empty())
                .expect("request");
            // Errors go back to the test task, so a failure reports once, not per stream.
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        }));
    }
    let expected_version = match upstream_protocol {
        "h2c" => Version::HTTP_2,
        _ => Version::HTTP_11,
    };
    for (index, task) in tasks.into_iter().enumerate() {
        let (status, answer) = within(PATIENCE, &format!("stream {index}"), task)
            .await
            .expect("stream task")
            .unwrap_or_else(|err| panic!("stream {index} failed: {err}"));
        assert_eq!(status, StatusCode::OK, "stream {index}: {answer}");
        assert_eq!(
            answer,
            format!("/item/{index} {index} {expected_version:?}")
        );
    }
    assert_eq!(backend.count(), STREAMS);
    assert_eq!(
        max_in_flight.load(Ordering::SeqCst),
        STREAMS,
        "every stream was at the backend at the same time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_on_one_h2c_connection_to_http1_backend() {
    concurrent_streams_on_one_connection("http1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_on_one_h2c_connection_to_h2c_backend() {
    concurrent_streams_on_one_connection("h2c").await;
}

// ---------------------------------------------------------------------------------------
// Full duplex
// ---------------------------------------------------------------------------------------

const DUPLEX_ROUNDS: usize = 8;

fn duplex_chunk(round: usize) -> Bytes {
    Bytes::from(format!("round {round:02};").repeat(64 * (round + 1)))
}

/// A backend that answers at once and echoes each request chunk as it arrives.
async fn streaming_echo_backend() -> Backend {
    Backend::start(Arc::new(|request: Request<Incoming>| {
        Box::pin(async move {
            let echo = request.into_body().map_err(BoxError::from).boxed();
            Response::new(echo)
        })
    }))
    .await
}

/// Sends one chunk, waits until its echo came back through the gateway, then sends the
/// next: only possible if the response streams while the request body is still open.
async fn assert_full_duplex(downstream: Proto, upstream: Proto) {
    let backend = streaming_echo_backend().await;
    let gateway = Gateway::start(&config_with_protocol(
        backend.addr,
        upstream.pool_protocol(),
        "",
    ));
    let mut client = Client::connect(downstream, gateway.addr("public")).await;
    let (body, request_body) = channel_body();
    let request = client.request(http::Method::POST, "/duplex", request_body);
    // The first chunk is queued before the request goes out; the rest wait for echoes.
    body.send(duplex_chunk(0)).await.expect("queue first chunk");
    let response = within(
        PATIENCE,
        "response head before the request body ended",
        client.send(request),
    )
    .await
    .expect("duplex response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut echo = response.into_body();
    for round in 0..DUPLEX_ROUNDS {
        if round > 0 {
            body.send(duplex_chunk(round)).await.expect("send chunk");
        }
        let expected = duplex_chunk(round);
        let mut received = BytesMut::new();
        while received.len() < expected.len() {
            let frame = within(PATIENCE, &format!("echo of round {round}"), echo.frame())
                .await
                .unwrap_or_else(|| panic!("echo ended in round {round}"))
                .expect("echo frame");
            if let Some(data) = frame.data_ref() {
                received.extend_from_slice(data);
            }
        }
        assert_eq!(received.freeze(), expected, "echo of round {round}");
    }
    // Ending the request body ends the echo, with nothing after the last chunk.
    drop(body);
    let rest = within(PATIENCE, "end of echo", echo.collect())
        .await
        .expect("echo end")
        .to_bytes();
    assert!(rest.is_empty(), "bytes after the last echo: {rest:?}");
    assert_eq!(backend.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_over_http1_response_streams_before_request_body_ends() {
    assert_full_duplex(Proto::Http1, Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_over_h2c_response_streams_before_request_body_ends() {
    assert_full_duplex(Proto::H2c, Proto::H2c).await;
}

// ---------------------------------------------------------------------------------------
// Slow uploads and the response-header timeout
// ---------------------------------------------------------------------------------------

/// A slow client's upload may outlast `timeouts.response_header`: like nginx's
/// `proxy_read_timeout` and Envoy's route timeout, that clock waits for the backend only once
/// the whole request body has been sent (the idle timeout guards a stalled upload).
async fn upload_slower_than_response_header_timeout(downstream: Proto, upstream: Proto) {
    const CHUNKS: usize = 30;
    const CHUNK_BYTES: usize = 4096;
    // The client sends a chunk every PACE, so the upload lasts 3 s against a 1 s timeout.
    const PACE: Duration = Duration::from_millis(100);
    let backend = Backend::start(Arc::new(|request| {
        Box::pin(async move {
            let count = count_bytes(request.into_body()).await.unwrap_or(0);
            Response::new(full(count.to_string()))
        })
    }))
    .await;
    let gateway = Gateway::start(&format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n\
         [[pools]]\nname = \"app\"\nprotocol = \"{}\"\nendpoints = [\"{}\"]\n\n\
         [[routes]]\npool = \"app\"\ntimeouts = {{ response_header = \"1s\" }}\n",
        upstream.pool_protocol(),
        backend.addr
    ));
    let mut client = Client::connect(downstream, gateway.addr("public")).await;
    let (body, request_body) = channel_body();
    let request = client.request(http::Method::POST, "/slow-upload", request_body);
    let response = client.send(request);
    let started = Instant::now();
    let feeder = tokio::spawn(async move {
        for _ in 0..CHUNKS {
            if body
                .send(Bytes::from(vec![b'u'; CHUNK_BYTES]))
                .await
                .is_err()
            {
                return;
            }
            // Not synchronisation: this models a slow client on a slow link.
            tokio::time::sleep(PACE).await;
        }
    });
    let response = within(PATIENCE, "slow upload response", response)
        .await
        .expect("slow upload response");
    let elapsed = started.elapsed();
    let status = response.status();
    let answer = read_text(response.into_body()).await;
    feeder.await.expect("feeder task");
    assert_eq!(status, StatusCode::OK, "after {elapsed:?}: {answer}");
    assert_eq!(answer, (CHUNKS * CHUNK_BYTES).to_string());
    assert!(
        elapsed >= PACE * CHUNKS as u32,
        "the upload really outlasted the timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_slower_than_response_header_timeout_completes_over_http1() {
    upload_slower_than_response_header_timeout(Proto::Http1, Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_slower_than_response_header_timeout_completes_over_h2c() {
    upload_slower_than_response_header_timeout(Proto::H2c, Proto::H2c).await;
}

/// The other side of the same timer: an upstream that stops reading the body (and never
/// answers) still gets the request a 504 once the body has made no progress for
/// `timeouts.response_header`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_the_upstream_stops_reading_times_out_with_504() {
    let backend = Backend::start(Arc::new(|request| {
        Box::pin(async move {
            // Hold the request without reading its body or answering.
            let _request = request;
            futures_util::future::pending::<Response<TestBody>>().await
        })
    }))
    .await;
    let gateway = Gateway::start(&format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n\
         [[pools]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n\
         [[routes]]\npool = \"app\"\ntimeouts = {{ response_header = \"1s\" }}\n",
        backend.addr
    ));
    // h2c downstream: the 504 arrives on its stream while the client is still sending.
    let mut client = Client::connect(Proto::H2c, gateway.addr("public")).await;
    let request = client.request(http::Method::POST, "/stalled", generated_body(BIG_BODY));
    let started = Instant::now();
    let response = within(
        PATIENCE,
        "response to a stalled upload",
        client.send(request),
    )
    .await
    .expect("stalled upload response");
    let elapsed = started.elapsed();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    let answer = read_text(response.into_body()).await;
    assert!(answer.contains("upstream_timeout"), "{answer}");
    assert!(
        elapsed >= Duration::from_secs(1),
        "timed out after {elapsed:?}"
    );
}
