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
use serde_path_to_error::Segment;

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

/// Every problem found in one config, ordered by section (in schema order: `workers` …
/// `listeners`, `pools`, `routes`) and element index, which is file order for a file laid
/// out like the documentation.
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
const RESERVED_ENV: &[&str] = &[
    "GATEHOUSE_CONFIG",
    "GATEHOUSE_LOG",
    crate::ops::upgrade::FD_ENV,
    crate::ops::upgrade::BINARY_ENV,
];

/// Reads, overrides from the process environment, and validates a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read {}: {err}", path.display()),
        }])
    })?;
    let mut config = parse_str(&text, Format::from_path(path), std::env::vars())?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    resolve_paths(&mut config, base);
    Ok(config)
}

/// Makes the file paths a config names (certificates, keys, CA bundles, GeoIP databases)
/// absolute, relative to the config file's directory, as nginx resolves relative to its
/// prefix: the running gateway must not depend on its working directory.
fn resolve_paths(config: &mut super::Config, base: &Path) {
    let fix = |value: &mut String| {
        if !value.is_empty() && Path::new(value.as_str()).is_relative() {
            *value = base.join(value.as_str()).to_string_lossy().into_owned();
        }
    };
    let fix_path = |value: &mut std::path::PathBuf| {
        if value.is_relative() {
            *value = base.join(&*value);
        }
    };
    for cert in &mut config.tls.certificates {
        fix(&mut cert.cert);
        fix(&mut cert.key);
    }
    if let Some(acme) = config.acme.as_mut() {
        fix(&mut acme.cache_dir);
        if let Some(ca) = acme.directory_ca.as_mut() {
            fix(ca);
        }
    }
    if let Some(db) = config.firewall.geoip_db.as_mut() {
        fix_path(db);
    }
    if let Some(tls) = config.admin.as_mut().and_then(|admin| admin.tls.as_mut()) {
        fix(&mut tls.cert);
        fix(&mut tls.key);
        if let Some(ca) = tls.client_ca.as_mut() {
            fix(ca);
        }
    }
    for listener in &mut config.listeners {
        if let Some(auth) = listener
            .tls
            .as_mut()
            .and_then(|tls| tls.client_auth.as_mut())
        {
            fix(&mut auth.ca);
        }
        if let Some(db) = listener.firewall.as_mut().and_then(|f| f.geoip_db.as_mut()) {
            fix_path(db);
        }
    }
    for pool in &mut config.pools {
        if let Some(tls) = pool.tls.as_mut() {
            for value in [&mut tls.ca, &mut tls.client_cert, &mut tls.client_key]
                .into_iter()
                .flatten()
            {
                fix(value);
            }
        }
    }
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
    let overridden = apply_env_overrides(&mut root, env, &mut errors);
    let (config, indexes) = deserialize_sections(root, &mut errors);
    validate(&config, &indexes, &mut errors);
    if errors.is_empty() {
        return Ok(config);
    }
    for error in &mut errors {
        note_env_source(error, &overridden);
    }
    errors.sort_by_cached_key(|error| file_position(&error.path));
    Err(ConfigErrors(errors))
}

/// Top-level sections in the order the schema (and the documentation) lists them.
const SECTIONS: &[&str] = &[
    "workers",
    "drain_timeout",
    "log",
    "access_log",
    "metrics",
    "tracing",
    "http",
    "tls",
    "acme",
    "firewall",
    "watch_interval",
    "demo",
    "listeners",
    "pools",
    "routes",
    "store",
    "admin",
    "bundles",
    "pull",
];

/// Sort key for an error path: its section's place in `SECTIONS`, then its list index.
/// Paths outside any section (syntax, `env …`, unknown keys) come first.
fn file_position(path: &str) -> (usize, usize) {
    let end = path.find(['.', '[']).unwrap_or(path.len());
    let section = SECTIONS
        .iter()
        .position(|section| *section == &path[..end])
        .map_or(0, |position| position + 1);
    let index = path[end..]
        .strip_prefix('[')
        .and_then(|rest| rest.split(']').next())
        .and_then(|index| index.parse().ok())
        .unwrap_or(0);
    (section, index)
}

