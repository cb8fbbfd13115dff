//! ROUTE-1..3 through a real gateway process: host, path, method, header and query
//! matchers, rank order (priority, specificity, config order), a 10,000-route table, and
//! the one-line `gatehouse proxy` mode.
//!
//! Routes answer either from a named backend (body `backend <name> <uri>`) or with a
//! `direct_response` whose body names the route, so every probe says who answered.
mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use http::Response;
use support::{full, http1_client, Backend, Gateway};

/// A backend that answers every request with `backend <name> <uri>`.
async fn named_backend(name: &'static str) -> Backend {
    Backend::start(Arc::new(move |request| {
        let body = format!("backend {name} {}", request.uri());
        Box::pin(async move { Response::new(full(body)) })
    }))
    .await
}

/// A config with listener `public` and one pool per `(name, backend)`, then `routes`.
fn config(pools: &[(&str, SocketAddr)], routes: &str) -> String {
    let mut text = String::from("[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n");
    for (name, addr) in pools {
        text.push_str(&format!(
            "[[pools]]\nname = \"{name}\"\nendpoints = [\"{addr}\"]\n\n"
        ));
    }
    text.push_str(routes);
    text
}

/// A `[[routes]]` block answering with `body` directly, after `match_lines` (each a
/// `key = value` line of the `match` table) and `extra` route-level lines.
fn direct(body: &str, extra: &str, match_lines: &str) -> String {
    format!(
        "[[routes]]\n{extra}\ndirect_response = {{ body = \"{body}\" }}\n[routes.match]\n{match_lines}\n\n"
    )
}

/// A `[[routes]]` block forwarding to `pool`.
fn forward(pool: &str, extra: &str, match_lines: &str) -> String {
    format!("[[routes]]\n{extra}\npool = \"{pool}\"\n[routes.match]\n{match_lines}\n\n")
}

/// Sends a request and returns status and body.
struct Probe {
    client: reqwest::Client,
    base: String,
}

impl Probe {
    fn new(gateway: &Gateway) -> Probe {
        Probe {
            client: http1_client(),
            base: format!("http://{}", gateway.addr("public")),
        }
    }

