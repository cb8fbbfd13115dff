//! Schema of the connection pipeline: TLS termination and certificates (SPEC TLS-1, TLS-2,
//! TLS-4, TLS-5, TLS-6), SNI passthrough and plain TCP relay (CONN-7, CONN-8), and PROXY
//! protocol receive and send (CONN-4, CONN-5).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::Dur;

/// Certificates shared by every TLS listener, chosen by SNI.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM file: the leaf certificate first, then intermediates. Relative paths are
    /// relative to the config file's directory.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Names this certificate serves, exact or `*.example.com`. Empty: the certificate's
    /// own DNS subject alternative names.
    #[serde(default)]
    pub names: Vec<String>,
    /// Served when the ClientHello has no SNI or names no certificate. At most one; when
    /// none is marked, the first certificate is the default.
    #[serde(default)]
    pub default: bool,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// TLS settings of a `protocol = "tls"` listener.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerTls {
    pub min_version: TlsVersion,
    /// rustls cipher suite names (e.g. `TLS13_AES_256_GCM_SHA384`); empty: rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// ALPN protocols offered on terminated connections, in preference order.
    pub alpn: Vec<String>,
    /// A client must finish sending its ClientHello within this time.
    pub client_hello_timeout: Dur,
    /// The TLS handshake of a terminated connection must finish within this time.
    pub handshake_timeout: Dur,
    /// SNI names relayed untouched (L4) to a pool instead of terminated here.
    pub passthrough: Vec<PassthroughRoute>,
    /// What a ClientHello without SNI, or with a name no passthrough route and no
    /// certificate covers, gets.
    pub unknown_sni: UnknownSni,
    /// What a connection whose first bytes are not a TLS handshake gets.
    pub plaintext: PlaintextAction,
    pub client_auth: Option<ClientAuthConfig>,
}

