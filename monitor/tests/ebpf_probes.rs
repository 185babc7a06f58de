//! The probes against a real kernel: a real child process opens, holds and closes TCP connections on
//! loopback while another process does the same, and the in-kernel counters, the socket table and procfs
//! must agree exactly with what the child did, and count nothing of the other process.
//!
//! Needs root (CAP_BPF) and the eBPF object: `cargo xtask test` provides both. Without them these tests
//! FAIL with the reason; set LEAKWATCH_SKIP_EBPF_TESTS=1 to skip them, which they announce on stderr.
mod support;

use std::time::{Duration, Instant};

use leakwatch::sources::{
    ebpf::{self, ProbeEvent, ProbeOptions, Probes},
    socket_table::SocketTable,
};
use monitor_ebpf::tcp_state::*;
use support::{ScriptedChild, ebpf_tests_enabled};

#[test]
fn counters_and_socket_table_match_what_a_real_process_did() {
    if !ebpf_tests_enabled() {
        return;
    }
    let (n, m, k, t) = (20u64, 5u64, 3u64, 4u64);
    let mut child = ScriptedChild::spawn("socket_child.py", &[n, m, k, t]);
    let mut probes = Probes::load(&ProbeOptions::default(), false).expect("load probes");
    probes.watch(child.pid).expect("watch child");
    let mut ring = probes.take_ring().expect("ring");
    let mut table = SocketTable::new(1 << 16);

    let noise = support::spawn_noise(50);
    child.go();
    child.wait_for_line("done");
    let noise_out = noise.wait_with_output().expect("noise finished");
    assert!(
        noise_out.status.success(),
        "noise process failed: {noise_out:?}"
    );

    // Loopback transitions finish in softirq shortly after the syscalls return: poll until stable.
    // Fully closed pairs close both ends; a half-closed client is orphaned in FIN_WAIT2, which the kernel
    // turns into a time-wait mini-socket at once, closing the full socket: 2M + K.
    let expect_closed = 2 * m + k;
    let deadline = Instant::now() + support::scaled(Duration::from_secs(5));
    let counters = loop {
        ebpf::drain_ring(&mut ring, |ev| {
            if let ProbeEvent::Sock(s) = ev {
                table.apply(&s)
            }
        });
        let c = probes.counters().expect("counters").to_kernel_counters();
        if (c.sock_closed >= expect_closed && c.task_exit >= t) || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    assert_eq!(
        counters.sock_tracked,
        1 + 2 * n,
        "listener + N clients + N accepted"
    );
    assert_eq!(counters.sock_established, 2 * n);
    assert_eq!(
        counters.sock_close_wait,
        m + k,
        "every passive close passes CLOSE_WAIT: {counters:?}"
    );
    assert_eq!(counters.sock_closed, expect_closed);
    assert_eq!(counters.task_new_thread, t);
    assert_eq!(counters.task_exit, t);
    assert_eq!(counters.events_lost, 0);
    assert_eq!(counters.sock_table_full, 0);

    let kernel = probes.counters().expect("counters").to_kernel_sample();
    let open_pairs = n - m - k;
    assert_eq!(kernel.in_state(LISTEN), 1);
    assert_eq!(kernel.in_state(ESTABLISHED), 2 * open_pairs);
    assert_eq!(kernel.in_state(CLOSE_WAIT), k);
    assert_eq!(
        kernel.in_state(FIN_WAIT2),
        0,
        "orphaned FIN_WAIT2 clients live on as time-wait minisocks only"
    );
    assert_eq!(kernel.live_sockets, 2 * open_pairs + k);
    assert_eq!(kernel.accepted_live, open_pairs + k);
    assert_eq!(kernel.connected_live, open_pairs);
    assert!(
        table.entries().all(|e| e.tgid == child.pid),
        "only the child's sockets are in the table"
    );

    support::assert_procfs_agrees(child.pid, &kernel, open_pairs, k);
    child.finish();
}

#[test]
fn process_exit_is_reported_and_unwatched_in_kernel() {
    if !ebpf_tests_enabled() {
        return;
    }
    let mut child = ScriptedChild::spawn("socket_child.py", &[2, 0, 0, 0]);
    let mut probes = Probes::load(&ProbeOptions::default(), false).expect("load probes");
    probes.watch(child.pid).expect("watch child");
    let mut ring = probes.take_ring().expect("ring");
    child.go();
    child.wait_for_line("done");
    let pid = child.pid;
    child.finish();
    let deadline = Instant::now() + support::scaled(Duration::from_secs(5));
    let mut exited = false;
    while !exited && Instant::now() < deadline {
        ebpf::drain_ring(&mut ring, |ev| {
            if let ProbeEvent::Process(p) = ev {
                exited |= p.kind == monitor_ebpf::event_kind::PROCESS_EXIT && p.tgid == pid;
            }
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(exited, "exit event for {pid}");
    assert!(
        !probes.watched().contains(&pid),
        "the kernel forgot the exited pid"
    );
    assert_eq!(
        probes.counters().unwrap().to_kernel_counters().process_exit,
        1
    );
}

/// In a pod with a shared process namespace, leakwatch sees the tunnel under that namespace's pid while
/// the kernel runs it under the host's: the probes must translate, or eBPF would see nothing and the ledger
/// would look unbacked. Both run here under `unshare --pid`, and eBPF must count what procfs sees.
#[test]
fn sockets_are_attributed_inside_a_pid_namespace() {
    if !ebpf_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (n, m, k) = (12u64, 3u64, 2u64);
    let status = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "bash"])
        .arg(support::script("pidns_observe.sh"))
        .arg(env!("CARGO_BIN_EXE_leakwatch"))
        .arg(support::script("socket_child.py"))
        .arg(dir.path())
        .args([n, m, k].map(|v| v.to_string()))
        .status()
        .expect("unshare (util-linux) runs");
    let out = std::fs::read_to_string(dir.path().join("observe.jsonl")).unwrap_or_default();
    let err = std::fs::read_to_string(dir.path().join("observe.err")).unwrap_or_default();
    assert!(status.success(), "pid-namespace run failed: {out}\n{err}");
    assert!(
        out.contains("mode: ebpf"),
        "eBPF loaded inside the namespace: {out}\n{err}"
    );
    let child_pid: u32 = std::fs::read_to_string(dir.path().join("child.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("child pid");
    assert!(
        child_pid < 100,
        "the child has a namespace pid ({child_pid}), not the host's"
    );
    let last: serde_json::Value = out
        .lines()
        .rfind(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("a JSON snapshot");
    let open_pairs = n - m - k;
    let kernel = &last["kernel"];
    assert_eq!(kernel["counters"]["sock_established"], 2 * n, "{last:#}");
    assert_eq!(kernel["accepted_live"], open_pairs + k, "{last:#}");
    assert_eq!(kernel["connected_live"], open_pairs, "{last:#}");
    let procfs_tcp: u64 = last["proc"]["tcp_by_state"]
        .as_array()
        .expect("procfs states")
        .iter()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(
        procfs_tcp,
        1 + 2 * open_pairs + k,
        "procfs agrees: listener + open pairs + CLOSE_WAIT"
    );
}
