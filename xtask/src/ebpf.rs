//! Building the eBPF object. Two toolchains can do it:
//! - the usual aya path: a nightly with `rust-src` (for `-Z build-std=core`) and bpf-linker;
//! - Debian's packaged path: `rustc-web` (/usr/bin/rustc) with `libstd-rust-web-dev-bpf`, which ships a
//!   prebuilt `core` for `bpfel-unknown-none`, and bpf-linker built against Debian's LLVM 22. It needs
//!   `RUSTC_BOOTSTRAP=1` because the BPF target is only usable with unstable flags.
//!
//! The object lands in `target/ebpf/bpfel-unknown-none/release/leakwatch-probes`, where monitor's build.rs
//! embeds it.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::util::{self, which, workspace_root};

pub const TARGET: &str = "bpfel-unknown-none";

#[derive(Debug)]
pub enum Toolchain {
    /// Debian's rustc with a prebuilt core for the BPF target.
    Debian { rustc: PathBuf, cargo: PathBuf },
    /// rustup nightly with rust-src.
    Nightly,
}

pub fn object_path() -> PathBuf {
    workspace_root()
        .join("target/ebpf")
        .join(TARGET)
        .join("release/leakwatch-probes")
}

/// What is present, and what is missing for each path (for one clear message).
pub struct Detection {
    pub toolchain: Option<Toolchain>,
    pub bpf_linker: Option<PathBuf>,
    pub missing: Vec<String>,
}

fn sysroot(rustc: &mut Command) -> Option<PathBuf> {
    let out = rustc.args(["--print", "sysroot"]).output().ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_prebuilt_bpf_core(sysroot: &Path) -> bool {
    std::fs::read_dir(sysroot.join("lib/rustlib").join(TARGET).join("lib"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
        .unwrap_or(false)
}

pub fn detect() -> Detection {
    let bpf_linker = which("bpf-linker");
    let mut missing = Vec::new();
    let debian_rustc = PathBuf::from("/usr/bin/rustc");
    let debian_cargo = PathBuf::from("/usr/bin/cargo");
    let debian = debian_rustc.is_file()
        && debian_cargo.is_file()
        && sysroot(&mut Command::new(&debian_rustc)).is_some_and(|s| has_prebuilt_bpf_core(&s));
    let nightly = util::runs("rustup", &["run", "nightly", "rustc", "--version"])
        && sysroot(Command::new("rustup").args(["run", "nightly", "rustc"]))
            .is_some_and(|s| s.join("lib/rustlib/src/rust/library/core").is_dir());
    let toolchain = if debian {
        Some(Toolchain::Debian {
            rustc: debian_rustc,
            cargo: debian_cargo,
        })
    } else if nightly {
        Some(Toolchain::Nightly)
    } else {
        missing.push(
            "a Rust compiler for bpfel-unknown-none: either Debian's `apt-get install rustc-web cargo-web libstd-rust-web-dev-bpf`, \
             or `rustup toolchain install nightly --component rust-src`"
                .into(),
        );
        None
    };
    if bpf_linker.is_none() {
        missing.push(
            "bpf-linker: `apt-get install llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev` then \
             `LLVM_PREFIX=/usr/lib/llvm-22 PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --no-default-features --features llvm-22` \
             (or plain `cargo install bpf-linker` with a nightly toolchain)"
                .into(),
        );
    }
    Detection {
        toolchain,
        bpf_linker,
        missing,
    }
}

/// `cargo <subcommand>` for the probes on the BPF target, with whichever toolchain is here (`build` to
/// compile them, `clippy` to lint them: the host build of the crate compiles no probe code).
fn bpf_cargo(subcommand: &str) -> Result<Command> {
    let det = detect();
    let (Some(toolchain), Some(linker)) = (&det.toolchain, &det.bpf_linker) else {
        bail!(
            "cannot build the eBPF probes, missing:\n  - {}\nRun `cargo xtask setup` to install them (needs root and apt), or install them by hand.",
            det.missing.join("\n  - ")
        );
    };
    let root = workspace_root();
    let linker_dir = linker.parent().expect("a file has a parent");
    // Debian's cargo-clippy runs the clippy-driver it finds first on PATH: Debian's, whose sysroot has the
    // BPF core, must come before rustup's.
    let toolchain_dir = match toolchain {
        Toolchain::Debian { rustc, .. } => rustc.parent().map(Path::to_path_buf),
        Toolchain::Nightly => None,
    };
    let path = std::env::join_paths(
        toolchain_dir
            .into_iter()
            .chain(std::iter::once(linker_dir.to_path_buf()))
            .chain(
                std::env::var_os("PATH")
                    .iter()
                    .flat_map(std::env::split_paths),
            ),
    )?;
    let common = [
        "--release",
        "--target",
        TARGET,
        "-p",
        "monitor-ebpf",
        "--bin",
        "leakwatch-probes",
        "--target-dir",
    ];
    let target_dir = root.join("target/ebpf");
    let mut cmd = match toolchain {
        Toolchain::Debian { cargo, .. } => {
            let mut c = Command::new(cargo);
            c.env("RUSTC_BOOTSTRAP", "1")
                .arg(subcommand)
                .args(common)
                .arg(&target_dir);
            c
        }
        Toolchain::Nightly => {
            let mut c = Command::new("rustup");
            c.args([
                "run",
                "nightly",
                "cargo",
                subcommand,
                "-Z",
                "build-std=core",
            ])
            .args(common)
            .arg(&target_dir);
            c
        }
    };
    // The outer cargo's variables (RUSTC, host RUSTFLAGS, the rustup toolchain...) must not leak into the
    // BPF build; the Debian path then sets its own RUSTC again.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    if let Toolchain::Debian { rustc, .. } = toolchain {
        cmd.env("RUSTC", rustc);
    }
    cmd.env("PATH", path).current_dir(&root);
    Ok(cmd)
}

/// Clippy over the probes as they are compiled, for the BPF target, warnings as errors.
pub fn lint() -> Result<()> {
    let mut cmd = bpf_cargo("clippy")?;
    cmd.args(["--", "-D", "warnings"]);
    util::run(&mut cmd)
}

pub fn build() -> Result<()> {
    util::run(&mut bpf_cargo("build")?)?;
    let obj = object_path();
    let size = std::fs::metadata(&obj).map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        bail!(
            "the eBPF build succeeded but {} is missing or empty",
            obj.display()
        );
    }
    eprintln!(
        "xtask: eBPF object {} ({size} bytes, {:?})",
        obj.display(),
        detect().toolchain
    );
    Ok(())
}