/// An operator will not find an overridden value in the file, so an error about it names
/// the environment variable that set it.
fn note_env_source(error: &mut ConfigError, overridden: &[(String, String)]) {
    let source = overridden
        .iter()
        .filter(|(path, _)| {
            covers(path, &error.path)
                || (covers(&error.path, path) && error.message.starts_with("unknown field"))
        })
        .max_by_key(|(path, _)| path.len());
    if let Some((_, name)) = source {
        error
            .message
            .push_str(&format!(" (set by environment variable {name})"));
    }
}

/// Whether `path` is `prefix` or lies inside it (`listeners[0]` covers `listeners[0].bind`).
fn covers(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

fn syntax_error(kind: &str, err: &dyn fmt::Display) -> ConfigErrors {
    let message = err.to_string();
    ConfigErrors(vec![ConfigError {
        path: String::new(),
        message: format!("invalid {kind}: {}", message.trim_end()),
    }])
}

/// `GATEHOUSE_LISTENERS__0__BIND=0.0.0.0:80` sets `listeners[0].bind`. Values are read as
/// TOML scalars when they parse as one (`4`, `true`), else as strings. Returns the config
/// path each applied variable set (`listeners[0].bind`) with the variable's name.
fn apply_env_overrides(
    root: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<ConfigError>,
) -> Vec<(String, String)> {
    let mut applied = Vec::new();
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
        match set_path(root, &segments, env_value(&raw)) {
            Ok(()) => applied.push((render_path(&segments), name)),
            Err(message) => errors.push(ConfigError {
                path: format!("env {name}"),
                message,
            }),
        }
    }
    applied
}

/// `["listeners", "0", "bind"]` → `listeners[0].bind`.
fn render_path(segments: &[String]) -> String {
    let mut path = String::new();
    for segment in segments {
        if segment.parse::<usize>().is_ok() {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
        }
    }
    path
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
            // A missing table is created; a missing list stays empty, so an index into it
            // is reported as out of range rather than turning the list into a table.
            let child = map
                .entry(first.clone())
                .or_insert_with(|| match rest.first() {
                    None => Value::Null,
                    Some(next) if next.parse::<usize>().is_ok() => Value::Array(Vec::new()),
                    Some(_) => Value::Object(Map::new()),
                });
            set_path(child, rest, value)
        }
        _ => Err(format!("cannot set {first:?} inside a scalar value")),
    }
}

/// Mistakes reported from one element before giving up on it.
const MAX_ERRORS_PER_SECTION: usize = 32;

/// Deserializes one value, turning serde errors into path-carrying `ConfigError`s. serde
/// stops at the first error, so the offending field is then removed and the value tried
/// again: one element with an unknown field and a bad size reports both.
fn section<T: DeserializeOwned>(
    mut value: Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..MAX_ERRORS_PER_SECTION {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(parsed) => return removed.is_empty().then_some(parsed),
            Err(err) => err,
        };
        let segments: Vec<Segment> = err.path().iter().cloned().collect();
        let inner = err.path().to_string();
        let full = join_path(path, &inner);
        let message = humanize(&err.into_inner().to_string());
        if let Some(field) = missing_field(&message) {
            if removed.contains(&join_path(&full, field)) {
                // A required field this loop removed: already reported.
                return None;
            }
        }
        errors.push(ConfigError {
            path: full.clone(),
            message,
        });
        if !remove_field(&mut value, &segments) {
            return None;
        }
        removed.push(full);
    }
    None
}

/// Appends a serde path (`.` for the value itself, `[1].x` or `x.y`) to `path`.
fn join_path(path: &str, inner: &str) -> String {
    match (path.is_empty(), inner == ".") {
        (_, true) => path.to_string(),
        (true, false) => inner.to_string(),
        (false, false) if inner.starts_with('[') => format!("{path}{inner}"),
        (false, false) => format!("{path}.{inner}"),
    }
}

/// The field named in serde's "missing field `name`".
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

