//! A streaming reader of the Prometheus text exposition format (0.0.4) that keeps only the families
//! leakwatch reads ([`MetricNames`]). A big Rancher exports tens of thousands of series beside
//! remotedialer's; building every family to read a handful cost a core. Here the body is fed chunk by chunk
//! as it arrives, only a partial last line is kept between chunks, and every line is judged by its metric
//! name alone (up to `{` or a space): a line of another family is skipped without a copy or an allocation.
//!
//! Wanted lines are parsed strictly (label values with the escapes `\"`, `\\` and `\n`, commas and braces
//! inside quotes, an optional timestamp, `+Inf`, `-Inf`, `NaN`): a garbled one is an error, never zeros.
//! Other lines are only checked for the shape of a sample or a comment (a name followed by `{`, a space
//! or a tab, or `#`), so that an HTML error page or binary garbage is still an error and not an empty
//! sample, but their labels and values are not validated, nor are they required to be UTF-8.
use std::collections::HashMap;

use thiserror::Error;

use super::scrape::MetricNames;
use crate::sample::{AppSample, LedgerRow, OTHER_CLIENTKEY, SessionRow};

/// The longest line kept between two chunks. No exporter writes a line of a megabyte; holding a longer
/// one would let memory follow the body, which is what streaming is for.
pub const MAX_LINE_BYTES: usize = 1 << 20;

#[derive(Clone, Debug, Error, PartialEq)]
#[error("line {line}: {what}")]
pub struct ParseError {
    /// 1-based line number in the body.
    pub line: u64,
    pub what: String,
}

/// The gauges read by their sum over every sample of the family.
const GAUGES: usize = 5;

#[derive(Clone, Copy, Debug)]
enum Wanted {
    Gauge(usize),
    Ledger { add: bool },
    Session { add: bool },
}

/// Added and removed counters of one ledger or session row.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    added: f64,
    removed: f64,
}

impl Counts {
    fn add(&mut self, add: bool, v: f64) {
        if add {
            self.added += v
        } else {
            self.removed += v
        }
    }
}

/// Feeds chunks with [`Reader::feed`], then [`Reader::finish`] gives the sample.
pub struct Reader {
    wanted: Vec<(Box<[u8]>, Wanted)>,
    prefix: Box<[u8]>,
    max_ledger_rows: usize,
    /// The incomplete last line of the chunks fed so far.
    partial: Vec<u8>,
    line: u64,
    /// Whether any line (sample or descriptor) was seen: an empty body is no exposition.
    any: bool,
    present: bool,
    gauges: [Option<f64>; GAUGES],
    /// Ledger rows keyed by [`row_key`] of (clientkey, proto, addr).
    ledger: HashMap<String, Counts>,
    other: Option<Counts>,
    dropped: u64,
    /// Session rows keyed by [`row_key`] of (clientkey, peer).
    sessions: HashMap<String, Counts>,
    /// Samples read per session family (add, remove), for the cap.
    session_samples: [usize; 2],
    /// Scratch buffers for the label values of one line and the key built from them.
    values: [Vec<u8>; 3],
    key: String,
}

/// An unambiguous map key of label values: each value preceded by its length, so that no choice of
/// values (which may contain any character) makes two rows collide.
fn row_key(key: &mut String, values: &[&str]) {
    use std::fmt::Write;
    key.clear();
    for v in values {
        let _ = write!(key, "{}:", v.len());
        key.push_str(v);
    }
}

/// The label values of a [`row_key`], in order.
fn split_key(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = key;
    while let Some((len, tail)) = rest.split_once(':') {
        let Ok(len) = len.parse::<usize>() else { break };
        let (v, tail) = tail.split_at(len.min(tail.len()));
        out.push(v.to_string());
        rest = tail;
    }
    out
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':'
}

fn is_label_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Whether `b` may be in a metric name, as a table: the one test made on every byte of every metric name
/// of the body.
static NAME_CHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b':';
        b += 1;
    }
    t
};

/// Length of the metric name at the start of `line`.
fn name_len(line: &[u8]) -> usize {
    line.iter()
        .position(|b| !NAME_CHAR[usize::from(*b)])
        .unwrap_or(line.len())
}

fn skip_blanks(s: &[u8], mut i: usize) -> usize {
    while s.get(i).copied().is_some_and(is_blank) {
        i += 1;
    }
    i
}

