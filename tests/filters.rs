//! Response filters and header transforms through the real binary (SPEC POLICY-5,
//! POLICY-6): templates on request and response headers, CORS preflights answered by the
//! gateway and CORS headers on actual responses, and compression negotiated by
//! `Accept-Encoding` — each encoding decoded here and compared byte for byte, the skip
//! rules, and a streamed body that reaches the client before the backend has finished.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use support::{config_with_pool, echoed_header, full, Backend, Gateway, TestBody, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

#[tokio::test]
async fn header_transforms_render_templates_on_request_and_response() {
    let backend = Backend::echo().await;
    let routes = r#"
[[routes]]
name = "web"
pool = "app"
[routes.request_headers]
remove = ["x-secret"]
set = { "x-client" = "{client_ip}", "x-where" = "{route}/{pool} {method} {host}{path}" }
add = { "x-trace" = "id={request_id}", "x-tag" = "literal {{braces}}" }
[routes.response_headers]
remove = ["x-backend"]
set = { "x-served-by" = "{pool}" }
add = { "x-request" = "{method} {path} {request_id}" }
"#;
    let gateway = Gateway::start(&config_with_pool(&[backend.addr], routes));
    let response = client()
        .get(gateway.url("public", "/a/b?q=1"))
        .header("x-secret", "hunter2")
        .header("x-tag", "from-client")
        .header("x-request-id", "req-abc-123")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let echo: serde_json::Value = response.json().await.expect("echo");
    let host = format!("127.0.0.1:{}", gateway.addr("public").port());
    assert!(echoed_header(&echo, "x-secret").is_empty());
    assert_eq!(echoed_header(&echo, "x-client"), ["127.0.0.1"]);
    assert_eq!(
        echoed_header(&echo, "x-where"),
        [format!("web/app GET {host}/a/b")]
    );
    assert_eq!(echoed_header(&echo, "x-trace"), ["id=req-abc-123"]);
    assert_eq!(
        echoed_header(&echo, "x-tag"),
        ["from-client", "literal {braces}"]
    );
    assert!(headers.get("x-backend").is_none());
    assert_eq!(headers["x-served-by"], "app");
    assert_eq!(headers["x-request"], "GET /a/b req-abc-123");
}

#[test]
fn unknown_template_placeholders_are_config_errors_with_field_paths() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[pools]]
name = "a"
endpoints = ["127.0.0.1:1"]

[[routes]]
pool = "a"
request_headers = { set = { "x-user" = "{user}" }, remove = ["bad header"] }
response_headers = { add = { "x-a" = "{host" } }
cors = { allow_origins = ["https://a.test/path"], allow_methods = ["G ET"] }
compression = { algorithms = ["gzip", "gzip"], types = ["html"] }
"#;
    let errors = gatehouse::config::parse_str(text, gatehouse::config::Format::Toml, Vec::new())
        .expect_err("invalid")
        .0;
    let lines: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect();
    for expected in [
        "routes[0].request_headers.set.x-user: unknown placeholder {user}",
        "routes[0].request_headers.remove[0]: \"bad header\" is not a valid header name",
        "routes[0].response_headers.add.x-a: unclosed \"{\"",
        "routes[0].cors.allow_origins[0]: \"https://a.test/path\" must be scheme://host[:port]",
        "routes[0].cors.allow_methods[0]: \"G ET\" is not a method",
        "routes[0].compression.algorithms[1]: \"gzip\" is listed twice",
        "routes[0].compression.types[0]: \"html\" is not a media type",
    ] {
        assert!(
            lines.iter().any(|line| line.starts_with(expected)),
            "missing {expected:?} in {lines:#?}"
        );
    }
}

