//! The control plane (SPEC CTRL-3, CTRL-4, CTRL-5, OPS-4): the embedded SQLite store of
//! config versions and the audit log (`store`), the REST admin API on its own listener
//! (`admin`), bearer-token auth (`auth`) and readable config diffs (`diff`).
//!
//! Every change — an admin apply or rollback, a SIGHUP reload, the file at start — goes
//! through `Control`, which serializes them and writes the store before memory: the new
//! version and its audit record are inserted in a transaction, the gateway swaps to the
//! new config, and only then does the transaction commit. A crash before the commit leaves
//! the store on the previous version, which is what the next start runs; a failed swap
//! rolls the transaction back. Nothing here is on the request path.
//!
//! `store` and `admin` are bootstrap settings: they always come from the file the process
//! started with. A config submitted through the API may repeat them unchanged (so a
//! `GET /config` body can be sent back) but cannot change them.

pub mod admin;
pub mod auth;
pub mod bundle;
pub mod diff;
pub mod grpc;
pub mod guard;
pub mod pull;
pub mod resources;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{self, Config, ConfigError, ConfigErrors, Format, StoreMode};
use crate::gateway::{Gateway, GatewayError};
pub use store::{AuditRecord, Store, StoreError, VersionInfo};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("stored version {version} is no longer a valid config: {errors}")]
    StoredInvalid { version: i64, errors: ConfigErrors },
    /// The submitted config fails validation; every error has its field path.
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// The gateway could not run the config (compile or bind failure); nothing changed.
    #[error("{0}")]
    Rejected(GatewayError),
    #[error("version {expected} is not the current version ({current})")]
    Stale { expected: i64, current: i64 },
    #[error("no config version {0}")]
    UnknownVersion(i64),
    /// An edit names a listener (route, pool, …) the running config does not have.
    #[error("no {kind} named {name:?} in the running config")]
    UnknownName { kind: &'static str, name: String },
    #[error("store mode: the store is the source of truth, so SIGHUP does not re-read the file; change the config through the admin API")]
    ReloadInStoreMode,
    #[error("started without a config file; nothing to reload")]
    NoConfigFile,
    #[error("cannot serialize the config: {0}")]
    Serialize(#[from] serde_json::Error),
    /// A bundle was refused (malformed, unsigned, bad signature, unknown key, replay).
    #[error(transparent)]
    Bundle(#[from] bundle::BundleError),
}

/// The version running now.
pub struct Current {
    pub info: VersionInfo,
    pub config: Arc<Config>,
}

/// Who makes a change and why; recorded in the audit log.
pub struct Change<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub message: &'a str,
    /// Optimistic concurrency: the change applies only if this is still the current version.
    pub if_match: Option<i64>,
}

/// The result of a change.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    #[serde(flatten)]
    pub info: VersionInfo,
    /// False when the config was identical to the running one: nothing was written.
    pub changed: bool,
    /// The version that ran before this change (absent when nothing changed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<i64>,
}

pub struct Control {
    gateway: Arc<Gateway>,
    /// Also the apply lock: every change holds it from the stale check to the commit, so
    /// two changes never interleave.
    store: Mutex<Store>,
    current: Mutex<Arc<Current>>,
    /// `store` and `admin` from the file the process started with (`admin.tokens` then
    /// from the last SIGHUP that rotated them).
    bootstrap: parking_lot::RwLock<Bootstrap>,
    /// The admin API's credentials, swapped when SIGHUP rotates the tokens.
    auth: Mutex<Arc<auth::Auth>>,
    /// The last guarded apply, for `/status`.
    guard: Mutex<Option<guard::GuardStatus>>,
    /// Pull mode's last check, for `/status`.
    pull: Mutex<pull::PullStatus>,
    /// The highest bundle version applied (0: none), as in the store, for `/status`
    /// without a store query.
    last_bundle: std::sync::atomic::AtomicI64,
    config_path: Option<PathBuf>,
    started: Instant,
}

#[derive(Clone)]
struct Bootstrap {
    store: config::StoreConfig,
    admin: Option<config::AdminConfig>,
    /// Pinned so that nothing applied at run time — not even a signed bundle — can drop
    /// the signature requirement or swap the trusted keys.
    bundles: config::BundlesConfig,
    pull: Option<config::PullConfig>,
}

