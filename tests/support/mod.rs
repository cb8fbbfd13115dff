//! Shared test harness: the real `gatehouse` binary as a child process, and real hyper
//! backends on port 0. Each integration test file does `mod support;` and uses what it needs.
#![allow(dead_code)]

pub mod faults;
pub mod pebble;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// How long a test waits for something that should happen promptly before failing.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Lines a child process wrote, with a condition variable to wait for new ones.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
}

impl Lines {
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.changed.notify_all();
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Blocks until a line satisfying `predicate` appears (searching from line `from`),
    /// returning it, or panics after `timeout`.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        predicate: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().skip(from).find(|line| predicate(line)) {
                return line.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for a log line; got:\n{}",
                lines.join("\n")
            );
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Blocks until at least `count` lines satisfy `predicate`, returning them, or panics
    /// after `timeout`.
    pub fn wait_count(
        &self,
        count: usize,
        timeout: Duration,
        predicate: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.lines.lock().unwrap();
        loop {
            let found: Vec<String> = lines.iter().filter(|l| predicate(l)).cloned().collect();
            if found.len() >= count {
                return found;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {count} log lines; got:\n{}",
                lines.join("\n")
            );
            lines = self.changed.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }
}

fn pump(stream: impl std::io::Read + Send + 'static, lines: Arc<Lines>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
    });
}

/// A running `gatehouse run` process with its config in a temporary directory.
pub struct Gateway {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Listener name → bound address, read from the "listener bound" log lines.
    pub addrs: HashMap<String, SocketAddr>,
    /// Diagnostic log (stderr).
    pub stderr: Arc<Lines>,
    /// Access log (stdout), one JSON object per line.
    pub stdout: Arc<Lines>,
}

impl Gateway {
    /// Starts the gateway on `config` (TOML) and waits until it reports ready.
    pub fn start(config: &str) -> Gateway {
        Gateway::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("gatehouse.toml");
        std::fs::write(&config_path, config).expect("write config");
        let args = ["run".as_ref(), "--config".as_ref(), config_path.as_os_str()];
        Gateway::spawn(dir, config_path.clone(), &args, env)
    }

    /// Runs the binary with arbitrary arguments (e.g. `proxy --listen 127.0.0.1:0 --to …`)
    /// and waits until it reports ready. `config_path` then names a file that does not exist.
    pub fn start_args(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("gatehouse.toml");
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|arg| arg.as_ref()).collect();
        Gateway::spawn(dir, config_path, &args, env)
    }

    fn spawn(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
    ) -> Gateway {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gatehouse"));
        command
            .args(args)
            .env("GATEHOUSE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn gatehouse");
        let stderr = Arc::new(Lines::default());
        let stdout = Arc::new(Lines::default());
        pump(child.stderr.take().expect("stderr"), stderr.clone());
        pump(child.stdout.take().expect("stdout"), stdout.clone());
        let mut gateway = Gateway {
            child,
            dir,
            config_path,
            addrs: HashMap::new(),
            stderr,
            stdout,
        };
        gateway.wait_ready(0);
        gateway
    }

    /// Waits for "gatehouse ready" after line `from` and records listener addresses.
    fn wait_ready(&mut self, from: usize) {
        let stderr = self.stderr.clone();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "gatehouse exited with {status} before ready:\n{}",
                    stderr.snapshot().join("\n")
                );
            }
            let lines = stderr.snapshot();
            if lines
                .iter()
                .skip(from)
                .any(|line| line.contains("gatehouse ready"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gatehouse not ready:\n{}",
                lines.join("\n")
            );
            // Wake on new output, or every 50 ms to notice an early exit.
            let _ = stderr
                .changed
                .wait_timeout(stderr.lines.lock().unwrap(), Duration::from_millis(50));
        }
        for line in stderr.snapshot() {
            // `log.format = "json"`: the event's fields are flattened into the object.
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                let text = |key: &str| event.get(key).and_then(|v| v.as_str()).map(String::from);
                if let (Some(message), Some(name), Some(addr)) =
                    (text("message"), text("name"), text("addr"))
                {
                    if message.contains("listener bound") {
                        self.addrs
                            .insert(name, addr.parse().expect("listener address"));
                    }
                }
                continue;
            }
            if let (Some(name), Some(addr)) = (field(&line, "name="), field(&line, "addr=")) {
                if line.contains("listener bound") {
                    self.addrs
                        .insert(name.to_string(), addr.parse().expect("listener address"));
                }
            }
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .addrs
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener}: {:?}", self.addrs))
    }

    pub fn url(&self, listener: &str, path: &str) -> String {
        format!("http://{}{}", self.addr(listener), path)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Rewrites the config file and sends SIGHUP; waits for the reload's outcome line and
    /// returns it ("reload succeeded" or "reload rejected").
    pub fn reload_with(&self, config: &str) -> String {
        std::fs::write(&self.config_path, config).expect("write config");
        let from = self.stderr.len();
        self.signal(libc::SIGHUP);
        self.stderr.wait_for(from, PATIENCE, |line| {
            line.contains("reload succeeded") || line.contains("reload rejected")
        })
    }

    /// Resident memory of the gateway process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS")
    }

    /// Waits for the process to exit and returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gatehouse did not exit within {timeout:?}"
            );
            let _ = self
                .stderr
                .changed
                .wait_timeout(self.stderr.lines.lock().unwrap(), Duration::from_millis(20));
        }
    }

    /// The parsed access-log lines written so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stdout
            .snapshot()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Waits until an access-log line satisfies `predicate`.
    pub fn wait_access_log(
        &self,
        predicate: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let line = self.stdout.wait_for(0, PATIENCE, |line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|value| predicate(&value))
        });
        serde_json::from_str(&line).expect("json line")
    }
}

