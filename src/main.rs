//! The `gatehouse` command line: `run`, `validate`, the one-line `proxy` mode, `ctl` (the
//! admin API client, `gatehouse::ctl`) and `store backup`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gatehouse::config::{self, Config};
use gatehouse::control::Control;

/// mimalloc instead of glibc's allocator: measured −4 % CPU per HTTP/1.1 request and −12 to
/// −19 % per h2 stream (glibc's per-thread cache does not serve the few-KiB futures of 1,000
/// streams in flight, and the heap fragments), for 8.9 against 7.5 KiB per idle connection
/// (docs/BENCHMARKS.md, "Allocator"). While hyper's HTTP/1 server held 16 KiB per
/// connection the same trade cost 10 KiB per connection and was refused. mimalloc 2 (the
/// crate's `v2` feature), not 3: mimalloc 3 sends an aligned request above 1 KiB whose
/// size class is not a power of two (and every Rust allocation reaches it as an aligned
/// one) through its over-allocating slow path: 1.6 % more instructions per request and
/// 7.8 against 6.6 KiB per idle connection.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "gatehouse", version, about = "A traffic gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway from a config file.
    Run {
        /// Config file (TOML, or JSON when it ends in .json).
        #[arg(short, long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Check a config file and print every error with its field path.
    Validate {
        /// Config file (TOML, or JSON when it ends in .json).
        file: PathBuf,
    },
    /// Reverse-proxy one address to one or more backends, with no config file.
    Proxy {
        #[command(flatten)]
        args: ProxyArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Talk to a running gateway's admin API: status, config, versions, rollback, audit.
    Ctl(gatehouse::ctl::CtlArgs),
    /// The config store, without a running gateway's admin API.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Signed config bundles: keys, signing, verification (docs/OPERATIONS.md).
    #[command(subcommand)]
    Bundle(BundleCommand),
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Make an Ed25519 key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Make a bundle of a config file, signed with a secret key.
    Sign {
        /// The secret key file (`bundle keygen`).
        #[arg(long, required_unless_present = "unsigned")]
        key: Option<PathBuf>,
        /// Make an unsigned bundle (accepted only where signatures are not required).
        #[arg(long, conflicts_with = "key")]
        unsigned: bool,
        /// Config file (TOML, or JSON when it ends in .json); it must validate.
        #[arg(short, long)]
        config: PathBuf,
        /// Bundle version: must grow with every release (older ones are refused as replays).
        #[arg(long)]
        version: i64,
        /// Recorded in the bundle and the audit log.
        #[arg(long)]
        author: String,
        /// Where to write the bundle; stdout when absent.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Check a bundle's signature against public keys (.pub files).
    Verify {
        bundle: PathBuf,
        /// A trusted public key file; repeat for several.
        #[arg(long = "pub", required = true)]
        public: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy the store (the one `store.path` in the config names) to FILE with SQLite's
    /// online backup API; safe while the gateway runs.
    Backup {
        /// The gateway's config file (for `store.path`).
        #[arg(short, long, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
        /// Where to write the copy (replaced atomically; mode 0600).
        file: PathBuf,
    },
}

#[derive(Args)]
struct ProxyArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Backend `host:port` for HTTP; repeat for a round-robin pool.
    #[arg(long = "to", required_unless_present = "passthrough")]
    to: Vec<String>,
    /// Speak HTTP/2 with prior knowledge (h2c) to the backends, e.g. for gRPC.
    #[arg(long)]
    h2c: bool,
    /// Terminate TLS with this certificate chain (PEM); HTTP/2 and HTTP/1.1 by ALPN.
    #[arg(long, requires = "tls_key", conflicts_with = "passthrough")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) for `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Relay TLS untouched to this `host:port` (L4 passthrough by SNI); repeat for a pool.
    #[arg(long, conflicts_with = "to")]
    passthrough: Vec<String>,
    /// With `--passthrough`: relay only this server name (others are reset).
    #[arg(long, requires = "passthrough")]
    sni: Option<String>,
}

#[derive(Args)]
struct RuntimeArgs {
    /// Runtime worker threads (default: the config's `workers`, else one per core).
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file } => validate(&file),
        Command::Ctl(args) => gatehouse::ctl::run(args),
        Command::Store(StoreCommand::Backup { config, file }) => store_backup(&config, &file),
        Command::Bundle(command) => match bundle(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, runtime } => {
            let loaded = match config::load_file(&config) {
                Ok(loaded) => loaded,
                Err(errors) => {
                    eprintln!("{}: invalid configuration", config.display());
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            serve(loaded, Some(config), runtime.workers)
        }
        Command::Proxy { args, runtime } => match one_line_config(args) {
            Ok(config) => serve(config, None, runtime.workers),
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
    }
}

fn store_backup(config_path: &Path, file: &Path) -> ExitCode {
    let config = match config::load_file(config_path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{}: invalid configuration", config_path.display());
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let Some(store) = gatehouse::control::store_path(&config, Some(config_path)) else {
        eprintln!("gatehouse: no store path");
        return ExitCode::from(1);
    };
    match gatehouse::control::store::backup_file(&store, file) {
        Ok(()) => {
            println!("{} backed up to {}", store.display(), file.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("gatehouse: {err}");
            ExitCode::from(1)
        }
    }
}

fn validate(file: &Path) -> ExitCode {
    match config::load_file(file) {
        Ok(config) => {
            let registries = gatehouse::snapshot::Registries::default();
            match gatehouse::snapshot::compile(config, 0, &registries) {
                Ok(_) => {
                    println!("{}: configuration is valid", file.display());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("{}: {err}", file.display());
                    ExitCode::from(1)
                }
            }
        }
        Err(errors) => {
            eprintln!("{}: {} error(s)", file.display(), errors.0.len());
            eprintln!("{errors}");
            ExitCode::from(1)
        }
    }
}

/// The config `gatehouse proxy` runs: one listener, one pool, and a catch-all route or a
/// passthrough rule. Built as JSON and parsed like a file, so flags get the same checks.
fn one_line_config(args: ProxyArgs) -> Result<Config, config::ConfigErrors> {
    let absolute = |path: &Path| -> String {
        std::path::absolute(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .to_string_lossy()
            .into_owned()
    };
    let mut listener = serde_json::json!({ "name": "proxy", "bind": args.listen });
    let mut config = serde_json::json!({});
    if !args.passthrough.is_empty() {
        let tls = match &args.sni {
            Some(name) => serde_json::json!({
                "passthrough": [{ "sni": [name], "pool": "backend" }],
                "unknown_sni": "reset",
            }),
            None => serde_json::json!({ "unknown_sni": { "passthrough": "backend" } }),
        };
        listener["protocol"] = "tls".into();
        listener["tls"] = tls;
        config["pools"] = serde_json::json!([{ "name": "backend", "endpoints": args.passthrough }]);
    } else {
        let protocol = if args.h2c { "h2c" } else { "http1" };
        config["pools"] = serde_json::json!([
            { "name": "backend", "protocol": protocol, "endpoints": args.to }
        ]);
        config["routes"] = serde_json::json!([{ "pool": "backend" }]);
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            listener["protocol"] = "tls".into();
            listener["tls"] = serde_json::json!({});
            config["tls"] = serde_json::json!({
                "certificates": [{ "cert": absolute(cert), "key": absolute(key), "default": true }]
            });
        }
    }
    config["listeners"] = serde_json::json!([listener]);
    config::parse_str(&config.to_string(), config::Format::Json, std::env::vars())
}

fn serve(config: Config, path: Option<PathBuf>, workers: Option<usize>) -> ExitCode {
    let log_override = std::env::var("GATEHOUSE_LOG").ok();
    gatehouse::telemetry::init_logging(&config.log, log_override.as_deref());
    let workers = workers
        .or(config.workers)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    match run(config, path, workers) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("gatehouse: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(config: Config, path: Option<PathBuf>, workers: usize) -> anyhow::Result<bool> {
    // Sockets from the process this one replaces (SIGUSR2 upgrade), before any thread starts.
    let inherited = gatehouse::ops::upgrade::receive_from_env()
        .context("cannot take over the previous process's sockets")?;
    if inherited > 0 {
        tracing::info!(
            sockets = inherited,
            "upgrade: took over the listening sockets"
        );
    }
    let runtime = gatehouse::workers::runtime().context("cannot start the runtime")?;
    let stop_workers = tokio_util::sync::CancellationToken::new();
    let worker_threads =
        gatehouse::workers::install(runtime.handle().clone(), workers, stop_workers.clone())
            .context("cannot start the worker threads")?;
    let result = runtime.block_on(async {
        let control = Control::start(config, path).await?;
        gatehouse::control::admin::start(control.clone()).await?;
        gatehouse::control::admin::start_metrics(control.clone()).await?;
        gatehouse::control::pull::start(control.clone());
        tracing::info!(workers, "runtime started");
        let clean = gatehouse::ops::run_until_stopped_with(control.gateway(), &|| {
            gatehouse::control::reload_and_log(&control)
        })
        .await?;
        Ok(clean)
    });
    // Connections have drained (or the drain timeout passed) inside `run_until_stopped_with`.
    stop_workers.cancel();
    for thread in worker_threads {
        let _ = thread.join();
    }
    result
}

/// `gatehouse bundle …`.
fn bundle(command: BundleCommand) -> anyhow::Result<()> {
    use gatehouse::control::bundle;
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    match command {
        BundleCommand::Keygen { out } => {
            let (secret, public) = bundle::keygen()?;
            let secret_path = out.with_extension("key");
            let public_path = out.with_extension("pub");
            write_private(&secret_path, format!("{secret}\n").as_bytes())?;
            std::fs::write(&public_path, format!("{public}\n"))
                .with_context(|| format!("cannot write {}", public_path.display()))?;
            println!("secret key: {} (keep it private)", secret_path.display());
            println!("public key: {} = {public}", public_path.display());
            Ok(())
        }
        BundleCommand::Sign {
            key,
            unsigned: _,
            config,
            version,
            author,
            output,
        } => {
            anyhow::ensure!(version >= 1, "--version must be a positive integer");
            let key = key
                .map(|path| {
                    bundle::signing_key(&read(&path)?)
                        .with_context(|| format!("{}", path.display()))
                })
                .transpose()?;
            let format = if config.extension().is_some_and(|ext| ext == "json") {
                config::Format::Json
            } else {
                config::Format::Toml
            };
            let canonical =
                bundle::canonical_config(&read(&config)?, format).map_err(|errors| {
                    anyhow::anyhow!("{}: invalid config:\n{errors}", config.display())
                })?;
            let created =
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            let made = bundle::make(key.as_ref(), version, created, author, canonical);
            let text = serde_json::to_string_pretty(&made)? + "\n";
            match output {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
        BundleCommand::Verify {
            bundle: path,
            public,
        } => {
            let parsed = bundle::Bundle::parse(&read(&path)?)?;
            let trusted_keys = public
                .iter()
                .map(|path| {
                    Ok(config::TrustedKey {
                        name: path.display().to_string(),
                        public_key: read(path)?.trim().to_string(),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let settings = config::BundlesConfig {
                require_signature: true,
                trusted_keys,
            };
            let key = parsed.verify(&settings)?;
            println!(
                "ok: bundle version {} by {} ({}), signed by {}",
                parsed.version,
                parsed.author,
                parsed.created,
                key.unwrap_or_default()
            );
            Ok(())
        }
    }
}

/// Writes a file only its owner can read (a secret key).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}
