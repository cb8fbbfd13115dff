//! The layer-4 relay (SPEC CONN-8): bidirectional copy between client and backend with
//! half-close propagation, an idle timeout, byte counters, and optional zero-copy
//! `splice(2)` on Linux.
//!
//! Semantics, shared by [`relay`] and [`relay_buffered`]:
//!
//! * Each direction copies until its source reaches EOF, then shuts down the write side of
//!   the destination (`shutdown(SHUT_WR)`), so a client that half-closes after its request
//!   still gets the whole response. The relay ends when both directions have ended.
//! * The idle timeout counts time with no bytes moving in *either* direction. It is one
//!   `Sleep` re-armed lazily: the copy loops only store a timestamp on activity, and when the
//!   sleep fires it is pushed to `last activity + idle` if there was any. No per-chunk timer
//!   work or allocation.
//! * `cancel` firing ends the relay promptly with `Ok(())` (the caller owns the token and
//!   knows it cancelled); both connections are closed on return.
//! * An I/O error in either direction ends the whole relay with that error.
//! * Counters count bytes delivered to the destination; they are returned even on error.
//!
//! Zero-copy, when the listener asks for it (`splice = true`; off by default because a pipe
//! carries at most 16 socket buffers per round trip and measured slower than the 64 KiB
//! buffered copy on loopback, see docs/BENCHMARKS.md): on Linux, [`relay`] moves bytes
//! socket → pipe → socket with `splice(2)`, one pipe per direction, so payload never
//! enters user space. Readiness comes from tokio
//! (`readable()`/`writable()` + `try_io`), which keeps the sockets in the runtime's reactor.
//! A direction falls back to a buffered copy if its first `splice` fails with `EINVAL` or
//! `ENOSYS` (e.g. sandboxes such as gVisor, or socket types that do not support it) or if
//! its pipe cannot be created (fd exhaustion); elsewhere the buffered copy is the only path.
//!
//! How an operator can see splice at work: the returned [`RelayStats::spliced`] flag, a
//! `debug` log line (`l4 relay ended ... spliced=true`), and at the syscall level
//! `strace -f -e trace=splice -p <pid>`, which shows pairs of `splice(sock, NULL, pipe, ...)`
//! / `splice(pipe, NULL, sock, ...)` calls instead of `recvfrom`/`sendto`.
//!
//! `splice` into a socket whose peer has gone raises `SIGPIPE` (there is no `MSG_NOSIGNAL`
//! for it). Rust binaries ignore `SIGPIPE` by default, so this surfaces as an `EPIPE` error.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The buffered copy starts small (most L4 connections are short) and doubles up to this
/// whenever a read fills the buffer, so bulk transfers get large reads.
const MAX_BUFFER: usize = 64 * 1024;
const INITIAL_BUFFER: usize = 8 * 1024;

/// What a relay moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes written to the backend.
    pub client_to_backend: u64,
    /// Bytes written to the client.
    pub backend_to_client: u64,
    /// True when `splice(2)` carried both directions (no fallback to the buffered copy).
    pub spliced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("idle for longer than {0:?}")]
    Idle(Duration),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// State shared by the two directions and the supervising loop. Atomics rather than
/// `Cell`s so the relay future stays `Send`; all accesses are `Relaxed` since each value
/// is independent and only read for reporting or for the idle check.
struct Shared {
    start: Instant,
    /// Nanoseconds since `start` of the last byte moved in either direction.
    last_activity_ns: AtomicU64,
    client_to_backend: AtomicU64,
    backend_to_client: AtomicU64,
    fell_back: AtomicBool,
}

