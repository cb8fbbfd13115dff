//! gRPC through the gateway (SPEC HTTP-3, HTTP-4, HTTP-11): a real tonic client speaks h2c to
//! the real gateway binary, which forwards to a real tonic h2c backend.
//!
//! There is no `protoc` here, so the protobuf messages and the service are written by hand in
//! the shape `tonic-build` generates: prost-derived messages, a server that dispatches on the
//! path to `tonic::server::Grpc`, and a client over `tonic::client::Grpc`.
mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::client::GrpcService;
use tonic::codegen::{Body, BoxFuture, BoxStream, Bytes, Service, StdError};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, IntoRequest, IntoStreamingRequest, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use support::{Gateway, PATIENCE};

/// The messages `gatehouse/test/echo.proto` would generate.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EchoRequest {
        #[prost(string, tag = "1")]
        pub message: String,
        #[prost(bytes = "vec", tag = "2")]
        pub payload: Vec<u8>,
        /// How many replies `Count` streams back.
        #[prost(uint32, tag = "3")]
        pub count: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EchoReply {
        #[prost(string, tag = "1")]
        pub message: String,
        #[prost(bytes = "vec", tag = "2")]
        pub payload: Vec<u8>,
        #[prost(uint32, tag = "3")]
        pub index: u32,
    }
}

use proto::{EchoReply, EchoRequest};

const UNARY: &str = "/gatehouse.test.Echo/Unary";
const COUNT: &str = "/gatehouse.test.Echo/Count";
const COLLECT: &str = "/gatehouse.test.Echo/Collect";
const CHAT: &str = "/gatehouse.test.Echo/Chat";

/// Above tonic's 4 MiB default so the large-message test can pass 8 MiB each way.
const MAX_MESSAGE: usize = 16 << 20;

/// A route that sends the whole test service to pool `app`, spoken to over h2c.
const ROUTE_TO_ECHO: &str =
    "protocol = \"h2c\"\n\n[[routes]]\nmatch.path_prefix = \"/gatehouse.test.Echo\"\npool = \"app\"\n";

// ---------------------------------------------------------------------------------------
// Backend: the service implementation and the tonic server that runs it.
// ---------------------------------------------------------------------------------------

/// The test service. `Unary` echoes (or fails with NOT_FOUND for message "missing"), `Count`
/// streams `count` replies (then ends in ABORTED for message "fail", or stays open and silent
/// for message "stall"), `Collect` joins a client stream, `Chat` answers each message as it
/// arrives.
#[derive(Clone, Default)]
struct Echo {
    /// How long `Unary` waits before answering: the slow backend of the deadline test.
    delay: Duration,
}

impl Echo {
    async fn unary(self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let metadata = request.metadata().clone();
        let request = request.into_inner();
        if request.message == "missing" {
            let mut trailers = MetadataMap::new();
            trailers.insert(
                "x-trailer-note",
                MetadataValue::from_static("looked everywhere"),
            );
            trailers.insert_bin(
                "x-detail-bin",
                MetadataValue::from_bytes(&[0, 1, 0xfe, 0xff]),
            );
            return Err(Status::with_metadata(
                Code::NotFound,
                "no such thing",
                trailers,
            ));
        }
        let mut response = Response::new(EchoReply {
            message: request.message,
            payload: request.payload,
            index: 0,
        });
        let out = response.metadata_mut();
        out.insert("x-server-tag", MetadataValue::from_static("from-backend"));
        // Echo what the client sent so the test sees it crossed the gateway intact.
        if let Some(tag) = metadata.get("x-client-tag") {
            out.insert("x-echo-tag", tag.clone());
        }
        if let Some(bin) = metadata.get_bin("x-client-bin") {
            out.insert_bin("x-echo-bin", bin.clone());
        }
        if let Some(timeout) = metadata.get("grpc-timeout") {
            out.insert("x-seen-grpc-timeout", timeout.clone());
        }
        Ok(response)
    }

