//! The `gatehouse` command line: `run`, `validate` and the one-line `proxy` mode.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gatehouse::config::{
    self, Config, EndpointConfig, ListenerConfig, PoolConfig, RouteConfig, UpstreamProtocol,
};
use gatehouse::control::Control;

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
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Backend `host:port`; repeat for a round-robin pool.
        #[arg(long = "to", required = true)]
        to: Vec<String>,
        /// Speak HTTP/2 with prior knowledge (h2c) to the backends, e.g. for gRPC.
        #[arg(long)]
        h2c: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
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
        Command::Proxy {
            listen,
            to,
            h2c,
            runtime,
        } => match one_line_config(listen, to, h2c) {
            Ok(config) => serve(config, None, runtime.workers),
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
    }
}

fn validate(file: &Path) -> ExitCode {
    match config::load_file(file) {
        Ok(config) => {
            let registry = gatehouse::upstream::UpstreamRegistry::default();
            match gatehouse::snapshot::compile(config, 0, &registry) {
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

/// The config `gatehouse proxy` runs: one listener, one pool, one catch-all route.
fn one_line_config(
    listen: String,
    to: Vec<String>,
    h2c: bool,
) -> Result<Config, config::ConfigErrors> {
    let config = Config {
        listeners: vec![ListenerConfig {
            name: "proxy".into(),
            bind: listen,
            protocol: Default::default(),
            reuse_port: false,
            max_connections: 0,
            limits: Default::default(),
        }],
        pools: vec![PoolConfig {
            name: "backend".into(),
            protocol: if h2c {
                UpstreamProtocol::H2c
            } else {
                UpstreamProtocol::Http1
            },
            endpoints: to.into_iter().map(EndpointConfig::Address).collect(),
            ..toml::from_str("name = \"backend\"\nendpoints = []")
                .map_err(|e| config_error(e.to_string()))?
        }],
        routes: vec![RouteConfig {
            pool: Some("backend".into()),
            ..toml::from_str("").map_err(|e| config_error(e.to_string()))?
        }],
        ..Config::default()
    };
    // Round-trip through the validator so flags get the same checks as a file.
    let text = toml::to_string(&config).map_err(|e| config_error(e.to_string()))?;
    config::parse_str(&text, config::Format::Toml, std::env::vars())
}

fn config_error(message: String) -> config::ConfigErrors {
    config::ConfigErrors(vec![config::ConfigError {
        path: String::new(),
        message,
    }])
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name("gatehouse-worker")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let control = Control::start(config, path).await?;
        gatehouse::control::admin::start(control.clone()).await?;
        tracing::info!(workers, "runtime started");
        let clean = gatehouse::ops::run_until_stopped_with(control.gateway(), &|| {
            gatehouse::control::reload_and_log(&control)
        })
        .await?;
        Ok(clean)
    })
}
