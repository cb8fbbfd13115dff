//! Route matching: compiles route conditions into lookup structures once per snapshot and
//! finds the winning route for a request without scanning every route.
//!
//! Structure: host → (exact host | wildcard suffix | any host) → path index. A path index
//! is a trie of path segments whose nodes hold rank-sorted candidate lists: the root
//! holds routes with no path condition and `path_prefix = "/"`, deeper nodes hold longer
//! prefixes and the regex routes whose pattern is anchored to a literal leading path
//! (`^/api/v1/...` hangs under `api` → `v1`, so only a request walking that far runs it);
//! exact paths are keys of their own. A router keeps its keys in two flat tables, one for
//! hosts and one for trie nodes and exact paths of every index; a slot is one cache line
//! holding a short key inline and the node's first candidate, so a probe compares bytes
//! where it lands instead of following a pointer to each key. Trie nodes are keyed by
//! their whole prefix, so the probes for one path's segments do not wait on each other.
//! A lookup stops at the first candidate of each list whose remaining conditions (method,
//! headers, query, source) hold; candidates without such conditions carry a flag and are
//! accepted without touching the route's conditions.
//!
//! Rank order (documented in docs/CONFIG.md): higher `priority` first; then host
//! specificity (exact, longer wildcard, shorter wildcard, any host); then path specificity
//! (exact, regex, longer prefix, shorter prefix, none); then more conditions first; then
//! config order.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::hash::BuildHasher;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, Method};
use ipnet::IpNet;
use regex::{Regex, RegexSet};
use regex_syntax::hir::literal::{ExtractKind, Extractor};
use regex_syntax::hir::Look;

/// Build-time maps. The lookup tables are `KeyTable`s; both are seeded per process
/// (foldhash), so client-chosen hosts and paths cannot be aimed at collisions.
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
    /// Only for a route whose regex is not already its path form (an unvalidated matcher
    /// with `path_regex` beside `path` or `path_prefix`); a regex path form is proven by
    /// the regex group that found the candidate.
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

    /// Whether anything is left to check once host and path matched.
    fn is_empty(&self) -> bool {
        self.methods.is_empty()
            && self.headers.is_empty()
            && self.query.is_empty()
            && self.sources.is_empty()
            && self.path_regex.is_none()
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
    Regex(Regex),
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

/// A rank and the config index of the route behind it, with `CHECK` set when the route has
/// conditions beyond host and path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cand {
    rank: u32,
    route: u32,
}

const CHECK: u32 = 1 << 31;
const NONE: u32 = u32::MAX;
const NO_MATCH: Cand = Cand {
    rank: NONE,
    route: NONE,
};

/// Keys up to this length are stored in the table slot itself.
const INLINE: usize = 28;

/// One slot of a `KeyTable`: `(scope, key) → value`, one cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Slot<V> {
    /// High bits of the key's hash, never 0; 0 marks an empty slot.
    tag: u32,
    scope: u32,
    len: u32,
    value: V,
    /// The key's bytes when `len <= INLINE`, else its offset in the table's arena in the
    /// first four bytes.
    bytes: [u8; INLINE],
}

const _: () = assert!(std::mem::size_of::<Slot<PathIndex>>() == 64);
const _: () = assert!(std::mem::size_of::<Slot<NodeRef>>() == 64);

impl<V> Slot<V> {
    fn key<'a>(&'a self, arena: &'a [u8]) -> &'a [u8] {
        let len = self.len as usize;
        if len <= INLINE {
            &self.bytes[..len]
        } else {
            let start =
                u32::from_ne_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
                    as usize;
            arena.get(start..start + len).unwrap_or_default()
        }
    }
}

/// An open-addressing hash table (linear probing, at most half full) from
/// `(scope, byte string)` to `V`, scope being a host class or a path index. A key up to
/// `INLINE` bytes sits in its slot with the value, so a hit costs one cache line and
/// compares the key word by word, without a pointer to follow or a `memcmp` call.
struct KeyTable<V> {
    slots: Vec<Slot<V>>,
    mask: usize,
    arena: Vec<u8>,
    hasher: foldhash::fast::RandomState,
}