/// A sample value as the format writes it: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(tok: &[u8]) -> Option<f64> {
    std::str::from_utf8(tok).ok()?.parse().ok()
}

impl Reader {
    pub fn new(names: &MetricNames, max_ledger_rows: usize) -> Self {
        let wanted = [
            (&names.goroutines, Wanted::Gauge(0)),
            (&names.heap_inuse, Wanted::Gauge(1)),
            (&names.threads, Wanted::Gauge(2)),
            (&names.open_fds, Wanted::Gauge(3)),
            (&names.max_fds, Wanted::Gauge(4)),
            (&names.add_connections, Wanted::Ledger { add: true }),
            (&names.remove_connections, Wanted::Ledger { add: false }),
            (&names.add_session, Wanted::Session { add: true }),
            (&names.remove_session, Wanted::Session { add: false }),
        ]
        .into_iter()
        .map(|(n, w)| (n.as_bytes().into(), w))
        .collect();
        Self {
            wanted,
            prefix: names.remotedialer_prefix.as_bytes().into(),
            max_ledger_rows,
            partial: Vec::new(),
            line: 0,
            any: false,
            present: false,
            gauges: [None; GAUGES],
            ledger: HashMap::new(),
            other: None,
            dropped: 0,
            sessions: HashMap::new(),
            session_samples: [0; 2],
            values: Default::default(),
            key: String::new(),
        }
    }

    fn err(&self, what: impl Into<String>) -> ParseError {
        ParseError {
            line: self.line,
            what: what.into(),
        }
    }

    fn lookup(&self, name: &[u8]) -> Option<Wanted> {
        self.wanted
            .iter()
            .find(|(n, _)| **n == *name)
            .map(|(_, w)| *w)
    }

