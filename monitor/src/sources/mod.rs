//! Sources of samples: the eBPF probes, procfs, and the target's own /metrics.
pub mod scrape;
