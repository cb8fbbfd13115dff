//! Gatehouse: a traffic gateway. The library holds everything; `main.rs` is a thin CLI.
//!
//! Control plane: `config` (schema, load, validate) → `snapshot` (compile, publish).
//! Data plane: `listener` (accept) → `http` (pipeline) → `route` (match) → `upstream`
//! (pools, connections). `telemetry` reports, `ops` handles signals, `gateway` ties them. `ctl` is the
//! admin API client behind `gatehouse ctl`.

pub mod acme;
pub mod clock;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod firewall;
pub mod gateway;
pub mod http;
pub mod l4;
pub mod listener;
pub mod ops;
pub mod policy;
pub mod route;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod traffic;
pub mod upstream;
pub mod workers;
