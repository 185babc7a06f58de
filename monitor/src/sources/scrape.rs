//! Scraper of the target's Prometheus /metrics.
