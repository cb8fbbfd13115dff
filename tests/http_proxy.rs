//! The L7 proxy engine over real sockets (SPEC HTTP-6, HTTP-7, HTTP-8, HTTP-10, HTTP-11):
//! methods, headers, status codes and rewrites pass through; hop-by-hop headers and
//! forwarding headers are handled; request ids are generated, kept or replaced; failures
//! map to the documented statuses; ambiguous framing never reaches a backend.
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use support::{
    config_with_pool, echoed_header, full, http1_client, json_of, Backend, Gateway, PATIENCE,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// One catch-all route to pool `app`, plus `extra` (more settings or routes).
fn forward_all(backend: SocketAddr, extra: &str) -> String {
    config_with_pool(
        &[backend],
        &format!("{extra}\n[[routes]]\npool = \"app\"\n"),
    )
}

/// An echo backend that also reports the method and target it saw in response headers,
/// so a HEAD request (whose response has no body) can be checked too.
async fn echo_backend() -> Backend {
    Backend::start(Arc::new(|request| {
        Box::pin(async move {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let mut response = support::echo(request).await;
            let headers = response.headers_mut();
            headers.insert("x-seen-method", method.parse().unwrap());
            headers.insert("x-seen-uri", uri.parse().unwrap());
            response
        })
    }))
    .await
}

/// A backend whose answer is chosen by the request path.
async fn scripted_backend() -> Backend {
    Backend::start(Arc::new(|request| {
        Box::pin(async move {
            let path = request.uri().path().to_string();
            if let Some(code) = path.strip_prefix("/status/") {
                let status: u16 = code.parse().unwrap();
                let mut response = Response::new(full(format!("backend said {status}")));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                response
                    .headers_mut()
                    .insert("x-backend", "scripted".parse().unwrap());
                return response;
            }
            if path == "/cookies" {
                let mut response = Response::new(full("cookies"));
                for cookie in ["a=1; Path=/", "b=2; HttpOnly", "c=3"] {
                    response
                        .headers_mut()
                        .append("set-cookie", cookie.parse().unwrap());
                }
                return response;
            }
            Response::new(full("default"))
        })
    }))
    .await
}

/// A raw TCP backend below hyper: it counts accepted connections and either never answers
/// (holding the connection open) or answers every request head with fixed bytes.
struct RawBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    async fn start(reply: Option<&'static [u8]>) -> RawBackend {
        RawBackend::serving(move |mut stream| async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
                if let Some(reply) = reply {
                    if find(&seen, b"\r\n\r\n").is_some() {
                        let _ = stream.write_all(reply).await;
                        let _ = stream.shutdown().await;
                        return;
                    }
                }
            }
        })
        .await
    }

    /// Accepts connections on 127.0.0.1:0, counting them, and runs `serve` on each.
    async fn serving<F, Fut>(serve: F) -> RawBackend
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        RawBackend {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address with nothing listening: bind port 0, note the port, close it.
fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A response read off a raw socket.
struct RawResponse {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {self:?}"))
    }
}

/// A client connection written to verbatim, for requests HTTP clients refuse to send.
struct RawConnection {
    stream: TcpStream,
    /// Bytes read but not yet consumed by a response.
    data: Vec<u8>,
}

