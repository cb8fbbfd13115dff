//! TLS over real sockets with rcgen certificates (SPEC CONN-7, TLS-1, TLS-2, TLS-4, TLS-5,
//! TLS-6): SNI passthrough and termination on one port, wildcard and unknown names,
//! plaintext on a TLS port, ALPN h2 and http/1.1, re-encryption to backends with and
//! without verification, certificate hot reload, client certificates, HTTPS redirects and
//! the one-line TLS modes.
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::tls::{client_config, connect, get, presented, tls_backend, Ca, Pair};
use support::{echoed_header, http1_client, Backend, Gateway, PATIENCE};

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Two CAs: one for the gateway's certificates, one for the backends'.
struct Pki {
    gateway_ca: Ca,
    backend_ca: Ca,
    gateway: Pair,
    backend: Pair,
}

impl Pki {
    fn new() -> Pki {
        let gateway_ca = Ca::new("Gateway CA");
        let backend_ca = Ca::new("Backend CA");
        let gateway = gateway_ca.server(&["term.test", "*.wild.test"]);
        let backend = backend_ca.server(&["pass.test", "backend.test", "127.0.0.1"]);
        Pki {
            gateway_ca,
            backend_ca,
            gateway,
            backend,
        }
    }
}

async fn hello_only(addr: SocketAddr, sni: &str, ca: &Ca) -> std::io::Result<()> {
    connect(addr, sni, client_config(&ca.pem(), &["http/1.1"], None))
        .await
        .map(drop)
}