    /// Reads the complete lines of `chunk` (with the partial line kept from the chunk before) and keeps
    /// its incomplete tail.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), ParseError> {
        if !self.partial.is_empty() {
            let Some(nl) = memchr::memchr(b'\n', chunk) else {
                return self.keep(chunk);
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&chunk[..nl]);
            let res = self.line(&line);
            // The buffer is kept for the next partial line: no allocation per chunk.
            line.clear();
            self.partial = line;
            res?;
            chunk = &chunk[nl + 1..];
        }
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', chunk) {
            self.line(&chunk[start..nl])?;
            start = nl + 1;
        }
        self.keep(&chunk[start..])
    }

    fn keep(&mut self, tail: &[u8]) -> Result<(), ParseError> {
        if self.partial.len() + tail.len() > MAX_LINE_BYTES {
            self.line += 1;
            return Err(self.err(format!("a line longer than {MAX_LINE_BYTES} bytes")));
        }
        self.partial.extend_from_slice(tail);
        Ok(())
    }

    /// The sample, once the body has ended (a last line without a newline is read too).
    pub fn finish(mut self) -> Result<AppSample, ParseError> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line)?;
        }
        if !self.any {
            return Err(self.err("no metrics in the body"));
        }
        let mut ledger: Vec<LedgerRow> = self
            .ledger
            .iter()
            .map(|(k, c)| {
                let mut v = split_key(k).into_iter();
                LedgerRow {
                    clientkey: v.next().unwrap_or_default(),
                    proto: v.next().unwrap_or_default(),
                    addr: v.next().unwrap_or_default(),
                    added: c.added,
                    removed: c.removed,
                }
            })
            .collect();
        if let Some(c) = self.other {
            ledger.push(LedgerRow {
                clientkey: OTHER_CLIENTKEY.into(),
                added: c.added,
                removed: c.removed,
                ..LedgerRow::default()
            });
        }
        ledger.sort_by(|a, b| {
            (&a.clientkey, &a.proto, &a.addr).cmp(&(&b.clientkey, &b.proto, &b.addr))
        });
        let mut sessions: Vec<SessionRow> = self
            .sessions
            .iter()
            .map(|(k, c)| {
                let mut v = split_key(k).into_iter();
                SessionRow {
                    clientkey: v.next().unwrap_or_default(),
                    peer: v.next().unwrap_or_default(),
                    added: c.added,
                    removed: c.removed,
                }
            })
            .collect();
        sessions.sort_by(|a, b| (&a.clientkey, &a.peer).cmp(&(&b.clientkey, &b.peer)));
        let g = |i: usize| self.gauges[i].filter(|v| v.is_finite());
        Ok(AppSample {
            ledger,
            sessions,
            remotedialer_present: self.present,
            ledger_rows_dropped: self.dropped,
            goroutines: g(0),
            heap_inuse_bytes: g(1),
            threads: g(2),
            open_fds: g(3),
            max_fds: g(4),
        })
    }

    fn line(&mut self, line: &[u8]) -> Result<(), ParseError> {
        self.line += 1;
        if line.len() > MAX_LINE_BYTES {
            // The same answer as when the line arrives in pieces and [`Self::keep`] refuses it.
            return Err(self.err(format!("a line longer than {MAX_LINE_BYTES} bytes")));
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(&first) = line.first() else {
            return Ok(());
        };
        if first == b'#' {
            return self.comment(line);
        }
        if !is_name_start(first) {
            if line.iter().all(|b| is_blank(*b)) {
                return Ok(());
            }
            return Err(self.err("not a sample, a comment or a blank line"));
        }
        self.any = true;
        let n = name_len(line);
        let (name, rest) = line.split_at(n);
        if name.starts_with(&self.prefix) {
            self.present = true;
        }
        match self.lookup(name) {
            Some(w) => self.sample(w, rest),
            // Not ours: only its shape is checked (a name, then labels or a value).
            None if rest.first().is_some_and(|b| *b == b'{' || is_blank(*b)) => Ok(()),
            None => Err(self.err("a metric name with no labels or value after it")),
        }
    }

    /// `# HELP name text`, `# TYPE name type`, or any other comment.
    fn comment(&mut self, line: &[u8]) -> Result<(), ParseError> {
        let (is_type, rest) = if let Some(r) = line.strip_prefix(b"# TYPE ") {
            (true, r)
        } else if let Some(r) = line.strip_prefix(b"# HELP ") {
            (false, r)
        } else {
            return Ok(());
        };
        self.any = true;
        let n = name_len(rest);
        let (name, after) = rest.split_at(n);
        if name.is_empty() {
            return Err(self.err("a descriptor without a metric name"));
        }
        if name.starts_with(&self.prefix) {
            self.present = true;
        }
        if is_type && self.lookup(name).is_some() {
            let kind = after.strip_prefix(b" ").unwrap_or(b"");
            let kind = kind.strip_suffix(b" ").unwrap_or(kind);
            if !matches!(
                kind,
                b"counter" | b"gauge" | b"histogram" | b"summary" | b"untyped"
            ) {
                return Err(self.err(format!(
                    "unknown metric type {:?}",
                    String::from_utf8_lossy(kind)
                )));
            }
        }
        Ok(())
    }

    /// A sample of a wanted family, parsed strictly; `rest` follows the metric name.
    fn sample(&mut self, wanted: Wanted, rest: &[u8]) -> Result<(), ParseError> {
        // Which labels this family's rows are keyed by.
        let keys: &[&[u8]] = match wanted {
            Wanted::Gauge(_) => &[],
            Wanted::Ledger { .. } => &[b"clientkey", b"proto", b"addr"],
            Wanted::Session { .. } => &[b"clientkey", b"peer"],
        };
        let mut values = std::mem::take(&mut self.values);
        for v in &mut values {
            v.clear();
        }
        let parsed = self.parse_sample(rest, keys, &mut values);
        let res = parsed.and_then(|v| self.record(wanted, v, keys.len(), &values));
        self.values = values;
        res
    }

    /// Labels (the values of `keys` into `values`) and the value of a sample line.
    fn parse_sample(
        &self,
        s: &[u8],
        keys: &[&[u8]],
        values: &mut [Vec<u8>; 3],
    ) -> Result<f64, ParseError> {
        let mut i = 0;
        let brace = skip_blanks(s, 0);
        if s.get(brace) == Some(&b'{') {
            i = brace + 1;
            loop {
                i = skip_blanks(s, i);
                match s.get(i) {
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    Some(b) if is_label_start(*b) => {}
                    _ => return Err(self.err("expected a label name or '}'")),
                }
                let start = i;
                while s
                    .get(i)
                    .copied()
                    .is_some_and(|b| is_label_start(b) || b.is_ascii_digit())
                {
                    i += 1;
                }
                let label = &s[start..i];
                i = skip_blanks(s, i);
                if s.get(i) != Some(&b'=') {
                    return Err(self.err("expected '=' after a label name"));
                }
                i = skip_blanks(s, i + 1);
                if s.get(i) != Some(&b'"') {
                    return Err(self.err("expected a quoted label value"));
                }
                i += 1;
                let mut into = keys
                    .iter()
                    .position(|k| *k == label)
                    .map(|k| &mut values[k]);
                loop {
                    let Some(&b) = s.get(i) else {
                        return Err(self.err("unterminated label value"));
                    };
                    i += 1;
                    let c = match b {
                        b'"' => break,
                        b'\\' => {
                            let e = s.get(i).copied();
                            i += 1;
                            match e {
                                Some(b'\\') => b'\\',
                                Some(b'"') => b'"',
                                Some(b'n') => b'\n',
                                _ => return Err(self.err("bad escape in a label value")),
                            }
                        }
                        b => b,
                    };
                    if let Some(v) = into.as_mut() {
                        v.push(c);
                    }
                }
                i = skip_blanks(s, i);
                match s.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => {}
                    _ => return Err(self.err("expected ',' or '}' after a label value")),
                }
            }
        }
        let after_labels = i;
        i = skip_blanks(s, i);
        if i == after_labels {
            return Err(self.err("expected a space before the value"));
        }
        let start = i;
        while s.get(i).copied().is_some_and(|b| !is_blank(b)) {
            i += 1;
        }
        let value = parse_value(&s[start..i]).ok_or_else(|| {
            self.err(format!(
                "bad sample value {:?}",
                String::from_utf8_lossy(&s[start..i])
                    .chars()
                    .take(40)
                    .collect::<String>()
            ))
        })?;
        i = skip_blanks(s, i);
        if i < s.len() {
            let ts = &s[i..];
            let ts_end = ts.iter().position(|b| is_blank(*b)).unwrap_or(ts.len());
            let ok = std::str::from_utf8(&ts[..ts_end])
                .ok()
                .is_some_and(|t| t.parse::<i64>().is_ok());
            if !ok || skip_blanks(ts, ts_end) != ts.len() {
                return Err(self.err("bad timestamp or trailing text after the value"));
            }
        }
        Ok(value)
    }

    fn record(
        &mut self,
        wanted: Wanted,
        v: f64,
        nkeys: usize,
        values: &[Vec<u8>; 3],
    ) -> Result<(), ParseError> {
        let mut strs = ["", "", ""];
        for (s, v) in strs.iter_mut().zip(&values[..nkeys]) {
            *s = std::str::from_utf8(v).map_err(|_| self.err("a label value is not UTF-8"))?;
        }
        let mut key = std::mem::take(&mut self.key);
        row_key(&mut key, &strs[..nkeys]);
        match wanted {
            Wanted::Gauge(g) => *self.gauges[g].get_or_insert(0.0) += v,
            // A counter that is not a number is no count: the row is left as it is.
            _ if !v.is_finite() => {}
            Wanted::Ledger { add } => {
                if let Some(c) = self.ledger.get_mut(key.as_str()) {
                    c.add(add, v);
                } else if self.ledger.len() < self.max_ledger_rows {
                    self.ledger.entry(key.clone()).or_default().add(add, v);
                } else {
                    if add {
                        self.dropped += 1;
                    }
                    self.other.get_or_insert_default().add(add, v);
                }
            }
            Wanted::Session { add } => {
                let n = &mut self.session_samples[usize::from(!add)];
                if *n < self.max_ledger_rows {
                    *n += 1;
                    if let Some(c) = self.sessions.get_mut(key.as_str()) {
                        c.add(add, v);
                    } else {
                        self.sessions.entry(key.clone()).or_default().add(add, v);
                    }
                }
            }
        }
        self.key = key;
        Ok(())
    }
}

