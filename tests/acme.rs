//! ACME against a real ACME server (SPEC TLS-3): Debian's pebble, validating for real —
//! its DNS answers 127.0.0.1 for every name, so TLS-ALPN-01 and HTTP-01 connect back to
//! the gateway's listeners. Issuance for two names, the on-disk cache across a restart,
//! HTTP-01 ahead of the HTTPS redirect, renewal without dropping connections, static and
//! ACME certificates side by side, failures retried while the old certificate serves, and
//! the status library call.
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use rustls::pki_types::CertificateDer;

use support::pebble::PebblePlan;
use support::tls::{client_config, connect, get, presented, Ca};
use support::{Backend, Gateway, PATIENCE};

fn acme_section(plan: &PebblePlan, cache: &Path, challenge: &str, extra: &str) -> String {
    format!(
        r#"
[acme]
directory = "{}"
directory_ca = "{}"
cache_dir = "{}"
challenge = "{challenge}"
retry_min = "200ms"
retry_max = "1s"
{extra}
certificates = [{{ names = ["a.test", "b.test"] }}]
"#,
        plan.directory,
        plan.api_ca.display(),
        cache.display(),
    )
}

/// Handshakes until `sni` is served a certificate that chains to `root_pem`, or fails the
/// test after `PATIENCE`. Returns the leaf.
async fn wait_for_issued(addr: SocketAddr, sni: &str, root_pem: &str) -> CertificateDer<'static> {
    let deadline = Instant::now() + PATIENCE * 3;
    loop {
        let client = client_config(root_pem, &["http/1.1"], None);
        if let Ok(stream) = connect(addr, sni, client).await {
            return presented(&stream);
        }
        assert!(
            Instant::now() < deadline,
            "{sni} never got a certificate from the ACME server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn issuer_of(der: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("x509");
    cert.issuer().to_string()
}

#[tokio::test]
async fn tls_alpn_01_issues_for_two_names_retries_while_down_and_reuses_the_cache() {
    let plan = PebblePlan::new();
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("acme");
    let static_ca = Ca::new("Static CA");
    let (cert, key) = static_ca
        .server(&["static.test"])
        .write(dir.path(), "static");
    let config = format!(
        r#"
[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]

[[tls.certificates]]
cert = "{}"
key = "{}"

[[pools]]
name = "app"
endpoints = ["{}"]

[[routes]]
pool = "app"
{}"#,
        cert.display(),
        key.display(),
        app.addr,
        acme_section(&plan, &cache, "tls-alpn-01", ""),
    );
    let gateway = Gateway::start(&config);
    let tls = gateway.addr("tls");
    // The ACME server is not running yet: the cause is logged and the order retried.
    gateway.stderr.wait_for(0, PATIENCE, |line| {
        line.contains("acme: order failed") && line.contains("retry_in")
    });
    let pebble = plan.start(support::pebble::free_port(), tls.port());
    let root = pebble.root_pem().await;
    let logs = gateway.stderr.clone();
    let leaf_a = tokio::time::timeout(PATIENCE * 2, wait_for_issued(tls, "a.test", &root))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no certificate; gateway log:\n{}",
                logs.snapshot().join("\n")
            )
        });
    let leaf_b = wait_for_issued(tls, "b.test", &root).await;
    assert_eq!(leaf_a, leaf_b, "one certificate with both names");
    assert!(
        issuer_of(&leaf_a).contains("Pebble"),
        "{}",
        issuer_of(&leaf_a)
    );
    let stream = connect(tls, "a.test", client_config(&root, &["h2"], None))
        .await
        .unwrap();
    let (status, _, _) = get(stream, "a.test", "/").await;
    assert_eq!(status, StatusCode::OK);
    // The static certificate still serves its own name.
    let stream = connect(
        tls,
        "static.test",
        client_config(&static_ca.pem(), &["http/1.1"], None),
    )
    .await
    .unwrap();
    let static_leaf = support::tls::Pair {
        cert: std::fs::read_to_string(&cert).unwrap(),
        key: String::new(),
    };
    assert_eq!(presented(&stream), static_leaf.der());
    let orders = gateway
        .stderr
        .snapshot()
        .iter()
        .filter(|line| line.contains("acme: certificate installed"))
        .count();
    assert_eq!(orders, 1);
    drop(gateway);

    // A restart serves the cached certificate and orders nothing.
    let restarted = Gateway::start(&config);
    let again = wait_for_issued(restarted.addr("tls"), "b.test", &root).await;
    assert_eq!(again, leaf_a);
    // The certificate is installed a moment before its log line is written.
    restarted.stderr.wait_for(0, PATIENCE, |line| {
        line.contains("acme: loaded cached certificate")
    });
    let lines = restarted.stderr.snapshot();
    assert!(
        !lines.iter().any(|l| l.contains("acme: ordering")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_ahead_of_the_redirect_then_renewal_keeps_connections_and_failures_keep_the_certificate(
) {
    let plan = PebblePlan::new();
    let app = Backend::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("acme");
    // renew_before longer than any certificate's life: every check is due, so the
    // certificate is renewed once per check_interval.
    let text = format!(
        r#"
access_log = {{ enabled = false }}

[[listeners]]
name = "plain"
bind = "127.0.0.1:0"
redirect_https = {{}}

[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
protocol = "tls"
[listeners.tls]

[[pools]]
name = "app"
endpoints = ["{}"]

[[routes]]
pool = "app"
{}"#,
        app.addr,
        acme_section(
            &plan,
            &cache,
            "http-01",
            "renew_before = \"100000d\"\ncheck_interval = \"1s\""
        ),
    );
    let config =
        gatehouse::config::parse_str(&text, gatehouse::config::Format::Toml, Vec::new()).unwrap();
    let gateway = gatehouse::gateway::Gateway::start(config, None)
        .await
        .unwrap();
    let addrs = gateway.local_addrs();
    let mut pebble = plan.start(addrs["plain"].port(), support::pebble::free_port());
    let root = pebble.root_pem().await;
    let first = wait_for_issued(addrs["tls"], "a.test", &root).await;

    // Status through the library call.
    let status = gateway.acme_status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].names, vec!["a.test", "b.test"]);
    assert!(
        status[0]
            .issuer
            .as_deref()
            .is_some_and(|i| i.contains("Pebble")),
        "{status:?}"
    );
    assert!(status[0].not_after.is_some() && status[0].next_renewal.is_some());
    // The plain listener still redirects everything else.
    let response = support::http1_client()
        .get(format!("http://{}/x", addrs["plain"]))
        .header("host", "a.test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);

    // An established connection, then a renewal.
    let established = connect(
        addrs["tls"],
        "a.test",
        client_config(&root, &["http/1.1"], None),
    )
    .await
    .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(established))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = || {
        http::Request::get("/")
            .header("host", "a.test")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        StatusCode::OK
    );
    let deadline = Instant::now() + PATIENCE * 3;
    let renewed = loop {
        let leaf = wait_for_issued(addrs["tls"], "a.test", &root).await;
        if leaf != first {
            break leaf;
        }
        assert!(Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(gateway.acme_status()[0].issued >= 2);
    assert_eq!(
        sender.send_request(request()).await.unwrap().status(),
        StatusCode::OK,
        "the connection made before the renewal still works"
    );

    // The ACME server goes away: renewals fail, are retried, and the last certificate
    // keeps serving.
    pebble.stop();
    let deadline = Instant::now() + PATIENCE * 3;
    while gateway.acme_status()[0].last_error.is_none() {
        assert!(
            Instant::now() < deadline,
            "a failed renewal was never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still a valid certificate from the ACME server (wait_for_issued verifies the chain).
    let served = wait_for_issued(addrs["tls"], "b.test", &root).await;
    assert_ne!(served, first, "the renewed certificate is the one serving");
    let _ = renewed;
}