impl Shared {
    fn new() -> Self {
        Self {
            start: crate::clock::coarse_now(),
            last_activity_ns: AtomicU64::new(0),
            client_to_backend: AtomicU64::new(0),
            backend_to_client: AtomicU64::new(0),
            fell_back: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let ns = crate::clock::coarse_nanos_since(self.start);
        self.last_activity_ns.store(ns, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_activity_ns.load(Ordering::Relaxed))
    }

    fn stats(&self, spliced: bool) -> RelayStats {
        RelayStats {
            client_to_backend: self.client_to_backend.load(Ordering::Relaxed),
            backend_to_client: self.backend_to_client.load(Ordering::Relaxed),
            spliced: spliced && !self.fell_back.load(Ordering::Relaxed),
        }
    }
}

/// Relays until both directions have ended (EOF forwarded as `shutdown(SHUT_WR)` to the
/// other side — half-close), or the idle timeout (no bytes in either direction) passes, or
/// `cancel` fires. A buffered copy (64 KiB max buffer per direction), or with `splice` on
/// Linux `splice(2)` through a pipe per direction, falling back to the buffered copy if
/// splice is unsupported.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    idle_timeout: Duration,
    splice: bool,
    cancel: CancellationToken,
) -> (RelayStats, Result<(), RelayError>) {
    relay_tcp(
        client,
        backend,
        idle_timeout,
        cancel,
        splice && cfg!(target_os = "linux"),
    )
    .await
}

/// [`relay`] with the choice of path explicit, so tests can exercise the TCP buffered path
/// on Linux too.
async fn relay_tcp(
    mut client: TcpStream,
    mut backend: TcpStream,
    idle_timeout: Duration,
    cancel: CancellationToken,
    try_splice: bool,
) -> (RelayStats, Result<(), RelayError>) {
    let shared = Shared::new();
    // Borrowed halves: no locking, and their reads go through tokio's `poll_read`, which
    // takes a short read as "drained" and waits for the next readiness event instead of
    // calling `recv` again only to get `EAGAIN` (one wasted syscall per chunk otherwise).
    let (client_read, client_write) = client.split();
    let (backend_read, backend_write) = backend.split();
    let c2b = tcp_direction(
        client_read,
        backend_write,
        try_splice,
        &shared.client_to_backend,
        &shared,
    );
    let b2c = tcp_direction(
        backend_read,
        client_write,
        try_splice,
        &shared.backend_to_client,
        &shared,
    );
    let result = supervise(c2b, b2c, idle_timeout, &cancel, &shared).await;
    let stats = shared.stats(try_splice);
    finish(stats, result)
}

/// Generic buffered relay for any streams (e.g. TLS-wrapped), with the same semantics as
/// [`relay`]. End of input is forwarded with `AsyncWrite::poll_shutdown` (for TLS streams,
/// `close_notify` followed by the TCP half-close).
pub async fn relay_buffered<A, B>(
    client: A,
    backend: B,
    idle_timeout: Duration,
    cancel: CancellationToken,
) -> (RelayStats, Result<(), RelayError>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let shared = Shared::new();
    let (client_read, client_write) = tokio::io::split(client);
    let (backend_read, backend_write) = tokio::io::split(backend);
    let c2b = stream_copy(
        client_read,
        backend_write,
        &shared.client_to_backend,
        &shared,
    );
    let b2c = stream_copy(
        backend_read,
        client_write,
        &shared.backend_to_client,
        &shared,
    );
    let result = supervise(c2b, b2c, idle_timeout, &cancel, &shared).await;
    finish(shared.stats(false), result)
}

fn finish(
    stats: RelayStats,
    result: Result<(), RelayError>,
) -> (RelayStats, Result<(), RelayError>) {
    tracing::debug!(
        client_to_backend = stats.client_to_backend,
        backend_to_client = stats.backend_to_client,
        spliced = stats.spliced,
        error = result.as_ref().err().map(tracing::field::display),
        "l4 relay ended"
    );
    (stats, result)
}

/// Drives both directions to completion under the idle timer and the cancel token.
async fn supervise<F1, F2>(
    c2b: F1,
    b2c: F2,
    idle_timeout: Duration,
    cancel: &CancellationToken,
    shared: &Shared,
) -> Result<(), RelayError>
where
    F1: std::future::Future<Output = io::Result<()>>,
    F2: std::future::Future<Output = io::Result<()>>,
{
    tokio::pin!(c2b, b2c);
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let (mut c2b_done, mut b2c_done) = (false, false);
    while !(c2b_done && b2c_done) {
        tokio::select! {
            // Cancellation first, so a busy relay cannot starve it.
            biased;
            () = &mut cancelled => return Ok(()),
            r = &mut c2b, if !c2b_done => {
                r?;
                c2b_done = true;
            }
            r = &mut b2c, if !b2c_done => {
                r?;
                b2c_done = true;
            }
            () = &mut idle => {
                let deadline = shared.last_activity() + idle_timeout;
                if deadline <= Instant::now() {
                    return Err(RelayError::Idle(idle_timeout));
                }
                // There was activity since the sleep was armed: re-arm relative to it.
                idle.as_mut().reset(deadline);
            }
        }
    }
    Ok(())
}

