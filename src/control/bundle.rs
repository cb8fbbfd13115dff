//! Signed config bundles (SPEC CTRL-8): the bundle file, its canonical signed encoding,
//! Ed25519 signing and verification against the trusted keys, key generation, and the
//! checks of the `[bundles]` and `[pull]` sections. Applying a bundle (the replay check
//! and the store write) is `Control::apply_bundle`; fetching one is `pull`.
//!
//! The signed message (documented in docs/OPERATIONS.md, "Signed bundles") is
//! `"gatehouse-bundle-v1\n"` followed by four fields — version (decimal ASCII), created,
//! author, config — each as an 8-byte big-endian length and then its UTF-8 bytes. Length
//! prefixes make the encoding unambiguous whatever the fields contain. The config is carried
//! as canonical JSON (object keys sorted, no whitespace), so signing the same file twice
//! gives the same bytes.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{BundlesConfig, Config, Format, TrustedKey};

/// The `format` of every bundle and the first line of the signed message.
pub const FORMAT: &str = "gatehouse-bundle-v1";
/// Longest author and created fields.
const MAX_FIELD_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a bundle: {0}")]
    Malformed(String),
    #[error("bundle is unsigned and bundles.require_signature is on")]
    Unsigned,
    #[error("bundle is signed by a key that is not in bundles.trusted_keys")]
    UnknownKey,
    #[error("bundle signature does not verify with trusted key {0:?}: the bundle was changed after signing or signed with another key")]
    BadSignature(String),
    #[error("bundle version {version} is not newer than the last applied bundle version {last}: replay refused")]
    Replay { version: i64, last: i64 },
    #[error("{0}")]
    Key(String),
}

/// A bundle file (JSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub format: String,
    pub version: i64,
    /// RFC 3339 time of signing.
    pub created: String,
    pub author: String,
    /// The config as canonical JSON.
    pub config: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<BundleSignature>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleSignature {
    /// The signer's public key, base64 (32 bytes).
    pub key: String,
    /// The Ed25519 signature of `signed_message`, base64 (64 bytes).
    pub value: String,
}

/// The bytes a signature covers.
pub fn signed_message(version: i64, created: &str, author: &str, config: &str) -> Vec<u8> {
    let version = version.to_string();
    let fields = [version.as_str(), created, author, config];
    let mut message =
        Vec::with_capacity(FORMAT.len() + 1 + fields.iter().map(|f| 8 + f.len()).sum::<usize>());
    message.extend_from_slice(FORMAT.as_bytes());
    message.push(b'\n');
    for field in fields {
        message.extend_from_slice(&(field.len() as u64).to_be_bytes());
        message.extend_from_slice(field.as_bytes());
    }
    message
}

impl Bundle {
    /// Parses a bundle file; every field is checked, not only the JSON shape.
    pub fn parse(text: &str) -> Result<Bundle, BundleError> {
        let bundle: Bundle = serde_json::from_str(text)
            .map_err(|err| BundleError::Malformed(format!("invalid bundle JSON: {err}")))?;
        if bundle.format != FORMAT {
            return Err(BundleError::Malformed(format!(
                "format: {:?} is not {FORMAT:?}",
                bundle.format
            )));
        }
        if bundle.version < 1 {
            return Err(BundleError::Malformed(
                "version: must be a positive integer".into(),
            ));
        }
        for (field, value) in [("created", &bundle.created), ("author", &bundle.author)] {
            if value.is_empty() || value.len() > MAX_FIELD_BYTES {
                return Err(BundleError::Malformed(format!(
                    "{field}: must be 1 to {MAX_FIELD_BYTES} bytes"
                )));
            }
        }
        Ok(bundle)
    }

    pub fn message(&self) -> Vec<u8> {
        signed_message(self.version, &self.created, &self.author, &self.config)
    }

