//! The connection pipeline over real sockets (SPEC CONN-3, CONN-4, CONN-5, CONN-6, CONN-8,
//! CONN-9): PROXY protocol in and out, the firewall on the real client address with GeoIP
//! and a rate limit, an edge → origin chain of two gateways, connection limits changed at
//! run time, slow clients dropped at their deadlines, and the L4 relay.
mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use gatehouse::listener::prefixed::Prefixed;
use gatehouse::listener::proxy_protocol;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use support::tls::{client_config, connect, get, Ca};
use support::{echoed_header, Backend, Gateway, PATIENCE};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/testdata/geoip")
        .join(name)
}

/// Connects from a chosen loopback source address (all of 127.0.0.0/8 is local on Linux),
/// so the gateway sees different clients.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends `prefix` then a GET, and returns the status line and body, or None when the
/// gateway closed the connection without answering.
async fn raw_get(mut stream: TcpStream, prefix: &[u8], path: &str) -> Option<(u16, String)> {
    let mut request = prefix.to_vec();
    request.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes(),
    );
    if stream.write_all(&request).await.is_err() {
        return None;
    }
    let mut answer = Vec::new();
    match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await {
        Ok(Ok(_)) | Ok(Err(_)) => {}
        Err(_) => panic!("no answer and no close within {PATIENCE:?}"),
    }
    if answer.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Some((status, body))
}

/// The first X-Forwarded-For entry the echo backend saw.
fn forwarded_for(body: &str) -> String {
    let answer: serde_json::Value = serde_json::from_str(body).expect("echo json");
    echoed_header(&answer, "x-forwarded-for")
        .first()
        .cloned()
        .unwrap_or_default()
}

fn v1(source: &str, destination: &str) -> Vec<u8> {
    proxy_protocol::encode_v1(source.parse().unwrap(), destination.parse().unwrap())
}

/// A real TLS ClientHello for `sni`, as a client's first flight.
fn client_hello(sni: &str) -> Vec<u8> {
    let config = client_config(&Ca::new("x").pem(), &["http/1.1"], None);
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// One entry per upstream connection: the source its PROXY header announced, and how many
/// requests it carried.
type SeenConnections = Arc<Mutex<Vec<(Option<SocketAddr>, Arc<AtomicUsize>)>>>;

/// An HTTP backend behind a PROXY header: records the source of every connection's
/// header and counts requests per connection.
struct ProxyAwareBackend {
    addr: SocketAddr,
    connections: SeenConnections,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyAwareBackend {
    async fn start() -> ProxyAwareBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: SeenConnections = Arc::default();
        let seen = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    let deadline = tokio::time::Instant::now() + PATIENCE;
                    let Ok(header) =
                        proxy_protocol::read_header(&mut stream, &mut buf, deadline, 4096).await
                    else {
                        return;
                    };
                    let requests = Arc::new(AtomicUsize::new(0));
                    seen.lock().unwrap().push((header.source, requests.clone()));
                    let source = header.source;
                    let service = hyper::service::service_fn(move |request| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let source = source;
                        async move {
                            let _ = request;
                            Ok::<_, std::convert::Infallible>(http::Response::new(support::full(
                                format!("{source:?}"),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(Prefixed::new(buf, stream)), service)
                        .await;
                });
            }
        });
        ProxyAwareBackend {
            addr,
            connections,
            task,
        }
    }

    fn seen(&self) -> Vec<(Option<SocketAddr>, usize)> {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .map(|(source, count)| (*source, count.load(Ordering::SeqCst)))
            .collect()
    }
}

impl Drop for ProxyAwareBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn listener_with_proxy(name: &str, trusted: &str, extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "{name}"
bind = "127.0.0.1:0"
proxy_protocol = {{ trusted_cidrs = ["{trusted}"], timeout = "500ms" }}
{extra}
"#
    )
}

fn forward_all(app: SocketAddr) -> String {
    format!("[[pools]]\nname = \"app\"\nendpoints = [\"{app}\"]\n\n[[routes]]\npool = \"app\"\n")
}

