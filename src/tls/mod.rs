//! TLS with rustls: the certificate store chosen by SNI (hot-reloaded from files), the
//! per-listener server configs (versions, suites, ALPN, client-certificate verification)
//! and the client configs used to re-encrypt to backends.
//!
//! The store is a registry: it outlives snapshots, so a reload that keeps the same
//! certificates keeps the same keys, and a file watch can swap certificates without a
//! config change. ACME (SPEC TLS-3) plugs in through `CertStore::set_managed`.

mod certs;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;

pub use certs::{
    certified_from_pem, CertStore, CertTable, LeafInfo, LoadedCert, NoVerification, ACME_TLS_ALPN,
};

use crate::config::{ClientAuthMode, ListenerTls, TlsVersion, UpstreamTls};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("{path}: no certificate found")]
    NoCertificate { path: String },
    #[error("{path}: no private key found")]
    NoKey { path: String },
    #[error("{cert}: the key in {key} does not match the certificate: {source}")]
    KeyMismatch {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: certificate expired on {not_after}")]
    Expired { path: String, not_after: String },
    #[error("{path}: cannot parse certificate: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: no DNS names in the certificate and none configured")]
    NoNames { path: String },
    #[error("unknown cipher suite {0:?}")]
    UnknownCipherSuite(String),
    #[error("{context}: {source}")]
    Rustls {
        context: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("client certificate CA {path}: {message}")]
    ClientCa { path: String, message: String },
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Picks a certificate from the store's current table for each handshake.
#[derive(Debug)]
pub struct SniResolver {
    store: Arc<CertStore>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.resolve(hello.server_name(), hello.alpn())
    }
}

/// Shared by every server config so sessions resume across reloads (SPEC TLS-1).
pub struct SessionState {
    cache: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            cache: rustls::server::ServerSessionMemoryCache::new(16 * 1024),
            ticketer: rustls::crypto::ring::Ticketer::new().ok(),
        }
    }
}

/// Builds a listener's rustls server config.
/// `acme`: also offer `acme-tls/1`, so TLS-ALPN-01 validation handshakes complete.
pub fn server_config(
    settings: &ListenerTls,
    store: &Arc<CertStore>,
    sessions: &SessionState,
    acme: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut provider = provider();
    if !settings.cipher_suites.is_empty() {
        let mut chosen = Vec::new();
        for name in &settings.cipher_suites {
            let suite = provider
                .cipher_suites
                .iter()
                .find(|suite| {
                    suite
                        .suite()
                        .as_str()
                        .is_some_and(|known| known.eq_ignore_ascii_case(name))
                })
                .ok_or_else(|| TlsError::UnknownCipherSuite(name.clone()))?;
            chosen.push(*suite);
        }
        provider.cipher_suites = chosen;
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let provider = Arc::new(provider);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|source| TlsError::Rustls {
            context: "tls.cipher_suites do not fit tls.min_version",
            source,
        })?;
    let builder = match &settings.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let roots = load_roots(&auth.ca).map_err(|err| TlsError::ClientCa {
                path: auth.ca.clone(),
                message: err.to_string(),
            })?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match auth.mode {
                ClientAuthMode::Require => verifier,
                ClientAuthMode::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|err| TlsError::ClientCa {
                path: auth.ca.clone(),
                message: err.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver {
        store: store.clone(),
    }));
    config.alpn_protocols = settings
        .alpn
        .iter()
        .map(|proto| proto.as_bytes().to_vec())
        .collect();
    if acme {
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    config.session_storage = sessions.cache.clone();
    if let Some(ticketer) = &sessions.ticketer {
        config.ticketer = ticketer.clone();
    }
    // A client sending its request in 0-RTT data could be replayed; keep it off.
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Reads a PEM bundle of CA certificates.
pub fn load_roots(path: &str) -> Result<RootCertStore, TlsError> {
    let certs = certs::read_certs(path)?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(roots)
}

/// What a pool needs to open TLS connections to its endpoints.
pub struct UpstreamTlsConnector {
    pub connector: tokio_rustls::TlsConnector,
    /// Fixed server name (the `sni` override); none: derived from each endpoint's host.
    pub server_name: Option<ServerName<'static>>,
}

impl UpstreamTlsConnector {
    pub fn new(settings: &UpstreamTls, alpn: &[&[u8]]) -> Result<UpstreamTlsConnector, TlsError> {
        let provider = Arc::new(provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rustls {
                context: "upstream TLS",
                source,
            })?;
        let builder = if settings.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(certs::NoVerification(provider)))
        } else {
            let roots = match &settings.ca {
                Some(path) => load_roots(path)?,
                None => system_roots(),
            };
            builder.with_root_certificates(roots)
        };
        let mut config = match (&settings.client_cert, &settings.client_key) {
            (Some(cert), Some(key)) => {
                let chain = certs::read_certs(cert)?;
                let key_der = certs::read_key(key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|source| TlsError::Rustls {
                        context: "upstream client certificate",
                        source,
                    })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|proto| proto.to_vec()).collect();
        let server_name = match &settings.sni {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| TlsError::ServerName(name.clone()))?,
            ),
            None => None,
        };
        Ok(UpstreamTlsConnector {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The name to send and verify for an endpoint address (`host:port`).
    pub fn server_name_for(&self, address: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = host_of(address);
        ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.into()))
    }
}

fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, _port)) => host,
        None => address,
    }
}

/// A blocking-client TLS config (the span exporter's): the CAs of the PEM bundle at `ca`,
/// or the system's roots.
pub fn client_config(ca: Option<&str>) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(path) => load_roots(path)?,
        None => system_roots(),
    };
    let config = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "client TLS",
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let loaded = rustls_native_certs::load_native_certs();
    for error in &loaded.errors {
        tracing::warn!(error = %error, "cannot read a system CA certificate");
    }
    roots.add_parsable_certificates(loaded.certs);
    roots
}

/// The subject of a verified client certificate, in the RFC 4514 form
/// (`CN=alice,O=Example`), for headers and logs.
pub fn certificate_subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_handles_ipv6_and_ports() {
        assert_eq!(host_of("example.com:443"), "example.com");
        assert_eq!(host_of("[::1]:443"), "::1");
        assert_eq!(host_of("10.0.0.1:8443"), "10.0.0.1");
        assert_eq!(host_of("example.com"), "example.com");
    }
}
