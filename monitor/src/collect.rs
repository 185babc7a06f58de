//! The collector: runs every source once per tick and assembles a [`Snapshot`]. It owns the moving parts
//! (the target tracker, the probes and their event pump, the procfs sampler, the scraper) so that the
//! commands above it only deal in snapshots.
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    sample::{
        EvidenceWanted, GoroutineReading, KernelSample, ProcSample, ScrapeOutcome, Snapshot,
        StackGrowth, TargetId,
    },
    sources::{
        ebpf::{self, ProbeEvent, ProbeOptions, Probes, RawCounters},
        goroutines::GoroutineProfiler,
        procfs::{ProcError, ProcfsSampler},
        scrape::Scraper,
        sockdiag,
        socket_table::SocketTable,
    },
    target::{TargetSelector, TargetStatus, TargetTracker},
};

/// Loads and attaches the probes, or says in one line why the kernel will be observed through procfs only.
pub fn load_kernel(opts: &CollectorOptions) -> (Option<Probes>, KernelMode) {
    if opts.no_ebpf {
        return (
            None,
            KernelMode::ProcfsOnly("eBPF disabled by --no-ebpf".into()),
        );
    }
    match Probes::load(&opts.probes, opts.bpf_stats) {
        Ok(p) => {
            if let Some(fallback) = p.fallback() {
                warn!("eBPF fallback: {fallback}");
            }
            (Some(p), KernelMode::Ebpf)
        }
        Err(e) => {
            warn!("eBPF unavailable, continuing in procfs-only mode: {e}");
            (None, KernelMode::ProcfsOnly(e.to_string()))
        }
    }
}

/// Peers listed per snapshot for CLOSE_WAIT sockets: enough to name the culprit, small enough to record.
const CLOSE_WAIT_PEER_GROUPS: usize = 5;
/// States whose eBPF counts are corrected by the periodic procfs join: a socket in them always has an fd, so
/// procfs sees every one of the process's, including those opened before the probes were attached. (Other
/// states are counted by eBPF alone: FIN_WAIT and TIME_WAIT sockets outlive their fd.)
const RECONCILED_STATES: [u8; 2] = [
    monitor_ebpf::tcp_state::ESTABLISHED,
    monitor_ebpf::tcp_state::CLOSE_WAIT,
];
/// While eBPF and procfs disagree, dialed requests wait unanswered or dialed sockets near the idle horizon,
/// the join (and its sock_diag dump)
/// runs at least this often, so that a correction (a pre-existing socket closing) and a pile of stalled
/// requests growing or draining are seen soon.
const WATCHFUL_SCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Dialed sockets idle this long or longer, in a bucket that begins before the idle horizon, are about to
/// age past it: the join runs every [`WATCHFUL_SCAN_INTERVAL`] while there are any.
const NEARING_IDLE_MS: u32 = 60_000;

/// Remote addresses listed per snapshot with the idle ages of the sockets dialed to them.
const DIALED_IDLE_GROUPS: usize = 8;

/// How the kernel side is observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelMode {
    Ebpf,
    /// eBPF could not be used; the reason, in one line.
    ProcfsOnly(String),
}

/// What happened to the target during a tick, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetEvent {
    Found(TargetId),
    Restarted { old: TargetId, new: TargetId },
    Lost(Option<TargetId>),
}

/// Cost of the last pass per source, in seconds.
#[derive(Clone, Debug, Default)]
pub struct SourceCosts {
    pub ebpf: f64,
    pub procfs: f64,
    pub scrape: f64,
    /// The last full procfs pass (fds joined with /proc/<pid>/net/tcp{,6}); in eBPF mode it runs only
    /// every `procfs_scan_interval`, so `procfs` is usually the light pass.
    pub procfs_full: f64,
}

pub struct CollectorOptions {
    pub selector: TargetSelector,
    /// Do not even try eBPF.
    pub no_ebpf: bool,
    pub probes: ProbeOptions,
    /// Keep kernel BPF run-time statistics on (for the cost report).
    pub bpf_stats: bool,
    /// With eBPF counting sockets, how often procfs joins the fds with the namespace's TCP tables.
    pub procfs_scan_interval: Duration,
    /// Dialed sockets idle for longer than this are counted apart (the analysis' idle horizon).
    pub idle_horizon: Duration,
}

