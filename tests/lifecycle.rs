//! The gateway's life cycle over real sockets and a real process (SPEC CTRL-2, CTRL-9,
//! HTTP-5, OPS-6, HTTP-1): SIGHUP reloads that change routing for new requests while
//! in-flight requests and WebSockets carry on, rejected reloads that change nothing,
//! SIGTERM drains that finish in-flight work, refuse new connections and exit, and
//! upstream keep-alive pooling that survives it all.
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use support::{config_with_pool, full, http1_client, Backend, Gateway, PATIENCE};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Fails the test with `what` when `future` takes longer than `PATIENCE`.
async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A listener `public` on port 0, one pool per `(name, backend)`, one catch-all route to
/// `route_pool`, and `extra` (settings or routes) before them.
fn config(pools: &[(&str, SocketAddr)], route_pool: &str, extra: &str) -> String {
    let mut text = format!("{extra}\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n");
    for (name, addr) in pools {
        text.push_str(&format!(
            "\n[[pools]]\nname = \"{name}\"\nendpoints = [\"{addr}\"]\n"
        ));
    }
    text.push_str(&format!("\n[[routes]]\npool = \"{route_pool}\"\n"));
    text
}

/// Holds requests at a backend until the test lets them go: the handler reports each
/// arrival, then waits for the release.
struct Gate {
    arrived: mpsc::UnboundedReceiver<String>,
    release: watch::Sender<bool>,
}

/// The backend side of a `Gate`, cloned into a handler.
#[derive(Clone)]
struct GateHandle {
    arrived: mpsc::UnboundedSender<String>,
    released: watch::Receiver<bool>,
}

impl Gate {
    fn new() -> (Gate, GateHandle) {
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let (release, released) = watch::channel(false);
        (
            Gate { arrived, release },
            GateHandle {
                arrived: arrived_tx,
                released,
            },
        )
    }

    /// Waits until a held request has reached the backend; returns its path.
    async fn wait_arrival(&mut self) -> String {
        within("a held request to reach the backend", self.arrived.recv())
            .await
            .expect("backend gone")
    }

    fn open(&self) {
        self.release.send_replace(true);
    }
}

impl GateHandle {
    async fn hold(mut self, path: String) {
        let _ = self.arrived.send(path);
        // An error means the test dropped the gate: hold forever, as a stuck backend would.
        if self.released.wait_for(|open| *open).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A backend that answers `name` as its body, holding requests whose path starts with
/// `/slow` at `gate` until it opens.
async fn named_backend(name: &'static str, gate: Option<GateHandle>) -> Backend {
    Backend::start(Arc::new(move |request| {
        let gate = gate.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            if let (Some(gate), true) = (gate, path.starts_with("/slow")) {
                gate.hold(path).await;
            }
            let mut response = Response::new(full(name));
            response
                .headers_mut()
                .insert("x-backend", name.parse().unwrap());
            response
        })
    }))
    .await
}

/// GET through a fresh client connection; returns status and body text.
async fn get(url: &str) -> (StatusCode, String) {
    let response = within(url, http1_client().get(url).send())
        .await
        .unwrap_or_else(|err| panic!("GET {url}: {err}"));
    let status = response.status();
    let body = within("response body", response.text())
        .await
        .expect("response body");
    (status, body)
}