impl RawConnection {
    async fn open(addr: SocketAddr) -> RawConnection {
        RawConnection {
            stream: TcpStream::connect(addr).await.unwrap(),
            data: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; false at EOF (or a reset, which a closing server may cause).
    async fn fill(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        let n = self.stream.read(&mut buf).await.unwrap_or(0);
        self.data.extend_from_slice(&buf[..n]);
        n > 0
    }

    /// Reads one response: the head, then a `Content-Length` body, a chunked body, or
    /// everything up to EOF.
    async fn response(&mut self) -> RawResponse {
        tokio::time::timeout(PATIENCE, self.read_response())
            .await
            .expect("no response in time")
    }

    async fn read_response(&mut self) -> RawResponse {
        let head_end = loop {
            if let Some(at) = find(&self.data, b"\r\n\r\n") {
                break at;
            }
            assert!(
                self.fill().await,
                "connection closed without a response head; got {:?}",
                String::from_utf8_lossy(&self.data)
            );
        };
        let head = String::from_utf8_lossy(&self.data[..head_end]).into_owned();
        self.data.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| value.parse::<usize>().ok());
        let chunked = headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
        let body_end = loop {
            let end = match length {
                Some(length) => (self.data.len() >= length).then_some(length),
                None if chunked => find(&self.data, b"0\r\n\r\n").map(|at| at + 5),
                None => None,
            };
            if let Some(end) = end {
                break end;
            }
            if !self.fill().await {
                break self.data.len();
            }
        };
        let body = self.data.drain(..body_end).collect();
        RawResponse {
            status,
            headers,
            body,
        }
    }
}

/// Writes `request` verbatim on a fresh connection and reads one response.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut connection = RawConnection::open(addr).await;
    connection.send(request).await;
    connection.response().await
}

fn is_hex_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn get_json(client: &reqwest::Client, url: String) -> serde_json::Value {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

// ---------------------------------------------------------------------------------------
// HTTP-8 and pass-through: methods, query strings, headers, statuses, rewrites
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn get_head_post_put_delete_reach_the_backend_with_their_query_strings() {
    let backend = echo_backend().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let client = http1_client();
    let target = "/items/7?sort=desc&tag=a%20b&tag=c";
    for method in ["GET", "POST", "PUT", "DELETE"] {
        let method: reqwest::Method = method.parse().unwrap();
        let mut request = client.request(method.clone(), gateway.url("public", target));
        if method == reqwest::Method::POST || method == reqwest::Method::PUT {
            request = request.body("x".repeat(1234));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{method}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["method"], method.as_str());
        assert_eq!(answer["uri"], target, "{method}");
        let expected_len = if method == reqwest::Method::POST || method == reqwest::Method::PUT {
            1234
        } else {
            0
        };
        assert_eq!(answer["body_len"], expected_len, "{method}");
    }

    let response = client
        .head(gateway.url("public", target))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-seen-method"], "HEAD");
    assert_eq!(response.headers()["x-seen-uri"], target);
    assert!(response.bytes().await.unwrap().is_empty());
    assert_eq!(backend.count(), 5);
}

#[tokio::test]
async fn repeated_request_headers_reach_the_backend_in_order() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let answer = json_of(
        http1_client()
            .get(gateway.url("public", "/"))
            .header("x-multi", "first")
            .header("x-other", "between")
            .header("x-multi", "second")
            .header("x-multi", "third"),
    )
    .await;
    assert_eq!(
        echoed_header(&answer, "x-multi"),
        vec!["first", "second", "third"]
    );
    assert_eq!(echoed_header(&answer, "x-other"), vec!["between"]);
}

#[tokio::test]
async fn several_set_cookie_headers_reach_the_client_in_order() {
    let backend = scripted_backend().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let response = http1_client()
        .get(gateway.url("public", "/cookies"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cookies: Vec<&str> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|value| value.to_str().unwrap())
        .collect();
    assert_eq!(cookies, vec!["a=1; Path=/", "b=2; HttpOnly", "c=3"]);
}

#[tokio::test]
async fn backend_status_codes_and_bodies_pass_through_unchanged() {
    let backend = scripted_backend().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let client = http1_client();
    for status in [201u16, 204, 404, 418, 500, 503] {
        let response = client
            .get(gateway.url("public", &format!("/status/{status}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(response.headers()["x-backend"], "scripted", "{status}");
        // The gateway adds no Retry-After of its own to a backend's 503.
        assert!(response.headers().get("retry-after").is_none(), "{status}");
        let body = response.text().await.unwrap();
        if status == 204 {
            assert_eq!(body, "");
        } else {
            assert_eq!(body, format!("backend said {status}"));
        }
    }
    assert_eq!(backend.count(), 6);
}

#[tokio::test]
async fn strip_prefix_removes_the_prefix_and_keeps_the_query() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\nstrip_prefix = \"/api\"\nmatch = { path_prefix = \"/api\" }\n",
    ));
    let client = http1_client();
    let answer = get_json(&client, gateway.url("public", "/api/users/9?x=1&y=2")).await;
    assert_eq!(answer["uri"], "/users/9?x=1&y=2");
    let answer = get_json(&client, gateway.url("public", "/api?only=query")).await;
    assert_eq!(answer["uri"], "/?only=query");
}

#[tokio::test]
async fn client_host_is_sent_upstream_by_default() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let answer = json_of(
        http1_client()
            .get(gateway.url("public", "/"))
            .header("host", "shop.example:8443"),
    )
    .await;
    assert_eq!(echoed_header(&answer, "host"), vec!["shop.example:8443"]);
}

