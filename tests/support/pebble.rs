//! A real ACME server for tests: Debian's `pebble`, with `pebble-challtestsrv` as its DNS
//! server answering 127.0.0.1 for every name (so validation really connects back to the
//! gateway), and its HTTPS API certificate from a throwaway CA.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::tls::{client_config, connect, get, Ca};
use super::PATIENCE;

/// Ports, files and URLs chosen before pebble runs, so a gateway can be configured with
/// the directory URL first and pebble told the gateway's ports afterwards.
pub struct PebblePlan {
    dir: tempfile::TempDir,
    pub directory: String,
    /// PEM file of the CA that signed pebble's API certificate (for `acme.directory_ca`).
    pub api_ca: PathBuf,
    api_ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
    listen: SocketAddr,
    management: SocketAddr,
    /// Sockets holding `listen` and `management` until pebble starts: a gateway started
    /// in between binds its own ports and connects out, and must not be given either of
    /// these (the kernel skips bound ports for both). Bound, not listening: connecting to
    /// the directory is refused until pebble runs, as when it is down.
    reserved: Vec<socket2::Socket>,
}

pub struct Pebble {
    children: Vec<Child>,
    plan: PebblePlan,
}

/// A port held by the returned bound (not listening) socket until it is dropped.
fn reserve_port() -> (SocketAddr, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("reserve a port");
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any_port.into()).expect("reserve a port");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .expect("reserved port");
    (addr, socket)
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    reserve_port().0.port()
}

fn require(binary: &str) {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{binary} is not installed (Debian package `pebble`; scripts/test.sh installs it)"
    );
}

fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {addr}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl PebblePlan {
    pub fn new() -> PebblePlan {
        require("pebble");
        require("pebble-challtestsrv");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new("Pebble API CA");
        let api = ca.server(&["127.0.0.1", "localhost"]);
        let (cert, key) = api.write(dir.path(), "api");
        let api_ca = ca.write(dir.path(), "api-ca");
        let (listen, listen_reserved) = reserve_port();
        let (management, management_reserved) = reserve_port();
        PebblePlan {
            dir,
            directory: format!("https://{listen}/dir"),
            api_ca,
            api_ca_pem: ca.pem(),
            cert,
            key,
            listen,
            management,
            reserved: vec![listen_reserved, management_reserved],
        }
    }

    /// Starts pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`.
    pub fn start(mut self, http_port: u16, tls_port: u16) -> Pebble {
        let dns_addr = format!("127.0.0.1:{}", free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": self.listen.to_string(),
                "managementListenAddress": self.management.to_string(),
                "certificate": self.cert,
                "privateKey": self.key,
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_path = self.dir.path().join("pebble.json");
        std::fs::write(&config_path, config.to_string()).expect("pebble config");
        let management = format!("127.0.0.1:{}", free_port());
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args([
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                &dns_addr,
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &management,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble-challtestsrv");
        self.reserved.clear();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &dns_addr])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble");
        let started = Pebble {
            children: vec![pebble, challtestsrv],
            plan: self,
        };
        wait_listening(started.plan.listen, "pebble");
        wait_listening(started.plan.management, "pebble management");
        started
    }
}

impl Pebble {
    /// The root that pebble's issued chains lead to.
    pub async fn root_pem(&self) -> String {
        let stream = connect(
            self.plan.management,
            "127.0.0.1",
            client_config(&self.plan.api_ca_pem, &["http/1.1"], None),
        )
        .await
        .expect("pebble management");
        let (status, _, body) = get(stream, "127.0.0.1", "/roots/0").await;
        assert!(status.is_success(), "pebble roots: {status}");
        String::from_utf8(body.to_vec()).expect("root pem")
    }

    /// Stops the ACME server (to test what happens while it is down).
    pub fn stop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}