impl<V: Copy + Default> KeyTable<V> {
    /// `entries`: unique keys (the builder deduplicates them first).
    fn new<'k>(
        entries: impl ExactSizeIterator<Item = (u32, &'k [u8], V)>,
    ) -> Result<Self, &'static str> {
        let capacity = (entries.len() * 2).max(2).next_power_of_two();
        let empty = Slot {
            tag: 0,
            scope: 0,
            len: 0,
            value: V::default(),
            bytes: [0; INLINE],
        };
        let mut table = KeyTable {
            slots: vec![empty; capacity],
            mask: capacity - 1,
            arena: Vec::new(),
            hasher: foldhash::fast::RandomState::default(),
        };
        for (scope, key, value) in entries {
            let len = u32::try_from(key.len()).map_err(|_| "key too long")?;
            let mut bytes = [0u8; INLINE];
            if key.len() <= INLINE {
                bytes[..key.len()].copy_from_slice(key);
            } else {
                let offset = u32::try_from(table.arena.len()).map_err(|_| "keys too long")?;
                bytes[..4].copy_from_slice(&offset.to_ne_bytes());
                table.arena.extend_from_slice(key);
            }
            let (tag, mut position) = table.place(scope, key);
            while table.slots[position].tag != 0 {
                position = (position + 1) & table.mask;
            }
            table.slots[position] = Slot {
                tag,
                scope,
                len,
                value,
                bytes,
            };
        }
        Ok(table)
    }

    #[inline]
    fn place(&self, scope: u32, key: &[u8]) -> (u32, usize) {
        let hash = self.hasher.hash_one((scope, key));
        ((hash >> 32) as u32 | 1, hash as usize & self.mask)
    }

    #[inline]
    fn get(&self, scope: u32, key: &[u8]) -> Option<&V> {
        let (tag, mut position) = self.place(scope, key);
        // At most half full, so the probe meets an empty slot.
        loop {
            let slot = self.slots.get(position)?;
            if slot.tag == 0 {
                return None;
            }
            if slot.tag == tag
                && slot.scope == scope
                && slot.len as usize == key.len()
                && bytes_eq(slot.key(&self.arena), key)
            {
                return Some(&slot.value);
            }
            position = (position + 1) & self.mask;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot<V>>() + self.arena.capacity()
    }
}

/// Equal-length byte strings compared eight bytes at a time. Keys are short, and a call
/// into the C library's `memcmp` for each one was a quarter of lookup time.
#[inline]
fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut words_a = a.chunks_exact(8);
    let mut words_b = b.chunks_exact(8);
    for (x, y) in (&mut words_a).zip(&mut words_b) {
        if word(x) != word(y) {
            return false;
        }
    }
    words_a
        .remainder()
        .iter()
        .zip(words_b.remainder())
        .all(|(x, y)| x == y)
}

#[inline]
fn word(chunk: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(chunk);
    u64::from_ne_bytes(bytes)
}

/// Position of the first `byte` in `haystack`; a plain loop, as keys are a few bytes long.
#[inline]
fn find_byte(haystack: &[u8], byte: u8) -> Option<usize> {
    haystack.iter().position(|&b| b == byte)
}

/// What a lookup finds for one trie node or exact path: its first candidate inline (most
/// lists have one), and `more` (`nodes` position) when the list is longer or the node has
/// regex routes.
#[derive(Clone, Copy)]
struct NodeRef {
    first: Cand,
    more: u32,
}

impl Default for NodeRef {
    fn default() -> Self {
        NodeRef {
            first: NO_MATCH,
            more: NONE,
        }
    }
}

/// A node's whole list, `cands[start..end]`, and its regex group (or `NONE`).
#[derive(Clone, Copy)]
struct Node {
    start: u32,
    end: u32,
    regex: u32,
}

/// Regex routes hung on one trie node.
enum RegexGroup {
    One(Regex, Cand),
    /// Candidates in pattern order, which is rank order.
    Many(RegexSet, Vec<Cand>),
}

/// One host's (or one wildcard suffix's, or the host-less) path index. Its trie nodes and
/// exact paths are keys of `Router::paths` in this index's scopes.
#[derive(Clone, Copy)]
struct PathIndex {
    /// Scope of the index's prefix keys; `scope + 1` is the scope of its exact paths.
    scope: u32,
    /// The best rank anywhere in this index: a lookup that already holds a better one
    /// skips the index (exact-host routes outrank wildcard and host-less ones at equal
    /// priority, so with a known host the other indexes are usually not consulted).
    min_rank: u32,
    /// Routes with no path condition or `path_prefix = "/"`.
    root: NodeRef,
    has_exact: bool,
}

impl Default for PathIndex {
    fn default() -> Self {
        PathIndex {
            scope: 0,
            min_rank: NONE,
            root: NodeRef::default(),
            has_exact: false,
        }
    }
}

