//! Zero-downtime binary upgrade (SPEC OPS-7): SIGUSR2 starts the new binary, hands it the
//! listening sockets over a Unix socket (`SCM_RIGHTS`); a client opening a new connection
//! for every request throughout sees no error; the old process drains and exits; a new
//! binary that fails to start leaves the old one serving.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{Gateway, PATIENCE};

const CONFIG: &str = "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\ndirect_response = { body = \"ok\" }\n";

/// Kills a process that is not our child (the upgraded gateway) when the test ends.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid and a signal number.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
        }
    }
}

/// A client loop: every request on a fresh connection, counting successes and errors.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(url: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, ok2, errors2) = (stop.clone(), ok.clone(), errors.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .http1_only()
                .pool_max_idle_per_host(0)
                .build()
                .expect("client");
            while !stop2.load(Ordering::SeqCst) {
                match client.get(&url).timeout(PATIENCE).send().await {
                    Ok(response) if response.status() == 200 => match response.text().await {
                        Ok(body) if body == "ok" => {
                            ok2.fetch_add(1, Ordering::SeqCst);
                        }
                        other => errors2.lock().expect("lock").push(format!("{other:?}")),
                    },
                    other => errors2.lock().expect("lock").push(format!("{other:?}")),
                }
            }
        });
        Traffic {
            stop,
            ok,
            errors,
            task,
        }
    }

    async fn wait_for(&self, count: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.ok.load(Ordering::SeqCst) < count {
            assert!(Instant::now() < deadline, "traffic stalled at {count}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("traffic task");
        let errors = self.errors.lock().expect("lock").clone();
        (self.ok.load(Ordering::SeqCst), errors)
    }
}

fn pid_in(line: &str) -> i32 {
    line.split("pid=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_the_sockets_to_a_new_process_without_a_failed_connection() {
    let mut gateway = Gateway::start(CONFIG);
    let url = gateway.url("public", "/");
    let admin = gateway.addr("admin");
    let traffic = Traffic::start(url);
    traffic.wait_for(50).await;

    let from = gateway.stderr.len();
    gateway.signal(libc::SIGUSR2);
    let started = gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("upgrade: new process started")
    });
    let new_pid = pid_in(&started);
    let _cleanup = KillOnDrop(new_pid);
    assert_ne!(new_pid, gateway.pid());
    gateway
        .stderr
        .wait_for(from, PATIENCE, |line| line.contains("upgrade complete"));
    let status = gateway.wait_exit(PATIENCE);
    assert!(status.success(), "old process exit status {status}");
    // The new process alone serves now, on the same addresses.
    let after_exit = traffic.ok.load(Ordering::SeqCst);
    traffic.wait_for(after_exit + 100).await;
    let (ok, errors) = traffic.finish().await;
    assert!(
        errors.is_empty(),
        "{} failed requests: {errors:?}",
        errors.len()
    );
    assert!(ok > 150);
    let health = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .expect("the admin API moved to the new process");
    assert_eq!(health.status(), 200);
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(new_pid, 0) }, 0, "the new process runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_fails_leaves_the_old_process_serving() {
    let gateway = Gateway::start_with_env(CONFIG, &[("GATEHOUSE_UPGRADE_BINARY", "/bin/false")]);
    let traffic = Traffic::start(gateway.url("public", "/"));
    traffic.wait_for(20).await;
    let from = gateway.stderr.len();
    gateway.signal(libc::SIGUSR2);
    gateway.stderr.wait_for(from, PATIENCE, |line| {
        line.contains("upgrade failed; still serving")
    });
    let at_failure = traffic.ok.load(Ordering::SeqCst);
    traffic.wait_for(at_failure + 50).await;
    let (_, errors) = traffic.finish().await;
    assert!(errors.is_empty(), "{errors:?}");
    // SAFETY: signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(gateway.pid(), 0) }, 0);
}