#[tokio::test]
async fn host_rewrite_sends_the_configured_host_upstream() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\nhost_rewrite = \"internal.svc\"\n",
    ));
    let answer = json_of(
        http1_client()
            .get(gateway.url("public", "/"))
            .header("host", "shop.example"),
    )
    .await;
    assert_eq!(echoed_header(&answer, "host"), vec!["internal.svc"]);
    // The original host is still visible to the backend.
    assert_eq!(
        echoed_header(&answer, "x-forwarded-host"),
        vec!["shop.example"]
    );
}

#[tokio::test]
async fn preserve_host_false_sends_the_endpoint_address_upstream() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\npreserve_host = false\n",
    ));
    let answer = json_of(
        http1_client()
            .get(gateway.url("public", "/"))
            .header("host", "shop.example"),
    )
    .await;
    assert_eq!(
        echoed_header(&answer, "host"),
        vec![backend.addr.to_string()]
    );
}

// ---------------------------------------------------------------------------------------
// HTTP-6 header hygiene
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hop_by_hop_headers_never_reach_the_backend() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    // Written by hand: HTTP clients refuse to send most of these.
    let request = "GET /hop HTTP/1.1\r\n\
        Host: hop.test\r\n\
        Connection: close, X-Foo\r\n\
        Connection: x-bar\r\n\
        Keep-Alive: timeout=5, max=100\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: gzip, deflate\r\n\
        Trailer: x-checksum\r\n\
        Upgrade: websocket\r\n\
        X-Foo: secret\r\n\
        X-Bar: also-secret\r\n\
        X-Kept: yes\r\n\
        \r\n";
    let response = raw_exchange(gateway.addr("public"), request.as_bytes()).await;
    assert_eq!(response.status, 200, "{response:?}");
    let answer = response.json();
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "x-foo",
        "x-bar",
        "transfer-encoding",
    ] {
        assert!(
            echoed_header(&answer, name).is_empty(),
            "{name} reached the backend: {answer}"
        );
    }
    assert_eq!(echoed_header(&answer, "x-kept"), vec!["yes"]);
    assert_eq!(answer["uri"], "/hop");
}

#[tokio::test]
async fn te_trailers_is_the_only_te_value_forwarded() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let request =
        "GET / HTTP/1.1\r\nHost: te.test\r\nTE: gzip, trailers\r\nConnection: close\r\n\r\n";
    let response = raw_exchange(gateway.addr("public"), request.as_bytes()).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(echoed_header(&response.json(), "te"), vec!["trailers"]);
}