    /// Checks the signature against `settings`. Returns the name of the trusted key that
    /// signed it, or `None` for an unsigned bundle (allowed only without
    /// `require_signature`). A signature that is present must always verify.
    pub fn verify(&self, settings: &BundlesConfig) -> Result<Option<String>, BundleError> {
        let Some(signature) = &self.signature else {
            return if settings.require_signature {
                Err(BundleError::Unsigned)
            } else {
                Ok(None)
            };
        };
        let key_bytes = decode_fixed::<32>(&signature.key)
            .ok_or_else(|| BundleError::Malformed("signature.key: not 32 base64 bytes".into()))?;
        let signature_bytes = decode_fixed::<64>(&signature.value)
            .ok_or_else(|| BundleError::Malformed("signature.value: not 64 base64 bytes".into()))?;
        let trusted = settings
            .trusted_keys
            .iter()
            .find(|trusted| decode_fixed::<32>(&trusted.public_key) == Some(key_bytes))
            .ok_or(BundleError::UnknownKey)?;
        let key = VerifyingKey::from_bytes(&key_bytes)
            .map_err(|_| BundleError::BadSignature(trusted.name.clone()))?;
        key.verify_strict(&self.message(), &Signature::from_bytes(&signature_bytes))
            .map_err(|_| BundleError::BadSignature(trusted.name.clone()))?;
        Ok(Some(trusted.name.clone()))
    }
}

fn decode_fixed<const N: usize>(text: &str) -> Option<[u8; N]> {
    BASE64.decode(text.trim()).ok()?.try_into().ok()
}

/// A new Ed25519 key pair: (secret seed, public key), both base64.
pub fn keygen() -> Result<(String, String), BundleError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|err| BundleError::Key(format!("no system randomness: {err}")))?;
    let key = SigningKey::from_bytes(&seed);
    Ok((
        BASE64.encode(seed),
        BASE64.encode(key.verifying_key().as_bytes()),
    ))
}

/// Reads a secret key (the base64 seed `keygen` writes).
pub fn signing_key(text: &str) -> Result<SigningKey, BundleError> {
    decode_fixed::<32>(text)
        .map(|seed| SigningKey::from_bytes(&seed))
        .ok_or_else(|| BundleError::Key("the secret key is not 32 base64 bytes".into()))
}

/// Makes a bundle of `config_json` (canonical JSON), signed when `key` is given.
pub fn make(
    key: Option<&SigningKey>,
    version: i64,
    created: String,
    author: String,
    config_json: String,
) -> Bundle {
    let mut bundle = Bundle {
        format: FORMAT.into(),
        version,
        created,
        author,
        config: config_json,
        signature: None,
    };
    if let Some(key) = key {
        let signature = key.sign(&bundle.message());
        bundle.signature = Some(BundleSignature {
            key: BASE64.encode(key.verifying_key().as_bytes()),
            value: BASE64.encode(signature.to_bytes()),
        });
    }
    bundle
}

