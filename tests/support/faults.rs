//! A fault-injecting HTTP/1.1 backend (SPEC REL-3) written on raw sockets, so it can do
//! what a well-behaved server library will not: reset mid-response, send garbage, stall,
//! drip bytes. Its behaviour is switched at run time with `set`; `refuse`/`resume` close
//! and reopen the listening socket (and drop open connections). Counters let tests check
//! what really reached the backend: requests, health checks, concurrency, cancellations.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// What the backend does with each (non-health) request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// 200 with body `ok <name>`.
    Ok,
    /// This status with body `status <name>`.
    Status(u16),
    /// Waits, then answers 200 like `Ok`.
    Latency(Duration),
    /// Reads the request and never answers.
    Stall,
    /// Reads the request and resets the connection (RST) before any response byte.
    ResetBeforeResponse,
    /// Sends a 200 head announcing 100000 bytes, 10 of them, then resets.
    ResetMidResponse,
    /// Answers bytes that are not HTTP, then closes.
    Garbage,
    /// A 200 with a 10-byte body, one byte every period.
    Drip(Duration),
    /// Answers the first request on each connection like `Ok`; a later request on the same
    /// connection is read and the connection closed without an answer: a keep-alive
    /// timeout that fires exactly as a request arrives.
    CloseReused,
}

#[derive(Default)]
pub struct Counters {
    /// Requests other than health checks.
    pub requests: AtomicUsize,
    pub health_checks: AtomicUsize,
    pub connections: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Requests whose connection the client (the gateway) closed before the answer.
    pub cancelled: AtomicUsize,
    /// Requests read and then dropped with their connection (`CloseReused`).
    pub dropped: AtomicUsize,
    /// Request body bytes received (health checks excluded).
    pub body_bytes: AtomicUsize,
}

struct Shared {
    name: String,
    fault: Mutex<Fault>,
    health_ok: AtomicBool,
    counters: Counters,
    /// Bumped by `refuse` so open connections close too.
    generation: watch::Sender<u64>,
}

pub struct FaultBackend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// The accept task and a duplicate of its listening socket: `refuse` shuts the socket
    /// down at once, without waiting for the runtime to drop the aborted task (tests often
    /// block their runtime's thread while waiting for the gateway).
    accept: Mutex<Option<(tokio::task::JoinHandle<()>, socket2::Socket)>>,
}

impl FaultBackend {
    pub async fn start(name: &str) -> FaultBackend {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind fault backend");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            name: name.to_string(),
            fault: Mutex::new(Fault::Ok),
            health_ok: AtomicBool::new(true),
            counters: Counters::default(),
            generation: watch::channel(0).0,
        });
        let backend = FaultBackend {
            addr,
            shared,
            accept: Mutex::new(None),
        };
        backend.spawn_accept(listener);
        backend
    }

    fn spawn_accept(&self, listener: tokio::net::TcpListener) {
        let shared = self.shared.clone();
        let handle = socket2::SockRef::from(&listener)
            .try_clone()
            .expect("dup listener");
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Shut down by `refuse`.
                    return;
                };
                shared.counters.connections.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                let mut generation = shared.generation.subscribe();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(stream, &shared) => {}
                        _ = generation.changed() => {}
                    }
                });
            }
        });
        *self.accept.lock().unwrap() = Some((task, handle));
    }

    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    pub fn set_health(&self, ok: bool) {
        self.shared.health_ok.store(ok, Ordering::SeqCst);
    }

    /// Closes the listening socket and every open connection: connects are refused.
    pub fn refuse(&self) {
        if let Some((task, handle)) = self.accept.lock().unwrap().take() {
            // Shutting a listening socket down makes new connects fail with a reset and
            // pending accepts return an error, immediately.
            let _ = handle.shutdown(std::net::Shutdown::Both);
            task.abort();
        }
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Listens again on the same address.
    pub async fn resume(&self) {
        // The aborted accept task drops its listener asynchronously; retry the bind briefly.
        let deadline = tokio::time::Instant::now() + super::PATIENCE;
        loop {
            match bind(self.addr) {
                Ok(listener) => return self.spawn_accept(listener),
                Err(err) if tokio::time::Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) => panic!("rebind {}: {err}", self.addr),
            }
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    pub fn requests(&self) -> usize {
        self.shared.counters.requests.load(Ordering::SeqCst)
    }

    pub fn health_checks(&self) -> usize {
        self.shared.counters.health_checks.load(Ordering::SeqCst)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

impl Drop for FaultBackend {
    fn drop(&mut self) {
        self.refuse();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A request head: method, path, and how many body bytes follow.
struct Head {
    path: String,
    body: usize,
    consumed: usize,
}

fn parse(buffer: &[u8]) -> Option<Result<Head, ()>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buffer) {
        Ok(httparse::Status::Complete(consumed)) => {
            let body = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            Some(Ok(Head {
                path: request.path.unwrap_or("/").to_string(),
                body,
                consumed,
            }))
        }
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Err(())),
    }
}

fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Waits until the peer closes the connection (or sends more, which we ignore).
async fn peer_closed(stream: &mut TcpStream) {
    let mut scratch = [0u8; 1024];
    loop {
        match stream.read(&mut scratch).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn new(counters: &'a Counters) -> Self {
        let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(counters)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut buffer = Vec::with_capacity(4096);
    let mut answered = 0usize;
    loop {
        // Read one request head (bounded), then its body.
        let head = loop {
            if let Some(parsed) = parse(&buffer) {
                match parsed {
                    Ok(head) => break head,
                    Err(()) => return,
                }
            }
            if buffer.len() > 64 * 1024 {
                return;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        buffer.drain(..head.consumed);
        while buffer.len() < head.body {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        buffer.drain(..head.body);

        if head.path == "/health" {
            shared.counters.health_checks.fetch_add(1, Ordering::SeqCst);
            let status = if shared.health_ok.load(Ordering::SeqCst) {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        let fault = shared.fault.lock().unwrap().clone();
        if fault == Fault::CloseReused && answered > 0 {
            shared.counters.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        answered += 1;
        shared
            .counters
            .body_bytes
            .fetch_add(head.body, Ordering::SeqCst);
        shared.counters.requests.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight::new(&shared.counters);
        let name = &shared.name;
        let ok = |status: u16, label: &str| {
            let body = format!("{label} {name}");
            format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nx-backend: {name}\r\n\r\n{body}",
                body.len()
            )
        };
        match fault {
            Fault::Ok | Fault::CloseReused => {
                if stream.write_all(ok(200, "ok").as_bytes()).await.is_err() {
                    return;
                }
            }
            Fault::Status(status) => {
                if stream
                    .write_all(ok(status, "status").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Fault::Latency(delay) => {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = peer_closed(&mut stream) => {
                        shared.counters.cancelled.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                if stream.write_all(ok(200, "ok").as_bytes()).await.is_err() {
                    return;
                }
            }
            Fault::Stall => {
                peer_closed(&mut stream).await;
                shared.counters.cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Fault::ResetBeforeResponse => return reset(stream),
            Fault::ResetMidResponse => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\nx-backend: {name}\r\n\r\n0123456789"
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.flush().await;
                // Let the head and the first bytes travel before the reset overtakes them.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return reset(stream);
            }
            Fault::Garbage => {
                let _ = stream
                    .write_all(b"\x00\x01garbage that is not HTTP\r\n\r\n")
                    .await;
                return;
            }
            Fault::Drip(period) => {
                let head =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-backend: {name}\r\n\r\n");
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for byte in b"0123456789" {
                    tokio::time::sleep(period).await;
                    if stream.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