// ---------------------------------------------------------------------------------------
// Must-show 1: one listener, passthrough and termination by SNI
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn one_port_passes_through_and_terminates_by_sni() {
    let pki = Pki::new();
    let app = Backend::echo().await;
    let tls_app = tls_backend(
        &pki.backend,
        std::sync::Arc::new(|r| Box::pin(support::echo(r))),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.gateway.write(dir.path(), "gateway");
    let config = format!(
        r#"
[[listeners]]
name = "strict"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]
unknown_sni = "reset"
[[listeners.tls.passthrough]]
sni = ["pass.test"]
pool = "tls_app"

[[listeners]]
name = "lenient"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]
unknown_sni = "terminate"
plaintext = "http"

[[tls.certificates]]
cert = "{cert}"
key = "{key}"

[[pools]]
name = "tls_app"
endpoints = ["{tls_app}"]

[[pools]]
name = "app"
endpoints = ["{app}"]

[[routes]]
pool = "app"
"#,
        cert = path(&cert),
        key = path(&key),
        tls_app = tls_app.addr,
        app = app.addr,
    );
    let gateway = Gateway::start(&config);
    let strict = gateway.addr("strict");

    // pass.test: relayed untouched, so the client sees the backend's own certificate.
    let stream = connect(
        strict,
        "pass.test",
        client_config(&pki.backend_ca.pem(), &["http/1.1"], None),
    )
    .await
    .expect("passthrough handshake with the backend");
    assert_eq!(presented(&stream), pki.backend.der());
    let (status, _, body) = get(stream, "pass.test", "/through").await;
    assert_eq!(status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["uri"], "/through");
    assert_eq!(tls_app.count(), 1);
    assert_eq!(app.count(), 0, "a passthrough connection never reaches L7");

    // term.test: terminated with the configured certificate and proxied over HTTP.
    for sni in ["term.test", "a.wild.test", "B.Wild.Test"] {
        let stream = connect(
            strict,
            sni,
            client_config(&pki.gateway_ca.pem(), &["http/1.1"], None),
        )
        .await
        .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(presented(&stream), pki.gateway.der(), "{sni}");
        let (status, _, body) = get(stream, sni, "/terminated").await;
        assert_eq!(status, StatusCode::OK);
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echoed_header(&answer, "x-forwarded-proto"), vec!["https"]);
    }
    // A wildcard covers one label only.
    assert!(hello_only(strict, "a.b.wild.test", &pki.gateway_ca)
        .await
        .is_err());
    // Unknown and missing SNI on the strict listener: reset.
    assert!(hello_only(strict, "unknown.test", &pki.gateway_ca)
        .await
        .is_err());
    let no_sni = connect(
        strict,
        "127.0.0.1",
        client_config(&pki.gateway_ca.pem(), &[], None),
    )
    .await;
    assert!(
        no_sni.is_err(),
        "no SNI must be reset on the strict listener"
    );
    // Plaintext on the strict listener: reset without a byte.
    let mut plain = TcpStream::connect(strict).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    support::expect_closed(plain).await;

    // The lenient listener terminates unknown names with the default certificate…
    let lenient = gateway.addr("lenient");
    let stream = connect(
        lenient,
        "unknown.test",
        client_config(&pki.gateway_ca.pem(), &["http/1.1"], None),
    )
    .await;
    // …which does not name unknown.test, so a verifying client refuses it: the server did
    // present the default certificate rather than reset.
    let err = stream.expect_err("the default certificate does not cover unknown.test");
    assert!(err.to_string().contains("certificate"), "{err}");
    // …and serves plaintext HTTP on the same port.
    let response = http1_client()
        .get(format!("http://{lenient}/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(echoed_header(&answer, "x-forwarded-proto"), vec!["http"]);
}

// ---------------------------------------------------------------------------------------
// Must-show 2: ALPN downstream, HTTP/2 over TLS upstream, verification
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn alpn_h2_and_http1_and_reencryption_to_backends() {
    let pki = Pki::new();
    let tls_app = tls_backend(
        &pki.backend,
        std::sync::Arc::new(|r| Box::pin(support::echo(r))),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.gateway.write(dir.path(), "gateway");
    let backend_ca = pki.backend_ca.write(dir.path(), "backend-ca");
    let wrong_ca = pki.gateway_ca.write(dir.path(), "wrong-ca");
    let config = format!(
        r#"
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]

[[tls.certificates]]
cert = "{cert}"
key = "{key}"

[[pools]]
name = "h2_verified"
protocol = "h2"
endpoints = ["{backend}"]
tls = {{ ca = "{backend_ca}", sni = "backend.test" }}

[[pools]]
name = "http1_verified"
protocol = "http1"
endpoints = ["{backend}"]
tls = {{ ca = "{backend_ca}", sni = "backend.test" }}

[[pools]]
name = "wrong_ca"
protocol = "h2"
endpoints = ["{backend}"]
tls = {{ ca = "{wrong_ca}", sni = "backend.test" }}

[[pools]]
name = "unverified"
protocol = "h2"
endpoints = ["{backend}"]
tls = {{ insecure_skip_verify = true }}

[[routes]]
match = {{ path_prefix = "/h2" }}
pool = "h2_verified"
[[routes]]
match = {{ path_prefix = "/h1" }}
pool = "http1_verified"
[[routes]]
match = {{ path_prefix = "/wrong" }}
pool = "wrong_ca"
[[routes]]
match = {{ path_prefix = "/insecure" }}
pool = "unverified"
"#,
        cert = path(&cert),
        key = path(&key),
        backend = tls_app.addr,
        backend_ca = path(&backend_ca),
        wrong_ca = path(&wrong_ca),
    );
    let gateway = Gateway::start(&config);
    assert!(
        gateway
            .stderr
            .snapshot()
            .iter()
            .any(|line| line.contains("insecure_skip_verify") && line.contains("unverified")),
        "skipping verification must warn at load"
    );
    let edge = gateway.addr("edge");
    let ca = pki.gateway_ca.pem();

    // Both ALPN protocols served on the terminate path.
    for (alpn, version) in [("h2", Version::HTTP_2), ("http/1.1", Version::HTTP_11)] {
        let stream = connect(edge, "term.test", client_config(&ca, &[alpn], None))
            .await
            .unwrap();
        assert_eq!(
            support::tls::negotiated_alpn(&stream).as_deref(),
            Some(alpn.as_bytes())
        );
        let (status, got, body) = get(stream, "term.test", "/h2/x").await;
        assert_eq!(status, StatusCode::OK, "{alpn}");
        assert_eq!(got, version);
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            answer["version"], "HTTP/2.0",
            "the backend is reached over HTTP/2 + TLS"
        );
    }
    let stream = connect(edge, "term.test", client_config(&ca, &["h2"], None))
        .await
        .unwrap();
    let (status, _, body) = get(stream, "term.test", "/h1/y").await;
    assert_eq!(status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["version"], "HTTP/1.1");

    // A backend certificate the configured CA did not sign: 502, backend never served.
    let before = tls_app.count();
    let stream = connect(edge, "term.test", client_config(&ca, &["http/1.1"], None))
        .await
        .unwrap();
    let (status, _, _) = get(stream, "term.test", "/wrong").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(tls_app.count(), before);

    // Only the explicit flag skips verification.
    let stream = connect(edge, "term.test", client_config(&ca, &["http/1.1"], None))
        .await
        .unwrap();
    let (status, _, _) = get(stream, "term.test", "/insecure").await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// Must-show 3: certificate hot reload
// ---------------------------------------------------------------------------------------

fn single_cert_config(cert: &Path, key: &Path, app: SocketAddr, extra: &str) -> String {
    format!(
        r#"{extra}
[[listeners]]
name = "edge"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]

[[tls.certificates]]
cert = "{cert}"
key = "{key}"

[[pools]]
name = "app"
endpoints = ["{app}"]

[[routes]]
pool = "app"
"#,
        cert = path(cert),
        key = path(key),
    )
}