    async fn count(
        request: Request<EchoRequest>,
    ) -> Result<Response<BoxStream<EchoReply>>, Status> {
        let request = request.into_inner();
        let fail = request.message == "fail";
        let stall = request.message == "stall";
        let message = request.message;
        let replies = tokio_stream::iter(0..request.count).map(move |index| {
            Ok(EchoReply {
                message: message.clone(),
                payload: Vec::new(),
                index,
            })
        });
        let end = fail.then(|| {
            let mut trailers = MetadataMap::new();
            trailers.insert("x-trailer-note", MetadataValue::from_static("gave up"));
            Err(Status::with_metadata(
                Code::Aborted,
                "stream gave up",
                trailers,
            ))
        });
        let stream: BoxStream<EchoReply> = if stall {
            Box::pin(replies.chain(tokio_stream::pending()))
        } else {
            Box::pin(replies.chain(tokio_stream::iter(end)))
        };
        Ok(Response::new(stream))
    }

    async fn collect(
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let mut inbound = request.into_inner();
        let mut parts = Vec::new();
        while let Some(message) = inbound.message().await? {
            parts.push(message.message);
        }
        Ok(Response::new(EchoReply {
            index: parts.len() as u32,
            message: parts.join(","),
            payload: Vec::new(),
        }))
    }

    async fn chat(
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<BoxStream<EchoReply>>, Status> {
        let replies = request.into_inner().map(|message| {
            message.map(|message| EchoReply {
                message: format!("echo:{}", message.message),
                payload: Vec::new(),
                index: message.count,
            })
        });
        let stream: BoxStream<EchoReply> = Box::pin(replies);
        Ok(Response::new(stream))
    }
}

/// Adapts an async fn to the `tower::Service` shape tonic's method traits are implemented
/// for (generated code writes one struct per method instead).
struct Method<F>(F);

impl<F, Fut, Req, Res> Service<Req> for Method<F>
where
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Res, Status>>,
{
    type Response = Res;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Fut {
        (self.0)(request)
    }
}

/// The HTTP-level service, as `tonic-build` would generate `EchoServer`.
impl<B> Service<http::Request<B>> for Echo
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let echo = self.clone();
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
            let path = request.uri().path().to_owned();
            let response = match path.as_str() {
                UNARY => {
                    let method = Method(move |r: Request<EchoRequest>| echo.clone().unary(r));
                    grpc.unary(method, request).await
                }
                COUNT => grpc.server_streaming(Method(Echo::count), request).await,
                COLLECT => grpc.client_streaming(Method(Echo::collect), request).await,
                CHAT => grpc.streaming(Method(Echo::chat), request).await,
                _ => Status::unimplemented(format!("backend has no method {path}")).into_http(),
            };
            Ok(response)
        })
    }
}

/// The service under `tonic::transport::Server` (h2c) on 127.0.0.1:0.
struct TonicBackend {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TonicBackend {
    async fn start(echo: Echo) -> TonicBackend {
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind backend")
            .with_nodelay(Some(true));
        let addr = incoming.local_addr().expect("backend address");
        let task = tokio::spawn(async move {
            if let Err(err) = Server::builder().serve_with_incoming(echo, incoming).await {
                panic!("tonic backend failed: {err}");
            }
        });
        TonicBackend { addr, task }
    }

    /// The same service without tonic's transport. `tonic::transport::Server` enforces the
    /// request's `grpc-timeout` itself (answering CANCELLED), which would race the gateway's
    /// own deadline; a backend that ignores the deadline makes the gateway the only party
    /// that can end the call, so the test shows that the gateway honours it.
    async fn start_ignoring_deadlines(echo: Echo) -> TonicBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let echo = echo.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            Service::call(&mut echo.clone(), request)
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TonicBackend { addr, task }
    }
}

impl Drop for TonicBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Client: what `tonic-build` would generate as `EchoClient`.
// ---------------------------------------------------------------------------------------

struct EchoClient<T> {
    grpc: tonic::client::Grpc<T>,
}

impl EchoClient<Channel> {
    /// A tonic `Channel` speaking HTTP/2 with prior knowledge to `addr`.
    async fn connect(addr: SocketAddr) -> EchoClient<Channel> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to the gateway");
        EchoClient::new(tonic::client::Grpc::new(channel))
    }
}

type HyperClient = hyper_util::client::legacy::Client<HttpConnector, tonic::body::Body>;