impl Default for ListenerTls {
    fn default() -> Self {
        ListenerTls {
            min_version: TlsVersion::Tls12,
            cipher_suites: Vec::new(),
            alpn: vec!["h2".into(), "http/1.1".into()],
            client_hello_timeout: Dur::secs(5),
            handshake_timeout: Dur::secs(10),
            passthrough: Vec::new(),
            unknown_sni: UnknownSni::Terminate,
            plaintext: PlaintextAction::Reset,
            client_auth: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassthroughRoute {
    /// Exact names or `*.example.com` wildcards, case-insensitive.
    pub sni: Vec<String>,
    pub pool: String,
    /// Send a PROXY protocol header to the backend before any client byte.
    #[serde(default)]
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// Close the relay after this long with no bytes in either direction.
    #[serde(default = "default_relay_idle_timeout")]
    pub idle_timeout: Dur,
}

fn default_relay_idle_timeout() -> Dur {
    Dur::secs(300)
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    /// Terminate with the default certificate; reset when there is none.
    #[default]
    Terminate,
    /// Close the connection (RST) without a byte.
    Reset,
    /// Relay untouched to this pool: `{ passthrough = "pool" }`.
    Passthrough(String),
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PlaintextAction {
    /// Close the connection (RST).
    #[default]
    Reset,
    /// Serve it as plain HTTP on the same port.
    Http,
    /// Answer plain HTTP requests with a redirect to `https://` (the listener's
    /// `redirect_https` settings, or 308 to the same host).
    Redirect,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// PEM bundle of the CAs client certificates must chain to.
    pub ca: String,
    /// Request header carrying the verified client certificate's subject upstream.
    /// Always removed from client requests first, so it cannot be forged.
    #[serde(default = "ClientAuthConfig::default_subject_header")]
    pub subject_header: String,
}

impl ClientAuthConfig {
    fn default_subject_header() -> String {
        "x-client-cert-subject".into()
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// A handshake without a valid client certificate fails.
    Require,
    /// A client certificate is verified when sent; routes with `require_client_cert`
    /// refuse requests without one.
    #[default]
    Optional,
}

/// Settings of a `protocol = "tcp"` listener: every connection is relayed to a pool.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpListenerConfig {
    pub pool: String,
    /// Send a PROXY protocol header to the backend before any client byte.
    #[serde(default)]
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// Close the relay after this long with no bytes in either direction.
    #[serde(default = "default_relay_idle_timeout")]
    pub idle_timeout: Dur,
}

/// PROXY protocol on incoming connections (SPEC CONN-4).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolReceive {
    /// Only these peers may send a header; a connection from anywhere else is reset.
    pub trusted_cidrs: Vec<IpNet>,
    /// The whole header must arrive within this time.
    #[serde(default = "ProxyProtocolReceive::default_timeout")]
    pub timeout: Dur,
}

impl ProxyProtocolReceive {
    fn default_timeout() -> Dur {
        Dur::secs(5)
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

/// Plain HTTP listener redirecting to HTTPS (SPEC TLS-6).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectHttpsConfig {
    #[serde(default = "RedirectHttpsConfig::default_status")]
    pub status: u16,
    /// Port in the `Location`; none keeps the default 443.
    #[serde(default)]
    pub port: Option<u16>,
}

impl RedirectHttpsConfig {
    fn default_status() -> u16 {
        308
    }
}

impl Default for RedirectHttpsConfig {
    fn default() -> Self {
        RedirectHttpsConfig {
            status: RedirectHttpsConfig::default_status(),
            port: None,
        }
    }
}

/// Re-encryption to a pool's endpoints (SPEC TLS-5).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTls {
    /// PEM bundle of CAs to verify endpoints against; none: the system's roots.
    pub ca: Option<String>,
    /// Server name sent and verified; none: the endpoint's host.
    pub sni: Option<String>,
    /// Do not verify the endpoint's certificate at all. Logged as a warning at load.
    pub insecure_skip_verify: bool,
    /// Client certificate and key (PEM) presented to endpoints that ask for one.
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

/// Automatic certificates (SPEC TLS-3).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME directory URL (any RFC 8555 server).
    #[serde(default = "AcmeConfig::default_directory")]
    pub directory: String,
    /// PEM file of a CA to trust for the directory's HTTPS (a private or test ACME
    /// server); none: the system's roots.
    #[serde(default)]
    pub directory_ca: Option<String>,
    /// Account contacts, e.g. `mailto:ops@example.com`.
    #[serde(default)]
    pub contact: Vec<String>,
    /// Where the account key and certificates are kept (relative: to the config file).
    #[serde(default = "AcmeConfig::default_cache_dir")]
    pub cache_dir: String,
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// Renew when a certificate has less than this left.
    #[serde(default = "AcmeConfig::default_renew_before")]
    pub renew_before: Dur,
    /// How often expiry dates are looked at, and the least time between two orders for
    /// the same certificate.
    #[serde(default = "AcmeConfig::default_check_interval")]
    pub check_interval: Dur,
    /// First retry delay after a failed order; doubled on each failure up to `retry_max`.
    #[serde(default = "AcmeConfig::default_retry_min")]
    pub retry_min: Dur,
    #[serde(default = "AcmeConfig::default_retry_max")]
    pub retry_max: Dur,
    /// One certificate per entry, covering all its names (SANs). List names in separate
    /// entries for one certificate each.
    pub certificates: Vec<AcmeCertificate>,
}

impl AcmeConfig {
    fn default_directory() -> String {
        "https://acme-v02.api.letsencrypt.org/directory".into()
    }
    fn default_cache_dir() -> String {
        "acme".into()
    }
    fn default_renew_before() -> Dur {
        Dur::secs(30 * 24 * 3600)
    }
    fn default_check_interval() -> Dur {
        Dur::secs(3600)
    }
    fn default_retry_min() -> Dur {
        Dur::secs(10)
    }
    fn default_retry_max() -> Dur {
        Dur::secs(3600)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AcmeCertificate {
    /// DNS names (no wildcards: TLS-ALPN-01 and HTTP-01 cannot validate them).
    pub names: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// Answered on the TLS listeners (port 443 in production).
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// Answered on the plain HTTP listeners (port 80), ahead of any redirect.
    #[serde(rename = "http-01")]
    Http01,
}
