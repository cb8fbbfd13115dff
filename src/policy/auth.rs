//! Authentication (SPEC POLICY-3): JWT bearer tokens (HS256, RS256, ES256, EdDSA verified
//! with `ring`; keys from a shared secret, a JWKS file or a JWKS URL refreshed in the
//! background) and HTTP basic authentication against bcrypt hashes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;
use ring::signature::{self, UnparsedPublicKey};
use serde::Deserialize;
use sha2::Digest as _;

use crate::config::policy::{BasicAuthConfig, JwtConfig};

/// Longest `Authorization` value looked at.
const MAX_CREDENTIALS: usize = 16 * 1024;
/// Successful basic-auth checks remembered, so a client sending the same credentials on
/// every request costs one bcrypt, not one per request.
const BASIC_CACHE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("jwks_file {path}: {message}")]
    JwksFile { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Hs256,
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    fn parse(text: &str) -> Option<Alg> {
        match text {
            "HS256" => Some(Alg::Hs256),
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "EdDSA" => Some(Alg::EdDsa),
            _ => None,
        }
    }
}

enum KeyMaterial {
    Hmac(ring::hmac::Key),
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed P-256 point.
    P256(Vec<u8>),
    Ed25519(Vec<u8>),
}

struct Jwk {
    kid: Option<String>,
    alg: Option<Alg>,
    material: KeyMaterial,
}

impl Jwk {
    fn fits(&self, alg: Alg) -> bool {
        let kind = matches!(
            (&self.material, alg),
            (KeyMaterial::Hmac(_), Alg::Hs256)
                | (KeyMaterial::Rsa { .. }, Alg::Rs256)
                | (KeyMaterial::P256(_), Alg::Es256)
                | (KeyMaterial::Ed25519(_), Alg::EdDsa)
        );
        kind && self.alg.is_none_or(|own| own == alg)
    }

    fn verify(&self, message: &[u8], signature_bytes: &[u8]) -> bool {
        match &self.material {
            KeyMaterial::Hmac(key) => ring::hmac::verify(key, message, signature_bytes).is_ok(),
            KeyMaterial::Rsa { n, e } => signature::RsaPublicKeyComponents { n, e }
                .verify(
                    &signature::RSA_PKCS1_2048_8192_SHA256,
                    message,
                    signature_bytes,
                )
                .is_ok(),
            KeyMaterial::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature_bytes)
                    .is_ok()
            }
            KeyMaterial::Ed25519(x) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, signature_bytes)
                .is_ok(),
        }
    }
}

#[derive(Deserialize)]
struct JwksDoc {
    keys: Vec<JwkDoc>,
}

#[derive(Deserialize)]
struct JwkDoc {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    k: Option<String>,
}

fn b64(field: &Option<String>) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(field.as_deref()?.trim_end_matches('='))
        .ok()
}

/// Parses a JWKS document; keys of unknown types or for encryption are skipped.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<Jwk>, String> {
    let doc: JwksDoc = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for key in doc.keys {
        if key.usage.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let material = match (key.kty.as_str(), key.crv.as_deref()) {
            ("RSA", _) => match (b64(&key.n), b64(&key.e)) {
                (Some(n), Some(e)) => KeyMaterial::Rsa { n, e },
                _ => continue,
            },
            ("EC", Some("P-256")) => match (b64(&key.x), b64(&key.y)) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                    let mut point = vec![4u8];
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    KeyMaterial::P256(point)
                }
                _ => continue,
            },
            ("OKP", Some("Ed25519")) => match b64(&key.x) {
                Some(x) if x.len() == 32 => KeyMaterial::Ed25519(x),
                _ => continue,
            },
            ("oct", _) => match b64(&key.k) {
                Some(k) if !k.is_empty() => {
                    KeyMaterial::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k))
                }
                _ => continue,
            },
            _ => continue,
        };
        keys.push(Jwk {
            kid: key.kid,
            alg: match key.alg.as_deref() {
                None => None,
                Some(text) => match Alg::parse(text) {
                    Some(alg) => Some(alg),
                    None => continue,
                },
            },
            material,
        });
    }
    Ok(keys)
}

/// Where JWKS keys come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Origin {
    File(String),
    Url(String),
}

