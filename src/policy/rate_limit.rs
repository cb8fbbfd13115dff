//! Request rate limiting (SPEC POLICY-1): GCRA per key, which is exactly nginx
//! `limit_req rate=R burst=B nodelay` — up to `B + 1` requests at once, then one per `1/R`.
//!
//! State is one theoretical arrival time (TAT) per key in a sharded map with a hard cap on
//! keys. A key whose TAT has passed holds a full bucket, the same as no entry, so it can be
//! dropped without changing any answer; when a shard is full those go first, and if every
//! key is still busy (an address-spraying attack) an arbitrary eighth of the shard is
//! evicted, which only ever lets a request through that might have been limited.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::policy::RequestRateLimitConfig;

const SHARDS: usize = 16;

type Map = std::collections::HashMap<u128, u64, foldhash::fast::RandomState>;

/// One limit's buckets.
pub struct Limiter {
    /// Nanoseconds between two requests at the sustained rate.
    interval: u64,
    /// Allowed lead of the TAT over now: `burst * interval`.
    tolerance: u64,
    shard_cap: usize,
    epoch: Instant,
    shards: [Mutex<Map>; SHARDS],
    seed: foldhash::fast::RandomState,
}

/// The key of one client: an address (IPv6 by its /64) or a hashed string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key(u128);

impl Key {
    pub fn ip(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key(u128::from(u32::from(v4)) | 1 << 64),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::ip(IpAddr::V4(v4)),
                // The /64 prefix: one subscriber usually owns the whole /64.
                None => Key((u128::from(v6) >> 64) | 2 << 64),
            },
        }
    }
}

/// The answer for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Try again after this long.
    Reject(Duration),
}

impl Limiter {
    pub fn new(settings: &RequestRateLimitConfig) -> Limiter {
        let per_second = settings.per_second().unwrap_or(1.0);
        let interval = ((1e9 / per_second) as u64).max(1);
        Limiter {
            interval,
            tolerance: interval.saturating_mul(u64::from(settings.burst)),
            shard_cap: (settings.max_keys / SHARDS).max(1),
            epoch: Instant::now(),
            shards: std::array::from_fn(|_| Mutex::new(Map::default())),
            seed: foldhash::fast::RandomState::default(),
        }
    }

    /// A key for a string (header value, identity); hashed so no client text is stored.
    pub fn text_key(&self, text: &[u8]) -> Key {
        Key(u128::from(self.seed.hash_one(text)) | 3 << 64)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn check(&self, key: Key) -> Decision {
        self.check_at(key, self.now())
    }

    /// GCRA at `now` (nanoseconds since the limiter was made).
    pub fn check_at(&self, key: Key, now: u64) -> Decision {
        let shard_index = self.seed.hash_one(key) as usize % SHARDS;
        let mut map = self.shards[shard_index].lock();
        let tat = map.get(&key.0).copied().unwrap_or(now).max(now);
        let lead = tat - now;
        if lead > self.tolerance {
            return Decision::Reject(Duration::from_nanos(lead - self.tolerance));
        }
        let next = tat.saturating_add(self.interval);
        if !map.contains_key(&key.0) && map.len() >= self.shard_cap {
            make_room(&mut map, now, self.shard_cap);
        }
        map.insert(key.0, next);
        Decision::Allow
    }

    /// Keys tracked now (all shards).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hard cap on keys.
    pub fn capacity(&self) -> usize {
        self.shard_cap * SHARDS
    }
}

fn make_room(map: &mut Map, now: u64, cap: usize) {
    map.retain(|_, tat| *tat > now);
    if map.len() >= cap {
        let target = cap - cap / 8 - 1;
        let excess = map.len().saturating_sub(target);
        let victims: Vec<u128> = map.keys().take(excess).copied().collect();
        for key in victims {
            map.remove(&key);
        }
    }
}

/// Seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: &str, burst: u32, max_keys: usize) -> Limiter {
        Limiter::new(&RequestRateLimitConfig {
            rate: rate.into(),
            burst,
            key: Default::default(),
            header: None,
            max_keys,
        })
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate_like_nginx_nodelay() {
        let limiter = limiter("2r/s", 3, 1000);
        let key = Key::ip("192.0.2.1".parse().unwrap());
        // burst + 1 at once.
        for _ in 0..4 {
            assert_eq!(limiter.check_at(key, SEC), Decision::Allow);
        }
        let Decision::Reject(wait) = limiter.check_at(key, SEC) else {
            panic!("fifth request passed");
        };
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        // One slot comes back every 1/rate.
        assert_eq!(limiter.check_at(key, SEC + SEC / 2), Decision::Allow);
        assert!(matches!(
            limiter.check_at(key, SEC + SEC / 2),
            Decision::Reject(_)
        ));
        // Another client is unaffected.
        let other = Key::ip("192.0.2.2".parse().unwrap());
        assert_eq!(limiter.check_at(other, SEC), Decision::Allow);
    }

    #[test]
    fn ipv6_grouped_by_64() {
        let a = Key::ip("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = Key::ip("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = Key::ip("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mapped = Key::ip("::ffff:192.0.2.1".parse().unwrap());
        assert_eq!(mapped, Key::ip("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn a_million_addresses_stay_under_the_cap() {
        let limiter = limiter("1r/m", 0, 10_000);
        let cap = limiter.capacity();
        assert!(cap <= 10_000);
        // All at the same instant: no bucket ever becomes idle, so only the hard cap
        // bounds the map.
        for n in 0..1_000_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(n.wrapping_mul(2_654_435_761)));
            assert_eq!(limiter.check_at(Key::ip(ip), SEC), Decision::Allow);
            if n % 65_536 == 0 {
                assert!(limiter.len() <= cap, "{} > {cap}", limiter.len());
            }
        }
        assert!(limiter.len() <= cap, "{} > {cap}", limiter.len());
        assert!(limiter.len() > cap / 2, "evicted far too much");
    }

    #[test]
    fn idle_buckets_are_dropped_first() {
        let limiter = limiter("1r/s", 0, 16);
        for n in 0..1_000u32 {
            let key = Key::ip(IpAddr::V4(std::net::Ipv4Addr::from(n)));
            let _ = limiter.check_at(key, SEC);
        }
        assert!(limiter.len() <= limiter.capacity());
        // By 100 s every bucket above is idle: a new key evicts them, not itself.
        let busy = Key::ip("198.51.100.1".parse().unwrap());
        assert_eq!(limiter.check_at(busy, 100 * SEC), Decision::Allow);
        assert!(matches!(
            limiter.check_at(busy, 100 * SEC),
            Decision::Reject(_)
        ));
    }
}
