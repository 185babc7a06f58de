//! Embeds the eBPF object (built by `cargo xtask build-ebpf`) into the `leakwatch` binary.
//!
//! Why this script does not compile the eBPF crate itself: that needs a BPF toolchain (bpf-linker plus
//! either a nightly with rust-src or Debian's prebuilt `core` for `bpfel-unknown-none`), which a plain
//! `cargo check`, clippy or an editor does not have. So xtask builds the object, and this script embeds
//! whatever it finds. When there is no object it embeds an empty stub: everything still compiles and the
//! unit tests run, and a binary built that way says so at start-up and runs in procfs-only mode. The
//! eBPF integration tests refuse to pass on a stub (they fail, loudly), so CI cannot go green without it.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LEAKWATCH_EBPF_OBJECT");
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let default = manifest.join("../target/ebpf/bpfel-unknown-none/release/leakwatch-probes");
    let source = env::var_os("LEAKWATCH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-changed={}", source.display());

    let out =
        PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("leakwatch-probes.o");
    let bytes = fs::read(&source).unwrap_or_default();
    if bytes.is_empty() {
        println!(
            "cargo:warning=no eBPF object at {}: embedding an empty stub (procfs-only). Run `cargo xtask build-ebpf`.",
            source.display()
        );
    }
    fs::write(&out, bytes).expect("write embedded eBPF object");
}
