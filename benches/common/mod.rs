//! Shared by the `capacity` and `hostile` benchmarks: the release proxy binary
//! run as a separate process (so its memory and CPU are its own, read from
//! /proc), the testkit fakes it talks to hosted in the bench process, a config
//! writer, and small line clients that can bind any loopback source address.
//!
//! Why a separate process: resident memory and CPU time are per process. With
//! the proxy in-process (as `throughput` runs it) the fakes and the clients
//! would be counted with it.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

// ---------------------------------------------------------------- arguments

/// `cargo bench --bench NAME -- [scenario...] [--flag value]... [--quick]`.
/// Cargo appends `--bench` to a harness-less bench's arguments: ignored.
pub struct Args {
    pub names: Vec<String>,
    flags: HashMap<String, Vec<String>>,
    raw: Vec<String>,
}

impl Args {
    pub fn parse() -> Args {
        let raw: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
        let mut names = Vec::new();
        let mut flags: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = raw.iter().peekable();
        while let Some(arg) = it.next() {
            if let Some(flag) = arg.strip_prefix("--") {
                if let Some((k, v)) = flag.split_once('=') {
                    flags.entry(k.to_string()).or_default().push(v.to_string());
                } else if it.peek().is_some_and(|v| !v.starts_with("--")) && !is_switch(flag) {
                    flags.entry(flag.to_string()).or_default().push(it.next().unwrap().clone());
                } else {
                    flags.entry(flag.to_string()).or_default().push("true".into());
                }
            } else {
                names.push(arg.clone());
            }
        }
        Args { names, flags, raw }
    }

    pub fn switch(&self, name: &str) -> bool {
        self.flags.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.flags.get(name).and_then(|v| v.last()).map(String::as_str)
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.flags.get(name).cloned().unwrap_or_default()
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.get(name) {
            Some(v) => v.parse().unwrap_or_else(|_| panic!("--{name}: not a number: {v}")),
            None => default,
        }
    }

    /// Whether scenario `name` was asked for (none named: all of them).
    pub fn wants(&self, name: &str) -> bool {
        self.names.is_empty() || self.names.iter().any(|n| n == name || n == "all")
    }

    /// The command that reproduces this run, for the report.
    pub fn command(&self, bench: &str) -> String {
        let mut cmd = String::new();
        if let Ok(bin) = std::env::var(BIN_ENV) {
            cmd.push_str(&format!("{BIN_ENV}={bin} "));
        }
        cmd.push_str(&format!("cargo bench --bench {bench}"));
        if !self.raw.is_empty() {
            let quoted: Vec<String> =
                self.raw.iter().map(|a| if a.contains(' ') { format!("'{a}'") } else { a.clone() }).collect();
            cmd.push_str(" -- ");
            cmd.push_str(&quoted.join(" "));
        }
        cmd
    }
}

fn is_switch(flag: &str) -> bool {
    matches!(flag, "quick" | "help")
}

// ---------------------------------------------------------------- /proc

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resident set size now (VmRSS), KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size (VmHWM) since start or the last [`reset_peak`], KiB.
pub fn peak_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Resets VmHWM to the current RSS (Linux >= 4.0, `echo 5 > clear_refs`), so a
/// peak is the peak of what follows.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// User + system CPU seconds the process (all its threads, dead ones
/// included) has used: the kernel's rusage for it, with 1/CLK_TCK resolution.
pub fn cpu_secs(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may contain spaces: count from after its ')'.
    let Some(rest) = text.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime field 15.
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / clock_ticks()
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The 1/5/15-minute load averages: the machine is shared, so every figure
/// is printed with the load it was measured under.
pub fn load() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let parts: Vec<&str> = text.split_whitespace().take(3).collect();
    format!("load {}", parts.join(" "))
}

/// The kernel's TcpExt counters (/proc/net/netstat) named, e.g.
/// `ListenOverflows` (a full accept queue dropped a connection's final ACK)
/// and `ListenDrops`. They count for the whole network namespace: other
/// programs on loopback add to them, rarely.
pub fn tcp_counter(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines[..] else { return 0 };
    let at = names.split_whitespace().position(|n| n == name);
    at.and_then(|i| values.split_whitespace().nth(i)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Whether something listens on 127.0.0.1:`port`, from /proc/net/tcp, so
/// readiness is known without opening a connection (which would make the
/// proxy probe its upstream and warm its caches).
pub fn listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1] == want && f[3] == "0A"
    })
}