/// One direction between two TCP sockets: splice when asked and possible, else buffered.
async fn tcp_direction(
    from: ReadHalf<'_>,
    to: WriteHalf<'_>,
    try_splice: bool,
    counter: &AtomicU64,
    shared: &Shared,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if try_splice {
        match splice::Pipe::new() {
            Ok(pipe) => {
                match splice::copy(from.as_ref(), to.as_ref(), &pipe, counter, shared).await {
                    Ok(()) => return Ok(()),
                    Err(splice::Error::Io(e)) => return Err(e),
                    Err(splice::Error::Unsupported(e)) => {
                        tracing::debug!(error = %e, "splice unsupported; buffered copy");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot create a pipe; buffered copy"),
        }
        shared.fell_back.store(true, Ordering::Relaxed);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = try_splice;
    stream_copy(from, to, counter, shared).await
}

/// Half-closes `to`. A peer that is already gone (`ENOTCONN`) is not an error here: the
/// other direction will see that for itself.
fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        other => other,
    }
}

/// Buffered copy between stream halves (TCP or TLS-wrapped).
async fn stream_copy<R, W>(
    mut from: R,
    mut to: W,
    counter: &AtomicU64,
    shared: &Shared,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return match to.shutdown().await {
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                other => other,
            };
        }
        shared.touch();
        let mut off = 0;
        while let Some(pending) = buf.get(off..n).filter(|p| !p.is_empty()) {
            let m = to.write(pending).await?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += m;
            counter.fetch_add(m as u64, Ordering::Relaxed);
            shared.touch();
        }
        // Wrapped streams (TLS) may hold written data back until flushed.
        to.flush().await?;
        grow(&mut buf, n);
    }
}

/// A read that filled the buffer suggests a bulk transfer: double it, up to the cap.
fn grow(buf: &mut Vec<u8>, last_read: usize) {
    if last_read == buf.len() && buf.len() < MAX_BUFFER {
        buf.resize((buf.len() * 2).min(MAX_BUFFER), 0);
    }
}

#[cfg(target_os = "linux")]
mod splice {
    //! socket → pipe → socket with `splice(2)`.

    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{shutdown_write, Shared};

    /// Upper bound per splice call; the pipe's capacity (64 KiB by default) is the real
    /// limit. We do not raise it with `F_SETPIPE_SZ`: pipe pages count against a per-user
    /// quota (`/proc/sys/fs/pipe-user-pages-soft`), and once a user is over it the kernel
    /// hands out one-page pipes, which would hurt every later connection. 64 KiB per
    /// syscall already amortises the syscall cost well.
    const SPLICE_CHUNK: usize = 1 << 20;

    pub(super) enum Error {
        /// `EINVAL`/`ENOSYS` before any byte moved: the caller may fall back.
        Unsupported(io::Error),
        Io(io::Error),
    }

