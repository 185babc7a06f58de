//! Outputs: leakwatch's own /metrics, the /status and /healthz API, verdict logs, recordings, and the
//! pictures (the in-memory history, its charts, the live page and the reports).
pub mod charts;
pub mod history;
pub mod http;
pub mod log;
pub mod metrics;
pub mod page;
pub mod record;
