//! `gatehouse ctl` (SPEC CTRL-7): a client for the admin API over TCP (`--admin
//! http://127.0.0.1:9901`), HTTPS with an optional client certificate (`--admin https://…
//! --cacert ca.pem --cert me.crt --key me.key`), or the Unix socket (`--admin
//! unix:/run/gatehouse/admin.sock`). Readable tables by default, the API's JSON with
//! `--json`.
//!
//! One request per connection on hyper's low-level HTTP/1 client, so the crate needs no
//! other HTTP client. Every failure is a `CtlError` with a message for the operator; the
//! process exits 1 on any of them.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, IF_MATCH};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::config::Format;

/// Options every `ctl` command takes.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The admin API: `http://HOST:PORT` (or `HOST:PORT`), `https://HOST:PORT`, or
    /// `unix:/path/to/admin.sock`.
    #[arg(
        long,
        global = true,
        env = "GATEHOUSE_ADMIN",
        default_value = "http://127.0.0.1:9901"
    )]
    pub admin: String,
    /// Bearer token for the admin API.
    #[arg(long, global = true, env = "GATEHOUSE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With https: trust this CA bundle (PEM) instead of the system's.
    #[arg(long, global = true, env = "GATEHOUSE_ADMIN_CACERT")]
    pub cacert: Option<PathBuf>,
    /// With https: present this client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "GATEHOUSE_ADMIN_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `--cert`.
    #[arg(long, global = true, env = "GATEHOUSE_ADMIN_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up on a request after this long (e.g. `30s`).
    #[arg(long, global = true, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: CtlCommand,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::config::units::parse_duration(text)
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Version, uptime, listeners with live connections and limits, firewall blocks.
    Status,
    /// The running config: get, apply, diff.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Same as `config apply`: `ctl apply -f FILE`; or apply a bundle: `ctl apply --bundle
    /// FILE` (made by `gatehouse bundle sign`).
    Apply {
        /// Config file (TOML, or JSON when it ends in .json).
        #[arg(
            short,
            long,
            required_unless_present = "bundle",
            conflicts_with = "bundle"
        )]
        file: Option<PathBuf>,
        /// A bundle file: verified and applied by the gateway (no diff, no prompt).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Apply without asking (required when stdin is not a terminal).
        #[arg(short, long)]
        yes: bool,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
        #[command(flatten)]
        guard: GuardArgs,
    },
    /// Same as `config diff`.
    Diff {
        /// Config file (TOML, or JSON when it ends in .json).
        file: PathBuf,
    },
    /// Stored config versions, newest first.
    Versions {
        /// How many (1–1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Run stored version N's config again, as a new version.
    Rollback {
        version: i64,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// The audit log, newest first.
    Audit {
        /// How many (1–1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Listener settings.
    #[command(subcommand)]
    Listeners(ListenersCommand),
    /// Certificates served for TLS handshakes, soonest expiry first.
    Certificates,
    /// Routes: list, get, put, remove.
    #[command(subcommand)]
    Routes(ResourceCommand),
    /// Pools: list, get, put, remove.
    #[command(subcommand)]
    Pools(ResourceCommand),
    /// A route's L7 policies: list, get, put, remove.
    #[command(subcommand)]
    Policies(PoliciesCommand),
    /// Each pool's circuit breaker: state, settings, refused requests.
    Breakers,
    /// The global firewall rules: get, put.
    #[command(subcommand)]
    Firewall(FirewallCommand),
    /// Save an online backup of the gateway's store (SQLite) to FILE.
    Backup {
        /// Where to write it (replaced atomically; mode 0600).
        file: PathBuf,
    },
}

/// Guarded apply: watch gates for a bake period after the apply and roll back
/// automatically when one is crossed.
#[derive(Args, Debug, Default)]
pub struct GuardArgs {
    /// Bake period (e.g. `30s`); needs `--max-5xx-rate` or `--max-p95`.
    #[arg(long)]
    pub bake: Option<String>,
    /// Roll back when the share of 5xx responses since the apply exceeds this (0–1).
    #[arg(long)]
    pub max_5xx_rate: Option<f64>,
    /// Roll back when the p95 time to the response head exceeds this (e.g. `500ms`).
    #[arg(long)]
    pub max_p95: Option<String>,
    /// Judge the gates only after this many responses (default 20).
    #[arg(long)]
    pub min_requests: Option<u64>,
}

impl GuardArgs {
    /// The `PUT /config` query string (empty without `--bake` and gates).
    fn query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(bake) = &self.bake {
            query.append_pair("bake", bake);
        }
        if let Some(rate) = self.max_5xx_rate {
            query.append_pair("max_5xx_rate", &rate.to_string());
        }
        if let Some(p95) = &self.max_p95 {
            query.append_pair("max_p95", p95);
        }
        if let Some(count) = self.min_requests {
            query.append_pair("min_requests", &count.to_string());
        }
        let query = query.finish();
        if query.is_empty() {
            query
        } else {
            format!("?{query}")
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the running config (TOML; `--json` for the API's answer).
    Get,
    /// Validate FILE, show the changes against the running config, confirm, apply.
    Apply {
        /// Config file (TOML, or JSON when it ends in .json).
        file: PathBuf,
        /// Apply without asking (required when stdin is not a terminal).
        #[arg(short, long)]
        yes: bool,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
        #[command(flatten)]
        guard: GuardArgs,
    },
    /// Show the changes FILE would make to the running config.
    Diff {
        /// Config file (TOML, or JSON when it ends in .json).
        file: PathBuf,
    },
}

/// Commands on a named resource (routes, pools); each change is a new stored version.
#[derive(Subcommand, Debug)]
pub enum ResourceCommand {
    /// All of them, as a table.
    List,
    /// One, as JSON.
    Get { name: String },
    /// Add or replace NAME from FILE: one table in TOML (`[[routes]]` fields without the
    /// header), or a JSON object when FILE ends in .json.
    Put {
        name: String,
        file: PathBuf,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Remove NAME.
    Remove {
        name: String,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
    },
}

/// Commands on a route's L7 policies (SPEC POLICY-2); each change is a new stored version.
#[derive(Subcommand, Debug)]
pub enum PoliciesCommand {
    /// The route's policies in order (the first match decides), as a table.
    List {
        #[arg(long)]
        route: String,
    },
    /// One policy, as JSON.
    Get {
        #[arg(long)]
        route: String,
        name: String,
    },
    /// Replace policy NAME in place, or add it last, from FILE: the rule's fields in TOML,
    /// or a JSON object when FILE ends in .json.
    Put {
        #[arg(long)]
        route: String,
        name: String,
        file: PathBuf,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Remove policy NAME.
    Remove {
        #[arg(long)]
        route: String,
        name: String,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum FirewallCommand {
    /// The rules, as JSON.
    Get,
    /// Replace the rules from FILE (the `[firewall]` fields in TOML, or JSON).
    Put {
        file: PathBuf,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ListenersCommand {
    /// Set a listener's max_connections (0 = unlimited) as a new stored version.
    SetLimit {
        name: String,
        limit: u32,
        /// Recorded with the change in the audit log.
        #[arg(short, long)]
        message: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "--admin {0:?}: expected http://HOST:PORT, https://HOST:PORT, HOST:PORT or unix:/path"
    )]
    BadAdmin(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot reach the admin API at {admin}: {source}")]
    Connect {
        admin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin API at {admin} failed: {message}")]
    Transport { admin: String, message: String },
    #[error("no answer from the admin API within {0:?}")]
    Timeout(Duration),
    /// The API answered with an error; `message` already holds every detail.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("{path}: {source}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin API answered with something other than JSON: {0}")]
    NotJson(String),
    #[error("refusing to apply without confirmation: stdin is not a terminal; re-run with --yes")]
    NoConfirmation,
    #[error("not applied")]
    Declined,
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Output(String),
}

/// Runs one `ctl` command and prints its outcome; errors go to stderr.
pub fn run(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("gatehouse ctl: {}", CtlError::Runtime(err));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gatehouse ctl: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Where the admin API is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Tcp(String),
    Https(String),
    Unix(PathBuf),
}

impl Target {
    fn parse(admin: &str) -> Result<Target, CtlError> {
        if let Some(path) = admin.strip_prefix(crate::control::admin::UNIX_PREFIX) {
            if path.is_empty() {
                return Err(CtlError::BadAdmin(admin.into()));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let (tls, rest) = match admin.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (false, admin.strip_prefix("http://").unwrap_or(admin)),
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(CtlError::BadAdmin(admin.into()));
        }
        Ok(if tls {
            Target::Https(authority.to_string())
        } else {
            Target::Tcp(authority.to_string())
        })
    }

    fn host(&self) -> &str {
        match self {
            Target::Tcp(authority) | Target::Https(authority) => authority,
            Target::Unix(_) => "admin",
        }
    }
}

/// An answer from the admin API.
struct Answer {
    status: StatusCode,
    body: Value,
}

struct Client<'a> {
    args: &'a CtlArgs,
    target: Target,
}

impl Client<'_> {
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(http::HeaderName, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Answer, CtlError> {
        tokio::time::timeout(
            self.args.timeout,
            self.send_now(method, path, headers, body),
        )
        .await
        .map_err(|_| CtlError::Timeout(self.args.timeout))?
    }

    async fn send_now(
        &self,
        method: Method,
        path: &str,
        headers: &[(http::HeaderName, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Answer, CtlError> {
        let (status, text) = self.send_raw(method, path, headers, body).await?;
        let body: Value = serde_json::from_slice(&text).map_err(|_| {
            CtlError::NotJson(String::from_utf8_lossy(&text).chars().take(200).collect())
        })?;
        Ok(Answer { status, body })
    }

    /// Sends a request; a non-2xx answer becomes `CtlError::Api` with the API's message.
    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(http::HeaderName, String)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Bytes), CtlError> {
        let admin = &self.args.admin;
        let connect_error = |source| CtlError::Connect {
            admin: admin.clone(),
            source,
        };
        let transport = |err: hyper::Error| CtlError::Transport {
            admin: admin.clone(),
            message: err.to_string(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.target.host());
        if let Some(token) = &self.args.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let bytes = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(CONTENT_TYPE, content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(bytes))
            .map_err(|err| CtlError::Transport {
                admin: admin.clone(),
                message: format!("cannot build the request: {err}"),
            })?;
        let response = match &self.target {
            Target::Tcp(authority) => {
                let stream = tokio::net::TcpStream::connect(authority)
                    .await
                    .map_err(connect_error)?;
                exchange(stream, request).await.map_err(transport)?
            }
            Target::Https(authority) => {
                let connector = self.tls_connector()?;
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority.as_str(), |(host, _)| host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls_pki_types::ServerName::try_from(host.to_string())
                    .map_err(|err| CtlError::Tls(format!("server name {host:?}: {err}")))?;
                let stream = tokio::net::TcpStream::connect(authority)
                    .await
                    .map_err(connect_error)?;
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|err| CtlError::Tls(format!("handshake with {admin}: {err}")))?;
                exchange(stream, request).await.map_err(transport)?
            }
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(connect_error)?;
                exchange(stream, request).await.map_err(transport)?
            }
        };
        let (status, text) = response;
        if !status.is_success() {
            let body: Value = serde_json::from_slice(&text).map_err(|_| {
                CtlError::NotJson(String::from_utf8_lossy(&text).chars().take(200).collect())
            })?;
            return Err(CtlError::Api {
                status,
                message: api_error_message(status, &body),
            });
        }
        Ok((status, text))
    }

    /// The TLS client for an https admin URL: `--cacert` or the system's roots, and
    /// `--cert`/`--key` for mutual TLS.
    fn tls_connector(&self) -> Result<tokio_rustls::TlsConnector, CtlError> {
        use rustls_pki_types::pem::PemObject;
        let tls_error = |what: &Path, err: &dyn std::fmt::Display| {
            CtlError::Tls(format!("{}: {err}", what.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.args.cacert {
            Some(path) => {
                for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|err| tls_error(path, &err))?
                {
                    let cert = cert.map_err(|err| tls_error(path, &err))?;
                    roots.add(cert).map_err(|err| tls_error(path, &err))?;
                }
            }
            None => {
                let loaded = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(loaded.certs);
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
            .with_safe_default_protocol_versions()
            .map_err(|err| CtlError::Tls(err.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&self.args.cert, &self.args.key) {
            (Some(cert), Some(key)) => {
                let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|err| tls_error(cert, &err))?;
                let key_der = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
                    .map_err(|err| tls_error(key, &err))?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|err| tls_error(cert, &err))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    async fn get(&self, path: &str) -> Result<Answer, CtlError> {
        self.send(Method::GET, path, &[], None).await
    }
}

async fn exchange<S>(stream: S, request: Request<Full<Bytes>>) -> hyper::Result<(StatusCode, Bytes)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, body))
}

/// `error: message` plus one line per config error with its field path.
fn api_error_message(status: StatusCode, body: &Value) -> String {
    let mut message = format!(
        "{} ({}): {}",
        body["error"].as_str().unwrap_or("error"),
        status.as_u16(),
        body["message"].as_str().unwrap_or("no message")
    );
    if let Some(errors) = body["errors"].as_array() {
        for error in errors {
            message.push_str(&format!(
                "\n  {}: {}",
                error["path"].as_str().unwrap_or("?"),
                error["message"].as_str().unwrap_or("?")
            ));
        }
    }
    if let Some(current) = body["current_version"].as_i64() {
        message.push_str(&format!("\n  the current version is {current}"));
    }
    message
}

async fn execute(args: &CtlArgs) -> Result<(), CtlError> {
    let client = Client {
        args,
        target: Target::parse(&args.admin)?,
    };
    let out = &mut std::io::stdout().lock();
    match &args.command {
        CtlCommand::Status => {
            let answer = client.get("/status").await?;
            print_or(out, args, &answer.body, status_table)
        }
        CtlCommand::Config(ConfigCommand::Get) => {
            let answer = client.get("/config").await?;
            if args.json {
                return print_json(out, &answer.body);
            }
            let mut config = answer.body["config"].clone();
            strip_nulls(&mut config);
            let text = toml::to_string_pretty(&config)
                .map_err(|err| CtlError::Output(format!("cannot render TOML: {err}")))?;
            write(
                out,
                &format!(
                    "# version {} ({}), {} by {}\n{text}",
                    answer.body["version"],
                    short_hash(&answer.body["hash"]),
                    answer.body["created_at"].as_str().unwrap_or(""),
                    answer.body["author"].as_str().unwrap_or("")
                ),
            )
        }
        CtlCommand::Config(ConfigCommand::Diff { file }) | CtlCommand::Diff { file } => {
            let (content_type, text) = read_config_file(file)?;
            let diff = client
                .send(
                    Method::POST,
                    "/config/diff",
                    &[],
                    Some((content_type, text)),
                )
                .await?;
            print_or(out, args, &diff.body, diff_text)
        }
        CtlCommand::Config(ConfigCommand::Apply {
            file,
            yes,
            message,
            guard,
        })
        | CtlCommand::Apply {
            file: Some(file),
            yes,
            message,
            guard,
            ..
        } => apply(&client, out, file, *yes, message.as_deref(), guard).await,
        CtlCommand::Apply {
            bundle: Some(bundle),
            message,
            ..
        } => {
            let text = std::fs::read(bundle).map_err(|err| {
                CtlError::Output(format!("cannot read {}: {err}", bundle.display()))
            })?;
            let answer = client
                .send(
                    Method::POST,
                    "/config/bundle",
                    &message_header(message.as_deref()),
                    Some(("application/json", text)),
                )
                .await?;
            print_or(out, args, &answer.body, |body| {
                changed_line(body, "bundle applied")
            })
        }
        CtlCommand::Apply { .. } => Err(CtlError::Output(
            "apply needs -f FILE or --bundle FILE".into(),
        )),
        CtlCommand::Breakers => {
            let answer = client.get("/breakers").await?;
            print_or(out, args, &answer.body, breakers_table)
        }
        CtlCommand::Versions { limit } => {
            let answer = client
                .get(&format!("/config/versions?limit={limit}"))
                .await?;
            print_or(out, args, &answer.body, versions_table)
        }
        CtlCommand::Rollback { version, message } => {
            let answer = client
                .send(
                    Method::POST,
                    &format!("/config/rollback/{version}"),
                    &message_header(message.as_deref()),
                    None,
                )
                .await?;
            print_or(out, args, &answer.body, |body| {
                changed_line(body, &format!("rolled back to version {version}'s config"))
            })
        }
        CtlCommand::Audit { limit } => {
            let answer = client.get(&format!("/audit?limit={limit}")).await?;
            print_or(out, args, &answer.body, audit_table)
        }
        CtlCommand::Listeners(ListenersCommand::SetLimit {
            name,
            limit,
            message,
        }) => {
            let body = serde_json::json!({ "max_connections": limit }).to_string();
            let answer = client
                .send(
                    Method::PUT,
                    &format!("/listeners/{name}/max_connections"),
                    &message_header(message.as_deref()),
                    Some(("application/json", body.into_bytes())),
                )
                .await?;
            let what = if *limit == 0 {
                format!("listener {name}: max_connections = 0 (unlimited)")
            } else {
                format!("listener {name}: max_connections = {limit}")
            };
            print_or(out, args, &answer.body, |body| changed_line(body, &what))
        }
        CtlCommand::Routes(command) => resource(&client, out, "routes", command).await,
        CtlCommand::Pools(command) => resource(&client, out, "pools", command).await,
        CtlCommand::Policies(command) => policies(&client, out, command).await,
        CtlCommand::Firewall(FirewallCommand::Get) => {
            let answer = client.get("/firewall").await?;
            print_json(out, &answer.body)
        }
        CtlCommand::Firewall(FirewallCommand::Put { file, message }) => {
            let body = read_object_file(file)?;
            let answer = client
                .send(
                    Method::PUT,
                    "/firewall",
                    &message_header(message.as_deref()),
                    Some(("application/json", body)),
                )
                .await?;
            print_or(out, args, &answer.body, |body| {
                changed_line(body, "firewall rules replaced")
            })
        }
        CtlCommand::Backup { file } => {
            let (_, bytes) = client
                .send_raw(Method::POST, "/store/backup", &[], None)
                .await?;
            write_private(file, &bytes)?;
            write(
                out,
                &format!(
                    "backup written to {} ({} bytes)\n",
                    file.display(),
                    bytes.len()
                ),
            )
        }
        CtlCommand::Certificates => {
            let answer = client.get("/certificates").await?;
            print_or(out, args, &answer.body, certificates_table)
        }
    }
}

/// `ctl routes …` and `ctl pools …`.
async fn resource(
    client: &Client<'_>,
    out: &mut impl Write,
    kind: &str,
    command: &ResourceCommand,
) -> Result<(), CtlError> {
    let args = client.args;
    let singular = kind.trim_end_matches('s');
    match command {
        ResourceCommand::List => {
            let answer = client.get(&format!("/{kind}")).await?;
            let human = if kind == "routes" {
                routes_table
            } else {
                pools_table
            };
            print_or(out, args, &answer.body, human)
        }
        ResourceCommand::Get { name } => {
            let answer = client.get(&format!("/{kind}/{name}")).await?;
            print_json(out, &answer.body)
        }
        ResourceCommand::Put {
            name,
            file,
            message,
        } => {
            put_file(
                client,
                out,
                &format!("/{kind}/{name}"),
                file,
                message,
                &format!("{singular} {name}"),
            )
            .await
        }
        ResourceCommand::Remove { name, message } => {
            remove(
                client,
                out,
                &format!("/{kind}/{name}"),
                message,
                &format!("{singular} {name}"),
            )
            .await
        }
    }
}

/// `ctl policies …`.
async fn policies(
    client: &Client<'_>,
    out: &mut impl Write,
    command: &PoliciesCommand,
) -> Result<(), CtlError> {
    let args = client.args;
    match command {
        PoliciesCommand::List { route } => {
            let answer = client.get(&format!("/routes/{route}/policies")).await?;
            print_or(out, args, &answer.body, policies_table)
        }
        PoliciesCommand::Get { route, name } => {
            let answer = client
                .get(&format!("/routes/{route}/policies/{name}"))
                .await?;
            print_json(out, &answer.body)
        }
        PoliciesCommand::Put {
            route,
            name,
            file,
            message,
        } => {
            put_file(
                client,
                out,
                &format!("/routes/{route}/policies/{name}"),
                file,
                message,
                &format!("route {route}: policy {name}"),
            )
            .await
        }
        PoliciesCommand::Remove {
            route,
            name,
            message,
        } => {
            remove(
                client,
                out,
                &format!("/routes/{route}/policies/{name}"),
                message,
                &format!("route {route}: policy {name}"),
            )
            .await
        }
    }
}

/// PUTs a JSON object read from `file` to `path`; prints "<what> added" or "<what> replaced".
async fn put_file(
    client: &Client<'_>,
    out: &mut impl Write,
    path: &str,
    file: &Path,
    message: &Option<String>,
    what: &str,
) -> Result<(), CtlError> {
    let body = read_object_file(file)?;
    let answer = client
        .send(
            Method::PUT,
            path,
            &message_header(message.as_deref()),
            Some(("application/json", body)),
        )
        .await?;
    let done = if answer.status == StatusCode::CREATED {
        "added"
    } else {
        "replaced"
    };
    let line = format!("{what} {done}");
    print_or(out, client.args, &answer.body, |body| {
        changed_line(body, &line)
    })
}

/// DELETEs `path`; prints "<what> removed".
async fn remove(
    client: &Client<'_>,
    out: &mut impl Write,
    path: &str,
    message: &Option<String>,
    what: &str,
) -> Result<(), CtlError> {
    let answer = client
        .send(
            Method::DELETE,
            path,
            &message_header(message.as_deref()),
            None,
        )
        .await?;
    let line = format!("{what} removed");
    print_or(out, client.args, &answer.body, |body| {
        changed_line(body, &line)
    })
}

fn policies_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(index, policy)| {
            let mut conditions = Vec::new();
            if let Some(agent) = policy["user_agent"].as_str() {
                conditions.push(format!("user_agent~{agent}"));
            }
            if let Some(regex) = policy["user_agent_regex"].as_str() {
                conditions.push(format!("user_agent_regex={regex}"));
            }
            for (key, label) in [("header", "header"), ("require_header", "require")] {
                if let Some(name) = policy[key]["name"].as_str() {
                    conditions.push(match policy[key]["value"].as_str() {
                        Some(value) => format!("{label} {name}={value}"),
                        None => format!("{label} {name}"),
                    });
                }
            }
            let sources: Vec<String> = policy["sources"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            if !sources.is_empty() {
                conditions.push(format!("from {}", sources.join(",")));
            }
            vec![
                (index + 1).to_string(),
                text(&policy["name"]),
                policy["action"].as_str().unwrap_or("deny").to_string(),
                if conditions.is_empty() {
                    "(every request)".into()
                } else {
                    conditions.join("; ")
                },
            ]
        })
        .collect();
    table(&["#", "POLICY", "ACTION", "CONDITIONS"], &rows)
}

/// Reads one object from a TOML (or, for `.json`, JSON) file and returns it as JSON.
fn read_object_file(file: &Path) -> Result<Vec<u8>, CtlError> {
    let (content_type, bytes) = read_config_file(file)?;
    let invalid = |message: String| CtlError::ReadFile {
        path: file.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    };
    let text = String::from_utf8(bytes).map_err(|err| invalid(err.to_string()))?;
    let value: Value = if content_type == "application/json" {
        serde_json::from_str(&text).map_err(|err| invalid(err.to_string()))?
    } else {
        let table: toml::Table =
            toml::from_str(&text).map_err(|err| invalid(err.to_string().trim_end().into()))?;
        serde_json::to_value(table).map_err(|err| invalid(err.to_string()))?
    };
    if !value.is_object() {
        return Err(invalid("expected one object".into()));
    }
    serde_json::to_vec(&value).map_err(|err| invalid(err.to_string()))
}

/// `ctl config apply`: validate, diff, confirm, then apply with `If-Match` on the version
/// the diff was made against, so what was shown is what is applied.
async fn apply(
    client: &Client<'_>,
    out: &mut impl Write,
    file: &Path,
    yes: bool,
    message: Option<&str>,
    guard: &GuardArgs,
) -> Result<(), CtlError> {
    let json = client.args.json;
    let (content_type, text) = read_config_file(file)?;
    client
        .send(
            Method::POST,
            "/config/validate",
            &[],
            Some((content_type, text.clone())),
        )
        .await?;
    let diff = client
        .send(
            Method::POST,
            "/config/diff",
            &[],
            Some((content_type, text.clone())),
        )
        .await?;
    let from_version = diff.body["from_version"].as_i64().unwrap_or(0);
    let unchanged = diff.body["changes"]
        .as_array()
        .is_some_and(|changes| changes.is_empty());
    if unchanged {
        if json {
            return print_json(out, &diff.body);
        }
        return write(
            out,
            &format!("no changes: version {from_version} already runs this config\n"),
        );
    }
    if !json {
        write(out, &diff_text(&diff.body))?;
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(CtlError::NoConfirmation);
        }
        write(out, &format!("Apply to version {from_version}? [y/N] "))?;
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|err| CtlError::Output(format!("cannot read the answer: {err}")))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            return Err(CtlError::Declined);
        }
    }
    let mut headers = message_header(message);
    headers.push((IF_MATCH, format!("\"{from_version}\"")));
    let path = format!("/config{}", guard.query());
    let answer = client
        .send(Method::PUT, &path, &headers, Some((content_type, text)))
        .await
        .map_err(|err| match err {
            CtlError::Api { status, message } if status == StatusCode::PRECONDITION_FAILED => {
                CtlError::Api {
                    status,
                    message: format!(
                        "{message}\n  the config changed since the diff above was made; run the command again"
                    ),
                }
            }
            other => other,
        })?;
    let _ = answer.status;
    if json {
        return print_json(out, &answer.body);
    }
    write(out, &changed_line(&answer.body, "applied"))?;
    if answer.body["guard"].is_object() {
        write(
            out,
            &format!(
                "guarded: baking {}s; `gatehouse ctl status` shows the outcome\n",
                answer.body["guard"]["bake_seconds"]
            ),
        )?;
    }
    Ok(())
}

fn message_header(message: Option<&str>) -> Vec<(http::HeaderName, String)> {
    message
        .map(|message| {
            vec![(
                http::HeaderName::from_static("x-gatehouse-message"),
                message.to_string(),
            )]
        })
        .unwrap_or_default()
}

fn read_config_file(file: &Path) -> Result<(&'static str, Vec<u8>), CtlError> {
    let bytes = std::fs::read(file).map_err(|source| CtlError::ReadFile {
        path: file.display().to_string(),
        source,
    })?;
    let content_type = match Format::from_path(file) {
        Format::Json => "application/json",
        Format::Toml => "application/toml",
    };
    Ok((content_type, bytes))
}

/// Writes `bytes` to `path` with mode 0600 (a store holds token hashes) via a temporary
/// file renamed into place.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CtlError> {
    use std::os::unix::fs::OpenOptionsExt;
    let error = |err: std::io::Error| CtlError::Output(format!("{}: {err}", path.display()));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into());
    let partial = path.with_file_name(format!(".{file_name}.partial-{}", std::process::id()));
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&partial, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result.map_err(error)
}

fn write(out: &mut impl Write, text: &str) -> Result<(), CtlError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|err| CtlError::Output(format!("cannot write the output: {err}")))
}

fn print_json(out: &mut impl Write, body: &Value) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(body)
        .map_err(|err| CtlError::Output(format!("cannot render JSON: {err}")))?;
    write(out, &format!("{text}\n"))
}

fn print_or(
    out: &mut impl Write,
    args: &CtlArgs,
    body: &Value,
    human: impl FnOnce(&Value) -> String,
) -> Result<(), CtlError> {
    if args.json {
        print_json(out, body)
    } else {
        write(out, &human(body))
    }
}

/// TOML has no null: drop null object members (absent optional settings).
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, member| !member.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn short_hash(hash: &Value) -> String {
    hash.as_str().unwrap_or("").chars().take(12).collect()
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(index) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut line = String::new();
        for (index, cell) in cells.iter().enumerate() {
            if index + 1 == cells.len() {
                line.push_str(cell);
            } else {
                let width = widths.get(index).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        line.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(ToString::to_string).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

fn status_table(body: &Value) -> String {
    let mut out = format!(
        "version {} ({})  uptime {}s  ready {}  store mode {}\n\n",
        body["version"],
        short_hash(&body["hash"]),
        body["uptime_seconds"],
        if body["ready"] == Value::Bool(true) {
            "yes"
        } else {
            "no (draining)"
        },
        text(&body["store_mode"])
    );
    let rows: Vec<Vec<String>> = body["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|listener| {
            let limit = match listener["max_connections"].as_u64() {
                Some(0) => "unlimited".to_string(),
                _ => text(&listener["max_connections"]),
            };
            vec![
                text(&listener["name"]),
                text(&listener["addr"]),
                text(&listener["active_connections"]),
                limit,
                text(&listener["accepted"]),
                text(&listener["rejected_limit"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "LISTENER",
            "ADDRESS",
            "ACTIVE",
            "MAX",
            "ACCEPTED",
            "REJECTED(LIMIT)",
        ],
        &rows,
    ));
    let guard = &body["guard"];
    if guard.is_object() {
        out.push_str(&format!(
            "\nguarded apply of version {}: {} ({} responses, 5xx rate {}){}\n",
            guard["version"],
            text(&guard["state"]),
            guard["requests"],
            guard["server_error_rate"],
            guard["reason"]
                .as_str()
                .map(|reason| format!(": {reason}"))
                .unwrap_or_default()
        ));
    }
    let firewall = &body["firewall"];
    if firewall.is_object() {
        let reasons: Vec<String> = firewall["blocked"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(reason, count)| format!("{reason} {count}"))
            .collect();
        out.push_str(&format!(
            "\nfirewall blocked {} ({})\n",
            firewall["blocked_total"],
            reasons.join(", ")
        ));
    }
    if let Some(version) = body["bundles"]["last_applied_version"].as_i64() {
        out.push_str(&format!("\nlast applied bundle {version}\n"));
    }
    let pull = &body["pull"];
    if pull.is_object() {
        out.push_str(&format!(
            "pull {}: last check {}, {} checks, {} failed{}\n",
            text(&pull["url"]),
            pull["last_check"].as_str().unwrap_or("never"),
            pull["checks"],
            pull["failures"],
            pull["last_error"]
                .as_str()
                .map(|error| format!("; last error: {error}"))
                .unwrap_or_default()
        ));
    }
    out
}

fn diff_text(body: &Value) -> String {
    let text = body["text"].as_str().unwrap_or("");
    if text.is_empty() {
        format!("no changes against version {}\n", body["from_version"])
    } else {
        format!(
            "changes against version {}:\n{text}\n",
            body["from_version"]
        )
    }
}

fn versions_table(body: &Value) -> String {
    let current = body["current"].as_i64();
    let rows: Vec<Vec<String>> = body["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|version| {
            let mark = if version["version"].as_i64() == current {
                "*"
            } else {
                ""
            };
            vec![
                format!("{}{mark}", version["version"]),
                text(&version["created_at"]),
                text(&version["author"]),
                short_hash(&version["hash"]),
                text(&version["message"]),
            ]
        })
        .collect();
    table(&["VERSION", "CREATED", "AUTHOR", "HASH", "MESSAGE"], &rows)
}

fn audit_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["records"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|record| {
            vec![
                text(&record["id"]),
                text(&record["at"]),
                text(&record["actor"]),
                text(&record["action"]),
                format!(
                    "{} -> {}",
                    text(&record["before_version"]),
                    text(&record["after_version"])
                ),
                text(&record["message"]),
            ]
        })
        .collect();
    table(
        &["ID", "AT", "ACTOR", "ACTION", "VERSION", "MESSAGE"],
        &rows,
    )
}

fn certificates_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|cert| {
            let names: Vec<String> = cert["names"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            let days = cert["expires_in_seconds"].as_i64().unwrap_or(0) / 86_400;
            vec![
                names.join(","),
                text(&cert["not_after_rfc3339"]),
                if cert["expired"] == Value::Bool(true) {
                    "EXPIRED".into()
                } else {
                    format!("{days}d")
                },
                text(&cert["cert_path"]),
            ]
        })
        .collect();
    table(&["NAMES", "NOT AFTER", "LEFT", "FILE"], &rows)
}

fn routes_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|route| {
            let matcher = &route["match"];
            let hosts: Vec<String> = matcher["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            let path = ["path", "path_prefix", "path_regex"]
                .iter()
                .find_map(|key| matcher[*key].as_str().map(|value| format!("{key}={value}")))
                .unwrap_or_else(|| "*".into());
            let target = if let Some(pool) = route["pool"].as_str() {
                format!("pool {pool}")
            } else if route["redirect"].is_object() {
                "redirect".into()
            } else if route["direct_response"].is_object() {
                format!("direct {}", route["direct_response"]["status"])
            } else {
                "-".into()
            };
            vec![
                text(&route["name"]),
                text(&route["priority"]),
                if hosts.is_empty() {
                    "*".into()
                } else {
                    hosts.join(",")
                },
                path,
                target,
            ]
        })
        .collect();
    table(&["NAME", "PRIORITY", "HOSTS", "PATH", "TARGET"], &rows)
}

fn pools_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|pool| {
            let endpoints: Vec<String> = pool["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|endpoint| match endpoint {
                    Value::Object(_) => text(&endpoint["address"]),
                    other => text(other),
                })
                .collect();
            vec![
                text(&pool["name"]),
                text(&pool["protocol"]),
                endpoints.join(","),
            ]
        })
        .collect();
    table(&["NAME", "PROTOCOL", "ENDPOINTS"], &rows)
}

fn breakers_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["breakers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|breaker| {
            let settings = &breaker["settings"];
            let threshold = if settings.is_object() {
                format!(
                    "{}% of {}+",
                    text(&settings["error_percent"]),
                    text(&settings["min_requests"])
                )
            } else {
                "-".into()
            };
            vec![
                text(&breaker["pool"]),
                text(&breaker["state"]),
                threshold,
                text(&breaker["rejections"]),
            ]
        })
        .collect();
    table(&["POOL", "STATE", "OPENS AT", "REJECTED"], &rows)
}

fn changed_line(body: &Value, what: &str) -> String {
    if body["changed"] == Value::Bool(false) {
        format!("unchanged: version {} already runs this\n", body["version"])
    } else {
        format!("{what}: now version {}\n", body["version"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_targets_parse() {
        assert_eq!(
            Target::parse("http://127.0.0.1:9901").unwrap(),
            Target::Tcp("127.0.0.1:9901".into())
        );
        assert_eq!(
            Target::parse("127.0.0.1:9901/").unwrap(),
            Target::Tcp("127.0.0.1:9901".into())
        );
        assert_eq!(
            Target::parse("unix:/run/g.sock").unwrap(),
            Target::Unix("/run/g.sock".into())
        );
        assert_eq!(
            Target::parse("https://admin.example:9901").unwrap(),
            Target::Https("admin.example:9901".into())
        );
        assert!(Target::parse("ftp://host:1").is_err());
        assert!(Target::parse("unix:").is_err());
        assert!(Target::parse("host").is_err());
    }

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["A", "LONGER"],
            &[
                vec!["wide-cell".into(), "x".into()],
                vec!["b".into(), "y".into()],
            ],
        );
        assert_eq!(out, "A          LONGER\nwide-cell  x\nb          y\n");
    }

    #[test]
    fn api_errors_list_every_path() {
        let body = serde_json::json!({
            "error": "invalid_config",
            "message": "2 error(s) in the config",
            "status": 422,
            "errors": [{"path": "routes[0].pool", "message": "unknown pool"}],
        });
        let message = api_error_message(StatusCode::UNPROCESSABLE_ENTITY, &body);
        assert!(message.contains("invalid_config (422)"), "{message}");
        assert!(
            message.contains("routes[0].pool: unknown pool"),
            "{message}"
        );
    }
}