pub struct Collector {
    tracker: TargetTracker,
    current: Option<TargetId>,
    probes: Option<Probes>,
    mode: KernelMode,
    table: Arc<Mutex<SocketTable>>,
    pump: Option<JoinHandle<()>>,
    process_events: Option<mpsc::UnboundedReceiver<ProbeEvent>>,
    procfs: ProcfsSampler,
    scraper: Option<Scraper>,
    started: Instant,
    pub costs: SourceCosts,
    last_counters: Option<RawCounters>,
    procfs_scan_interval: Duration,
    idle_horizon: Duration,
    /// `--max-sockets`: the cap of the sock_diag dump, as of the kernel's table.
    max_sockets: usize,
    /// Set once sock_diag turned out to be unavailable here (said once, not retried every pass).
    sockdiag_off: bool,
    /// When "no process matches" was last logged.
    not_found_said: Option<Instant>,
    /// Per reconciled state: procfs minus eBPF at the last full pass (see [`RECONCILED_STATES`]).
    procfs_offset: [i64; 13],
    /// Set by a full procfs pass during the current tick.
    full_pass_now: bool,
    /// The last full procfs sample: whose it was and when it was taken.
    last_full_proc: Option<(TargetId, ProcSample, Instant)>,
    /// Go targets: reads goroutine profiles when the analysis asks ([`Collector::read_goroutines`]).
    profiler: Option<GoroutineProfiler>,
}

impl Collector {
    /// Sets up every source. Failing to load eBPF is not an error: the collector carries on in
    /// procfs-only mode and says why in one log line.
    pub fn new(opts: CollectorOptions, scraper: Option<Scraper>) -> Self {
        let kernel = load_kernel(&opts);
        Self::with_kernel(opts, scraper, kernel)
    }

    /// Like [`Collector::new`] with probes loaded beforehand ([`load_kernel`]), e.g. before the process
    /// dropped the capabilities that loading needs.
    pub fn with_kernel(
        opts: CollectorOptions,
        scraper: Option<Scraper>,
        kernel: (Option<Probes>, KernelMode),
    ) -> Self {
        let table = Arc::new(Mutex::new(SocketTable::new(
            opts.probes.max_sockets as usize,
        )));
        let (probes, mode) = kernel;
        let mut collector = Self {
            tracker: TargetTracker::new(opts.selector),
            current: None,
            probes,
            mode,
            table,
            pump: None,
            process_events: None,
            procfs: ProcfsSampler::default(),
            scraper,
            started: Instant::now(),
            costs: SourceCosts::default(),
            last_counters: None,
            procfs_scan_interval: opts.procfs_scan_interval,
            idle_horizon: opts.idle_horizon,
            max_sockets: opts.probes.max_sockets as usize,
            sockdiag_off: false,
            not_found_said: None,
            procfs_offset: [0; 13],
            full_pass_now: false,
            last_full_proc: None,
            profiler: None,
        };
        collector.start_pump();
        collector
    }

    /// Reads the target's goroutine profiles (`--pprof-url`) when asked.
    pub fn with_profiler(mut self, profiler: Option<GoroutineProfiler>) -> Self {
        self.profiler = profiler;
        self
    }

    /// The goroutine source: the profiles the analysis asked for after judging `snap` (its `go_goroutines`
    /// bounds what a read may cost the target), and the baseline once the target is first scraped.
    /// `None` when nothing was asked or read.
    pub async fn read_goroutines(
        &mut self,
        wanted: &EvidenceWanted,
        snap: &Snapshot,
    ) -> Option<GoroutineReading> {
        let (Some(profiler), Some(scraper)) = (self.profiler.as_mut(), self.scraper.as_ref())
        else {
            return None;
        };
        let ScrapeOutcome::Ok(app) = &snap.app else {
            return None;
        };
        let goroutines = app.goroutines.map(|g| g.max(0.0) as u64);
        if wanted.new_baseline {
            profiler.forget_baseline();
        }
        profiler.ensure_baseline(scraper, goroutines).await;
        let mut reading = GoroutineReading::default();
        if wanted.stacks {
            reading.growth = profiler.growth(scraper, goroutines).await.map(|r| match r {
                Ok(top) => StackGrowth { top, note: None },
                Err(note) => StackGrowth {
                    top: Vec::new(),
                    note: Some(note),
                },
            });
        }
        if let Some(min_minutes) = wanted.ages_min_minutes {
            reading.ages = profiler
                .blocked_beyond(scraper, min_minutes, goroutines)
                .await;
        }
        (reading != GoroutineReading::default()).then_some(reading)
    }

    pub fn mode(&self) -> &KernelMode {
        &self.mode
    }

    pub fn probes(&self) -> Option<&Probes> {
        self.probes.as_ref()
    }

    pub fn scraper(&self) -> Option<&Scraper> {
        self.scraper.as_ref()
    }

