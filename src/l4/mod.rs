//! Layer-4 connection handling: sniffing the TLS ClientHello to route by SNI without
//! consuming it (SPEC CONN-7), and relaying raw bytes between client and backend for TLS
//! passthrough and TCP routes (SPEC CONN-8).

pub mod client_hello;
pub mod relay;