// ---------------------------------------------------------------------------------------
// Must-show 5: PROXY protocol receive
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn proxy_headers_v1_and_v2_make_the_carried_address_the_client() {
    let app = Backend::echo().await;
    let config = format!(
        "{}{}",
        listener_with_proxy("edge", "127.0.0.1/32", ""),
        forward_all(app.addr)
    );
    let gateway = Gateway::start(&config);
    let edge = gateway.addr("edge");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "v1 TCP4",
            v1("203.0.113.9:5555", "10.0.0.1:80"),
            "203.0.113.9",
        ),
        (
            "v1 TCP6",
            v1("[2001:db8::7]:5555", "[2001:db8::1]:80"),
            "2001:db8::7",
        ),
        ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n".to_vec(), "127.0.0.1"),
        (
            "v2 PROXY with TLVs",
            proxy_protocol::encode_v2(
                "198.51.100.20:4000".parse().unwrap(),
                "10.0.0.1:443".parse().unwrap(),
                &[(0x01, b"h2"), (0x02, b"example.com")],
            ),
            "198.51.100.20",
        ),
        ("v2 LOCAL", proxy_protocol::encode_v2_local(), "127.0.0.1"),
    ];
    for (what, header, expected) in cases {
        let stream = TcpStream::connect(edge).await.unwrap();
        let (status, body) = raw_get(stream, &header, "/")
            .await
            .unwrap_or_else(|| panic!("{what}: connection closed"));
        assert_eq!(status, 200, "{what}");
        assert_eq!(forwarded_for(&body), expected, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_untrusted_proxy_headers_are_reset_and_counted() {
    let app = Backend::echo().await;
    let text = format!(
        "access_log = {{ enabled = false }}\n{}{}{}",
        listener_with_proxy("edge", "127.0.0.1/32", ""),
        listener_with_proxy("picky", "10.9.9.9/32", ""),
        forward_all(app.addr)
    );
    let config =
        gatehouse::config::parse_str(&text, gatehouse::config::Format::Toml, Vec::new()).unwrap();
    let gateway = gatehouse::gateway::Gateway::start(config, None)
        .await
        .unwrap();
    let addrs = gateway.local_addrs();
    let edge = addrs["edge"];

    let mut oversized = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    oversized.extend_from_slice(&(60_000u16).to_be_bytes());
    let malformed = [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n".to_vec(),
        b"PROXY TCP4 not-an-address 5.6.7.8 1 80\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        oversized,
    ];
    for header in &malformed {
        let stream = TcpStream::connect(edge).await.unwrap();
        assert!(raw_get(stream, header, "/").await.is_none(), "{header:?}");
    }
    // Truncated: the client closes inside the header.
    let mut stream = TcpStream::connect(edge).await.unwrap();
    stream.write_all(b"PROXY TCP4 1.2.3.4 ").await.unwrap();
    let _ = stream.shutdown().await;
    support::expect_closed(stream).await;
    // Late: half a header, then nothing until the deadline.
    let mut stream = TcpStream::connect(edge).await.unwrap();
    stream.write_all(b"\r\n\r\n\0\r\nQUIT\n").await.unwrap();
    support::expect_closed(stream).await;
    // A header from a peer outside the trusted networks: reset right after accept, which
    // can reach the client before its connect() call has returned.
    if let Ok(stream) = TcpStream::connect(addrs["picky"]).await {
        assert!(raw_get(stream, &v1("1.2.3.4:1", "5.6.7.8:80"), "/")
            .await
            .is_none());
    }
    let picky = gateway.listener_stats("picky").unwrap();
    let deadline = Instant::now() + PATIENCE;
    while picky.rejected_proxy_untrusted.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the untrusted peer was never refused"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let stats = gateway.listener_stats("edge").unwrap();
    assert_eq!(stats.rejected_proxy_header.load(Ordering::Relaxed), 6);
    assert_eq!(picky.rejected_proxy_untrusted.load(Ordering::Relaxed), 1);
    assert_eq!(app.count(), 0, "nothing reached the backend");
}

// ---------------------------------------------------------------------------------------
// Must-show 6: PROXY v2 send on L7, connections kept per client
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn l7_sends_proxy_v2_once_per_upstream_connection_and_never_shares_them() {
    let backend = ProxyAwareBackend::start().await;
    let config = format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[pools]]
name = "app"
endpoints = ["{}"]
send_proxy_protocol = "v2"

[[routes]]
pool = "app"
"#,
        backend.addr
    );
    let gateway = Gateway::start(&config);
    let public = gateway.addr("public");
    // Two keep-alive requests from client A, one from client B.
    let mut senders = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3"] {
        let stream = connect_from(source, public).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(sender);
    }
    let request = || {
        http::Request::get("/")
            .header("host", "app")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    for index in [0, 0, 1] {
        let response = senders[index].send_request(request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.into_body().collect().await.unwrap();
    }
    let mut seen = backend.seen();
    seen.sort_by_key(|(source, _)| source.map(|s| s.ip()));
    let sources: Vec<(Option<IpAddr>, usize)> =
        seen.iter().map(|(s, n)| (s.map(|s| s.ip()), *n)).collect();
    assert_eq!(
        sources,
        vec![
            (Some("127.0.0.2".parse().unwrap()), 2),
            (Some("127.0.0.3".parse().unwrap()), 1)
        ],
        "one upstream connection per client, each announcing its own client"
    );
}

// ---------------------------------------------------------------------------------------
// Must-show 7: edge (L4 passthrough, PROXY v2) → origin (PROXY in, TLS, L7) → backend
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn edge_to_origin_keeps_the_client_address_and_the_origin_firewall_sees_it() {
    let ca = Ca::new("Origin CA");
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.server(&["site.test"]).write(dir.path(), "origin");
    let origin = Gateway::start(&format!(
        r#"
[firewall]
deny_ips = ["127.0.0.5"]

[[listeners]]
name = "origin"
bind = "127.0.0.1:0"
protocol = "tls"
proxy_protocol = {{ trusted_cidrs = ["127.0.0.1/32"] }}
[listeners.tls]

[[tls.certificates]]
cert = "{}"
key = "{}"

{}"#,
        cert.display(),
        key.display(),
        forward_all(app.addr)
    ));
    let edge = Gateway::start(&format!(
        r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]
unknown_sni = "reset"
[[listeners.tls.passthrough]]
sni = ["site.test"]
pool = "origin"
send_proxy_protocol = "v2"

[[pools]]
name = "origin"
endpoints = ["{}"]
"#,
        origin.addr("origin")
    ));
    let client = client_config(&ca.pem(), &["h2", "http/1.1"], None);
    let tls = tokio_rustls::TlsConnector::from(client.clone());
    let name = rustls::pki_types::ServerName::try_from("site.test").unwrap();

    let tcp = connect_from("127.0.0.2", edge.addr("edge")).await;
    let stream = tls
        .connect(name.clone(), tcp)
        .await
        .expect("through edge to origin");
    let (status, _, body) = get(stream, "site.test", "/hop").await;
    assert_eq!(status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed_header(&answer, "x-forwarded-for"), vec!["127.0.0.2"]);
    assert_eq!(app.count(), 1);

    // 127.0.0.5 is denied at the origin even though the edge (127.0.0.1) is allowed.
    let tcp = connect_from("127.0.0.5", edge.addr("edge")).await;
    assert!(
        tls.connect(name, tcp).await.is_err(),
        "the origin must reset the blocked client"
    );
    origin.stderr.wait_for(0, PATIENCE, |line| {
        line.contains("gatehouse firewall: blocked 127.0.0.5 listener=origin reason=ip")
    });
    assert_eq!(app.count(), 1, "the backend is never reached");
    // Plain connect through the edge, to be sure the connection works at all for others.
    let stream = connect(edge.addr("edge"), "site.test", client)
        .await
        .unwrap();
    let (status, _, _) = get(stream, "site.test", "/").await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// Must-show 8: firewall
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn firewall_blocks_by_ip_cidr_country_and_rate_and_logs_for_fail2ban() {
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let geoip = dir.path().join("country.mmdb");
    std::fs::copy(testdata("GeoLite2-Country-Test.mmdb"), &geoip).unwrap();
    let config = format!(
        r#"
watch_interval = "0s"
{}
firewall = {{ deny_ips = ["198.51.100.7"], deny_cidrs = ["203.0.113.0/24"], deny_countries = ["GB", "US"], geoip_db = "{geoip}", rate_limit = {{ connections = 3, window = "1h" }} }}
{}
firewall = {{ mode = "allow_only", allow_countries = ["SE"], geoip_db = "{geoip}" }}
{}"#,
        listener_with_proxy("edge", "127.0.0.1/32", ""),
        listener_with_proxy("nordic", "127.0.0.1/32", ""),
        forward_all(app.addr),
        geoip = geoip.display(),
    );
    let gateway = Gateway::start(&config);
    let edge = gateway.addr("edge");
    let through = |addr: SocketAddr, source: &'static str| async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        raw_get(stream, &v1(&format!("{source}:1000"), "10.0.0.1:80"), "/")
            .await
            .map(|(status, _)| status)
    };
    for (source, reason) in [
        ("198.51.100.7", "ip"),
        ("203.0.113.50", "cidr"),
        ("81.2.69.142", "country"),
        ("216.160.83.56", "country"),
    ] {
        assert_eq!(through(edge, source).await, None, "{source} must be reset");
        gateway.stderr.wait_for(0, PATIENCE, |line| {
            line.contains(&format!(
                "gatehouse firewall: blocked {source} listener=edge reason={reason}"
            ))
        });
    }
    // Three connections per hour from one address, then reset.
    for _ in 0..3 {
        assert_eq!(through(edge, "89.160.20.115").await, Some(200));
    }
    assert_eq!(through(edge, "89.160.20.115").await, None);
    gateway.stderr.wait_for(0, PATIENCE, |line| {
        line.contains("blocked 89.160.20.115 listener=edge reason=rate")
    });
    // A denied address spends no quota: it stays "ip", never becomes "rate".
    for _ in 0..5 {
        assert_eq!(through(edge, "198.51.100.7").await, None);
    }
    assert!(!gateway
        .stderr
        .snapshot()
        .iter()
        .any(|line| line.contains("blocked 198.51.100.7 listener=edge reason=rate")));

    // Allow-only: Sweden in, everyone else out.
    let nordic = gateway.addr("nordic");
    assert_eq!(through(nordic, "89.160.20.113").await, Some(200));
    assert_eq!(through(nordic, "2.125.160.216").await, None);

    // GeoIP reload without a restart: swap in the other database (where 149.101.100.1
    // is in the US) and SIGHUP with the same config.
    assert_eq!(through(edge, "149.101.100.1").await, Some(200));
    std::fs::copy(testdata("GeoIP2-Country-Test.mmdb"), &geoip).unwrap();
    assert!(gateway.reload_with(&config).contains("reload succeeded"));
    assert_eq!(through(edge, "149.101.100.1").await, None);
}

