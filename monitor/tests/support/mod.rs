//! Shared helpers for tests that drive real processes.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

pub mod scenario;
pub mod shapes;
pub mod tunnel;

pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name)
}

/// How much longer than on real hardware a test may wait for what it waits on: `cargo xtask kernels` sets
/// `LEAKWATCH_TEST_TIME_SCALE` in its emulated guests, which run 10-50x slower. Only bounds scale; what a
/// test asserts does not.
pub fn time_scale() -> u32 {
    std::env::var("LEAKWATCH_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// A wait bound, scaled by [`time_scale`].
pub fn scaled(bound: std::time::Duration) -> std::time::Duration {
    bound * time_scale()
}

/// eBPF tests need root and the embedded object. Missing either is a failure unless explicitly skipped.
pub fn ebpf_tests_enabled() -> bool {
    if std::env::var_os("LEAKWATCH_SKIP_EBPF_TESTS").is_some() {
        eprintln!(
            "!!! SKIPPING eBPF test: LEAKWATCH_SKIP_EBPF_TESTS is set; nothing about the kernel path was checked !!!"
        );
        return false;
    }
    // SAFETY: trivial libc call.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "eBPF tests need root (or set LEAKWATCH_SKIP_EBPF_TESTS=1 to skip them loudly)"
    );
    assert!(
        leakwatch::sources::ebpf::object_embedded(),
        "this build has no eBPF object: run `cargo xtask test` (it builds the probes first)"
    );
    true
}

/// A python process following a script in tests/support, synchronised over stdin/stdout.
pub struct ScriptedChild {
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ScriptedChild {
    pub fn spawn(name: &str, args: &[u64]) -> Self {
        let mut child = Command::new("python3")
            .arg(script(name))
            .args(args.iter().map(u64::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is needed by the kernel tests");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("child pid line");
        let pid = line.trim().parse().expect("child prints its pid first");
        Self {
            pid,
            child,
            stdin,
            stdout,
        }
    }

    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .expect("signal child");
    }

    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read child");
            assert!(n > 0, "child exited before printing {prefix:?}");
            if line.starts_with(prefix) {
                return line.trim().to_string();
            }
        }
    }

    /// Lets the child exit and reaps it.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for ScriptedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_noise(rounds: u32) -> Child {
    Command::new("python3")
        .arg(script("noise.py"))
        .arg(rounds.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn noise process")
}

/// procfs must see the same sockets in the child as the probes did, state by state, and as many socket fds:
/// the child's listener, both ends of each open pair, and the server ends left in CLOSE_WAIT.
pub fn assert_procfs_agrees(
    pid: u32,
    kernel: &leakwatch::sample::KernelSample,
    open_pairs: u64,
    close_wait: u64,
) {
    use monitor_ebpf::tcp_state::{self, CLOSE_WAIT, ESTABLISHED, LISTEN};
    let proc = leakwatch::sources::procfs::ProcfsSampler::default()
        .sample(pid)
        .expect("procfs sample of the child");
    for state in 1..tcp_state::COUNT as u8 {
        if state == tcp_state::CLOSE {
            continue;
        }
        assert_eq!(
            proc.tcp_in_state(state),
            kernel.in_state(state),
            "procfs and eBPF disagree on {} sockets\nprocfs: {proc:?}\neBPF: {kernel:?}",
            tcp_state::name(state)
        );
    }
    assert_eq!(proc.tcp_in_state(LISTEN), 1, "{proc:?}");
    assert_eq!(proc.tcp_in_state(ESTABLISHED), 2 * open_pairs, "{proc:?}");
    assert_eq!(proc.tcp_in_state(CLOSE_WAIT), close_wait, "{proc:?}");
    let sockets = 1 + 2 * open_pairs + close_wait;
    assert_eq!(proc.tcp_total(), sockets, "{proc:?}");
    assert_eq!(proc.socket_fds, sockets, "one fd per socket: {proc:?}");
    assert_eq!(
        kernel.live_sockets + kernel.in_state(LISTEN),
        proc.socket_fds,
        "eBPF live connections plus listeners = procfs socket fds"
    );
}
