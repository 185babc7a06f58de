//! leakwatch: watches a tunnel process's sockets and tasks through the kernel (eBPF, procfs) and through its
//! own Prometheus metrics, and cross-checks them to catch connection and task leaks.
//!
//! The data path reads top to bottom: [`sources`] produce [`sample`]s ([`collect`] assembles one
//! [`sample::Snapshot`] per tick), [`analysis`] turns a series of them into [`verdict`]s, and [`outputs`]
//! publish them (metrics, logs, HTTP API). [`engine`] runs that loop; [`commands`] wrap it for the CLI.
pub mod analysis;
pub mod args;
pub mod cli;
pub mod collect;
pub mod commands;
pub mod config;
pub mod engine;
pub mod outputs;
pub mod sample;
pub mod sources;
pub mod system;
pub mod target;
pub mod verdict;