// ---------------------------------------------------------------------------------------
// Must-show 9: max_connections, changed at run time
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_closes_the_extra_connection_and_changes_at_run_time() {
    let app = Backend::echo().await;
    let text = format!(
        "access_log = {{ enabled = false }}\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\nmax_connections = 2\n{}",
        forward_all(app.addr)
    );
    let config =
        gatehouse::config::parse_str(&text, gatehouse::config::Format::Toml, Vec::new()).unwrap();
    let gateway = gatehouse::gateway::Gateway::start(config, None)
        .await
        .unwrap();
    let public = gateway.local_addrs()["public"];
    let stats = gateway.listener_stats("public").unwrap();

    async fn open(
        addr: SocketAddr,
    ) -> hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("/")
            .header("host", "x")
            .body(Empty::new())
            .unwrap();
        let response = sender.send_request(request).await.expect("served");
        response.into_body().collect().await.unwrap();
        sender
    }
    async fn wait_active(stats: &gatehouse::listener::ListenerStats, expected: usize) {
        let deadline = Instant::now() + PATIENCE;
        while stats.active.load(Ordering::Relaxed) != expected {
            assert!(Instant::now() < deadline, "active never became {expected}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    let first = open(public).await;
    let _second = open(public).await;
    support::expect_closed(TcpStream::connect(public).await.unwrap()).await;
    assert_eq!(stats.rejected_limit.load(Ordering::Relaxed), 1);
    drop(first);
    wait_active(&stats, 1).await;
    let _third = open(public).await;
    // Raised through the library call: a third concurrent connection is served.
    assert!(gateway.set_max_connections("public", 3));
    let _fourth = open(public).await;
    wait_active(&stats, 3).await;
    support::expect_closed(TcpStream::connect(public).await.unwrap()).await;
    assert_eq!(stats.rejected_limit.load(Ordering::Relaxed), 2);
    assert!(!gateway.set_max_connections("nope", 1));
}

// ---------------------------------------------------------------------------------------
// Must-show 10: slow clients
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn slow_clients_are_dropped_at_their_timeouts_without_delaying_others() {
    let ca = Ca::new("Slow CA");
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.server(&["site.test"]).write(dir.path(), "site");
    let config = format!(
        r#"
[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]
client_hello_timeout = "400ms"

[[listeners]]
name = "proxied"
bind = "127.0.0.1:0"
proxy_protocol = {{ trusted_cidrs = ["127.0.0.1/32"], timeout = "400ms" }}

[[listeners]]
name = "plain"
bind = "127.0.0.1:0"
limits = {{ request_header_timeout = "400ms" }}

[[tls.certificates]]
cert = "{}"
key = "{}"
{}"#,
        cert.display(),
        key.display(),
        forward_all(app.addr)
    );
    let gateway = Gateway::start(&config);
    let hello = client_hello("site.test");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("tls", hello[..hello.len() / 2].to_vec()),
        ("proxied", b"PROXY TCP4 1.2.3.4 ".to_vec()),
        ("plain", b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec()),
    ];
    for (listener, partial) in cases {
        let addr = gateway.addr(listener);
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(&partial).await.unwrap();
        let started = Instant::now();
        // Another client is served while the slow one hangs.
        let served = match listener {
            "tls" => {
                let stream = connect(
                    addr,
                    "site.test",
                    client_config(&ca.pem(), &["http/1.1"], None),
                )
                .await
                .unwrap();
                get(stream, "site.test", "/").await.0 == StatusCode::OK
            }
            "proxied" => {
                let stream = TcpStream::connect(addr).await.unwrap();
                raw_get(stream, &v1("1.2.3.4:1", "5.6.7.8:80"), "/")
                    .await
                    .map(|r| r.0)
                    == Some(200)
            }
            _ => {
                let stream = TcpStream::connect(addr).await.unwrap();
                raw_get(stream, b"", "/").await.map(|r| r.0) == Some(200)
            }
        };
        assert!(
            served,
            "{listener}: another client must be served meanwhile"
        );
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(PATIENCE, slow.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{listener}: the slow client was never dropped"));
        let elapsed = started.elapsed();
        // A 408 for the slow HTTP header is fine; no request ever reached the backend.
        if let Ok(n) = read {
            assert!(
                n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"),
                "{listener}"
            );
        }
        assert!(
            elapsed >= Duration::from_millis(300),
            "{listener}: dropped after {elapsed:?}, before its timeout"
        );
    }
}

#[tokio::test]
async fn the_first_header_timeout_counts_from_the_connection_not_from_its_first_byte() {
    let app = Backend::echo().await;
    let config = format!(
        r#"
[[listeners]]
name = "plain"
bind = "127.0.0.1:0"
limits = {{ request_header_timeout = "400ms" }}
{}"#,
        forward_all(app.addr)
    );
    let gateway = Gateway::start(&config);
    let mut slow = TcpStream::connect(gateway.addr("plain")).await.unwrap();
    let connected = Instant::now();
    // Silent for most of the timeout, then a head that never completes: the whole first
    // head gets 400 ms from the connection, not 400 ms more from its first byte.
    tokio::time::sleep(Duration::from_millis(350)).await;
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(PATIENCE, slow.read(&mut buf))
        .await
        .expect("the slow client was never dropped");
    let elapsed = connected.elapsed();
    if let Ok(n) = read {
        assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"));
    }
    assert!(
        elapsed >= Duration::from_millis(380) && elapsed < Duration::from_millis(700),
        "dropped {elapsed:?} after connecting; the timeout is 400 ms from the connection"
    );
}

// ---------------------------------------------------------------------------------------
// Must-show 12: L4 relay
// ---------------------------------------------------------------------------------------

/// A raw TCP backend: reads until EOF, then writes what it counted and closes.
async fn counting_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                // Half-close: the client's EOF arrived, and the answer still flows back.
                let _ = stream.write_all(format!("got {total}").as_bytes()).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn l4_relay_propagates_half_close_times_out_idle_and_streams_1gib_in_bounded_memory() {
    let (backend, _task) = counting_backend().await;
    let config = format!(
        r#"
[[listeners]]
name = "tcp"
bind = "127.0.0.1:0"
protocol = "tcp"
tcp = {{ pool = "raw", idle_timeout = "500ms" }}

[[listeners]]
name = "sni"
bind = "127.0.0.1:0"
protocol = "tls"
splice = true
[listeners.tls]
unknown_sni = "reset"
[[listeners.tls.passthrough]]
sni = ["bulk.test"]
pool = "raw"

[[pools]]
name = "raw"
endpoints = ["{backend}"]
"#
    );
    let gateway = Gateway::start(&config);

    // Half-close both ways.
    let mut stream = TcpStream::connect(gateway.addr("tcp")).await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 5");

    // Idle: nothing either way for 500 ms closes the relay.
    let mut stream = TcpStream::connect(gateway.addr("tcp")).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("the idle relay must be closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));

    // 1 GiB through the buffered relay (the tcp listener) and through a passthrough route
    // on a `splice = true` listener (a real ClientHello, then bulk bytes).
    let chunk = vec![0x5au8; 1 << 20];
    for (listener, hello) in [("tcp", Vec::new()), ("sni", client_hello("bulk.test"))] {
        let baseline = gateway.rss_kib();
        let sampler = gateway.sample_rss(Duration::from_millis(20));
        let mut stream = TcpStream::connect(gateway.addr(listener)).await.unwrap();
        stream.write_all(&hello).await.unwrap();
        for _ in 0..1024 {
            stream.write_all(&chunk).await.unwrap();
        }
        stream.shutdown().await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(120), stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, format!("got {}", hello.len() as u64 + (1 << 30)));
        let peak = sampler.stop().await;
        assert!(
            peak.saturating_sub(baseline) < 32 * 1024,
            "{listener}: RSS grew from {baseline} KiB to {peak} KiB relaying 1 GiB"
        );
    }
}

#[tokio::test]
async fn passthrough_to_a_tls_backend_sends_proxy_v2_before_the_client_hello() {
    // The origin in the edge → origin test parses it too; this checks the bytes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let gateway = Gateway::start(&format!(
        r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]
unknown_sni = {{ passthrough = "raw" }}
passthrough = [{{ sni = ["a.test"], pool = "raw", send_proxy_protocol = "v2" }}]

[[pools]]
name = "raw"
endpoints = ["{backend}"]
"#
    ));
    let mut client = connect_from("127.0.0.7", gateway.addr("edge")).await;
    let hello = client_hello("a.test");
    client.write_all(&hello).await.unwrap();
    let (mut upstream, _) = listener.accept().await.unwrap();
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let header = proxy_protocol::read_header(&mut upstream, &mut buf, deadline, 4096)
        .await
        .unwrap();
    assert_eq!(header.version, 2);
    assert_eq!(header.source.unwrap().ip().to_string(), "127.0.0.7");
    assert_eq!(header.destination.unwrap(), gateway.addr("edge"));
    while buf.len() < hello.len() {
        let mut more = [0u8; 4096];
        let n = upstream.read(&mut more).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&more[..n]);
    }
    assert_eq!(
        &buf[..],
        &hello[..],
        "the ClientHello is replayed byte for byte"
    );

    // Unknown names go to the default passthrough pool, without a PROXY header.
    let mut client = TcpStream::connect(gateway.addr("edge")).await.unwrap();
    let hello = client_hello("other.test");
    client.write_all(&hello).await.unwrap();
    let (mut upstream, _) = listener.accept().await.unwrap();
    let mut got = vec![0u8; hello.len()];
    upstream.read_exact(&mut got).await.unwrap();
    assert_eq!(got, hello);
}