/// A JWKS key set shared by every route (and snapshot) naming the same source; a background
/// task refreshes it and ends when the last holder drops it.
pub struct JwksSource {
    keys: ArcSwap<Vec<Jwk>>,
    loaded: AtomicBool,
}

impl JwksSource {
    /// Whether a fetch has succeeded at least once.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }
}

/// A source's identity: origin, refresh interval, fetch timeout, size cap.
type SourceKey = (Origin, Duration, Duration, u64);

/// JWKS sources by origin and settings, outliving snapshots (keys survive reloads).
#[derive(Default)]
pub struct JwksRegistry {
    sources: Mutex<HashMap<SourceKey, Weak<JwksSource>>>,
}

impl JwksRegistry {
    fn source(&self, jwt: &JwtConfig) -> Result<Option<Arc<JwksSource>>, AuthError> {
        let origin = match (&jwt.jwks_file, &jwt.jwks_url) {
            (Some(path), _) => Origin::File(path.clone()),
            (None, Some(url)) => Origin::Url(url.clone()),
            (None, None) => return Ok(None),
        };
        let key = (
            origin.clone(),
            jwt.jwks_refresh.0,
            jwt.jwks_timeout.0,
            jwt.jwks_max_bytes.0,
        );
        let mut sources = self.sources.lock();
        sources.retain(|_, weak| weak.strong_count() > 0);
        if let Some(found) = sources.get(&key).and_then(Weak::upgrade) {
            return Ok(Some(found));
        }
        let source = Arc::new(JwksSource {
            keys: ArcSwap::from_pointee(Vec::new()),
            loaded: AtomicBool::new(false),
        });
        if let Origin::File(path) = &origin {
            // A missing or broken file rejects the config, like a missing certificate.
            let keys =
                read_file(path, jwt.jwks_max_bytes.0).map_err(|message| AuthError::JwksFile {
                    path: path.clone(),
                    message,
                })?;
            source.keys.store(Arc::new(keys));
            source.loaded.store(true, Ordering::Release);
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(refresh(
                Arc::downgrade(&source),
                origin,
                jwt.jwks_refresh.0,
                jwt.jwks_timeout.0,
                jwt.jwks_max_bytes.0,
            ));
        }
        sources.insert(key, Arc::downgrade(&source));
        Ok(Some(source))
    }
}

fn read_file(path: &str, max: u64) -> Result<Vec<Jwk>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > max {
        return Err(format!("larger than {max} bytes"));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    parse_jwks(&bytes)
}

async fn fetch(origin: &Origin, timeout: Duration, max: u64) -> Result<Vec<Jwk>, String> {
    match origin {
        Origin::File(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || read_file(&path, max))
                .await
                .map_err(|e| e.to_string())?
        }
        Origin::Url(url) => {
            let target = super::client::Target::parse(url)?;
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::ACCEPT,
                HeaderValue::from_static("application/json"),
            );
            let answer = super::client::get(&target, headers, timeout, max, true)
                .await
                .map_err(|e| e.to_string())?;
            if !answer.status.is_success() {
                return Err(format!("status {}", answer.status));
            }
            parse_jwks(&answer.body)
        }
    }
}

/// Refreshes the key set every `every` (URLs at once first); a failed fetch keeps the
/// keys already there.
async fn refresh(
    source: Weak<JwksSource>,
    origin: Origin,
    every: Duration,
    timeout: Duration,
    max: u64,
) {
    let mut first = matches!(origin, Origin::Url(_));
    loop {
        if !first {
            tokio::time::sleep(every).await;
        }
        first = false;
        if source.strong_count() == 0 {
            return;
        }
        let result = fetch(&origin, timeout, max).await;
        let Some(source) = source.upgrade() else {
            return;
        };
        match result {
            Ok(keys) => {
                tracing::debug!(origin = ?origin, keys = keys.len(), "JWKS refreshed");
                source.keys.store(Arc::new(keys));
                source.loaded.store(true, Ordering::Release);
            }
            Err(error) => {
                tracing::warn!(origin = ?origin, %error, "JWKS refresh failed; keeping the previous keys");
            }
        }
    }
}

/// Why a request was not authenticated; `None` detail means no credentials at all.
#[derive(Debug)]
pub struct AuthFailure {
    pub challenge: HeaderValue,
    pub reason: String,
}

