use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use reftunnel::controllers::{ControllersConfig, Rate};
use reftunnel::leak::{AgentLeak, LeakMode, ServerLeak};
use reftunnel::transport::{ProxyTransport, TransportOverride};
use reftunnel::{agent, backend, idle_clients, load, server, watches};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Reference remotedialer tunnel (server, agent, HTTP backend, load driver) with switchable
/// leak modes for testing leakwatch.
///
/// Typical run: `reftunnel backend --listen 127.0.0.1:0`, then `reftunnel server --listen
/// 127.0.0.1:0 --token T --backend <backend addr> --remotedialer-metrics`, then `reftunnel agent
/// --server ws://<server addr>/connect --token T --id downstream-1`, then `reftunnel load --url
/// http://<server addr>/proxy/downstream-1/ --requests 1000 --rate 200 --concurrency 16`.
/// Servers print `... listening on <ADDR>` on stdout; the server prints `agent <id> connected`
/// when a session is up. Logs go to stderr (RUST_LOG, default info).
#[derive(Parser)]
#[command(name = "reftunnel", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Small HTTP backend: `/` (short text), `/bytes/<n>`, `/slow/<ms>` (sends nothing at all,
    /// not even the head, until the delay ends), `/watch/<secs>` (a Kubernetes watch: status 200
    /// and the head at once, chunked, then one JSON event line every <secs> seconds, open until
    /// the caller leaves), `/healthz`; HTTP/1.1 keep-alive with no idle timeout (as a Go
    /// http.Server), `Connection: close` honoured.
    Backend {
        /// Address to listen on (port 0 picks one; the chosen address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Listen on this many ports of --listen's host (its port must be 0), printing
        /// `backend listening on <ADDR>` for each: the several targets (addrs) of one cluster,
        /// which requests pick with `/proxy/<clientid>/@<host:port>/...`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
        count: u64,
    },
    /// Tunnel server: agents connect on `/connect`; `GET /proxy/<clientid>/<path>` goes through
    /// that agent to `--backend`, and `GET /proxy/<clientid>/@<host:port>/<path>` to that
    /// host:port instead (the agent decides whether it may dial it: loopback unless --allow);
    /// `/metrics` and `/debug/tasks` on the same listener.
    Server {
        /// Address to listen on (port 0 picks one; the chosen address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Token agents must send in X-API-Tunnel-Token.
        #[arg(long, env = "REFTUNNEL_TOKEN")]
        token: String,
        /// Target (host:port) the agent dials for `/proxy/...` requests.
        #[arg(long)]
        backend: String,
        /// Register remotedialer's session_server_* counters (as CATTLE_PROMETHEUS_METRICS=true).
        #[arg(long, env = "CATTLE_PROMETHEUS_METRICS", value_parser = parse_boolish, default_value = "false", num_args = 0..=1, default_missing_value = "true")]
        remotedialer_metrics: bool,
        /// Deliberate server-side leak: skip-remove or stuck-pipe (no-close is an agent mode).
        #[arg(long, value_enum)]
        leak: Option<ServerLeak>,
        /// One connection in N takes the leak path.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        leak_every: u64,
        /// How `/proxy/` reaches the backend: `pipe` (a byte pipe per caller socket), `shared[=90s]`
        /// (one keep-alive pool per clientkey and backend addr, idle connections closed after the
        /// duration; `shared=never` or `shared=0s`: never closed, as Go's `&http.Transport{}`),
        /// `per-request` (a new pool per request, never closed, no idle timeout: the Rancher
        /// v2.10.3 leak) or `per-request-idle[=90s]` (a new pool per request whose idle
        /// connections close after the duration: the v2.10.5 fix).
        #[arg(long, default_value = "pipe", value_parser = parse_transport)]
        proxy_transport: ProxyTransport,
        /// Serve one clientkey with another transport than --proxy-transport, as
        /// `<clientkey>=<transport>` (exact clientkey, same transport values), e.g.
        /// `--proxy-transport per-request-idle=90s --proxy-transport-for c-bug=per-request`: one
        /// server with the fix for every cluster but one. Repeatable, one per clientkey.
        #[arg(long, alias = "transport-for", value_parser = parse_override)]
        proxy_transport_for: Vec<TransportOverride>,
        /// Keep callers' connections open between requests (HTTP keep-alive). Default: on with
        /// the pooled transports, off with `pipe` (one request per caller socket, as before).
        #[arg(long, value_parser = parse_boolish, num_args = 0..=1, default_missing_value = "true")]
        caller_keep_alive: Option<bool>,
        /// This server's id towards its peers (remotedialer's Server.PeerID), sent in
        /// X-API-Tunnel-ID when it dials a peer. Peering needs it and --peer-token.
        #[arg(long, env = "REFTUNNEL_PEER_ID", default_value = "")]
        peer_id: String,
        /// This server's peer token (Server.PeerToken), sent in X-API-Tunnel-Token to its peers.
        #[arg(long, env = "REFTUNNEL_PEER_TOKEN", default_value = "")]
        peer_token: String,
        /// Peers to keep a websocket to, as `id:token:url` (remotedialer's example server
        /// `-peers`), comma-separated or repeated; `token` is the one that peer sends us, `url`
        /// its `ws://HOST:PORT/connect`. A peer's websocket to us is accepted as a peer's only
        /// if it is listed here (or added with `POST /peers`).
        #[arg(long, value_delimiter = ',', value_parser = parse_peer)]
        peers: Vec<reftunnel::peer::PeerSpec>,
        /// Delay before redialing a peer after a failed dial or a lost session (remotedialer
        /// sleeps 5s).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        peer_reconnect_delay: Duration,
        /// Export this many unrelated series beside the tunnel's (histogram buckets in families of
        /// 500, about 70 bytes a line), as a big Rancher's /metrics has: for measuring scrapers.
        #[arg(long, default_value_t = 0)]
        extra_series: usize,
        /// Start this many long-lived tasks after start-up, as Rancher's controllers: each parks
        /// forever (waking on a 5-minute resync), counts in go_goroutines and shows in
        /// /debug/tasks as `server.controller` with a workqueue stack (not a connection's).
        /// Prints `startup tasks: <N> started` when the last one is up.
        #[arg(long, default_value_t = 0)]
        startup_tasks: u64,
        /// Spread --startup-tasks evenly over this long from start (0s: all at once).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        startup_over: Duration,
        /// A goroutine leak that begins this long after start: from then on, --task-leak-rate
        /// tasks that never end (`server.leaked_worker`, a stack of its own, not a connection's),
        /// forever. Prints `task leak started: ...` when it begins. Needs --task-leak-rate.
        #[arg(long, value_parser = humantime::parse_duration, requires = "task_leak_rate")]
        task_leak_after: Option<Duration>,
        /// How fast the leak of --task-leak-after grows: `<n>/s`, `<n>/m`, `<n>/h` or `<n>` per
        /// second, e.g. `2/s`.
        #[arg(long, value_parser = parse_rate, requires = "task_leak_after")]
        task_leak_rate: Option<Rate>,
    },
    /// Tunnel agent: connects to the server, dials targets for it, reconnects on loss.
    Agent {
        /// Server websocket URL, e.g. ws://127.0.0.1:8123/connect.
        #[arg(long)]
        server: String,
        /// Token sent in X-API-Tunnel-Token.
        #[arg(long, env = "REFTUNNEL_TOKEN")]
        token: String,
        /// Client id sent in X-API-Tunnel-ID (the server's clientkey).
        #[arg(long)]
        id: String,
        /// Deliberate agent-side leak: no-close (skip-remove and stuck-pipe are server modes).
        #[arg(long, value_enum)]
        leak: Option<AgentLeak>,
        /// One connection in N takes the leak path.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        leak_every: u64,
        /// Extra exact host:port targets to allow besides loopback (repeatable).
        #[arg(long)]
        allow: Vec<String>,
        /// Dial any target the server asks for.
        #[arg(long)]
        allow_any: bool,
        /// SyncConnections interval (remotedialer: 60s); 0s disables.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        sync_interval: Duration,
        /// First reconnect delay; doubles up to --backoff-max, reset after a session.
        #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
        backoff_min: Duration,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        backoff_max: Duration,
        /// Serve the agent's own /metrics and /debug/tasks here.
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Count session_server_* metrics on the agent too (clientkey "client", as in Go).
        #[arg(long, env = "CATTLE_PROMETHEUS_METRICS", value_parser = parse_boolish, default_value = "false", num_args = 0..=1, default_missing_value = "true")]
        remotedialer_metrics: bool,
        /// Run this many agents in one process, as `<id>-0` ... `<id>-<N-1>`, each with its own
        /// websocket (the clusters of a big Rancher, cheaply); 1 keeps the id as it is.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        count: u64,
    },
    /// Load driver: GETs over fresh connections (one request = one socket), or over reused
    /// keep-alive connections with --keep-alive; loopback only.
    Load {
        /// Target URL, e.g. http://127.0.0.1:8123/proxy/downstream-1/.
        #[arg(long)]
        url: String,
        /// Number of requests.
        #[arg(long, default_value_t = 100)]
        requests: u64,
        /// At most this many requests per second (0 = unlimited).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// At most this many requests in flight.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Per-request timeout.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Stop issuing requests after this long (outstanding ones finish or time out).
        #[arg(long, default_value = "5min", value_parser = humantime::parse_duration)]
        duration_limit: Duration,
        /// Exit non-zero if (errors + not sent) / requests exceeds this.
        #[arg(long, default_value_t = 0.01)]
        max_error_ratio: f64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Reuse caller connections (HTTP keep-alive): each of the --concurrency workers keeps
        /// one persistent connection.
        #[arg(long)]
        keep_alive: bool,
        /// Spread the requests over K clientkeys: request i goes to /proxy/<id>-<i mod K>/ (the
        /// agents of `agent --count K`), so that the ledger gets a row per clientkey.
        #[arg(long, default_value_t = 0)]
        clientkeys: u64,
        /// Spread the requests over these backend addrs (comma-separated host:port, as `backend
        /// --count` prints them): request i goes to /proxy/<id>/@<addr (i div K) mod A>/..., with
        /// K = --clientkeys, so that every (clientkey, addr) pair gets requests and the ledger a
        /// row each.
        #[arg(long, value_delimiter = ',')]
        addrs: Vec<String>,
    },
    /// Holds --count watches (long GETs answered chunked without end, such as the backend's
    /// `/watch/<secs>`) through the tunnel for --hold, reading their lines, as kubectl and the UI
    /// do; prints `watches established <N>` once every watch has its response head, then a
    /// summary when the callers leave together. Exits non-zero if a watch fails to open or ends
    /// early. Loopback only.
    Watches {
        /// Watch URL, e.g. http://127.0.0.1:8123/proxy/downstream-1/watch/5.
        #[arg(long)]
        url: String,
        /// Number of watches held at once.
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// How long to hold them.
        #[arg(long, value_parser = humantime::parse_duration)]
        hold: Duration,
        /// How long a watch may take to get its response head.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Spread the watches over clientkeys as `load --clientkeys` does.
        #[arg(long, default_value_t = 0)]
        clientkeys: u64,
        /// Spread the watches over backend addrs as `load --addrs` does.
        #[arg(long, value_delimiter = ',')]
        addrs: Vec<String>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Background noise: holds --count keep-alive connections to a server open, sending a
    /// request on each every --period, until SIGTERM/SIGINT; loopback only. Prints
    /// `idle-clients holding <N> connections` once every connection has been served once.
    IdleClients {
        /// Server URL (host and port), e.g. http://127.0.0.1:8123.
        #[arg(long)]
        url: String,
        /// Path requested on each connection.
        #[arg(long, default_value = "/healthz")]
        path: String,
        /// Number of connections to hold.
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Time between two requests on one connection.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        period: Duration,
    },
}

