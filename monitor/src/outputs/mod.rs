//! Outputs: leakwatch's own /metrics, the /status and /healthz API, and verdict logs.
pub mod http;
pub mod log;
pub mod metrics;
pub mod record;
