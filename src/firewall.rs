//! The connection firewall (SPEC CONN-6): decides, right after `accept`, whether a new
//! connection may proceed, by source IP, CIDR, GeoIP country and a per-IP rate limit.
//!
//! [`Firewall`] holds compiled, immutable rules for one scope (global or one listener).
//! State that must outlive a config reload — open GeoIP readers, rate-limit counts, block
//! counters — lives in [`FirewallRegistries`], which the gateway keeps for its whole life.
//!
//! A blocked connection should be closed by the caller with a reset (`SO_LINGER` 0) before
//! any TLS handshake: no alert, no bytes. Each block is counted by reason in
//! [`FirewallStats`] and logged as one fail2ban-friendly line, see [`block_line`].

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use foldhash::fast::RandomState;
use maxminddb::{geoip2, MaxMindDbError, Reader};
use parking_lot::Mutex;

use crate::config::firewall::{FirewallConfig, FirewallMode};

/// Why a connection was blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockReason {
    /// The source address is in `deny_ips`.
    Ip,
    /// The source address is in one of `deny_cidrs`.
    Cidr,
    /// GeoIP places the source in one of `deny_countries`.
    Country,
    /// The source opened too many connections within the rate-limit window.
    Rate,
    /// `mode = "allow_only"` and the source matches no `allow_*` entry.
    NotAllowed,
}

impl BlockReason {
    pub const ALL: [BlockReason; 5] = [
        BlockReason::Ip,
        BlockReason::Cidr,
        BlockReason::Country,
        BlockReason::Rate,
        BlockReason::NotAllowed,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::Ip => "ip",
            BlockReason::Cidr => "cidr",
            BlockReason::Country => "country",
            BlockReason::Rate => "rate",
            BlockReason::NotAllowed => "not_allowed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for BlockReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot read GeoIP database {}: {source}", path.display())]
    GeoIpIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid GeoIP database {}: {source}", path.display())]
    GeoIpInvalid {
        path: PathBuf,
        #[source]
        source: MaxMindDbError,
    },
    /// The config did not pass [`FirewallConfig::validate`]; `compile` refuses it rather than
    /// guess.
    #[error("{field}: {message}")]
    InvalidConfig { field: String, message: String },
}

/// The plain text of the log line written for each block:
///
/// ```text
/// gatehouse firewall: blocked <ip> listener=<name> reason=<reason>
/// ```
///
/// `<reason>` is one of `ip`, `cidr`, `country`, `rate`, `not_allowed`. The line is emitted
/// through `tracing::warn!` with target `gatehouse::firewall`, so with the default text
/// format it reads, for example:
///
/// ```text
/// 2026-12-01T10:00:00.123456Z  WARN gatehouse::firewall: gatehouse firewall: blocked 203.0.113.7 listener=edge reason=ip
/// ```
///
/// `packaging/fail2ban/filter.d/gatehouse.conf` matches it. Keep the format stable: changing it
/// breaks operators' fail2ban jails.
pub fn block_line(ip: IpAddr, listener: &str, reason: BlockReason) -> String {
    format!(
        "gatehouse firewall: blocked {ip} listener={listener} reason={}",
        reason.as_str()
    )
}

/// Block counters by reason, shared by every scope and kept across reloads.
#[derive(Debug, Default)]
pub struct FirewallStats {
    blocked: [AtomicU64; 5],
}

impl FirewallStats {
    /// Connections blocked for `reason` since start.
    pub fn blocked(&self, reason: BlockReason) -> u64 {
        self.blocked[reason.index()].load(Ordering::Relaxed)
    }

    /// Connections blocked for any reason since start.
    pub fn blocked_total(&self) -> u64 {
        BlockReason::ALL.iter().map(|&r| self.blocked(r)).sum()
    }

