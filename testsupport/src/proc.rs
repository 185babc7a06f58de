use std::{
    cell::RefCell,
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use crate::{Error, Result};

/// How long a reftunnel or leakwatch process may take to print its listening address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Proc::terminate`] lets a process shut down before killing it.
const TERMINATE_GRACE: Duration = Duration::from_secs(10);

/// A child process whose stdout (and, when asked for, stderr) lines arrive on channels, read by
/// threads so that a chatty child never blocks on a full pipe. Dropping it kills the child: a failed
/// test or demo leaves nothing running.
pub struct Proc {
    pub child: Child,
    name: String,
    lines: Receiver<String>,
    err_lines: Option<Receiver<String>>,
    /// Every line a wait has read, for the error when the awaited one never comes.
    seen: RefCell<Vec<String>>,
}

/// Settings of one [`Proc`] before it starts; what differs between callers (a name in messages,
/// echoing output, reading stderr) is set here, the rest on the [`Command`].
pub struct Launch<'a> {
    cmd: &'a mut Command,
    name: String,
    echo: bool,
    read_stderr: bool,
}

impl Launch<'_> {
    /// The name messages (and echoed lines) use; the program's file name by default.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Copies each stdout line to our stdout as `  [name] line`: the demo shows what its processes say.
    pub fn echo(mut self) -> Self {
        self.echo = true;
        self
    }

    /// Also reads stderr (where leakwatch logs) for [`Proc::wait_err_line`], copying it to our stderr
    /// so that a test's output still shows it.
    pub fn read_stderr(mut self) -> Self {
        self.read_stderr = true;
        self
    }

    pub fn spawn(self) -> Result<Proc> {
        self.cmd.stdout(Stdio::piped());
        if self.read_stderr {
            self.cmd.stderr(Stdio::piped());
        }
        let mut child = self.cmd.spawn().map_err(|source| Error::Spawn {
            name: self.name.clone(),
            cmd: format!("{:?}", self.cmd),
            source,
        })?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let tag = self.echo.then(|| self.name.clone());
        let lines = forward_lines(stdout, move |line| {
            if let Some(tag) = &tag {
                println!("  [{tag}] {line}");
            }
        });
        let err_lines = child
            .stderr
            .take()
            .filter(|_| self.read_stderr)
            .map(|stderr| forward_lines(stderr, |line| eprintln!("{line}")));
        Ok(Proc {
            child,
            name: self.name,
            lines,
            err_lines,
            seen: RefCell::new(Vec::new()),
        })
    }
}

/// Reads `stream` line by line onto a channel. Once nobody listens the lines are still read (and
/// echoed), so that the child does not block writing to a pipe nobody empties.
fn forward_lines(
    stream: impl std::io::Read + Send + 'static,
    echo: impl Fn(&str) + Send + 'static,
) -> Receiver<String> {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            echo(&line);
            let _ = tx.send(line);
        }
    });
    lines
}

impl Proc {
    /// Starts `cmd` with its stdout read; see [`Proc::launch`] for more settings.
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        Self::launch(cmd).spawn()
    }

    pub fn launch(cmd: &mut Command) -> Launch<'_> {
        let name = std::path::Path::new(cmd.get_program())
            .file_name()
            .unwrap_or(cmd.get_program())
            .to_string_lossy()
            .into_owned();
        Launch {
            cmd,
            name,
            echo: false,
            read_stderr: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line containing `needle` and returns it; lines before it are passed over
    /// (and not matched again).
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_on(&self.lines, "stdout", needle, timeout)
    }

    /// [`Proc::wait_line`] on stderr (needs [`Launch::read_stderr`]).
    pub fn wait_err_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        let errs = self
            .err_lines
            .as_ref()
            .ok_or_else(|| Error::StderrNotRead(self.name.clone()))?;
        self.wait_on(errs, "stderr", needle, timeout)
    }

    fn wait_on(
        &self,
        lines: &Receiver<String>,
        stream: &'static str,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.borrow_mut().push(l.clone());
                    if l.contains(needle) {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout {
                        name: self.name.clone(),
                        stream,
                        needle: needle.to_string(),
                        timeout,
                        seen: self.seen.borrow().clone(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Exited {
                        name: self.name.clone(),
                        stream,
                        needle: needle.to_string(),
                        seen: self.seen.borrow().clone(),
                    });
                }
            }
        }
    }

    /// The next stdout line, or None once the process has closed stdout or `timeout` passed.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The address of a `... listening on ADDR` line, which reftunnel's and leakwatch's servers print.
    pub fn listening_addr(&self) -> Result<String> {
        let line = self.wait_line("listening on", LISTEN_TIMEOUT)?;
        Ok(line.rsplit(' ').next().unwrap_or_default().to_string())
    }

    /// Waits for the process to exit and returns its status and everything it printed since the last
    /// wait.
    pub fn collect(mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        let mut out = String::new();
        let drain = |out: &mut String, lines: &Receiver<String>| {
            while let Ok(l) = lines.try_recv() {
                out.push_str(&l);
                out.push('\n');
            }
        };
        loop {
            drain(&mut out, &self.lines);
            let exited = self.child.try_wait().map_err(|source| Error::Wait {
                name: self.name.clone(),
                source,
            })?;
            if let Some(status) = exited {
                // The reader thread may still hold the last lines.
                std::thread::sleep(Duration::from_millis(50));
                drain(&mut out, &self.lines);
                return Ok((status, out));
            }
            if Instant::now() > deadline {
                return Err(Error::NotFinished {
                    name: self.name.clone(),
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then up to 10 s for a clean shutdown (what leakwatch does on SIGTERM is under test),
    /// then SIGKILL. The exit status, or None if it had to be killed.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        // SAFETY: kill(2) on our own child, which has not been reaped (we hold it).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + TERMINATE_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