    pub fn socket_table(&self) -> Arc<Mutex<SocketTable>> {
        Arc::clone(&self.table)
    }

    pub fn target(&self) -> Option<&TargetId> {
        self.current.as_ref()
    }

    /// The target selector as the user gave it (`--pid N`, `--match "..."`), for messages.
    pub fn describe_target(&self) -> String {
        self.tracker.describe()
    }

    /// The ring buffer is drained continuously by its own task: at high churn it would overflow if it
    /// were only read once per tick.
    fn start_pump(&mut self) {
        let Some(ring) = self.probes.as_mut().and_then(Probes::take_ring) else {
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.process_events = Some(rx);
        let table = Arc::clone(&self.table);
        self.pump = Some(tokio::spawn(run_pump(ring, table, tx)));
    }

    /// The procfs part of a tick: full (with the TCP-table join) in procfs-only mode, for a new target, and
    /// every `procfs_scan_interval`; otherwise the light pass with the last join carried over. The reads
    /// (and the sock_diag dump of a full pass) run on a blocking thread: on a busy node `/proc/<pid>/fd`
    /// and `/proc/<pid>/net/tcp` take tens of milliseconds, which must not hold up the async workers that
    /// serve /metrics and /healthz and drain the ring buffer.
    async fn proc_sample(&mut self) -> Option<ProcSample> {
        let id = self.current.clone()?;
        let light_ok = self.mode == KernelMode::Ebpf;
        // Only CLOSE_WAIT: it is what a socket-leak verdict stands on, and ESTABLISHED differs by a few
        // sockets whenever connections open between the two reads.
        let disagreeing = self.procfs_offset[monitor_ebpf::tcp_state::CLOSE_WAIT as usize] != 0;
        // Past the first bucket (10 s): a request merely in flight is no reason to look more often.
        let waiting = self.last_full_proc.as_ref().is_some_and(|(_, p, _)| {
            p.dialed_idle
                .iter()
                .any(|g| g.unanswered_for(crate::sample::IDLE_BUCKET_BOUNDS_MS[0]) > 0)
        });
        // Sockets about to age past the idle horizon (idle a minute or more, in a bucket that begins
        // before it): whether they step up once or keep climbing is told by a few readings close together.
        let nearing = self.last_full_proc.as_ref().is_some_and(|(_, p, _)| {
            let horizon_ms = (p.dialed_idle_horizon_s * 1000.0) as u32;
            p.dialed_idle.iter().any(|g| {
                g.buckets.iter().enumerate().any(|(i, n)| {
                    let floor = crate::sample::idle_bucket_floor_ms(i);
                    *n > 0 && floor >= NEARING_IDLE_MS && floor < horizon_ms
                })
            })
        });
        let interval = if disagreeing || waiting || nearing {
            self.procfs_scan_interval.min(WATCHFUL_SCAN_INTERVAL)
        } else {
            self.procfs_scan_interval
        };
        let procfs = self.procfs.clone();
        let result = match &self.last_full_proc {
            Some((who, last, at)) if light_ok && *who == id && at.elapsed() < interval => {
                let last = last.clone();
                off_the_runtime(move || procfs.sample_light(id.pid, &last)).await
            }
            _ => {
                let t0 = Instant::now();
                let (sockdiag_on, max_sockets) = (!self.sockdiag_off, self.max_sockets);
                let pass = off_the_runtime(move || {
                    procfs
                        .sample_with_sockets(id.pid)
                        .map(|(s, inodes, listening)| {
                            let dump =
                                sockdiag_on.then(|| sockdiag::dump_tcp(&inodes, max_sockets));
                            (s, listening, dump)
                        })
                })
                .await;
                let full = pass.map(|(mut s, listening, dump)| {
                    if let Some(dump) = dump {
                        self.add_dialed_idle(&mut s, dump, &listening);
                    }
                    s
                });
                self.costs.procfs_full = t0.elapsed().as_secs_f64();
                if let Ok(s) = &full {
                    self.last_full_proc = Some((id.clone(), s.clone(), Instant::now()));
                    self.full_pass_now = true;
                }
                full
            }
        };
        match result {
            Ok(s) => Some(s),
            Err(ProcError::Gone) => None,
            Err(e) => {
                warn!(pid = id.pid, "procfs sample failed: {e}");
                None
            }
        }
    }

    /// Seconds since the collector started: the clock of every snapshot's `t`.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Corrects eBPF's per-state counts with the last full procfs join. The probes only know sockets opened
    /// (or changing state) since they were attached, and a missed transition would leave a socket counted
    /// in a state it left; procfs knows every socket the process holds. `full` is this tick's full procfs
    /// sample, taken right after `k`: the two describe the same instant, so their difference is the
    /// correction until the next join.
    fn reconcile(&mut self, k: &mut KernelSample, full: Option<&ProcSample>) {
        if let Some(p) = full {
            for s in RECONCILED_STATES {
                let i = s as usize;
                let offset = p.tcp_by_state[i] as i64 - k.sockets_by_state[i] as i64;
                if offset != self.procfs_offset[i] {
                    debug!(
                        state = monitor_ebpf::tcp_state::name(s),
                        procfs = p.tcp_by_state[i],
                        ebpf = k.sockets_by_state[i],
                        "eBPF socket counts corrected by procfs (sockets opened before the probes were attached, or a missed transition)"
                    );
                }
                self.procfs_offset[i] = offset;
            }
        }
        k.procfs_disagreement = RECONCILED_STATES
            .iter()
            .map(|&s| {
                (
                    monitor_ebpf::tcp_state::name(s).to_string(),
                    self.procfs_offset[s as usize],
                )
            })
            .collect();
        for s in RECONCILED_STATES {
            let i = s as usize;
            k.sockets_by_state[i] =
                (k.sockets_by_state[i] as i64 + self.procfs_offset[i]).max(0) as u64;
        }
    }

    /// Idle ages of the sockets the target dialed, from the kernel's tcp_info. Sockets accepted on one of
    /// its listening ports are callers (or scrapers), whose idleness is theirs, not the target's.
    fn add_dialed_idle(
        &mut self,
        sample: &mut ProcSample,
        dump: Result<sockdiag::TcpDump, sockdiag::SockDiagError>,
        listening: &HashSet<u16>,
    ) {
        match dump {
            Ok(dump) => {
                let dialed: Vec<_> = dump
                    .sockets
                    .into_iter()
                    .filter(|s| !listening.contains(&s.local.port()))
                    .collect();
                let horizon_ms = self.idle_horizon.as_millis().min(u128::from(u32::MAX)) as u32;
                sample.dialed_idle =
                    sockdiag::idle_by_remote(&dialed, horizon_ms, DIALED_IDLE_GROUPS);
                sample.dialed_idle_horizon_s = self.idle_horizon.as_secs_f64();
            }
            Err(e) if e.is_unavailable() => {
                warn!("sock_diag is unavailable, idle ages of dialed sockets are off: {e}");
                self.sockdiag_off = true;
            }
            Err(e) => warn!("sock_diag dump failed: {e}"),
        }
    }

    /// One pass over every source.
    pub async fn tick(&mut self) -> (Snapshot, Vec<TargetEvent>) {
        let events = self.follow_target();
        let t = self.started.elapsed().as_secs_f64();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);

        let t0 = Instant::now();
        let mut kernel = self.kernel_sample();
        self.costs.ebpf = t0.elapsed().as_secs_f64();

        let t0 = Instant::now();
        self.full_pass_now = false;
        let proc = self.proc_sample().await;
        self.costs.procfs = t0.elapsed().as_secs_f64();
        if let Some(k) = kernel.as_mut() {
            self.reconcile(k, proc.as_ref().filter(|_| self.full_pass_now));
        }

        let t0 = Instant::now();
        let app = match &self.scraper {
            Some(s) => s.scrape().await,
            None => ScrapeOutcome::NotConfigured,
        };
        self.costs.scrape = t0.elapsed().as_secs_f64();

        (
            Snapshot {
                t,
                unix,
                target: self.current.clone(),
                kernel,
                proc,
                goroutines: None,
                app,
            },
            events,
        )
    }

