//! Load driver: N GETs, at most R per second on average, at most C in flight, loopback targets
//! only, bounded by a per-request timeout and an overall duration limit. By default every
//! request uses a fresh TCP connection (one request = one caller socket); with `keep_alive`
//! connections persist and are reused, at most C of them (one per worker), as a Go client's
//! pool would hold them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
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
    /// Reuse caller connections (HTTP keep-alive) instead of one connection per request.
    pub keep_alive: bool,
    /// Spread the requests over this many clientkeys: request `i` goes to `/proxy/<id>-<i mod K>/...`
    /// instead of `/proxy/<id>/...` (the agents of `reftunnel agent --count K`). 0 or 1: the URL as is.
    pub clientkeys: u64,
    /// Spread the requests over these backends too (`/proxy/<id>/@<addr>/...`, see [`Spread`]).
    pub addrs: Vec<String>,
}

/// How request `i` of a run is spread over clientkeys and backend addrs: clientkey `i mod K`, addr
/// `(i div K) mod A`, so that every (clientkey, addr) pair gets a request within K x A requests and
/// the server's ledger a row for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spread {
    /// `/proxy/<id>`
    head: String,
    /// The path after the clientid, from its `/`.
    tail: String,
    clientkeys: u64,
    addrs: Vec<String>,
}

impl Spread {
    /// `None` when nothing is spread (the URL's path is used as is).
    pub fn new(path: &str, clientkeys: u64, addrs: &[String]) -> anyhow::Result<Option<Self>> {
        if clientkeys <= 1 && addrs.is_empty() {
            return Ok(None);
        }
        for a in addrs {
            if !a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                bail!("bad --addrs entry {a:?}: expected host:port");
            }
        }
        let (head, tail) = split_proxy_path(path)?;
        if tail.starts_with("/@") && !addrs.is_empty() {
            bail!("the URL already names a backend (/@...): drop it or --addrs");
        }
        Ok(Some(Self {
            head,
            tail,
            clientkeys: clientkeys.max(1),
            addrs: addrs.to_vec(),
        }))
    }

    pub fn path(&self, i: u64) -> String {
        let mut p = self.head.clone();
        if self.clientkeys > 1 {
            p.push_str(&format!("-{}", i % self.clientkeys));
        }
        if !self.addrs.is_empty() {
            let a = (i / self.clientkeys) % self.addrs.len() as u64;
            p.push_str("/@");
            p.push_str(&self.addrs[a as usize]);
        }
        p.push_str(&self.tail);
        p
    }
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
    /// TCP connections the driver opened (equal to the requests sent without keep-alive).
    pub connections: u64,
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
             bytes {} = {:.2} MB/s, {} connections\n",
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
            self.connections,
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

/// Persistent connections waiting for their next request (keep-alive mode).
#[derive(Default)]
struct Idle(Mutex<Vec<KeepConn>>);

impl Idle {
    fn take(&self) -> Option<KeepConn> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }
    fn put(&self, c: KeepConn) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(c);
    }
}

struct KeepConn {
    sock: TcpStream,
    /// Bytes read past the previous response.
    buf: BytesMut,
}

struct Shared {
    target: Target,
    spread: Option<Spread>,
    timeout: Duration,
    idle: Option<Idle>,
    connections: AtomicU64,
}

impl Shared {
    /// The target of request `i`.
    fn target_for(&self, i: u64) -> std::borrow::Cow<'_, Target> {
        match &self.spread {
            None => std::borrow::Cow::Borrowed(&self.target),
            Some(s) => std::borrow::Cow::Owned(Target {
                path: s.path(i),
                ..self.target.clone()
            }),
        }
    }
}

/// `/proxy/<id>/<rest>` as (`/proxy/<id>`, `/<rest>`), for spreading requests over clientkeys.
fn split_proxy_path(path: &str) -> anyhow::Result<(String, String)> {
    let rest = path
        .strip_prefix("/proxy/")
        .context("--clientkeys and --addrs need a /proxy/<id>/ URL")?;
    let (id, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    Ok((format!("/proxy/{id}"), tail.to_owned()))
}

async fn one(shared: Arc<Shared>, i: u64) -> Outcome {
    let start = Instant::now();
    let target = shared.target_for(i);
    let work = async {
        match &shared.idle {
            Some(idle) => request_keep_alive(&shared, &target, idle).await,
            None => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                request(&target).await
            }
        }
    };
    let result = match tokio::time::timeout(shared.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err("timeout".to_owned()),
    };
    // Without keep-alive the socket is dropped (closed) inside `request`: the caller always
    // closes its end. With keep-alive it went back to `idle`, or was dropped on error.
    Outcome {
        latency: start.elapsed(),
        result,
    }
}

async fn connect(t: &Target) -> Result<TcpStream, String> {
    let sock = TcpStream::connect(t.addr)
        .await
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let _ = sock.set_nodelay(true);
    Ok(sock)
}

