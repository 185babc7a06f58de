//! Loopback socket load for the benchmarks (127.0.0.1 only, bounded in count and time).
//!
//! - `loopback_load churn RATE SECONDS`: opens and closes RATE connections per second for SECONDS.
//! - `loopback_load hold PAIRS`: opens PAIRS connections (2 sockets each) spread over several listeners,
//!   prints `ready`, and holds them until stdin closes.
//!
//! Both print their pid first and wait for a line on stdin before starting, so a watcher can attach.
use std::{
    io::{BufRead, Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

fn wait_go() {
    println!("{}", std::process::id());
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

fn churn(rate: u64, seconds: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
        }
    });
    wait_go();
    let start = Instant::now();
    let total = rate * seconds;
    // Pace in 10 ms slices so the rate is steady rather than one burst per second.
    let per_slice = (rate as f64 / 100.0).max(1.0);
    let mut done = 0u64;
    let mut owed = 0.0;
    while done < total && start.elapsed() < Duration::from_secs(seconds + 30) {
        owed += per_slice;
        while owed >= 1.0 && done < total {
            if let Ok(mut c) = TcpStream::connect(addr) {
                let _ = c.write_all(b"x");
            }
            owed -= 1.0;
            done += 1;
        }
        let next = start + Duration::from_secs_f64(done as f64 / rate as f64);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    println!("done {done} in {:.2}s", start.elapsed().as_secs_f64());
}

fn hold(pairs: usize) {
    // One listener per 20k pairs keeps every (src, dst) port tuple unique within the ephemeral range.
    let listeners: Vec<TcpListener> = (0..pairs.div_ceil(20_000).max(1))
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<_> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    wait_go();
    let mut held = Vec::with_capacity(pairs * 2);
    for i in 0..pairs {
        let l = &listeners[i % listeners.len()];
        let c = TcpStream::connect(addrs[i % addrs.len()]).expect("connect (raise `ulimit -n`?)");
        let (s, _) = l.accept().expect("accept");
        held.push(c);
        held.push(s);
    }
    println!("ready {}", held.len());
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    // Enough fds for the largest hold (2 per pair plus slack): ask for a million, and where the hard limit
    // cannot be raised (no CAP_SYS_RESOURCE, e.g. in a container) take the hard limit.
    let mut lim = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0
            && libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0
        {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    match args.get(1).map(String::as_str) {
        Some("churn") => churn(num(2, 1000).max(1), num(3, 10).min(600)),
        Some("hold") => hold(num(2, 1000).min(200_000) as usize),
        _ => {
            eprintln!("usage: loopback_load churn RATE SECONDS | hold PAIRS");
            std::process::exit(2);
        }
    }
}
