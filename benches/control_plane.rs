//! Control-plane benchmarks (SPEC PERF-6): compiling and swapping a config snapshot, and
//! routing one request, with 10 and 10,000 routes.
//!
//! Run: `cargo bench --bench control_plane` (see docs/BENCHMARKS.md).
//!
//! The generated route tables are shaped like a real multi-tenant gateway rather than a
//! best case: routes are spread over 100 exact hosts, 10 wildcard hosts and a host-less
//! fallback group; most use `path_prefix` at depths 1–3, a tenth use an exact `path`,
//! some add a method or header condition, and a few are regexes.

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

/// The host a route with this index is attached to (`None`: any host).
fn route_host(i: usize) -> Option<String> {
    match i % 20 {
        // 5 % of routes: no host condition.
        19 => None,
        // 5 % of routes: wildcard hosts.
        18 => Some(format!("*.tenant{}.example.net", i % 10)),
        _ => Some(format!("svc{}.example.com", i % 100)),
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
            0 => text.push_str(&format!("match.path = \"/exact/{i}/status\"\n")),
            1 => text.push_str(&format!(
                "match.path_prefix = \"/api/v{}/orders{i}\"\n",
                i % 3
            )),
            2 => text.push_str(&format!("match.path_prefix = \"/static{i}\"\n")),
            3 if i % 1000 == 3 => {
                text.push_str(&format!("match.path_regex = \"^/re{i}/[0-9]+$\"\n"))
            }
            4 => {
                text.push_str(&format!("match.path_prefix = \"/svc{i}\"\n"));
                text.push_str("match.methods = [\"GET\", \"HEAD\"]\n");
            }
            5 => {
                text.push_str(&format!("match.path_prefix = \"/svc{i}\"\n"));
                text.push_str("match.headers = [{ name = \"x-canary\", value = \"1\" }]\n");
            }
            _ => text.push_str(&format!("match.path_prefix = \"/svc{i}/v1\"\n")),
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

/// Requests that hit routes spread over the whole table, plus a miss.
struct Probe {
    host: String,
    path: String,
    headers: HeaderMap,
}

fn probes(routes: usize) -> Vec<Probe> {
    let mut out = Vec::new();
    // 64 routes spread evenly over the table, so the 10,000-route case is not only
    // measuring a few cache-hot buckets.
    let step = (routes / 64).max(1);
    for i in (0..routes).step_by(step).take(64) {
        let host = match route_host(i) {
            Some(h) => h.replace("*.", "a."),
            None => "unmatched.example.org".to_string(),
        };
        let path = match i % 10 {
            0 => format!("/exact/{i}/status"),
            1 => format!("/api/v{}/orders{i}/123", i % 3),
            2 => format!("/static{i}/css/site.css"),
            3 if i % 1000 == 3 => format!("/re{i}/42"),
            3 => "/nothing/here".to_string(),
            _ => format!("/svc{i}/v1/users/42"),
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-canary", HeaderValue::from_static("1"));
        headers.insert("user-agent", HeaderValue::from_static("bench"));
        out.push(Probe {
            host,
            path,
            headers,
        });
    }
    out
}

/// `Router::lookup` for one request (cycling through 64 different requests).
fn bench_routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    let method = Method::GET;
    let client_ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    for routes in SIZES {
        let config = parse(&config_text(routes));
        let router = Router::for_routes(&config.routes).expect("builds");
        let probes = probes(routes);
        let matched = probes
            .iter()
            .filter(|p| lookup(&router, p, &method, client_ip).is_some())
            .count();
        assert!(matched > probes.len() / 2, "most probes must hit a route");
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("lookup", routes), |b| {
            b.iter(|| {
                next = (next + 1) % probes.len();
                lookup(&router, black_box(&probes[next]), &method, client_ip)
            })
        });
    }
    group.finish();
}

fn lookup(router: &Router, probe: &Probe, method: &Method, client_ip: IpAddr) -> Option<usize> {
    let (path, query) = match probe.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (probe.path.as_str(), None),
    };
    router.lookup(&RequestFacts {
        host: &probe.host,
        path,
        query,
        method,
        headers: &probe.headers,
        client_ip,
    })
}

criterion_group!(benches, bench_compile_and_swap, bench_routing);
criterion_main!(benches);
