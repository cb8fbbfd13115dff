//! Bearer-token auth for the admin API (SPEC CTRL-5, REL-6). Tokens are configured as
//! SHA-256 hashes; a presented token is hashed and compared with every configured hash in
//! constant time, so neither the comparison nor which token matched leaks through timing.
//! Token values are never stored, logged or echoed.

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
        Auth { tokens }
    }

    /// With no tokens configured (only allowed on a loopback address) every caller is an
    /// anonymous admin.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Identifies the caller and checks it may act with `needed`.
    pub fn check(&self, headers: &HeaderMap, needed: AdminScope) -> Result<Caller, AuthError> {
        if self.is_open() {
            return Ok(Caller {
                actor: "anonymous".into(),
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
            .check(&headers("Bearer admin-secret"), AdminScope::Admin)
            .unwrap();
        assert_eq!(caller.actor, "ops");
        let caller = auth
            .check(&headers("bearer read-secret"), AdminScope::Read)
            .unwrap();
        assert_eq!(caller.actor, "reader");
        assert_eq!(
            auth.check(&headers("Bearer read-secret"), AdminScope::Admin),
            Err(AuthError::Forbidden)
        );
        assert_eq!(
            auth.check(&headers("Bearer nope"), AdminScope::Read),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.check(&headers("Basic admin-secret"), AdminScope::Read),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.check(&HeaderMap::new(), AdminScope::Read),
            Err(AuthError::Missing)
        );
    }
}
