//! `loops`: the workload of `cargo xtask bench-enforce`. Each loop makes one kind of
//! system call the enforcement planes govern, as fast as it can, and prints one line:
//!
//! ```text
//! loop=open iterations=20000 ns_per_iter=812.4 ok=20000 denied=0 refused=0 errors=0
//! ```
//!
//! - `loops open N PATH`: open(2) PATH read-only and close it, N times.
//! - `loops exec N [PROGRAM]`: fork+exec PROGRAM (default /bin/true) and wait, N times.
//! - `loops connect N PORT [--to ADDR]... [--threads T]`: a TCP connect to ADDR:PORT
//!   (default 127.0.0.1; several `--to` are used in turn) and close, N times in all,
//!   spread over T threads. A refused connect (no listener) and a denied one (EPERM from
//!   a kernel rule, EACCES from Landlock) are counted, not failures: the hook ran either way.
//!
//! Compiled and free of any runtime of its own, so the bare run is as cheap as the
//! system calls themselves and the governed/ungoverned ratios are not flattered.
use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, ExitCode, Stdio},
    thread,
    time::Instant,
};

#[derive(Default, Clone, Copy)]
struct Counts {
    ok: u64,
    denied: u64,
    refused: u64,
    errors: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.ok += other.ok;
        self.denied += other.denied;
        self.refused += other.refused;
        self.errors += other.errors;
    }

    fn note(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) => self.ok += 1,
            Err(err) => match err.kind() {
                io::ErrorKind::PermissionDenied => self.denied += 1,
                io::ErrorKind::ConnectionRefused => self.refused += 1,
                _ => self.errors += 1,
            },
        }
    }
}

const USAGE: &str =
    "usage: loops open N PATH | loops exec N [PROGRAM] | loops connect N PORT [--to ADDR]... [--threads T]";

fn parse_count(text: Option<&String>, what: &str) -> Result<u64, String> {
    let text = text.ok_or_else(|| format!("missing {what}; {USAGE}"))?;
    match text.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{what} '{text}' is not a positive number")),
    }
}

fn open_loop(n: u64, path: &str) -> Counts {
    let mut counts = Counts::default();
    for _ in 0..n {
        counts.note(File::open(path).map(drop));
    }
    counts
}

fn exec_loop(n: u64, program: &str) -> Counts {
    let mut counts = Counts::default();
    for _ in 0..n {
        let status = Command::new(program).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        counts.note(status.and_then(|s| {
            if s.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!("{program} exited with {s}")))
            }
        }));
    }
    counts
}

fn connect_loop(n: u64, targets: &[SocketAddr]) -> Counts {
    let mut counts = Counts::default();
    for i in 0..n {
        let target = targets[(i % targets.len() as u64) as usize];
        counts.note(TcpStream::connect(target).map(drop));
    }
    counts
}

fn connect_threads(n: u64, port: u16, addrs: &[IpAddr], threads: u64) -> Result<Counts, String> {
    let targets: Vec<SocketAddr> = addrs.iter().map(|a| SocketAddr::new(*a, port)).collect();
    if threads == 1 {
        return Ok(connect_loop(n, &targets));
    }
    let per = n / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let targets = targets.clone();
            let count = if t == 0 { n - per * (threads - 1) } else { per };
            thread::spawn(move || connect_loop(count, &targets))
        })
        .collect();
    let mut counts = Counts::default();
    for handle in handles {
        counts.add(handle.join().map_err(|_| "a connect thread panicked".to_string())?);
    }
    Ok(counts)
}

fn run(args: &[String]) -> Result<(), String> {
    let kind = args.first().ok_or(USAGE)?.as_str();
    let n = parse_count(args.get(1), "iteration count")?;
    let start = Instant::now();
    let counts = match kind {
        "open" => open_loop(n, args.get(2).ok_or_else(|| format!("missing PATH; {USAGE}"))?),
        "exec" => exec_loop(n, args.get(2).map_or("/bin/true", String::as_str)),
        "connect" => {
            let port = args.get(2).ok_or_else(|| format!("missing PORT; {USAGE}"))?;
            let port: u16 = port.parse().map_err(|_| format!("port '{port}' is not a port number"))?;
            let mut addrs = Vec::new();
            let mut threads = 1;
            let mut rest = args[3..].iter();
            while let Some(flag) = rest.next() {
                let value = rest.next().ok_or_else(|| format!("{flag} needs a value; {USAGE}"))?;
                match flag.as_str() {
                    "--to" => addrs.push(value.parse::<IpAddr>().map_err(|_| format!("'{value}' is not an address"))?),
                    "--threads" => threads = parse_count(Some(value), "thread count")?,
                    _ => return Err(format!("unknown flag {flag}; {USAGE}")),
                }
            }
            if addrs.is_empty() {
                addrs.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
            connect_threads(n, port, &addrs, threads)?
        }
        _ => return Err(format!("unknown loop '{kind}'; {USAGE}")),
    };
    let elapsed = start.elapsed();
    if kind != "connect" && counts.ok != n {
        return Err(format!("{kind}: only {} of {n} iterations succeeded ({} denied)", counts.ok, counts.denied));
    }
    if counts.errors > 0 {
        return Err(format!("{kind}: {} of {n} iterations failed unexpectedly", counts.errors));
    }
    println!(
        "loop={kind} iterations={n} ns_per_iter={:.1} elapsed_ns={} ok={} denied={} refused={} errors={}",
        elapsed.as_nanos() as f64 / n as f64,
        elapsed.as_nanos(),
        counts.ok,
        counts.denied,
        counts.refused,
        counts.errors
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("loops: {message}");
            ExitCode::FAILURE
        }
    }
}
