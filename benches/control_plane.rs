//! Control-plane benchmarks (SPEC PERF-6): compiling and swapping a config snapshot, and
//! routing one request, with 10 and 10,000 routes.
//!
//! Run: `cargo bench --bench control_plane` (see docs/BENCHMARKS.md).
//!
//! The generated route tables are shaped like a real multi-tenant gateway rather than a
//! best case: routes are spread over 100 exact hosts, 10 wildcard hosts and a host-less
//! fallback group; most use `path_prefix` at depths 1–3, a tenth use an exact `path`,
//! some add a method or header condition, and a few are regexes. Route numbers in hosts
//! and paths are zero-padded (`/svc00042/v1`), so keys have the same length in every
//! table: the lookup hashes and compares them, and the comparison is between table
//! sizes, not between path lengths.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use gatehouse::config::{self, Config, Format};
use gatehouse::route::{RequestFacts, Router};
use gatehouse::snapshot::{compile, Publisher, Registries};
use http::{HeaderMap, HeaderValue, Method};

const SIZES: [usize; 2] = [10, 10_000];
const POOLS: usize = 10;

/// The host a route with this index is attached to (`None`: any host). The wildcard and
/// host-less classes sit among the first ten indexes so that the 10-route table has one
/// route of every kind, like the 10,000-route one.
fn route_host(i: usize) -> Option<String> {
    match i % 20 {
        // 5 % of routes: no host condition.
        9 => None,
        // 5 % of routes: wildcard hosts.
        8 => Some(format!("*.tenant{}.example.net", (i / 20) % 10)),
        _ => Some(format!("svc{:02}.example.com", i % 100)),
    }
}

/// A TOML config with `routes` routes over `POOLS` pools.
fn config_text(routes: usize) -> String {
    let mut text = String::with_capacity(routes * 160);
    text.push_str("[access_log]\nenabled = false\n\n");
    text.push_str("[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n");
    for p in 0..POOLS {
        text.push_str(&format!(
            "[[pools]]\nname = \"pool{p}\"\nendpoints = [\"127.0.0.1:{}\"]\n\n",
            20_000 + p
        ));
    }
    for i in 0..routes {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\npool = \"pool{}\"\n",
            i % POOLS
        ));
        if let Some(host) = route_host(i) {
            text.push_str(&format!("match.hosts = [\"{host}\"]\n"));
        }
        match i % 10 {
            0 => text.push_str(&format!("match.path = \"/exact/{i:05}/status\"\n")),
            1 => text.push_str(&format!(
                "match.path_prefix = \"/api/v{}/orders{i:05}\"\n",
                i % 3
            )),
            2 => text.push_str(&format!("match.path_prefix = \"/static{i:05}\"\n")),
            3 if i % 1000 == 3 => {
                text.push_str(&format!("match.path_regex = \"^/re{i:05}/[0-9]+$\"\n"))
            }
            4 => {
                text.push_str(&format!("match.path_prefix = \"/svc{i:05}\"\n"));
                text.push_str("match.methods = [\"GET\", \"HEAD\"]\n");
            }
            5 => {
                text.push_str(&format!("match.path_prefix = \"/svc{i:05}\"\n"));
                text.push_str("match.headers = [{ name = \"x-canary\", value = \"1\" }]\n");
            }
            _ => text.push_str(&format!("match.path_prefix = \"/svc{i:05}/v1\"\n")),
        }
        text.push('\n');
    }
    text
}

fn parse(text: &str) -> Config {
    config::parse_str(text, Format::Toml, std::iter::empty()).expect("generated config is valid")
}

