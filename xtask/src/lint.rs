//! `cargo xtask lint`: the checks a reviewer would otherwise do by hand, run by the test command so that
//! CI fails on them: formatting, clippy with every warning an error (eBPF crate included, which builds
//! for the host too), and dependencies that no code uses.
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
    eprintln!("xtask: lint clean (fmt, clippy -D warnings, no unused dependencies)");
    Ok(())
}