    async fn send(
        &self,
        method: &str,
        host: Option<&str>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(host) = host {
            request = request.header(http::header::HOST, host);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    async fn get(&self, host: &str, path: &str) -> (u16, String) {
        self.send("GET", Some(host), path, &[]).await
    }

    /// Asserts that `GET host path` is answered with 200 and exactly `body`.
    async fn expect(&self, host: &str, path: &str, body: &str) {
        let answer = self.get(host, path).await;
        assert_eq!(
            answer,
            (200, body.to_string()),
            "GET {path} with Host: {host}"
        );
    }

    async fn expect_404(&self, host: &str, path: &str) {
        let (status, body) = self.get(host, path).await;
        assert_eq!(
            status, 404,
            "GET {path} with Host: {host} answered {body:?}"
        );
    }
}

#[tokio::test]
async fn hosts_match_exactly_or_by_wildcard_ignoring_case_and_port() {
    let api = named_backend("api").await;
    let wild = named_backend("wild").await;
    let routes = [
        forward("api", "", r#"hosts = ["api.example.com"]"#),
        forward("wild", "", r#"hosts = ["*.example.com"]"#),
        direct("deep-wildcard", "", r#"hosts = ["*.deep.example.com"]"#),
        // Written with capitals and a port: both ignored.
        direct("mixed", "", r#"hosts = ["Mixed.Example.ORG:9999"]"#),
        direct("fallback", "", ""),
    ]
    .concat();
    let gateway = Gateway::start(&config(&[("api", api.addr), ("wild", wild.addr)], &routes));
    let probe = Probe::new(&gateway);

    probe
        .expect("api.example.com", "/x", "backend api /x")
        .await;
    probe
        .expect("API.Example.com:8080", "/y", "backend api /y")
        .await;
    probe.expect("a.example.com", "/", "backend wild /").await;
    probe.expect("a.b.example.com", "/", "backend wild /").await;
    probe
        .expect("A.B.EXAMPLE.COM:1", "/z", "backend wild /z")
        .await;
    // The longer wildcard is more specific than the shorter one.
    probe
        .expect("x.deep.example.com", "/", "deep-wildcard")
        .await;
    probe
        .expect("deep.example.com", "/", "backend wild /")
        .await;
    probe.expect("mixed.example.org", "/", "mixed").await;
    probe.expect("MIXED.example.org:80", "/", "mixed").await;
    // A wildcard needs at least one label in front of its suffix.
    probe.expect("example.com", "/", "fallback").await;
    probe.expect("notexample.com", "/", "fallback").await;
    probe.expect("example.com.evil.test", "/", "fallback").await;
    assert_eq!(api.count(), 2);
    assert_eq!(wild.count(), 4);
}

#[tokio::test]
async fn paths_match_exactly_by_segment_prefix_or_by_regex() {
    let api = named_backend("api").await;
    let routes = [
        direct("exact", "", r#"path = "/exact""#),
        forward("api", "", r#"path_prefix = "/api""#),
        // Declared after `/api` but longer, so more specific.
        direct("api-v2", "", r#"path_prefix = "/api/v2/""#),
        direct("items-regex", "", r#"path_regex = "^/items/[0-9]+$""#),
        direct("docs-regex", "", r#"path_regex = "^/docs/""#),
        // A regex ranks before any prefix (nginx's order): this longer prefix loses to
        // the `^/docs/` regex declared before it.
        direct("docs-v1-prefix", "", r#"path_prefix = "/docs/v1""#),
        // No path condition: ranks after every path route.
        direct("fallback", "", ""),
    ]
    .concat();
    let gateway = Gateway::start(&config(&[("api", api.addr)], &routes));
    let probe = Probe::new(&gateway);
    let host = "paths.test";

    probe.expect(host, "/exact", "exact").await;
    probe.expect(host, "/exact?q=1", "exact").await;
    probe.expect(host, "/exact/more", "fallback").await;
    probe.expect(host, "/exactly", "fallback").await;

    probe.expect(host, "/api", "backend api /api").await;
    probe.expect(host, "/api/", "backend api /api/").await;
    probe
        .expect(host, "/api/x/y?z=1", "backend api /api/x/y?z=1")
        .await;
    probe.expect(host, "/apix", "fallback").await;
    probe.expect(host, "/ap", "fallback").await;

    probe.expect(host, "/api/v2", "api-v2").await;
    probe.expect(host, "/api/v2/users", "api-v2").await;
    probe.expect(host, "/api/v2x", "backend api /api/v2x").await;

    probe.expect(host, "/items/42", "items-regex").await;
    probe.expect(host, "/items/42?x=y", "items-regex").await;
    probe.expect(host, "/items/42a", "fallback").await;
    probe.expect(host, "/items/", "fallback").await;

    probe.expect(host, "/docs/v1/intro", "docs-regex").await;
    probe.expect(host, "/docs/v2/intro", "docs-regex").await;
    probe.expect(host, "/docs", "fallback").await;
    assert_eq!(api.count(), 4);
}

#[tokio::test]
async fn a_method_mismatch_falls_through_to_later_routes() {
    let reader = named_backend("reader").await;
    let routes = [
        direct(
            "writer",
            "",
            "path = \"/thing\"\nmethods = [\"POST\", \"put\"]",
        ),
        forward("reader", "", r#"path = "/thing""#),
        direct(
            "post-only",
            "",
            "path = \"/only-post\"\nmethods = [\"POST\"]",
        ),
    ]
    .concat();
    let gateway = Gateway::start(&config(&[("reader", reader.addr)], &routes));
    let probe = Probe::new(&gateway);
    let host = Some("methods.test");

    let writer = (200, "writer".to_string());
    let read = (200, "backend reader /thing".to_string());
    assert_eq!(probe.send("POST", host, "/thing", &[]).await, writer);
    assert_eq!(probe.send("PUT", host, "/thing", &[]).await, writer);
    assert_eq!(probe.send("GET", host, "/thing", &[]).await, read);
    assert_eq!(probe.send("DELETE", host, "/thing", &[]).await, read);
    assert_eq!(
        probe.send("POST", host, "/only-post", &[]).await,
        (200, "post-only".to_string())
    );
    // No later route: a mismatch is a miss.
    assert_eq!(probe.send("GET", host, "/only-post", &[]).await.0, 404);
    assert_eq!(reader.count(), 2);
}

#[tokio::test]
async fn header_and_query_conditions() {
    let tenant = named_backend("tenant").await;
    let routes = [
        forward(
            "tenant",
            "",
            r#"headers = [{ name = "x-tenant", value = "acme" }]"#,
        ),
        direct(
            "version-regex",
            "",
            r#"headers = [{ name = "x-version", regex = "^v[0-9]+$" }]"#,
        ),
        direct(
            "debug-present",
            "",
            r#"headers = [{ name = "x-debug", present = true }]"#,
        ),
        direct("lang-fr", "", r#"query = [{ name = "lang", value = "fr" }]"#),
        direct(
            "id-regex",
            "",
            r#"query = [{ name = "id", regex = "^[0-9]+$" }]"#,
        ),
        direct(
            "preview-present",
            "",
            r#"query = [{ name = "preview", present = true }]"#,
        ),
        // Two conditions, AND-ed; ranked before the one-condition routes above it.
        direct(
            "beta-de",
            "",
            "headers = [{ name = \"x-tenant\", value = \"beta\" }]\nquery = [{ name = \"lang\", value = \"de\" }]",
        ),
        direct(
            "anonymous",
            "",
            r#"headers = [{ name = "authorization", present = false }]"#,
        ),
    ]
    .concat();
    let gateway = Gateway::start(&config(&[("tenant", tenant.addr)], &routes));
    let probe = Probe::new(&gateway);
    let host = Some("conditions.test");
    let auth = ("authorization", "Bearer t");
    let ask = |path: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let probe = &probe;
        async move { probe.send("GET", host, path, &headers).await }
    };
    let ok = |body: &str| (200, body.to_string());

    // Header value.
    assert_eq!(
        ask("/t", vec![auth, ("x-tenant", "acme")]).await,
        ok("backend tenant /t")
    );
    assert_eq!(
        ask("/", vec![auth, ("X-Tenant", "acme")]).await,
        ok("backend tenant /")
    );
    assert_eq!(ask("/", vec![auth, ("x-tenant", "Acme")]).await.0, 404);
    // Header regex.
    assert_eq!(
        ask("/", vec![auth, ("x-version", "v12")]).await,
        ok("version-regex")
    );
    assert_eq!(ask("/", vec![auth, ("x-version", "12")]).await.0, 404);
    assert_eq!(ask("/", vec![auth, ("x-version", "v1x")]).await.0, 404);
    // Header present, even empty.
    assert_eq!(
        ask("/", vec![auth, ("x-debug", "")]).await,
        ok("debug-present")
    );
    // Query value, regex, presence.
    assert_eq!(ask("/?lang=fr", vec![auth]).await, ok("lang-fr"));
    assert_eq!(ask("/?a=1&lang=fr", vec![auth]).await, ok("lang-fr"));
    assert_eq!(ask("/?lang=en", vec![auth]).await.0, 404);
    assert_eq!(ask("/?xlang=fr", vec![auth]).await.0, 404);
    assert_eq!(ask("/?id=123", vec![auth]).await, ok("id-regex"));
    assert_eq!(ask("/?id=12a", vec![auth]).await.0, 404);
    assert_eq!(ask("/?preview", vec![auth]).await, ok("preview-present"));
    assert_eq!(ask("/?preview=", vec![auth]).await, ok("preview-present"));
    // AND: both conditions, or neither route.
    assert_eq!(
        ask("/?lang=de", vec![auth, ("x-tenant", "beta")]).await,
        ok("beta-de")
    );
    assert_eq!(ask("/?lang=de", vec![auth]).await.0, 404);
    assert_eq!(ask("/", vec![auth, ("x-tenant", "beta")]).await.0, 404);
    // Header absent.
    assert_eq!(ask("/", vec![]).await, ok("anonymous"));
    assert_eq!(ask("/", vec![auth]).await.0, 404);
    // Several routes match: the first in config order wins (equal rank otherwise).
    assert_eq!(
        ask("/?lang=fr", vec![("x-version", "v1")]).await,
        ok("version-regex")
    );
    assert_eq!(tenant.count(), 2);
}

#[tokio::test]
async fn priority_beats_specificity_which_beats_config_order() {
    let boosted = named_backend("boosted").await;
    let routes = [
        // Most specific for /p/exact, but priority 0.
        direct("exact-specific", "", r#"path = "/p/exact""#),
        direct(
            "exact-host",
            "",
            "hosts = [\"prio.test\"]\npath = \"/p/exact\"",
        ),
        forward("boosted", "priority = 10", r#"path_prefix = "/p""#),
        // Same priority and specificity as the route above: config order decides.
        direct("boosted-later", "priority = 10", r#"path_prefix = "/p""#),
        // A negative priority loses even to the catch-all.
        direct("demoted", "priority = -1", r#"path = "/q""#),
        direct("catch-all", "", r#"path_prefix = "/""#),
        // Equal rank: the first declared wins.
        direct("same-first", "", r#"path = "/same""#),
        direct("same-second", "", r#"path = "/same""#),
        // Specificity beats config order.
        direct("short", "", r#"path_prefix = "/spec""#),
        direct("long", "", r#"path_prefix = "/spec/deep""#),
        direct("any-host", "", r#"path = "/hostwins""#),
        direct("exact-host-only", "", r#"hosts = ["prio.test"]"#),
    ]
    .concat();
    let gateway = Gateway::start(&config(&[("boosted", boosted.addr)], &routes));
    let probe = Probe::new(&gateway);

    probe
        .expect("prio.test", "/p/exact", "backend boosted /p/exact")
        .await;
    probe
        .expect("other.test", "/p/exact", "backend boosted /p/exact")
        .await;
    probe
        .expect("other.test", "/p/x", "backend boosted /p/x")
        .await;
    probe.expect("other.test", "/q", "catch-all").await;
    probe.expect("other.test", "/same", "same-first").await;
    probe.expect("other.test", "/spec/deep/x", "long").await;
    probe.expect("other.test", "/spec/x", "short").await;
    // Host specificity ranks before path specificity.
    probe.expect("other.test", "/hostwins", "any-host").await;
    probe
        .expect("prio.test", "/hostwins", "exact-host-only")
        .await;
    assert_eq!(boosted.count(), 3);
}

#[tokio::test]
async fn ten_thousand_routes_load_and_route() {
    const ROUTES: usize = 10_000;
    const HOST_ROUTES: usize = ROUTES / 2;
    let bulk = named_backend("bulk").await;
    let mut routes = String::with_capacity(ROUTES * 100);
    for index in 0..ROUTES {
        // The first half by host, the second half by path prefix; every 1000th to a pool.
        let matcher = if index < HOST_ROUTES {
            format!("hosts = [\"svc{index}.bulk.test\"]")
        } else {
            format!("path_prefix = \"/bulk/{index}\"")
        };
        let name = format!("name = \"route-{index}\"");
        if index % 1000 == 999 {
            routes.push_str(&forward("bulk", &name, &matcher));
        } else {
            routes.push_str(&direct(&format!("route-{index}"), &name, &matcher));
        }
    }
    let gateway = Gateway::start(&config(&[("bulk", bulk.addr)], &routes));
    let probe = Probe::new(&gateway);

    for index in [0, 1, 2, 1234, 2500, 4998, 5001, 6543, 7777, 9998] {
        let expected = format!("route-{index}");
        if index < HOST_ROUTES {
            probe
                .expect(&format!("svc{index}.bulk.test"), "/anything", &expected)
                .await;
        } else {
            probe
                .expect("client.test", &format!("/bulk/{index}/x"), &expected)
                .await;
        }
    }
    // First, last and a middle one of each half, and the routes to the pool.
    probe.expect("svc0.bulk.test", "/", "route-0").await;
    probe
        .expect("SVC4999.bulk.test:80", "/", "backend bulk /")
        .await;
    probe
        .expect("svc999.bulk.test", "/a", "backend bulk /a")
        .await;
    probe
        .expect("client.test", "/bulk/5000", "route-5000")
        .await;
    probe
        .expect("client.test", "/bulk/5999", "backend bulk /bulk/5999")
        .await;
    probe
        .expect("client.test", "/bulk/9999/z", "backend bulk /bulk/9999/z")
        .await;
    // A host route outranks a path route for its host.
    probe
        .expect("svc7.bulk.test", "/bulk/7777", "route-7")
        .await;
    assert_eq!(bulk.count(), 4);

    // Misses.
    probe.expect_404("svc5000.bulk.test", "/").await;
    probe.expect_404("bulk.test", "/").await;
    probe.expect_404("client.test", "/bulk/10000").await;
    probe.expect_404("client.test", "/bulk/4999").await;
    probe.expect_404("client.test", "/bulk/50001").await;
    probe.expect_404("client.test", "/bulk/5000x").await;
    probe.expect_404("client.test", "/bulk").await;
}

#[tokio::test]
async fn one_line_proxy_mode_round_robins_between_backends() {
    let one = named_backend("one").await;
    let two = named_backend("two").await;
    let (addr_one, addr_two) = (one.addr.to_string(), two.addr.to_string());
    let gateway = Gateway::start_args(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--to",
            &addr_one,
            "--to",
            &addr_two,
        ],
        &[],
    );
    let url = format!("http://{}", gateway.addr("proxy"));
    let client = http1_client();
    let mut answered = Vec::new();
    for index in 0..6 {
        let response = client
            .get(format!("{url}/r/{index}"))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let body = response.text().await.unwrap();
        let name = body.split(' ').nth(1).unwrap().to_string();
        assert_eq!(body, format!("backend {name} /r/{index}"));
        answered.push(name);
    }
    // Equal weights: strictly alternating, each backend half the requests.
    assert!(
        answered.windows(2).all(|pair| pair[0] != pair[1]),
        "{answered:?}"
    );
    assert_eq!((one.count(), two.count()), (3, 3), "{answered:?}");
}
