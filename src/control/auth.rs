//! Bearer-token and client-certificate auth for the admin API (SPEC CTRL-5, REL-6). Tokens are configured as
//! SHA-256 hashes; a presented token is hashed and compared with every configured hash in
//! constant time, so neither the comparison nor which token matched leaks through timing.
//! Token values are never stored, logged or echoed.
//!
//! `FailureLimiter` rate-limits wrong tokens per source address (SPEC CTRL-5): after too
//! many within a window, every request from that source that needs a token is refused
//! (429) until the window ends, whether or not its token is right, so a guesser learns
//! nothing from a hit. Its map is bounded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::header::AUTHORIZATION;
use http::HeaderMap;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use crate::config::{AdminConfig, AdminScope};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("invalid bearer token")]
    Invalid,
    #[error("this token has the read scope; the admin scope is required")]
    Forbidden,
    #[error("a client certificate issued by admin.tls.client_ca is required")]
    NoClientCertificate,
}

/// Who is calling, as recorded in the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub actor: String,
    pub scope: AdminScope,
}

struct Token {
    name: String,
    hash: [u8; 32],
    scope: AdminScope,
}

pub struct Auth {
    tokens: Vec<Token>,
    /// `admin.tls.client_ca` is set: without tokens, a verified client certificate is
    /// the credential.
    client_certificates: bool,
}

/// Longest `Authorization` value considered; longer ones are invalid without hashing.
const MAX_TOKEN_BYTES: usize = 4096;

impl Auth {
    /// From a validated admin config (hashes are 64 lower-case hex digits).
    pub fn new(config: &AdminConfig) -> Auth {
        let tokens = config
            .tokens
            .iter()
            .filter_map(|token| {
                decode_hex(&token.sha256).map(|hash| Token {
                    name: token.name.clone(),
                    hash,
                    scope: token.scope,
                })
            })
            .collect();
        Auth {
            tokens,
            client_certificates: config
                .tls
                .as_ref()
                .is_some_and(|tls| tls.client_ca.is_some()),
        }
    }

    /// With no tokens configured (only allowed on a loopback address) every caller is an
    /// anonymous admin.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty() && !self.client_certificates
    }

    /// Identifies the caller and checks it may act with `needed`. `client` is the subject
    /// of the client certificate the TLS handshake verified, if any.
    pub fn check(
        &self,
        headers: &HeaderMap,
        needed: AdminScope,
        client: Option<&str>,
    ) -> Result<Caller, AuthError> {
        if self.client_certificates && client.is_none() {
            return Err(AuthError::NoClientCertificate);
        }
        if self.tokens.is_empty() {
            return Ok(Caller {
                actor: client
                    .map_or_else(|| "anonymous".into(), |subject| format!("cert:{subject}")),
                scope: AdminScope::Admin,
            });
        }
        let value = headers.get(AUTHORIZATION).ok_or(AuthError::Missing)?;
        let value = value.as_bytes();
        if value.len() > MAX_TOKEN_BYTES || value.len() < 7 {
            return Err(AuthError::Invalid);
        }
        let (scheme, token) = value.split_at(7);
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return Err(AuthError::Invalid);
        }
        let presented: [u8; 32] = Sha256::digest(token).into();
        // Every configured hash is compared, matched or not, and the matching index is
        // selected without branching on secret data.
        let mut matched = Choice::from(0);
        let mut index = 0u64;
        for (candidate_index, candidate) in self.tokens.iter().enumerate() {
            let equal = candidate.hash.ct_eq(&presented);
            index = u64::conditional_select(&index, &(candidate_index as u64), equal & !matched);
            matched |= equal;
        }
        if !bool::from(matched) {
            return Err(AuthError::Invalid);
        }
        let Some(token) = self.tokens.get(index as usize) else {
            return Err(AuthError::Invalid);
        };
        if token.scope < needed {
            return Err(AuthError::Forbidden);
        }
        Ok(Caller {
            actor: token.name.clone(),
            scope: token.scope,
        })
    }
}

/// Counts failed authentications per source and says when a source must wait. A source is
/// an IP address; `None` is the Unix socket (every local client shares one budget).
pub struct FailureLimiter {
    entries: parking_lot::Mutex<HashMap<Option<IpAddr>, Window>>,
    max_failures: u32,
    window: Duration,
    capacity: usize,
}

struct Window {
    started: Instant,
    failures: u32,
}

impl FailureLimiter {
    /// At most `max_failures` failures per `window` per source, tracking at most
    /// `capacity` sources (the oldest window is forgotten first when full).
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> FailureLimiter {
        FailureLimiter {
            entries: parking_lot::Mutex::new(HashMap::new()),
            max_failures,
            window,
            capacity: capacity.max(1),
        }
    }

