//! Routes, pools and the global firewall as admin API resources (SPEC CTRL-4): finding
//! them by name in a config and replacing, adding or removing one. The admin API runs
//! these inside `Control::edit`, so every change is validated as a whole config (errors
//! carry field paths such as `routes[2].pool`), stored as a new version and audited.

use crate::config::policy::PolicyRuleConfig;
use crate::config::{Config, PoolConfig, RouteConfig};

use super::ControlError;

/// A route's name: its `name`, or `route<index>` (as in logs and metrics) when it has none.
pub fn route_name(index: usize, route: &RouteConfig) -> String {
    route
        .name
        .clone()
        .unwrap_or_else(|| format!("route{index}"))
}

fn unknown(kind: &'static str, name: &str) -> ControlError {
    ControlError::UnknownName {
        kind,
        name: name.to_string(),
    }
}

/// The route called `name`, with its index.
pub fn find_route<'a>(config: &'a Config, name: &str) -> Option<(usize, &'a RouteConfig)> {
    config
        .routes
        .iter()
        .enumerate()
        .find(|(index, route)| route_name(*index, route) == name)
}

/// Replaces the route called `name`, or appends it (routes of equal priority and
/// specificity match in config order, so a new route comes last). Returns whether it was
/// added. The route is stored with `name` set.
pub fn put_route(
    config: &mut Config,
    name: &str,
    mut route: RouteConfig,
) -> Result<bool, ControlError> {
    route.name = Some(name.to_string());
    match find_route(config, name).map(|(index, _)| index) {
        Some(index) => {
            config.routes[index] = route;
            Ok(false)
        }
        None => {
            config.routes.push(route);
            Ok(true)
        }
    }
}

pub fn delete_route(config: &mut Config, name: &str) -> Result<(), ControlError> {
    let (index, _) = find_route(config, name).ok_or_else(|| unknown("route", name))?;
    config.routes.remove(index);
    Ok(())
}

pub fn find_pool<'a>(config: &'a Config, name: &str) -> Option<&'a PoolConfig> {
    config.pools.iter().find(|pool| pool.name == name)
}

/// Replaces the pool called `name`, or appends it; returns whether it was added.
pub fn put_pool(
    config: &mut Config,
    name: &str,
    mut pool: PoolConfig,
) -> Result<bool, ControlError> {
    pool.name = name.to_string();
    match config.pools.iter_mut().find(|entry| entry.name == name) {
        Some(entry) => {
            *entry = pool;
            Ok(false)
        }
        None => {
            config.pools.push(pool);
            Ok(true)
        }
    }
}

/// Removes a pool; a route still naming it makes the edit fail validation.
pub fn delete_pool(config: &mut Config, name: &str) -> Result<(), ControlError> {
    let index = config
        .pools
        .iter()
        .position(|pool| pool.name == name)
        .ok_or_else(|| unknown("pool", name))?;
    config.pools.remove(index);
    Ok(())
}

fn route_mut<'a>(config: &'a mut Config, route: &str) -> Result<&'a mut RouteConfig, ControlError> {
    let (index, _) = find_route(config, route).ok_or_else(|| unknown("route", route))?;
    Ok(&mut config.routes[index])
}

/// Replaces a route's whole ordered L7 policy list (SPEC POLICY-2).
pub fn put_policies(
    config: &mut Config,
    route: &str,
    policies: Vec<PolicyRuleConfig>,
) -> Result<bool, ControlError> {
    route_mut(config, route)?.policies = policies;
    Ok(false)
}

/// Replaces the policy called `name` in place (its position, and so its precedence, stays)
/// or appends it last. Returns whether it was added. Stored with `name` set.
pub fn put_policy(
    config: &mut Config,
    route: &str,
    name: &str,
    mut policy: PolicyRuleConfig,
) -> Result<bool, ControlError> {
    policy.name = name.to_string();
    let policies = &mut route_mut(config, route)?.policies;
    match policies.iter().position(|p| p.name == name) {
        Some(index) => {
            policies[index] = policy;
            Ok(false)
        }
        None => {
            policies.push(policy);
            Ok(true)
        }
    }
}

pub fn delete_policy(config: &mut Config, route: &str, name: &str) -> Result<(), ControlError> {
    let policies = &mut route_mut(config, route)?.policies;
    let index = policies
        .iter()
        .position(|p| p.name == name)
        .ok_or_else(|| unknown("policy", name))?;
    policies.remove(index);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        crate::config::parse_str(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\n[[pools]]\nname = \"a\"\nendpoints = [\"127.0.0.1:1\"]\n\n[[routes]]\npool = \"a\"\n\n[[routes]]\nname = \"named\"\npool = \"a\"\n",
            crate::config::Format::Toml,
            std::iter::empty(),
        )
        .expect("config")
    }

    #[test]
    fn routes_are_found_by_name_or_default_name_and_replaced_or_appended() {
        let mut config = config();
        assert_eq!(find_route(&config, "route0").map(|(i, _)| i), Some(0));
        assert_eq!(find_route(&config, "named").map(|(i, _)| i), Some(1));
        assert!(find_route(&config, "route1").is_none());
        let route = config.routes[0].clone();
        assert!(!put_route(&mut config, "route0", route.clone()).unwrap());
        assert_eq!(config.routes[0].name.as_deref(), Some("route0"));
        assert!(put_route(&mut config, "new", route).unwrap());
        assert_eq!(config.routes.len(), 3);
        delete_route(&mut config, "named").unwrap();
        assert!(matches!(
            delete_route(&mut config, "named"),
            Err(ControlError::UnknownName { kind: "route", .. })
        ));
    }

    #[test]
    fn pools_are_replaced_appended_and_removed_by_name() {
        let mut config = config();
        let pool = config.pools[0].clone();
        assert!(put_pool(&mut config, "b", pool.clone()).unwrap());
        assert_eq!(config.pools[1].name, "b");
        assert!(!put_pool(&mut config, "b", pool).unwrap());
        delete_pool(&mut config, "b").unwrap();
        assert!(delete_pool(&mut config, "b").is_err());
        assert!(find_pool(&config, "a").is_some());
    }
}