/// A compiled `jwt` block.
pub struct Jwt {
    algorithms: Vec<Alg>,
    secret: Option<Jwk>,
    jwks: Option<Arc<JwksSource>>,
    issuer: Option<String>,
    audiences: Vec<String>,
    leeway: u64,
    require_exp: bool,
    forward: Vec<(String, HeaderName)>,
    realm: String,
}

#[derive(Deserialize)]
struct TokenHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

impl Jwt {
    pub fn compile(config: &JwtConfig, registry: &JwksRegistry) -> Result<Jwt, AuthError> {
        let forward = config
            .forward_claims
            .iter()
            .map(|(claim, header)| {
                HeaderName::from_bytes(header.as_bytes())
                    .map(|name| (claim.clone(), name))
                    .map_err(|_| AuthError::Invalid(format!("bad header name {header:?}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Jwt {
            algorithms: config
                .algorithms
                .iter()
                .filter_map(|a| Alg::parse(a))
                .collect(),
            secret: config.secret.as_ref().map(|secret| Jwk {
                kid: None,
                alg: Some(Alg::Hs256),
                material: KeyMaterial::Hmac(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    secret.as_bytes(),
                )),
            }),
            jwks: registry.source(config)?,
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            leeway: config.leeway.0.as_secs(),
            require_exp: config.require_exp,
            forward,
            realm: config.realm.clone(),
        })
    }

    fn challenge(&self, error: Option<(&str, &str)>) -> HeaderValue {
        let text = match error {
            None => format!("Bearer realm=\"{}\"", self.realm),
            Some((code, description)) => format!(
                "Bearer realm=\"{}\", error=\"{code}\", error_description=\"{description}\"",
                self.realm
            ),
        };
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("Bearer"))
    }

    fn fail(&self, code: &str, description: &str) -> AuthFailure {
        AuthFailure {
            challenge: self.challenge(Some((code, description))),
            reason: description.to_string(),
        }
    }

    /// Verifies the bearer token; on success removes client copies of the forwarded
    /// headers, sets them from the claims, and returns the identity (`sub`).
    pub fn authenticate(&self, headers: &mut HeaderMap) -> Result<Option<String>, AuthFailure> {
        let token = match bearer(headers) {
            Some(token) => token,
            None => {
                return Err(AuthFailure {
                    challenge: self.challenge(None),
                    reason: "no bearer token".into(),
                })
            }
        };
        let claims = self.verify(&token)?;
        for (_, header) in &self.forward {
            headers.remove(header);
        }
        for (claim, header) in &self.forward {
            let value = match claims.get(claim) {
                None | Some(serde_json::Value::Null) => continue,
                Some(serde_json::Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
            };
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(header, value);
            }
        }
        Ok(claims
            .get("sub")
            .and_then(|s| s.as_str())
            .map(str::to_string))
    }

    fn verify(
        &self,
        token: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, AuthFailure> {
        let invalid = |description: &str| self.fail("invalid_token", description);
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("malformed token"));
        };
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).ok();
        let header: TokenHeader = decode(head)
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| invalid("malformed token header"))?;
        let alg = Alg::parse(&header.alg)
            .filter(|alg| self.algorithms.contains(alg))
            .ok_or_else(|| invalid("algorithm not accepted"))?;
        let signature_bytes = decode(sig).ok_or_else(|| invalid("malformed signature"))?;
        let message = &token.as_bytes()[..head.len() + 1 + body.len()];
        let jwks = self.jwks.as_ref().map(|source| source.keys.load_full());
        let candidates = self
            .secret
            .iter()
            .chain(jwks.iter().flat_map(|keys| keys.iter()))
            .filter(|key| key.fits(alg))
            .filter(|key| match (&header.kid, &key.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            });
        let mut verified = false;
        for key in candidates {
            if key.verify(message, &signature_bytes) {
                verified = true;
                break;
            }
        }
        if !verified {
            return Err(invalid("signature does not verify"));
        }
        let claims: serde_json::Map<String, serde_json::Value> = decode(body)
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| invalid("malformed claims"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let number = |name: &str| claims.get(name).and_then(serde_json::Value::as_f64);
        match number("exp") {
            Some(exp) if (now as f64) > exp + self.leeway as f64 => {
                return Err(invalid("token expired"))
            }
            None if self.require_exp => return Err(invalid("token has no exp")),
            _ => {}
        }
        if number("nbf").is_some_and(|nbf| (now as f64) + (self.leeway as f64) < nbf) {
            return Err(invalid("token not yet valid"));
        }
        if let Some(issuer) = &self.issuer {
            if claims.get("iss").and_then(|v| v.as_str()) != Some(issuer.as_str()) {
                return Err(invalid("wrong issuer"));
            }
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(aud)) => self.audiences.contains(aud),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .filter_map(|v| v.as_str())
                    .any(|aud| self.audiences.iter().any(|a| a == aud)),
                _ => false,
            };
            if !ok {
                return Err(invalid("wrong audience"));
            }
        }
        Ok(claims)
    }
}