/// A compiled route table: maps a request to the index of its route in config order.
pub struct Router {
    conditions: Vec<Conditions>,
    /// Exact host (scope `EXACT_HOSTS`) or wildcard suffix (`WILDCARD_HOSTS`) → its index.
    hosts: KeyTable<PathIndex>,
    any_host: PathIndex,
    /// `(index scope, segments joined by '/')` → that prefix's trie node, and
    /// `(index scope + 1, path)` → that exact path's list. A trie node's key is its whole
    /// prefix rather than (parent, segment), so the probes for a path's segments do not
    /// wait on one another and their cache misses overlap.
    paths: KeyTable<NodeRef>,
    nodes: Vec<Node>,
    cands: Vec<Cand>,
    regexes: Vec<RegexGroup>,
    /// Bit n is set when some wildcard suffix has n labels (`*.a.example.com` → 3), so a
    /// lookup only hashes the suffixes of the request host that could be in the table.
    wildcard_label_counts: u64,
    /// The best rank among wildcard-host entries (see `PathIndex::min_rank`).
    wildcard_min_rank: u32,
}

const EXACT_HOSTS: u32 = 0;
const WILDCARD_HOSTS: u32 = 1;

/// The per-route input to `Router::build`.
pub struct RouteSpec<'a> {
    pub priority: i32,
    pub matcher: &'a MatchConfig,
}

/// A path index under construction.
struct IndexBuild {
    min_rank: u32,
    root: usize,
    has_exact: bool,
}

/// The router under construction: growable lists, keys in ordinary maps.
#[derive(Default)]
struct Builder {
    indexes: Vec<IndexBuild>,
    node_cands: Vec<Vec<Cand>>,
    node_regexes: Vec<Vec<(Regex, Cand)>>,
    /// `(scope, key)` → node, for prefixes and exact paths alike.
    paths: HashMap<(u32, String), usize>,
}

impl Builder {
    fn new_node(&mut self) -> usize {
        self.node_cands.push(Vec::new());
        self.node_regexes.push(Vec::new());
        self.node_cands.len() - 1
    }

    fn new_index(&mut self) -> usize {
        let root = self.new_node();
        self.indexes.push(IndexBuild {
            min_rank: NONE,
            root,
            has_exact: false,
        });
        self.indexes.len() - 1
    }

    fn scope(index: usize) -> u32 {
        (index as u32) * 2
    }

    fn node(&mut self, scope: u32, key: String) -> usize {
        if let Some(&node) = self.paths.get(&(scope, key.clone())) {
            return node;
        }
        let node = self.new_node();
        self.paths.insert((scope, key), node);
        node
    }

    /// The node of a prefix, creating it and every shorter prefix: a lookup stops at the
    /// first segment with no node.
    fn descend(&mut self, index: usize, segments: &[String]) -> usize {
        let mut node = self.indexes[index].root;
        for depth in 1..=segments.len() {
            node = self.node(Builder::scope(index), segments[..depth].join("/"));
        }
        node
    }

    /// Entries arrive in rank order, so every list stays sorted by rank.
    fn insert(&mut self, index: usize, form: &PathForm, cand: Cand) {
        self.indexes[index].min_rank = self.indexes[index].min_rank.min(cand.rank);
        match form {
            PathForm::Exact(path) => {
                self.indexes[index].has_exact = true;
                let node = self.node(Builder::scope(index) + 1, path.clone());
                self.node_cands[node].push(cand);
            }
            PathForm::Prefix(segments) => {
                let node = self.descend(index, segments);
                self.node_cands[node].push(cand);
            }
            PathForm::Regex(regex) => {
                let node = self.descend(index, &regex_anchor_segments(regex.as_str()));
                self.node_regexes[node].push((regex.clone(), cand));
            }
            PathForm::Any => {
                let root = self.indexes[index].root;
                self.node_cands[root].push(cand);
            }
        }
    }
}

/// The leading path segments every match of `pattern` must have, when the pattern is
/// anchored at the start and begins with a literal path (`^/api/v1/.*` → `api`, `v1`).
/// Any doubt gives no segments, which hangs the regex on the index's root: correct for
/// every pattern, only slower.
fn regex_anchor_segments(pattern: &str) -> Vec<String> {
    let Ok(hir) = regex_syntax::Parser::new().parse(pattern) else {
        return Vec::new();
    };
    if !hir.properties().look_set_prefix().contains(Look::Start) {
        return Vec::new();
    }
    let mut extractor = Extractor::new();
    extractor.kind(ExtractKind::Prefix);
    let literals = extractor.extract(&hir);
    // Every match begins with one of the literals, so with their common prefix.
    let Some(prefix) = literals.longest_common_prefix() else {
        return Vec::new();
    };
    // Only whole segments count: `^/re3/[0-9]+` needs the segment `re3`; `^/re3` could
    // continue the segment (`/re30`).
    let Some(last_slash) = prefix.iter().rposition(|&b| b == b'/') else {
        return Vec::new();
    };
    if prefix.first() != Some(&b'/') || last_slash == 0 {
        return Vec::new();
    }
    match std::str::from_utf8(&prefix[1..last_slash]) {
        Ok(leading) => leading.split('/').map(str::to_string).collect(),
        Err(_) => Vec::new(),
    }
}