#[tokio::test]
async fn untrusted_peer_forwarding_headers_are_replaced() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let answer = json_of(
        http1_client()
            .get(gateway.url("public", "/"))
            .header("host", "shop.example")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "spoofed.example")
            .header("x-real-ip", "203.0.113.9"),
    )
    .await;
    assert_eq!(echoed_header(&answer, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(echoed_header(&answer, "x-real-ip"), vec!["127.0.0.1"]);
    assert_eq!(echoed_header(&answer, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        echoed_header(&answer, "x-forwarded-host"),
        vec!["shop.example"]
    );
}

#[tokio::test]
async fn forwarding_headers_describe_the_client_request() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let answer = json_of(
        http1_client()
            .get(gateway.url("public", "/"))
            .header("host", "Shop.Example:8080"),
    )
    .await;
    assert_eq!(echoed_header(&answer, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(echoed_header(&answer, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        echoed_header(&answer, "x-forwarded-host"),
        vec!["Shop.Example:8080"]
    );
    assert_eq!(echoed_header(&answer, "x-real-ip"), vec!["127.0.0.1"]);
}

#[tokio::test]
async fn trusted_peer_chain_is_appended_and_real_ip_is_the_rightmost_untrusted() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(
        backend.addr,
        "[http]\ntrusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]\n",
    ));
    let answer: serde_json::Value = http1_client()
        .get(gateway.url("public", "/"))
        .header("host", "shop.example")
        // Two header lines: both belong to the chain, in order.
        .header("x-forwarded-for", "192.0.2.1, 203.0.113.9")
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "edge.example")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        echoed_header(&answer, "x-forwarded-for"),
        vec!["192.0.2.1, 203.0.113.9, 10.1.2.3, 127.0.0.1"]
    );
    // 127.0.0.1 and 10.1.2.3 are trusted proxies; the client is the next address left.
    assert_eq!(echoed_header(&answer, "x-real-ip"), vec!["203.0.113.9"]);
    // A trusted proxy's view of the original request is believed.
    assert_eq!(echoed_header(&answer, "x-forwarded-proto"), vec!["https"]);
    assert_eq!(
        echoed_header(&answer, "x-forwarded-host"),
        vec!["edge.example"]
    );
}

#[tokio::test]
async fn replace_mode_sends_only_the_client_address() {
    let backend = Backend::echo().await;
    let trusted = Gateway::start(&forward_all(
        backend.addr,
        "[http]\nx_forwarded_for = \"replace\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    ));
    let untrusted = Gateway::start(&forward_all(
        backend.addr,
        "[http]\nx_forwarded_for = \"replace\"\n",
    ));
    let client = http1_client();
    for (gateway, expected) in [(&trusted, "203.0.113.9"), (&untrusted, "127.0.0.1")] {
        let answer: serde_json::Value = client
            .get(gateway.url("public", "/"))
            .header("x-forwarded-for", "192.0.2.1, 203.0.113.9")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(echoed_header(&answer, "x-forwarded-for"), vec![expected]);
        assert_eq!(echoed_header(&answer, "x-real-ip"), vec![expected]);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP-7 request ids
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn request_id_is_generated_when_absent_and_shared_by_client_backend_and_log() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let response = http1_client()
        .get(gateway.url("public", "/generated-id"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(is_hex_id(&id), "generated id {id:?}");
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echoed_header(&answer, "x-request-id"), vec![id.clone()]);
    let line = gateway.wait_access_log(|line| line["path"] == "/generated-id");
    assert_eq!(line["request_id"], id.as_str());
    assert_eq!(line["status"], 200);

    // Each request gets its own id.
    let second = http1_client()
        .get(gateway.url("public", "/generated-id"))
        .send()
        .await
        .unwrap();
    let second_id = second.headers()["x-request-id"].to_str().unwrap();
    assert!(is_hex_id(second_id));
    assert_ne!(second_id, id);
}

#[tokio::test]
async fn valid_incoming_request_id_is_kept_everywhere() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let id = "client-trace_42.abc:7";
    let response = http1_client()
        .get(gateway.url("public", "/kept-id"))
        .header("x-request-id", id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], id);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echoed_header(&answer, "x-request-id"), vec![id]);
    let line = gateway.wait_access_log(|line| line["path"] == "/kept-id");
    assert_eq!(line["request_id"], id);
}

#[tokio::test]
async fn invalid_incoming_request_id_is_replaced_everywhere() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let client = http1_client();
    let too_long = "a".repeat(129);
    for (index, bad) in ["has space", "quote\"injection", "{json}", too_long.as_str()]
        .into_iter()
        .enumerate()
    {
        let path = format!("/replaced-id/{index}");
        let response = client
            .get(gateway.url("public", &path))
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(is_hex_id(&id), "{bad:?} was answered with id {id:?}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(echoed_header(&answer, "x-request-id"), vec![id.clone()]);
        let line = gateway.wait_access_log(|line| line["path"] == path.as_str());
        assert_eq!(line["request_id"], id.as_str());
    }
}

// ---------------------------------------------------------------------------------------
// HTTP-11 error mapping
// ---------------------------------------------------------------------------------------

/// Checks a proxy-generated JSON error: status, code, and the request id matching the
/// response header. Returns the parsed body.
async fn assert_proxy_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(is_hex_id(&id));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
    assert_eq!(body["status"], status);
    assert_eq!(body["request_id"], id.as_str());
    body
}

