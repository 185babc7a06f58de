//! Installs what the project needs on a fresh Debian/Ubuntu machine, as root; elsewhere prints the exact
//! commands. Idempotent and quick when everything is already there.
use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::{ebpf, util};

const APT_EBPF: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    APT_EBPF_CLIPPY,
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];
/// Debian's clippy for the same compiler: the probes are linted as they are compiled, for BPF. Checked on
/// its own too, for machines set up before the lint existed.
const APT_EBPF_CLIPPY: &str = "rust-web-clippy";
/// Real Prometheus and promtool for the rule tests and the alerting integration test; Chromium and a font
/// for the picture tests (the live page and the reports rendered in a real browser).
const APT_TEST: &[&str] = &["prometheus", "python3", "chromium", "fonts-dejavu-core"];
/// The kernel matrix (`cargo xtask kernels`): qemu and its virtiofsd, a static busybox for the guest's
/// init, xz for the modules of newer kernels.
const APT_KERNELS: &[&str] = &["qemu-system-x86", "busybox-static", "xz-utils"];

pub(crate) fn apt_missing(pkgs: &[&str]) -> Vec<String> {
    pkgs.iter()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .map(|p| p.to_string())
        .collect()
}

pub(crate) fn apt_install(pkgs: &[String]) -> Result<()> {
    if pkgs.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing with apt: {}", pkgs.join(" "));
    util::run_logged(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-update.log",
    )?;
    util::run_logged(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(pkgs),
        "apt-install.log",
    )
}

pub fn run(check_only: bool) -> Result<()> {
    let can_apt = util::is_root() && util::which("apt-get").is_some();
    let mut missing = Vec::new();

    let det = ebpf::detect();
    let want_apt_ebpf = det.toolchain.is_none() || det.bpf_linker.is_none();
    let mut apt = if want_apt_ebpf {
        apt_missing(APT_EBPF)
    } else {
        Vec::new()
    };
    if matches!(det.toolchain, Some(ebpf::Toolchain::Debian { .. })) {
        apt.extend(apt_missing(&[APT_EBPF_CLIPPY]));
    }
    apt.extend(apt_missing(APT_TEST));
    apt.extend(apt_missing(APT_KERNELS));
    if !apt.is_empty() {
        if can_apt && !check_only {
            apt_install(&apt)?;
        } else {
            missing.push(format!("apt-get install {}", apt.join(" ")));
        }
    }

    if ebpf::detect().bpf_linker.is_none() {
        if check_only || !Path::new("/usr/lib/llvm-22/bin/llvm-config").exists() {
            missing.push(
                "LLVM_PREFIX=/usr/lib/llvm-22 PATH=/usr/lib/llvm-22/bin:$PATH cargo install bpf-linker --no-default-features --features llvm-22".into(),
            );
        } else {
            let path = format!(
                "/usr/lib/llvm-22/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            );
            util::run(
                Command::new("cargo")
                    .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                    .env("PATH", path)
                    .args([
                        "install",
                        "--locked",
                        "bpf-linker",
                        "--no-default-features",
                        "--features",
                        "llvm-22",
                    ]),
            )?;
        }
    }

    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        if util::is_root() && !check_only {
            let _ = Command::new("mount")
                .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
                .status();
        }
        if !Path::new("/sys/kernel/tracing/events").is_dir() {
            missing.push("mount -t tracefs tracefs /sys/kernel/tracing".into());
        }
    }

    if missing.is_empty() {
        eprintln!(
            "xtask: set-up complete (eBPF toolchain: {:?})",
            ebpf::detect().toolchain
        );
        return Ok(());
    }
    let msg = format!(
        "missing pieces; run these (as root):\n  {}",
        missing.join("\n  ")
    );
    if check_only {
        eprintln!("xtask: {msg}");
        return Ok(());
    }
    bail!("{msg}")
}
