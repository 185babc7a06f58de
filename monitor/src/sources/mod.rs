//! Sources of samples: the eBPF probes, procfs, sock_diag (per-socket idle ages), and the target's own
//! /metrics.
pub mod ebpf;
pub mod exposition;
pub mod goroutines;
pub mod procfs;
pub mod scrape;
pub mod sockdiag;
pub mod socket_table;