#[tokio::test]
async fn no_route_is_404_with_a_json_body_carrying_the_request_id() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\nmatch = { hosts = [\"only.example\"] }\n",
    ));
    let response = http1_client()
        .get(gateway.url("public", "/nowhere"))
        .header("host", "other.example")
        .send()
        .await
        .unwrap();
    assert_proxy_error(response, 404, "no_route").await;
    let line = gateway.wait_access_log(|line| line["path"] == "/nowhere");
    assert_eq!(line["status"], 404);
    assert_eq!(backend.count(), 0);

    // The route itself works, so the 404 above was about routing.
    let response = http1_client()
        .get(gateway.url("public", "/"))
        .header("host", "only.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn connection_refused_is_502() {
    let gateway = Gateway::start(&forward_all(refused_addr(), ""));
    let response = http1_client()
        .get(gateway.url("public", "/refused"))
        .send()
        .await
        .unwrap();
    assert_proxy_error(response, 502, "upstream_connect_failed").await;
    let line = gateway.wait_access_log(|line| line["path"] == "/refused");
    assert_eq!(line["status"], 502);
}

#[tokio::test]
async fn backend_that_never_answers_is_504_at_the_response_header_timeout() {
    let backend = RawBackend::start(None).await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\ntimeouts = { response_header = \"300ms\" }\n",
    ));
    let started = Instant::now();
    let response = http1_client()
        .get(gateway.url("public", "/silent"))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_proxy_error(response, 504, "upstream_timeout").await;
    assert_eq!(backend.accepted(), 1);
    assert!(
        elapsed >= Duration::from_millis(300),
        "answered before the timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "timeout not honoured: {elapsed:?}"
    );
}

#[tokio::test]
async fn garbage_from_the_backend_is_502() {
    let backend = RawBackend::start(Some(b"garbage\r\n\r\n")).await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let response = http1_client()
        .get(gateway.url("public", "/garbage"))
        .send()
        .await
        .unwrap();
    assert_proxy_error(response, 502, "upstream_bad_response").await;
    assert!(backend.accepted() >= 1);
}

#[tokio::test]
async fn declared_body_over_the_limit_is_413_and_never_reaches_the_backend() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\nmax_request_body = \"1KiB\"\n",
    ));
    let client = http1_client();
    let response = client
        .post(gateway.url("public", "/upload"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_proxy_error(response, 413, "body_too_large").await;
    assert_eq!(backend.count(), 0);

    // A body within the limit goes through.
    let response = client
        .post(gateway.url("public", "/upload"))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["body_len"], 1024);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\nmax_request_body = \"1KiB\"\n",
    ));
    let client = http1_client();
    let chunks = |count: usize| {
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..count)
            .map(|_| Ok(Bytes::from(vec![b'y'; 400])))
            .collect();
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
    };
    // 4 × 400 bytes: the limit is crossed by the third chunk, after forwarding started.
    let response = client
        .post(gateway.url("public", "/chunked"))
        .body(chunks(4))
        .send()
        .await
        .unwrap();
    assert_proxy_error(response, 413, "body_too_large").await;

    // A single chunk already over the limit is refused before anything goes upstream.
    let before = backend.count();
    let big: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(vec![b'z'; 4096]))];
    let response = client
        .post(gateway.url("public", "/chunked"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(big)))
        .send()
        .await
        .unwrap();
    assert_proxy_error(response, 413, "body_too_large").await;
    assert_eq!(backend.count(), before);

    // 2 × 400 bytes fits.
    let response = client
        .post(gateway.url("public", "/chunked"))
        .body(chunks(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["body_len"], 800);
}

// ---------------------------------------------------------------------------------------
// HTTP-10 strict parsing
// ---------------------------------------------------------------------------------------