#[tokio::test]
async fn cors_preflights_are_answered_by_the_gateway_and_responses_get_headers() {
    let backend = Backend::echo().await;
    let routes = r#"
[[routes]]
pool = "app"
[routes.cors]
allow_origins = ["https://app.test", "https://*.example.org"]
allow_methods = ["GET", "POST", "PUT"]
allow_headers = ["X-Token", "Content-Type"]
expose_headers = ["X-Total"]
allow_credentials = true
max_age = "10m"
"#;
    let gateway = Gateway::start(&config_with_pool(&[backend.addr], routes));
    let client = client();
    let url = gateway.url("public", "/items");

    let preflight = |origin: &'static str, method: &'static str, headers: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
    };
    let response = preflight("https://app.test", "PUT", "x-token, content-type")
        .await
        .expect("preflight");
    assert_eq!(response.status(), 204);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.test");
    assert_eq!(h["access-control-allow-methods"], "GET, POST, PUT");
    assert_eq!(h["access-control-allow-headers"], "X-Token, Content-Type");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    let vary: Vec<_> = h.get_all("vary").iter().collect();
    assert!(
        vary.iter().any(|v| v.to_str().unwrap().contains("Origin")),
        "{vary:?}"
    );
    // A wildcard subdomain is allowed; a disallowed origin, method or header gets a 204
    // with no CORS headers (the browser refuses).
    let response = preflight("https://shop.example.org", "GET", "x-token")
        .await
        .expect("preflight");
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://shop.example.org"
    );
    for (origin, method, headers) in [
        ("https://evil.test", "GET", "x-token"),
        ("https://example.org", "GET", "x-token"),
        ("https://app.test", "DELETE", "x-token"),
        ("https://app.test", "GET", "x-other"),
    ] {
        let response = preflight(origin, method, headers).await.expect("preflight");
        assert_eq!(response.status(), 204, "{origin} {method} {headers}");
        assert!(
            !response
                .headers()
                .keys()
                .any(|name| name.as_str().starts_with("access-control-")),
            "{origin} {method} {headers}: {:?}",
            response.headers()
        );
    }
    assert_eq!(backend.count(), 0, "a preflight reached the upstream");

    // Actual requests reach the upstream and get the CORS headers when allowed.
    let response = client
        .get(&url)
        .header("origin", "https://app.test")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.test");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-expose-headers"], "X-Total");
    assert_eq!(h["vary"], "Origin");
    assert!(h.get("access-control-allow-methods").is_none());
    let response = client
        .post(&url)
        .header("origin", "https://evil.test")
        .body("x")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    assert_eq!(response.headers()["vary"], "Origin");
    // An OPTIONS that is not a preflight (no Access-Control-Request-Method) is forwarded.
    let response = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.test")
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()["x-backend"], "echo");
    assert_eq!(backend.count(), 3);
}

/// The compressible test document: repetitive text, so every encoding shrinks it.
fn document() -> Vec<u8> {
    (0..400)
        .flat_map(|i| {
            format!("line {i}: the quick brown fox jumps over the lazy dog\n").into_bytes()
        })
        .collect()
}

type Chunks = Arc<Mutex<Option<mpsc::Receiver<Bytes>>>>;

/// A backend whose answers depend on the path; `/stream` sends what the test pushes into
/// the channel, as it arrives.
async fn compression_backend(chunks: Chunks) -> Backend {
    Backend::start(Arc::new(move |request: Request<Incoming>| {
        let chunks = chunks.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            let text = |body: Vec<u8>, content_type: &'static str| {
                let length = body.len();
                let mut response = Response::new(full(body));
                let headers = response.headers_mut();
                headers.insert("content-type", content_type.parse().unwrap());
                headers.insert("content-length", length.into());
                headers.insert("etag", "\"v1\"".parse().unwrap());
                response
            };
            match path.as_str() {
                "/text" => text(document(), "text/plain; charset=utf-8"),
                "/json" => text(document(), "application/json"),
                "/small" => text(b"tiny".to_vec(), "text/plain"),
                "/png" => text(document(), "image/png"),
                "/no-transform" => {
                    let mut response = text(document(), "text/html");
                    response
                        .headers_mut()
                        .insert("cache-control", "public, no-transform".parse().unwrap());
                    response
                }
                "/encoded" => {
                    let mut response = text(b"already gzipped bytes".repeat(100), "text/plain");
                    response
                        .headers_mut()
                        .insert("content-encoding", "gzip".parse().unwrap());
                    response
                }
                "/stream" => {
                    let receiver = chunks.lock().unwrap().take();
                    let stream = futures_util::stream::unfold(receiver, |receiver| async move {
                        let mut receiver = receiver?;
                        let chunk = receiver.recv().await?;
                        Some((Ok::<_, Infallible>(Frame::data(chunk)), Some(receiver)))
                    });
                    let body: TestBody = StreamBody::new(stream)
                        .map_err(|never: Infallible| match never {})
                        .boxed();
                    let mut response = Response::new(body);
                    response
                        .headers_mut()
                        .insert("content-type", "text/event-stream".parse().unwrap());
                    response
                }
                _ => Response::new(full("?")),
            }
        })
    }))
    .await
}

