//! Load-generator helpers for the peer benchmark harness in `bench/` (see
//! docs/BENCHMARKS.md). Not part of the gateway.
//!
//! `rate`: an open-loop, fixed-rate HTTP/1.1 keep-alive load generator. Debian has no
//! wrk2, so this replaces it: `--rate` requests per second are spread evenly over
//! `--connections` keep-alive connections driven by one event-loop thread (as cheap per
//! request as wrk, which matters when the client shares two cores with the server).
//! Request `i` is due at `start + i/rate`. When a request falls due while its connection
//! is still waiting for the previous response, its latency counts from the due time, so
//! a server that stalls cannot hide the stall by slowing the load down (coordinated
//! omission corrected, as wrk2 does); otherwise it counts from the moment it was sent.
//! Prints one `key=value` line.
//!
//! `idle`: opens `--connections` keep-alive connections, sends one request on each, reads
//! the response, then holds every connection open and idle. Prints `ready N` once all are
//! established and keeps them until `--hold` elapses or it is killed.
//!
//! `handshakes`: new TLS connections per second. `--connections` loops each connect,
//! make a full TLS handshake (session resumption disabled: no tickets, no session ids
//! are kept), send one HTTP/1.1 request with `Connection: close`, read the response and
//! drop the connection, for `--duration`. The server certificate is not checked against
//! any root (the harness uses a throwaway one) but its handshake signature is verified,
//! as a real client does. Prints one `key=value` line.
//!
//! `sink`: an HTTP/1.1 upload sink for the streaming benchmark. It reads every request
//! body to its end (Content-Length or chunked, `Expect: 100-continue` honoured) without
//! keeping it, and only then answers `200` with `received=N`. nginx cannot do this
//! without help: `return 200` answers before the body has arrived and discards the rest
//! afterwards, and the modules that read a whole body first spool it to a file.
//!
//! All speak only to the address given (the harness uses 127.0.0.1).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rustls::pki_types::ServerName;

#[derive(Parser)]
#[command(about = "Gatehouse benchmark load helpers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fixed-rate load with latency percentiles measured from each request's due time.
    Rate {
        #[arg(long)]
        addr: SocketAddr,
        /// Requests per second, in total.
        #[arg(long)]
        rate: f64,
        #[arg(long, default_value_t = 50)]
        connections: usize,
        /// Client threads (1: a single-threaded event loop, like `wrk -t1`).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Measured duration, after the warm-up.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Load sent before measuring, at the same rate.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Open N keep-alive connections, one request each, then keep them idle.
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        hold: Duration,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// New TLS connections per second: full handshake, one request, close; in a loop.
    Handshakes {
        #[arg(long)]
        addr: SocketAddr,
        /// Server name sent in the ClientHello (SNI) and in `Host`.
        #[arg(long, default_value = "bench.test")]
        sni: String,
        /// Connections being set up at once.
        #[arg(long, default_value_t = 50)]
        connections: usize,
        /// Client threads (1: a single-threaded event loop).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Accept HTTP/1.1 uploads on `--listen`, read each body to its end, answer 200.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Rate {
            addr,
            rate,
            connections,
            threads,
            duration,
            warmup,
            path,
        } => run_rate(addr, rate, connections, threads, duration, warmup, &path),
        Command::Idle {
            addr,
            connections,
            concurrency,
            hold,
            path,
        } => run_idle(addr, connections, concurrency, hold, &path),
        Command::Handshakes {
            addr,
            sni,
            connections,
            threads,
            duration,
            path,
        } => run_handshakes(addr, &sni, connections, threads, duration, &path),
        Command::Sink { listen } => run_sink(listen),
    }
}

fn request_bytes(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: gatehouse-bench\r\n\r\n")
        .into_bytes()
}

