//! Zero-downtime binary upgrade (SPEC OPS-7). On SIGUSR2 the running process starts the
//! new binary (`GATEHOUSE_UPGRADE_BINARY`, else its own executable path, which after a
//! package upgrade is the new file) with the same arguments, and hands it every listening
//! socket — data-plane listeners, the admin API, `metrics.bind` — over a Unix socket pair
//! with `SCM_RIGHTS`, each named. The new process serves on the very same sockets (no
//! rebinding, so no connection is refused), then writes `ready` back; only then does the
//! old process drain and exit. If the new process exits, fails, or is not ready within
//! `UPGRADE_TIMEOUT`, the old one keeps serving as if nothing happened.
//!
//! Both sides run while sockets are shared: the kernel hands each new connection to one
//! of them, and the old process's drain closes only its own copies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

/// The environment variable naming the inherited end of the hand-over socket.
pub const FD_ENV: &str = "GATEHOUSE_UPGRADE_FD";
/// Overrides the binary an upgrade starts.
pub const BINARY_ENV: &str = "GATEHOUSE_UPGRADE_BINARY";
/// How long the new process may take to report ready.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many sockets are handed over.
const MAX_SOCKETS: usize = 64;
/// Largest names payload.
const MAX_PAYLOAD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("{FD_ENV}={0:?} is not a file descriptor")]
    BadFd(String),
    #[error("upgrade socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("upgrade message malformed: {0}")]
    Malformed(&'static str),
    #[error("the new process exited with {0} before it was ready")]
    Exited(std::process::ExitStatus),
    #[error("the new process was not ready within {0:?}")]
    Timeout(Duration),
    #[error("an upgrade is already running")]
    Busy,
}

/// Listening sockets this process shares, by name, so an upgrade can hand them on.
#[derive(Default)]
struct Registry {
    sockets: HashMap<String, OwnedFd>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// Sockets received from the previous process, taken by name as listeners start.
fn inherited() -> &'static Mutex<HashMap<String, OwnedFd>> {
    static INHERITED: OnceLock<Mutex<HashMap<String, OwnedFd>>> = OnceLock::new();
    INHERITED.get_or_init(Mutex::default)
}

/// The channel back to the previous process, for `confirm_ready`.
fn parent_channel() -> &'static Mutex<Option<UnixStream>> {
    static CHANNEL: OnceLock<Mutex<Option<UnixStream>>> = OnceLock::new();
    CHANNEL.get_or_init(Mutex::default)
}

/// Registers a listening socket under `name` (a duplicate is kept; dropping it via
/// `unregister` when the listener stops keeps drain semantics: the socket closes).
pub fn register(name: &str, fd: RawFd) {
    // SAFETY: `fd` is a live socket owned by the caller for this call; we only borrow it to
    // duplicate it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    if let Ok(owned) = borrowed.try_clone_to_owned() {
        registry().lock().sockets.insert(name.to_string(), owned);
    }
}

pub fn unregister(name: &str) {
    registry().lock().sockets.remove(name);
}

/// Forgets every registered socket (at drain: the sockets must close).
pub fn unregister_all_listeners(keep: &[&str]) {
    registry()
        .lock()
        .sockets
        .retain(|name, _| keep.contains(&name.as_str()));
}

/// A socket the previous process handed over under `name`, if any.
pub fn take(name: &str) -> Option<OwnedFd> {
    inherited().lock().remove(name)
}

/// In the new process: reads the sockets from the hand-over channel named by `FD_ENV`.
/// Does nothing when the variable is unset.
pub fn receive_from_env() -> Result<usize, UpgradeError> {
    let Ok(text) = std::env::var(FD_ENV) else {
        return Ok(0);
    };
    // Called before the runtime starts, while the process has one thread.
    std::env::remove_var(FD_ENV);
    let fd: RawFd = text
        .parse()
        .map_err(|_| UpgradeError::BadFd(text.clone()))?;
    if fd < 3 {
        return Err(UpgradeError::BadFd(text));
    }
    // SAFETY: the previous process passed this descriptor to us for exactly this use and
    // nothing else in this process owns it.
    let channel = unsafe { UnixStream::from_raw_fd(fd) };
    let (payload, fds) = recv_fds(&channel)?;
    let names: Vec<String> =
        serde_json::from_slice(&payload).map_err(|_| UpgradeError::Malformed("names"))?;
    if names.len() != fds.len() {
        return Err(UpgradeError::Malformed("name and descriptor counts differ"));
    }
    let count = names.len();
    let mut map = inherited().lock();
    for (name, fd) in names.into_iter().zip(fds) {
        map.insert(name, fd);
    }
    *parent_channel().lock() = Some(channel);
    Ok(count)
}

/// In the new process, once everything is bound and serving: tells the previous process
/// to drain. Sockets handed over but not used are closed.
pub fn confirm_ready() {
    inherited().lock().clear();
    if let Some(mut channel) = parent_channel().lock().take() {
        if let Err(err) = channel.write_all(b"ready\n") {
            tracing::warn!(error = %err, "cannot tell the previous process we are ready");
        }
    }
}