    fn count(&self, reason: BlockReason) {
        self.blocked[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the firewall keeps across config reloads. Create one at start (`Default`) and
/// pass it to every [`Firewall::compile`].
#[derive(Debug, Default)]
pub struct FirewallRegistries {
    geoip: GeoIpRegistry,
    rate: RateLimitRegistry,
    pub stats: Arc<FirewallStats>,
}

impl FirewallRegistries {
    /// The open GeoIP databases, e.g. to call [`GeoIpRegistry::reload_all`] on SIGHUP or a timer.
    pub fn geoip(&self) -> &GeoIpRegistry {
        &self.geoip
    }
}

// ---------------------------------------------------------------------------------------
// GeoIP

/// One `.mmdb` file, shared by every firewall that names its path. The reader is swapped
/// atomically on reload so lookups never wait for a reload.
#[derive(Debug)]
struct GeoIpDb {
    path: PathBuf,
    reader: ArcSwap<Reader<Vec<u8>>>,
    /// (mtime, length) of the file the current reader came from; a change means reload.
    stamp: Mutex<Option<(SystemTime, u64)>>,
}

fn file_stamp(path: &Path) -> Result<(SystemTime, u64), FirewallError> {
    let meta = std::fs::metadata(path).map_err(|source| FirewallError::GeoIpIo {
        path: path.to_path_buf(),
        source,
    })?;
    // Filesystems without mtime still give a usable stamp through the length.
    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((mtime, meta.len()))
}

/// Reads and fully verifies a database, so a half-written or corrupt file is refused before
/// it replaces a working reader.
fn open_reader(path: &Path) -> Result<Reader<Vec<u8>>, FirewallError> {
    let bytes = std::fs::read(path).map_err(|source| FirewallError::GeoIpIo {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |source| FirewallError::GeoIpInvalid {
        path: path.to_path_buf(),
        source,
    };
    let reader = Reader::from_source(bytes).map_err(invalid)?;
    reader.verify().map_err(invalid)?;
    let kind = reader.metadata().database_type.to_ascii_lowercase();
    if !kind.contains("country") && !kind.contains("city") && !kind.contains("enterprise") {
        tracing::warn!(
            path = %path.display(),
            database_type = %reader.metadata().database_type,
            "GeoIP database may not hold country data; country rules will not match"
        );
    }
    Ok(reader)
}

impl GeoIpDb {
    fn open(path: &Path) -> Result<GeoIpDb, FirewallError> {
        let stamp = file_stamp(path)?;
        let reader = open_reader(path)?;
        Ok(GeoIpDb {
            path: path.to_path_buf(),
            reader: ArcSwap::from_pointee(reader),
            stamp: Mutex::new(Some(stamp)),
        })
    }

    /// Re-reads the file if its stamp changed. `Ok(true)` when a new reader is in place; on
    /// error the old reader stays.
    fn reload_if_changed(&self) -> Result<bool, FirewallError> {
        // Held across the read so two concurrent reloads do not both read the file.
        let mut stamp = self.stamp.lock();
        let current = file_stamp(&self.path)?;
        if *stamp == Some(current) {
            return Ok(false);
        }
        let reader = open_reader(&self.path)?;
        self.reader.store(Arc::new(reader));
        *stamp = Some(current);
        Ok(true)
    }

    /// The ISO country code for `ip`, upper-cased; `None` when unknown or on a lookup error.
    fn country(&self, ip: IpAddr) -> Option<[u8; 2]> {
        let reader = self.reader.load();
        let result = match reader.lookup(ip) {
            Ok(result) => result,
            Err(err) => {
                tracing::debug!(%ip, error = %err, "GeoIP lookup failed");
                return None;
            }
        };
        let record = match result.decode::<geoip2::Country>() {
            Ok(Some(record)) => record,
            Ok(None) => return None,
            Err(err) => {
                tracing::debug!(%ip, error = %err, "GeoIP record could not be decoded");
                return None;
            }
        };
        // Fall back to the registered country: some networks carry only that.
        let code = record
            .country
            .iso_code
            .or(record.registered_country.iso_code)?;
        country_key(code)
    }
}

fn country_key(code: &str) -> Option<[u8; 2]> {
    match code.as_bytes() {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

/// Open GeoIP readers by path. Holds them weakly: a database no firewall uses any more is
/// closed, and one still in use by the old config is reused by the new one.
#[derive(Debug, Default)]
pub struct GeoIpRegistry {
    dbs: Mutex<HashMap<PathBuf, Weak<GeoIpDb>>>,
}

/// What [`GeoIpRegistry::reload_all`] did.
#[derive(Debug, Default)]
pub struct GeoIpReload {
    /// Databases whose file changed and were re-read.
    pub reloaded: Vec<PathBuf>,
    /// Databases that could not be re-read; each keeps serving its previous contents.
    pub errors: Vec<FirewallError>,
}

impl GeoIpRegistry {
    fn get(&self, path: &Path) -> Result<Arc<GeoIpDb>, FirewallError> {
        let mut dbs = self.dbs.lock();
        dbs.retain(|_, db| db.strong_count() > 0);
        if let Some(db) = dbs.get(path).and_then(Weak::upgrade) {
            // A config reload is a natural moment to pick up a replaced file too.
            if let Err(err) = db.reload_if_changed() {
                tracing::warn!(error = %err, "keeping the previous GeoIP database");
            }
            return Ok(db);
        }
        let db = Arc::new(GeoIpDb::open(path)?);
        dbs.insert(path.to_path_buf(), Arc::downgrade(&db));
        Ok(db)
    }

    /// Re-reads every open database whose file's mtime or size changed. Does file I/O and
    /// verifies each database, so call it off the accept path (a blocking thread).
    pub fn reload_all(&self) -> GeoIpReload {
        let dbs: Vec<Arc<GeoIpDb>> = self.dbs.lock().values().filter_map(Weak::upgrade).collect();
        let mut report = GeoIpReload::default();
        for db in dbs {
            match db.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(path = %db.path.display(), "GeoIP database reloaded");
                    report.reloaded.push(db.path.clone());
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "GeoIP reload failed; keeping the previous database");
                    report.errors.push(err);
                }
            }
        }
        report
    }
}

// ---------------------------------------------------------------------------------------
// Rate limit

/// Settings that identify a rate limiter; a reload with equal settings keeps its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RateSettings {
    connections: u32,
    window: Duration,
    max_tracked: usize,
}

/// Sliding-window counter for one IP: counts in the current fixed bucket plus the previous
/// bucket weighted by how much of it still overlaps the window. 24 bytes per IP whatever the
/// limit, unlike a ring of timestamps.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    current: u32,
    previous: u32,
}

impl Bucket {
    fn new(now: Instant) -> Bucket {
        Bucket {
            start: now,
            current: 0,
            previous: 0,
        }
    }

    /// Counts a connection at `now` if it stays within `limit` per `window`. Refused attempts
    /// are not counted, so a client that backs off gets back in once the window slides.
    fn admit(&mut self, now: Instant, window: Duration, limit: u32) -> bool {
        let window_ns = window.as_nanos().max(1);
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        if elapsed >= window_ns {
            let windows = elapsed / window_ns;
            self.previous = if windows == 1 { self.current } else { 0 };
            self.current = 0;
            // Realign to the bucket grid; `into` keeps this free of overflow on long gaps.
            let into = elapsed % window_ns;
            self.start = now
                .checked_sub(Duration::from_nanos(
                    u64::try_from(into).unwrap_or(u64::MAX),
                ))
                .unwrap_or(now);
        }
        let into = now
            .saturating_duration_since(self.start)
            .as_nanos()
            .min(window_ns);
        // Integer form of `previous * (1 - into/window) + current + 1 <= limit`.
        let weighted = u128::from(self.previous) * (window_ns - into)
            + (u128::from(self.current) + 1) * window_ns;
        if weighted > u128::from(limit) * window_ns {
            return false;
        }
        self.current = self.current.saturating_add(1);
        true
    }
}

/// One shard of the per-IP map, bounded with two generations: entries touched recently live
/// in `current`; when it fills up it becomes `previous` and the old `previous` (addresses not
/// seen for longest) is dropped. O(1) per connection, no scans, even when flooded by many IPs.
#[derive(Debug, Default)]
struct Shard {
    current: HashMap<IpAddr, Bucket, RandomState>,
    previous: HashMap<IpAddr, Bucket, RandomState>,
}

impl Shard {
    fn admit(&mut self, ip: IpAddr, now: Instant, settings: &RateSettings, cap: usize) -> bool {
        if let Some(bucket) = self.current.get_mut(&ip) {
            return bucket.admit(now, settings.window, settings.connections);
        }
        let mut bucket = self
            .previous
            .remove(&ip)
            .unwrap_or_else(|| Bucket::new(now));
        let allowed = bucket.admit(now, settings.window, settings.connections);
        let generation = (cap / 2).max(1);
        if self.current.len() >= generation {
            self.previous = std::mem::take(&mut self.current);
        }
        if self.previous.len() + self.current.len() >= cap {
            self.previous.clear();
        }
        self.current.insert(ip, bucket);
        allowed
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// Per-IP counts for one scope.
#[derive(Debug)]
struct RateLimiter {
    settings: RateSettings,
    shards: Box<[Mutex<Shard>]>,
    /// Entries per shard; shards × this never exceeds `max_tracked`.
    shard_cap: usize,
    hasher: RandomState,
}

/// Below this bound a single shard keeps the bound exact; above it, shards cut lock contention.
const SHARD_THRESHOLD: usize = 1024;
const SHARDS: usize = 16;

impl RateLimiter {
    fn new(settings: RateSettings) -> RateLimiter {
        let max = settings.max_tracked.max(1);
        let shards = if max >= SHARD_THRESHOLD { SHARDS } else { 1 };
        RateLimiter {
            settings,
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            shard_cap: max / shards,
            hasher: RandomState::default(),
        }
    }

    fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        let index = (self.hasher.hash_one(ip) as usize) % self.shards.len();
        match self.shards.get(index) {
            Some(shard) => shard.lock().admit(ip, now, &self.settings, self.shard_cap),
            None => true,
        }
    }

    fn tracked(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().len()).sum()
    }
}

/// Rate limiters by scope, held weakly like [`GeoIpRegistry`]: compile the new config while
/// the old firewall is still alive (as a snapshot swap does) and the counts carry over.
#[derive(Debug, Default)]
struct RateLimitRegistry {
    limiters: Mutex<HashMap<String, Weak<RateLimiter>>>,
}

impl RateLimitRegistry {
    fn get(&self, scope: &str, settings: RateSettings) -> Arc<RateLimiter> {
        let mut limiters = self.limiters.lock();
        limiters.retain(|_, limiter| limiter.strong_count() > 0);
        if let Some(limiter) = limiters.get(scope).and_then(Weak::upgrade) {
            if limiter.settings == settings {
                return limiter;
            }
        }
        let limiter = Arc::new(RateLimiter::new(settings));
        limiters.insert(scope.to_string(), Arc::downgrade(&limiter));
        limiter
    }
}

// ---------------------------------------------------------------------------------------
// Rules

/// CIDRs grouped by prefix length, so a lookup costs one hash probe per distinct length
/// rather than one comparison per network; large blocklists stay cheap.
#[derive(Debug, Default)]
struct CidrSet {
    v4: Vec<(u8, HashSet<u32, RandomState>)>,
    v6: Vec<(u8, HashSet<u128, RandomState>)>,
}

fn mask_v4(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn mask_v6(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

impl CidrSet {
    fn new(nets: &[ipnet::IpNet]) -> CidrSet {
        let mut v4: HashMap<u8, HashSet<u32, RandomState>> = HashMap::new();
        let mut v6: HashMap<u8, HashSet<u128, RandomState>> = HashMap::new();
        for net in nets {
            match net {
                ipnet::IpNet::V4(net) => {
                    let len = net.prefix_len();
                    v4.entry(len)
                        .or_default()
                        .insert(u32::from(net.addr()) & mask_v4(len));
                }
                ipnet::IpNet::V6(net) => {
                    let len = net.prefix_len();
                    v6.entry(len)
                        .or_default()
                        .insert(u128::from(net.addr()) & mask_v6(len));
                }
            }
        }
        CidrSet {
            v4: v4.into_iter().collect(),
            v6: v6.into_iter().collect(),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => {
                let bits = u32::from(ip);
                self.v4
                    .iter()
                    .any(|(len, nets)| nets.contains(&(bits & mask_v4(*len))))
            }
            IpAddr::V6(ip) => {
                let bits = u128::from(ip);
                self.v6
                    .iter()
                    .any(|(len, nets)| nets.contains(&(bits & mask_v6(*len))))
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// One list of addresses, networks and countries (either the allow or the deny side).
#[derive(Debug, Default)]
struct RuleSet {
    ips: HashSet<IpAddr, RandomState>,
    cidrs: CidrSet,
    countries: HashSet<[u8; 2], RandomState>,
}

impl RuleSet {
    fn new(
        ips: &[IpAddr],
        cidrs: &[ipnet::IpNet],
        countries: &[String],
    ) -> Result<RuleSet, FirewallError> {
        let mut set = RuleSet {
            ips: ips.iter().map(|ip| ip.to_canonical()).collect(),
            cidrs: CidrSet::new(cidrs),
            countries: HashSet::default(),
        };
        for code in countries {
            let key = country_key(code).ok_or_else(|| FirewallError::InvalidConfig {
                field: "countries".into(),
                message: format!("{code:?} is not a two-letter country code"),
            })?;
            set.countries.insert(key);
        }
        Ok(set)
    }
}

/// Compiled rules for one scope. Cheap to check; immutable — a config reload compiles a new one.
#[derive(Debug)]
pub struct Firewall {
    scope: String,
    mode: FirewallMode,
    allow: RuleSet,
    deny: RuleSet,
    geoip: Option<Arc<GeoIpDb>>,
    rate: Option<Arc<RateLimiter>>,
    stats: Arc<FirewallStats>,
}

impl Firewall {
    /// Compiles rules for `scope` (`"global"` or a listener name; also the key that keeps
    /// rate-limit counts across reloads) and opens the GeoIP database if any country rule
    /// needs it (the error names the path). Expects a config that passed
    /// [`FirewallConfig::validate`] and reports the first problem otherwise.
    pub fn compile(
        config: &FirewallConfig,
        scope: &str,
        registries: &FirewallRegistries,
    ) -> Result<Firewall, FirewallError> {
        if let Some((field, message)) = config.validate(scope).into_iter().next() {
            return Err(FirewallError::InvalidConfig { field, message });
        }
        let allow_only = config.mode == FirewallMode::AllowOnly;
        let allow = if allow_only {
            RuleSet::new(
                &config.allow_ips,
                &config.allow_cidrs,
                &config.allow_countries,
            )?
        } else {
            RuleSet::default()
        };
        let deny = RuleSet::new(&config.deny_ips, &config.deny_cidrs, &config.deny_countries)?;
        let geoip = match (&config.geoip_db, config.uses_countries()) {
            (Some(path), true) => Some(registries.geoip.get(path)?),
            // A db named but unused is not opened: nothing would read it.
            _ => None,
        };
        let rate = config.rate_limit.as_ref().map(|rate| {
            registries.rate.get(
                scope,
                RateSettings {
                    connections: rate.connections,
                    window: rate.window.0,
                    max_tracked: config.max_tracked_ips,
                },
            )
        });
        Ok(Firewall {
            scope: scope.to_string(),
            mode: config.mode,
            allow,
            deny,
            geoip,
            rate,
            stats: Arc::clone(&registries.stats),
        })
    }

    /// The scope this firewall was compiled for.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Decides for a new connection from `ip` on `listener`; `None` means allowed. Lists are
    /// checked before the rate limit, so a blocked address never consumes quota. A block is
    /// counted and logged (see [`block_line`]).
    pub fn check(&self, ip: IpAddr, listener: &str) -> Option<BlockReason> {
        self.check_at(ip, listener, Instant::now())
    }

    /// [`Firewall::check`] with the clock passed in, for tests.
    fn check_at(&self, ip: IpAddr, listener: &str, now: Instant) -> Option<BlockReason> {
        let reason = self.decide(ip, now)?;
        self.stats.count(reason);
        tracing::warn!("{}", block_line(ip, listener, reason));
        Some(reason)
    }

    fn decide(&self, ip: IpAddr, now: Instant) -> Option<BlockReason> {
        // Dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d; rules are written as IPv4.
        let ip = ip.to_canonical();
        // Looked up at most once, and only when a country rule could still change the answer.
        let mut country: Option<Option<[u8; 2]>> = None;
        let mut country_of = |geoip: &Option<Arc<GeoIpDb>>| {
            *country.get_or_insert_with(|| geoip.as_ref().and_then(|db| db.country(ip)))
        };

        if self.mode == FirewallMode::AllowOnly {
            let allowed = self.allow.ips.contains(&ip)
                || self.allow.cidrs.contains(ip)
                // Unknown country fails closed here: allow_only means "only these".
                || (!self.allow.countries.is_empty()
                    && country_of(&self.geoip).is_some_and(|c| self.allow.countries.contains(&c)));
            if !allowed {
                return Some(BlockReason::NotAllowed);
            }
        }
        if self.deny.ips.contains(&ip) {
            return Some(BlockReason::Ip);
        }
        if !self.deny.cidrs.is_empty() && self.deny.cidrs.contains(ip) {
            return Some(BlockReason::Cidr);
        }
        // Unknown country fails open: a deny list only blocks what it names.
        if !self.deny.countries.is_empty()
            && country_of(&self.geoip).is_some_and(|c| self.deny.countries.contains(&c))
        {
            return Some(BlockReason::Country);
        }
        if let Some(rate) = &self.rate {
            if !rate.admit(ip, now) {
                return Some(BlockReason::Rate);
            }
        }
        None
    }

    /// How many source IPs the rate limiter currently remembers (0 without a rate limit).
    pub fn tracked_ips(&self) -> usize {
        self.rate.as_ref().map_or(0, |rate| rate.tracked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::firewall::RateLimitConfig;
    use crate::config::Dur;

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/testdata/geoip")
            .join(name)
    }

    fn ip(text: &str) -> IpAddr {
        match text.parse() {
            Ok(ip) => ip,
            Err(err) => panic!("bad test address {text}: {err}"),
        }
    }

    fn compile(config: &FirewallConfig, registries: &FirewallRegistries) -> Firewall {
        match Firewall::compile(config, "global", registries) {
            Ok(firewall) => firewall,
            Err(err) => panic!("compile failed: {err}"),
        }
    }

    fn rate(connections: u32, secs: u64) -> Option<RateLimitConfig> {
        Some(RateLimitConfig {
            connections,
            window: Dur::secs(secs),
        })
    }

    #[test]
    fn firewall_denies_listed_ip() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            deny_ips: vec![ip("203.0.113.7"), ip("2001:db8::7")],
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        assert_eq!(
            firewall.check(ip("203.0.113.7"), "edge"),
            Some(BlockReason::Ip)
        );
        // The IPv4-mapped form a dual-stack socket reports is the same client.
        assert_eq!(
            firewall.check(ip("::ffff:203.0.113.7"), "edge"),
            Some(BlockReason::Ip)
        );
        assert_eq!(
            firewall.check(ip("2001:db8::7"), "edge"),
            Some(BlockReason::Ip)
        );
        assert_eq!(firewall.check(ip("203.0.113.8"), "edge"), None);
        assert_eq!(registries.stats.blocked(BlockReason::Ip), 3);
    }

    #[test]
    fn firewall_denies_cidr_v4_and_v6() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            deny_cidrs: vec![
                "198.51.100.0/24".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8:abcd::/48".parse().unwrap(),
            ],
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        for blocked in [
            "198.51.100.0",
            "198.51.100.255",
            "10.200.3.4",
            "2001:db8:abcd:1::9",
        ] {
            assert_eq!(
                firewall.check(ip(blocked), "edge"),
                Some(BlockReason::Cidr),
                "{blocked}"
            );
        }
        for allowed in ["198.51.101.0", "11.0.0.1", "2001:db8:abce::1", "::1"] {
            assert_eq!(firewall.check(ip(allowed), "edge"), None, "{allowed}");
        }
        let everything = FirewallConfig {
            deny_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            ..FirewallConfig::default()
        };
        let firewall = compile(&everything, &registries);
        assert_eq!(
            firewall.check(ip("1.2.3.4"), "edge"),
            Some(BlockReason::Cidr)
        );
        assert_eq!(firewall.check(ip("2001:db8::1"), "edge"), None);
    }

    #[test]
    fn firewall_denies_country_from_geoip() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            deny_countries: vec!["gb".into(), "JP".into()],
            geoip_db: Some(testdata("GeoLite2-Country-Test.mmdb")),
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        assert_eq!(
            firewall.check(ip("81.2.69.142"), "edge"),
            Some(BlockReason::Country)
        );
        assert_eq!(
            firewall.check(ip("2001:218::1"), "edge"),
            Some(BlockReason::Country)
        );
        assert_eq!(firewall.check(ip("216.160.83.56"), "edge"), None);
        assert_eq!(firewall.check(ip("89.160.20.112"), "edge"), None);
        // Not in the database at all: a deny list fails open.
        assert_eq!(firewall.check(ip("192.0.2.1"), "edge"), None);
        assert_eq!(registries.stats.blocked(BlockReason::Country), 2);
    }

    #[test]
    fn firewall_compile_names_a_missing_geoip_path() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            deny_countries: vec!["GB".into()],
            geoip_db: Some(PathBuf::from("/nonexistent/geo.mmdb")),
            ..FirewallConfig::default()
        };
        match Firewall::compile(&config, "global", &registries) {
            Err(err) => assert!(err.to_string().contains("/nonexistent/geo.mmdb"), "{err}"),
            Ok(_) => panic!("compile should fail"),
        }
        let invalid = FirewallConfig {
            deny_countries: vec!["GB".into()],
            ..FirewallConfig::default()
        };
        assert!(matches!(
            Firewall::compile(&invalid, "global", &registries),
            Err(FirewallError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn firewall_allow_only_blocks_everything_unlisted() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            mode: FirewallMode::AllowOnly,
            allow_ips: vec![ip("192.0.2.10")],
            allow_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            allow_countries: vec!["se".into()],
            deny_ips: vec![ip("10.1.2.3")],
            geoip_db: Some(testdata("GeoLite2-Country-Test.mmdb")),
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        assert_eq!(firewall.check(ip("192.0.2.10"), "edge"), None);
        assert_eq!(firewall.check(ip("10.9.9.9"), "edge"), None);
        assert_eq!(firewall.check(ip("89.160.20.112"), "edge"), None);
        for blocked in ["192.0.2.11", "81.2.69.142", "2001:218::1", "203.0.113.1"] {
            assert_eq!(
                firewall.check(ip(blocked), "edge"),
                Some(BlockReason::NotAllowed),
                "{blocked}"
            );
        }
        // deny still carves an address out of an allowed range.
        assert_eq!(
            firewall.check(ip("10.1.2.3"), "edge"),
            Some(BlockReason::Ip)
        );
        assert_eq!(registries.stats.blocked(BlockReason::NotAllowed), 4);
    }

    #[test]
    fn firewall_rate_limit_blocks_over_limit_and_recovers_as_window_slides() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            rate_limit: rate(3, 10),
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        let client = ip("198.51.100.20");
        let t0 = Instant::now();
        for n in 0..3 {
            assert_eq!(
                firewall.check_at(client, "edge", t0 + Duration::from_secs(n)),
                None
            );
        }
        assert_eq!(
            firewall.check_at(client, "edge", t0 + Duration::from_secs(3)),
            Some(BlockReason::Rate)
        );
        // Other clients have their own quota.
        assert_eq!(
            firewall.check_at(ip("198.51.100.21"), "edge", t0 + Duration::from_secs(3)),
            None
        );
        // Just after the first bucket ends, the previous 3 still weigh almost fully.
        assert_eq!(
            firewall.check_at(client, "edge", t0 + Duration::from_secs(11)),
            Some(BlockReason::Rate)
        );
        // Once the window has slid past those connections, the client is let in again.
        assert_eq!(
            firewall.check_at(client, "edge", t0 + Duration::from_secs(20)),
            None
        );
        assert_eq!(registries.stats.blocked(BlockReason::Rate), 2);
    }

    #[test]
    fn firewall_sliding_window_weighs_previous_bucket() {
        let window = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut bucket = Bucket::new(t0);
        for _ in 0..4 {
            assert!(bucket.admit(t0, window, 4));
        }
        assert!(!bucket.admit(t0 + Duration::from_secs(9), window, 4));
        // Half way into the next bucket, the previous 4 count as 2: room for 2 more.
        let half = t0 + Duration::from_secs(15);
        assert!(bucket.admit(half, window, 4));
        assert!(bucket.admit(half, window, 4));
        assert!(!bucket.admit(half, window, 4));
        // After a long idle gap everything is forgotten.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..4 {
            assert!(bucket.admit(later, window, 4));
        }
        assert!(!bucket.admit(later, window, 4));
    }

    #[test]
    fn firewall_denied_ip_consumes_no_quota() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            deny_ips: vec![ip("203.0.113.7")],
            rate_limit: rate(1, 60),
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(
                firewall.check_at(ip("203.0.113.7"), "edge", t0),
                Some(BlockReason::Ip)
            );
        }
        assert_eq!(firewall.tracked_ips(), 0);
        assert_eq!(registries.stats.blocked(BlockReason::Rate), 0);
        assert_eq!(registries.stats.blocked(BlockReason::Ip), 5);
    }

    #[test]
    fn firewall_rate_map_stays_bounded() {
        for max in [1, 7, 100, 5000] {
            let registries = FirewallRegistries::default();
            let config = FirewallConfig {
                rate_limit: rate(1, 60),
                max_tracked_ips: max,
                ..FirewallConfig::default()
            };
            let firewall = compile(&config, &registries);
            let t0 = Instant::now();
            for n in 0..(3 * max as u32 + 10) {
                let source = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + n));
                assert_eq!(firewall.check_at(source, "edge", t0), None);
                assert!(firewall.tracked_ips() <= max, "max {max}");
            }
            assert!(firewall.tracked_ips() > 0);
        }
    }

    #[test]
    fn firewall_rate_map_keeps_recently_seen_clients() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            rate_limit: rate(1, 60),
            max_tracked_ips: 100,
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        let t0 = Instant::now();
        let hammer = ip("203.0.113.99");
        assert_eq!(firewall.check_at(hammer, "edge", t0), None);
        // A spray of fresh addresses must not wash out a client that keeps knocking.
        for n in 0..1000u32 {
            firewall.check_at(
                IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + n)),
                "edge",
                t0,
            );
            if n % 10 == 0 {
                assert_eq!(
                    firewall.check_at(hammer, "edge", t0),
                    Some(BlockReason::Rate)
                );
            }
        }
    }

    #[test]
    fn firewall_rate_counts_survive_reload_with_same_settings() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            rate_limit: rate(1, 60),
            ..FirewallConfig::default()
        };
        let old = compile(&config, &registries);
        let client = ip("192.0.2.5");
        let t0 = Instant::now();
        assert_eq!(old.check_at(client, "edge", t0), None);
        let new = compile(&config, &registries);
        drop(old);
        assert_eq!(new.check_at(client, "edge", t0), Some(BlockReason::Rate));
        // Different settings start fresh.
        let changed = FirewallConfig {
            rate_limit: rate(2, 60),
            ..config.clone()
        };
        let fresh = compile(&changed, &registries);
        assert_eq!(fresh.check_at(client, "edge", t0), None);
        // A different scope has its own counts.
        let other = match Firewall::compile(&config, "edge", &registries) {
            Ok(firewall) => firewall,
            Err(err) => panic!("{err}"),
        };
        assert_eq!(other.check_at(client, "edge", t0), None);
    }

    #[test]
    fn firewall_counts_blocks_by_reason() {
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            deny_ips: vec![ip("192.0.2.1")],
            deny_cidrs: vec!["198.51.100.0/24".parse().unwrap()],
            deny_countries: vec!["US".into()],
            geoip_db: Some(testdata("GeoLite2-Country-Test.mmdb")),
            rate_limit: rate(1, 60),
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        let t0 = Instant::now();
        firewall.check_at(ip("192.0.2.1"), "edge", t0);
        firewall.check_at(ip("198.51.100.1"), "edge", t0);
        firewall.check_at(ip("198.51.100.2"), "edge", t0);
        firewall.check_at(ip("216.160.83.56"), "edge", t0);
        firewall.check_at(ip("192.0.2.200"), "edge", t0);
        firewall.check_at(ip("192.0.2.200"), "edge", t0);
        let stats = &registries.stats;
        assert_eq!(stats.blocked(BlockReason::Ip), 1);
        assert_eq!(stats.blocked(BlockReason::Cidr), 2);
        assert_eq!(stats.blocked(BlockReason::Country), 1);
        assert_eq!(stats.blocked(BlockReason::Rate), 1);
        assert_eq!(stats.blocked(BlockReason::NotAllowed), 0);
        assert_eq!(stats.blocked_total(), 5);
        let labels: Vec<&str> = BlockReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, ["ip", "cidr", "country", "rate", "not_allowed"]);
    }

    #[test]
    fn firewall_block_line_format_is_stable() {
        assert_eq!(
            block_line(ip("203.0.113.7"), "edge", BlockReason::Ip),
            "gatehouse firewall: blocked 203.0.113.7 listener=edge reason=ip"
        );
        assert_eq!(
            block_line(ip("2001:db8::1"), "api", BlockReason::NotAllowed),
            "gatehouse firewall: blocked 2001:db8::1 listener=api reason=not_allowed"
        );
    }

    fn copy(from: &Path, to: &Path) {
        // Write then rename, as geoipupdate does, so the swap is atomic.
        let staging = to.with_extension("tmp");
        if let Err(err) = std::fs::copy(from, &staging).and_then(|_| std::fs::rename(&staging, to))
        {
            panic!("copy {} -> {}: {err}", from.display(), to.display());
        }
    }

    #[test]
    fn firewall_geoip_reloads_replaced_file_and_keeps_old_on_bad_file() {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(err) => panic!("tempdir: {err}"),
        };
        let db = dir.path().join("country.mmdb");
        copy(&testdata("GeoLite2-Country-Test.mmdb"), &db);
        let registries = FirewallRegistries::default();
        let config = FirewallConfig {
            deny_countries: vec!["GB".into(), "US".into()],
            geoip_db: Some(db.clone()),
            ..FirewallConfig::default()
        };
        let firewall = compile(&config, &registries);
        let gb = ip("81.2.69.142");
        assert_eq!(firewall.check(gb, "edge"), Some(BlockReason::Country));
        // 149.101.100.0/28 (US) exists only in the GeoIP2 test database swapped in below.
        let only_in_new = ip("149.101.100.1");
        assert_eq!(firewall.check(only_in_new, "edge"), None);
        let before = firewall.geoip.as_ref().map(|db| db.reader.load_full());

        // Unchanged file: nothing to do.
        let report = registries.geoip().reload_all();
        assert!(report.reloaded.is_empty() && report.errors.is_empty());

        // A second firewall naming the same path shares the open reader.
        let again = compile(&config, &registries);
        assert!(match (&firewall.geoip, &again.geoip) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        });

        copy(&testdata("GeoIP2-Country-Test.mmdb"), &db);
        let report = registries.geoip().reload_all();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.reloaded, vec![db.clone()]);
        let after = firewall.geoip.as_ref().map(|db| db.reader.load_full());
        assert!(match (&before, &after) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            _ => false,
        });
        assert_eq!(
            after.as_ref().map(|r| r.metadata().database_type.clone()),
            Some("GeoIP2-Country".to_string())
        );
        assert_eq!(firewall.check(gb, "edge"), Some(BlockReason::Country));
        assert_eq!(
            firewall.check(only_in_new, "edge"),
            Some(BlockReason::Country)
        );

        // A truncated file is refused and the previous reader keeps serving.
        if let Err(err) = std::fs::write(&db, b"not a maxmind database") {
            panic!("write: {err}");
        }
        let report = registries.geoip().reload_all();
        assert!(report.reloaded.is_empty());
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].to_string().contains("country.mmdb"));
        let kept = firewall.geoip.as_ref().map(|db| db.reader.load_full());
        assert!(match (&after, &kept) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        });
        assert_eq!(firewall.check(gb, "edge"), Some(BlockReason::Country));
        assert_eq!(
            firewall.check(only_in_new, "edge"),
            Some(BlockReason::Country)
        );
    }
}
