//! Graceful shutdown stages (SPEC OPS-6) with real clients: SIGTERM → `/ready` false →
//! listeners closed → every in-flight request finishes → idle upstream connections closed
//! → exit 0; not one in-flight request is dropped.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{full, http1_client, Backend, Gateway, PATIENCE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_in_flight_request_then_closes_idle_upstream_connections() {
    // Slow requests wait for permits, handed out only once the drain has begun.
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let backend = Backend::start(Arc::new(move |request| {
        let gate = gate.clone();
        Box::pin(async move {
            if request.uri().path().starts_with("/slow") {
                let _permit = gate.acquire().await;
            }
            http::Response::new(full(request.uri().path().to_string()))
        })
    }))
    .await;
    let config = format!(
        "drain_timeout = \"20s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [\"{}\"]\n\n[[routes]]\npool = \"app\"\n",
        backend.addr
    );
    let mut gateway = Gateway::start(&config);
    // A keep-alive upstream connection that will be idle at shutdown.
    let warm = http1_client()
        .get(gateway.url("public", "/warm"))
        .send()
        .await
        .expect("warm-up");
    assert_eq!(warm.text().await.expect("body"), "/warm");

    const IN_FLIGHT: usize = 20;
    let mut requests = Vec::new();
    for index in 0..IN_FLIGHT {
        // Each on its own client connection.
        let url = gateway.url("public", &format!("/slow/{index}"));
        requests.push(tokio::spawn(async move {
            let response = http1_client().get(url).send().await?;
            let status = response.status();
            let body = response.text().await?;
            Ok::<_, reqwest::Error>((status, body))
        }));
    }
    let deadline = Instant::now() + PATIENCE;
    while backend.count() < IN_FLIGHT + 1 {
        assert!(
            Instant::now() < deadline,
            "requests did not reach the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let from = gateway.stderr.len();
    gateway.signal(libc::SIGTERM);
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("listeners closed"));
    // Stage 1: not ready any more; stage 2: new connections are refused.
    let ready = http1_client()
        .get(format!("http://{}/ready", gateway.addr("admin")))
        .send()
        .await
        .expect("admin still answers during the drain");
    assert_eq!(ready.status(), 503);
    assert!(
        tokio::net::TcpStream::connect(gateway.addr("public"))
            .await
            .is_err(),
        "a new connection was accepted during the drain"
    );
    // Stage 3: the in-flight requests finish, every one of them.
    release.add_permits(IN_FLIGHT);
    for (index, request) in requests.into_iter().enumerate() {
        let (status, body) = tokio::time::timeout(PATIENCE, request)
            .await
            .expect("request finished")
            .expect("client task")
            .unwrap_or_else(|err| panic!("in-flight request {index} dropped: {err}"));
        assert_eq!(status, 200, "request {index}");
        assert_eq!(body, format!("/slow/{index}"));
    }
    // Stage 4 and exit: idle upstream connections closed, clean exit.
    let closed = gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("idle upstream connections closed")
    });
    let count: usize = closed
        .split("closed=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {closed:?}"));
    assert!(count >= 1, "{closed}");
    let status = gateway.wait_exit(PATIENCE);
    assert!(status.success(), "exit status {status}");
    let log = gateway.stderr.snapshot();
    let position = |needle: &str| {
        log.iter()
            .position(|line| line.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in the log"))
    };
    assert!(position("draining") < position("listeners closed"));
    assert!(position("listeners closed") < position("idle upstream connections closed"));
    assert!(position("idle upstream connections closed") < position("drained; exiting"));
}