/// If `buf` starts with a complete HTTP/1.1 response (Content-Length or chunked body),
/// returns its status and length in bytes.
fn complete_response(buf: &[u8]) -> io::Result<Option<(u16, usize)>> {
    let Some(header_end) = find(buf, b"\r\n\r\n").map(|pos| pos + 4) else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..header_end]).map_err(io::Error::other)?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    let mut content_length = 0;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse::<usize>().map_err(io::Error::other)?;
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    if !chunked {
        let total = header_end + content_length;
        return Ok((buf.len() >= total).then_some((status, total)));
    }
    let mut pos = header_end;
    loop {
        let Some(line_len) = find(&buf[pos..], b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&buf[pos..pos + line_len]).map_err(io::Error::other)?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(io::Error::other)?;
        pos += line_len + 2;
        if size == 0 {
            // Trailers, if any, then an empty line.
            loop {
                let Some(line_len) = find(&buf[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += line_len + 2;
                if line_len == 0 {
                    return Ok(Some((status, pos)));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        pos += size + 2;
    }
}

/// Reads one response from a blocking socket; returns its status. `buf` keeps any bytes
/// past its end (none without pipelining).
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<u16> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some((status, len)) = complete_response(buf)? {
            buf.drain(..len);
            return Ok(status);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The same on a tokio socket.
async fn read_response_async(
    stream: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> io::Result<u16> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some((status, len)) = complete_response(buf)? {
            buf.drain(..len);
            return Ok(status);
        }
        buf.reserve(16 * 1024);
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

#[derive(Default)]
struct ConnResult {
    /// Latency in microseconds of every measured request that succeeded.
    latencies: Vec<u32>,
    errors: u64,
    non_2xx: u64,
}

struct Schedule {
    addr: SocketAddr,
    request: Arc<Vec<u8>>,
    first_due: tokio::time::Instant,
    interval: Duration,
    measure_from: tokio::time::Instant,
    end: tokio::time::Instant,
}

async fn connect_async(addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One connection's share of the load: requests due every `interval`, sent when due or,
/// if the previous response is late, as soon as it arrives.
async fn drive_connection(mut stream: tokio::net::TcpStream, plan: Schedule) -> ConnResult {
    use tokio::io::AsyncWriteExt;
    let mut result = ConnResult::default();
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut due = plan.first_due;
    while due < plan.end {
        // Latency clock: from the due time when the connection was still busy with the
        // previous request then (the server delayed this one: coordinated omission
        // corrected, as wrk2 does); from the actual send when the connection was idle,
        // so the client's own timer granularity (tokio: 1 ms) is not charged to the server.
        let clock = if tokio::time::Instant::now() < due {
            tokio::time::sleep_until(due).await;
            tokio::time::Instant::now()
        } else {
            due
        };
        let outcome = async {
            stream.write_all(&plan.request).await?;
            read_response_async(&mut stream, &mut buf).await
        };
        let outcome = tokio::time::timeout(Duration::from_secs(10), outcome).await;
        let measured = due >= plan.measure_from;
        match outcome {
            Ok(Ok(status)) => {
                if measured {
                    let micros = clock.elapsed().as_micros();
                    result.latencies.push(micros.min(u32::MAX as u128) as u32);
                    if !(200..300).contains(&status) {
                        result.non_2xx += 1;
                    }
                }
            }
            _ => {
                if measured {
                    result.errors += 1;
                }
                buf.clear();
                loop {
                    match connect_async(plan.addr).await {
                        Ok(fresh) => {
                            stream = fresh;
                            break;
                        }
                        Err(_) if tokio::time::Instant::now() < plan.end => {
                            tokio::time::sleep(Duration::from_millis(10)).await
                        }
                        Err(_) => return result,
                    }
                }
            }
        }
        due += plan.interval;
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn run_rate(
    addr: SocketAddr,
    rate: f64,
    connections: usize,
    threads: usize,
    duration: Duration,
    warmup: Duration,
    path: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        rate > 0.0 && connections > 0,
        "rate and connections must be > 0"
    );
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let request = Arc::new(request_bytes(addr, path));
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let results = runtime.block_on(async {
        // Connect everything first, then start the schedule shortly after.
        let mut streams = Vec::with_capacity(connections);
        for _ in 0..connections {
            streams.push(connect_async(addr).await?);
        }
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let mut tasks = tokio::task::JoinSet::new();
        for (k, stream) in streams.into_iter().enumerate() {
            // Connection k sends requests k, k + C, k + 2C, … of the global schedule.
            let first_due = start + Duration::from_secs_f64(k as f64 / rate);
            tasks.spawn(drive_connection(
                stream,
                Schedule {
                    addr,
                    request: request.clone(),
                    first_due,
                    interval,
                    measure_from: start + warmup,
                    end: start + warmup + duration,
                },
            ));
        }
        let mut results = Vec::with_capacity(connections);
        while let Some(result) = tasks.join_next().await {
            results.push(result?);
        }
        anyhow::Ok(results)
    })?;
    let mut all = Vec::new();
    let mut errors = 0;
    let mut non_2xx = 0;
    for result in results {
        all.extend_from_slice(&result.latencies);
        errors += result.errors;
        non_2xx += result.non_2xx;
    }
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * all.len() as f64).ceil() as usize;
        all[rank.clamp(1, all.len()) - 1] as f64 / 1000.0
    };
    println!(
        "target_rps={rate:.0} achieved_rps={:.0} requests={} errors={errors} non_2xx={non_2xx} \
         p50_ms={:.3} p90_ms={:.3} p99_ms={:.3} p999_ms={:.3} max_ms={:.3}",
        all.len() as f64 / duration.as_secs_f64(),
        all.len(),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        pct(100.0),
    );
    Ok(())
}

fn run_idle(
    addr: SocketAddr,
    connections: usize,
    concurrency: usize,
    hold: Duration,
    path: &str,
) -> anyhow::Result<()> {
    let request = Arc::new(request_bytes(addr, path));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let request = request.clone();
        let next = next.clone();
        let failures = failures.clone();
        workers.push(std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < connections {
                let opened = connect(addr).and_then(|mut stream| {
                    stream.write_all(&request)?;
                    let status = read_response(&mut stream, &mut buf)?;
                    if !(200..300).contains(&status) {
                        return Err(io::Error::other(format!("status {status}")));
                    }
                    Ok(stream)
                });
                match opened {
                    Ok(stream) => kept.push(stream),
                    Err(err) => {
                        if failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
                            eprintln!("idle: connection failed: {err}");
                        }
                    }
                }
                buf.clear();
            }
            kept
        }));
    }
    let mut open = Vec::with_capacity(connections);
    for worker in workers {
        open.extend(
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("idle thread panicked"))?,
        );
    }
    let failed = failures.load(std::sync::atomic::Ordering::Relaxed);
    println!("ready {} failed {failed}", open.len());
    io::stdout().flush()?;
    std::thread::sleep(hold);
    // Check how many the server kept open for the whole hold (a closed one reads EOF).
    let mut still_open = 0;
    for stream in &open {
        stream.set_nonblocking(true)?;
        let mut byte = [0u8; 1];
        match (&*stream).read(&mut byte) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => still_open += 1,
            _ => {}
        }
    }
    println!("still_open {still_open}");
    Ok(())
}

