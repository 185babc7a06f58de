//! `cargo xtask lint`: the checks a reviewer would otherwise do by hand, run by the test command so that
//! CI fails on them: formatting, clippy with every warning an error (the host crates, and the eBPF probes
//! for the BPF target with Debian's clippy), and dependencies that no code uses.
use anyhow::{Context, Result, bail};

use crate::util;

/// cargo-machete finds declared dependencies that no source file names. It reads sources, it does not
/// build, so it is quick once installed.
const MACHETE: &str = "cargo-machete";

pub fn run() -> Result<()> {
    util::cargo(&["fmt", "--all", "--", "--check"])
        .context("formatting differs: run `cargo fmt --all`")?;
    util::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])
    .context("clippy found warnings")?;
    // The host build of monitor-ebpf compiles none of the probe code (it is `cfg(target_arch = "bpf")`):
    // lint it for the target it runs on.
    if crate::ebpf::detect().toolchain.is_some() {
        crate::ebpf::lint().context("clippy found warnings in the eBPF probes")?;
    } else {
        eprintln!(
            "xtask: WARNING: the eBPF probes were NOT linted: no BPF toolchain here (`cargo xtask setup` installs it)"
        );
    }
    if util::which(MACHETE).is_none() {
        util::cargo(&["install", MACHETE, "--locked"])
            .with_context(|| format!("installing {MACHETE}"))?;
    }
    let machete =
        util::which(MACHETE).context("cargo-machete is not on PATH after installing it")?;
    let status = std::process::Command::new(machete)
        .current_dir(util::workspace_root())
        .status()
        .with_context(|| format!("running {MACHETE}"))?;
    if !status.success() {
        bail!("{MACHETE} found unused dependencies (listed above)");
    }
    eprintln!(
        "xtask: lint clean (fmt, clippy -D warnings on the host crates and the probes, no unused dependencies)"
    );
    Ok(())
}