fn credentials<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(http::header::AUTHORIZATION)?;
    if value.len() > MAX_CREDENTIALS {
        return None;
    }
    let text = value.to_str().ok()?;
    let (given, rest) = text.split_once(' ')?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| rest.trim())
        .filter(|rest| !rest.is_empty())
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    credentials(headers, "Bearer").map(str::to_string)
}

/// bcrypt checks running at once, per process: a flood of wrong passwords queues here
/// instead of taking every blocking thread.
fn bcrypt_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores)
    })
}

/// Longest wait for a bcrypt slot before the request is refused.
const BCRYPT_WAIT: Duration = Duration::from_secs(5);

/// A compiled `basic_auth` block.
pub struct Basic {
    users: HashMap<String, String>,
    /// Checked for unknown users too, so answering takes as long as for a known one.
    decoy: String,
    challenge: HeaderValue,
    forward: Option<HeaderName>,
    /// sha256(user, password, hash) of recent successes.
    verified: Mutex<std::collections::HashSet<[u8; 32]>>,
}

impl Basic {
    pub fn compile(config: &BasicAuthConfig) -> Result<Basic, AuthError> {
        Ok(Basic {
            decoy: config.users.values().next().cloned().unwrap_or_default(),
            users: config
                .users
                .iter()
                .map(|(u, h)| (u.clone(), h.clone()))
                .collect(),
            challenge: HeaderValue::from_str(&format!(
                "Basic realm=\"{}\", charset=\"UTF-8\"",
                config.realm
            ))
            .map_err(|_| AuthError::Invalid("bad realm".into()))?,
            forward: config
                .forward_user_header
                .as_deref()
                .map(|name| {
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| AuthError::Invalid(format!("bad header name {name:?}")))
                })
                .transpose()?,
            verified: Mutex::new(Default::default()),
        })
    }

    fn fail(&self, reason: &str) -> AuthFailure {
        AuthFailure {
            challenge: self.challenge.clone(),
            reason: reason.into(),
        }
    }

    /// Checks the credentials (bcrypt on the blocking pool); returns the user name.
    pub async fn authenticate(
        &self,
        headers: &mut HeaderMap,
    ) -> Result<Option<String>, AuthFailure> {
        let encoded = credentials(headers, "Basic").ok_or_else(|| self.fail("no credentials"))?;
        let decoded = STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| self.fail("malformed credentials"))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| self.fail("malformed credentials"))?;
        let known_user = self.users.get(user);
        let hash = known_user.unwrap_or(&self.decoy);
        let mut digest = sha2::Sha256::new();
        for part in [user, password, hash.as_str()] {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part.as_bytes());
        }
        let fingerprint: [u8; 32] = digest.finalize().into();
        let known = known_user.is_some() && self.verified.lock().contains(&fingerprint);
        if !known {
            let Ok(Ok(_slot)) = tokio::time::timeout(BCRYPT_WAIT, bcrypt_slots().acquire()).await
            else {
                return Err(self.fail("authentication busy"));
            };
            let (password, hash) = (password.to_string(), hash.clone());
            let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false);
            if !ok || known_user.is_none() {
                return Err(self.fail("unknown user or wrong password"));
            }
            let mut verified = self.verified.lock();
            if verified.len() >= BASIC_CACHE {
                verified.clear();
            }
            verified.insert(fingerprint);
        }
        if let Some(header) = &self.forward {
            headers.remove(header);
            if let Ok(value) = HeaderValue::from_str(user) {
                headers.insert(header, value);
            }
        }
        Ok(Some(user.to_string()))
    }
}