/// This process's soft descriptor limit. (std has no setrlimit and the crate
/// forbids unsafe code, so the bench cannot raise its own: run it from a shell
/// with `ulimit -n` raised if it says so. The proxy gets its limit from its
/// launcher, see [`ProxyProcess::spawn`].)
pub fn soft_nofile() -> u64 {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// The hard descriptor limit of this process.
pub fn hard_nofile() -> u64 {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

// ---------------------------------------------------------------- the proxy process

pub const BIN_ENV: &str = "XOAUTH2_BENCH_BIN";

/// The proxy binary: `$XOAUTH2_BENCH_BIN`, else the one cargo built for this
/// bench (the bench profile inherits the release profile).
pub fn proxy_bin() -> PathBuf {
    std::env::var_os(BIN_ENV).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_xoauth2-proxy")))
}

/// The proxy's stderr, read on a thread: recent lines and counts of chosen substrings.
pub struct LogTap {
    recent: Mutex<VecDeque<String>>,
    patterns: Vec<(String, AtomicUsize)>,
    pub lines: AtomicUsize,
}

impl LogTap {
    pub fn count(&self, pattern: &str) -> usize {
        self.patterns.iter().find(|(p, _)| p == pattern).map_or(0, |(_, n)| n.load(Ordering::SeqCst))
    }

    pub fn recent(&self) -> Vec<String> {
        self.recent.lock().unwrap().iter().cloned().collect()
    }
}

pub struct ProxyProcess {
    child: Child,
    pub pid: u32,
    pub started: Instant,
    pub log: Arc<LogTap>,
    killed_for_memory: Arc<AtomicBool>,
    monitor_peak: Arc<AtomicU64>,
}

/// How to start the proxy.
#[derive(Clone)]
pub struct Launch {
    /// Soft RLIMIT_NOFILE for the proxy; None: this process's.
    pub nofile: Option<u64>,
    /// Substrings of stderr lines to count.
    pub patterns: Vec<String>,
    /// Kill the proxy if its RSS passes this (MiB): the machine is shared.
    pub rss_cap_mib: u64,
}

impl Default for Launch {
    fn default() -> Self {
        Launch { nofile: None, patterns: Vec::new(), rss_cap_mib: 6144 }
    }
}

impl ProxyProcess {
    /// `xoauth2-proxy run -c config`. With a descriptor limit, through bash's
    /// `ulimit` then `exec` (so the pid is the proxy's); without one, directly
    /// (the proxy inherits this process's limit), so that a signal sent right
    /// after the spawn reaches the proxy and not a shell about to exec it.
    pub fn spawn(config: &Path, launch: &Launch) -> ProxyProcess {
        let mut cmd = match launch.nofile {
            Some(limit) => {
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("ulimit -Sn {limit} && exec \"$0\" run -c \"$1\""))
                    .arg(proxy_bin())
                    .arg(config);
                c
            }
            None => {
                let mut c = Command::new(proxy_bin());
                c.arg("run").arg("-c").arg(config);
                c
            }
        };
        let mut child = cmd
            .env_remove("XOAUTH2_PROXY_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the proxy");
        let started = Instant::now();
        let pid = child.id();
        let log = Arc::new(LogTap {
            recent: Mutex::new(VecDeque::new()),
            patterns: launch.patterns.iter().map(|p| (p.clone(), AtomicUsize::new(0))).collect(),
            lines: AtomicUsize::new(0),
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let tap = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                tap.lines.fetch_add(1, Ordering::Relaxed);
                for (p, n) in &tap.patterns {
                    if line.contains(p.as_str()) {
                        n.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let mut recent = tap.recent.lock().unwrap();
                recent.push_back(line);
                if recent.len() > 50 {
                    recent.pop_front();
                }
            }
        });
        // A guard for the shared machine: sample RSS every 20 ms (also a
        // second opinion on VmHWM), kill the proxy past the cap.
        let killed_for_memory = Arc::new(AtomicBool::new(false));
        let monitor_peak = Arc::new(AtomicU64::new(0));
        let (killed, peak, cap) = (killed_for_memory.clone(), monitor_peak.clone(), launch.rss_cap_mib * 1024);
        std::thread::spawn(move || loop {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            let rss = rss_kib(pid);
            peak.fetch_max(rss, Ordering::Relaxed);
            if rss > cap {
                killed.store(true, Ordering::SeqCst);
                let _ = Command::new("bash").args(["-c", &format!("kill -KILL {pid}")]).status();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        });
        ProxyProcess { child, pid, started, log, killed_for_memory, monitor_peak }
    }

    /// Waits until the proxy listens on `port` (without connecting to it).
    pub fn wait_listening(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !listening(port) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the proxy exited at start ({status}):\n{}", self.log.recent().join("\n"));
            }
            assert!(Instant::now() < deadline, "the proxy is not listening after 20 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    pub fn peak_kib(&self) -> u64 {
        peak_kib(self.pid).max(self.monitor_peak.load(Ordering::Relaxed))
    }

    pub fn reset_peak(&self) {
        reset_peak(self.pid);
        self.monitor_peak.store(0, Ordering::Relaxed);
    }

    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid)
    }

    pub fn killed_for_memory(&self) -> bool {
        self.killed_for_memory.load(Ordering::SeqCst)
    }

    /// Exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends a signal (HUP, TERM...) with bash's builtin `kill`, as the tests do.
    pub fn signal(&self, name: &str) {
        let _ = Command::new("bash").args(["-c", &format!("kill -{name} {} 2>/dev/null", self.pid)]).status();
    }

    /// SIGTERM, then SIGKILL if it has not ended within 5 s.
    pub fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if self.exited().is_some() {
            return;
        }
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A free loopback port (bound, then released: the proxy binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------- config

pub struct Listener {
    pub name: &'static str,
    pub protocol: &'static str,
    pub port: u16,
    pub upstream_port: u16,
    pub extra: Vec<String>,
}

pub enum Pass {
    Hash(String),
    Plain(String),
}

pub struct AccountSpec {
    pub username: String,
    pub pass: Pass,
    pub mailbox: String,
}

/// The YAML for one proxy: listeners, one client-credentials identity at the
/// fake endpoint, accounts, and extra top-level lines.
pub fn write_config(
    dir: &Path,
    listeners: &[Listener],
    ca: &Path,
    authority: &str,
    accounts: &[AccountSpec],
    top_extra: &[String],
) -> PathBuf {
    let mut y = String::from("listeners:\n");
    for l in listeners {
        y.push_str(&format!(
            "  - name: {}\n    protocol: {}\n    bind: 127.0.0.1:{}\n    upstream: localhost:{}\n",
            l.name, l.protocol, l.port, l.upstream_port
        ));
        for e in &l.extra {
            y.push_str(&format!("    {e}\n"));
        }
    }
    y.push_str(&format!(
        "upstream_ca_file: {}\nidentities:\n  bench:\n    authority: {authority}\n    tenant: {}\n    client_id: {}\n    client_secret: {}\naccounts:\n",
        ca.display(),
        testkit::token::TENANT,
        testkit::token::CLIENT_ID,
        testkit::token::CLIENT_SECRET
    ));
    for a in accounts {
        let pass = match &a.pass {
            Pass::Hash(h) => format!("password_hash: \"{h}\""),
            Pass::Plain(p) => format!("password: \"{p}\""),
        };
        y.push_str(&format!("  - {{username: {}, {pass}, mailbox: {}, identity: bench}}\n", a.username, a.mailbox));
    }
    for e in top_extra {
        y.push_str(e);
        y.push('\n');
    }
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, y).unwrap();
    path
}

// ---------------------------------------------------------------- password hashes

/// argon2id PHC strings for `passwords` at the argon2 crate's default cost,
/// the cost `xoauth2-proxy hash-password` uses (checked by [`check_default_cost`]).
/// Hashing is slow on purpose, so results are kept in target/bench-cache
/// (password and hash, both made up for the bench) and reused by later runs.
pub fn default_hashes(passwords: &[String]) -> Vec<String> {
    use argon2::password_hash::PasswordHasher;
    let cache_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-cache");
    let cache_file = cache_dir.join("argon2-default.tsv");
    let mut known: HashMap<String, String> = std::fs::read_to_string(&cache_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, h)| (p.to_string(), h.to_string()))
        .collect();
    let missing: Vec<&String> = passwords.iter().filter(|p| !known.contains_key(*p)).collect();
    if !missing.is_empty() {
        eprintln!("hashing {} passwords at the default argon2 cost (cached for later runs)", missing.len());
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let made: Vec<(String, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = missing
                .chunks(missing.len().div_ceil(workers))
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|p| {
                                let h = argon2::Argon2::default().hash_password(p.as_bytes()).unwrap().to_string();
                                ((*p).clone(), h)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        std::fs::create_dir_all(&cache_dir).unwrap();
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&cache_file).unwrap();
        for (p, h) in made {
            writeln!(f, "{p}\t{h}").unwrap();
            known.insert(p, h);
        }
    }
    passwords.iter().map(|p| known[p].clone()).collect()
}

/// The `$argon2id$v=..$m=..,t=..,p=..` prefix of a PHC string.
pub fn phc_params(phc: &str) -> String {
    phc.split('$').take(4).collect::<Vec<_>>().join("$")
}

/// Asks the proxy binary's `hash-password` for a hash and checks that the
/// bench's hashes carry the same parameters: the memory rows depend on it.
pub fn check_default_cost(sample: &str) -> String {
    let mut child = Command::new(proxy_bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run hash-password");
    child.stdin.take().unwrap().write_all(b"bench\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let theirs = phc_params(String::from_utf8_lossy(&out.stdout).trim());
    let ours = phc_params(sample);
    assert_eq!(theirs, ours, "the bench's argon2 cost differs from `xoauth2-proxy hash-password`");
    ours
}

// ---------------------------------------------------------------- clients

/// 127.0.0.2, 127.0.0.3, ...: all loopback, usable as distinct client addresses.
pub fn source(i: usize, count: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % count) as u8)
}

/// A TCP connection from `from` (any port) to `to`.
pub async fn connect_from(from: Option<Ipv4Addr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = from {
        socket.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))?;
    }
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    Timeout,
    Closed,
}