#[tokio::test]
async fn certificates_reload_on_sighup_and_on_file_change_without_dropping_connections() {
    let ca = Ca::new("Reload CA");
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let first = ca.server(&["term.test"]);
    let (cert, key) = first.write(dir.path(), "site");
    // The file watch is off for the SIGHUP half; on for the second half.
    let config = single_cert_config(&cert, &key, app.addr, "watch_interval = \"0s\"");
    let gateway = Gateway::start(&config);
    let edge = gateway.addr("edge");
    // A new client config per connection: a shared one would resume the first session,
    // and a resumed handshake carries no certificate.
    let client = || client_config(&ca.pem(), &["http/1.1"], None);

    let established = connect(edge, "term.test", client()).await.unwrap();
    assert_eq!(presented(&established), first.der());
    let io = hyper_util::rt::TokioIo::new(established);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let request = || {
        http::Request::get("/keep")
            .header("host", "term.test")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        StatusCode::OK
    );

    // SIGHUP: new handshakes get the new certificate.
    let second = ca.server(&["term.test"]);
    second.write(dir.path(), "site");
    assert!(gateway.reload_with(&config).contains("reload succeeded"));
    let fresh = connect(edge, "term.test", client()).await.unwrap();
    assert_eq!(presented(&fresh), second.der());
    // The established connection carries on.
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        StatusCode::OK
    );

    // File watch: replacing the files is enough.
    let watched = single_cert_config(&cert, &key, app.addr, "watch_interval = \"100ms\"");
    assert!(gateway.reload_with(&watched).contains("reload succeeded"));
    let third = ca.server(&["term.test"]);
    third.write(dir.path(), "site");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let stream = connect(edge, "term.test", client()).await.unwrap();
        if presented(&stream) == third.der() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the file watch never loaded the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        StatusCode::OK
    );

    // A broken replacement keeps the last good certificate.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(gateway.reload_with(&watched).contains("reload rejected"));
    let stream = connect(edge, "term.test", client()).await.unwrap();
    assert_eq!(presented(&stream), third.der());
}

#[tokio::test]
async fn tls_sessions_resume() {
    let ca = Ca::new("Resume CA");
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.server(&["term.test"]).write(dir.path(), "site");
    let gateway = Gateway::start(&single_cert_config(&cert, &key, app.addr, ""));
    let edge = gateway.addr("edge");
    let client = client_config(&ca.pem(), &["http/1.1"], None);
    for (attempt, expected) in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed]
        .into_iter()
        .enumerate()
    {
        let stream = connect(edge, "term.test", client.clone()).await.unwrap();
        assert_eq!(
            stream.get_ref().1.handshake_kind(),
            Some(expected),
            "attempt {attempt}"
        );
        // Finish an exchange so the TLS 1.3 ticket has arrived before the next attempt.
        let (status, _, _) = get(stream, "term.test", "/").await;
        assert_eq!(status, StatusCode::OK);
    }
}

// ---------------------------------------------------------------------------------------
// Must-show 4: client certificates
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn routes_can_require_a_client_certificate_and_see_its_subject() {
    let pki = Pki::new();
    let client_ca = Ca::new("Client CA");
    let alice = client_ca.client("alice");
    let mallory = Ca::new("Rogue CA").client("mallory");
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.gateway.write(dir.path(), "gateway");
    let ca_path = client_ca.write(dir.path(), "client-ca");
    let config = format!(
        r#"
[[listeners]]
name = "optional"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]
client_auth = {{ mode = "optional", ca = "{ca}", subject_header = "x-client-subject" }}

[[listeners]]
name = "required"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]
client_auth = {{ mode = "require", ca = "{ca}" }}

