//! The data-plane worker threads: one single-threaded tokio runtime per worker (the way
//! nginx and HAProxy run one event loop per worker), and the choice of the worker that
//! runs an accepted connection.
//!
//! A connection and the upstream connections it opens stay on one thread, so the wake-ups
//! between the client side and the upstream side never cross threads and no work-stealing
//! bookkeeping runs per task. Measured against tokio's multi-threaded scheduler with the
//! same worker count: 14–23 % less CPU per proxied request (docs/BENCHMARKS.md).
//!
//! The main thread's runtime is worker 0 and also runs the control plane; workers 1..N
//! are extra threads. Connections are spread round robin. Without `install` (the library
//! used in-process, as tests do) connections run on the caller's runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

static WORKERS: OnceLock<Workers> = OnceLock::new();

struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

/// Builds one worker's runtime.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .thread_name("gatehouse-worker")
        .enable_all()
        .build()
}

/// Starts `count - 1` worker threads beside the calling thread's runtime (`main`) and makes
/// connections spread over all of them. The threads run until `stop` is cancelled; the
/// returned handles join them.
pub fn install(
    main: Handle,
    count: usize,
    stop: CancellationToken,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = vec![main];
    let mut threads = Vec::new();
    for index in 1..count.max(1) {
        let runtime = runtime()?;
        handles.push(runtime.handle().clone());
        let stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("gatehouse-worker-{index}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?,
        );
    }
    // A second install (never done by the binary) keeps the first set of workers.
    let _ = WORKERS.set(Workers {
        handles,
        next: AtomicUsize::new(0),
    });
    Ok(threads)
}

/// Runs an accepted connection on the next worker. The stream is moved to that worker's
/// I/O driver; `serve` gets it registered there.
pub fn spawn_connection<F, Fut>(tracker: &TaskTracker, stream: tokio::net::TcpStream, serve: F)
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(workers) = WORKERS.get().filter(|workers| workers.handles.len() > 1) else {
        tracker.spawn(serve(stream));
        return;
    };
    let index = workers.next.fetch_add(1, Ordering::Relaxed) % workers.handles.len();
    if index == 0 {
        tracker.spawn(serve(stream));
        return;
    }
    let Ok(std_stream) = stream.into_std() else {
        return;
    };
    tracker.spawn_on(
        async move {
            // Registering with this worker's driver fails only when the runtime is
            // shutting down; the connection is dropped then, as at any shutdown.
            if let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) {
                serve(stream).await;
            }
        },
        &workers.handles[index],
    );
}