/// A line reader/writer over any stream, every read with a deadline.
pub struct Lines<S> {
    pub s: S,
    pub buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Lines<S> {
    pub fn new(s: S) -> Self {
        Lines { s, buf: Vec::with_capacity(512) }
    }

    pub async fn send(&mut self, data: impl AsRef<[u8]>) -> bool {
        self.s.write_all(data.as_ref()).await.is_ok()
    }

    /// The next line without CRLF.
    pub async fn line(&mut self, timeout: Duration) -> Result<String, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return Ok(String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string());
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadError::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Lines until one starts with `prefix` (returned), or an error.
    pub async fn until(&mut self, prefix: &str, timeout: Duration) -> Result<String, ReadError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let line = self.line(left).await?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }

    /// Reads and discards exactly `n` bytes (what is buffered first), in big reads.
    pub async fn discard(&mut self, mut n: usize, timeout: Duration) -> Result<(), ReadError> {
        let take = n.min(self.buf.len());
        self.buf.drain(..take);
        n -= take;
        let mut chunk = vec![0u8; 256 * 1024];
        let deadline = tokio::time::Instant::now() + timeout;
        while n > 0 {
            let want = n.min(chunk.len());
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk[..want])).await {
                Err(_) => return Err(ReadError::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ReadError::Closed),
                Ok(Ok(got)) => n -= got,
            }
        }
        Ok(())
    }

    /// Waits until the peer closes; false if it is still open after `timeout`.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// An IMAP quoted string.
