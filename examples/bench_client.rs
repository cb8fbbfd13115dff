//! Load-generator helpers for the peer benchmark harness in `bench/` (see
//! docs/BENCHMARKS.md). Not part of the gateway.
//!
//! `rate`: an open-loop, fixed-rate HTTP/1.1 keep-alive load generator. Debian has no
//! wrk2, so this replaces it: `--rate` requests per second are spread evenly over
//! `--connections` keep-alive connections (one thread each, blocking sockets, so send
//! times are not rounded to a 1 ms timer wheel). Request `i` is due at `start + i/rate`;
//! its latency is measured from when it was *due*, not from when it was sent, so a slow
//! server cannot hide its stalls by delaying the load (coordinated omission is corrected
//! as wrk2 does). Prints one `key=value` line.
//!
//! `idle`: opens `--connections` keep-alive connections, sends one request on each, reads
//! the response, then holds every connection open and idle. Prints `ready N` once all are
//! established and keeps them until `--hold` elapses or it is killed.
//!
//! Both speak only to the address given (the harness uses 127.0.0.1).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Rate {
            addr,
            rate,
            connections,
            duration,
            warmup,
            path,
        } => run_rate(addr, rate, connections, duration, warmup, &path),
        Command::Idle {
            addr,
            connections,
            concurrency,
            hold,
            path,
        } => run_idle(addr, connections, concurrency, hold, &path),
    }
}

fn request_bytes(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: gatehouse-bench\r\n\r\n")
        .into_bytes()
}

/// Reads one HTTP/1.1 response (Content-Length or chunked body) and returns its status.
/// `buf` carries bytes read past the end of the response (none without pipelining).
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<u16> {
    let mut chunk = [0u8; 16 * 1024];
    let header_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..header_end]).map_err(io::Error::other)?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::other("bad status line"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    buf.drain(..header_end);
    if chunked {
        loop {
            let line_end = loop {
                if let Some(pos) = find(buf, b"\r\n") {
                    break pos;
                }
                fill(stream, buf, &mut chunk)?;
            };
            let size_text = std::str::from_utf8(&buf[..line_end]).map_err(io::Error::other)?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(io::Error::other)?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers (if any) end with an empty line.
                loop {
                    if let Some(pos) = find(buf, b"\r\n") {
                        let empty = pos == 0;
                        buf.drain(..pos + 2);
                        if empty {
                            return Ok(status);
                        }
                    } else {
                        fill(stream, buf, &mut chunk)?;
                    }
                }
            }
            while buf.len() < size + 2 {
                fill(stream, buf, &mut chunk)?;
            }
            buf.drain(..size + 2);
        }
    }
    let length = content_length.unwrap_or(0);
    while buf.len() < length {
        fill(stream, buf, &mut chunk)?;
    }
    buf.drain(..length);
    Ok(status)
}

fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8]) -> io::Result<()> {
    let n = stream.read(chunk)?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
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
struct ThreadResult {
    /// Latency in microseconds of every measured request that succeeded.
    latencies: Vec<u32>,
    errors: u64,
    non_2xx: u64,
}

fn run_rate(
    addr: SocketAddr,
    rate: f64,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    path: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        rate > 0.0 && connections > 0,
        "rate and connections must be > 0"
    );
    let request = Arc::new(request_bytes(addr, path));
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    // Connect everything first, then start the schedule shortly after.
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(connect(addr)?);
    }
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut threads = Vec::with_capacity(connections);
    for (k, mut stream) in streams.into_iter().enumerate() {
        let request = request.clone();
        let offset = Duration::from_secs_f64(k as f64 / rate);
        threads.push(std::thread::spawn(move || {
            let mut result = ThreadResult::default();
            let mut buf = Vec::with_capacity(4096);
            let mut due = start + offset;
            while due < end {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let outcome = stream
                    .write_all(&request)
                    .and_then(|()| read_response(&mut stream, &mut buf));
                let done = Instant::now();
                let measured = due >= measure_from;
                match outcome {
                    Ok(status) => {
                        if measured {
                            let micros = done.duration_since(due).as_micros();
                            result.latencies.push(micros.min(u32::MAX as u128) as u32);
                            if !(200..300).contains(&status) {
                                result.non_2xx += 1;
                            }
                        }
                    }
                    Err(_) => {
                        if measured {
                            result.errors += 1;
                        }
                        buf.clear();
                        match connect(addr) {
                            Ok(fresh) => stream = fresh,
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                }
                due += interval;
            }
            result
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut non_2xx = 0;
    for thread in threads {
        let result = thread
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
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
