//! ACME (RFC 8555, SPEC TLS-3): obtains and renews the certificates `acme.certificates`
//! lists, answering TLS-ALPN-01 on the TLS listeners or HTTP-01 on the plain ones through
//! the `CertStore`, caches the account and certificates on disk, and reports each
//! certificate's status. The protocol itself is the `instant-acme` crate's.
//!
//! One task runs the whole schedule. Each certificate is checked every second against its
//! expiry and the config in force (so a reload changes the list at once); one that is
//! missing or inside `renew_before` is ordered, at most once per `check_interval` after a
//! success, and after a failure again after `retry_min`, doubling up to `retry_max`. The
//! certificate in use keeps serving whatever happens to an order.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use parking_lot::Mutex;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::{AcmeCertificate, AcmeChallenge, AcmeConfig};
use crate::snapshot::Publisher;
use crate::tls::{certified_from_pem, CertStore, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("the ACME server offers no {challenge} challenge for {name}")]
    NoChallenge {
        name: String,
        challenge: &'static str,
    },
    #[error("authorization for {name} is {status:?}")]
    Authorization {
        name: String,
        status: AuthorizationStatus,
    },
    #[error("order ended {0:?} instead of ready")]
    Order(OrderStatus),
    #[error("cache {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("account credentials in {path}: {message}")]
    Credentials { path: String, message: String },
    #[error("validation certificate: {0}")]
    ChallengeCert(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What an operator (admin API, `gatehouse ctl`) sees of one ACME certificate.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AcmeStatus {
    pub names: Vec<String>,
    pub issuer: Option<String>,
    /// Seconds since the Unix epoch.
    pub not_after: Option<i64>,
    /// When the next order is due (renewal window, or the retry after a failure).
    pub next_renewal: Option<i64>,
    pub last_error: Option<String>,
    /// Orders completed since start.
    pub issued: u64,
}

/// Status of every ACME certificate, kept across reloads.
#[derive(Default)]
pub struct AcmeRegistry {
    status: Mutex<BTreeMap<String, AcmeStatus>>,
}

impl AcmeRegistry {
    pub fn status(&self) -> Vec<AcmeStatus> {
        self.status.lock().values().cloned().collect()
    }

    fn update(&self, key: &str, names: &[String], change: impl FnOnce(&mut AcmeStatus)) {
        let mut all = self.status.lock();
        let entry = all.entry(key.to_string()).or_insert_with(|| AcmeStatus {
            names: names.to_vec(),
            ..AcmeStatus::default()
        });
        change(entry);
    }

    fn retain(&self, keys: &[String]) {
        self.status.lock().retain(|key, _| keys.contains(key));
    }
}

/// Schedule state of one certificate.
struct Slot {
    not_after: Option<i64>,
    next_attempt: Instant,
    backoff: Duration,
    loaded_cache: bool,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn wall_clock_of(at: Instant) -> i64 {
    unix_now() + at.saturating_duration_since(Instant::now()).as_secs() as i64
}

fn key_of(cert: &AcmeCertificate) -> String {
    cert.names
        .iter()
        .map(|n| n.to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts the ACME task; it ends with the publisher.
pub fn spawn(publisher: Weak<Publisher>) {
    tokio::spawn(async move {
        let mut slots: HashMap<String, Slot> = HashMap::new();
        let mut accounts: HashMap<String, Account> = HashMap::new();
        loop {
            let Some(strong) = publisher.upgrade() else {
                return;
            };
            let snapshot = strong.load();
            if let Some(acme) = snapshot.config.acme.clone() {
                let certs = strong.registries.certs.clone();
                drop(strong);
                run_once(&acme, &certs, &publisher, &mut slots, &mut accounts).await;
            } else {
                drop(strong);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

async fn run_once(
    acme: &AcmeConfig,
    certs: &Arc<CertStore>,
    publisher: &Weak<Publisher>,
    slots: &mut HashMap<String, Slot>,
    accounts: &mut HashMap<String, Account>,
) {
    let keys: Vec<String> = acme.certificates.iter().map(key_of).collect();
    slots.retain(|key, _| keys.contains(key));
    if let Some(strong) = publisher.upgrade() {
        strong.registries.acme.retain(&keys);
    }
    let cache = PathBuf::from(&acme.cache_dir);
    for (cert, key) in acme.certificates.iter().zip(&keys) {
        let names: Vec<String> = cert.names.iter().map(|n| n.to_ascii_lowercase()).collect();
        let slot = slots.entry(key.clone()).or_insert_with(|| Slot {
            not_after: None,
            next_attempt: Instant::now(),
            backoff: acme.retry_min.0,
            loaded_cache: false,
        });
        let registry = |change: &dyn Fn(&mut AcmeStatus)| {
            if let Some(strong) = publisher.upgrade() {
                strong.registries.acme.update(key, &names, change);
            }
        };
        if !slot.loaded_cache {
            slot.loaded_cache = true;
            match load_cached(&cache, key) {
                Ok(Some((certified, info))) => {
                    certs.install_managed(&names, certified);
                    slot.not_after = Some(info.not_after);
                    tracing::info!(names = %key, not_after = info.not_after, "acme: loaded cached certificate");
                    registry(&|status| {
                        status.issuer = Some(info.issuer.clone());
                        status.not_after = Some(info.not_after);
                    });
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(names = %key, error = %err, "acme: cached certificate unusable; ordering a new one")
                }
            }
        }
        let renew_at = slot
            .not_after
            .map(|not_after| not_after - acme.renew_before.0.as_secs() as i64);
        let due = renew_at.is_none_or(|at| at <= unix_now());
        if !due {
            let at = renew_at.unwrap_or_default();
            registry(&|status| status.next_renewal = Some(at));
            continue;
        }
        if Instant::now() < slot.next_attempt {
            continue;
        }
        tracing::info!(names = %key, "acme: ordering a certificate");
        match order(acme, &cache, &names, certs, accounts).await {
            Ok((certified, chain, key_pem, info)) => {
                if let Err(err) = store_cached(&cache, key, &chain, &key_pem) {
                    tracing::warn!(names = %key, error = %err, "acme: cannot cache the certificate");
                }
                certs.install_managed(&names, certified);
                slot.not_after = Some(info.not_after);
                slot.backoff = acme.retry_min.0;
                slot.next_attempt = Instant::now() + acme.check_interval.0;
                let next = (info.not_after - acme.renew_before.0.as_secs() as i64)
                    .max(wall_clock_of(slot.next_attempt));
                tracing::info!(names = %key, not_after = info.not_after, issuer = %info.issuer, "acme: certificate installed");
                registry(&|status| {
                    status.issuer = Some(info.issuer.clone());
                    status.not_after = Some(info.not_after);
                    status.next_renewal = Some(next);
                    status.last_error = None;
                    status.issued += 1;
                });
            }
            Err(err) => {
                let wait = slot.backoff;
                slot.next_attempt = Instant::now() + wait;
                slot.backoff = (wait * 2).min(acme.retry_max.0.max(acme.retry_min.0));
                tracing::warn!(names = %key, error = %err, retry_in = ?wait, "acme: order failed; the current certificate keeps serving");
                let message = err.to_string();
                let next = wall_clock_of(slot.next_attempt);
                registry(&|status| {
                    status.last_error = Some(message.clone());
                    status.next_renewal = Some(next);
                });
            }
        }
    }
}

type Issued = (Arc<CertifiedKey>, String, String, crate::tls::LeafInfo);

/// One whole order: account, authorizations with their challenges, finalization.
async fn order(
    acme: &AcmeConfig,
    cache: &Path,
    names: &[String],
    certs: &CertStore,
    accounts: &mut HashMap<String, Account>,
) -> Result<Issued, AcmeError> {
    let account = match accounts.get(&acme.directory) {
        Some(account) => account.clone(),
        None => {
            let account = account(acme, cache).await?;
            accounts.insert(acme.directory.clone(), account.clone());
            account
        }
    };
    let identifiers: Vec<Identifier> = names.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let mut cleanup = Cleanup {
        certs,
        alpn: Vec::new(),
        http: Vec::new(),
    };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        let name = authorization.identifier().to_string();
        match authorization.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            status => return Err(AcmeError::Authorization { name, status }),
        }
        let (kind, label) = match acme.challenge {
            AcmeChallenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
            AcmeChallenge::Http01 => (ChallengeType::Http01, "http-01"),
        };
        let mut challenge =
            authorization
                .challenge(kind)
                .ok_or_else(|| AcmeError::NoChallenge {
                    name: name.clone(),
                    challenge: label,
                })?;
        let key_authorization = challenge.key_authorization();
        match acme.challenge {
            AcmeChallenge::TlsAlpn01 => {
                let cert = validation_cert(&name, key_authorization.digest().as_ref())?;
                certs.set_alpn_challenge(&name, Some(cert));
                cleanup.alpn.push(name.clone());
            }
            AcmeChallenge::Http01 => {
                let token = challenge.token.clone();
                certs.set_http_challenge(&token, Some(key_authorization.as_str().to_string()));
                cleanup.http.push(token);
            }
        }
        challenge.set_ready().await?;
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(Duration::from_secs(90));
    let status = order.poll_ready(&retries).await?;
    if status != OrderStatus::Ready {
        return Err(AcmeError::Order(status));
    }
    let key_pem = order.finalize().await?;
    let chain = order.poll_certificate(&retries).await?;
    drop(cleanup);
    let label = format!("ACME certificate for {}", names.join(","));
    let (certified, info) = certified_from_pem(&label, chain.as_bytes(), key_pem.as_bytes())?;
    Ok((certified, chain, key_pem, info))
}

/// Removes an order's challenge answers however the order ends.
struct Cleanup<'a> {
    certs: &'a CertStore,
    alpn: Vec<String>,
    http: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for name in &self.alpn {
            self.certs.set_alpn_challenge(name, None);
        }
        for token in &self.http {
            self.certs.set_http_challenge(token, None);
        }
    }
}

/// The RFC 8737 validation certificate: self-signed for `name`, with the
/// `acmeIdentifier` extension holding the key authorization's digest.
fn validation_cert(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let fail = |err: rcgen::Error| AcmeError::ChallengeCert(err.to_string());
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(fail)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki,
    // which refuses the critical acmeIdentifier extension; the pair is ours anyway.
    let signing_key = crate::tls::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|err| AcmeError::ChallengeCert(err.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    )))
}

/// The account for `acme.directory`: from the cache, or created (and cached) once.
async fn account(acme: &AcmeConfig, cache: &Path) -> Result<Account, AcmeError> {
    let path = cache.join(format!(
        "account-{}.json",
        &crate::control::sha256_hex(acme.directory.as_bytes())[..16]
    ));
    let builder = || match &acme.directory_ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        let credentials: AccountCredentials =
            serde_json::from_str(&text).map_err(|err| AcmeError::Credentials {
                path: path.display().to_string(),
                message: err.to_string(),
            })?;
        return Ok(builder()?.from_credentials(credentials).await?);
    }
    let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
    let (account, credentials) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            acme.directory.clone(),
            None,
        )
        .await?;
    let json = serde_json::to_string(&credentials).map_err(|err| AcmeError::Credentials {
        path: path.display().to_string(),
        message: err.to_string(),
    })?;
    write_private(&path, json.as_bytes())?;
    tracing::info!(directory = %acme.directory, "acme: account created");
    Ok(account)
}

fn cache_paths(cache: &Path, key: &str) -> (PathBuf, PathBuf) {
    // The key is a list of DNS names: letters, digits, dots, hyphens and commas.
    let base: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (
        cache.join(format!("{base}.crt")),
        cache.join(format!("{base}.key")),
    )
}

fn load_cached(
    cache: &Path,
    key: &str,
) -> Result<Option<(Arc<CertifiedKey>, crate::tls::LeafInfo)>, AcmeError> {
    let (cert_path, key_path) = cache_paths(cache, key);
    let (Ok(chain), Ok(key_pem)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) else {
        return Ok(None);
    };
    let label = cert_path.display().to_string();
    Ok(Some(certified_from_pem(&label, &chain, &key_pem)?))
}

fn store_cached(cache: &Path, key: &str, chain: &str, key_pem: &str) -> Result<(), AcmeError> {
    let (cert_path, key_path) = cache_paths(cache, key);
    write_private(&key_path, key_pem.as_bytes())?;
    write_private(&cert_path, chain.as_bytes())
}

/// Writes through a temporary file and a rename, readable by the owner only: a crash never
/// leaves half a key, and the key is never world-readable.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let cache_error = |source| AcmeError::Cache {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(cache_error)?;
    }
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(cache_error)?;
    file.write_all(bytes).map_err(cache_error)?;
    file.sync_all().map_err(cache_error)?;
    std::fs::rename(&temporary, path).map_err(cache_error)
}