/// Parses a whole body at once (what a scrape does chunk by chunk).
pub fn parse(
    body: &[u8],
    names: &MetricNames,
    max_ledger_rows: usize,
) -> Result<AppSample, ParseError> {
    let mut r = Reader::new(names, max_ledger_rows);
    r.feed(body)?;
    r.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// remotedialer's families among others', with every construct the format has: escapes, commas and
    /// braces inside quotes, timestamps, infinities, NaN, histograms, CRLF line ends, blank lines and
    /// free comments.
    const BODY: &str = concat!(
        "# HELP apiserver_request_duration_seconds Latency.\n",
        "# TYPE apiserver_request_duration_seconds histogram\n",
        "apiserver_request_duration_seconds_bucket{le=\"0.5\",verb=\"GET\"} 12\n",
        "apiserver_request_duration_seconds_bucket{le=\"+Inf\",verb=\"GET\"} 13\n",
        "apiserver_request_duration_seconds_sum{verb=\"GET\"} 3.25\n",
        "apiserver_request_duration_seconds_count{verb=\"GET\"} 13\n",
        "# a free comment\n",
        "\n",
        "# TYPE go_goroutines gauge\n",
        "go_goroutines 42 1700000000000\n",
        "go_memstats_heap_inuse_bytes{} 1.5e+06\r\n",
        "process_max_fds +Inf\n",
        "process_open_fds NaN\n",
        "go_threads{a=\"1\"} 3\n",
        "go_threads{a=\"2\"} 4\n",
        "# TYPE session_server_total_add_connections counter\n",
        "session_server_total_add_connections{addr=\"h,x=1}\",clientkey=\"a\\\"b\",proto=\"tcp\"} 3\n",
        "session_server_total_add_connections{addr=\"10.0.0.1:443\",clientkey=\"c\\\\d\\ne\",proto=\"tcp\",} 7\n",
        "session_server_total_add_connections { clientkey = \"z\" , proto=\"udp\" } 1\n",
        "session_server_total_remove_connections{addr=\"10.0.0.1:443\",clientkey=\"c\\\\d\\ne\",proto=\"tcp\"} 5\n",
        "session_server_total_remove_connections{addr=\"10.0.0.1:443\",clientkey=\"c\\\\d\\ne\",proto=\"tcp\"} NaN\n",
        "session_server_total_add_websocket_session{clientkey=\"a\",peer=\"false\"} 2\n",
        "session_server_total_remove_websocket_session{clientkey=\"a\",peer=\"false\"} 1\n",
        "unrelated_total{path=\"/x\\\\y\"} 1e3",
    );

    fn parse_str(body: &str, rows: usize) -> Result<AppSample, ParseError> {
        parse(body.as_bytes(), &MetricNames::default(), rows)
    }

    #[test]
    fn reads_every_construct_of_the_format() {
        let s = parse_str(BODY, 100).unwrap();
        assert!(s.remotedialer_present);
        assert_eq!(s.goroutines, Some(42.0));
        assert_eq!(s.heap_inuse_bytes, Some(1.5e6));
        assert_eq!(s.max_fds, None, "an infinite limit is no limit");
        assert_eq!(s.open_fds, None, "NaN is no count");
        assert_eq!(s.threads, Some(7.0), "a gauge is summed over its samples");
        let rows: Vec<_> = s
            .ledger
            .iter()
            .map(|r| {
                (
                    r.clientkey.as_str(),
                    r.proto.as_str(),
                    r.addr.as_str(),
                    r.added,
                    r.removed,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("a\"b", "tcp", "h,x=1}", 3.0, 0.0),
                ("c\\d\ne", "tcp", "10.0.0.1:443", 7.0, 5.0),
                ("z", "udp", "", 1.0, 0.0),
            ]
        );
        assert_eq!(
            (
                s.sessions.len(),
                s.sessions[0].clientkey.as_str(),
                s.sessions[0].peer.as_str(),
                s.sessions[0].added,
                s.sessions[0].removed
            ),
            (1, "a", "false", 2.0, 1.0)
        );
    }

    #[test]
    fn any_split_of_the_body_into_chunks_reads_the_same() {
        let whole = parse_str(BODY, 100).unwrap();
        let bytes = BODY.as_bytes();
        for at in 0..=bytes.len() {
            let mut r = Reader::new(&MetricNames::default(), 100);
            r.feed(&bytes[..at]).unwrap();
            r.feed(&bytes[at..]).unwrap();
            assert_eq!(r.finish().unwrap(), whole, "split at byte {at}");
        }
        let mut r = Reader::new(&MetricNames::default(), 100);
        for b in bytes {
            r.feed(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(r.finish().unwrap(), whole, "one byte at a time");
        // An error is the same error wherever the chunks end.
        let bad = format!("{BODY}\ngo_goroutines{{a=\"1\"\\q\"}} 1\n");
        let want = parse_str(&bad, 100).unwrap_err();
        for at in 0..=bad.len() {
            let mut r = Reader::new(&MetricNames::default(), 100);
            let got = r
                .feed(&bad.as_bytes()[..at])
                .and_then(|()| r.feed(&bad.as_bytes()[at..]))
                .and_then(|()| r.finish().map(|_| ()));
            assert_eq!(got, Err(want.clone()), "split at byte {at}");
        }
    }

    #[test]
    fn a_garbled_line_of_a_wanted_family_is_an_error_with_its_line() {
        for (line, why) in [
            ("go_goroutines{a=\"x\\q\"} 1", "bad escape"),
            ("go_goroutines{a=\"x} 1", "unterminated"),
            ("go_goroutines{a=x} 1", "quoted label value"),
            ("go_goroutines{9a=\"x\"} 1", "label name"),
            ("go_goroutines{a=\"x\" b=\"y\"} 1", "',' or '}'"),
            ("go_goroutines{a=\"x\"}1", "space before the value"),
            ("go_goroutines", "space before the value"),
            ("go_goroutines ", "bad sample value"),
            ("go_goroutines 1 2 3", "trailing text"),
            ("go_goroutines 1 12.5x", "bad timestamp"),
            ("go_goroutines one", "bad sample value"),
            ("# TYPE go_goroutines gaugeish", "unknown metric type"),
        ] {
            let body = format!("other_series 1\n{line}\n");
            let e = parse_str(&body, 10).unwrap_err();
            assert_eq!(e.line, 2, "{line:?}: {e}");
            assert!(e.what.contains(why), "{line:?}: {e}");
        }
    }

    #[test]
    fn lines_of_other_families_are_checked_for_their_shape_only() {
        // Not validated: their labels and values are none of leakwatch's business.
        let s = parse_str(
            "other{a=\"\\q\"} not-a-number\nother_bytes{x=\"\u{ff}\"} 1\n# TYPE other whatever\ngo_goroutines 1\n",
            10,
        )
        .unwrap();
        assert_eq!(s.goroutines, Some(1.0));
        let mut r = Reader::new(&MetricNames::default(), 10);
        r.feed(b"other{a=\"\xff\xfe\"} 1\ngo_goroutines 2\n")
            .unwrap();
        assert_eq!(r.finish().unwrap().goroutines, Some(2.0), "not even UTF-8");
        // But a line shaped like nothing of the format is an error.
        for body in [
            "<html><body>502 Bad Gateway</body></html>\n",
            "go_goroutines 1\n  leading blanks 1\n",
            "go_goroutines 1\nother\n",
            "go_goroutines 1\nother=1\n",
            "",
            "\n\n# just a comment\n",
        ] {
            assert!(parse_str(body, 10).is_err(), "{body:?}");
        }
    }

    #[test]
    fn a_line_longer_than_the_bound_is_an_error_not_memory() {
        let mut r = Reader::new(&MetricNames::default(), 10);
        r.feed(b"go_goroutines 1\nother{a=\"").unwrap();
        let block = vec![b'x'; 64 << 10];
        let mut fed = 0;
        let err = loop {
            match r.feed(&block) {
                Ok(()) => fed += block.len(),
                Err(e) => break e,
            }
            assert!(fed <= MAX_LINE_BYTES, "the partial line is bounded");
        };
        assert_eq!(err.line, 2);
        assert!(err.what.contains("longer than"), "{err}");
        assert!(r.partial.capacity() <= 2 * MAX_LINE_BYTES);
        // Whole or in pieces, the same answer.
        let mut body = b"go_goroutines 1\nother{a=\"".to_vec();
        body.resize(MAX_LINE_BYTES + 100, b'x');
        body.extend_from_slice(b"\"} 1\n");
        assert_eq!(parse(&body, &MetricNames::default(), 10).unwrap_err(), err);
    }

    #[test]
    fn row_keys_never_collide() {
        let mut a = String::new();
        let mut b = String::new();
        row_key(&mut a, &["a:1", "b", ""]);
        row_key(&mut b, &["a", "1b", ""]);
        assert_ne!(a, b);
        assert_eq!(split_key(&a), ["a:1", "b", ""]);
        row_key(&mut a, &["", "", "x:y"]);
        assert_eq!(split_key(&a), ["", "", "x:y"]);
    }

    #[test]
    fn a_different_configured_name_is_read_and_the_default_one_skipped() {
        let names = MetricNames {
            goroutines: "tasks_alive".into(),
            remotedialer_prefix: "tunnel_".into(),
            ..MetricNames::default()
        };
        let s = parse(b"go_goroutines 3\ntasks_alive 9\ntunnel_x 1\n", &names, 10).unwrap();
        assert_eq!(s.goroutines, Some(9.0));
        assert!(s.remotedialer_present);
    }
}
