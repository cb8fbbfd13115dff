//! Route matching: compiles route conditions into lookup structures once per snapshot and
//! finds the winning route for a request without scanning every route.
//!
//! Structure: host → (exact map | wildcard suffix map | any host) → per-host path index
//! (exact map, segment trie for prefixes, one `RegexSet` for regexes, and routes with no
//! path condition). Each candidate list is sorted by rank, so a lookup walks a handful of
//! short lists and stops at the first candidate whose remaining conditions (method,
//! headers, query, source) hold.
//!
//! Rank order (documented in docs/CONFIG.md): higher `priority` first; then host
//! specificity (exact, longer wildcard, shorter wildcard, any host); then path specificity
//! (exact, regex, longer prefix, shorter prefix, none); then more conditions first; then
//! config order.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, Method};
use ipnet::IpNet;
use regex::{Regex, RegexSet};

/// Route maps are built once per snapshot and read on every request; foldhash is several
/// times faster than SipHash for short keys and still seeded per process, so client-chosen
/// hosts and paths cannot be aimed at collisions.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use crate::config::{MatchConfig, RouteConfig, ValueMatchConfig};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("routes[{index}].{field}: {message}")]
    Invalid {
        index: usize,
        field: &'static str,
        message: String,
    },
}

/// What the router needs to know about a request.
pub struct RequestFacts<'a> {
    /// Lower-case host without port (see `normalize_host`).
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub client_ip: IpAddr,
}

/// Lower-cases a `Host` / `:authority` value and removes its port, allocating only when
/// the value has upper-case letters.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let without_port = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split_once(']').map_or(raw, |(inner, _)| inner)
    } else {
        raw.rsplit_once(':').map_or(raw, |(host, _)| host)
    };
    let trimmed = without_port.strip_suffix('.').unwrap_or(without_port);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    }
}

/// Conditions checked after the structural (host/path) lookup.
struct Conditions {
    methods: Vec<Method>,
    headers: Vec<(HeaderName, ValueCondition)>,
    query: Vec<(String, ValueCondition)>,
    sources: Vec<IpNet>,
    path_regex: Option<Regex>,
}

enum ValueCondition {
    Equals(String),
    Regex(Regex),
    Present,
    Absent,
}

impl ValueCondition {
    fn compile(config: &ValueMatchConfig) -> Result<Self, String> {
        if let Some(value) = &config.value {
            return Ok(ValueCondition::Equals(value.clone()));
        }
        if let Some(pattern) = &config.regex {
            return Regex::new(pattern)
                .map(ValueCondition::Regex)
                .map_err(|e| e.to_string());
        }
        match config.present {
            Some(false) => Ok(ValueCondition::Absent),
            _ => Ok(ValueCondition::Present),
        }
    }

    fn holds<'v>(&self, mut values: impl Iterator<Item = &'v str>) -> bool {
        match self {
            ValueCondition::Equals(expected) => values.any(|v| v == expected),
            ValueCondition::Regex(regex) => values.any(|v| regex.is_match(v)),
            ValueCondition::Present => values.next().is_some(),
            ValueCondition::Absent => values.next().is_none(),
        }
    }
}

