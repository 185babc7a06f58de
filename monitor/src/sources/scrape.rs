//! The scraper: fetches the target's Prometheus `/metrics`, bounded in time and size, and extracts the
//! series leakwatch cross-checks. A failed or garbled scrape is an outcome with a reason, never a sample of
//! zeros: a tunnel whose metrics endpoint breaks must not look like one whose connections all closed.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Deserialize;
use thiserror::Error;

use super::exposition;
use crate::sample::{AppSample, ScrapeErrorClass, ScrapeOutcome};

/// Names of the series to read; the defaults are remotedialer's and the Go runtime's.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricNames {
    pub add_connections: String,
    pub remove_connections: String,
    pub add_session: String,
    pub remove_session: String,
    pub goroutines: String,
    pub heap_inuse: String,
    pub threads: String,
    pub open_fds: String,
    pub max_fds: String,
    /// Prefix that tells whether remotedialer's metrics are registered at all.
    pub remotedialer_prefix: String,
}

impl Default for MetricNames {
    fn default() -> Self {
        Self {
            add_connections: "session_server_total_add_connections".into(),
            remove_connections: "session_server_total_remove_connections".into(),
            add_session: "session_server_total_add_websocket_session".into(),
            remove_session: "session_server_total_remove_websocket_session".into(),
            goroutines: "go_goroutines".into(),
            heap_inuse: "go_memstats_heap_inuse_bytes".into(),
            threads: "go_threads".into(),
            open_fds: "process_open_fds".into(),
            max_fds: "process_max_fds".into(),
            remotedialer_prefix: "session_server_".into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ScrapeConfig {
    pub url: String,
    pub timeout: Duration,
    pub bearer_token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub names: MetricNames,
    /// Larger bodies are refused (a runaway exporter must not blow up the sidecar).
    pub max_body_bytes: usize,
    /// Distinct (clientkey, proto, addr) rows kept; the rest are summed into clientkey `_other`.
    pub max_ledger_rows: usize,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout: Duration::from_secs(5),
            bearer_token_file: None,
            ca_file: None,
            names: MetricNames::default(),
            max_body_bytes: 16 << 20,
            max_ledger_rows: 25_000,
        }
    }
}

#[derive(Debug, Error)]
pub enum ScrapeSetupError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid CA certificate in {path}: {source}")]
    CaCert {
        path: String,
        source: reqwest::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
}

/// Why a scrape produced no sample. Its [`ScrapeError::class`] is the `reason` label of
/// `leakwatch_app_scrape_errors_total`.
#[derive(Debug, Error, PartialEq)]
pub enum ScrapeError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("timeout: no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("status: HTTP {0}")]
    Status(u16),
    #[error("too_large: body over {0} bytes (reading stopped there)")]
    TooLarge(usize),
    #[error("parse: {0}")]
    Parse(String),
    #[error("token: {0}")]
    Token(String),
}

impl ScrapeError {
    /// The class of this failure, for metric labels.
    pub fn class(&self) -> ScrapeErrorClass {
        match self {
            Self::Connect(_) => ScrapeErrorClass::Connect,
            Self::Timeout(_) => ScrapeErrorClass::Timeout,
            Self::Status(_) => ScrapeErrorClass::Status,
            Self::TooLarge(_) => ScrapeErrorClass::TooLarge,
            Self::Parse(_) => ScrapeErrorClass::Parse,
            Self::Token(_) => ScrapeErrorClass::Token,
        }
    }
}

pub struct Scraper {
    pub cfg: ScrapeConfig,
    client: reqwest::Client,
}

impl Scraper {
    pub fn new(cfg: ScrapeConfig) -> Result<Self, ScrapeSetupError> {
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout);
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|source| ScrapeSetupError::CaFile {
                path: path.display().to_string(),
                source,
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|source| {
                ScrapeSetupError::CaCert {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(ScrapeSetupError::Client)?;
        Ok(Self { cfg, client })
    }

    pub async fn scrape(&self) -> ScrapeOutcome {
        match self.read_sample().await {
            Ok(sample) => ScrapeOutcome::Ok(sample),
            Err(e) => ScrapeOutcome::Failed {
                class: e.class(),
                reason: e.to_string(),
            },
        }
    }

    /// The target's metrics, read as they arrive: memory stays one chunk and one line whatever the
    /// body's size, and a garbled line of a family leakwatch reads ends the read at once.
    async fn read_sample(&self) -> Result<AppSample, ScrapeError> {
        let mut reader = exposition::Reader::new(&self.cfg.names, self.cfg.max_ledger_rows);
        self.stream(&self.cfg.url, |chunk| Ok(reader.feed(chunk)?))
            .await?;
        Ok(reader.finish()?)
    }

    /// A GET of another path of the same target (same credentials and timeout) that answered 2xx; the
    /// caller reads the body under its own bounds (the goroutine dump is parsed as it streams in).
    pub async fn get(&self, url: &str) -> Result<reqwest::Response, ScrapeError> {
        let mut req = self
            .client
            .get(url)
            .header("Accept", "text/plain;version=0.0.4");
        if let Some(path) = &self.cfg.bearer_token_file {
            // Re-read every time: mounted secrets rotate. The token itself never reaches a log line.
            let token = std::fs::read_to_string(path)
                .map_err(|e| ScrapeError::Token(format!("cannot read {}: {e}", path.display())))?;
            req = req.bearer_auth(token.trim());
        }
        let resp = req.send().await.map_err(|e| self.classify(e))?;
        if !resp.status().is_success() {
            return Err(ScrapeError::Status(resp.status().as_u16()));
        }
        Ok(resp)
    }

    fn classify(&self, e: reqwest::Error) -> ScrapeError {
        if e.is_timeout() {
            ScrapeError::Timeout(self.cfg.timeout)
        } else {
            ScrapeError::Connect(without_url(e))
        }
    }

    /// A bounded GET of another path of the same target (same credentials, timeout and size cap), held
    /// whole in memory.
    pub async fn fetch_url(&self, url: &str) -> Result<String, ScrapeError> {
        let mut body = Vec::new();
        self.stream(url, |chunk| {
            body.extend_from_slice(chunk);
            Ok(())
        })
        .await?;
        String::from_utf8(body).map_err(|_| ScrapeError::Parse("body is not UTF-8".into()))
    }

    /// A GET whose body goes to `on_chunk` piece by piece, bounded in time (`timeout`, for the whole
    /// answer) and size (`max_body_bytes`): past either the read stops, the connection is dropped and
    /// the answer is `Timeout` or `TooLarge`.
    async fn stream(
        &self,
        url: &str,
        mut on_chunk: impl FnMut(&[u8]) -> Result<(), ScrapeError>,
    ) -> Result<(), ScrapeError> {
        let started = Instant::now();
        let mut resp = self.get(url).await?;
        if resp
            .content_length()
            .is_some_and(|n| n as usize > self.cfg.max_body_bytes)
        {
            return Err(ScrapeError::TooLarge(self.cfg.max_body_bytes));
        }
        let mut read = 0usize;
        loop {
            let left = self.cfg.timeout.saturating_sub(started.elapsed());
            let chunk = tokio::time::timeout(left, resp.chunk())
                .await
                .map_err(|_| ScrapeError::Timeout(self.cfg.timeout))?
                .map_err(|e| self.classify(e))?;
            let Some(chunk) = chunk else { break };
            read += chunk.len();
            if read > self.cfg.max_body_bytes {
                return Err(ScrapeError::TooLarge(self.cfg.max_body_bytes));
            }
            on_chunk(&chunk)?;
        }
        Ok(())
    }
}

/// reqwest's messages include the URL, which may carry credentials in its userinfo; keep the cause only.
fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// Parses a whole text exposition into the numbers leakwatch needs (a scrape does the same chunk by chunk,
/// see [`exposition`]). Strict on the families it reads: a body that is not exposition format, or a
/// garbled line of a family leakwatch reads, is an error, never a sample of zeros.
pub fn parse_app_sample(
    body: &str,
    names: &MetricNames,
    max_ledger_rows: usize,
) -> Result<AppSample, ScrapeError> {
    exposition::parse(body.as_bytes(), names, max_ledger_rows).map_err(ScrapeError::from)
}

impl From<exposition::ParseError> for ScrapeError {
    fn from(e: exposition::ParseError) -> Self {
        Self::Parse(e.to_string().chars().take(200).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_carries_its_class_and_old_recordings_without_one_read_as_other() {
        let e = ScrapeError::TooLarge(10);
        assert_eq!(e.class().as_str(), "too_large");
        assert!(e.to_string().starts_with("too_large:"), "{e}");
        let old: ScrapeOutcome =
            serde_json::from_str(r#"{"Failed":{"reason":"timeout: no complete answer"}}"#)
                .expect("an old recording reads");
        assert_eq!(
            old,
            ScrapeOutcome::Failed {
                class: ScrapeErrorClass::Other,
                reason: "timeout: no complete answer".into()
            }
        );
        let new = ScrapeOutcome::Failed {
            class: ScrapeErrorClass::Connect,
            reason: "connect: refused".into(),
        };
        let json = serde_json::to_string(&new).expect("serializes");
        assert!(json.contains(r#""class":"connect""#), "{json}");
        assert_eq!(serde_json::from_str::<ScrapeOutcome>(&json).unwrap(), new);
    }

    const BODY: &str = r#"# HELP session_server_total_add_connections Total count of added connections
# TYPE session_server_total_add_connections counter
session_server_total_add_connections{addr="127.0.0.1:8080",clientkey="c1",proto="tcp"} 120
session_server_total_add_connections{addr="127.0.0.1:9090",clientkey="c2",proto="tcp"} 5
# HELP session_server_total_remove_connections Total count of removed connections
# TYPE session_server_total_remove_connections counter
session_server_total_remove_connections{addr="127.0.0.1:8080",clientkey="c1",proto="tcp"} 100
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 42
# TYPE go_memstats_heap_inuse_bytes gauge
go_memstats_heap_inuse_bytes 1.5e+06
# TYPE process_max_fds gauge
process_max_fds +Inf
"#;

    #[test]
    fn extracts_the_ledger_and_runtime_gauges() {
        let s = parse_app_sample(BODY, &MetricNames::default(), 100).unwrap();
        assert!(s.remotedialer_present);
        assert_eq!(s.ledger.len(), 2);
        let c1 = &s.ledger[0];
        assert_eq!(
            (
                c1.clientkey.as_str(),
                c1.addr.as_str(),
                c1.added,
                c1.removed
            ),
            ("c1", "127.0.0.1:8080", 120.0, 100.0)
        );
        assert_eq!((s.ledger[1].added, s.ledger[1].removed), (5.0, 0.0));
        assert_eq!(s.goroutines, Some(42.0));
        assert_eq!(s.heap_inuse_bytes, Some(1.5e6));
        assert_eq!(s.max_fds, None, "an infinite limit is no limit");
    }

    #[test]
    fn absent_remotedialer_metrics_are_reported_as_absent() {
        let s = parse_app_sample(
            "# TYPE go_goroutines gauge\ngo_goroutines 7\n",
            &MetricNames::default(),
            10,
        )
        .unwrap();
        assert!(!s.remotedialer_present);
        assert!(s.ledger.is_empty());
        assert_eq!(s.goroutines, Some(7.0));
    }

    #[test]
    fn garbage_is_an_error_not_zeros() {
        for garbage in [
            "session_server_total_add_connections{clientkey=\"a\" 12\n",
            "\u{0}\u{1}garbage{{{\n",
            "<html><body>502 Bad Gateway</body></html>\n",
            "go_goroutines not-a-number\n",
        ] {
            assert!(
                matches!(
                    parse_app_sample(garbage, &MetricNames::default(), 10),
                    Err(ScrapeError::Parse(_))
                ),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn ledger_cardinality_is_capped() {
        let mut body = String::from("# TYPE session_server_total_add_connections counter\n");
        for i in 0..50 {
            body += &format!(
                "session_server_total_add_connections{{addr=\"a{i}\",clientkey=\"k{i}\",proto=\"tcp\"}} 1\n"
            );
        }
        let s = parse_app_sample(&body, &MetricNames::default(), 10).unwrap();
        assert_eq!(s.ledger.len(), 11, "10 rows and _other");
        assert_eq!(s.ledger_rows_dropped, 40);
        let other = s.ledger.iter().find(|r| r.clientkey == "_other").unwrap();
        assert_eq!(other.added, 40.0);
    }

    #[test]
    fn label_values_with_commas_and_escapes() {
        let body = "# TYPE session_server_total_add_connections counter\nsession_server_total_add_connections{addr=\"h,x=1\",clientkey=\"a\\\"b\",proto=\"tcp\"} 3\n";
        let s = parse_app_sample(body, &MetricNames::default(), 10).unwrap();
        assert_eq!(s.ledger[0].addr, "h,x=1");
        assert_eq!(s.ledger[0].added, 3.0);
    }

    async fn serve_once(response: &'static [u8], delay: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                tokio::time::sleep(delay).await;
                let _ = s.write_all(response).await;
                // Echo whether a bearer token arrived, for the token test.
                if req.contains("authorization: Bearer s3cret")
                    || req.contains("Authorization: Bearer s3cret")
                {
                    let _ = s.write_all(b"").await;
                }
            }
        });
        format!("http://{addr}/metrics")
    }

    fn scraper(url: String, timeout: Duration) -> Scraper {
        Scraper::new(ScrapeConfig {
            url,
            timeout,
            max_body_bytes: 4096,
            ..ScrapeConfig::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn ok_status_timeout_too_large_and_refused() {
        let ok = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 43\r\nConnection: close\r\n\r\n# TYPE go_goroutines gauge\ngo_goroutines 3\n", Duration::ZERO).await;
        let out = scraper(ok, Duration::from_secs(2)).scrape().await;
        let ScrapeOutcome::Ok(s) = out else {
            panic!("expected a sample, got {out:?}")
        };
        assert_eq!(s.goroutines, Some(3.0));

        let err = serve_once(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            Duration::ZERO,
        )
        .await;
        assert_eq!(
            scraper(err, Duration::from_secs(2)).scrape().await,
            ScrapeOutcome::Failed {
                class: ScrapeErrorClass::Status,
                reason: "status: HTTP 500".into()
            }
        );

        let slow = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            Duration::from_secs(3),
        )
        .await;
        let out = scraper(slow, Duration::from_millis(300)).scrape().await;
        assert!(
            matches!(
                &out,
                ScrapeOutcome::Failed {
                    class: ScrapeErrorClass::Timeout,
                    ..
                }
            ),
            "{out:?}"
        );

        static HUGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            let mut v = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
            v.extend(std::iter::repeat_n(b'#', 100_000));
            v
        });
        let huge = serve_once(&HUGE, Duration::ZERO).await;
        let out = scraper(huge, Duration::from_secs(2)).scrape().await;
        assert!(
            matches!(
                &out,
                ScrapeOutcome::Failed {
                    class: ScrapeErrorClass::TooLarge,
                    ..
                }
            ),
            "{out:?}"
        );

        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let a = l.local_addr().unwrap();
            drop(l);
            format!("http://{a}/metrics")
        };
        let out = scraper(refused, Duration::from_secs(2)).scrape().await;
        assert!(
            matches!(
                &out,
                ScrapeOutcome::Failed {
                    class: ScrapeErrorClass::Connect,
                    ..
                }
            ),
            "{out:?}"
        );
    }

    /// Serves `total` bytes of valid exposition (made up as it is written, never held) to every
    /// connection, with no Content-Length; returns the URL and, per connection, how many bytes the
    /// server managed to write before the client went away.
    async fn serve_endless(
        total: u64,
        pause: Duration,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<u64>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", l.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n# TYPE go_goroutines gauge\ngo_goroutines 5\n")
                        .await;
                    let mut sent = 0u64;
                    let mut block = String::new();
                    let mut i = 0u64;
                    while sent < total {
                        block.clear();
                        while block.len() < 64 << 10 {
                            block += &format!(
                                "unrelated_series{{shard=\"{}\",i=\"{i}\"}} {i}\n",
                                i % 97
                            );
                            i += 1;
                        }
                        if s.write_all(block.as_bytes()).await.is_err() {
                            break;
                        }
                        sent += block.len() as u64;
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    let _ = tx.send(sent);
                });
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn a_200_mb_body_gets_a_bounded_answer_in_bounded_time() {
        let (url, mut sent) = serve_endless(200 << 20, Duration::ZERO).await;
        let cfg = ScrapeConfig {
            url,
            ..ScrapeConfig::default()
        };
        let bound = cfg.max_body_bytes;
        let scraper = Scraper::new(cfg).unwrap();
        for _ in 0..2 {
            let started = Instant::now();
            let out = scraper.scrape().await;
            let took = started.elapsed();
            assert_eq!(
                out,
                ScrapeOutcome::Failed {
                    class: ScrapeErrorClass::TooLarge,
                    reason: format!("too_large: body over {bound} bytes (reading stopped there)"),
                }
            );
            assert!(took < Duration::from_secs(5), "answered in {took:?}");
            // Reading stopped at the bound: the server could write no more than that and what the
            // sockets' buffers hold, nowhere near the 200 MB it had to send.
            let wrote = sent.recv().await.unwrap();
            assert!(
                wrote < bound as u64 + (16 << 20),
                "the server wrote {wrote} bytes before the client went away"
            );
        }
    }

    #[tokio::test]
    async fn a_body_that_never_ends_is_cut_at_the_timeout() {
        let (url, _sent) = serve_endless(u64::MAX, Duration::from_millis(20)).await;
        let scraper = Scraper::new(ScrapeConfig {
            url,
            timeout: Duration::from_millis(700),
            ..ScrapeConfig::default()
        })
        .unwrap();
        let started = Instant::now();
        let out = scraper.scrape().await;
        assert!(
            matches!(
                &out,
                ScrapeOutcome::Failed {
                    class: ScrapeErrorClass::Timeout,
                    ..
                }
            ),
            "{out:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_body_read_in_small_chunks_is_read_whole() {
        // Many small TCP segments: every chunk boundary the network makes is one the reader must cross.
        let (url, _sent) = serve_endless(2 << 20, Duration::from_millis(1)).await;
        let scraper = Scraper::new(ScrapeConfig {
            url,
            ..ScrapeConfig::default()
        })
        .unwrap();
        let out = scraper.scrape().await;
        let ScrapeOutcome::Ok(s) = out else {
            panic!("expected a sample, got {out:?}")
        };
        assert_eq!(s.goroutines, Some(5.0));
        assert!(!s.remotedialer_present);
    }

    #[tokio::test]
    async fn bearer_token_is_sent_from_the_file() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", l.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nConnection: close\r\n\r\ngo_goroutines 1\n").await;
            String::from_utf8_lossy(&buf[..n]).to_lowercase()
        });
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let s = Scraper::new(ScrapeConfig {
            url,
            bearer_token_file: Some(token),
            ..ScrapeConfig::default()
        })
        .unwrap();
        assert!(matches!(s.scrape().await, ScrapeOutcome::Ok(_)));
        assert!(
            server
                .await
                .unwrap()
                .contains("authorization: bearer s3cret")
        );
    }
}
