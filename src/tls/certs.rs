//! Certificates by SNI: loading PEM files (pair matches, not expired), the name table
//! handshakes pick from, and the file watch that swaps in changed files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::{provider, TlsError};
use crate::config::CertificateConfig;

/// A certificate is reported as close to expiry this long before `not_after`.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// One loaded certificate, for status reports.
#[derive(Clone, Debug)]
pub struct LoadedCert {
    pub cert_path: String,
    pub names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
}

/// The names → certificate map one set of files produced.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`: a wildcard covers exactly one more label.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    pub loaded: Vec<LoadedCert>,
}

impl CertTable {
    /// Reads and checks every certificate; any error rejects the whole set.
    pub fn load(configs: &[CertificateConfig]) -> Result<CertTable, TlsError> {
        let provider = provider();
        let mut table = CertTable::default();
        for config in configs {
            let chain = read_certs(&config.cert)?;
            let Some(leaf) = chain.first() else {
                return Err(TlsError::NoCertificate {
                    path: config.cert.clone(),
                });
            };
            let (not_after, san_names) = inspect_leaf(&config.cert, leaf)?;
            let key = read_key(&config.key)?;
            let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|source| {
                TlsError::KeyMismatch {
                    cert: config.cert.clone(),
                    key: config.key.clone(),
                    source,
                }
            })?;
            let certified = Arc::new(certified);
            let names = if config.names.is_empty() {
                san_names
            } else {
                config
                    .names
                    .iter()
                    .map(|n| n.to_ascii_lowercase())
                    .collect()
            };
            if names.is_empty() && !config.default {
                return Err(TlsError::NoNames {
                    path: config.cert.clone(),
                });
            }
            for name in &names {
                match name.strip_prefix("*.") {
                    Some(suffix) => table.wildcard.entry(suffix.to_string()),
                    None => table.exact.entry(name.clone()),
                }
                .or_insert_with(|| certified.clone());
            }
            if config.default || table.default.is_none() {
                table.default = Some(certified.clone());
            }
            table.loaded.push(LoadedCert {
                cert_path: config.cert.clone(),
                names,
                not_after,
            });
        }
        Ok(table)
    }

    /// The certificate for `name` (lower-case), if one covers it.
    pub fn lookup(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(cert) = self.exact.get(name) {
            return Some(cert);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }

    pub fn has_default(&self) -> bool {
        self.default.is_some()
    }
}

/// Modification time and length of a file, to notice replacements.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp(Option<SystemTime>, u64);

fn stamp(path: &str) -> FileStamp {
    match std::fs::metadata(path) {
        Ok(meta) => FileStamp(meta.modified().ok(), meta.len()),
        Err(_) => FileStamp(None, 0),
    }
}

struct Sources {
    configs: Vec<CertificateConfig>,
    stamps: Vec<FileStamp>,
}

impl Sources {
    fn new(configs: &[CertificateConfig]) -> Sources {
        let stamps = configs
            .iter()
            .flat_map(|c| [stamp(&c.cert), stamp(&c.key)])
            .collect();
        Sources {
            configs: configs.to_vec(),
            stamps,
        }
    }
}

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Certificates obtained by ACME, and the challenge answers of orders in progress.
#[derive(Default)]
struct Managed {
    /// Exact name → certificate. Static certificates win for a name in both.
    certs: HashMap<String, Arc<CertifiedKey>>,
    /// Names ACME manages, with or without a certificate yet: a handshake for one is
    /// terminated (that is how TLS-ALPN-01 validation reaches us).
    names: std::collections::HashSet<String>,
    /// TLS-ALPN-01: name → self-signed validation certificate.
    alpn_challenges: HashMap<String, Arc<CertifiedKey>>,
    /// HTTP-01: token → key authorization.
    http_challenges: HashMap<String, String>,
}

/// The live certificate table and where it came from. Outlives snapshots.
pub struct CertStore {
    table: ArcSwap<CertTable>,
    sources: Mutex<Sources>,
    managed: parking_lot::RwLock<Managed>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

impl Default for CertStore {
    fn default() -> Self {
        CertStore {
            table: ArcSwap::from_pointee(CertTable::default()),
            sources: Mutex::new(Sources::new(&[])),
            managed: parking_lot::RwLock::new(Managed::default()),
        }
    }
}

impl CertStore {
    /// Makes `table` (loaded from `configs`) the one new handshakes use. Established
    /// connections keep the certificate they were set up with.
    pub fn install(&self, table: Arc<CertTable>, configs: &[CertificateConfig]) {
        *self.sources.lock() = Sources::new(configs);
        self.table.store(table);
    }

    pub fn current(&self) -> Arc<CertTable> {
        self.table.load_full()
    }

    /// Whether a handshake naming `sni` would be served a certificate (exact, wildcard,
    /// ACME-managed, or the default).
    pub fn covers(&self, sni: Option<&str>, use_default: bool) -> bool {
        let table = self.table.load();
        match sni {
            Some(name) if table.lookup(name).is_some() => true,
            Some(name) if self.managed.read().names.contains(name) => true,
            _ => use_default && table.default.is_some(),
        }
    }