async fn decode(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => GzipDecoder::new(bytes).read_to_end(&mut out).await,
        "br" => BrotliDecoder::new(bytes).read_to_end(&mut out).await,
        "zstd" => ZstdDecoder::new(bytes).read_to_end(&mut out).await,
        other => panic!("unexpected encoding {other}"),
    }
    .unwrap_or_else(|err| panic!("{encoding} does not decode: {err}"));
    out
}

#[tokio::test]
async fn compression_is_negotiated_and_decodes_to_the_original_bytes() {
    let backend = compression_backend(Arc::new(Mutex::new(None))).await;
    let routes = r#"
[[routes]]
pool = "app"
compression = { algorithms = ["br", "zstd", "gzip"], min_size = "256B" }
"#;
    let gateway = Gateway::start(&config_with_pool(&[backend.addr], routes));
    let client = client();
    let get = |path: &str, accept: Option<&'static str>| {
        let mut request = client.get(gateway.url("public", path));
        if let Some(accept) = accept {
            request = request.header("accept-encoding", accept);
        }
        request.send()
    };

    for (accept, expected) in [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, deflate, br, zstd", "br"),
        ("gzip;q=1.0, br;q=0.5, zstd;q=0.8", "gzip"),
        ("br;q=0, zstd;q=0, *", "gzip"),
        ("identity;q=0.5, zstd", "zstd"),
    ] {
        for path in ["/text", "/json"] {
            let response = get(path, Some(accept)).await.expect("request");
            assert_eq!(response.status(), 200);
            let h = response.headers().clone();
            assert_eq!(h["content-encoding"], expected, "{path} {accept}");
            assert!(h.get("content-length").is_none(), "{path} {accept}");
            assert_eq!(h["vary"], "Accept-Encoding");
            assert_eq!(h["etag"], "W/\"v1\"");
            let body = response.bytes().await.expect("body");
            assert!(
                body.len() < document().len() / 4,
                "{accept}: {} bytes",
                body.len()
            );
            assert_eq!(decode(expected, &body).await, document(), "{path} {accept}");
        }
    }

    // Not compressed: no acceptable encoding (identity only, q=0 for all, no header),
    // HEAD, small bodies, images, already encoded, no-transform.
    for (path, accept) in [
        ("/text", Some("identity")),
        ("/text", Some("gzip;q=0, br;q=0, zstd;q=0")),
        ("/text", Some("*;q=0")),
        ("/text", None),
        ("/small", Some("gzip")),
        ("/png", Some("gzip")),
        ("/no-transform", Some("gzip")),
    ] {
        let response = get(path, accept).await.expect("request");
        assert!(
            response.headers().get("content-encoding").is_none(),
            "{path} {accept:?}"
        );
        assert!(response.headers().get("content-length").is_some());
        let expected_vary = path == "/text";
        assert_eq!(
            response.headers().get("vary").is_some(),
            expected_vary,
            "{path} {accept:?}"
        );
        let body = response.bytes().await.expect("body");
        if path != "/small" {
            assert_eq!(body.as_ref(), document(), "{path} {accept:?}");
        }
    }
    let response = get("/encoded", Some("br")).await.expect("request");
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert_eq!(
        response.bytes().await.unwrap().as_ref(),
        b"already gzipped bytes".repeat(100)
    );
    // Over HTTP/2 (h2c) too: DATA frames instead of chunked encoding.
    let response = support::h2c_client()
        .get(gateway.url("public", "/json"))
        .header("accept-encoding", "zstd, gzip;q=0.5")
        .send()
        .await
        .expect("h2c request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.headers()["content-encoding"], "zstd");
    let body = response.bytes().await.expect("body");
    assert_eq!(decode("zstd", &body).await, document());
    let response = client
        .head(gateway.url("public", "/text"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("head");
    assert!(response.headers().get("content-encoding").is_none());
}

#[tokio::test]
async fn compressed_streams_reach_the_client_chunk_by_chunk() {
    for encoding in ["gzip", "br", "zstd"] {
        let (sender, receiver) = mpsc::channel::<Bytes>(4);
        let chunks: Chunks = Arc::new(Mutex::new(Some(receiver)));
        let backend = compression_backend(chunks).await;
        let routes = "[[routes]]\npool = \"app\"\ncompression = {}\n";
        let gateway = Gateway::start(&config_with_pool(&[backend.addr], routes));
        let first = Bytes::from_static(b"data: first event, sent alone\n\n");
        sender.send(first.clone()).await.expect("first chunk");
        let mut response = client()
            .get(gateway.url("public", "/stream"))
            .header("accept-encoding", encoding)
            .send()
            .await
            .expect("request");
        assert_eq!(response.headers()["content-encoding"], encoding);

        // The backend holds the rest back until the client has seen the first event:
        // a buffering gateway would never deliver it and this would time out.
        let started = Instant::now();
        let mut received = Vec::new();
        let mut decoder = StreamDecoder::new(encoding);
        while decoder.output() != first.as_ref() {
            let chunk = response
                .chunk()
                .await
                .expect("chunk")
                .expect("stream ended before the first event");
            received.extend_from_slice(&chunk);
            decoder.push(&chunk).await;
            assert!(started.elapsed() < PATIENCE, "first event never arrived");
        }
        let last = Bytes::from_static(b"data: last event\n\n");
        sender.send(last.clone()).await.expect("last chunk");
        drop(sender);
        while let Some(chunk) = response.chunk().await.expect("chunk") {
            received.extend_from_slice(&chunk);
        }
        let mut expected = first.to_vec();
        expected.extend_from_slice(&last);
        assert_eq!(decode(encoding, &received).await, expected, "{encoding}");
    }
}

/// Decodes a compressed stream incrementally (write side: each push is flushed).
enum StreamDecoder {
    Gzip(async_compression::tokio::write::GzipDecoder<Vec<u8>>),
    Br(async_compression::tokio::write::BrotliDecoder<Vec<u8>>),
    Zstd(async_compression::tokio::write::ZstdDecoder<Vec<u8>>),
}

impl StreamDecoder {
    fn new(encoding: &str) -> StreamDecoder {
        match encoding {
            "gzip" => {
                StreamDecoder::Gzip(async_compression::tokio::write::GzipDecoder::new(Vec::new()))
            }
            "br" => StreamDecoder::Br(async_compression::tokio::write::BrotliDecoder::new(
                Vec::new(),
            )),
            _ => StreamDecoder::Zstd(async_compression::tokio::write::ZstdDecoder::new(Vec::new())),
        }
    }

    async fn push(&mut self, bytes: &[u8]) {
        match self {
            StreamDecoder::Gzip(d) => {
                d.write_all(bytes).await.unwrap();
                d.flush().await.unwrap();
            }
            StreamDecoder::Br(d) => {
                d.write_all(bytes).await.unwrap();
                d.flush().await.unwrap();
            }
            StreamDecoder::Zstd(d) => {
                d.write_all(bytes).await.unwrap();
                d.flush().await.unwrap();
            }
        }
    }

    fn output(&self) -> &[u8] {
        match self {
            StreamDecoder::Gzip(d) => d.get_ref(),
            StreamDecoder::Br(d) => d.get_ref(),
            StreamDecoder::Zstd(d) => d.get_ref(),
        }
    }
}
