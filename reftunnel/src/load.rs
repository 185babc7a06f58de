//! Load driver: N GETs, at most R per second on average, at most C in flight, every request on
//! a fresh TCP connection (no keep-alive: one request = one caller socket), loopback targets
//! only, bounded by a per-request timeout and an overall duration limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::http;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: String,
    pub requests: u64,
    /// Requests per second; 0 = as fast as the concurrency allows.
    pub rate: f64,
    pub concurrency: usize,
    pub timeout: Duration,
    pub duration_limit: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub host_header: String,
    pub path: String,
}

/// Accepts `http://host[:port][/path]` whose host resolves to loopback addresses only.
pub async fn parse_target(url: &str) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    if authority.is_empty() || authority.contains('@') {
        bail!("bad host in {url}");
    }
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("resolving {authority}"))?
        .collect();
    if addrs.is_empty() || !addrs.iter().all(|a| a.ip().is_loopback()) {
        bail!(
            "refusing non-loopback target {authority}: the load driver only talks to this machine"
        );
    }
    Ok(Target {
        addr: addrs[0],
        host_header: authority.to_owned(),
        path,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub url: String,
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub not_sent: u64,
    pub error_kinds: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub rate_rps: f64,
    pub latency_ms: Latency,
    pub bytes: u64,
    pub mb_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn error_ratio(&self) -> f64 {
        let total = self.requests.max(1) as f64;
        (self.errors + self.not_sent) as f64 / total
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "load {}: {} requests, {} ok, {} errors, {} not sent in {:.2}s = {:.1} req/s\n\
             latency p50 {:.2}ms p90 {:.2}ms p99 {:.2}ms max {:.2}ms\n\
             bytes {} = {:.2} MB/s\n",
            self.url,
            self.requests,
            self.ok,
            self.errors,
            self.not_sent,
            self.elapsed_s,
            self.rate_rps,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.max,
            self.bytes,
            self.mb_per_s,
        );
        for (k, v) in &self.error_kinds {
            s.push_str(&format!("error {k}: {v}\n"));
        }
        s
    }
}

struct Outcome {
    latency: Duration,
    result: Result<u64, String>,
}

async fn one(target: Arc<Target>, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let result = match tokio::time::timeout(timeout, request(&target)).await {
        Ok(r) => r,
        Err(_) => Err("timeout".to_owned()),
    };
    // The socket is dropped (closed) inside `request`: the caller always closes its end.
    Outcome {
        latency: start.elapsed(),
        result,
    }
}

async fn request(t: &Target) -> Result<u64, String> {
    let mut sock = TcpStream::connect(t.addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = sock.set_nodelay(true);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: reftunnel-load\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        t.path, t.host_header
    );
    sock.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {}", e.kind()))?;
    let (head, rest) = http::read_response_head(&mut sock)
        .await
        .map_err(|e| format!("response head: {e}"))?;
    let mut got = rest.len() as u64;
    let mut buf = vec![0u8; 64 * 1024];
    // Read exactly Content-Length bytes: a server that keeps the socket open (stuck-pipe) must
    // not make a complete response look like a timeout.
    match head.content_length {
        Some(want) => {
            while got < want {
                let n = sock
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("body: {}", e.kind()))?;
                if n == 0 {
                    return Err("short body".to_owned());
                }
                got += n as u64;
            }
        }
        None => loop {
            let n = sock
                .read(&mut buf)
                .await
                .map_err(|e| format!("body: {}", e.kind()))?;
            if n == 0 {
                break;
            }
            got += n as u64;
        },
    }
    if !(200..300).contains(&head.status) {
        return Err(format!("status {}", head.status));
    }
    Ok(got)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

pub async fn run(cfg: LoadConfig) -> anyhow::Result<Summary> {
    if cfg.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if cfg.rate < 0.0 || !cfg.rate.is_finite() {
        bail!("--rate must be a non-negative number");
    }
    let target = Arc::new(parse_target(&cfg.url).await?);
    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let start = Instant::now();
    let tstart = tokio::time::Instant::now();
    let deadline = tstart + cfg.duration_limit;
    let period = (cfg.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / cfg.rate));
    let mut set = JoinSet::new();
    let mut sent = 0u64;
    for i in 0..cfg.requests {
        if let Some(p) = period {
            let at = tstart + p.mul_f64(i as f64);
            if at >= deadline {
                break;
            }
            tokio::time::sleep_until(at).await;
        }
        let permit = match tokio::time::timeout_at(deadline, sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => break,
        };
        let t = target.clone();
        let timeout = cfg.timeout;
        set.spawn(async move {
            let o = one(t, timeout).await;
            drop(permit);
            o
        });
        sent += 1;
    }
    let mut latencies = Vec::with_capacity(sent as usize);
    let mut ok = 0u64;
    let mut bytes = 0u64;
    let mut error_kinds: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let Ok(o) = joined else {
            *error_kinds.entry("task failed".to_owned()).or_default() += 1;
            continue;
        };
        latencies.push(o.latency);
        match o.result {
            Ok(n) => {
                ok += 1;
                bytes += n;
            }
            Err(e) => *error_kinds.entry(e).or_default() += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    latencies.sort_unstable();
    let errors: u64 = error_kinds.values().sum();
    Ok(Summary {
        url: cfg.url,
        requests: cfg.requests,
        ok,
        errors,
        not_sent: cfg.requests - sent,
        error_kinds,
        elapsed_s: elapsed,
        rate_rps: ok as f64 / elapsed,
        latency_ms: Latency {
            p50: percentile(&latencies, 50.0),
            p90: percentile(&latencies, 90.0),
            p99: percentile(&latencies, 99.0),
            max: latencies
                .last()
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(0.0),
        },
        bytes,
        mb_per_s: bytes as f64 / 1e6 / elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_only() {
        let t = parse_target("http://127.0.0.1:8080/proxy/a/b")
            .await
            .expect("ok");
        assert_eq!(t.path, "/proxy/a/b");
        assert_eq!(t.addr.port(), 8080);
        assert!(parse_target("http://10.1.2.3:80/").await.is_err());
        assert!(parse_target("https://127.0.0.1/").await.is_err());
        assert!(parse_target("http://user@127.0.0.1/").await.is_err());
        let t = parse_target("http://[::1]:9/").await.expect("v6 ok");
        assert!(t.addr.ip().is_loopback());
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }
}