impl EchoClient<HyperClient> {
    /// The tonic client over a plain hyper h2c client. A tonic `Channel` enforces the
    /// request's `grpc-timeout` locally (answering CANCELLED before the gateway can answer);
    /// this transport leaves the deadline to the gateway, which is what the test is about.
    fn without_local_deadline(addr: SocketAddr) -> EchoClient<HyperClient> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        let origin = format!("http://{addr}").parse().expect("origin");
        EchoClient::new(tonic::client::Grpc::with_origin(client, origin))
    }
}

impl<T> EchoClient<T>
where
    T: GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    fn new(grpc: tonic::client::Grpc<T>) -> EchoClient<T> {
        EchoClient {
            grpc: grpc
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        }
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|err| Status::unknown(format!("service not ready: {}", err.into())))
    }

    async fn unary(
        &mut self,
        request: impl IntoRequest<EchoRequest>,
    ) -> Result<Response<EchoReply>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(UNARY);
        self.grpc
            .unary(request.into_request(), path, ProstCodec::default())
            .await
    }

    async fn count(
        &mut self,
        request: impl IntoRequest<EchoRequest>,
    ) -> Result<Response<Streaming<EchoReply>>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(COUNT);
        self.grpc
            .server_streaming(request.into_request(), path, ProstCodec::default())
            .await
    }

    async fn collect(
        &mut self,
        request: impl IntoStreamingRequest<Message = EchoRequest>,
    ) -> Result<Response<EchoReply>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(COLLECT);
        self.grpc
            .client_streaming(
                request.into_streaming_request(),
                path,
                ProstCodec::default(),
            )
            .await
    }

    async fn chat(
        &mut self,
        request: impl IntoStreamingRequest<Message = EchoRequest>,
    ) -> Result<Response<Streaming<EchoReply>>, Status> {
        self.ready().await?;
        let path = PathAndQuery::from_static(CHAT);
        self.grpc
            .streaming(
                request.into_streaming_request(),
                path,
                ProstCodec::default(),
            )
            .await
    }
}

fn text(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..EchoRequest::default()
    }
}

/// Fails the test instead of hanging when something that should arrive promptly does not.
async fn promptly<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A tonic backend and a gateway routing the test service to it, with a client connected to
/// the gateway.
async fn echo_through_gateway() -> (TonicBackend, Gateway, EchoClient<Channel>) {
    let backend = TonicBackend::start(Echo::default()).await;
    let gateway = Gateway::start(&support::config_with_pool(&[backend.addr], ROUTE_TO_ECHO));
    let client = EchoClient::connect(gateway.addr("public")).await;
    (backend, gateway, client)
}

// ---------------------------------------------------------------------------------------
// The four call kinds.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn unary_call_round_trips() {
    let (_backend, gateway, mut client) = echo_through_gateway().await;
    let reply = promptly("unary reply", client.unary(text("hello")))
        .await
        .expect("unary call");
    assert_eq!(reply.get_ref().message, "hello");
    assert_eq!(
        reply.metadata().get("x-server-tag").unwrap(),
        "from-backend"
    );
    let line = gateway.wait_access_log(|line| line["path"] == UNARY);
    assert_eq!(line["status"], 200);
    assert_eq!(line["protocol"], "HTTP/2");
}

#[tokio::test]
async fn server_streaming_delivers_every_message_then_ok() {
    let (_backend, _gateway, mut client) = echo_through_gateway().await;
    let request = EchoRequest {
        message: "tick".into(),
        count: 5,
        ..EchoRequest::default()
    };
    let mut replies = promptly("stream head", client.count(request))
        .await
        .expect("server-streaming call")
        .into_inner();
    for expected in 0..5 {
        let reply = promptly("stream message", replies.message())
            .await
            .expect("stream message")
            .expect("stream ended early");
        assert_eq!((reply.message.as_str(), reply.index), ("tick", expected));
    }
    // End of stream with an OK status in the trailers.
    let end = promptly("stream end", replies.message()).await;
    assert!(
        matches!(end, Ok(None)),
        "stream should end cleanly: {end:?}"
    );
}

#[tokio::test]
async fn client_streaming_collects_every_message() {
    let (_backend, _gateway, mut client) = echo_through_gateway().await;
    let outbound = tokio_stream::iter(["a", "b", "c", "d"].map(text));
    let reply = promptly("client-streaming reply", client.collect(outbound))
        .await
        .expect("client-streaming call")
        .into_inner();
    assert_eq!(reply.message, "a,b,c,d");
    assert_eq!(reply.index, 4);
}