    /// A non-blocking pipe; both ends close on drop.
    pub(super) struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Pipe> {
            let mut fds: [libc::c_int; 2] = [-1, -1];
            // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            Ok(Pipe { read, write })
        }
    }

    /// One non-blocking splice call. `SPLICE_F_NONBLOCK` makes the pipe side non-blocking;
    /// the socket side is already `O_NONBLOCK` under tokio.
    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain syscall on fds that the callers keep open for its duration; null
        // offsets are required for sockets and pipes.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn is_unsupported(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
    }

    /// Copies `from` → `to` until EOF on `from`, then half-closes `to`.
    ///
    /// The pipe is always drained completely before the next read from the socket. That
    /// keeps `EAGAIN` unambiguous: when filling, the pipe is empty, so `EAGAIN` can only
    /// mean the socket has no data (and `try_io` rightly clears its read readiness); when
    /// draining, the pipe has data, so `EAGAIN` means the destination socket is full.
    /// `in_pipe` remembers bytes left in the pipe while the writer waits.
    pub(super) async fn copy(
        from: &TcpStream,
        to: &TcpStream,
        pipe: &Pipe,
        counter: &AtomicU64,
        shared: &Shared,
    ) -> Result<(), Error> {
        let (pipe_r, pipe_w) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
        let mut moved_any = false;
        loop {
            from.readable().await.map_err(Error::Io)?;
            let mut in_pipe = match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe_w, SPLICE_CHUNK)
            }) {
                Ok(0) => return shutdown_write(to).map_err(Error::Io),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if !moved_any && is_unsupported(&e) => return Err(Error::Unsupported(e)),
                Err(e) => return Err(Error::Io(e)),
            };
            moved_any = true;
            shared.touch();
            while in_pipe > 0 {
                to.writable().await.map_err(Error::Io)?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(pipe_r, to.as_raw_fd(), in_pipe)
                }) {
                    // Cannot happen with data in the pipe; guard against a busy loop.
                    Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        in_pipe = in_pipe.saturating_sub(n);
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        shared.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(Error::Io(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant as StdInstant;
    use tokio::net::TcpListener;

    /// A connected pair of TCP sockets over loopback.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    type RelayResult = (RelayStats, Result<(), RelayError>);

    /// client app ⇄ [relay] ⇄ backend app; returns the two app ends and the relay task.
    async fn setup(
        idle: Duration,
        cancel: CancellationToken,
        try_splice: bool,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<RelayResult>) {
        let (client_app, relay_client) = tcp_pair().await;
        let (relay_backend, backend_app) = tcp_pair().await;
        let task = tokio::spawn(relay_tcp(
            relay_client,
            relay_backend,
            idle,
            cancel,
            try_splice,
        ));
        (client_app, backend_app, task)
    }

    async fn echo_both_ways(try_splice: bool) {
        let (mut client, mut backend, task) = setup(
            Duration::from_secs(30),
            CancellationToken::new(),
            try_splice,
        )
        .await;
        // Backend: echo until EOF, then close.
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = backend.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        for msg in [&b"hello"[..], b"second message", &[7u8; 100_000]] {
            client.write_all(msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg);
        }
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        echo.await.unwrap();
        let (stats, result) = task.await.unwrap();
        result.unwrap();
        let total = 5 + 14 + 100_000;
        assert_eq!(stats.client_to_backend, total);
        assert_eq!(stats.backend_to_client, total);
        assert_eq!(stats.spliced, try_splice && cfg!(target_os = "linux"));
    }

    #[tokio::test]
    async fn echo_through_relay() {
        echo_both_ways(true).await;
    }

    #[tokio::test]
    async fn echo_through_tcp_buffered_path() {
        echo_both_ways(false).await;
    }

    #[tokio::test]
    async fn half_close_is_propagated() {
        let (mut client, mut backend, task) =
            setup(Duration::from_secs(30), CancellationToken::new(), true).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();

        // The backend reads the request to EOF...
        let mut req = Vec::new();
        backend.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        // ...and can still answer over the half-closed connection.
        backend.write_all(b"response").await.unwrap();
        let mut resp = [0u8; 8];
        client.read_exact(&mut resp).await.unwrap();
        assert_eq!(&resp, b"response");
        assert!(!task.is_finished());

        backend.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (stats, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!((stats.client_to_backend, stats.backend_to_client), (7, 8));
    }

    #[tokio::test]
    async fn idle_timeout_fires_when_both_sides_are_silent() {
        let (_client, _backend, task) =
            setup(Duration::from_millis(200), CancellationToken::new(), true).await;
        let start = StdInstant::now();
        let (stats, result) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("relay should end on its own")
            .unwrap();
        let elapsed = start.elapsed();
        assert!(
            matches!(result, Err(RelayError::Idle(d)) if d == Duration::from_millis(200)),
            "{result:?}"
        );
        assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
        assert_eq!(stats.client_to_backend + stats.backend_to_client, 0);
    }

    #[tokio::test]
    async fn activity_keeps_the_relay_alive() {
        // Generous margins so a loaded CI machine's scheduling pauses cannot fire the timer.
        let idle = Duration::from_millis(1000);
        let (mut client, mut backend, task) = setup(idle, CancellationToken::new(), true).await;
        // Traffic every 100 ms for 2.5 s — two and a half idle periods — in both directions.
        let start = StdInstant::now();
        for i in 0..25u8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (tx, rx) = if i % 2 == 0 {
                (&mut client, &mut backend)
            } else {
                (&mut backend, &mut client)
            };
            tx.write_all(&[i]).await.unwrap();
            let mut b = [0u8; 1];
            rx.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
        }
        assert!(start.elapsed() > idle * 2);
        assert!(!task.is_finished());
        // Then silence: the timer fires.
        let (_, result) = task.await.unwrap();
        assert!(matches!(result, Err(RelayError::Idle(_))), "{result:?}");
    }

    #[tokio::test]
    async fn cancel_ends_the_relay_promptly() {
        let cancel = CancellationToken::new();
        let (mut client, mut backend, task) =
            setup(Duration::from_secs(60), cancel.clone(), true).await;
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        backend.read_exact(&mut b).await.unwrap();
        let start = StdInstant::now();
        cancel.cancel();
        let (stats, result) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("relay should stop on cancel")
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(3));
        result.unwrap();
        assert_eq!(stats.client_to_backend, 1);
        // Both connections were closed.
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).await.unwrap();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// Pushes `total` bytes client → backend and checks they all arrive.
    async fn bulk(total: u64, try_splice: bool) -> (RelayStats, Duration) {
        let (mut client, mut backend, task) = setup(
            Duration::from_secs(30),
            CancellationToken::new(),
            try_splice,
        )
        .await;
        let start = StdInstant::now();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 * 1024];
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                client.write_all(&chunk[..n]).await.unwrap();
                left -= n as u64;
            }
            client.shutdown().await.unwrap();
            client
        });
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = 0u64;
        loop {
            let n = backend.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        assert_eq!(received, total);
        backend.shutdown().await.unwrap();
        let _client = writer.await.unwrap();
        let (stats, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(stats.client_to_backend, total);
        assert_eq!(stats.backend_to_client, 0);
        (stats, start.elapsed())
    }

    /// 1 GiB: about a second in a debug build (dependencies are optimised).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_transfer_is_spliced() {
        let (stats, took) = bulk(1 << 30, true).await;
        assert_eq!(stats.spliced, cfg!(target_os = "linux"));
        eprintln!("1 GiB spliced in {took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_transfer_buffered() {
        let (stats, took) = bulk(256 << 20, false).await;
        assert!(!stats.spliced);
        eprintln!("256 MiB buffered in {took:?}");
    }

    #[tokio::test]
    async fn relay_buffered_over_duplex_streams() {
        let (mut client, relay_client) = tokio::io::duplex(1024);
        let (relay_backend, mut backend) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay_buffered(
            relay_client,
            relay_backend,
            Duration::from_secs(30),
            CancellationToken::new(),
        ));
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        let mut client = writer.await.unwrap();
        // Half-closed: the backend can still answer.
        backend.write_all(b"done").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut resp = Vec::new();
        client.read_to_end(&mut resp).await.unwrap();
        assert_eq!(resp, b"done");
        let (stats, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(stats.client_to_backend, 200_000);
        assert_eq!(stats.backend_to_client, 4);
        assert!(!stats.spliced);
    }

    #[tokio::test]
    async fn relay_buffered_idle_and_cancel() {
        let (_c, relay_client) = tokio::io::duplex(64);
        let (relay_backend, _b) = tokio::io::duplex(64);
        let (_, result) = relay_buffered(
            relay_client,
            relay_backend,
            Duration::from_millis(100),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(result, Err(RelayError::Idle(_))), "{result:?}");

        let (_c, relay_client) = tokio::io::duplex(64);
        let (relay_backend, _b) = tokio::io::duplex(64);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (_, result) =
            relay_buffered(relay_client, relay_backend, Duration::from_secs(60), cancel).await;
        assert!(result.is_ok());
    }
}