#[derive(Default)]
struct HandshakeResult {
    completed: u64,
    errors: u64,
    non_2xx: u64,
}

fn run_handshakes(
    addr: SocketAddr,
    sni: &str,
    connections: usize,
    threads: usize,
    duration: Duration,
    path: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(connections > 0, "connections must be > 0");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        // Any certificate is accepted, but the handshake signature is verified with it,
        // so the client does the same cryptographic work as one that trusts it.
        .with_custom_certificate_verifier(Arc::new(gatehouse::tls::NoVerification(provider)))
        .with_no_client_auth();
    // Every connection a full handshake: nothing is remembered between connections.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(sni.to_owned())?;
    let request = Arc::new(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {sni}\r\nUser-Agent: gatehouse-bench\r\n\
             Connection: close\r\n\r\n"
        )
        .into_bytes(),
    );
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    let started = std::time::Instant::now();
    let results = runtime.block_on(async {
        let end = tokio::time::Instant::now() + duration;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let request = request.clone();
            tasks.spawn(async move {
                let mut result = HandshakeResult::default();
                let mut buf = Vec::with_capacity(4096);
                while tokio::time::Instant::now() < end {
                    let exchange = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let tcp = connect_async(addr).await?;
                        let mut tls = connector.connect(server_name.clone(), tcp).await?;
                        tls.write_all(&request).await?;
                        buf.clear();
                        loop {
                            if let Some((status, _)) = complete_response(&buf)? {
                                return io::Result::Ok(status);
                            }
                            buf.reserve(4096);
                            if tls.read_buf(&mut buf).await? == 0 {
                                return Err(io::ErrorKind::UnexpectedEof.into());
                            }
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                        Ok(Ok(status)) if (200..300).contains(&status) => result.completed += 1,
                        Ok(Ok(_)) => result.non_2xx += 1,
                        _ => result.errors += 1,
                    }
                }
                result
            });
        }
        let mut total = HandshakeResult::default();
        while let Some(result) = tasks.join_next().await {
            let result = result?;
            total.completed += result.completed;
            total.errors += result.errors;
            total.non_2xx += result.non_2xx;
        }
        anyhow::Ok(total)
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "handshakes={} per_sec={:.0} errors={} non_2xx={} seconds={elapsed:.2}",
        results.completed,
        results.completed as f64 / elapsed,
        results.errors,
        results.non_2xx,
    );
    Ok(())
}

