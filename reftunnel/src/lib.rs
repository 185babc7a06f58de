//! reftunnel: a reference implementation of Rancher's remotedialer websocket tunnel, wire
//! compatible with the Go library, with deliberate and switchable leak modes so that leakwatch
//! can be tested against known-good and known-bad tunnels. See `reftunnel/README.md`.

pub mod out;

pub mod agent;
pub mod backend;
pub mod controllers;
pub mod frame;
pub mod http;
pub mod idle_clients;
pub mod leak;
pub mod load;
pub mod metrics;
pub mod peer;
pub mod pipe;
pub mod runtime_stats;
pub mod server;
pub mod session;
pub mod session_manager;
pub mod tasks;
pub mod transport;
pub mod watches;
