//! Finding the target process, and noticing when it restarts. A restart (new pid, or the same pid with a
//! new start time) is reported as such so that counters going back to zero are never read as a leak.
use regex::Regex;
use tracing::warn;

use crate::{
    sample::TargetId,
    sources::procfs::{ProcError, ProcfsSampler},
};

#[derive(Clone, Debug)]
pub enum TargetSelector {
    Pid(u32),
    /// Matched against the process name and its full command line.
    Match(Regex),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetStatus {
    Found(TargetId),
    Same(TargetId),
    Restarted { old: TargetId, new: TargetId },
    Gone { last: Option<TargetId> },
    NotFound,
}

pub struct TargetTracker {
    selector: TargetSelector,
    procfs: ProcfsSampler,
    current: Option<TargetId>,
    /// The last incarnation seen, kept while the target is gone so that its return is a restart.
    last: Option<TargetId>,
    /// leakwatch itself and every process above it (`timeout`, `sh -c`, `sudo`, `kubectl exec`): their
    /// command lines hold the pattern, and none of them is the target.
    excluded: Vec<u32>,
}

/// This process and its ancestors, up to init (which is never a target either).
fn self_and_ancestors(procfs: &ProcfsSampler) -> Vec<u32> {
    let mut chain = vec![std::process::id()];
    while let Some(parent) = chain.last().and_then(|&p| procfs.ppid(p)) {
        // pid 0 is the kernel; a loop would mean a garbled stat.
        if parent == 0 || chain.contains(&parent) {
            break;
        }
        chain.push(parent);
    }
    chain
}

impl TargetTracker {
    pub fn new(selector: TargetSelector) -> Self {
        Self::with_procfs(selector, ProcfsSampler::default())
    }

    pub fn with_procfs(selector: TargetSelector, procfs: ProcfsSampler) -> Self {
        Self {
            excluded: self_and_ancestors(&procfs),
            selector,
            procfs,
            current: None,
            last: None,
        }
    }

    /// Processes matching the selector, oldest first (the oldest is the one a restart replaces).
    fn candidates(&self) -> Vec<TargetId> {
        let mut found: Vec<TargetId> = match &self.selector {
            TargetSelector::Pid(pid) => self.procfs.target_id(*pid).into_iter().collect(),
            TargetSelector::Match(re) => self
                .procfs
                .pids()
                .into_iter()
                .filter(|pid| !self.excluded.contains(pid) && !self.is_leakwatch(*pid))
                .filter(|&pid| {
                    self.procfs.comm(pid).is_some_and(|c| re.is_match(&c))
                        || self.procfs.cmdline(pid).is_some_and(|c| re.is_match(&c))
                })
                .filter_map(|pid| self.procfs.target_id(pid).ok())
                .collect(),
        };
        found.sort_by_key(|t| (t.start_ticks, t.pid));
        found
    }

    /// The selector as the user gave it, for messages.
    pub fn describe(&self) -> String {
        match &self.selector {
            TargetSelector::Pid(p) => format!("--pid {p}"),
            TargetSelector::Match(re) => format!("--match {:?}", re.as_str()),
        }
    }

    /// The name of the process the selector finds now (its `comm`), if it finds one.
    pub fn process_name(&self) -> Option<String> {
        let id = self.candidates().into_iter().next()?;
        self.procfs.comm(id.pid)
    }

    /// Another leakwatch's command line contains the pattern too; never watch a watcher.
    fn is_leakwatch(&self, pid: u32) -> bool {
        self.procfs.comm(pid).is_some_and(|c| c == "leakwatch")
    }

    pub fn poll(&mut self) -> TargetStatus {
        // The common case: the current target is still there, checked without scanning /proc.
        if let Some(cur) = &self.current {
            match self.procfs.target_id(cur.pid) {
                Ok(id) if id == *cur => return TargetStatus::Same(id),
                Ok(_) | Err(ProcError::Gone) | Err(_) => {}
            }
        }
        let candidates = self.candidates();
        if candidates.len() > 1 {
            let others: Vec<u32> = candidates.iter().skip(1).map(|t| t.pid).collect();
            warn!(
                chosen = candidates[0].pid,
                ?others,
                "several processes match {}; watching the oldest. Give --pid, or a --match pattern that \
                 matches one command line, to choose another",
                self.describe()
            );
        }
        match (candidates.into_iter().next(), self.current.take()) {
            (Some(new), Some(old)) => {
                self.last = Some(new.clone());
                self.current = Some(new.clone());
                TargetStatus::Restarted { old, new }
            }
            (Some(new), None) => {
                self.current = Some(new.clone());
                match self.last.replace(new.clone()) {
                    Some(old) if old != new => TargetStatus::Restarted { old, new },
                    _ => TargetStatus::Found(new),
                }
            }
            (None, Some(old)) => {
                self.last = Some(old.clone());
                TargetStatus::Gone { last: Some(old) }
            }
            (None, None) => TargetStatus::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn pid_target_found_then_gone() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let mut t = TargetTracker::new(TargetSelector::Pid(pid));
        assert!(matches!(t.poll(), TargetStatus::Found(id) if id.pid == pid));
        assert!(matches!(t.poll(), TargetStatus::Same(_)));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(t.poll(), TargetStatus::Gone { last: Some(id) } if id.pid == pid));
        assert_eq!(t.poll(), TargetStatus::NotFound);
    }

    #[test]
    fn match_target_restart_is_reported() {
        let marker = format!("leakwatch-target-test-{}", std::process::id());
        let spawn = || {
            Command::new("bash")
                .args(["-c", &format!("exec -a {marker} sleep 30")])
                .spawn()
                .unwrap()
        };
        let mut first = spawn();
        let mut t = TargetTracker::new(TargetSelector::Match(Regex::new(&marker).unwrap()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            match t.poll() {
                TargetStatus::Found(id) => break id,
                _ if std::time::Instant::now() > deadline => panic!("target not found"),
                _ => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        assert_eq!(found.pid, first.id());
        first.kill().unwrap();
        first.wait().unwrap();
        let mut second = spawn();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (old, new) = loop {
            match t.poll() {
                TargetStatus::Restarted { old, new } => break (old, new),
                TargetStatus::Gone { .. } | TargetStatus::NotFound | TargetStatus::Same(_)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => panic!("expected a restart, got {other:?}"),
            }
        };
        assert_eq!((old.pid, new.pid), (found.pid, second.id()));
        second.kill().unwrap();
        second.wait().unwrap();
    }
}