/// Runs the binary with `args` to completion (for commands that exit: `validate`, or `run`
/// on a bad config) and returns its output; fails the test if it has not exited within
/// `PATIENCE`, killing it.
pub async fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"));
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawn gatehouse");
    tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("gatehouse {args:?} did not exit within {PATIENCE:?}"))
        .expect("wait for gatehouse")
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<TestBody>> + Send + Sync>;

pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A real hyper server (HTTP/1.1 and h2c) on 127.0.0.1:0 with a request counter.
pub struct Backend {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(handler: Handler) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                // As production HTTP/2 servers do: with Nagle on, a small WINDOW_UPDATE waits
                // for the ACK of the previous one, which the peer delays ~40 ms when it has no
                // data to piggyback it on, and h2c uploads crawl at tens of MiB/s.
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(request).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            addr,
            requests,
            task,
        }
    }

    pub fn from_parts(
        addr: SocketAddr,
        requests: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    ) -> Backend {
        Backend {
            addr,
            requests,
            task,
        }
    }

    /// A backend that answers with a JSON echo of the request (see `echo`).
    pub async fn echo() -> Backend {
        Backend::start(Arc::new(|request| Box::pin(echo(request)))).await
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Echoes the request as JSON: method, uri, version, headers as `[name, value]` pairs in
/// order (so repeats show), and the body length. Adds header `x-backend: echo`.
pub async fn echo(request: Request<Incoming>) -> Response<TestBody> {
    let (parts, body) = request.into_parts();
    let length = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let answer = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": length,
    });
    let mut response = Response::new(full(answer.to_string()));
    response
        .headers_mut()
        .insert("x-backend", "echo".parse().unwrap());
    response
}

/// Values of header `name` in an echo answer.
pub fn echoed_header(answer: &serde_json::Value, name: &str) -> Vec<String> {
    answer["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pair| pair[0].as_str() == Some(name))
        .filter_map(|pair| pair[1].as_str().map(str::to_string))
        .collect()
}

/// A minimal config with one listener `public` on port 0, one pool `app` with the given
/// endpoints, and whatever `extra` adds (more pools, routes, settings).
pub fn config_with_pool(endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|addr| format!("\"{addr}\"")).collect();
    format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"app\"\nendpoints = [{}]\n\n{extra}\n",
        list.join(", ")
    )
}

/// An HTTP/1.1 client with no connection reuse surprises: one keep-alive pool, no proxy.
pub fn http1_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Samples a process's resident memory from a background task until stopped, so a test can
/// bound the peak while a long transfer runs (a single reading at the end would miss it).
pub struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    /// Stops sampling and returns the highest VmRSS seen, in KiB, including a last reading.
    pub async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.task.await.expect("rss sampler task")
    }
}

impl Gateway {
    /// Starts reading this gateway's VmRSS every `every` on a separate Tokio task.
    pub fn sample_rss(&self, every: Duration) -> RssSampler {
        let path = format!("/proc/{}/status", self.pid());
        let read = move || {
            std::fs::read_to_string(&path).ok().and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmRSS:"))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|kib| kib.parse::<u64>().ok())
            })
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut peak = 0;
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticks.tick() => peak = read().map_or(peak, |kib: u64| kib.max(peak)),
                }
            }
            read().map_or(peak, |kib| kib.max(peak))
        });
        RssSampler { stop, task }
    }
}

/// Sends a request and parses the JSON answer (an echo backend's, usually).
pub async fn json_of(request: reqwest::RequestBuilder) -> serde_json::Value {
    request
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON answer")
}

/// Expects the gateway to close `stream` (FIN or RST) without sending a byte.
pub async fn expect_closed(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
        .await
        .expect("the gateway should close the connection");
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected a close, got {n} bytes: {:?}", &buf[..n]),
    }
}