/// A failed exchange on a persistent connection, and whether the server answered nothing at all
/// (then the connection had gone stale while idle and the request may be sent again).
struct ExchangeError {
    msg: String,
    nothing_back: bool,
}

async fn request_keep_alive(s: &Shared, target: &Target, idle: &Idle) -> Result<u64, String> {
    if let Some(mut c) = idle.take() {
        match exchange(target, &mut c).await {
            Ok((n, reusable)) => {
                if reusable {
                    idle.put(c);
                }
                return Ok(n);
            }
            // As Go's client does: a reused connection the server closed while it sat idle.
            Err(e) if e.nothing_back => {}
            Err(e) => return Err(e.msg),
        }
    }
    let sock = connect(target).await?;
    s.connections.fetch_add(1, Ordering::Relaxed);
    let mut c = KeepConn {
        sock,
        buf: BytesMut::new(),
    };
    let (n, reusable) = exchange(target, &mut c).await.map_err(|e| e.msg)?;
    if reusable {
        idle.put(c);
    }
    Ok(n)
}

/// One request on a persistent connection; returns the body length and whether the connection
/// can carry another request.
async fn exchange(t: &Target, c: &mut KeepConn) -> Result<(u64, bool), ExchangeError> {
    let fail = |msg: String, nothing_back: bool| ExchangeError { msg, nothing_back };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: reftunnel-load\r\nAccept: */*\r\n\r\n",
        t.path, t.host_header
    );
    c.sock
        .write_all(req.as_bytes())
        .await
        .map_err(|e| fail(format!("write: {}", e.kind()), true))?;
    let before = c.buf.len();
    let head = http::read_response_head_buf(&mut c.sock, &mut c.buf)
        .await
        .map_err(|e| {
            let nothing = before == 0 && c.buf.is_empty();
            let nothing = nothing && matches!(e, http::HeadError::Eof | http::HeadError::Io(_));
            fail(format!("response head: {e}"), nothing)
        })?;
    let Some(want) = head.content_length else {
        // No length: the body runs to EOF, and the connection with it.
        let mut got = c.buf.len() as u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = c
                .sock
                .read(&mut buf)
                .await
                .map_err(|e| fail(format!("body: {}", e.kind()), false))?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        return status_ok(head.status).map(|()| (got, false));
    };
    let mut got = (c.buf.len() as u64).min(want);
    let _ = c.buf.split_to(got as usize);
    let mut buf = vec![0u8; 64 * 1024];
    while got < want {
        let n = c
            .sock
            .read(&mut buf)
            .await
            .map_err(|e| fail(format!("body: {}", e.kind()), false))?;
        if n == 0 {
            return Err(fail("short body".to_owned(), false));
        }
        let used = (n as u64).min(want - got) as usize;
        // Anything past the body would be an unsolicited response: keep it for the next read.
        c.buf.extend_from_slice(&buf[used..n]);
        got += used as u64;
    }
    status_ok(head.status).map(|()| (got, !head.close))
}

fn status_ok(status: u16) -> Result<(), ExchangeError> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(ExchangeError {
            msg: format!("status {status}"),
            nothing_back: false,
        })
    }
}

async fn request(t: &Target) -> Result<u64, String> {
    let mut sock = connect(t).await?;
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
    let target = parse_target(&cfg.url).await?;
    let spread = Spread::new(&target.path, cfg.clientkeys, &cfg.addrs)?;
    let shared = Arc::new(Shared {
        target,
        spread,
        timeout: cfg.timeout,
        idle: cfg.keep_alive.then(Idle::default),
        connections: AtomicU64::new(0),
    });
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
        let sh = shared.clone();
        set.spawn(async move {
            let o = one(sh, i).await;
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
        connections: shared.connections.load(Ordering::Relaxed),
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
    fn requests_cover_every_clientkey_and_addr() {
        let addrs: Vec<String> = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            .map(String::from)
            .to_vec();
        let s = Spread::new("/proxy/c/x?y=1", 2, &addrs).unwrap().unwrap();
        assert_eq!(s.path(0), "/proxy/c-0/@127.0.0.1:1/x?y=1");
        assert_eq!(s.path(1), "/proxy/c-1/@127.0.0.1:1/x?y=1");
        assert_eq!(s.path(2), "/proxy/c-0/@127.0.0.1:2/x?y=1");
        let pairs: std::collections::BTreeSet<String> = (0..6).map(|i| s.path(i)).collect();
        assert_eq!(pairs.len(), 6, "{pairs:?}");
        let only_addrs = Spread::new("/proxy/c/", 0, &addrs).unwrap().unwrap();
        assert_eq!(only_addrs.path(4), "/proxy/c/@127.0.0.1:2/");
        assert_eq!(Spread::new("/proxy/c/", 1, &[]).unwrap(), None);
        assert!(Spread::new("/x", 2, &[]).is_err());
        assert!(Spread::new("/proxy/c/", 0, &["nope".into()]).is_err());
        assert!(Spread::new("/proxy/c/@127.0.0.1:1/", 0, &addrs).is_err());
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }
}