/// Removes the table key at `segments`; false when the path does not end in one (list
/// elements stay, so later indexes keep their meaning).
fn remove_field(value: &mut Value, segments: &[Segment]) -> bool {
    let Some((Segment::Map { key }, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = value;
    for segment in parents {
        let next = match (segment, node) {
            (Segment::Seq { index }, Value::Array(items)) => items.get_mut(*index),
            (Segment::Map { key }, Value::Object(map)) => map.get_mut(key),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match node {
        Value::Object(map) => map.remove(key).is_some(),
        _ => false,
    }
}

/// serde names Rust types ("expected usize", "expected struct ListenerLimits"); say what
/// an operator writes instead.
fn humanize(message: &str) -> String {
    const TYPES: &[(&str, &str)] = &[
        ("usize", "a non-negative integer"),
        ("u64", "a non-negative integer"),
        ("u32", "an integer between 0 and 4294967295"),
        ("u16", "an integer between 0 and 65535"),
        ("u8", "an integer between 0 and 255"),
        ("i64", "an integer"),
        ("i32", "an integer between -2147483648 and 2147483647"),
        ("f64", "a number"),
        ("a sequence", "a list"),
        ("a map", "a table"),
    ];
    let message = message
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: list");
    if let Some(start) = message.rfind("expected struct ") {
        return format!("{}expected a table", &message[..start]);
    }
    for (rust, human) in TYPES {
        if let Some(head) = message.strip_suffix(&format!("expected {rust}")) {
            return format!("{head}expected {human}");
        }
    }
    message
}

/// The elements of a list that parsed, with the index each had in the file. Elements that
/// did not parse are noted in `unparsed` under `path`.
fn list<T: DeserializeOwned>(
    value: Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
    unparsed: &mut Vec<(String, Option<String>)>,
) -> (Vec<T>, Vec<usize>) {
    match value {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(index, item)| {
                let name = item.get("name").and_then(Value::as_str).map(str::to_string);
                let parsed = section(item, &format!("{path}[{index}]"), errors);
                if parsed.is_none() {
                    unparsed.push((path.to_string(), name));
                }
                parsed.map(|parsed| (parsed, index))
            })
            .unzip(),
        other => {
            errors.push(ConfigError {
                path: path.to_string(),
                message: format!("expected a list, found {}", kind_of(&other)),
            });
            unparsed.push((path.to_string(), None));
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
    /// `(section, name)` of each list element that failed to parse (or the whole section,
    /// when it was not a list), so later checks do not add a second, misleading error.
    pub unparsed: Vec<(String, Option<String>)>,
}

impl FileIndexes {
    /// The names (where they had one) of the elements of `section` that failed to parse.
    pub fn unparsed_in<'a>(&'a self, section: &'a str) -> impl Iterator<Item = Option<&'a str>> {
        self.unparsed
            .iter()
            .filter(move |(listed, _)| listed == section)
            .map(|(_, name)| name.as_deref())
    }
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
            "metrics" => config.metrics = section(value, &key, errors).unwrap_or_default(),
            "tracing" => config.tracing = section(value, &key, errors).unwrap_or_default(),
            "http" => config.http = section(value, &key, errors).unwrap_or_default(),
            "tls" => config.tls = section(value, &key, errors).unwrap_or_default(),
            "acme" => config.acme = section(value, &key, errors).unwrap_or_default(),
            "firewall" => config.firewall = section(value, &key, errors).unwrap_or_default(),
            "watch_interval" => {
                if let Some(parsed) = section(value, &key, errors) {
                    config.watch_interval = parsed;
                }
            }
            "demo" => config.demo = section(value, &key, errors).unwrap_or_default(),
            "listeners" => {
                (config.listeners, indexes.listeners) =
                    list(value, &key, errors, &mut indexes.unparsed)
            }
            "pools" => {
                (config.pools, indexes.pools) = list(value, &key, errors, &mut indexes.unparsed)
            }
            "routes" => {
                (config.routes, indexes.routes) = list(value, &key, errors, &mut indexes.unparsed)
            }
            "store" => config.store = section(value, &key, errors).unwrap_or_default(),
            "admin" => config.admin = section(value, &key, errors).unwrap_or_default(),
            "bundles" => config.bundles = section(value, &key, errors).unwrap_or_default(),
            "pull" => config.pull = section(value, &key, errors).unwrap_or_default(),
            _ => errors.push(ConfigError {
                path: key.clone(),
                message: format!("unknown field; expected one of {}", SECTIONS.join(", ")),
            }),
        }
    }
    (config, indexes)
}
