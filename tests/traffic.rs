//! Traffic management through the real binary (SPEC TRAFFIC-1..4): weighted splits
//! (statistical, with stated binomial tolerances), cohorts and consistent hashing, the
//! canary brake tripping, holding across config swaps and resuming, and mirroring to
//! shadows that stall or fail without the client noticing. Waits poll a condition until a
//! deadline; nothing sleeps to synchronise.

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use support::faults::{Fault, FaultBackend};
use support::{Backend, Gateway, PATIENCE};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// Listener `public`, the admin API, a pool per backend (named like the backend), then
/// `routes`.
fn config(backends: &[&FaultBackend], routes: &str) -> String {
    let mut text = String::from(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n",
    );
    for backend in backends {
        text.push_str(&format!(
            "[[pools]]\nname = \"{}\"\nendpoints = [\"{}\"]\n\n",
            backend.name(),
            backend.addr
        ));
    }
    text.push_str(routes);
    text
}

/// Which backend answered (`ok <name>` or `status <name>` bodies), by count.
async fn spread(
    client: &reqwest::Client,
    url: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> HashMap<String, usize> {
    let requests = (0..n).map(|_| {
        let mut request = client.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move {
            let response = request.send().await.expect("request");
            let body = response.text().await.expect("body");
            body.split_whitespace().last().unwrap_or("").to_string()
        }
    });
    let answers: Vec<String> = stream::iter(requests).buffer_unordered(8).collect().await;
    let mut counts = HashMap::new();
    for answer in answers {
        *counts.entry(answer).or_insert(0) += 1;
    }
    counts
}

/// Asserts `observed` is within `sigmas` standard deviations of Binomial(n, p)'s mean.
fn assert_binomial(observed: usize, n: usize, p: f64, sigmas: f64, what: &str) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    let tolerance = sigmas * sd;
    assert!(
        (observed as f64 - mean).abs() <= tolerance,
        "{what}: {observed} of {n}, expected {mean:.0} ± {tolerance:.0} ({sigmas}σ)"
    );
}