fn parse_transport(s: &str) -> Result<ProxyTransport, String> {
    s.parse()
        .map_err(|e: reftunnel::transport::ParseTransportError| e.to_string())
}

fn parse_override(s: &str) -> Result<TransportOverride, String> {
    s.parse()
        .map_err(|e: reftunnel::transport::ParseTransportError| e.to_string())
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    s.parse()
        .map_err(|e: reftunnel::controllers::RateError| e.to_string())
}

fn parse_peer(s: &str) -> Result<reftunnel::peer::PeerSpec, String> {
    s.parse()
}

fn parse_boolish(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("expected true or false, got {s}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reftunnel: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli.cmd));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reftunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Backend { listen, count } => backend::run(&listen, count).await?,
        Cmd::Server {
            listen,
            token,
            backend,
            remotedialer_metrics,
            leak,
            leak_every,
            proxy_transport,
            proxy_transport_for,
            caller_keep_alive,
            peer_id,
            peer_token,
            peers,
            peer_reconnect_delay,
            extra_series,
            startup_tasks,
            startup_over,
            task_leak_after,
            task_leak_rate,
        } => {
            if let Some(l @ (ServerLeak::StuckPipe | ServerLeak::HoldAbandoned)) = leak {
                if proxy_transport.pooled() {
                    anyhow::bail!(
                        "--leak {} acts on the byte pipe; it needs --proxy-transport pipe",
                        LeakMode::from(l).name()
                    );
                }
            }
            let mut seen = std::collections::HashSet::new();
            for o in &proxy_transport_for {
                if !seen.insert(o.clientkey.as_str()) {
                    anyhow::bail!(
                        "--proxy-transport-for names clientkey {:?} twice",
                        o.clientkey
                    );
                }
            }
            let any_pooled = proxy_transport.pooled()
                || proxy_transport_for.iter().any(|o| o.transport.pooled());
            let controllers = ControllersConfig {
                startup_tasks,
                startup_over,
                leak_after: task_leak_after,
                leak_rate: task_leak_rate,
            };
            controllers.validate()?;
            server::run(server::ServerConfig {
                listen,
                token,
                backend,
                remotedialer_metrics,
                leak: leak.map(Into::into),
                leak_every,
                transport: proxy_transport,
                transport_for: proxy_transport_for,
                caller_keep_alive: caller_keep_alive.unwrap_or(any_pooled),
                peer_id,
                peer_token,
                peers,
                peer_reconnect_delay,
                extra_series,
                controllers,
            })
            .await?
        }
        Cmd::Agent {
            server,
            token,
            id,
            leak,
            leak_every,
            allow,
            allow_any,
            sync_interval,
            backoff_min,
            backoff_max,
            metrics_listen,
            remotedialer_metrics,
            count,
        } => {
            agent::run(agent::AgentConfig {
                count,
                server,
                token,
                id,
                leak: leak.map(Into::into),
                leak_every,
                allow,
                allow_any,
                sync_interval,
                backoff_min,
                backoff_max: backoff_max.max(backoff_min),
                metrics_listen,
                remotedialer_metrics,
            })
            .await?
        }
        Cmd::Load {
            url,
            requests,
            rate,
            concurrency,
            timeout,
            duration_limit,
            max_error_ratio,
            json,
            keep_alive,
            clientkeys,
            addrs,
        } => {
            let summary = load::run(load::LoadConfig {
                clientkeys,
                addrs,
                url,
                requests,
                rate,
                concurrency,
                timeout,
                duration_limit,
                keep_alive,
            })
            .await?;
            if json {
                reftunnel::say!("{}", serde_json::to_string(&summary)?);
            } else {
                print!("{}", summary.render());
            }
            if summary.error_ratio() > max_error_ratio {
                eprintln!(
                    "reftunnel load: error ratio {:.4} above --max-error-ratio {max_error_ratio}",
                    summary.error_ratio()
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Watches {
            url,
            count,
            hold,
            timeout,
            clientkeys,
            addrs,
            json,
        } => {
            let summary = watches::run(watches::WatchesConfig {
                url,
                count,
                hold,
                timeout,
                clientkeys,
                addrs,
            })
            .await?;
            if json {
                reftunnel::say!("{}", serde_json::to_string(&summary)?);
            } else {
                reftunnel::say!(
                    "watches done: {} held for {:.1}s, {} lines, {} ended early",
                    summary.count,
                    summary.held_s,
                    summary.lines,
                    summary.ended_early
                );
            }
            if summary.ended_early > 0 {
                eprintln!(
                    "reftunnel watches: {} of {} watches ended before --hold was over",
                    summary.ended_early, summary.count
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::IdleClients {
            url,
            path,
            count,
            period,
        } => {
            idle_clients::run(idle_clients::IdleClientsConfig {
                url,
                path,
                count,
                period,
            })
            .await?
        }
    }
    Ok(ExitCode::SUCCESS)
}