/// Sends each malformed request on its own connection and expects 400 for all of them
/// with the backend untouched; then proves the backend is reachable and counted.
async fn assert_rejected_before_the_backend(requests: &[&str]) {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    for request in requests {
        let response = raw_exchange(gateway.addr("public"), request.as_bytes()).await;
        assert_eq!(response.status, 400, "request {request:?} got {response:?}");
        assert_eq!(
            backend.count(),
            0,
            "request {request:?} reached the backend"
        );
    }
    let response = raw_exchange(
        gateway.addr("public"),
        b"GET / HTTP/1.1\r\nHost: ok.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_rejected() {
    assert_rejected_before_the_backend(&[
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n",
    ])
    .await;
}

#[tokio::test]
async fn ambiguous_request_pipelined_after_a_valid_one_is_rejected() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let mut connection = RawConnection::open(gateway.addr("public")).await;
    // One write: the server must skip the first body (which looks like a head with both
    // length headers) and attribute the ambiguity to the second request, not the first.
    let decoy = "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    connection
        .send(
            format!(
                "POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{decoy}\
                 POST /second HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\
                 Content-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                decoy.len()
            )
            .as_bytes(),
        )
        .await;
    let first = connection.response().await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json()["uri"], "/first");
    assert_eq!(first.json()["body_len"], decoy.len());
    let second = connection.response().await;
    assert_eq!(second.status, 400, "{second:?}");
    assert_eq!(second.json()["error"], "bad_request");
    assert_eq!(second.header("connection"), Some("close"));
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn differing_content_lengths_are_rejected() {
    assert_rejected_before_the_backend(&[
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\nhello!",
    ])
    .await;
}

#[tokio::test]
async fn invalid_header_names_are_rejected() {
    assert_rejected_before_the_backend(&[
        "GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: t\r\nX-Space : x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: t\r\nBad(Name): x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: t\r\n: empty-name\r\n\r\n",
    ])
    .await;
}

#[tokio::test]
async fn bad_chunk_size_is_rejected() {
    assert_rejected_before_the_backend(&[
        "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ])
    .await;
}

// ---------------------------------------------------------------------------------------
// The HTTP/1 server: interim answers, pipelining, HTTP/1.0, limits, timeouts, aborts
// ---------------------------------------------------------------------------------------

/// Reads up to the end of the next head without consuming a body (for interim answers).
async fn read_head_only(connection: &mut RawConnection) -> String {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(at) = find(&connection.data, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&connection.data[..at]).into_owned();
                connection.data.drain(..at + 4);
                return head;
            }
            assert!(connection.fill().await, "closed before a head");
        }
    })
    .await
    .expect("no head in time")
}

#[tokio::test]
async fn expect_100_continue_is_answered_only_when_the_body_is_wanted() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\npool = \"app\"\nmax_request_body = \"10\"\n",
    ));
    let mut connection = RawConnection::open(gateway.addr("public")).await;
    connection
        .send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let interim = read_head_only(&mut connection).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim:?}");
    connection.send(b"hello").await;
    let response = connection.response().await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["body_len"], 5);

    // A body refused for its declared size is never invited: the final answer comes first.
    let mut refused = RawConnection::open(gateway.addr("public")).await;
    refused
        .send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n")
        .await;
    let response = refused.response().await;
    assert_eq!(response.status, 413, "{response:?}");
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let mut connection = RawConnection::open(gateway.addr("public")).await;
    connection
        .send(
            b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n\
              POST /two HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc\
              GET /three HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .await;
    for (path, body_len) in [("/one", 0), ("/two", 3), ("/three", 0)] {
        let response = connection.response().await;
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.json()["uri"], path);
        assert_eq!(response.json()["body_len"], body_len);
    }
    assert_eq!(backend.count(), 3);
}

