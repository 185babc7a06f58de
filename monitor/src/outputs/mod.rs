//! Outputs: leakwatch's own /metrics, /status, /healthz and logs.
