use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command to completion, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = format!("{cmd:?}");
    eprintln!("xtask: running {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}

/// Like [`run`], but the command's output goes to `log` (under target/leakwatch-results/) and only its
/// last lines are shown, if it fails: apt and dpkg print hundreds of progress lines nobody reads.
pub fn run_logged(cmd: &mut Command, log: &str) -> Result<()> {
    let line = format!("{cmd:?}");
    let dir = workspace_root().join("target/leakwatch-results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(log);
    eprintln!("xtask: running {line} (output in {})", path.display());
    let out = cmd
        .output()
        .with_context(|| format!("could not start {line}"))?;
    let text = [out.stdout, out.stderr].concat();
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        bail!("{line} failed ({}); its last lines:\n{tail}", out.status);
    }
    Ok(())
}

/// Runs the same cargo that runs xtask (rustup's, normally) in the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(workspace_root()))
}

/// Whether `prog --version` (or the given args) runs successfully.
pub fn runs(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Finds an executable on PATH or in cargo's bin directory (where `cargo install` puts it).
pub fn which(prog: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        dirs.push(home.join("bin"));
    }
    dirs.into_iter().map(|d| d.join(prog)).find(|p| p.is_file())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// Runs `cargo test ...`, echoing its output, and adds up the `test result:` lines of every test binary.
/// Returns (passed, failed, ignored) and whether cargo succeeded.
pub fn cargo_test(args: &[&str]) -> Result<((u64, u64, u64), bool)> {
    use std::io::{BufRead, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("could not start cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut totals = (0, 0, 0);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(key).map(|n| {
                            n.trim()
                                .trim_start_matches("ok. ")
                                .trim_start_matches("FAILED. ")
                                .parse::<u64>()
                                .unwrap_or(0)
                        })
                    })
                    .unwrap_or(0)
            };
            totals.0 += num(" passed");
            totals.1 += num(" failed");
            totals.2 += num(" ignored");
        }
    }
    let status = child.wait()?;
    Ok((totals, status.success()))
}

/// Waits until `url` answers 2xx: a server is up once it serves, not once it has started.
pub fn wait_http(url: &str, timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if testsupport::http_get(url).is_some() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    bail!("{url} did not answer within {timeout:?}")
}