impl Bootstrap {
    fn of(config: &Config) -> Bootstrap {
        Bootstrap {
            store: config.store.clone(),
            admin: config.admin.clone(),
            bundles: config.bundles.clone(),
            pull: config.pull.clone(),
        }
    }

    fn pin(&self, config: &mut Config) {
        config.store = self.store.clone();
        config.admin = self.admin.clone();
        config.bundles = self.bundles.clone();
        config.pull = self.pull.clone();
    }

    fn matches(&self, config: &Config) -> bool {
        config.store == self.store
            && config.admin == self.admin
            && config.bundles == self.bundles
            && config.pull == self.pull
    }
}

/// Where the store lives: `store.path`, relative to the config file's directory. With no
/// config file (`gatehouse proxy`), an in-memory store.
pub fn store_path(config: &Config, config_path: Option<&Path>) -> Option<PathBuf> {
    let config_path = config_path?;
    let path = Path::new(&config.store.path);
    Some(if path.is_absolute() {
        path.to_path_buf()
    } else {
        config_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(path)
    })
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest.iter() {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The canonical stored form of a config and its content hash.
fn canonical(config: &Config) -> Result<(String, String), ControlError> {
    let json = serde_json::to_string(config)?;
    let hash = sha256_hex(json.as_bytes());
    Ok((json, hash))
}

fn parse_stored(version: i64, json: &str) -> Result<Config, ControlError> {
    config::parse_str(json, Format::Json, std::iter::empty())
        .map_err(|errors| ControlError::StoredInvalid { version, errors })
}

impl Control {
    /// Opens the store, decides which config runs (see `StoreMode`), starts the gateway on
    /// it and records it. `file_config` is the file as loaded at start.
    pub async fn start(
        file_config: Config,
        config_path: Option<PathBuf>,
    ) -> Result<Arc<Control>, ControlError> {
        let bootstrap = Bootstrap::of(&file_config);
        let path = store_path(&file_config, config_path.as_deref());
        let mut store = Store::open(path.as_deref())?;
        tracing::info!(store = %store.path(), mode = ?bootstrap.store.mode, "config store opened");
        let head = store.head()?;
        let (file_json, file_hash) = canonical(&file_config)?;
        // The config to run, and the stored version it already is (if any).
        let (config, json, hash, existing, action, message) = match (bootstrap.store.mode, head) {
            (StoreMode::Store, Some((info, stored))) => {
                let mut config = parse_stored(info.version, &stored)?;
                bootstrap.pin(&mut config);
                let (json, hash) = canonical(&config)?;
                if hash == info.hash {
                    tracing::info!(
                        version = info.version,
                        "store mode: running the newest stored version"
                    );
                    (config, json, hash, Some(info), "", "")
                } else {
                    (config, json, hash, None, "start", "store mode: newest stored version with the file's store and admin settings")
                }
            }
            (StoreMode::File, Some((info, _))) if info.hash == file_hash => {
                (file_config, file_json, file_hash, Some(info), "", "")
            }
            (StoreMode::File, Some((info, _))) => {
                if info.author != "file" {
                    tracing::warn!(
                        version = info.version,
                        author = %info.author,
                        "file mode: the config file replaces the newest stored version, which was changed through the admin API"
                    );
                }
                (
                    file_config,
                    file_json,
                    file_hash,
                    None,
                    "start",
                    "file mode: the config file differs from the newest stored version",
                )
            }
            (_, None) => (
                file_config,
                file_json,
                file_hash,
                None,
                "seed",
                "first start: seeded from the config file",
            ),
        };
        let last_bundle = store.last_bundle_version()?;
        let gateway = Arc::new(Gateway::start(config.clone(), config_path.clone()).await?);
        let info = match existing {
            Some(info) => info,
            None => {
                let tx = store.begin()?;
                let info = store::insert_version(
                    &tx,
                    &store::NewVersion {
                        hash: &hash,
                        config_json: &json,
                        actor: "file",
                        action,
                        message,
                        before: None,
                    },
                )?;
                tx.commit().map_err(StoreError::from)?;
                info
            }
        };
        tracing::info!(version = info.version, hash = %info.hash, "config version running");
        Ok(Arc::new(Control {
            gateway,
            store: Mutex::new(store),
            current: Mutex::new(Arc::new(Current {
                info,
                config: Arc::new(config),
            })),
            auth: Mutex::new(Arc::new(auth::Auth::new(
                bootstrap.admin.as_ref().unwrap_or(&config::AdminConfig {
                    bind: String::new(),
                    tokens: Vec::new(),
                    tls: None,
                }),
            ))),
            bootstrap: parking_lot::RwLock::new(bootstrap),
            guard: Mutex::new(None),
            pull: Mutex::new(pull::PullStatus::default()),
            last_bundle: std::sync::atomic::AtomicI64::new(last_bundle.unwrap_or(0)),
            config_path,
            started: Instant::now(),
        }))
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    pub fn current(&self) -> Arc<Current> {
        self.current.lock().clone()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn admin_config(&self) -> Option<config::AdminConfig> {
        self.bootstrap.read().admin.clone()
    }

    /// The last guarded apply (`guard`), if any.
    pub fn guard(&self) -> Option<guard::GuardStatus> {
        self.guard.lock().clone()
    }

    pub(crate) fn set_guard(&self, status: guard::GuardStatus) {
        *self.guard.lock() = Some(status);
    }

    /// The admin API's credentials now (tokens rotate on SIGHUP).
    pub fn auth(&self) -> Arc<auth::Auth> {
        self.auth.lock().clone()
    }

    pub fn mode(&self) -> StoreMode {
        self.bootstrap.read().store.mode
    }

    /// Parses and validates a config submitted through the API. Environment overrides do
    /// not apply (they are for the file); `store` and `admin` may be repeated unchanged.
    pub fn parse_submitted(&self, text: &str, format: Format) -> Result<Config, ControlError> {
        let mut config =
            config::parse_str(text, format, std::iter::empty()).map_err(ControlError::Invalid)?;
        let raw: Option<serde_json::Value> = match format {
            Format::Json => serde_json::from_str(text).ok(),
            Format::Toml => toml::from_str(text).ok(),
        };
        let present = |key: &str| raw.as_ref().is_some_and(|raw| raw.get(key).is_some());
        let bootstrap = self.bootstrap.read().clone();
        let changed = [
            ("store", config.store != bootstrap.store),
            ("admin", config.admin != bootstrap.admin),
            ("bundles", config.bundles != bootstrap.bundles),
            ("pull", config.pull != bootstrap.pull),
        ];
        let errors: Vec<ConfigError> = changed
            .into_iter()
            .filter(|&(key, changed)| changed && present(key))
            .map(|(key, _)| ConfigError {
                path: key.into(),
                message: "a bootstrap setting: change it in the config file and restart".into(),
            })
            .collect();
        if !errors.is_empty() {
            return Err(ControlError::Invalid(ConfigErrors(errors)));
        }
        bootstrap.pin(&mut config);
        Ok(config)
    }

    /// Compiles `config` without running it: the checks an apply makes short of binding
    /// sockets.
    pub fn check(&self, config: &Config) -> Result<(), ControlError> {
        let registries = crate::snapshot::Registries::default();
        crate::snapshot::compile(config.clone(), 0, &registries)
            .map(drop)
            .map_err(|err| ControlError::Rejected(GatewayError::Compile(err)))
    }

    /// Applies a config as a new version (see the module comment for the order of writes).
    /// Counted in `gatehouse_config_reloads_total`, like rollbacks and SIGHUP reloads.
    pub fn apply(&self, config: Config, change: &Change<'_>) -> Result<Outcome, ControlError> {
        let result = self.apply_unrecorded(config, change);
        self.record(&result);
        result
    }

    fn apply_unrecorded(
        &self,
        config: Config,
        change: &Change<'_>,
    ) -> Result<Outcome, ControlError> {
        let mut store = self.store.lock();
        self.apply_locked(&mut store, config, change)
    }

    /// Counts a config change attempt and its result for the metrics.
    fn record<T>(&self, result: &Result<T, ControlError>) {
        self.gateway.metrics().reload(result.is_ok());
    }

    /// Applies the config of a stored version as a new version.
    pub fn rollback(&self, version: i64, change: &Change<'_>) -> Result<Outcome, ControlError> {
        let result = self.rollback_unrecorded(version, change);
        self.record(&result);
        result
    }

    fn rollback_unrecorded(
        &self,
        version: i64,
        change: &Change<'_>,
    ) -> Result<Outcome, ControlError> {
        let mut store = self.store.lock();
        let (_, json) = store
            .get(version)?
            .ok_or(ControlError::UnknownVersion(version))?;
        let mut config = parse_stored(version, &json)?;
        // An old version may carry other bootstrap settings; they cannot change at run time.
        self.bootstrap.read().pin(&mut config);
        self.apply_locked(&mut store, config, change)
    }

    /// Edits the running config as a new version: `edit` changes a copy of it, which is then
    /// validated like a submitted config (errors carry field paths) and applied with the
    /// usual order of writes. The copy is taken under the apply lock, so two edits never
    /// lose each other's change.
    /// `edit` may return a value (whether it created something, say), handed back with the
    /// outcome. `If-Match` is checked before `edit` runs.
    pub fn edit<T>(
        &self,
        change: &Change<'_>,
        edit: impl FnOnce(&mut Config) -> Result<T, ControlError>,
    ) -> Result<(Outcome, T), ControlError> {
        let result = self.edit_unrecorded(change, edit);
        self.record(&result);
        result
    }

    fn edit_unrecorded<T>(
        &self,
        change: &Change<'_>,
        edit: impl FnOnce(&mut Config) -> Result<T, ControlError>,
    ) -> Result<(Outcome, T), ControlError> {
        let mut store = self.store.lock();
        let current = self.current();
        if let Some(expected) = change.if_match {
            if expected != current.info.version {
                return Err(ControlError::Stale {
                    expected,
                    current: current.info.version,
                });
            }
        }
        let mut config = (*current.config).clone();
        let value = edit(&mut config)?;
        let json = serde_json::to_string(&config)?;
        let mut config = config::parse_str(&json, Format::Json, std::iter::empty())
            .map_err(ControlError::Invalid)?;
        self.bootstrap.read().pin(&mut config);
        let outcome = self.apply_locked(&mut store, config, change)?;
        Ok((outcome, value))
    }

    /// Sets a listener's `max_connections` (SPEC CONN-3) as a new stored version, so the
    /// change is audited and survives a restart in store mode; 0 means unlimited.
    pub fn set_max_connections(
        &self,
        listener: &str,
        limit: u32,
        change: &Change<'_>,
    ) -> Result<Outcome, ControlError> {
        self.edit(change, |config| {
            let entry = config
                .listeners
                .iter_mut()
                .find(|entry| entry.name == listener)
                .ok_or_else(|| ControlError::UnknownName {
                    kind: "listener",
                    name: listener.to_string(),
                })?;
            entry.max_connections = limit;
            Ok(())
        })
        .map(|(outcome, ())| outcome)
    }

    /// Takes `admin.tokens` from a re-read file when they changed and the admin listener
    /// itself (`bind`, `tls`) did not: token rotation without a restart (SPEC CTRL-5).
    /// Returns whether the tokens changed.
    fn rotate_tokens(&self, file: &Config) -> bool {
        let mut bootstrap = self.bootstrap.write();
        let (Some(running), Some(new)) = (bootstrap.admin.as_mut(), file.admin.as_ref()) else {
            return false;
        };
        if running.tokens == new.tokens || running.bind != new.bind || running.tls != new.tls {
            return false;
        }
        running.tokens = new.tokens.clone();
        *self.auth.lock() = Arc::new(auth::Auth::new(running));
        tracing::info!(
            tokens = running.tokens.len(),
            "admin tokens rotated from the config file"
        );
        true
    }

    /// SIGHUP: in file mode, re-read the file and apply it; in store mode, refuse — except
    /// that in both modes changed `admin.tokens` are taken from the file (token rotation),
    /// in store mode as a new stored version of the running config.
    pub fn reload(&self) -> Result<Outcome, ControlError> {
        let result = self.reload_unrecorded();
        self.record(&result);
        result
    }

    fn reload_unrecorded(&self) -> Result<Outcome, ControlError> {
        let path = self
            .config_path
            .as_ref()
            .ok_or(ControlError::NoConfigFile)?;
        let mut config = config::load_file(path).map_err(ControlError::Invalid)?;
        let rotated = self.rotate_tokens(&config);
        if self.mode() == StoreMode::Store {
            if !rotated {
                return Err(ControlError::ReloadInStoreMode);
            }
            tracing::info!("store mode: only admin.tokens were taken from the file");
            let (outcome, ()) = self.edit_unrecorded(
                &Change {
                    actor: "file",
                    action: "rotate_tokens",
                    message: "SIGHUP: admin tokens rotated from the config file",
                    if_match: None,
                },
                |_| Ok(()),
            )?;
            return Ok(outcome);
        }
        let bootstrap = self.bootstrap.read().clone();
        if !bootstrap.matches(&config) {
            tracing::warn!("store and admin changes take effect at the next restart");
            bootstrap.pin(&mut config);
        }
        let outcome = self.apply_unrecorded(
            config,
            &Change {
                actor: "file",
                action: "reload",
                message: "SIGHUP: config file re-read",
                if_match: None,
            },
        )?;
        if !outcome.changed {
            // Same config, but the files it names may have been replaced (renewed
            // certificates, a new GeoIP database): SIGHUP reloads them, as nginx does.
            self.gateway
                .reload_files()
                .map_err(ControlError::Rejected)?;
        }
        Ok(outcome)
    }

    /// The bundle settings the process started with (`[bundles]` is a bootstrap setting).
    pub fn bundle_settings(&self) -> config::BundlesConfig {
        self.bootstrap.read().bundles.clone()
    }

    /// `[pull]` as started, with `ca` resolved against the config file's directory.
    pub fn pull_config(&self) -> Option<config::PullConfig> {
        let mut pull = self.bootstrap.read().pull.clone()?;
        if let (Some(ca), Some(dir)) = (
            pull.ca.as_ref(),
            self.config_path.as_deref().and_then(Path::parent),
        ) {
            if Path::new(ca).is_relative() {
                pull.ca = Some(dir.join(ca).display().to_string());
            }
        }
        Some(pull)
    }

    pub fn pull_status(&self) -> pull::PullStatus {
        self.pull.lock().clone()
    }

    pub(crate) fn update_pull_status(&self, update: impl FnOnce(&mut pull::PullStatus)) {
        update(&mut self.pull.lock());
    }

    /// The highest bundle version applied so far.
    pub fn last_bundle_version(&self) -> Option<i64> {
        let version = self.last_bundle.load(std::sync::atomic::Ordering::Acquire);
        (version > 0).then_some(version)
    }

    /// Applies a bundle file (SPEC CTRL-8): parse, verify the signature against the
    /// trusted keys, refuse a version not newer than the last applied bundle, validate the
    /// config like a submitted one, then apply it through the usual store-first path with
    /// the bundle recorded in the same transaction. Any refusal changes nothing.
    pub fn apply_bundle(&self, text: &str, change: &Change<'_>) -> Result<Outcome, ControlError> {
        let result = self.apply_bundle_unrecorded(text, change);
        self.record(&result);
        result
    }

    fn apply_bundle_unrecorded(
        &self,
        text: &str,
        change: &Change<'_>,
    ) -> Result<Outcome, ControlError> {
        let bundle = bundle::Bundle::parse(text)?;
        let key_name = bundle.verify(&self.bundle_settings())?;
        let config = self.parse_submitted(&bundle.config, Format::Json)?;
        let mut store = self.store.lock();
        if let Some(last) = store.last_bundle_version()? {
            if bundle.version <= last {
                return Err(bundle::BundleError::Replay {
                    version: bundle.version,
                    last,
                }
                .into());
            }
        }
        let message = if change.message.is_empty() {
            format!(
                "bundle {} by {} ({}){}",
                bundle.version,
                bundle.author,
                bundle.created,
                key_name.as_deref().map_or_else(
                    || ", unsigned".to_string(),
                    |key| format!(", signed by {key}")
                )
            )
        } else {
            change.message.to_string()
        };
        let change = Change {
            message: &message,
            ..*change
        };
        let record = |tx: &rusqlite::Transaction<'_>, config_version: i64| {
            store::record_bundle(
                tx,
                &store::AppliedBundle {
                    version: bundle.version,
                    config_version,
                    author: &bundle.author,
                    created: &bundle.created,
                    key_name: key_name.as_deref(),
                },
            )
        };
        let outcome = self.apply_locked_with(&mut store, config, &change, Some(&record))?;
        if !outcome.changed {
            // Same config as running: still remember the bundle, so an older one cannot
            // be replayed over it later.
            let tx = store.begin()?;
            record(&tx, outcome.info.version)?;
            tx.commit().map_err(StoreError::from)?;
        }
        self.last_bundle
            .store(bundle.version, std::sync::atomic::Ordering::Release);
        tracing::info!(
            bundle = bundle.version,
            author = %bundle.author,
            key = key_name.as_deref().unwrap_or("-"),
            version = outcome.info.version,
            "bundle applied"
        );
        Ok(outcome)
    }

    fn apply_locked(
        &self,
        store: &mut Store,
        config: Config,
        change: &Change<'_>,
    ) -> Result<Outcome, ControlError> {
        self.apply_locked_with(store, config, change, None)
    }

    /// `apply_locked`, with `extra` written into the version's transaction before the
    /// swap (a bundle record).
    #[allow(clippy::type_complexity)]
    fn apply_locked_with(
        &self,
        store: &mut Store,
        config: Config,
        change: &Change<'_>,
        extra: Option<&dyn Fn(&rusqlite::Transaction<'_>, i64) -> Result<(), StoreError>>,
    ) -> Result<Outcome, ControlError> {
        let before = self.current();
        if let Some(expected) = change.if_match {
            if expected != before.info.version {
                return Err(ControlError::Stale {
                    expected,
                    current: before.info.version,
                });
            }
        }
        let (json, hash) = canonical(&config)?;
        if hash == before.info.hash {
            return Ok(Outcome {
                info: before.info.clone(),
                changed: false,
                previous_version: None,
            });
        }
        let tx = store.begin()?;
        let info = store::insert_version(
            &tx,
            &store::NewVersion {
                hash: &hash,
                config_json: &json,
                actor: change.actor,
                action: change.action,
                message: change.message,
                before: Some((before.info.version, &before.info.hash)),
            },
        )?;
        if let Some(extra) = extra {
            extra(&tx, info.version)?;
        }
        // On error the transaction is dropped, which rolls it back: nothing changed.
        self.gateway
            .apply(config.clone())
            .map_err(ControlError::Rejected)?;
        if let Err(err) = tx.commit() {
            // Memory is ahead of the store; put back the version the store still has, so
            // the running config is always the last committed one.
            if let Err(restore) = self.gateway.apply((*before.config).clone()) {
                tracing::error!(error = %restore, "cannot restore the previous config after a failed store commit");
            }
            return Err(StoreError::from(err).into());
        }
        tracing::info!(
            version = info.version,
            actor = %change.actor,
            action = %change.action,
            "config version committed"
        );
        *self.current.lock() = Arc::new(Current {
            info: info.clone(),
            config: Arc::new(config),
        });
        Ok(Outcome {
            info,
            changed: true,
            previous_version: Some(before.info.version),
        })
    }

    /// An online backup of the store to `dest`. Holds the apply lock while it copies, so
    /// the copy always ends on a committed change.
    pub fn backup(&self, dest: &Path) -> Result<(), ControlError> {
        Ok(self.store.lock().backup(dest)?)
    }

    pub fn versions(&self, limit: u32) -> Result<Vec<VersionInfo>, ControlError> {
        Ok(self.store.lock().versions(limit)?)
    }

    pub fn audit(&self, limit: u32) -> Result<Vec<AuditRecord>, ControlError> {
        Ok(self.store.lock().audit(limit)?)
    }

    /// A stored version with its config.
    pub fn version(&self, version: i64) -> Result<(VersionInfo, Config), ControlError> {
        let (info, json) = self
            .store
            .lock()
            .get(version)?
            .ok_or(ControlError::UnknownVersion(version))?;
        let config = parse_stored(version, &json)?;
        Ok((info, config))
    }
}

/// SIGHUP handler for `ops`: reload through the control plane and log the outcome.
pub fn reload_and_log(control: &Control) {
    match control.reload() {
        Ok(outcome) => tracing::info!(
            version = outcome.info.version,
            changed = outcome.changed,
            "reload succeeded"
        ),
        Err(ControlError::Invalid(errors)) => {
            for error in &errors.0 {
                tracing::error!(error = %error, "reload rejected; keeping the running configuration");
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "reload rejected; keeping the running configuration")
        }
    }
}