impl Conditions {
    fn holds(&self, facts: &RequestFacts<'_>) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(facts.method) {
            return false;
        }
        if let Some(regex) = &self.path_regex {
            // The RegexSet pre-filters; this confirms for the one candidate being checked.
            if !regex.is_match(facts.path) {
                return false;
            }
        }
        if !self.sources.is_empty()
            && !self
                .sources
                .iter()
                .any(|net| net.contains(&facts.client_ip))
        {
            return false;
        }
        for (name, condition) in &self.headers {
            let values = facts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok());
            if !condition.holds(values) {
                return false;
            }
        }
        for (name, condition) in &self.query {
            let query = facts.query.unwrap_or("");
            let pairs = form_urlencoded::parse(query.as_bytes());
            let values: Vec<Cow<'_, str>> = pairs
                .filter(|(key, _)| key == name)
                .map(|(_, v)| v)
                .collect();
            if !condition.holds(values.iter().map(|v| v.as_ref())) {
                return false;
            }
        }
        true
    }

    fn count(&self) -> usize {
        self.methods.len().min(1)
            + self.headers.len()
            + self.query.len()
            + self.sources.len().min(1)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum HostClass {
    Exact,
    Wildcard(Reverse<usize>),
    Any,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PathClass {
    Exact,
    /// Regexes beat prefixes, as nginx's regex locations beat plain prefix locations.
    Regex,
    Prefix(Reverse<usize>),
    Any,
}

enum PathForm {
    Exact(String),
    Prefix(Vec<String>),
    Regex(String),
    Any,
}

/// One (route, host pattern) pair; a route with three hosts has three entries.
struct Entry {
    route: u32,
    host: HostKey,
    path: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum HostKey {
    Exact(String),
    Wildcard(String),
    Any,
}

#[derive(Default)]
struct TrieNode {
    children: HashMap<Box<str>, TrieNode>,
    ranks: Vec<u32>,
}

struct PathIndex {
    /// The best rank anywhere in this index: a lookup that already holds a better one
    /// skips the index (exact-host routes outrank wildcard and host-less ones at equal
    /// priority, so with a known host the other indexes are usually not consulted).
    min_rank: u32,
    exact: HashMap<Box<str>, Vec<u32>>,
    prefixes: TrieNode,
    regex: Option<(RegexSet, Vec<u32>)>,
    regex_pending: Vec<(String, u32)>,
    any: Vec<u32>,
}

impl Default for PathIndex {
    fn default() -> Self {
        PathIndex {
            min_rank: u32::MAX,
            exact: HashMap::default(),
            prefixes: TrieNode::default(),
            regex: None,
            regex_pending: Vec::new(),
            any: Vec::new(),
        }
    }
}

impl PathIndex {
    fn insert(&mut self, form: &PathForm, rank: u32) {
        self.min_rank = self.min_rank.min(rank);
        match form {
            PathForm::Exact(path) => self
                .exact
                .entry(path.as_str().into())
                .or_default()
                .push(rank),
            PathForm::Prefix(segments) => {
                let mut node = &mut self.prefixes;
                for segment in segments {
                    node = node.children.entry(segment.as_str().into()).or_default();
                }
                node.ranks.push(rank);
            }
            PathForm::Regex(pattern) => self.regex_pending.push((pattern.clone(), rank)),
            PathForm::Any => self.any.push(rank),
        }
    }

    fn finish(&mut self) -> Result<(), regex::Error> {
        if !self.regex_pending.is_empty() {
            let pending = std::mem::take(&mut self.regex_pending);
            let set = RegexSet::new(pending.iter().map(|(pattern, _)| pattern))?;
            self.regex = Some((set, pending.into_iter().map(|(_, rank)| rank).collect()));
        }
        Ok(())
    }

    /// The best (lowest) rank in this index whose entry fully matches, if better than `best`.
    fn best(&self, router: &Router, facts: &RequestFacts<'_>, mut best: u32) -> u32 {
        if self.min_rank >= best {
            return best;
        }
        if let Some(ranks) = self.exact.get(facts.path) {
            best = router.first_match(ranks, facts, best);
        }
        let mut node = &self.prefixes;
        best = router.first_match(&node.ranks, facts, best);
        for segment in facts.path.split('/').skip(1) {
            match node.children.get(segment) {
                Some(child) => {
                    node = child;
                    best = router.first_match(&node.ranks, facts, best);
                }
                None => break,
            }
        }
        if let Some((set, ranks)) = &self.regex {
            if ranks.first().is_some_and(|&first| first < best) {
                for index in set.matches(facts.path).iter() {
                    let rank = ranks[index];
                    if rank < best && router.entry_holds(rank, facts) {
                        best = rank;
                    }
                }
            }
        }
        router.first_match(&self.any, facts, best)
    }
}

/// A compiled route table: maps a request to the index of its route in config order.
pub struct Router {
    /// `entry_route[rank]` is the config index of the route behind that rank.
    entry_route: Vec<u32>,
    conditions: Vec<Conditions>,
    exact_hosts: HashMap<Box<str>, PathIndex>,
    wildcard_hosts: HashMap<Box<str>, PathIndex>,
    /// Bit n is set when some wildcard suffix has n labels (`*.a.example.com` → 3), so a
    /// lookup only hashes the suffixes of the request host that could be in the map.
    wildcard_label_counts: u64,
    /// The best rank among wildcard-host entries (see `PathIndex::min_rank`).
    wildcard_min_rank: u32,
    any_host: PathIndex,
}

/// The per-route input to `Router::build`.
pub struct RouteSpec<'a> {
    pub priority: i32,
    pub matcher: &'a MatchConfig,
}

impl Router {
    pub fn build(specs: &[RouteSpec<'_>]) -> Result<Router, RouteError> {
        let mut conditions = Vec::with_capacity(specs.len());
        let mut entries = Vec::new();
        let mut path_forms = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let matcher = spec.matcher;
            let invalid = |field: &'static str, message: String| RouteError::Invalid {
                index,
                field,
                message,
            };
            let path_form = if let Some(path) = &matcher.path {
                PathForm::Exact(path.clone())
            } else if let Some(prefix) = &matcher.path_prefix {
                PathForm::Prefix(prefix_segments(prefix))
            } else if let Some(pattern) = &matcher.path_regex {
                PathForm::Regex(pattern.clone())
            } else {
                PathForm::Any
            };
            let path_regex = match &matcher.path_regex {
                Some(pattern) => Some(
                    Regex::new(pattern).map_err(|e| invalid("match.path_regex", e.to_string()))?,
                ),
                None => None,
            };
            let mut headers = Vec::new();
            for header in &matcher.headers {
                let name = HeaderName::from_bytes(header.name.as_bytes())
                    .map_err(|e| invalid("match.headers", e.to_string()))?;
                headers.push((
                    name,
                    ValueCondition::compile(header).map_err(|e| invalid("match.headers", e))?,
                ));
            }
            let mut query = Vec::new();
            for param in &matcher.query {
                query.push((
                    param.name.clone(),
                    ValueCondition::compile(param).map_err(|e| invalid("match.query", e))?,
                ));
            }
            let mut methods = Vec::new();
            for method in &matcher.methods {
                let upper = method.to_ascii_uppercase();
                methods.push(
                    Method::from_bytes(upper.as_bytes())
                        .map_err(|e| invalid("match.methods", e.to_string()))?,
                );
            }
            conditions.push(Conditions {
                methods,
                headers,
                query,
                sources: matcher.sources_or_empty(),
                path_regex,
            });
            let route = u32::try_from(index).map_err(|_| invalid("", "too many routes".into()))?;
            if matcher.hosts.is_empty() {
                entries.push(Entry {
                    route,
                    host: HostKey::Any,
                    path: index,
                });
            }
            for host in &matcher.hosts {
                let lower = host.to_ascii_lowercase();
                let key = match lower.strip_prefix("*.") {
                    Some(suffix) => HostKey::Wildcard(suffix.to_string()),
                    None => HostKey::Exact(normalize_host(&lower).into_owned()),
                };
                entries.push(Entry {
                    route,
                    host: key,
                    path: index,
                });
            }
            path_forms.push(path_form);
        }

        let sort_key = |entry: &Entry| {
            let spec = &specs[entry.route as usize];
            let host_class = match &entry.host {
                HostKey::Exact(_) => HostClass::Exact,
                HostKey::Wildcard(suffix) => HostClass::Wildcard(Reverse(suffix.len())),
                HostKey::Any => HostClass::Any,
            };
            let path_class = match &path_forms[entry.path] {
                PathForm::Exact(_) => PathClass::Exact,
                PathForm::Prefix(segments) => {
                    PathClass::Prefix(Reverse(segments.iter().map(|s| s.len() + 1).sum()))
                }
                PathForm::Regex(_) => PathClass::Regex,
                PathForm::Any => PathClass::Any,
            };
            (
                Reverse(spec.priority),
                host_class,
                path_class,
                Reverse(conditions[entry.route as usize].count()),
                entry.route,
            )
        };
        entries.sort_by_cached_key(sort_key);

        let mut router = Router {
            entry_route: entries.iter().map(|entry| entry.route).collect(),
            conditions,
            exact_hosts: HashMap::default(),
            wildcard_hosts: HashMap::default(),
            wildcard_label_counts: 0,
            wildcard_min_rank: u32::MAX,
            any_host: PathIndex::default(),
        };
        for (rank, entry) in entries.iter().enumerate() {
            let rank = rank as u32;
            let index = match &entry.host {
                HostKey::Exact(host) => router.exact_hosts.entry(host.as_str().into()).or_default(),
                HostKey::Wildcard(suffix) => {
                    router.wildcard_label_counts |= label_bit(label_count(suffix));
                    router.wildcard_min_rank = router.wildcard_min_rank.min(rank);
                    router
                        .wildcard_hosts
                        .entry(suffix.as_str().into())
                        .or_default()
                }
                HostKey::Any => &mut router.any_host,
            };
            index.insert(&path_forms[entry.path], rank);
        }
        let all_indexes = router
            .exact_hosts
            .values_mut()
            .chain(router.wildcard_hosts.values_mut())
            .chain(std::iter::once(&mut router.any_host));
        for index in all_indexes {
            index.finish().map_err(|e| RouteError::Invalid {
                index: 0,
                field: "match.path_regex",
                message: e.to_string(),
            })?;
        }
        Ok(router)
    }

    /// Builds the router for a config's routes, in config order.
    pub fn for_routes(routes: &[RouteConfig]) -> Result<Router, RouteError> {
        let specs: Vec<RouteSpec<'_>> = routes
            .iter()
            .map(|route| RouteSpec {
                priority: route.priority,
                matcher: &route.matcher,
            })
            .collect();
        Router::build(&specs)
    }

    /// The config index of the winning route.
    pub fn lookup(&self, facts: &RequestFacts<'_>) -> Option<usize> {
        let mut best = u32::MAX;
        if let Some(index) = self.exact_hosts.get(facts.host) {
            best = index.best(self, facts, best);
        }
        if self.wildcard_label_counts != 0 && self.wildcard_min_rank < best {
            let mut rest = facts.host;
            let mut labels = label_count(rest);
            while let Some((_, suffix)) = rest.split_once('.') {
                labels -= 1;
                if self.wildcard_label_counts & label_bit(labels) != 0 {
                    if let Some(index) = self.wildcard_hosts.get(suffix) {
                        best = index.best(self, facts, best);
                    }
                }
                rest = suffix;
            }
        }
        best = self.any_host.best(self, facts, best);
        (best != u32::MAX).then(|| self.entry_route[best as usize] as usize)
    }

    fn entry_holds(&self, rank: u32, facts: &RequestFacts<'_>) -> bool {
        self.conditions[self.entry_route[rank as usize] as usize].holds(facts)
    }

    /// Walks a rank-sorted list and returns the first fully matching rank below `best`.
    fn first_match(&self, ranks: &[u32], facts: &RequestFacts<'_>, best: u32) -> u32 {
        for &rank in ranks {
            if rank >= best {
                break;
            }
            if self.entry_holds(rank, facts) {
                return rank;
            }
        }
        best
    }
}

impl MatchConfig {
    fn sources_or_empty(&self) -> Vec<IpNet> {
        self.source_cidrs.iter().map(IpNet::trunc).collect()
    }
}

fn label_count(host: &str) -> usize {
    host.bytes().filter(|&b| b == b'.').count() + 1
}

/// Hosts with 64 labels or more share the top bit, which only costs them a hash lookup.
fn label_bit(labels: usize) -> u64 {
    1 << labels.min(63)
}

/// `/api/v1/` → `["api", "v1"]`; `/` → `[]` (matches every path).
fn prefix_segments(prefix: &str) -> Vec<String> {
    let trimmed = prefix.trim_end_matches('/');
    trimmed.split('/').skip(1).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(toml_text: &str) -> MatchConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn facts<'a>(
        host: &'a str,
        method: &'a Method,
        path: &'a str,
        headers: &'a HeaderMap,
    ) -> RequestFacts<'a> {
        let (path, query) = match path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path, None),
        };
        RequestFacts {
            host,
            path,
            query,
            method,
            headers,
            client_ip: "10.1.2.3".parse().unwrap(),
        }
    }

    fn build(matchers: &[(i32, MatchConfig)]) -> Router {
        let specs: Vec<RouteSpec> = matchers
            .iter()
            .map(|(priority, matcher)| RouteSpec {
                priority: *priority,
                matcher,
            })
            .collect();
        Router::build(&specs).unwrap()
    }

    #[test]
    fn host_normalization_strips_port_and_case() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert!(matches!(normalize_host("plain.test"), Cow::Borrowed(_)));
    }

    #[test]
    fn prefix_matches_on_segment_boundaries_and_longest_wins() {
        let router = build(&[
            (0, matcher(r#"path_prefix = "/api""#)),
            (0, matcher(r#"path_prefix = "/api/v1/""#)),
            (0, matcher(r#"path_prefix = "/""#)),
        ]);
        let headers = HeaderMap::new();
        let get = Method::GET;
        assert_eq!(router.lookup(&facts("h", &get, "/api", &headers)), Some(0));
        assert_eq!(
            router.lookup(&facts("h", &get, "/api/x", &headers)),
            Some(0)
        );
        assert_eq!(
            router.lookup(&facts("h", &get, "/api/v1/users", &headers)),
            Some(1)
        );
        assert_eq!(router.lookup(&facts("h", &get, "/apix", &headers)), Some(2));
    }

    #[test]
    fn priority_beats_specificity_and_methods_fall_through() {
        let router = build(&[
            (0, matcher("path = \"/x\"\nmethods = [\"POST\"]")),
            (0, matcher(r#"path_prefix = "/""#)),
            (5, matcher(r#"path_regex = "^/y""#)),
        ]);
        let headers = HeaderMap::new();
        assert_eq!(
            router.lookup(&facts("h", &Method::POST, "/x", &headers)),
            Some(0)
        );
        assert_eq!(
            router.lookup(&facts("h", &Method::GET, "/x", &headers)),
            Some(1)
        );
        assert_eq!(
            router.lookup(&facts("h", &Method::GET, "/yes", &headers)),
            Some(2)
        );
    }

    #[test]
    fn wildcard_hosts_match_subdomains_only() {
        let router = build(&[
            (0, matcher(r#"hosts = ["*.example.com"]"#)),
            (0, matcher(r#"hosts = ["api.example.com"]"#)),
        ]);
        let headers = HeaderMap::new();
        let get = Method::GET;
        assert_eq!(
            router.lookup(&facts("api.example.com", &get, "/", &headers)),
            Some(1)
        );
        assert_eq!(
            router.lookup(&facts("a.b.example.com", &get, "/", &headers)),
            Some(0)
        );
        assert_eq!(
            router.lookup(&facts("example.com", &get, "/", &headers)),
            None
        );
    }

    #[test]
    fn exact_hosts_win_at_equal_priority_and_a_higher_priority_wins_across_host_classes() {
        let router = build(&[
            (0, matcher(r#"path_prefix = "/""#)),
            (0, matcher(r#"hosts = ["*.example.com"]"#)),
            (
                0,
                matcher("hosts = [\"api.example.com\"]\npath_prefix = \"/\""),
            ),
            (7, matcher(r#"path_prefix = "/urgent""#)),
            (
                3,
                matcher("hosts = [\"*.example.com\"]\npath_prefix = \"/wild\""),
            ),
        ]);
        let headers = HeaderMap::new();
        let get = Method::GET;
        let at = |host, path| router.lookup(&facts(host, &get, path, &headers));
        // Equal priority: exact host, then wildcard, then no host.
        assert_eq!(at("api.example.com", "/x"), Some(2));
        assert_eq!(at("www.example.com", "/x"), Some(1));
        assert_eq!(at("other.test", "/x"), Some(0));
        // A higher priority beats a more specific host, whichever index holds it.
        assert_eq!(at("api.example.com", "/urgent/1"), Some(3));
        assert_eq!(at("api.example.com", "/wild"), Some(4));
        assert_eq!(at("other.test", "/wild"), Some(0));
    }

    #[test]
    fn header_query_and_source_conditions() {
        let router = build(&[
            (
                0,
                matcher("[[headers]]\nname = \"x-canary\"\nvalue = \"1\""),
            ),
            (0, matcher("[[query]]\nname = \"debug\"\npresent = true")),
            (0, matcher(r#"source_cidrs = ["192.168.0.0/16"]"#)),
            (
                0,
                matcher("[[headers]]\nname = \"x-block\"\npresent = false"),
            ),
        ]);
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "1".parse().unwrap());
        let mut blocked = HeaderMap::new();
        blocked.insert("x-block", "yes".parse().unwrap());
        let get = Method::GET;
        assert_eq!(router.lookup(&facts("h", &get, "/", &canary)), Some(0));
        assert_eq!(
            router.lookup(&facts("h", &get, "/?a=1&debug", &blocked)),
            Some(1)
        );
        assert_eq!(router.lookup(&facts("h", &get, "/", &blocked)), None);
        assert_eq!(
            router.lookup(&facts("h", &get, "/", &HeaderMap::new())),
            Some(3)
        );
    }
}