#[tokio::test]
async fn http_1_0_clients_get_close_unless_they_ask_for_keep_alive() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let mut plain = RawConnection::open(gateway.addr("public")).await;
    plain.send(b"GET /old HTTP/1.0\r\nHost: t\r\n\r\n").await;
    let head = read_head_only(&mut plain).await;
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head:?}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nconnection: close"),
        "{head:?}"
    );
    tokio::time::timeout(PATIENCE, async { while plain.fill().await {} })
        .await
        .expect("the HTTP/1.0 connection closes after its response");

    let mut kept = RawConnection::open(gateway.addr("public")).await;
    for path in ["/a", "/b"] {
        kept.send(
            format!("GET {path} HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n").as_bytes(),
        )
        .await;
        let response = kept.response().await;
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.header("connection"), Some("keep-alive"));
        assert_eq!(response.json()["uri"], path);
    }
}

/// A backend answering with a body of unknown length, sent in two pieces.
async fn streaming_backend() -> Backend {
    Backend::start(Arc::new(|_request| {
        Box::pin(async {
            let pieces: Vec<
                Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
            > = vec![
                Ok(http_body::Frame::data(Bytes::from_static(b"first,"))),
                Ok(http_body::Frame::data(Bytes::from_static(b"second"))),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(pieces));
            Response::new(http_body_util::BodyExt::boxed(body))
        })
    }))
    .await
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked_for_http_1_1_and_ends_with_the_connection_for_1_0() {
    let backend = streaming_backend().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let mut modern = RawConnection::open(gateway.addr("public")).await;
    modern.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let response = modern.response().await;
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    let text = String::from_utf8_lossy(&response.body).into_owned();
    assert!(
        text.contains("first,") && text.contains("second") && text.ends_with("0\r\n\r\n"),
        "{text:?}"
    );

    let mut old = RawConnection::open(gateway.addr("public")).await;
    old.send(b"GET / HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let response = old.response().await;
    assert_eq!(response.header("transfer-encoding"), None);
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.body, b"first,second");
}

#[tokio::test]
async fn oversized_heads_get_431_and_bad_versions_505_before_the_backend() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let response = raw_exchange(gateway.addr("public"), big.as_bytes()).await;
    assert_eq!(response.status, 431, "{response:?}");
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    let response = raw_exchange(
        gateway.addr("public"),
        format!("GET / HTTP/1.1\r\nHost: t\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(response.status, 431, "{response:?}");
    let response = raw_exchange(gateway.addr("public"), b"GET / HTTP/3.0\r\nHost: t\r\n\r\n").await;
    assert_eq!(response.status, 505, "{response:?}");
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_closes_at_the_header_timeout() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(
        &config_with_pool(&[backend.addr], "[[routes]]\npool = \"app\"\n").replace(
            "bind = \"127.0.0.1:0\"\n",
            "bind = \"127.0.0.1:0\"\nlimits = { request_header_timeout = \"600ms\" }\n",
        ),
    );
    let mut connection = RawConnection::open(gateway.addr("public")).await;
    // The timeout counts from the end of the last exchange, not from the first: pauses
    // shorter than it keep the connection open past it in all (750 ms).
    for pause in [0, 250, 250, 250] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        connection.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(connection.response().await.status, 200);
    }
    support::expect_closed(connection.stream).await;
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_upstream_request() {
    struct Dropped(Arc<tokio::sync::Notify>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.notify_one();
        }
    }
    let started = Arc::new(tokio::sync::Notify::new());
    let cancelled = Arc::new(tokio::sync::Notify::new());
    let (on_start, on_cancel) = (started.clone(), cancelled.clone());
    let backend = Backend::start(Arc::new(move |_request| {
        let (on_start, guard) = (on_start.clone(), Dropped(on_cancel.clone()));
        Box::pin(async move {
            let _guard = guard;
            on_start.notify_one();
            std::future::pending::<()>().await;
            Response::new(full("never"))
        })
    }))
    .await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let mut connection = RawConnection::open(gateway.addr("public")).await;
    connection
        .send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    tokio::time::timeout(PATIENCE, started.notified())
        .await
        .expect("the request reached the backend");
    drop(connection);
    tokio::time::timeout(PATIENCE, cancelled.notified())
        .await
        .expect("the backend's request was cancelled when the client left");
}

// ---------------------------------------------------------------------------------------
// The upstream HTTP/1.1 client: interim answers, framing, reuse
// ---------------------------------------------------------------------------------------

/// A raw keep-alive backend: answers each bodiless request head on a connection with
/// `reply(path)` and closes after answers that say `Connection: close`. Counts accepts.
async fn keep_alive_backend(reply: fn(&str) -> String) -> RawBackend {
    RawBackend::serving(move |mut stream| async move {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            while let Some(end) = find(&seen, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                seen.drain(..end + 4);
                let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                let answer = reply(&path);
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                if answer.to_ascii_lowercase().contains("connection: close") {
                    let _ = stream.shutdown().await;
                    return;
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

#[tokio::test]
async fn interim_backend_responses_are_skipped() {
    let backend = RawBackend::start(Some(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ))
    .await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let response = http1_client()
        .get(gateway.url("public", "/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn a_backend_body_delimited_by_close_reaches_the_client_whole() {
    let backend =
        RawBackend::start(Some(b"HTTP/1.0 200 OK\r\nX-Old: yes\r\n\r\nuntil the end")).await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let response = raw_exchange(gateway.addr("public"), b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("x-old"), Some("yes"));
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert!(
        String::from_utf8_lossy(&response.body).contains("until the end"),
        "{response:?}"
    );
}

#[tokio::test]
async fn a_backend_body_shorter_than_its_length_is_cut_off_not_completed() {
    let backend =
        RawBackend::start(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")).await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let mut connection = RawConnection::open(gateway.addr("public")).await;
    connection.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let head = read_head_only(&mut connection).await;
    assert!(
        head.to_ascii_lowercase().contains("content-length: 10"),
        "{head:?}"
    );
    tokio::time::timeout(PATIENCE, async { while connection.fill().await {} })
        .await
        .expect("the client connection closes when the backend's body falls short");
    assert_eq!(connection.data, b"abc");
}

#[tokio::test]
async fn upstream_connections_are_reused_only_after_a_clean_exchange() {
    let backend = keep_alive_backend(|path| match path {
        "/close" => "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nclose".into(),
        "/both" => "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4\r\nboth\r\n0\r\n\r\n"
            .into(),
        _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".into(),
    })
    .await;
    let gateway = Gateway::start(&forward_all(backend.addr, ""));
    let client = http1_client();
    let mut bodies = Vec::new();
    for path in ["/a", "/a", "/a", "/close", "/a", "/both", "/a"] {
        let response = client
            .get(gateway.url("public", path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        bodies.push(response.text().await.unwrap());
    }
    assert_eq!(bodies, ["ok", "ok", "ok", "close", "ok", "both", "ok"]);
    // One connection for the first four; a new one after `Connection: close`; another after
    // the response that carried both framing headers.
    assert_eq!(backend.accepted(), 3);
}

// ---------------------------------------------------------------------------------------
// HTTP-8 direct responses and redirects
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn direct_response_answers_without_touching_the_backend() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\nmatch = { path_prefix = \"/maint\" }\n\
         direct_response = { status = 503, body = \"maintenance\" }\n\n\
         [[routes]]\npool = \"app\"\n",
    ));
    let client = http1_client();
    let response = client
        .get(gateway.url("public", "/maint/page?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(is_hex_id(
        response.headers()["x-request-id"].to_str().unwrap()
    ));
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    assert_eq!(response.text().await.unwrap(), "maintenance");
    assert_eq!(backend.count(), 0);
    let line = gateway.wait_access_log(|line| line["path"] == "/maint/page");
    assert_eq!(line["status"], 503);

    // Other paths still go to the backend.
    let response = client
        .get(gateway.url("public", "/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn redirect_keeps_host_path_and_query() {
    let backend = Backend::echo().await;
    let gateway = Gateway::start(&config_with_pool(
        &[backend.addr],
        "[[routes]]\nmatch = { hosts = [\"old.example\"] }\n\
         redirect = { status = 301, location = \"https://{host}{request_uri}\" }\n",
    ));
    let response = http1_client()
        .get(gateway.url("public", "/a/b?c=d&e=f%20g"))
        .header("host", "old.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 301);
    assert_eq!(
        response.headers()["location"],
        "https://old.example/a/b?c=d&e=f%20g"
    );
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(backend.count(), 0);
}