[[tls.certificates]]
cert = "{cert}"
key = "{key}"

[[pools]]
name = "app"
endpoints = ["{app}"]

[[routes]]
match = {{ path_prefix = "/secure" }}
require_client_cert = true
pool = "app"

[[routes]]
pool = "app"
"#,
        ca = path(&ca_path),
        cert = path(&cert),
        key = path(&key),
        app = app.addr,
    );
    let gateway = Gateway::start(&config);
    let optional = gateway.addr("optional");
    let gw_ca = pki.gateway_ca.pem();

    // No certificate: the open route works (a forged subject header is removed), the
    // secure route refuses.
    let stream = connect(
        optional,
        "term.test",
        client_config(&gw_ca, &["http/1.1"], None),
    )
    .await
    .unwrap();
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let forged = http::Request::get("/open")
        .header("host", "term.test")
        .header("x-client-subject", "CN=admin")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(forged).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        echoed_header(&answer, "x-client-subject").is_empty(),
        "forged header must not pass"
    );
    let before = app.count();
    let stream = connect(
        optional,
        "term.test",
        client_config(&gw_ca, &["http/1.1"], None),
    )
    .await
    .unwrap();
    let (status, _, _) = get(stream, "term.test", "/secure").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        app.count(),
        before,
        "a refused request never reaches the backend"
    );

    // A certificate from the configured CA: accepted, subject forwarded.
    let stream = connect(
        optional,
        "term.test",
        client_config(&gw_ca, &["h2"], Some(&alice)),
    )
    .await
    .unwrap();
    let (status, _, body) = get(stream, "term.test", "/secure").await;
    assert_eq!(status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let subject = echoed_header(&answer, "x-client-subject");
    assert_eq!(subject.len(), 1);
    assert!(subject[0].contains("CN=alice"), "{subject:?}");
    // …and in the access log.
    let line = gateway.wait_access_log(|line| line["path"] == "/secure" && line["status"] == 200);
    assert!(
        line["client_cert_subject"]
            .as_str()
            .is_some_and(|s| s.contains("CN=alice")),
        "{line}"
    );

    // A certificate from another CA fails the handshake (the server rejects it).
    let rogue = connect(
        optional,
        "term.test",
        client_config(&gw_ca, &["http/1.1"], Some(&mallory)),
    )
    .await;
    if let Ok(stream) = rogue {
        // TLS 1.3: the client learns of the rejection on its first read.
        let (status_or_err, _, _) = tokio::time::timeout(PATIENCE, async {
            let mut stream = stream;
            stream
                .write_all(b"GET /secure HTTP/1.1\r\nhost: term.test\r\n\r\n")
                .await
                .ok();
            let mut buf = [0u8; 16];
            (stream.read(&mut buf).await, 0, 0)
        })
        .await
        .unwrap();
        assert!(
            matches!(status_or_err, Ok(0) | Err(_)),
            "a rogue certificate must be refused"
        );
    }

    // mode = "require": a client without a certificate cannot complete the exchange.
    let required = gateway.addr("required");
    let without = connect(
        required,
        "term.test",
        client_config(&gw_ca, &["http/1.1"], None),
    )
    .await;
    if let Ok(mut stream) = without {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: term.test\r\n\r\n")
            .await
            .ok();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "no certificate must be refused"
        );
    }
    let with = connect(
        required,
        "term.test",
        client_config(&gw_ca, &["http/1.1"], Some(&alice)),
    )
    .await
    .unwrap();
    let (status, _, _) = get(with, "term.test", "/").await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------
// Must-show 11: HTTP → HTTPS redirect
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn plain_listener_redirects_to_https_keeping_path_and_query() {
    let app = Backend::echo().await;
    let config = format!(
        r#"
[[listeners]]
name = "plain"
bind = "127.0.0.1:0"
redirect_https = {{ status = 301 }}

[[listeners]]
name = "plain_port"
bind = "127.0.0.1:0"
redirect_https = {{ port = 8443 }}

[[pools]]
name = "app"
endpoints = ["{}"]

[[routes]]
pool = "app"
"#,
        app.addr
    );
    let gateway = Gateway::start(&config);
    let client = http1_client();
    let response = client
        .get(format!("http://{}/a/b?x=1&y=2", gateway.addr("plain")))
        .header("host", "example.com:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        response.headers()["location"],
        "https://example.com/a/b?x=1&y=2"
    );
    let response = client
        .post(format!("http://{}/form?q", gateway.addr("plain_port")))
        .header("host", "example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        response.headers()["location"],
        "https://example.com:8443/form?q"
    );
    assert_eq!(app.count(), 0);
}