/// Each message is sent only after the reply to the previous one has arrived, so the call
/// can only progress if the gateway forwards every message as it comes, both ways.
#[tokio::test]
async fn bidirectional_streaming_is_interleaved_not_buffered() {
    let (_backend, _gateway, mut client) = echo_through_gateway().await;
    let (outbound, receiver) = tokio::sync::mpsc::channel(1);
    let message = |index: u32| EchoRequest {
        message: format!("m{index}"),
        count: index,
        ..EchoRequest::default()
    };
    outbound
        .send(message(0))
        .await
        .expect("queue first message");
    let mut replies = promptly("chat head", client.chat(ReceiverStream::new(receiver)))
        .await
        .expect("bidi call")
        .into_inner();
    for index in 0..6 {
        if index > 0 {
            outbound.send(message(index)).await.expect("send message");
        }
        let reply = promptly("chat reply", replies.message())
            .await
            .expect("chat reply")
            .expect("chat ended early");
        assert_eq!(reply.message, format!("echo:m{index}"));
        assert_eq!(reply.index, index);
    }
    drop(outbound);
    let end = promptly("chat end", replies.message()).await;
    assert!(matches!(end, Ok(None)), "chat should end cleanly: {end:?}");
}

// ---------------------------------------------------------------------------------------
// Status, trailers and metadata.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn backend_status_and_trailer_metadata_reach_the_client() {
    let (_backend, _gateway, mut client) = echo_through_gateway().await;

    // An error before any message: a trailers-only response.
    let status = promptly("unary error", client.unary(text("missing")))
        .await
        .expect_err("backend answers NOT_FOUND");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such thing");
    assert_eq!(
        status.metadata().get("x-trailer-note").unwrap(),
        "looked everywhere"
    );
    assert_eq!(
        status
            .metadata()
            .get_bin("x-detail-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        &[0, 1, 0xfe, 0xff][..]
    );

    // An error after messages: the status travels in real HTTP/2 trailers.
    let request = EchoRequest {
        message: "fail".into(),
        count: 2,
        ..EchoRequest::default()
    };
    let mut replies = promptly("stream head", client.count(request))
        .await
        .expect("server-streaming call")
        .into_inner();
    for expected in 0..2 {
        let reply = promptly("stream message", replies.message())
            .await
            .expect("stream message")
            .expect("stream ended early");
        assert_eq!(reply.index, expected);
    }
    let status = promptly("stream end", replies.message())
        .await
        .expect_err("stream ends with ABORTED");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(status.message(), "stream gave up");
    assert_eq!(status.metadata().get("x-trailer-note").unwrap(), "gave up");
}

#[tokio::test]
async fn custom_metadata_passes_both_ways() {
    let (_backend, _gateway, mut client) = echo_through_gateway().await;
    let mut request = text("meta").into_request();
    request
        .metadata_mut()
        .insert("x-client-tag", MetadataValue::from_static("tag-42"));
    request
        .metadata_mut()
        .insert_bin("x-client-bin", MetadataValue::from_bytes(b"\x00bin\xff"));
    // Long enough that the tonic channel's own timer never fires.
    request.set_timeout(Duration::from_secs(60));
    let reply = promptly("unary reply", client.unary(request))
        .await
        .expect("unary call");
    let metadata = reply.metadata();
    assert_eq!(metadata.get("x-echo-tag").unwrap(), "tag-42");
    assert_eq!(
        metadata.get_bin("x-echo-bin").unwrap().to_bytes().unwrap(),
        &b"\x00bin\xff"[..]
    );
    assert_eq!(metadata.get("x-server-tag").unwrap(), "from-backend");
    // The deadline travels on, so the backend can give up when the client has.
    let seen = metadata
        .get("x-seen-grpc-timeout")
        .expect("backend saw grpc-timeout")
        .to_str()
        .unwrap();
    assert!(
        seen.ends_with(['H', 'M', 'S', 'm', 'u', 'n']),
        "grpc-timeout {seen:?}"
    );
    assert!(metadata.get("x-request-id").is_some());
}

