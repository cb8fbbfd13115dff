//! Reading a config from TOML or JSON text, applying `GATEHOUSE_*` environment overrides,
//! and collecting every error with its field path.
//!
//! Sections and list elements are deserialized one at a time, so a type error in
//! `routes[2]` does not hide an unknown field in `pools[0]`; semantic checks then run on
//! everything that parsed.

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::validate::validate;
use super::Config;

/// One problem, with the field path it is about (`routes[2].pool`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one config, in file order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Toml,
        }
    }
}

/// Environment variables with the `GATEHOUSE_` prefix that are command-line settings,
/// not config overrides.
const RESERVED_ENV: &[&str] = &["GATEHOUSE_CONFIG", "GATEHOUSE_LOG"];

/// Reads, overrides from the process environment, and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {err}", path.display()),
        }])
    })?;
    parse_str(&text, Format::from_path(path), std::env::vars())
}

/// Parses config text, applies overrides from `env` (pairs of name and value; only
/// `GATEHOUSE_*` names count) and validates the result.
pub fn parse_str(
    text: &str,
    format: Format,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let mut root = match format {
        Format::Toml => toml::from_str::<Value>(text).map_err(|err| syntax_error("TOML", &err))?,
        Format::Json => {
            serde_json::from_str::<Value>(text).map_err(|err| syntax_error("JSON", &err))?
        }
    };
    let mut errors = Vec::new();
    apply_env_overrides(&mut root, env, &mut errors);
    let (config, indexes) = deserialize_sections(root, &mut errors);
    validate(&config, &indexes, &mut errors);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn syntax_error(kind: &str, err: &dyn fmt::Display) -> ConfigErrors {
    let message = err.to_string();
    ConfigErrors(vec![ConfigError {
        path: String::new(),
        message: format!("invalid {kind}: {}", message.trim_end()),
    }])
}

/// `GATEHOUSE_LISTENERS__0__BIND=0.0.0.0:80` sets `listeners[0].bind`. Values are read as
/// TOML scalars when they parse as one (`4`, `true`), else as strings.
fn apply_env_overrides(
    root: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<ConfigError>,
) {
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| {
            name.starts_with("GATEHOUSE_") && !RESERVED_ENV.contains(&name.as_str())
        })
        .collect();
    overrides.sort();
    for (name, raw) in overrides {
        let segments: Vec<String> = name["GATEHOUSE_".len()..]
            .split("__")
            .map(|segment| segment.to_ascii_lowercase())
            .collect();
        if segments.iter().any(String::is_empty) {
            errors.push(ConfigError {
                path: format!("env {name}"),
                message: "empty path segment".into(),
            });
            continue;
        }
        if let Err(message) = set_path(root, &segments, env_value(&raw)) {
            errors.push(ConfigError {
                path: format!("env {name}"),
                message,
            });
        }
    }
}

fn env_value(raw: &str) -> Value {
    #[derive(serde::Deserialize)]
    struct Wrapper {
        v: Value,
    }
    match toml::from_str::<Wrapper>(&format!("v = {raw}")) {
        Ok(Wrapper { v }) if !v.is_object() => v,
        _ => Value::String(raw.to_string()),
    }
}

fn set_path(node: &mut Value, segments: &[String], value: Value) -> Result<(), String> {
    let Some((first, rest)) = segments.split_first() else {
        *node = value;
        return Ok(());
    };
    match node {
        Value::Array(items) => {
            let index: usize = first
                .parse()
                .map_err(|_| format!("{first:?} is not a list index"))?;
            let len = items.len();
            let item = items
                .get_mut(index)
                .ok_or_else(|| format!("index {index} is past the end of a list of {len}"))?;
            set_path(item, rest, value)
        }
        Value::Object(map) => {
            let child = map.entry(first.clone()).or_insert_with(|| {
                if rest.is_empty() {
                    Value::Null
                } else {
                    Value::Object(Map::new())
                }
            });
            set_path(child, rest, value)
        }
        _ => Err(format!("cannot set {first:?} inside a scalar value")),
    }
}

/// Deserializes one value, turning a serde error into a path-carrying `ConfigError`.
fn section<T: DeserializeOwned>(
    value: Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(parsed) => Some(parsed),
        Err(err) => {
            let inner = err.path().to_string();
            let full = match (path.is_empty(), inner == ".") {
                (_, true) => path.to_string(),
                (true, false) => inner,
                (false, false) if inner.starts_with('[') => format!("{path}{inner}"),
                (false, false) => format!("{path}.{inner}"),
            };
            errors.push(ConfigError {
                path: full,
                message: err.into_inner().to_string(),
            });
            None
        }
    }
}

/// The elements of a list that parsed, with the index each had in the file.
fn list<T: DeserializeOwned>(
    value: Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> (Vec<T>, Vec<usize>) {
    match value {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(index, item)| {
                section(item, &format!("{path}[{index}]"), errors).map(|parsed| (parsed, index))
            })
            .unzip(),
        other => {
            errors.push(ConfigError {
                path: path.to_string(),
                message: format!("expected a list, found {}", kind_of(&other)),
            });
            (Vec::new(), Vec::new())
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

/// Where each parsed list element stood in the file, so later errors keep true paths.
#[derive(Default)]
pub(super) struct FileIndexes {
    pub listeners: Vec<usize>,
    pub pools: Vec<usize>,
    pub routes: Vec<usize>,
}

fn deserialize_sections(root: Value, errors: &mut Vec<ConfigError>) -> (Config, FileIndexes) {
    let mut config = Config::default();
    let mut indexes = FileIndexes::default();
    let Value::Object(map) = root else {
        errors.push(ConfigError {
            path: String::new(),
            message: format!("the config must be a table, found {}", kind_of(&root)),
        });
        return (config, indexes);
    };
    for (key, value) in map {
        match key.as_str() {
            "workers" => config.workers = section(value, &key, errors).unwrap_or_default(),
            "drain_timeout" => {
                if let Some(parsed) = section(value, &key, errors) {
                    config.drain_timeout = parsed;
                }
            }
            "log" => config.log = section(value, &key, errors).unwrap_or_default(),
            "access_log" => config.access_log = section(value, &key, errors).unwrap_or_default(),
            "http" => config.http = section(value, &key, errors).unwrap_or_default(),
            "demo" => config.demo = section(value, &key, errors).unwrap_or_default(),
            "listeners" => (config.listeners, indexes.listeners) = list(value, &key, errors),
            "pools" => (config.pools, indexes.pools) = list(value, &key, errors),
            "routes" => (config.routes, indexes.routes) = list(value, &key, errors),
            _ => errors.push(ConfigError {
                path: key.clone(),
                message: "unknown field; expected one of workers, drain_timeout, log, access_log, http, demo, listeners, pools, routes".into(),
            }),
        }
    }
    (config, indexes)
}