pub fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Asks the fake endpoint for a client-credentials token (for direct logins).
pub async fn fetch_token(token: &testkit::TokenServer) -> String {
    let body = format!(
        "grant_type=client_credentials&client_id={}&client_secret={}&scope=x",
        testkit::token::CLIENT_ID,
        testkit::token::CLIENT_SECRET
    );
    let mut s = TcpStream::connect(token.addr()).await.unwrap();
    let request = format!(
        "POST /{}/oauth2/v2.0/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        testkit::token::TENANT,
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    let json = &answer[answer.find('{').unwrap()..];
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    value["access_token"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------- reporting

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A markdown table, printed at the end of a run.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table { header: header.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        println!("  -> {}", cells.join(" | "));
        self.rows.push(cells);
    }

    pub fn print(&self) {
        println!("| {} |", self.header.join(" | "));
        println!("|{}|", self.header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
        for r in &self.rows {
            println!("| {} |", r.join(" | "));
        }
    }
}

/// A line that identifies the run: time, machine load, binary.
pub fn banner(args: &Args, bench: &str) {
    let now = Command::new("date").arg("-u").arg("+%Y-%m-%dT%H:%M:%SZ").output().ok();
    let now = now.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    println!("# {bench} benchmark, {now}, {}, {} cores", load(), num_cpus());
    println!("# proxy binary: {}", proxy_bin().display());
    println!("# command: {}", args.command(bench));
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