// ---------------------------------------------------------------------------------------
// Failures made by the gateway arrive as gRPC statuses.
// ---------------------------------------------------------------------------------------

/// tonic also turns a plain HTTP error page into a status (404 → UNIMPLEMENTED, 502 →
/// UNAVAILABLE, with a message about the missing `grpc-status`), so the code alone proves
/// little: the gateway's own message and request id must arrive in the status, which only
/// a trailers-only gRPC response carries, and the access log must show the same failure.
fn assert_gateway_status(gateway: &Gateway, status: &Status, code: Code, message: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().starts_with(message),
        "expected the gateway's message {message:?}: {status:?}"
    );
    let request_id = status
        .metadata()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("gateway errors carry the request id: {status:?}"))
        .to_str()
        .expect("ASCII request id");
    let line = gateway.wait_access_log(|line| line["request_id"] == request_id);
    assert_eq!(line["path"], UNARY);
    let error = line["error"].as_str().unwrap_or_default();
    assert!(error.starts_with(message), "logged error {error:?}");
}

#[tokio::test]
async fn no_route_is_unimplemented() {
    let backend = TonicBackend::start(Echo::default()).await;
    let gateway = Gateway::start(&support::config_with_pool(
        &[backend.addr],
        "protocol = \"h2c\"\n\n[[routes]]\nmatch.path_prefix = \"/some.other.Service\"\npool = \"app\"\n",
    ));
    let mut client = EchoClient::connect(gateway.addr("public")).await;
    let status = promptly("no-route answer", client.unary(text("hello")))
        .await
        .expect_err("no route");
    assert_gateway_status(
        &gateway,
        &status,
        Code::Unimplemented,
        "no route matches this request",
    );
}

#[tokio::test]
async fn backend_down_is_unavailable() {
    // A bound but never listening socket: connecting to it is refused, and the port cannot
    // be taken by anyone else while the test holds it.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let closed = socket.local_addr().expect("address");
    let gateway = Gateway::start(&support::config_with_pool(&[closed], ROUTE_TO_ECHO));
    let mut client = EchoClient::connect(gateway.addr("public")).await;
    let status = promptly("backend-down answer", client.unary(text("hello")))
        .await
        .expect_err("backend is down");
    let message = format!("connect to {closed} failed");
    assert_gateway_status(&gateway, &status, Code::Unavailable, &message);
    drop(socket);
}

#[tokio::test]
async fn grpc_timeout_shorter_than_the_backend_is_deadline_exceeded() {
    // Far longer than the client's deadline: only the gateway honouring it ends the call in
    // time, and if it does not, the call succeeds after the delay and the test fails.
    let backend = TonicBackend::start_ignoring_deadlines(Echo { delay: PATIENCE }).await;
    let gateway = Gateway::start(&support::config_with_pool(&[backend.addr], ROUTE_TO_ECHO));
    let mut client = EchoClient::without_local_deadline(gateway.addr("public"));
    let mut request = text("slow").into_request();
    request.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = tokio::time::timeout(PATIENCE * 2, client.unary(request))
        .await
        .expect("the call ends")
        .expect_err("deadline exceeded");
    assert_gateway_status(
        &gateway,
        &status,
        Code::DeadlineExceeded,
        "no response header within",
    );
    assert!(
        started.elapsed() < PATIENCE,
        "answered only after the backend: {:?}",
        started.elapsed()
    );
}

/// The call is past its response headers when the deadline passes: the gateway can no
/// longer answer with a status code, so it must end the stream with a gRPC status in the
/// trailers (an HTTP/2 reset would reach the client as INTERNAL).
#[tokio::test]
async fn grpc_timeout_mid_stream_is_deadline_exceeded() {
    let backend = TonicBackend::start_ignoring_deadlines(Echo::default()).await;
    let gateway = Gateway::start(&support::config_with_pool(&[backend.addr], ROUTE_TO_ECHO));
    let mut client = EchoClient::without_local_deadline(gateway.addr("public"));
    // One reply, then the backend's stream stays open and silent.
    let mut request = EchoRequest {
        message: "stall".into(),
        count: 1,
        ..EchoRequest::default()
    }
    .into_request();
    request.set_timeout(Duration::from_secs(1));
    let mut replies = promptly("stream head", client.count(request))
        .await
        .expect("server-streaming call")
        .into_inner();
    let first = promptly("first message", replies.message()).await;
    assert!(matches!(first, Ok(Some(_))), "{first:?}");
    let status = promptly("stream end", replies.message())
        .await
        .expect_err("the deadline ends the stream");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().starts_with("request deadline reached"),
        "{status:?}"
    );
}