/// The canonical JSON of a config file: the file's own data (not the defaults filled in,
/// so a bundle names only what its author wrote), object keys sorted by byte order, no
/// whitespace. The config must pass validation.
pub fn canonical_config(text: &str, format: Format) -> Result<String, String> {
    crate::config::parse_str(text, format, std::iter::empty()).map_err(|errors| {
        errors
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let value: Value = match format {
        Format::Json => serde_json::from_str(text).map_err(|err| err.to_string())?,
        Format::Toml => toml::from_str(text).map_err(|err| err.to_string())?,
    };
    let mut out = String::with_capacity(text.len());
    write_canonical(&value, &mut out);
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(item) = map.get(key) {
                    write_canonical(item, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Checks `[bundles]` and `[pull]`; (path, message) pairs.
pub fn validate_config(config: &Config) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let bundles = &config.bundles;
    let mut names = std::collections::HashSet::new();
    for (index, TrustedKey { name, public_key }) in bundles.trusted_keys.iter().enumerate() {
        let path = format!("bundles.trusted_keys[{index}]");
        if name.trim().is_empty() {
            errors.push((format!("{path}.name"), "must not be empty".into()));
        } else if !names.insert(name.as_str()) {
            errors.push((format!("{path}.name"), format!("{name:?} is used twice")));
        }
        let valid = decode_fixed::<32>(public_key)
            .is_some_and(|bytes| VerifyingKey::from_bytes(&bytes).is_ok());
        if !valid {
            errors.push((
                format!("{path}.public_key"),
                "must be an Ed25519 public key: 32 bytes in base64 (the .pub file of `gatehouse bundle keygen`)".into(),
            ));
        }
    }
    if bundles.require_signature && bundles.trusted_keys.is_empty() {
        errors.push((
            "bundles.require_signature".into(),
            "needs at least one bundles.trusted_keys entry".into(),
        ));
    }
    if let Some(pull) = &config.pull {
        match http::Uri::try_from(pull.url.as_str()) {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {}
            _ => errors.push((
                "pull.url".into(),
                "must be an http:// or https:// URL with a host".into(),
            )),
        }
        if pull.interval.0 < std::time::Duration::from_secs(1) {
            errors.push(("pull.interval".into(), "must be at least 1s".into()));
        }
        if pull.timeout.0.is_zero() {
            errors.push(("pull.timeout".into(), "must be more than 0s".into()));
        }
        if pull.max_size.0 == 0 || pull.max_size.0 > 64 << 20 {
            errors.push((
                "pull.max_size".into(),
                "must be between 1 byte and 64MiB".into(),
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(public: &str, require: bool) -> BundlesConfig {
        BundlesConfig {
            require_signature: require,
            trusted_keys: vec![TrustedKey {
                name: "release".into(),
                public_key: public.into(),
            }],
        }
    }

    #[test]
    fn signed_message_is_length_prefixed() {
        let message = signed_message(7, "c", "ab", "{}");
        let mut expected = b"gatehouse-bundle-v1\n".to_vec();
        for field in ["7", "c", "ab", "{}"] {
            expected.extend_from_slice(&(field.len() as u64).to_be_bytes());
            expected.extend_from_slice(field.as_bytes());
        }
        assert_eq!(message, expected);
        // Moving a byte between fields changes the message.
        assert_ne!(
            signed_message(7, "c", "a", "b{}"),
            signed_message(7, "c", "ab", "{}")
        );
    }

    #[test]
    fn sign_verify_and_every_refusal() {
        let (secret, public) = keygen().unwrap();
        let key = signing_key(&secret).unwrap();
        let bundle = make(Some(&key), 3, "t".into(), "me".into(), "{}".into());
        let text = serde_json::to_string(&bundle).unwrap();
        let parsed = Bundle::parse(&text).unwrap();
        assert_eq!(
            parsed.verify(&settings(&public, true)).unwrap().as_deref(),
            Some("release")
        );
        let mut tampered = parsed.clone();
        tampered.config = "{\"routes\":[]}".into();
        assert!(matches!(
            tampered.verify(&settings(&public, true)),
            Err(BundleError::BadSignature(_))
        ));
        let (_, other) = keygen().unwrap();
        assert!(matches!(
            parsed.verify(&settings(&other, true)),
            Err(BundleError::UnknownKey)
        ));
        let unsigned = make(None, 3, "t".into(), "me".into(), "{}".into());
        assert!(matches!(
            unsigned.verify(&settings(&public, true)),
            Err(BundleError::Unsigned)
        ));
        assert_eq!(unsigned.verify(&settings(&public, false)).unwrap(), None);
        assert!(Bundle::parse("{}").is_err());
        assert!(Bundle::parse(&text.replace("gatehouse-bundle-v1", "v0")).is_err());
    }

    #[test]
    fn canonical_config_sorts_keys_and_drops_whitespace() {
        let toml = "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n";
        let json = canonical_config(toml, Format::Toml).unwrap();
        assert_eq!(
            json,
            "{\"listeners\":[{\"bind\":\"127.0.0.1:0\",\"name\":\"l\"}]}"
        );
        assert!(canonical_config("workers = 0\n", Format::Toml).is_err());
    }

    #[test]
    fn bundles_and_pull_errors_name_their_fields() {
        let toml = "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\n[bundles]\nrequire_signature = true\ntrusted_keys = [{ name = \"a\", public_key = \"nope\" }, { name = \"a\", public_key = \"AAAA\" }]\n\n[pull]\nurl = \"ftp://x/b.json\"\ninterval = \"10ms\"\nmax_size = \"0\"\n";
        let errors = crate::config::parse_str(toml, Format::Toml, std::iter::empty())
            .unwrap_err()
            .0;
        let paths: Vec<&str> = errors.iter().map(|error| error.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bundles.trusted_keys[0].public_key",
                "bundles.trusted_keys[1].name",
                "bundles.trusted_keys[1].public_key",
                "pull.url",
                "pull.interval",
                "pull.max_size",
            ],
            "{errors:?}"
        );
        let toml = "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\n[bundles]\nrequire_signature = true\n";
        let errors = crate::config::parse_str(toml, Format::Toml, std::iter::empty())
            .unwrap_err()
            .0;
        assert_eq!(errors[0].path, "bundles.require_signature");
    }
}