    /// `Err(wait)` when `source` has used up its failures in the current window.
    pub fn check(&self, source: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get(&source) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(entry.started);
        if elapsed >= self.window {
            entries.remove(&source);
            return Ok(());
        }
        if entry.failures >= self.max_failures {
            return Err(self.window - elapsed);
        }
        Ok(())
    }

    /// Records one failed authentication from `source`.
    pub fn record_failure(&self, source: Option<IpAddr>, now: Instant) {
        let mut entries = self.entries.lock();
        if !entries.contains_key(&source) && entries.len() >= self.capacity {
            let window = self.window;
            entries.retain(|_, entry| now.saturating_duration_since(entry.started) < window);
            if entries.len() >= self.capacity {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, entry)| entry.started)
                    .map(|(key, _)| *key);
                if let Some(oldest) = oldest {
                    entries.remove(&oldest);
                }
            }
        }
        let entry = entries.entry(source).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.saturating_duration_since(entry.started) >= self.window {
            *entry = Window {
                started: now,
                failures: 0,
            };
        }
        entry.failures = entry.failures.saturating_add(1);
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn decode_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[index] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminToken;

    fn auth() -> Auth {
        let token = |name: &str, secret: &str, scope| AdminToken {
            name: name.into(),
            sha256: crate::control::sha256_hex(secret.as_bytes()),
            scope,
        };
        Auth::new(&AdminConfig {
            bind: "127.0.0.1:0".into(),
            tokens: vec![
                token("reader", "read-secret", AdminScope::Read),
                token("ops", "admin-secret", AdminScope::Admin),
            ],
            tls: None,
        })
    }

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn identifies_tokens_by_hash_and_enforces_scopes() {
        let auth = auth();
        let caller = auth
            .check(&headers("Bearer admin-secret"), AdminScope::Admin, None)
            .unwrap();
        assert_eq!(caller.actor, "ops");
        let caller = auth
            .check(&headers("bearer read-secret"), AdminScope::Read, None)
            .unwrap();
        assert_eq!(caller.actor, "reader");
        assert_eq!(
            auth.check(&headers("Bearer read-secret"), AdminScope::Admin, None),
            Err(AuthError::Forbidden)
        );
        assert_eq!(
            auth.check(&headers("Bearer nope"), AdminScope::Read, None),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.check(&headers("Basic admin-secret"), AdminScope::Read, None),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.check(&HeaderMap::new(), AdminScope::Read, None),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn failure_limiter_blocks_a_source_for_the_rest_of_its_window_and_stays_bounded() {
        let limiter = FailureLimiter::new(3, Duration::from_secs(60), 2);
        let start = Instant::now();
        let a: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let b: Option<IpAddr> = Some("192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            assert!(limiter.check(a, start).is_ok());
            limiter.record_failure(a, start);
        }
        let wait = limiter
            .check(a, start + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        // Another source is unaffected; the Unix socket is its own source.
        assert!(limiter.check(b, start).is_ok());
        assert!(limiter.check(None, start).is_ok());
        // The window ends.
        assert!(limiter.check(a, start + Duration::from_secs(60)).is_ok());
        // Bounded: a third source evicts the oldest window.
        limiter.record_failure(a, start);
        limiter.record_failure(b, start + Duration::from_secs(1));
        limiter.record_failure(None, start + Duration::from_secs(2));
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn client_certificates_are_the_credential_without_tokens_and_required_with_them() {
        let tls = Some(crate::config::AdminTls {
            cert: "c".into(),
            key: "k".into(),
            client_ca: Some("ca".into()),
        });
        let certificates_only = Auth::new(&AdminConfig {
            bind: "0.0.0.0:0".into(),
            tokens: vec![],
            tls: tls.clone(),
        });
        assert!(!certificates_only.is_open());
        assert_eq!(
            certificates_only.check(&HeaderMap::new(), AdminScope::Admin, None),
            Err(AuthError::NoClientCertificate)
        );
        let caller = certificates_only
            .check(&HeaderMap::new(), AdminScope::Admin, Some("CN=ops"))
            .unwrap();
        assert_eq!(caller.actor, "cert:CN=ops");
        assert_eq!(caller.scope, AdminScope::Admin);

        let both = Auth::new(&AdminConfig {
            bind: "0.0.0.0:0".into(),
            tokens: vec![crate::config::AdminToken {
                name: "reader".into(),
                sha256: crate::control::sha256_hex(b"read-secret"),
                scope: AdminScope::Read,
            }],
            tls,
        });
        assert_eq!(
            both.check(&headers("Bearer read-secret"), AdminScope::Read, None),
            Err(AuthError::NoClientCertificate)
        );
        assert_eq!(
            both.check(&HeaderMap::new(), AdminScope::Read, Some("CN=ops")),
            Err(AuthError::Missing)
        );
        let caller = both
            .check(
                &headers("Bearer read-secret"),
                AdminScope::Read,
                Some("CN=ops"),
            )
            .unwrap();
        assert_eq!(caller.actor, "reader");
    }
}