/// As above with the client's request stream still open, so the deadline fires on both
/// directions at once; the status must still name the deadline.
#[tokio::test]
async fn grpc_timeout_mid_bidi_stream_is_deadline_exceeded() {
    let backend = TonicBackend::start_ignoring_deadlines(Echo::default()).await;
    let gateway = Gateway::start(&support::config_with_pool(&[backend.addr], ROUTE_TO_ECHO));
    let mut client = EchoClient::without_local_deadline(gateway.addr("public"));
    let (outbound, receiver) = tokio::sync::mpsc::channel(1);
    outbound.send(text("one")).await.expect("queue message");
    let mut request = ReceiverStream::new(receiver).into_streaming_request();
    request.set_timeout(Duration::from_secs(1));
    let mut replies = promptly("chat head", client.chat(request))
        .await
        .expect("bidi call")
        .into_inner();
    let first = promptly("chat reply", replies.message()).await;
    assert!(matches!(first, Ok(Some(_))), "{first:?}");
    let status = promptly("chat end", replies.message())
        .await
        .expect_err("the deadline ends the call");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(outbound);
}

/// A backend that fails mid-stream (resets it after one message) is an upstream failure the
/// client learns as UNAVAILABLE, the gRPC form of 502, not as INTERNAL. tonic cannot be made
/// to reset a stream on purpose, so this backend is plain hyper speaking gRPC framing.
#[tokio::test]
async fn upstream_reset_mid_stream_is_unavailable() {
    let (fail, failed) = tokio::sync::oneshot::channel::<()>();
    let failed = Arc::new(Mutex::new(Some(failed)));
    let backend = support::Backend::start(Arc::new(move |_request| {
        let failed = failed.lock().unwrap().take();
        Box::pin(async move {
            let reply = EchoReply {
                message: "before the crash".into(),
                ..EchoReply::default()
            };
            let encoded = prost::Message::encode_to_vec(&reply);
            let mut message = vec![0];
            message.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
            message.extend_from_slice(&encoded);
            let first = futures_util::stream::once(async move {
                Ok::<_, StdError>(Frame::data(Bytes::from(message)))
            });
            // Fail only once the client has the first message, so it is not lost to the reset.
            let crash = futures_util::stream::once(async move {
                if let Some(failed) = failed {
                    let _ = failed.await;
                }
                Err::<Frame<Bytes>, _>(StdError::from("backend crashed"))
            });
            let body = BodyExt::boxed(StreamBody::new(first.chain(crash)));
            let mut response = http::Response::new(body);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        })
    }))
    .await;
    let gateway = Gateway::start(&support::config_with_pool(&[backend.addr], ROUTE_TO_ECHO));
    let mut client = EchoClient::connect(gateway.addr("public")).await;
    let mut replies = promptly("stream head", client.count(text("crash")))
        .await
        .expect("server-streaming call")
        .into_inner();
    let first = promptly("first message", replies.message())
        .await
        .expect("first message")
        .expect("a message before the crash");
    assert_eq!(first.message, "before the crash");
    fail.send(()).expect("backend waiting to fail");
    let status = promptly("stream end", replies.message())
        .await
        .expect_err("the reset ends the stream");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().starts_with("upstream body error"),
        "{status:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Large messages.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn eight_mebibyte_message_round_trips() {
    let (_backend, _gateway, mut client) = echo_through_gateway().await;
    let payload: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let request = EchoRequest {
        message: "big".into(),
        payload: payload.clone(),
        count: 0,
    };
    let reply = promptly("large reply", client.unary(request))
        .await
        .expect("large unary call")
        .into_inner();
    assert_eq!(reply.message, "big");
    assert_eq!(reply.payload.len(), payload.len());
    assert!(reply.payload == payload, "payload corrupted in transit");
}