    fn kernel_sample(&mut self) -> Option<KernelSample> {
        let probes = self.probes.as_ref()?;
        if let Some(rx) = self.process_events.as_mut() {
            while let Ok(ProbeEvent::Process(p)) = rx.try_recv() {
                if p.kind == monitor_ebpf::event_kind::PROCESS_EXIT {
                    self.table.lock().map(|mut t| t.forget_process(p.tgid)).ok();
                }
            }
        }
        let counters = match probes.counters() {
            Ok(c) => c,
            Err(e) => {
                warn!("reading eBPF counters failed: {e}");
                return None;
            }
        };
        let mut sample = counters.to_kernel_sample();
        if let Ok(t) = self.table.lock() {
            sample.close_wait_peers = t.close_wait_by_peer(CLOSE_WAIT_PEER_GROUPS);
        }
        self.last_counters = Some(counters);
        Some(sample)
    }

    pub fn last_counters(&self) -> Option<&RawCounters> {
        self.last_counters.as_ref()
    }

    /// Polls the tracker and keeps the in-kernel watch set in step with it.
    fn follow_target(&mut self) -> Vec<TargetEvent> {
        let mut events = Vec::new();
        match self.tracker.poll() {
            TargetStatus::Found(id) => {
                self.not_found_said = None;
                info!(pid = id.pid, "target found");
                self.attach(&id);
                events.push(TargetEvent::Found(id.clone()));
                self.current = Some(id);
            }
            TargetStatus::Same(_) => {}
            TargetStatus::Restarted { old, new } => {
                info!(
                    old_pid = old.pid,
                    new_pid = new.pid,
                    "target restarted: baselines reset"
                );
                self.detach(&old);
                self.attach(&new);
                // A new process: its goroutines are compared with its own baseline.
                if let Some(p) = &mut self.profiler {
                    p.reset();
                }
                events.push(TargetEvent::Restarted {
                    old,
                    new: new.clone(),
                });
                self.current = Some(new);
            }
            TargetStatus::Gone { last } => {
                if let Some(last) = &last {
                    warn!(
                        pid = last.pid,
                        "target is gone; waiting for it to come back"
                    );
                    self.detach(last);
                }
                if self.current.take().is_some() {
                    events.push(TargetEvent::Lost(last));
                }
            }
            TargetStatus::NotFound => {
                // Said once, and again every minute: a sidecar started before its target (or pointed at
                // the wrong one) must not look like one watching a healthy process.
                if self
                    .not_found_said
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
                {
                    warn!(
                        "no process matches {}; waiting for one to appear",
                        self.tracker.describe()
                    );
                    self.not_found_said = Some(Instant::now());
                }
            }
        }
        events
    }