fn run_sink(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(listen)?;
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            if let Err(err) = sink_connection(stream) {
                if err.kind() != io::ErrorKind::UnexpectedEof {
                    eprintln!("sink: {err}");
                }
            }
        });
    }
    Ok(())
}

/// Serves keep-alive requests on one connection until the client closes it.
fn sink_connection(stream: TcpStream) -> io::Result<()> {
    use std::io::BufRead;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = io::BufReader::with_capacity(256 * 1024, stream);
    loop {
        // The header block, bounded.
        let mut head = Vec::new();
        loop {
            let start = head.len();
            if reader.read_until(b'\n', &mut head)? == 0 {
                return if head.is_empty() {
                    Ok(())
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            if head.len() > 64 * 1024 {
                return Err(io::Error::other("header block over 64 KiB"));
            }
            if head[start..] == *b"\r\n" || head[start..] == *b"\n" {
                break;
            }
        }
        let head = String::from_utf8_lossy(&head);
        let mut content_length: u64 = 0;
        let mut chunked = false;
        let mut expect_continue = false;
        let mut close = false;
        for line in head.lines().skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim().to_ascii_lowercase();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    content_length = value.parse().map_err(io::Error::other)?;
                }
                "transfer-encoding" => chunked = value.contains("chunked"),
                "expect" => expect_continue = value == "100-continue",
                "connection" => close = value.contains("close"),
                _ => {}
            }
        }
        if expect_continue {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let received = if chunked {
            let mut total = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let size_text = line.trim().split(';').next().unwrap_or("");
                let size = u64::from_str_radix(size_text, 16).map_err(io::Error::other)?;
                if size == 0 {
                    // Trailers, then an empty line.
                    loop {
                        line.clear();
                        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                discard(&mut reader, size)?;
                discard(&mut reader, 2)?;
                total += size;
            }
            total
        } else {
            discard(&mut reader, content_length)?;
            content_length
        };
        let body = format!("received={received}\n");
        writer.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )?;
        if close {
            return Ok(());
        }
    }
}

/// Reads and drops exactly `len` bytes.
fn discard(reader: &mut impl io::BufRead, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = available
            .len()
            .min(usize::try_from(len).unwrap_or(usize::MAX));
        reader.consume(n);
        len -= n as u64;
    }
    Ok(())
}