async fn admin(
    gateway: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{}{path}", gateway.addr("admin"));
    let mut request = client().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("admin request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

async fn metrics(gateway: &Gateway) -> String {
    let url = format!("http://{}/metrics", gateway.addr("admin"));
    client()
        .get(url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body")
}

/// The value of the first exposition line starting with `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Polls `check` until it returns `Some`, or panics with `what` after `PATIENCE`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

fn target<'a>(traffic: &'a Value, route: &str, pool: &str) -> &'a Value {
    traffic["splits"]
        .as_array()
        .and_then(|splits| splits.iter().find(|s| s["route"] == route))
        .and_then(|split| split["targets"].as_array())
        .and_then(|targets| targets.iter().find(|t| t["pool"] == pool))
        .unwrap_or_else(|| panic!("no split target {route}/{pool} in {traffic}"))
}

#[tokio::test]
async fn weighted_split_matches_its_weights_and_changes_at_run_time() {
    let stable = FaultBackend::start("stable").await;
    let canary = FaultBackend::start("canary").await;
    let gateway = Gateway::start(&config(
        &[&stable, &canary],
        "[[routes]]\nname = \"web\"\nsplit = [{ pool = \"stable\", weight = 90 }, { pool = \"canary\", weight = 10 }]\n",
    ));
    let client = client();
    let url = gateway.url("public", "/");

    // 2000 requests at p = 0.1: sd = 13.4; 5σ (±67) fails by chance with p < 1e-6.
    let counts = spread(&client, &url, 2000, &[]).await;
    assert_eq!(counts.values().sum::<usize>(), 2000, "{counts:?}");
    assert_binomial(
        counts.get("canary").copied().unwrap_or(0),
        2000,
        0.1,
        5.0,
        "canary at 10%",
    );

    // The admin API changes the weights (a stored config version).
    let (status, body) = admin(
        &gateway,
        reqwest::Method::PUT,
        "/traffic/web/weights",
        Some(json!({"weights": {"stable": 50, "canary": 50}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, traffic) = admin(&gateway, reqwest::Method::GET, "/traffic", None).await;
    assert_eq!(target(&traffic, "web", "canary")["weight"], 50);
    let counts = spread(&client, &url, 1000, &[]).await;
    // p = 0.5, n = 1000: sd = 15.8; 5σ = ±79.
    assert_binomial(
        counts.get("canary").copied().unwrap_or(0),
        1000,
        0.5,
        5.0,
        "canary at 50%",
    );

    // An unknown pool is refused and changes nothing.
    let (status, _) = admin(
        &gateway,
        reqwest::Method::PUT,
        "/traffic/web/weights",
        Some(json!({"weights": {"nope": 1}})),
    )
    .await;
    assert_eq!(status, 404);

    let text = metrics(&gateway).await;
    let stable_total = metric(
        &text,
        "gatehouse_split_requests_total{route=\"web\",pool=\"stable\"}",
    )
    .expect("split metric");
    let canary_total = metric(
        &text,
        "gatehouse_split_requests_total{route=\"web\",pool=\"canary\"}",
    )
    .expect("split metric");
    assert_eq!(stable_total + canary_total, 3000.0);
    assert_eq!(canary_total as usize, canary.requests());
}

#[tokio::test]
async fn cohorts_by_header_cookie_and_hash_keep_a_user_on_one_pool() {
    let stable = FaultBackend::start("stable").await;
    let canary = FaultBackend::start("canary").await;
    let routes = r#"
[[routes]]
name = "by-user"
match = { path_prefix = "/user" }
split = [{ pool = "stable", weight = 50 }, { pool = "canary", weight = 50 }]
split_hash = { on = "header", name = "x-user" }
cohorts = [
  { header = "x-cohort", value = "beta", pool = "canary" },
  { cookie = "cohort", value = "beta", pool = "canary" },
]

[[routes]]
name = "by-session"
match = { path_prefix = "/session" }
split = [{ pool = "stable", weight = 50 }, { pool = "canary", weight = 50 }]
split_hash = { on = "cookie", name = "sid" }

[[routes]]
name = "by-ip"
match = { path_prefix = "/ip" }
split = [{ pool = "stable", weight = 50 }, { pool = "canary", weight = 50 }]
split_hash = { on = "client_ip" }
"#;
    let gateway = Gateway::start(&config(&[&stable, &canary], routes));
    let client = client();
    let user_url = gateway.url("public", "/user");

    // Cohort by header and by cookie: always the canary (a user hash would split them).
    let counts = spread(
        &client,
        &user_url,
        40,
        &[("x-cohort", "beta"), ("x-user", "u1")],
    )
    .await;
    assert_eq!(counts.get("canary"), Some(&40), "{counts:?}");
    let counts = spread(
        &client,
        &user_url,
        40,
        &[("cookie", "theme=dark; cohort=beta"), ("x-user", "u2")],
    )
    .await;
    assert_eq!(counts.get("canary"), Some(&40), "{counts:?}");
    // A value that is not the cohort's falls through to the hash.
    let other = spread(
        &client,
        &user_url,
        10,
        &[("x-cohort", "alpha"), ("x-user", "u3")],
    )
    .await;
    assert_eq!(other.len(), 1, "one user, one pool: {other:?}");

    // Consistent hash by header and by cookie: each of 40 users always lands on one pool,
    // and the users spread over both pools (all on one side: p = 2⁻³⁹).
    for (url, header, template) in [
        (user_url.clone(), "x-user", "user-{}"),
        (gateway.url("public", "/session"), "cookie", "sid=s{}"),
    ] {
        let mut pools_used = HashSet::new();
        for user in 0..40 {
            let value = template.replace("{}", &user.to_string());
            let counts = spread(&client, &url, 8, &[(header, &value)]).await;
            assert_eq!(
                counts.len(),
                1,
                "{header} {value} moved between pools: {counts:?}"
            );
            pools_used.extend(counts.into_keys());
        }
        assert_eq!(pools_used.len(), 2, "{header}: {pools_used:?}");
    }
    // By client address: every request from 127.0.0.1 goes to the same pool.
    let counts = spread(&client, &gateway.url("public", "/ip"), 40, &[]).await;
    assert_eq!(counts.len(), 1, "{counts:?}");
}

/// Sends requests until `traffic`'s canary target is braked; returns the traffic state.
async fn until_braked(gateway: &Gateway, route: &str) -> Value {
    let client = client();
    let url = gateway.url("public", &format!("/{route}"));
    eventually("the canary brake to trip", || {
        let client = client.clone();
        let url = url.clone();
        async move {
            spread(&client, &url, 10, &[]).await;
            let (_, traffic) = admin(gateway, reqwest::Method::GET, "/traffic", None).await;
            (target(&traffic, route, "canary")["braked"] == true).then_some(traffic)
        }
    })
    .await
}

#[tokio::test]
async fn canary_brake_trips_on_errors_and_resumes_after_the_cool_off() {
    let stable = FaultBackend::start("stable").await;
    let canary = FaultBackend::start("canary").await;
    canary.set(Fault::Status(500));
    let routes = r#"
[[routes]]
name = "web"
match = { path_prefix = "/web" }
split = [{ pool = "stable", weight = 50 }, { pool = "canary", weight = 50 }]
brake = { factor = 2.0, window = "30s", min_requests = 10, cool_off = "3s" }
"#;
    let gateway = Gateway::start(&config(&[&stable, &canary], routes));
    let client = client();
    let url = gateway.url("public", "/web");

    let traffic = until_braked(&gateway, "web").await;
    let canary_target = target(&traffic, "web", "canary");
    assert_eq!(canary_target["effective_weight"], 0);
    assert_eq!(canary_target["weight"], 50);
    assert!(canary_target["window_requests"].as_u64().unwrap() >= 10);
    let events = traffic["brake_events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "tripped" && e["route"] == "web" && e["pool"] == "canary"),
        "{events:?}"
    );
    gateway
        .stderr
        .wait_for(0, PATIENCE, |line| line.contains("CANARY_BRAKE tripped"));
    let text = metrics(&gateway).await;
    assert_eq!(
        metric(
            &text,
            "gatehouse_canary_brake_trips_total{route=\"web\",pool=\"canary\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "gatehouse_canary_brake_engaged{route=\"web\",pool=\"canary\"}"
        ),
        Some(1.0)
    );

    // While braked, everything goes to the stable pool.
    let before = canary.requests();
    let counts = spread(&client, &url, 60, &[]).await;
    let (_, traffic) = admin(&gateway, reqwest::Method::GET, "/traffic", None).await;
    if target(&traffic, "web", "canary")["braked"] == true {
        assert_eq!(counts.get("stable"), Some(&60), "{counts:?}");
        assert_eq!(canary.requests(), before);
    }

    // The canary recovers; after the cool-off it gets traffic again without any action.
    canary.set(Fault::Ok);
    eventually("the canary to get traffic after the cool-off", || {
        let client = client.clone();
        let url = url.clone();
        async move {
            let counts = spread(&client, &url, 10, &[]).await;
            counts.contains_key("canary").then_some(())
        }
    })
    .await;
    let (_, traffic) = admin(&gateway, reqwest::Method::GET, "/traffic", None).await;
    let events = traffic["brake_events"].as_array().unwrap();
    assert!(events.iter().any(|e| e["kind"] == "released"), "{events:?}");
    assert_eq!(target(&traffic, "web", "canary")["braked"], false);
}

#[tokio::test]
async fn canary_brake_holds_across_config_swaps_until_an_operator_resets_it() {
    let stable = FaultBackend::start("stable").await;
    let canary = FaultBackend::start("canary").await;
    canary.set(Fault::Status(503));
    let routes = r#"
[[routes]]
name = "api"
match = { path_prefix = "/api" }
split = [{ pool = "stable", weight = 50 }, { pool = "canary", weight = 50 }]
brake = { factor = 1.5, window = "1m", min_requests = 10, cool_off = "1h" }
"#;
    let gateway = Gateway::start(&config(&[&stable, &canary], routes));
    let client = client();
    let url = gateway.url("public", "/api");
    until_braked(&gateway, "api").await;
    canary.set(Fault::Ok);

    // A config swap (a weight change through the admin API) keeps the brake engaged.
    let (status, body) = admin(
        &gateway,
        reqwest::Method::PUT,
        "/traffic/api/weights",
        Some(json!({"weights": {"canary": 60}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, traffic) = admin(&gateway, reqwest::Method::GET, "/status", None).await;
    let canary_target = target(&traffic["traffic"], "api", "canary");
    assert_eq!(canary_target["braked"], true, "{traffic}");
    assert_eq!(canary_target["weight"], 60);
    let before = canary.requests();
    let counts = spread(&client, &url, 50, &[]).await;
    assert_eq!(counts.get("stable"), Some(&50), "{counts:?}");
    assert_eq!(canary.requests(), before);

    // Unknown route: 404. The operator's reset releases the brake at once.
    let (status, _) = admin(
        &gateway,
        reqwest::Method::POST,
        "/traffic/nope/brake/reset",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = admin(
        &gateway,
        reqwest::Method::POST,
        "/traffic/api/brake/reset",
        None,
    )
    .await;
    assert_eq!((status, &body["released"]), (200, &json!(1)), "{body}");
    let counts = spread(&client, &url, 200, &[]).await;
    // p = 0.6 to the canary, n = 200: sd = 6.9; 5σ = ±35.
    assert_binomial(
        counts.get("canary").copied().unwrap_or(0),
        200,
        0.6,
        5.0,
        "canary after reset",
    );
    let (_, traffic) = admin(&gateway, reqwest::Method::GET, "/traffic", None).await;
    assert!(traffic["brake_events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "reset"));
}

#[tokio::test]
async fn mirroring_copies_a_share_without_touching_the_client_exchange() {
    let primary = Backend::echo().await;
    let stall = FaultBackend::start("stall").await;
    stall.set(Fault::Stall);
    // The 500-answering shadow records the bodies it receives.
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorded = bodies.clone();
    let failing = Backend::start(std::sync::Arc::new(move |request| {
        let recorded = recorded.clone();
        Box::pin(async move {
            use http_body_util::BodyExt;
            let body = request.into_body().collect().await.map(|b| b.to_bytes());
            let text = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
            recorded.lock().unwrap().push(text);
            let mut response = http::Response::new(support::full("shadow failure"));
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            response
        })
    }))
    .await;
    let text = format!(
        r#"[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[pools]]
name = "app"
endpoints = ["{}"]

[[pools]]
name = "stall"
endpoints = ["{}"]

[[pools]]
name = "failing"
endpoints = ["{}"]

[[routes]]
name = "stalled"
match = {{ path_prefix = "/stalled" }}
pool = "app"
mirror = {{ pool = "stall", percent = 100, max_in_flight = 4, timeout = "60s" }}

[[routes]]
name = "half"
match = {{ path_prefix = "/half" }}
pool = "app"
mirror = {{ pool = "failing", percent = 50, max_body = "1KiB" }}
"#,
        primary.addr, stall.addr, failing.addr
    );
    let gateway = Gateway::start(&text);
    let client = client();

    // A shadow that never answers: every client request still completes at once with
    // the primary's answer; four copies stay in flight, the rest are dropped and counted.
    for _ in 0..20 {
        let started = Instant::now();
        let response = client
            .get(gateway.url("public", "/stalled"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-backend"], "echo");
        response.text().await.expect("body");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a stalled shadow delayed the client: {:?}",
            started.elapsed()
        );
    }
    eventually("four stalled copies at the shadow", || async {
        (stall.requests() == 4).then_some(())
    })
    .await;
    let text = metrics(&gateway).await;
    let series = |outcome: &str| {
        metric(
            &text,
            &format!(
                "gatehouse_mirror_requests_total{{route=\"stalled\",pool=\"stall\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(series("sent"), Some(4.0));
    assert_eq!(series("dropped"), Some(16.0));

    // A shadow answering 500 at 50 %: clients see only the primary's 200s, and the shadow
    // gets about half the requests, bodies included (n = 400, p = 0.5: sd = 10; 5σ = ±50).
    let requests = (0..400).map(|i| {
        let request = client
            .post(gateway.url("public", "/half"))
            .body(format!("payload {i}"));
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("echo");
            (status, body["body_len"].as_u64().unwrap_or(0))
        }
    });
    let answers: Vec<(u16, u64)> = stream::iter(requests).buffer_unordered(8).collect().await;
    assert!(answers
        .iter()
        .all(|(status, len)| *status == 200 && *len > 0));
    let sent = eventually("mirror counters to settle", || async {
        let text = metrics(&gateway).await;
        let value = |outcome: &str| {
            metric(
                &text,
                &format!(
                    "gatehouse_mirror_requests_total{{route=\"half\",pool=\"failing\",outcome=\"{outcome}\"}}"
                ),
            )
            .unwrap_or(0.0) as usize
        };
        let sent = value("sent");
        (failing.count() == sent && value("failed") == sent).then_some(sent)
    })
    .await;
    assert_binomial(sent, 400, 0.5, 5.0, "mirrored share");
    {
        let bodies = bodies.lock().unwrap();
        assert_eq!(bodies.len(), sent);
        assert!(
            bodies.iter().all(|body| body.starts_with("payload ")),
            "a mirrored body differs: {bodies:?}"
        );
        let distinct: HashSet<&String> = bodies.iter().collect();
        assert_eq!(
            distinct.len(),
            sent,
            "each copy carries its own request's body"
        );
    }

    // A body over `max_body` is not mirrored (counted as skipped); the client is served.
    let mut skipped = 0;
    for _ in 0..20 {
        let response = client
            .post(gateway.url("public", "/half"))
            .body(vec![b'x'; 4096])
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    let text = metrics(&gateway).await;
    if let Some(value) = metric(
        &text,
        "gatehouse_mirror_requests_total{route=\"half\",pool=\"failing\",outcome=\"skipped_body\"}",
    ) {
        skipped = value as usize;
    }
    // Each of the 20 was chosen with p = 0.5; at least one (all missed: p = 2⁻²⁰).
    assert!((1..=20).contains(&skipped), "skipped {skipped}");
    assert_eq!(
        failing.count(),
        sent,
        "an oversized body reached the shadow"
    );
}

#[test]
fn split_settings_are_checked_with_field_paths() {
    let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[pools]]
name = "a"
endpoints = ["127.0.0.1:1"]

[[routes]]
pool = "a"
split = [{ pool = "a", weight = 0 }, { pool = "ghost", weight = 1 }]
cohorts = [{ header = "x", cookie = "y", value = "v", pool = "elsewhere" }]
brake = { factor = 0.5, min_requests = 0 }
mirror = { pool = "a", percent = 150 }
"#;
    let errors = gatehouse::config::parse_str(text, gatehouse::config::Format::Toml, Vec::new())
        .expect_err("invalid")
        .0;
    let paths: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect();
    for expected in [
        "routes[0].split[1].pool: unknown pool \"ghost\"",
        "routes[0].split: pool and split are mutually exclusive",
        "routes[0].cohorts[0]: needs exactly one of header or cookie",
        "routes[0].cohorts[0].pool: \"elsewhere\" is not one of this route's split pools",
        "routes[0].brake.factor: must be at least 1.0",
        "routes[0].brake.min_requests: must be at least 1",
        "routes[0].mirror.percent: must be between 0 and 100",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "missing {expected:?} in {paths:#?}"
        );
    }
}