    fn attach(&mut self, id: &TargetId) {
        let Some(probes) = self.probes.as_mut() else {
            return;
        };
        if let Err(e) = probes.watch(id.pid) {
            warn!(pid = id.pid, "cannot watch target in the kernel: {e}");
            return;
        }
        // Listeners opened before we attached: without seeding, their accepted sockets are invisible.
        match self.procfs.listening_ports(id.pid) {
            Ok(ports) => {
                if let Err(e) = probes.seed_listeners(id.pid, &ports) {
                    warn!(pid = id.pid, "cannot seed listeners: {e}");
                }
            }
            Err(e) => warn!(pid = id.pid, "cannot read listening ports: {e}"),
        }
    }

    fn detach(&mut self, id: &TargetId) {
        // The next process is another set of sockets: its own join corrects its own counts.
        self.procfs_offset = [0; 13];
        if let Some(probes) = self.probes.as_mut() {
            probes.unwatch(id.pid);
        }
        if let Ok(mut t) = self.table.lock() {
            t.forget_process(id.pid);
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(p) = self.pump.take() {
            p.abort();
        }
    }
}

/// Runs blocking reads on tokio's blocking pool. A read that panics (it should not: every parser returns
/// errors) is a failed sample, not a dead sidecar.
async fn off_the_runtime<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, ProcError> + Send + 'static,
) -> Result<T, ProcError> {
    tokio::task::spawn_blocking(read).await.unwrap_or_else(|e| {
        Err(ProcError::Io {
            path: "/proc".into(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

async fn run_pump(
    ring: RingBuf<MapData>,
    table: Arc<Mutex<SocketTable>>,
    tx: mpsc::UnboundedSender<ProbeEvent>,
) {
    // SAFETY: the ring buffer owns its map fd, and the AsyncFd owns the ring buffer, so the fd stays open
    // for as long as it is registered with the reactor.
    let registered = unsafe { AsyncFd::register(ring) };
    let mut ring = match registered {
        Ok(r) => r,
        Err(e) => {
            warn!("cannot poll the eBPF ring buffer, socket table disabled: {e}");
            return;
        }
    };
    loop {
        let mut batch = Vec::with_capacity(256);
        let result =
            ebpf::pump_ring(&mut ring, Duration::from_millis(250), |ev| batch.push(ev)).await;
        if let Err(e) = result {
            warn!("eBPF ring buffer read failed: {e}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if batch.is_empty() {
            continue;
        }
        if let Ok(mut t) = table.lock() {
            for ev in &batch {
                if let ProbeEvent::Sock(s) = ev {
                    t.apply(s);
                }
            }
        }
        for ev in batch {
            if matches!(ev, ProbeEvent::Process(_)) {
                let _ = tx.send(ev);
            }
        }
    }
}