impl Router {
    pub fn build(specs: &[RouteSpec<'_>]) -> Result<Router, RouteError> {
        let mut conditions = Vec::with_capacity(specs.len());
        let mut entries = Vec::new();
        let mut path_forms = Vec::with_capacity(specs.len());
        let mut header_names: HashMap<String, HeaderName> = HashMap::default();
        for (index, spec) in specs.iter().enumerate() {
            let matcher = spec.matcher;
            let invalid = |field: &'static str, message: String| RouteError::Invalid {
                index,
                field,
                message,
            };
            let path_regex = match &matcher.path_regex {
                Some(pattern) => Some(
                    Regex::new(pattern).map_err(|e| invalid("match.path_regex", e.to_string()))?,
                ),
                None => None,
            };
            let (path_form, path_regex) = if let Some(path) = &matcher.path {
                (PathForm::Exact(path.clone()), path_regex)
            } else if let Some(prefix) = &matcher.path_prefix {
                (PathForm::Prefix(prefix_segments(prefix)), path_regex)
            } else if let Some(regex) = path_regex {
                (PathForm::Regex(regex), None)
            } else {
                (PathForm::Any, None)
            };
            let mut headers = Vec::new();
            for header in &matcher.headers {
                // One shared allocation per distinct name: thousands of routes testing
                // the same header then read the same bytes.
                let name = match header_names.get(&header.name) {
                    Some(name) => HeaderName::clone(name),
                    None => {
                        let name = HeaderName::from_bytes(header.name.as_bytes())
                            .map_err(|e| invalid("match.headers", e.to_string()))?;
                        header_names.insert(header.name.clone(), name.clone());
                        name
                    }
                };
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
            // The top bit is the candidate's `CHECK` flag.
            let route = u32::try_from(index)
                .ok()
                .filter(|&route| route < CHECK)
                .ok_or_else(|| invalid("", "too many routes".into()))?;
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
        // Ranks are u32 and `NONE` means no match.
        if entries.len() >= NONE as usize {
            return Err(RouteError::Invalid {
                index: 0,
                field: "match.hosts",
                message: "too many route and host pairs".into(),
            });
        }

        let mut builder = Builder::default();
        let any_host = builder.new_index();
        let mut host_indexes: HashMap<(u32, String), usize> = HashMap::default();
        let mut wildcard_label_counts = 0;
        let mut wildcard_min_rank = NONE;
        for (rank, entry) in entries.iter().enumerate() {
            let rank = rank as u32;
            let (scope, key) = match &entry.host {
                HostKey::Exact(host) => (EXACT_HOSTS, host),
                HostKey::Wildcard(suffix) => {
                    wildcard_label_counts |= label_bit(label_count(suffix));
                    wildcard_min_rank = wildcard_min_rank.min(rank);
                    (WILDCARD_HOSTS, suffix)
                }
                HostKey::Any => (EXACT_HOSTS, &String::new()),
            };
            let index = match (&entry.host, host_indexes.get(&(scope, key.clone()))) {
                (HostKey::Any, _) => any_host,
                (_, Some(&position)) => position,
                (_, None) => {
                    let position = builder.new_index();
                    host_indexes.insert((scope, key.clone()), position);
                    position
                }
            };
            let route = entry.route as usize;
            let check = if conditions[route].is_empty() {
                0
            } else {
                CHECK
            };
            let cand = Cand {
                rank,
                route: entry.route | check,
            };
            builder.insert(index, &path_forms[entry.path], cand);
        }

        // Flatten: every list into `cands`, a `Node` for each list that a `NodeRef`
        // cannot hold alone.
        let mut cands = Vec::with_capacity(builder.node_cands.iter().map(Vec::len).sum());
        let mut nodes = Vec::new();
        let mut regexes = Vec::new();
        let mut refs = Vec::with_capacity(builder.node_cands.len());
        for (list, group) in builder.node_cands.iter().zip(builder.node_regexes) {
            let first = list.first().copied().unwrap_or(NO_MATCH);
            if list.len() <= 1 && group.is_empty() {
                refs.push(NodeRef { first, more: NONE });
                continue;
            }
            let start = cands.len() as u32;
            cands.extend_from_slice(list);
            let regex = match <[_; 1]>::try_from(group) {
                Ok([(regex, cand)]) => {
                    regexes.push(RegexGroup::One(regex, cand));
                    (regexes.len() - 1) as u32
                }
                Err(group) if group.is_empty() => NONE,
                Err(group) => {
                    let set = RegexSet::new(group.iter().map(|(regex, _)| regex.as_str()))
                        .map_err(|e| RouteError::Invalid {
                            index: 0,
                            field: "match.path_regex",
                            message: e.to_string(),
                        })?;
                    regexes.push(RegexGroup::Many(
                        set,
                        group.into_iter().map(|(_, cand)| cand).collect(),
                    ));
                    (regexes.len() - 1) as u32
                }
            };
            nodes.push(Node {
                start,
                end: cands.len() as u32,
                regex,
            });
            refs.push(NodeRef {
                first,
                more: (nodes.len() - 1) as u32,
            });
        }
        let index_of = |position: usize| {
            let index = &builder.indexes[position];
            PathIndex {
                scope: Builder::scope(position),
                min_rank: index.min_rank,
                root: refs[index.root],
                has_exact: index.has_exact,
            }
        };
        let table_error = |message: &'static str| RouteError::Invalid {
            index: 0,
            field: "match",
            message: message.into(),
        };
        let hosts = KeyTable::new(
            host_indexes
                .iter()
                .map(|((scope, key), &position)| (*scope, key.as_bytes(), index_of(position))),
        )
        .map_err(table_error)?;
        let paths = KeyTable::new(
            builder
                .paths
                .iter()
                .map(|((scope, key), &node)| (*scope, key.as_bytes(), refs[node])),
        )
        .map_err(table_error)?;
        Ok(Router {
            conditions,
            hosts,
            any_host: index_of(any_host),
            paths,
            nodes,
            cands,
            regexes,
            wildcard_label_counts,
            wildcard_min_rank,
        })
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

    /// Bytes the lookup structures hold on the heap, beyond the routes' compiled
    /// conditions and regexes (for docs/BENCHMARKS.md; not on any request path).
    pub fn index_heap_bytes(&self) -> usize {
        self.hosts.heap_bytes()
            + self.paths.heap_bytes()
            + self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.cands.capacity() * std::mem::size_of::<Cand>()
    }

    /// The config index of the winning route.
    pub fn lookup(&self, facts: &RequestFacts<'_>) -> Option<usize> {
        let mut best = NO_MATCH;
        if let Some(index) = self.hosts.get(EXACT_HOSTS, facts.host.as_bytes()) {
            best = self.index_best(index, facts, best);
        }
        if self.wildcard_label_counts != 0 && self.wildcard_min_rank < best.rank {
            let mut rest = facts.host.as_bytes();
            let mut labels = rest.iter().filter(|&&b| b == b'.').count() + 1;
            while let Some(dot) = find_byte(rest, b'.') {
                let suffix = &rest[dot + 1..];
                labels -= 1;
                if self.wildcard_label_counts & label_bit(labels) != 0 {
                    if let Some(index) = self.hosts.get(WILDCARD_HOSTS, suffix) {
                        best = self.index_best(index, facts, best);
                    }
                }
                rest = suffix;
            }
        }
        best = self.index_best(&self.any_host, facts, best);
        (best.rank != NONE).then_some((best.route & !CHECK) as usize)
    }

    /// The best candidate in one path index that fully matches, if better than `best`.
    fn index_best(&self, index: &PathIndex, facts: &RequestFacts<'_>, mut best: Cand) -> Cand {
        if index.min_rank >= best.rank {
            return best;
        }
        let path = facts.path.as_bytes();
        if index.has_exact {
            if let Some(node) = self.paths.get(index.scope + 1, path) {
                best = self.node_best(node, facts, best);
            }
        }
        best = self.node_best(&index.root, facts, best);
        // Prefix keys are the segments of `path.split('/').skip(1)` joined by '/', so
        // each is a slice of the path after its first '/'.
        let Some(first_slash) = find_byte(path, b'/') else {
            return best;
        };
        let segments = &path[first_slash + 1..];
        let mut end = 0;
        loop {
            let next_slash = find_byte(&segments[end..], b'/').map(|at| end + at);
            let key_end = next_slash.unwrap_or(segments.len());
            match self.paths.get(index.scope, &segments[..key_end]) {
                Some(node) => best = self.node_best(node, facts, best),
                None => break,
            }
            match next_slash {
                Some(slash) => end = slash + 1,
                None => break,
            }
        }
        best
    }

    /// A node's candidates, then its regex group.
    #[inline]
    fn node_best(&self, node: &NodeRef, facts: &RequestFacts<'_>, best: Cand) -> Cand {
        if node.more == NONE {
            let first = node.first;
            return if first.rank < best.rank && self.holds(first, facts) {
                first
            } else {
                best
            };
        }
        let Some(&node) = self.nodes.get(node.more as usize) else {
            return best;
        };
        let list = self
            .cands
            .get(node.start as usize..node.end as usize)
            .unwrap_or_default();
        let mut best = self.first_match(list, facts, best);
        if node.regex != NONE {
            best = self.regex_best(node.regex, facts, best);
        }
        best
    }

    fn regex_best(&self, group: u32, facts: &RequestFacts<'_>, mut best: Cand) -> Cand {
        match self.regexes.get(group as usize) {
            Some(RegexGroup::One(regex, cand))
                if cand.rank < best.rank
                    && regex.is_match(facts.path)
                    && self.holds(*cand, facts) =>
            {
                best = *cand;
            }
            Some(RegexGroup::Many(set, cands))
                if cands.first().is_some_and(|first| first.rank < best.rank) =>
            {
                for position in set.matches(facts.path).iter() {
                    if let Some(&cand) = cands.get(position) {
                        if cand.rank < best.rank && self.holds(cand, facts) {
                            best = cand;
                        }
                    }
                }
            }
            _ => {}
        }
        best
    }

    #[inline]
    fn holds(&self, cand: Cand, facts: &RequestFacts<'_>) -> bool {
        cand.route & CHECK == 0
            || self
                .conditions
                .get((cand.route & !CHECK) as usize)
                .is_some_and(|conditions| conditions.holds(facts))
    }

    /// Walks a rank-sorted list and returns the first fully matching candidate better
    /// than `best`.
    #[inline]
    fn first_match(&self, cands: &[Cand], facts: &RequestFacts<'_>, best: Cand) -> Cand {
        for &cand in cands {
            if cand.rank >= best.rank {
                break;
            }
            if self.holds(cand, facts) {
                return cand;
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

    #[test]
    fn key_table_finds_inline_and_long_keys_per_scope() {
        let long = "a-host-name-longer-than-the-inline-bytes.example.test";
        assert!(long.len() > INLINE);
        let keys: Vec<(u32, &[u8], u32)> = vec![
            (0, b"".as_slice(), 1),
            (0, b"a".as_slice(), 2),
            (1, b"a".as_slice(), 3),
            (0, b"abcdefgh".as_slice(), 4),
            (0, b"abcdefghi".as_slice(), 5),
            (0, &long.as_bytes()[..INLINE], 6),
            (0, long.as_bytes(), 7),
            (2, long.as_bytes(), 8),
        ];
        let table = KeyTable::new(keys.clone().into_iter()).unwrap();
        for (scope, key, value) in &keys {
            assert_eq!(table.get(*scope, key), Some(value), "{scope} {key:?}");
        }
        assert_eq!(table.get(1, b""), None);
        assert_eq!(table.get(0, b"b"), None);
        assert_eq!(table.get(0, b"abcdefgH"), None);
        assert_eq!(table.get(0, &long.as_bytes()[..INLINE + 1]), None);
        assert_eq!(table.get(1, long.as_bytes()), None);
        // Many keys: every one found, at most half the slots used.
        let owned: Vec<String> = (0..1000).map(|i| format!("segment{i}")).collect();
        let table = KeyTable::new(
            owned
                .iter()
                .enumerate()
                .map(|(i, k)| (7, k.as_bytes(), i as u32)),
        )
        .unwrap();
        assert!(table.slots.len() >= 2000);
        for (i, key) in owned.iter().enumerate() {
            assert_eq!(table.get(7, key.as_bytes()), Some(&(i as u32)));
            assert_eq!(table.get(8, key.as_bytes()), None);
        }
        let empty = KeyTable::<u32>::new(std::iter::empty()).unwrap();
        assert_eq!(empty.get(0, b"x"), None);
    }

    #[test]
    fn bytes_eq_compares_every_byte() {
        let text = b"0123456789abcdefghijklmnopqrstuvwxyz";
        for len in 0..text.len() {
            let a = &text[..len];
            assert!(bytes_eq(a, a));
            for at in 0..len {
                let mut b = a.to_vec();
                b[at] ^= 1;
                assert!(!bytes_eq(a, &b), "len {len} at {at}");
            }
            assert!(!bytes_eq(a, &text[..len + 1]));
        }
    }

    #[test]
    fn anchored_regexes_hang_under_their_literal_segments() {
        let segments = |pattern: &str| regex_anchor_segments(pattern);
        assert_eq!(segments("^/api/v1/[0-9]+$"), ["api", "v1"]);
        assert_eq!(segments(r"\A/re3/\d+"), ["re3"]);
        assert_eq!(segments("^/api/v1"), ["api"]);
        assert_eq!(segments("^/a//b/c"), ["a", "", "b"]);
        // Not anchored, anchored per line, alternatives, case folding, no literal path.
        assert!(segments("/api/v1/").is_empty());
        assert!(segments("(?m)^/api/v1/").is_empty());
        assert!(segments("^/api/v1/|^/web/").is_empty());
        assert!(segments("(?i)^/api/v1/").is_empty());
        assert!(segments("^/").is_empty());
        assert!(segments("^api/").is_empty());
        assert!(segments("^.*/x/").is_empty());
        assert_eq!(segments("^/(?:api)/(v1|v2)/"), ["api"]);
    }

    /// A tiny deterministic generator for the comparison below.
    struct Lcg(u64);

    impl Lcg {
        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            &items[(self.0 >> 33) as usize % items.len()]
        }
    }

    /// The rank rules of the module doc, applied by scanning every route: the reference
    /// the indexes must agree with.
    fn reference_lookup(
        routes: &[(i32, MatchConfig)],
        regexes: &[Option<Regex>],
        facts: &RequestFacts<'_>,
    ) -> Option<usize> {
        let mut best = None;
        for (route, (priority, matcher)) in routes.iter().enumerate() {
            let path_segments: Vec<&str> = facts.path.split('/').skip(1).collect();
            let path_class = if let Some(path) = &matcher.path {
                (path == facts.path).then_some(PathClass::Exact)
            } else if let Some(prefix) = &matcher.path_prefix {
                let segments = prefix_segments(prefix);
                let matches = segments.len() <= path_segments.len()
                    && segments.iter().zip(&path_segments).all(|(a, b)| a == b);
                let len = segments.iter().map(|s| s.len() + 1).sum();
                matches.then_some(PathClass::Prefix(Reverse(len)))
            } else if let Some(regex) = &regexes[route] {
                regex.is_match(facts.path).then_some(PathClass::Regex)
            } else {
                Some(PathClass::Any)
            };
            let Some(path_class) = path_class else {
                continue;
            };
            let methods_hold = matcher.methods.is_empty()
                || matcher.methods.iter().any(|m| m == facts.method.as_str());
            let headers_hold = matcher.headers.iter().all(|header| {
                facts
                    .headers
                    .get(header.name.as_str())
                    .and_then(|v| v.to_str().ok())
                    == header.value.as_deref()
            });
            if !methods_hold || !headers_hold {
                continue;
            }
            let count = usize::from(!matcher.methods.is_empty()) + matcher.headers.len();
            let mut host_classes = Vec::new();
            if matcher.hosts.is_empty() {
                host_classes.push(HostClass::Any);
            }
            for host in &matcher.hosts {
                match host.strip_prefix("*.") {
                    Some(suffix) if facts.host.ends_with(&format!(".{suffix}")) => {
                        host_classes.push(HostClass::Wildcard(Reverse(suffix.len())));
                    }
                    Some(_) => {}
                    None if host == facts.host => host_classes.push(HostClass::Exact),
                    None => {}
                }
            }
            for host_class in host_classes {
                let key = (
                    Reverse(*priority),
                    host_class,
                    path_class,
                    Reverse(count),
                    route,
                );
                if best.is_none_or(|best| key < best) {
                    best = Some(key);
                }
            }
        }
        best.map(|(.., route)| route)
    }

    #[test]
    fn indexes_agree_with_a_scan_of_every_route() {
        let long_host = "a-host-name-longer-than-the-inline-bytes.example.test";
        let long_prefix = "/a-segment-longer-than-inline-bytes/and/more";
        let hosts = [
            "a.test",
            "b.test",
            "x.a.test",
            "*.a.test",
            "*.test",
            "*.x.a.test",
            long_host,
            "*.example.test",
        ];
        let exact_paths = ["/", "/a", "/a/b", "/a/b/", "/b"];
        let prefixes = ["/", "/a", "/a/b", "/a/bc", "/b", "/a/", long_prefix];
        let regexes = [
            "^/a/b/[0-9]+$",
            "^/a/",
            "b$",
            "(?i)^/A/b",
            "^/a/b/c",
            "^/a/b|^/b",
            "^/a-segment-longer-than-inline-bytes/and/",
        ];
        let request_hosts = [
            "a.test",
            "b.test",
            "x.a.test",
            "y.x.a.test",
            "c.test",
            "test",
            "other.org",
            long_host,
            "z.example.test",
        ];
        let request_paths = [
            "/",
            "/a",
            "/a/",
            "/a/b",
            "/a/b/",
            "/a/b/12",
            "/a/b/c/d",
            "/a/bc",
            "/A/b",
            "/b",
            "",
            "a/b",
            "//a",
            "/a-segment-longer-than-inline-bytes/and/more/x",
            "/a-segment-longer-than-inline-bytes/and/mor",
        ];
        // Winners by kind, to show the comparison exercises each (below).
        let mut won = [0usize; 5];
        let mut rng = Lcg(7);
        let mut header_hits = HeaderMap::new();
        header_hits.insert("x-canary", "1".parse().unwrap());
        for _ in 0..150 {
            let count = *rng.pick(&[1usize, 3, 8, 20, 40]);
            let mut routes = Vec::new();
            for _ in 0..count {
                let mut matcher = MatchConfig::default();
                for _ in 0..*rng.pick(&[0, 0, 1, 1, 2]) {
                    matcher.hosts.push(rng.pick(&hosts).to_string());
                }
                match rng.pick(&[0, 1, 1, 2, 3]) {
                    0 => matcher.path = Some(rng.pick(&exact_paths).to_string()),
                    1 => matcher.path_prefix = Some(rng.pick(&prefixes).to_string()),
                    2 => matcher.path_regex = Some(rng.pick(&regexes).to_string()),
                    _ => {}
                }
                if *rng.pick(&[false, false, true]) {
                    matcher.methods.push(rng.pick(&["GET", "POST"]).to_string());
                }
                if *rng.pick(&[false, false, false, true]) {
                    matcher.headers.push(ValueMatchConfig {
                        name: "x-canary".into(),
                        value: Some("1".into()),
                        regex: None,
                        present: None,
                    });
                }
                routes.push((*rng.pick(&[0, 0, 0, 1, -1]), matcher));
            }
            let router = build(&routes);
            let regexes: Vec<Option<Regex>> = routes
                .iter()
                .map(|(_, m)| m.path_regex.as_ref().map(|p| Regex::new(p).unwrap()))
                .collect();
            for host in request_hosts {
                for path in request_paths {
                    for method in [Method::GET, Method::POST] {
                        for headers in [&HeaderMap::new(), &header_hits] {
                            let facts = facts(host, &method, path, headers);
                            let found = router.lookup(&facts);
                            assert_eq!(
                                found,
                                reference_lookup(&routes, &regexes, &facts),
                                "{host} {method} {path:?} {routes:#?}"
                            );
                            if let Some((_, winner)) = found.map(|route| &routes[route]) {
                                won[0] += usize::from(winner.path_regex.is_some());
                                won[1] += usize::from(winner.hosts.is_empty());
                                won[2] +=
                                    usize::from(winner.hosts.iter().any(|h| h.starts_with('*')));
                                won[3] += usize::from(!winner.methods.is_empty());
                                won[4] += usize::from(!winner.headers.is_empty());
                            }
                        }
                    }
                }
            }
        }
        assert!(won.iter().all(|&count| count > 100), "{won:?}");
    }

    #[test]
    fn exact_wildcard_and_hostless_precedence_with_shared_paths() {
        // The same path in all three host classes, plus conditions that fail, so every
        // lookup has to fall through from one index to the next.
        let router = build(&[
            (0, matcher("path_prefix = \"/api\"")),
            (
                0,
                matcher("hosts = [\"*.example.com\"]\npath_prefix = \"/api\""),
            ),
            (
                0,
                matcher("hosts = [\"*.a.example.com\"]\npath_prefix = \"/api\""),
            ),
            (
                0,
                matcher(
                    "hosts = [\"x.a.example.com\"]\npath_prefix = \"/api\"\nmethods = [\"POST\"]",
                ),
            ),
            (
                0,
                matcher("hosts = [\"x.a.example.com\"]\npath = \"/api/v1\""),
            ),
            (1, matcher("path = \"/api/v1\"\nmethods = [\"DELETE\"]")),
        ]);
        let headers = HeaderMap::new();
        let at = |host, method: Method, path| router.lookup(&facts(host, &method, path, &headers));
        assert_eq!(at("x.a.example.com", Method::POST, "/api/x"), Some(3));
        // The exact host's prefix fails its method: the longer wildcard is next.
        assert_eq!(at("x.a.example.com", Method::GET, "/api/x"), Some(2));
        assert_eq!(at("x.a.example.com", Method::GET, "/api/v1"), Some(4));
        assert_eq!(at("y.a.example.com", Method::GET, "/api/v1"), Some(2));
        assert_eq!(at("y.example.com", Method::GET, "/api"), Some(1));
        assert_eq!(at("example.com", Method::GET, "/api"), Some(0));
        // Priority 1 in the host-less index beats the exact host's exact path.
        assert_eq!(at("x.a.example.com", Method::DELETE, "/api/v1"), Some(5));
        assert_eq!(at("example.com", Method::GET, "/other"), None);
    }
}
