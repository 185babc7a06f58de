//! Recording: every snapshot as one JSON line, so a night's series can be replayed through the analysis
//! later (`leakwatch replay`), with other thresholds, or kept as a regression fixture.
use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, BufWriter, Write},
    path::Path,
};

use thiserror::Error;

use crate::sample::Snapshot;

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("line {line}: not a snapshot: {source}")]
    Line {
        line: usize,
        source: serde_json::Error,
    },
    #[error("reading the recording: {0}")]
    Read(#[from] std::io::Error),
}

/// Appends snapshots to a file, up to a size cap: a forgotten `--record` must not fill the disk.
pub struct Recorder {
    out: BufWriter<File>,
    written: u64,
    max_bytes: u64,
    full: bool,
}

impl Recorder {
    pub fn create(path: &Path, max_bytes: u64) -> Result<Self, RecordError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| RecordError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            out: BufWriter::new(file),
            written,
            max_bytes,
            full: false,
        })
    }

    /// Writes one line and flushes it (a killed sidecar leaves a readable file). Errors are logged once
    /// and recording stops; they never stop the watch.
    pub fn write(&mut self, snap: &Snapshot) {
        if self.full {
            return;
        }
        let Ok(mut line) = serde_json::to_vec(snap) else {
            return;
        };
        line.push(b'\n');
        if self.written + line.len() as u64 > self.max_bytes {
            tracing::warn!(
                max_bytes = self.max_bytes,
                "recording reached its size cap; no further snapshots are recorded"
            );
            self.full = true;
            return;
        }
        if let Err(e) = self.out.write_all(&line).and_then(|()| self.out.flush()) {
            tracing::warn!("recording stopped: {e}");
            self.full = true;
            return;
        }
        self.written += line.len() as u64;
    }
}

/// Reads a recording. A truncated last line (the sidecar was killed mid-write) is skipped; any other bad
/// line is an error that names it.
pub fn read_recording(path: &Path) -> Result<Vec<Snapshot>, RecordError> {
    let file = File::open(path).map_err(|source| RecordError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let lines: Vec<String> = BufReader::new(file).lines().collect::<Result<_, _>>()?;
    let last = lines.len();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(s) => out.push(s),
            Err(_) if i + 1 == last => break,
            Err(source) => {
                return Err(RecordError::Line {
                    line: i + 1,
                    source,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::ScrapeOutcome;

    fn snap(t: f64) -> Snapshot {
        Snapshot {
            t,
            unix: t,
            target: None,
            kernel: None,
            proc: None,
            goroutines: None,
            app: ScrapeOutcome::NotConfigured,
        }
    }

    #[test]
    fn round_trip_with_a_cap_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        let one = serde_json::to_vec(&snap(0.0)).unwrap().len() as u64 + 1;
        let mut r = Recorder::create(&path, one * 3).unwrap();
        for t in 0..5 {
            r.write(&snap(t as f64));
        }
        drop(r);
        assert_eq!(read_recording(&path).unwrap().len(), 3, "the cap holds");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"t\":1")
            .unwrap();
        assert_eq!(
            read_recording(&path).unwrap().len(),
            3,
            "a torn last line is skipped"
        );
        std::fs::write(&path, "garbage\n{}\n").unwrap();
        assert!(matches!(
            read_recording(&path),
            Err(RecordError::Line { line: 1, .. })
        ));
    }
}