// ---------------------------------------------------------------------------------------
// The one-line modes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn one_line_mode_terminates_tls_and_passes_through() {
    let pki = Pki::new();
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = pki.gateway.write(dir.path(), "gateway");
    let app_addr = app.addr.to_string();
    let terminate = Gateway::start_args(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--to",
            &app_addr,
            "--tls-cert",
            &path(&cert),
            "--tls-key",
            &path(&key),
        ],
        &[],
    );
    let addr = terminate.addr("proxy");
    for alpn in ["h2", "http/1.1"] {
        let stream = connect(
            addr,
            "term.test",
            client_config(&pki.gateway_ca.pem(), &[alpn], None),
        )
        .await
        .unwrap();
        let (status, _, _) = get(stream, "term.test", "/one-line").await;
        assert_eq!(status, StatusCode::OK, "{alpn}");
    }

    let tls_app = tls_backend(
        &pki.backend,
        std::sync::Arc::new(|r| Box::pin(support::echo(r))),
    )
    .await;
    let tls_addr = tls_app.addr.to_string();
    let passthrough = Gateway::start_args(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--passthrough",
            &tls_addr,
            "--sni",
            "pass.test",
        ],
        &[],
    );
    let addr = passthrough.addr("proxy");
    let stream = connect(
        addr,
        "pass.test",
        client_config(&pki.backend_ca.pem(), &["http/1.1"], None),
    )
    .await
    .unwrap();
    assert_eq!(presented(&stream), pki.backend.der());
    let (status, _, _) = get(stream, "pass.test", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(hello_only(addr, "other.test", &pki.backend_ca)
        .await
        .is_err());
}

// ---------------------------------------------------------------------------------------
// TLS-1 versions, TLS-2 validation at load
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn minimum_version_refuses_older_clients() {
    let ca = Ca::new("Version CA");
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.server(&["term.test"]).write(dir.path(), "site");
    let config = single_cert_config(&cert, &key, app.addr, "").replace(
        "[listeners.tls]\n",
        "[listeners.tls]\nmin_version = \"1.3\"\n",
    );
    let gateway = Gateway::start(&config);
    let edge = gateway.addr("edge");
    let tls12_only = {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                Pair {
                    cert: ca.pem(),
                    key: String::new(),
                }
                .der(),
            )
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(support::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        std::sync::Arc::new(config)
    };
    assert!(connect(edge, "term.test", tls12_only).await.is_err());
    let modern = connect(
        edge,
        "term.test",
        client_config(&ca.pem(), &["http/1.1"], None),
    )
    .await
    .unwrap();
    assert_eq!(
        modern.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[tokio::test]
async fn certificates_are_checked_at_load() {
    let ca = Ca::new("Load CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = ca.server(&["a.test"]).write(dir.path(), "a");
    let (_, other_key) = ca.server(&["b.test"]).write(dir.path(), "b");
    let mismatched = format!(
        "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tls\"\n[listeners.tls]\n\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        other_key.display()
    );
    let file = dir.path().join("mismatched.toml");
    std::fs::write(&file, &mismatched).unwrap();
    let output = support::run_to_exit(&["validate", &path(&file)], &[]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tls.certificates") && stderr.contains("does not match"),
        "{stderr}"
    );

    let expired = ca.expired(&["old.test"]);
    let (old_cert, old_key) = expired.write(dir.path(), "old");
    let config = mismatched
        .replace(&path(&cert), &path(&old_cert))
        .replace(&path(&other_key), &path(&old_key));
    std::fs::write(&file, &config).unwrap();
    let output = support::run_to_exit(&["validate", &path(&file)], &[]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("expired"), "{stderr}");

    let missing = mismatched.replace(&path(&cert), "/nonexistent/cert.pem");
    std::fs::write(&file, &missing).unwrap();
    let output = support::run_to_exit(&["validate", &path(&file)], &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read /nonexistent/cert.pem"),
        "{stderr}"
    );
}