/// Parse TOML, compile a snapshot, and swap it in (`Publisher::apply`): what a reload does.
fn bench_compile_and_swap(c: &mut Criterion) {
    let mut group = c.benchmark_group("config");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for routes in SIZES {
        let text = config_text(routes);
        let config = parse(&text);
        let publisher = Publisher::new(config.clone()).expect("compiles");

        // The whole reload: text → validated Config → compiled snapshot → swapped in.
        group.bench_with_input(
            BenchmarkId::new("parse_compile_swap", routes),
            &text,
            |b, text| b.iter(|| publisher.apply(parse(black_box(text))).expect("applies")),
        );
        // Compile and swap only (the config already parsed and validated).
        group.bench_with_input(
            BenchmarkId::new("compile_swap", routes),
            &config,
            |b, config| {
                b.iter_batched(
                    || config.clone(),
                    |config| publisher.apply(config).expect("applies"),
                    BatchSize::LargeInput,
                )
            },
        );
        // Compile only, into a fresh registry (no swap).
        group.bench_with_input(BenchmarkId::new("compile", routes), &config, |b, config| {
            let registries = Registries::default();
            b.iter_batched(
                || config.clone(),
                |config| compile(config, 1, &registries).expect("compiles"),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// One request to route, split the way the proxy hands it to the router.
struct Probe {
    host: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    /// The route this request must resolve to (checked before measuring).
    expected: Option<usize>,
}

/// Kinds of route in `config_text`, by `i % 10` (`i % 20` for the host class).
const KINDS: usize = 10;
/// Rounds of probes: each round routes one request of every kind plus two misses.
const ROUNDS: usize = 10;

/// The same mix of requests for every table size, so that the sizes differ only in the
/// table: per round one request for a route of each kind (exact path, three-segment
/// prefix, one-segment prefix, regex, method condition, header condition, two deeper
/// prefixes, a wildcard host, no host), a known host with an unknown path, and an
/// unknown host. Round r routes the requests of round `r % distinct`: with
/// `distinct = 1` every table sees 12 different requests (each repeated, as separate
/// copies, so the probes' own memory is the same); with `distinct = ROUNDS` the
/// 10,000-route table sees 120 (over 100 routes and 40 of the 100 exact hosts), while
/// the 10-route table, having one route of each kind, still sees 12.
fn probes(routes: usize, distinct: usize) -> Vec<Probe> {
    let mut out = Vec::new();
    // Route i is of kind i % 10 and host class i % 20; `j + 20 * k` keeps both.
    let spread = (routes / 20).max(1);
    for round in (0..ROUNDS).map(|round| round % distinct) {
        for kind in 0..KINDS {
            let i = if kind == 3 {
                // Regex routes are the ones with i % 1000 == 3.
                3 + 1000 * (round % (routes / 1000).max(1))
            } else {
                kind + 20 * ((round * 53 + kind * 47) % spread)
            };
            assert!(i < routes);
            let host = match route_host(i) {
                Some(h) => h.replace("*.", "a."),
                None => "unmatched.example.org".to_string(),
            };
            let path = match kind {
                0 => format!("/exact/{i:05}/status"),
                1 => format!("/api/v{}/orders{i:05}/123", i % 3),
                2 => format!("/static{i:05}/css/site.css"),
                3 => format!("/re{i:05}/42"),
                _ => format!("/svc{i:05}/v1/users/42"),
            };
            out.push(probe(host, path, Some(i)));
        }
        let known = route_host(20 * ((round * 29) % spread)).expect("kind 0 has a host");
        out.push(probe(known, format!("/nothing/here/{round}"), None));
        out.push(probe(
            format!("unknown{round}.example.org"),
            "/svc/v1/users".to_string(),
            None,
        ));
    }
    out
}

fn probe(host: String, path: String, expected: Option<usize>) -> Probe {
    let mut headers = HeaderMap::new();
    headers.insert("x-canary", HeaderValue::from_static("1"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    Probe {
        host,
        path,
        query: None,
        headers,
        expected,
    }
}

/// `Router::lookup` for one request (cycling through the probes).
fn bench_routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    let method = Method::GET;
    let client_ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    for routes in SIZES {
        let config = parse(&config_text(routes));
        let router = Router::for_routes(&config.routes).expect("builds");
        eprintln!(
            "route_lookup/{routes}: lookup structures {} KiB",
            router.index_heap_bytes() / 1024
        );
        // `lookup`: the same 12 requests for both sizes, so only the table differs;
        // `lookup_spread`: 10 times as many different requests on the large table, so
        // its lookups also outgrow the first-level cache.
        for (name, distinct) in [("lookup", 1), ("lookup_spread", ROUNDS)] {
            let probes = probes(routes, distinct);
            for probe in &probes {
                assert_eq!(
                    lookup(&router, probe, &method, client_ip),
                    probe.expected,
                    "{} {}",
                    probe.host,
                    probe.path
                );
            }
            let mut next = 0usize;
            group.bench_function(BenchmarkId::new(name, routes), |b| {
                b.iter(|| {
                    next += 1;
                    if next == probes.len() {
                        next = 0;
                    }
                    lookup(&router, black_box(&probes[next]), &method, client_ip)
                })
            });
        }
    }
    group.finish();
}

fn lookup(router: &Router, probe: &Probe, method: &Method, client_ip: IpAddr) -> Option<usize> {
    router.lookup(&RequestFacts {
        host: &probe.host,
        path: &probe.path,
        query: probe.query.as_deref(),
        method,
        headers: &probe.headers,
        client_ip,
    })
}

criterion_group!(benches, bench_compile_and_swap, bench_routing);
criterion_main!(benches);