/// One HTTP/1.1 client connection the test keeps, so it knows which requests share it.
async fn client_connection(addr: SocketAddr) -> http1::SendRequest<Empty<Bytes>> {
    let stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to gateway");
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

async fn get_on(sender: &mut http1::SendRequest<Empty<Bytes>>, path: &str) -> (StatusCode, String) {
    within("connection ready", sender.ready())
        .await
        .expect("client connection closed");
    let request = Request::get(path)
        .header("host", "gateway.test")
        .body(Empty::new())
        .expect("request");
    let response = within(path, sender.send_request(request))
        .await
        .unwrap_or_else(|err| panic!("GET {path}: {err}"));
    let status = response.status();
    let body = within("response body", response.into_body().collect())
        .await
        .expect("response body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A WebSocket echo server: every text message comes back as `<name>:<text>`. Counts
/// completed handshakes.
struct WsBackend {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl WsBackend {
    async fn start(name: &'static str) -> WsBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ws backend");
        let addr = listener.local_addr().expect("addr");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counter = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    // Reading on after a Close lets tungstenite send its reply; the stream
                    // then ends.
                    while let Some(Ok(message)) = ws.next().await {
                        let Message::Text(text) = message else {
                            continue;
                        };
                        let reply = Message::text(format!("{name}:{text}"));
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        WsBackend {
            addr,
            handshakes,
            task,
        }
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ClientWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(gateway: &Gateway, path: &str) -> ClientWs {
    let url = format!("ws://{}{path}", gateway.addr("public"));
    let (ws, response) = within("WebSocket handshake", tokio_tungstenite::connect_async(url))
        .await
        .expect("WebSocket handshake through the gateway");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

/// Sends `text` and returns the text of the next message.
async fn ws_round_trip(ws: &mut ClientWs, text: &str) -> String {
    within("WebSocket send", ws.send(Message::text(text)))
        .await
        .expect("send on the WebSocket");
    let reply = within("WebSocket echo", ws.next())
        .await
        .expect("WebSocket closed")
        .expect("WebSocket error");
    reply.into_text().expect("text reply").as_str().to_owned()
}

/// The closing handshake, then the stream's end: the tunnel through the gateway is gone.
async fn ws_close(mut ws: ClientWs) {
    within("WebSocket close", ws.close(None))
        .await
        .expect("close the WebSocket");
    within("WebSocket close reply", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// An HTTP/1.1 backend with its own accept loop, so the test sees upstream connections:
/// each response carries `x-conn` (1 for the first accepted connection, and so on); a
/// request to `/close` is answered with `Connection: close`.
struct ConnCountingBackend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ConnCountingBackend {
    async fn start() -> ConnCountingBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let id = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let close = request.uri().path() == "/close";
                        async move {
                            let mut response = Response::builder().header("x-conn", id);
                            if close {
                                response = response.header("connection", "close");
                            }
                            Ok::<_, Infallible>(
                                response
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ConnCountingBackend {
            addr,
            connections,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for ConnCountingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// GET `path` through the gateway; asserts 200 and returns the upstream connection id.
async fn upstream_conn_of(client: &reqwest::Client, gateway: &Gateway, path: &str) -> String {
    let url = gateway.url("public", path);
    let response = within(&url, client.get(&url).send())
        .await
        .unwrap_or_else(|err| panic!("GET {path}: {err}"));
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    let conn = response
        .headers()
        .get("x-conn")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("GET {path}: no x-conn header"))
        .to_owned();
    let body = within("response body", response.bytes())
        .await
        .expect("response body");
    assert_eq!(&body[..], b"ok");
    conn
}

// ---------------------------------------------------------------------------------------
// 1: a WebSocket survives a reload (SPEC HTTP-5, CTRL-9)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echoes_through_the_gateway_and_survives_a_reload() {
    let first = WsBackend::start("a").await;
    let second = WsBackend::start("b").await;
    let mut gateway = Gateway::start(&config(&[("a", first.addr)], "a", ""));

    let mut ws = ws_connect(&gateway, "/chat").await;
    assert_eq!(ws_round_trip(&mut ws, "hello").await, "a:hello");
    assert_eq!(ws_round_trip(&mut ws, "world").await, "a:world");

    // The new config drops the WebSocket's pool altogether, sends the route elsewhere and
    // adds a route: as big a change as a reload gets while the socket is open.
    let extra = "[[routes]]\nname = \"added\"\nmatch.path = \"/added\"\n\
                 direct_response = { status = 200, body = \"added\" }\n";
    let outcome = gateway.reload_with(&config(&[("b", second.addr)], "b", extra));
    assert!(outcome.contains("reload succeeded"), "{outcome}");
    assert_eq!(
        get(&gateway.url("public", "/added")).await,
        (StatusCode::OK, "added".to_string()),
        "the reload took effect"
    );

    // The established socket still talks to the backend it was opened to.
    for i in 0..5 {
        let text = format!("after reload {i}");
        assert_eq!(ws_round_trip(&mut ws, &text).await, format!("a:{text}"));
    }
    // New sockets follow the new route.
    let mut fresh = ws_connect(&gateway, "/chat").await;
    assert_eq!(ws_round_trip(&mut fresh, "new").await, "b:new");
    assert_eq!(first.handshakes.load(Ordering::SeqCst), 1);
    assert_eq!(second.handshakes.load(Ordering::SeqCst), 1);

    // Once both sockets are closed end to end no tunnel is left, so the drain is quick.
    ws_close(ws).await;
    ws_close(fresh).await;
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit(PATIENCE).success());
}

// ---------------------------------------------------------------------------------------
// 2, 3: SIGHUP with a valid and an invalid file (SPEC CTRL-2, CTRL-9)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reroutes_new_requests_while_an_in_flight_request_finishes_on_the_old_snapshot() {
    let (mut gate, handle) = Gate::new();
    let backend_a = named_backend("A", Some(handle)).await;
    let backend_b = named_backend("B", None).await;
    let gateway = Gateway::start(&config(&[("a", backend_a.addr)], "a", ""));
    let addr = gateway.addr("public");

    // A client connection opened (and used) before the reload.
    let mut kept = client_connection(addr).await;
    assert_eq!(get_on(&mut kept, "/").await, (StatusCode::OK, "A".into()));

    let slow_url = gateway.url("public", "/slow");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    assert_eq!(gate.wait_arrival().await, "/slow");

    // Pool `a` leaves the config entirely; the route now forwards to pool `b`.
    let outcome = gateway.reload_with(&config(&[("b", backend_b.addr)], "b", ""));
    assert!(outcome.contains("reload succeeded"), "{outcome}");

    // New requests, on new connections and on one opened before the reload, go to B.
    assert_eq!(
        get(&gateway.url("public", "/")).await,
        (StatusCode::OK, "B".into())
    );
    assert_eq!(get_on(&mut kept, "/").await, (StatusCode::OK, "B".into()));
    assert!(!slow.is_finished(), "the held request finished early");

    // The request that was in flight when the reload happened completes from A.
    gate.open();
    let (status, body) = within("the held request", slow).await.expect("task");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "A"));
    let line = gateway.wait_access_log(|line| line["path"] == "/slow");
    assert_eq!(line["status"], 200);
    assert_eq!(line["pool"], "a", "{line}");
    assert_eq!(backend_a.count(), 2);
    assert_eq!(backend_b.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_invalid_file_is_rejected_with_field_paths_and_changes_nothing() {
    let backend_a = named_backend("A", None).await;
    let backend_b = named_backend("B", None).await;
    let start = config(&[("app", backend_a.addr)], "app", "");
    let mut gateway = Gateway::start(&start);
    assert_eq!(
        get(&gateway.url("public", "/")).await,
        (StatusCode::OK, "A".into())
    );

    // Valid changes (the pool now points at B, a new route) mixed with two mistakes.
    let invalid = format!(
        "{}\n[[routes]]\nmatch.path_prefix = \"/other\"\npool = \"nope\"\n",
        config(
            &[("app", backend_b.addr)],
            "app",
            "drain_timeout = \"soon\""
        )
    );
    let from = gateway.stderr.len();
    let outcome = gateway.reload_with(&invalid);
    assert!(outcome.contains("reload rejected"), "{outcome}");
    // One line per error, each with its field path.
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("reload rejected") && line.contains("routes[1].pool")
    });
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("reload rejected") && line.contains("drain_timeout")
    });
    assert!(
        !gateway.stderr.snapshot()[from..]
            .iter()
            .any(|line| line.contains("reload succeeded") || line.contains("configuration applied")),
        "a rejected reload applied something"
    );

    // Requests still go where they went, on the listener that was there.
    for _ in 0..3 {
        assert_eq!(
            get(&gateway.url("public", "/")).await,
            (StatusCode::OK, "A".into())
        );
    }
    assert_eq!(
        get(&gateway.url("public", "/other")).await,
        (StatusCode::OK, "A".into()),
        "the rejected file's route was added"
    );
    assert_eq!(backend_b.count(), 0);

    // The process keeps running and keeps handling signals: a valid reload still works.
    let outcome = gateway.reload_with(&config(&[("app", backend_b.addr)], "app", ""));
    assert!(outcome.contains("reload succeeded"), "{outcome}");
    assert_eq!(
        get(&gateway.url("public", "/")).await,
        (StatusCode::OK, "B".into())
    );
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit(PATIENCE).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_listener_that_cannot_bind_is_rejected_and_changes_nothing() {
    let backend_a = named_backend("A", None).await;
    let backend_b = named_backend("B", None).await;
    let gateway = Gateway::start(&config(&[("app", backend_a.addr)], "app", ""));
    let before = gateway.addr("public");

    // The file is valid, but its second listener's address is taken: the failure comes
    // after validation, when binding.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    let extra = format!("[[listeners]]\nname = \"second\"\nbind = \"{taken_addr}\"\n");
    let outcome = gateway.reload_with(&format!(
        "{}\n{extra}",
        config(&[("app", backend_b.addr)], "app", "")
    ));
    assert!(outcome.contains("reload rejected"), "{outcome}");
    assert!(outcome.contains("listeners[second]"), "{outcome}");

    assert_eq!(
        get(&format!("http://{before}/")).await,
        (StatusCode::OK, "A".into())
    );
    assert_eq!(backend_b.count(), 0);
}

// ---------------------------------------------------------------------------------------
// 4, 5: SIGTERM drains (SPEC OPS-6)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_in_flight_request_refuses_new_connections_and_exits_cleanly() {
    let (mut gate, handle) = Gate::new();
    let backend = named_backend("A", Some(handle)).await;
    // A drain window far longer than the test's patience: a clean exit must come from the
    // request finishing, not from the timeout.
    let mut gateway = Gateway::start(&config(
        &[("app", backend.addr)],
        "app",
        "drain_timeout = \"120s\"",
    ));
    let addr = gateway.addr("public");

    let slow_url = gateway.url("public", "/slow");
    let slow = tokio::spawn(async move { get(&slow_url).await });
    assert_eq!(gate.wait_arrival().await, "/slow");

    let from = gateway.stderr.len();
    gateway.signal(libc::SIGTERM);
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("draining"));
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("listeners closed"));

    // No listener accepts any more.
    for _ in 0..3 {
        let attempt = within("connect", TcpStream::connect(addr)).await;
        let err = attempt.expect_err("a new connection was accepted during the drain");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    assert!(!slow.is_finished(), "the held request finished early");

    gate.open();
    let (status, body) = within("the held request", slow).await.expect("task");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "A"));

    // PATIENCE is far inside the 120 s window.
    let status = gateway.wait_exit(PATIENCE);
    assert!(status.success(), "exit status {status}");
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("drained; exiting"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_after_drain_timeout_when_a_request_never_finishes() {
    // The gate never opens: the backend holds the request for ever.
    let (mut gate, handle) = Gate::new();
    let backend = named_backend("A", Some(handle)).await;
    let mut gateway = Gateway::start(&config(
        &[("app", backend.addr)],
        "app",
        "drain_timeout = \"1s\"",
    ));

    let slow_url = gateway.url("public", "/slow");
    let slow = tokio::spawn(async move {
        http1_client()
            .get(&slow_url)
            .send()
            .await
            .map(|response| response.status())
    });
    assert_eq!(gate.wait_arrival().await, "/slow");

    let from = gateway.stderr.len();
    let signalled = Instant::now();
    gateway.signal(libc::SIGTERM);
    let status = gateway.wait_exit(Duration::from_secs(10));
    let elapsed = signalled.elapsed();

    // Exit code 3: the drain timeout cut a connection off (src/main.rs).
    assert_eq!(status.code(), Some(3), "exit status {status}");
    assert!(
        elapsed >= Duration::from_secs(1),
        "exited after {elapsed:?}, before the drain timeout"
    );
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("drain timeout reached")
    });
    let outcome = within("the cut-off request", slow).await.expect("task");
    assert!(
        outcome.is_err(),
        "the cut-off request got a response: {outcome:?}"
    );
    drop(gate);
}

// ---------------------------------------------------------------------------------------
// 6: upstream keep-alive pooling (SPEC HTTP-1, CTRL-2)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let backend = ConnCountingBackend::start().await;
    // One worker: with several, a client connection on another worker can find the idle
    // upstream connection still finishing its last response on its own worker and open a
    // new one instead (docs/OPERATIONS.md, "Workers").
    let gateway = Gateway::start(&one_worker(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\n",
    )));
    let client = http1_client();
    for i in 0..10 {
        let conn = upstream_conn_of(&client, &gateway, &format!("/req/{i}")).await;
        assert_eq!(
            conn, "1",
            "request {i} went out on a new upstream connection"
        );
    }
    // Separate client connections share the pool too.
    for i in 0..3 {
        let conn = upstream_conn_of(&http1_client(), &gateway, &format!("/other/{i}")).await;
        assert_eq!(conn, "1", "client {i} got a new upstream connection");
    }
    assert_eq!(backend.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_close_leads_to_a_fresh_connection_without_a_failed_request() {
    let backend = ConnCountingBackend::start().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\n",
    ));
    let client = http1_client();
    assert_eq!(upstream_conn_of(&client, &gateway, "/first").await, "1");
    // The backend answers this one with `Connection: close` and closes the connection.
    assert_eq!(upstream_conn_of(&client, &gateway, "/close").await, "1");
    // The next request must not be sent on the closed connection: it succeeds on a new one,
    // which is then pooled as usual.
    assert_eq!(upstream_conn_of(&client, &gateway, "/after").await, "2");
    assert_eq!(upstream_conn_of(&client, &gateway, "/again").await, "2");
    assert_eq!(backend.connections(), 2);
    for path in ["/first", "/close", "/after", "/again"] {
        let line = gateway.wait_access_log(|line| line["path"] == path);
        assert_eq!(line["status"], 200, "{line}");
        assert!(line.get("error").is_none_or(|e| e.is_null()), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_keep_alive_connections_survive_a_reload() {
    let backend = ConnCountingBackend::start().await;
    let routes = "[[routes]]\npool = \"app\"\n";
    let gateway = Gateway::start(&one_worker(&config_with_pool(&[backend.addr], routes)));
    let client = http1_client();
    for i in 0..3 {
        assert_eq!(
            upstream_conn_of(&client, &gateway, &format!("/before/{i}")).await,
            "1"
        );
    }
    let added = "[[routes]]\nmatch.path = \"/added\"\n\
                 direct_response = { status = 200, body = \"added\" }\n";
    let outcome = gateway.reload_with(&one_worker(&config_with_pool(
        &[backend.addr],
        &format!("{added}\n{routes}"),
    )));
    assert!(outcome.contains("reload succeeded"), "{outcome}");
    assert_eq!(
        get(&gateway.url("public", "/added")).await,
        (StatusCode::OK, "added".into())
    );
    for i in 0..3 {
        assert_eq!(
            upstream_conn_of(&client, &gateway, &format!("/after/{i}")).await,
            "1",
            "the reload dropped the pooled upstream connection"
        );
    }
    assert_eq!(backend.connections(), 1);
}

/// Pins the gateway to one worker thread (see `sequential_requests_reuse_one_upstream_connection`).
fn one_worker(config: &str) -> String {
    format!("workers = 1\n{config}")
}
