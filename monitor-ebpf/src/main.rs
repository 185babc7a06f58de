//! leakwatch's eBPF programs: three classic tracepoints (`sock:inet_sock_set_state`, `task:task_newtask`,
//! `sched:sched_process_exit`; no kprobes, and no `syscalls:*` tracepoint, whose mere presence slows every
//! syscall of every process on the node), filtered in the kernel to the watched processes. What the rest of
//! the machine pays per event is a pid compare, plus one socket-table lookup on the TCP state changes that
//! may run in softirq, where the current task says nothing about who owns the socket.
//!
//! Attribution rule, the one subtle part: `sock/inet_sock_set_state` often fires in softirq context, where
//! "current" is whatever task the CPU interrupted; on loopback that is frequently the *peer* process. So a
//! socket is attributed to a watched process only on transitions that run in the owner's own syscall
//! context (connect: CLOSE->SYN_SENT, listen: CLOSE->LISTEN, close/shutdown: ESTABLISHED->FIN_WAIT1 and
//! CLOSE_WAIT->LAST_ACK) or, for accepted children, by the listening port the watched process owns. After
//! that the socket is followed by its kernel address alone, whatever task is current.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// For the one atomic add the probes need (see `add_port_ref`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod probes;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "leakwatch-probes is an eBPF object, not a host program: build it with `cargo xtask build-ebpf`."
    );
    std::process::exit(2);
}