/// In the running process: starts the new binary, hands it the registered sockets and
/// waits until it reports ready. Returns its pid. On error the child (if any) is killed
/// and this process serves on.
pub async fn hand_over() -> Result<u32, UpgradeError> {
    static RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if RUNNING.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Err(UpgradeError::Busy);
    }
    let result = tokio::task::spawn_blocking(hand_over_blocking)
        .await
        .unwrap_or_else(|err| Err(UpgradeError::Io(std::io::Error::other(err.to_string()))));
    RUNNING.store(false, std::sync::atomic::Ordering::SeqCst);
    result
}

fn hand_over_blocking() -> Result<u32, UpgradeError> {
    let binary = match std::env::var_os(BINARY_ENV) {
        Some(path) => std::path::PathBuf::from(path),
        None => std::env::current_exe()?,
    };
    let (ours, theirs) = UnixStream::pair()?;
    // The child's end must survive exec: clear close-on-exec on it only.
    let child_fd = theirs.as_raw_fd();
    set_cloexec(child_fd, false)?;
    let mut command = std::process::Command::new(&binary);
    command
        .args(std::env::args_os().skip(1))
        .env(FD_ENV, child_fd.to_string());
    let spawned = command.spawn();
    drop(theirs);
    let mut child = spawned?;
    let pid = child.id();
    tracing::info!(pid, binary = %binary.display(), "upgrade: new process started");
    let fail = |child: &mut std::process::Child, err: UpgradeError| {
        let _ = child.kill();
        let _ = child.wait();
        err
    };
    let (names, fds): (Vec<String>, Vec<RawFd>) = {
        let registry = registry().lock();
        registry
            .sockets
            .iter()
            .take(MAX_SOCKETS)
            .map(|(name, fd)| (name.clone(), fd.as_raw_fd()))
            .unzip()
    };
    let payload = serde_json::to_vec(&names).unwrap_or_default();
    if let Err(err) = send_fds(&ours, &payload, &fds) {
        return Err(fail(&mut child, err.into()));
    }
    ours.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = BufReader::new(ours);
    let deadline = std::time::Instant::now() + UPGRADE_TIMEOUT;
    let mut line = String::new();
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(UpgradeError::Exited(status));
        }
        if std::time::Instant::now() > deadline {
            return Err(fail(&mut child, UpgradeError::Timeout(UPGRADE_TIMEOUT)));
        }
        match reader.read_line(&mut line) {
            Ok(0) => {
                // The child closed the channel without confirming: wait for its exit.
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(_) if line.trim() == "ready" => {
                // The child now runs on its own; it is not ours to wait for.
                std::mem::forget(child);
                return Ok(pid);
            }
            Ok(_) => return Err(fail(&mut child, UpgradeError::Malformed("reply"))),
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(err) => return Err(fail(&mut child, err.into())),
        }
    }
}

fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `payload` with `fds` attached (`SCM_RIGHTS`).
fn send_fds(socket: &UnixStream, payload: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut message = Vec::with_capacity(4 + payload.len());
    message.extend_from_slice(&length);
    message.extend_from_slice(payload);
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure computation on an integer.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space.max(1)];
    let mut iov = libc::iovec {
        iov_base: message.as_ptr() as *mut libc::c_void,
        iov_len: message.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid starting value.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        header.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) long, so the first header and
        // its data fit; we write exactly `fds.len()` descriptors into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    // SAFETY: header points at live buffers for the duration of the call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &header, 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if sent as usize != message.len() {
        return Err(std::io::Error::other("short write on the upgrade socket"));
    }
    Ok(())
}

/// Receives what `send_fds` sent: the payload and the descriptors (close-on-exec set).
fn recv_fds(socket: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), UpgradeError> {
    let mut buffer = vec![0u8; 4 + MAX_PAYLOAD];
    let fd_bytes = (MAX_SOCKETS * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr() as *mut libc::c_void,
        iov_len: buffer.len(),
    };
    // SAFETY: zeroed msghdr is valid; fields set below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    header.msg_controllen = space as _;
    // SAFETY: the buffers outlive the call; MSG_CMSG_CLOEXEC keeps the fds from leaking.
    let received =
        unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel filled in, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / std::mem::size_of::<RawFd>();
                for index in 0..count {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(index));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(UpgradeError::Malformed("too many descriptors"));
    }
    let received = received as usize;
    if received < 4 {
        return Err(UpgradeError::Malformed("short message"));
    }
    let length = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
    if length > MAX_PAYLOAD || 4 + length > received {
        return Err(UpgradeError::Malformed("payload length"));
    }
    Ok((buffer[4..4 + length].to_vec(), fds))
}

/// Turns an inherited descriptor into a std TCP listener (non-blocking, for tokio).
pub fn tcp_listener(fd: OwnedFd) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Turns an inherited descriptor into a std Unix listener (non-blocking, for tokio).
pub fn unix_listener(fd: OwnedFd) -> std::io::Result<std::os::unix::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
}