    /// Chooses the certificate for one handshake: a TLS-ALPN-01 validation certificate
    /// when the client offers only `acme-tls/1`, else a static certificate for the name, an
    /// ACME one, then the default.
    pub fn resolve<'a>(
        &self,
        sni: Option<&str>,
        alpn: Option<impl Iterator<Item = &'a [u8]>>,
    ) -> Option<Arc<CertifiedKey>> {
        let name = sni.map(str::to_ascii_lowercase);
        let acme_validation = alpn.is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
        if acme_validation {
            // RFC 8737: answer with the validation certificate or not at all.
            return name
                .as_deref()
                .and_then(|name| self.managed.read().alpn_challenges.get(name).cloned());
        }
        let table = self.table.load();
        if let Some(cert) = name.as_deref().and_then(|name| table.lookup(name)) {
            return Some(cert.clone());
        }
        if let Some(cert) = name
            .as_deref()
            .and_then(|name| self.managed.read().certs.get(name).cloned())
        {
            return Some(cert);
        }
        table.default.clone()
    }

    /// Declares the names ACME manages (a config change replaces the set).
    pub fn set_managed_names(&self, names: impl IntoIterator<Item = String>) {
        let mut managed = self.managed.write();
        managed.names = names.into_iter().collect();
        let names = managed.names.clone();
        managed.certs.retain(|name, _| names.contains(name));
    }

    /// Serves `cert` for `names` from the next handshake on.
    pub fn install_managed(&self, names: &[String], cert: Arc<CertifiedKey>) {
        let mut managed = self.managed.write();
        for name in names {
            managed.certs.insert(name.clone(), cert.clone());
        }
    }

    pub fn set_alpn_challenge(&self, name: &str, cert: Option<Arc<CertifiedKey>>) {
        let mut managed = self.managed.write();
        match cert {
            Some(cert) => managed.alpn_challenges.insert(name.to_string(), cert),
            None => managed.alpn_challenges.remove(name),
        };
    }

    pub fn set_http_challenge(&self, token: &str, key_authorization: Option<String>) {
        let mut managed = self.managed.write();
        match key_authorization {
            Some(value) => managed.http_challenges.insert(token.to_string(), value),
            None => managed.http_challenges.remove(token),
        };
    }

    /// The HTTP-01 answer for `token`, if an order is waiting for it.
    pub fn http_challenge(&self, token: &str) -> Option<String> {
        self.managed.read().http_challenges.get(token).cloned()
    }

    /// Reloads the files when any of them changed since they were last loaded (or
    /// always, with `force`). A set that fails to load leaves the current certificates in
    /// place. Returns whether a new table was installed.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let configs = {
            let sources = self.sources.lock();
            let now: Vec<FileStamp> = sources
                .configs
                .iter()
                .flat_map(|c| [stamp(&c.cert), stamp(&c.key)])
                .collect();
            if !force && now == sources.stamps {
                return Ok(false);
            }
            sources.configs.clone()
        };
        let table = CertTable::load(&configs)?;
        self.install(Arc::new(table), &configs);
        Ok(true)
    }
}

fn read_file(path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(Path::new(path)).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

pub(crate) fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            path: path.into(),
            message: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

pub(crate) fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| match err {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: path.into() },
        other => TlsError::Pem {
            path: path.into(),
            message: other.to_string(),
        },
    })
}

/// Facts about a leaf certificate, for status reports.
pub struct LeafInfo {
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    pub issuer: String,
}

/// Loads a PEM chain and key given as bytes (an ACME order's result or its cached copy):
/// the pair must match and the certificate must not have expired.
pub fn certified_from_pem(
    label: &str,
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Arc<CertifiedKey>, LeafInfo), TlsError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            path: label.into(),
            message: err.to_string(),
        })?;
    let leaf = chain
        .first()
        .ok_or_else(|| TlsError::NoCertificate { path: label.into() })?;
    let (not_after, _) = inspect_leaf(label, leaf)?;
    let issuer = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, cert)| cert.issuer().to_string())
        .unwrap_or_default();
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|err| TlsError::Pem {
        path: label.into(),
        message: err.to_string(),
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|source| {
        TlsError::KeyMismatch {
            cert: label.into(),
            key: label.into(),
            source,
        }
    })?;
    Ok((Arc::new(certified), LeafInfo { not_after, issuer }))
}

/// Expiry (refused when past, warned when close) and DNS names of a leaf certificate.
fn inspect_leaf(path: &str, leaf: &CertificateDer<'_>) -> Result<(i64, Vec<String>), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|err| TlsError::Parse {
        path: path.into(),
        message: err.to_string(),
    })?;
    let not_after = cert.validity().not_after.timestamp();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if not_after < now {
        return Err(TlsError::Expired {
            path: path.into(),
            not_after: cert.validity().not_after.to_string(),
        });
    }
    if not_after - now < EXPIRY_WARNING.as_secs() as i64 {
        tracing::warn!(
            path,
            not_after = %cert.validity().not_after,
            "certificate expires within 30 days"
        );
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    Ok((not_after, names))
}

/// Accepts any server certificate, but still verifies the handshake signature with it:
/// upstream only with `insecure_skip_verify = true` (and the benchmark client).
#[derive(Debug)]
pub struct NoVerification(pub Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
