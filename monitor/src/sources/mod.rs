//! Sources of samples: the eBPF probes, procfs, and the target's own /metrics.
pub mod ebpf;
pub mod goroutines;
pub mod procfs;
pub mod scrape;
pub mod socket_table;
