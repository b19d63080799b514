//! Hostile and bursty load against the release proxy binary (issue 8): every
//! row of the table, measured the way the issue describes it, each
//! scenario selectable by name.
//!
//!     cargo bench --bench hostile                         # every scenario, full durations
//!     cargo bench --bench hostile -- --quick              # every scenario, short durations
//!     cargo bench --bench hostile -- wrong-burst hup-storm
//!     cargo bench --bench hostile -- slow-byte --quick --listener-yaml 'login_deadline: 10s'
//!
//! Scenarios: wrong-burst, valid-burst, cold-burst, hup-storm, slow-byte,
//! slowloris, garbage, guessing, token-outage, early-hup, cancel-auth, fd-limit.
//! Other flags: `--cold-accounts N` (cold-burst: 600 clients over N accounts,
//! default 600), `--rss-cap-mib N`.
//!
//! Each scenario starts its own proxy process (`$XOAUTH2_BENCH_BIN`, else the
//! binary cargo builds for the bench, which is the release profile) with three
//! listeners (IMAP, POP3, SMTP) at their default limits, against fresh testkit
//! fakes in this process. Account passwords are argon2id hashes at the real
//! default cost (the parameters of `xoauth2-proxy hash-password`, checked at
//! start; about 19 MiB per verification), except in fd-limit, where
//! verification is not what is measured. `--listener-yaml LINE` and
//! `--top-yaml LINE` (repeatable) add config keys, so a new setting (say a
//! login deadline) can be tried in a quick run.
//!
//! Memory is the proxy's VmRSS, peaks are VmHWM after resetting it through
//! /proc/<pid>/clear_refs at the start of the burst (and a 20 ms sampler as a
//! second opinion). The proxy is killed if its RSS passes `--rss-cap-mib`
//! (default 6144): the machine is shared.

// A benchmark that cannot measure must stop at once and loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::{FakeUpstream, Fault, Proto, TestPki, TokenServer, UpstreamOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECOND: Duration = Duration::from_secs(1);

struct Opts {
    quick: bool,
    listener_yaml: Vec<String>,
    top_yaml: Vec<String>,
    rss_cap_mib: u64,
}

impl Opts {
    /// The full duration, or the quick one.
    fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

struct Fakes {
    pki: TestPki,
    token: TokenServer,
    imap: FakeUpstream,
    pop3: FakeUpstream,
    smtp: FakeUpstream,
    dir: tempfile::TempDir,
}

impl Fakes {
    async fn start(imap: UpstreamOptions) -> Fakes {
        let pki = TestPki::generate();
        let token = TokenServer::start().await;
        let imap = FakeUpstream::start(imap, &pki, token.validator()).await;
        let pop3 = FakeUpstream::start(UpstreamOptions::new(Proto::Pop3), &pki, token.validator()).await;
        let smtp = FakeUpstream::start(UpstreamOptions::new(Proto::Smtp), &pki, token.validator()).await;
        Fakes { pki, token, imap, pop3, smtp, dir: tempfile::tempdir().unwrap() }
    }

    async fn default() -> Fakes {
        Fakes::start(UpstreamOptions::new(Proto::Imap)).await
    }
}

#[derive(Clone, Copy)]
struct Ports {
    imap: u16,
    pop3: u16,
    smtp: u16,
}

/// Writes the config (three listeners, default limits) and returns it with its ports.
fn configure(f: &Fakes, o: &Opts, accounts: &[AccountSpec]) -> (PathBuf, Ports) {
    let ports = Ports { imap: free_port(), pop3: free_port(), smtp: free_port() };
    let listener = |name, port, upstream: &FakeUpstream| Listener {
        name,
        protocol: name,
        port,
        upstream_port: upstream.addr().port(),
        extra: o.listener_yaml.clone(),
    };
    let listeners = [
        listener("imap", ports.imap, &f.imap),
        listener("pop3", ports.pop3, &f.pop3),
        listener("smtp", ports.smtp, &f.smtp),
    ];
    // warn: the per-failure "authentication failure" lines are counted.
    let mut top = vec!["log: {level: warn}".to_string()];
    top.extend(o.top_yaml.iter().cloned());
    let path = write_config(f.dir.path(), &listeners, &f.pki.ca_path(), &f.token.authority(), accounts, &top);
    (path, ports)
}

const FAILURE_LINE: &str = "authentication failure";

fn launch(o: &Opts) -> Launch {
    Launch {
        nofile: None,
        patterns: vec![FAILURE_LINE.into(), "upstream unavailable".into(), "accept failed".into()],
        rss_cap_mib: o.rss_cap_mib,
    }
}

fn start(f: &Fakes, o: &Opts, accounts: &[AccountSpec]) -> (ProxyProcess, Ports) {
    let (config, ports) = configure(f, o, accounts);
    let mut proxy = ProxyProcess::spawn(&config, &launch(o));
    for port in [ports.imap, ports.pop3, ports.smtp] {
        proxy.wait_listening(port);
    }
    (proxy, ports)
}

/// `user{i}` with password `pw-{i}`, each its own mailbox, hashed at the default cost.
fn hashed_accounts(n: usize) -> Vec<AccountSpec> {
    let passwords: Vec<String> = (0..n).map(password).collect();
    default_hashes(&passwords)
        .into_iter()
        .enumerate()
        .map(|(i, h)| AccountSpec { username: format!("user{i}"), pass: Pass::Hash(h), mailbox: mailbox(i) })
        .collect()
}

fn plain_accounts(n: usize) -> Vec<AccountSpec> {
    (0..n)
        .map(|i| AccountSpec { username: format!("user{i}"), pass: Pass::Plain(password(i)), mailbox: mailbox(i) })
        .collect()
}

fn password(i: usize) -> String {
    format!("pw-{i}")
}

fn mailbox(i: usize) -> String {
    format!("user{i}@contoso.example")
}

// ---------------------------------------------------------------- the client side

/// How one login attempt ended.
enum Login {
    /// Logged in; the session stays open until this is dropped.
    Ok(#[allow(dead_code)] Lines<TcpStream>),
    /// The greeting was not `* OK`: the text, e.g. `* BYE [UNAVAILABLE] ...`.
    Refused(String),
    /// A tagged answer other than OK.
    Answer(String),
    /// No connection, no greeting or no answer in time.
    Failed(String),
}

impl Login {
    fn label(&self) -> String {
        let short = |s: &str| s.chars().take(60).collect::<String>();
        match self {
            Login::Ok(_) => "OK".into(),
            Login::Refused(g) => format!("greeting `{}`", short(g)),
            Login::Answer(a) => format!("`{}`", short(a.trim_start_matches("a "))),
            Login::Failed(e) => e.clone(),
        }
    }
}

async fn imap_login(from: Option<Ipv4Addr>, port: u16, user: &str, pass: &str, patience: Duration) -> Login {
    let tcp = match tokio::time::timeout(patience, connect_from(from, local(port))).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Login::Failed(format!("connect failed: {}", e.kind())),
        Err(_) => return Login::Failed("connect timed out".into()),
    };
    let mut c = Lines::new(tcp);
    match c.line(patience).await {
        Ok(g) if g.starts_with("* OK") => {}
        Ok(g) => return Login::Refused(g),
        Err(e) => return Login::Failed(format!("no greeting ({e:?})")),
    }
    c.send(format!("a LOGIN {user} {}\r\n", quoted(pass))).await;
    match c.until("a ", patience).await {
        Ok(a) if a.starts_with("a OK") => Login::Ok(c),
        Ok(a) => Login::Answer(a),
        Err(e) => Login::Failed(format!("no answer ({e:?})")),
    }
}

/// Counts of outcome labels, printed as `OK 10, ...`.
#[derive(Default)]
struct Tally(BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, label: String) {
        *self.0.entry(label).or_default() += 1;
    }
    fn get(&self, label: &str) -> usize {
        self.0.get(label).copied().unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.0.values().sum()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{v} {k}")).collect();
        write!(f, "{}", if parts.is_empty() { "none".into() } else { parts.join(", ") })
    }
}

/// `n` logins released at the same instant (clients spread over 20 source
/// addresses, so the per-address connection cap is not what is measured);
/// returns the outcomes, the time the last answer took, and the sessions
/// (kept open by the caller until it has measured).
async fn simultaneous(n: usize, port: u16, creds: impl Fn(usize) -> (String, String)) -> (Tally, f64, Vec<Login>) {
    let go = Arc::new(tokio::sync::Barrier::new(n + 1));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (user, pass) = creds(i);
            let go = go.clone();
            tokio::spawn(async move {
                go.wait().await;
                imap_login(Some(source(i, 20)), port, &user, &pass, Duration::from_secs(120)).await
            })
        })
        .collect();
    let started = Instant::now();
    go.wait().await;
    let mut tally = Tally::default();
    let mut held = Vec::new();
    for t in tasks {
        let login = t.await.unwrap();
        tally.add(login.label());
        held.push(login);
    }
    (tally, started.elapsed().as_secs_f64(), held)
}

/// The proxy's RSS, or why there is none.
fn rss_or_gone(proxy: &ProxyProcess) -> String {
    if proxy.killed_for_memory() {
        "n/a".into()
    } else {
        mib(proxy.rss_kib())
    }
}

fn memory_note(proxy: &ProxyProcess, o: &Opts) -> String {
    if proxy.killed_for_memory() {
        format!(" (killed by the bench at {} MiB RSS)", o.rss_cap_mib)
    } else {
        String::new()
    }
}

// ---------------------------------------------------------------- scenarios

struct Report {
    table: Table,
}

impl Report {
    fn row(&mut self, what: &str, measured: String) {
        self.table.row(vec![what.to_string(), measured]);
    }
}

/// 100 `LOGIN nosuch wrong` at once: every one costs a decoy verification.
async fn wrong_burst(o: &Opts, r: &mut Report) {
    let n = 100;
    let after = o.pick(30, 10);
    let f = Fakes::default().await;
    let (proxy, ports) = start(&f, o, &hashed_accounts(1));
    tokio::time::sleep(SECOND).await;
    let idle = proxy.rss_kib();
    println!("wrong-burst: {n} simultaneous `LOGIN nosuch wrong` ({})", load());
    proxy.reset_peak();
    let (tally, secs, held) = simultaneous(n, ports.imap, |_| ("nosuch".into(), "wrong".into())).await;
    let peak = proxy.peak_kib();
    let right_after = proxy.rss_kib();
    drop(held);
    tokio::time::sleep(Duration::from_secs(after)).await;
    let later = rss_or_gone(&proxy);
    r.row(
        &format!("{n} connections send `LOGIN nosuch wrong` at once"),
        format!(
            "RSS idle {}, peak {}, when all answered {}, {after} s later {later}{}; answers in {secs:.1} s: {tally}",
            mib(idle),
            mib(peak),
            mib(right_after),
            memory_note(&proxy, o)
        ),
    );
}

/// `n` first logins of `accounts` valid accounts at once on a fresh proxy.
async fn first_logins(o: &Opts, r: &mut Report, what: &str, n: usize, accounts: usize, after: Option<u64>) {
    let f = Fakes::default().await;
    let (proxy, ports) = start(&f, o, &hashed_accounts(accounts));
    tokio::time::sleep(SECOND).await;
    let idle = proxy.rss_kib();
    let tokens = f.token.requests();
    println!("{what} ({})", load());
    proxy.reset_peak();
    let (tally, secs, held) =
        simultaneous(n, ports.imap, |i| (format!("user{}", i % accounts), password(i % accounts))).await;
    let peak = proxy.peak_kib();
    let tokens = f.token.requests() - tokens;
    drop(held);
    let later = match after {
        Some(s) => {
            tokio::time::sleep(Duration::from_secs(s)).await;
            format!(", {s} s later {}", rss_or_gone(&proxy))
        }
        None => String::new(),
    };
    r.row(
        what,
        format!(
            "RSS idle {}, peak {}{later}{}; answers in {secs:.1} s: {tally}; token requests {tokens}",
            mib(idle),
            mib(peak),
            memory_note(&proxy, o)
        ),
    );
}

/// Logins in a loop on `clients` tasks until `stop`: connect, LOGIN, close,
/// pause. Outcomes go to `tally` (a shared map, so a scenario can swap it per phase).
fn login_loops(
    clients: usize,
    port: u16,
    pause: Duration,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|i| {
            let (stop, tally) = (stop.clone(), tally.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let login =
                        imap_login(None, port, &format!("user{i}"), &password(i), Duration::from_secs(30)).await;
                    tally.lock().unwrap().add(login.label());
                    drop(login);
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect()
}

async fn hup_storm(o: &Opts, r: &mut Report) {
    let hups = o.pick(60, 20);
    let f = Fakes::default().await;
    let (mut proxy, ports) = start(&f, o, &hashed_accounts(10));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let loops = login_loops(10, ports.imap, Duration::ZERO, stop.clone(), tally.clone());
    println!("hup-storm: 10 clients logging in in a loop, then {hups} SIGHUPs 1 s apart ({})", load());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = proxy.rss_kib();
    proxy.reset_peak();
    let mut marks = Vec::new();
    for k in 1..=hups {
        proxy.signal("HUP");
        tokio::time::sleep(SECOND).await;
        if k == 20 || k == hups {
            marks.push(format!("after {k}: {}", mib(proxy.rss_kib())));
        }
    }
    let peak = proxy.peak_kib();
    stop.store(true, Ordering::SeqCst);
    for l in loops {
        let _ = l.await;
    }
    let alive = if proxy.exited().is_some() { "the proxy died" } else { "the proxy is alive" };
    let what = if hups == 20 {
        "20 SIGHUPs under a steady 10-client login loop".to_string()
    } else {
        format!("20 SIGHUPs under a steady 10-client login loop (and {hups})")
    };
    r.row(
        &what,
        format!(
            "RSS before {}, {}; peak {}{}; logins: {}; {alive}",
            mib(before),
            marks.join(", "),
            mib(peak),
            memory_note(&proxy, o),
            tally.lock().unwrap()
        ),
    );
}

/// The pre-login command each protocol's slow client repeats, byte by byte.
fn noop(protocol: &str) -> &'static [u8] {
    match protocol {
        "imap" => b"a NOOP\r\n",
        _ => b"NOOP\r\n",
    }
}

/// One byte of `noop` every `interval` after the greeting; seconds until the
/// proxy closes the connection, or None if it is still open at `cap`.
async fn slow_client(
    from: Option<Ipv4Addr>,
    port: u16,
    protocol: &str,
    interval: Duration,
    cap: Duration,
) -> Option<f64> {
    let started = Instant::now();
    let tcp = connect_from(from, local(port)).await.ok()?;
    let (mut rd, mut wr) = tcp.into_split();
    let bytes = noop(protocol);
    let writer = tokio::spawn(async move {
        for i in 0.. {
            if wr.write_all(&bytes[i % bytes.len()..][..1]).await.is_err() {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    });
    let reader = async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    let closed = tokio::time::timeout(cap, reader).await.is_ok();
    writer.abort();
    closed.then(|| started.elapsed().as_secs_f64())
}

async fn slow_byte(o: &Opts, r: &mut Report) {
    let cap = Duration::from_secs(o.pick(180, 30));
    let f = Fakes::default().await;
    let (_proxy, ports) = start(&f, o, &hashed_accounts(1));
    println!("slow-byte: one byte every 5 s before login, on each protocol at once, for up to {cap:?} ({})", load());
    let tasks: Vec<_> = [("imap", ports.imap), ("pop3", ports.pop3), ("smtp", ports.smtp)]
        .into_iter()
        .map(|(p, port)| {
            tokio::spawn(async move { (p, slow_client(None, port, p, Duration::from_secs(5), cap).await) })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        let (p, closed) = t.await.unwrap();
        results.push(match closed {
            Some(s) => format!("{p}: closed by the proxy after {s:.0} s"),
            None => format!("{p}: still connected after {} s", cap.as_secs()),
        });
    }
    r.row("one client sending one byte every 5 s before logging in", results.join("; "));
}

async fn slowloris(o: &Opts, r: &mut Report) {
    let duration = Duration::from_secs(o.pick(180, 40));
    let (attackers, addresses) = (1000, 20);
    let f = Fakes::default().await;
    let accounts = hashed_accounts(1);
    let (proxy, ports) = start(&f, o, &accounts);
    // The legitimate client's password is verified once here, so the probes
    // below measure admission, not argon2.
    drop(imap_login(None, ports.imap, "user0", &password(0), Duration::from_secs(10)).await);
    println!(
        "slowloris: {attackers} clients from {addresses} addresses, each one byte every 5 s (200 B/s in all), for {duration:?}; a legitimate client tries every second ({})",
        load()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (holding, max_holding, reconnects, refused) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut tasks = Vec::new();
    for i in 0..attackers {
        let (stop, holding, max_holding, reconnects, refused) =
            (stop.clone(), holding.clone(), max_holding.clone(), reconnects.clone(), refused.clone());
        let from = source(i, addresses);
        // Staggered so that the bytes spread evenly: 1000 clients x 1 byte / 5 s.
        let offset = Duration::from_millis((i as u64 * 5000) / attackers as u64);
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            while !stop.load(Ordering::SeqCst) {
                let Ok(tcp) = connect_from(Some(from), local(ports.imap)).await else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(SECOND).await;
                    continue;
                };
                let mut c = Lines::new(tcp);
                match c.line(Duration::from_secs(10)).await {
                    Ok(g) if g.starts_with("* OK") => {}
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(SECOND).await;
                        continue;
                    }
                }
                if !first {
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
                first = false;
                let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                max_holding.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(offset).await;
                let bytes = noop("imap");
                let mut k = 0;
                // Hold: a byte every 5 s; a closed connection is reopened.
                loop {
                    if stop.load(Ordering::SeqCst) || !c.send(&bytes[k % bytes.len()..][..1]).await {
                        break;
                    }
                    k += 1;
                    let mut buf = [0u8; 512];
                    match tokio::time::timeout(Duration::from_secs(5), c.s.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        _ => {}
                    }
                }
                holding.fetch_sub(1, Ordering::SeqCst);
            }
        }));
    }
    // Probe the steady state: once the attackers hold all they can get
    // (their count stops growing for 2 s), or after 20 s.
    let ramp = Instant::now();
    let (mut last, mut still_since) = (0, Instant::now());
    while ramp.elapsed() < Duration::from_secs(20) && still_since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = holding.load(Ordering::SeqCst);
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
    }
    let ramp_secs = ramp.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut probes = Tally::default();
    let (mut streak, mut longest, mut refused_secs) = (None::<Instant>, 0.0f64, 0usize);
    while started.elapsed() < duration {
        let tick = Instant::now();
        let login = imap_login(None, ports.imap, "user0", &password(0), Duration::from_secs(5)).await;
        let ok = matches!(login, Login::Ok(_));
        probes.add(login.label());
        drop(login);
        if ok {
            if let Some(s) = streak.take() {
                longest = longest.max(s.elapsed().as_secs_f64());
            }
        } else {
            refused_secs += 1;
            streak.get_or_insert(tick);
        }
        tokio::time::sleep(SECOND.saturating_sub(tick.elapsed())).await;
    }
    if let Some(s) = streak {
        longest = longest.max(s.elapsed().as_secs_f64());
    }
    stop.store(true, Ordering::SeqCst);
    let held_at_end = holding.load(Ordering::SeqCst);
    for t in tasks {
        t.abort();
    }
    r.row(
        "1,000 such clients from 20 addresses at 200 B/s",
        format!(
            "legitimate client not logged in on {refused_secs} of {} probes (1/s) over {} s, longest run without a login {longest:.0} s; probes: {probes}; attackers (in place after {ramp_secs:.0} s) held up to {} connections ({held_at_end} at the end), reconnected {} times, turned away {} times; proxy RSS {}",
            probes.total(),
            duration.as_secs(),
            max_holding.load(Ordering::SeqCst),
            reconnects.load(Ordering::SeqCst),
            refused.load(Ordering::SeqCst),
            mib(proxy.rss_kib())
        ),
    );
}

/// 64 KiB of random bytes (seeded: the same bytes every run) after the
/// greeting; the reply lines counted until the proxy closes or `cap`.
async fn garbage_client(port: u16, seed: u64, cap: Duration) -> (usize, Option<f64>) {
    use rand::{Rng, SeedableRng};
    let mut bytes = vec![0u8; 64 * 1024];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    let tcp = connect_from(None, local(port)).await.unwrap();
    let mut c = Lines::new(tcp);
    c.line(Duration::from_secs(10)).await.unwrap();
    let (mut rd, mut wr) = c.s.into_split();
    let started = Instant::now();
    // Written on its own task: a proxy that stops reading must not stall the count.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let mut lines = 0;
    let mut buf = vec![0u8; 16 * 1024];
    let closed = tokio::time::timeout(cap, async {
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
        }
    })
    .await
    .is_ok();
    writer.abort();
    (lines, closed.then(|| started.elapsed().as_secs_f64()))
}

async fn garbage(o: &Opts, r: &mut Report) {
    let cap = Duration::from_secs(o.pick(90, 15));
    let f = Fakes::default().await;
    let (_proxy, ports) = start(&f, o, &hashed_accounts(1));
    println!("garbage: 64 KiB of random bytes before login on each protocol, watched for up to {cap:?} ({})", load());
    let tasks: Vec<_> = [("imap", ports.imap, 1), ("pop3", ports.pop3, 2), ("smtp", ports.smtp, 3)]
        .into_iter()
        .map(|(p, port, seed)| tokio::spawn(async move { (p, garbage_client(port, seed, cap).await) }))
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        let (p, (lines, closed)) = t.await.unwrap();
        results.push(match closed {
            Some(s) => format!("{p}: {lines} reply lines, closed after {s:.1} s"),
            None => format!("{p}: {lines} reply lines, still open after {} s", cap.as_secs()),
        });
    }
    r.row("64 KiB of random bytes before login", results.join("; "));
}

async fn guessing(o: &Opts, r: &mut Report) {
    let duration = Duration::from_secs(o.pick(60, 20));
    let parallel = 50;
    let f = Fakes::default().await;
    let (proxy, ports) = start(&f, o, &hashed_accounts(1));
    println!("guessing: {parallel} connections from 127.0.0.1 guessing user0's password for {duration:?} ({})", load());
    let end = tokio::time::Instant::now() + duration;
    let verified_before = proxy.log.count(FAILURE_LINE);
    let answers = Arc::new(Mutex::new(Tally::default()));
    let guesses = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..parallel)
        .map(|i| {
            let (answers, guesses) = (answers.clone(), guesses.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while tokio::time::Instant::now() < end {
                    let Ok(tcp) = connect_from(Some(Ipv4Addr::LOCALHOST), local(ports.imap)).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let mut c = Lines::new(tcp);
                    match c.line(Duration::from_secs(10)).await {
                        Ok(g) if g.starts_with("* OK") => {}
                        Ok(g) => {
                            answers
                                .lock()
                                .unwrap()
                                .add(format!("greeting `{}`", g.chars().take(50).collect::<String>()));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        Err(_) => continue,
                    }
                    // Guess on this connection until the proxy closes it.
                    loop {
                        n += 1;
                        guesses.fetch_add(1, Ordering::Relaxed);
                        c.send(format!("g LOGIN user0 {}\r\n", quoted(&format!("guess-{i}-{n}")))).await;
                        let left = end.saturating_duration_since(tokio::time::Instant::now());
                        match c.until("g ", left).await {
                            Ok(a) => {
                                let a = a.trim_start_matches("g ").chars().take(40).collect::<String>();
                                answers.lock().unwrap().add(format!("`{a}`"));
                            }
                            Err(_) => break,
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    // A failure is logged right after its verification; give the last ones a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let verified = proxy.log.count(FAILURE_LINE) - verified_before;
    let answers = answers.lock().unwrap();
    let minutes = duration.as_secs_f64() / 60.0;
    let answered: usize = answers.0.iter().filter(|(k, _)| k.contains("NO")).map(|(_, v)| v).sum();
    r.row(
        "50 parallel connections from one address guessing passwords",
        format!(
            "{:.0} guesses/min reached verification (proxy's `authentication failure` lines), {:.0}/min answered NO; {} guesses sent over {} s; answers: {answers}",
            verified as f64 / minutes,
            answered as f64 / minutes,
            guesses.load(Ordering::Relaxed),
            duration.as_secs()
        ),
    );
}

async fn token_outage(o: &Opts, r: &mut Report) {
    let outage = Duration::from_secs(20);
    let pause = Duration::from_millis(200);
    let f = Fakes::default().await;
    f.token.set_lifetime(Duration::from_secs(20));
    let (_proxy, ports) = start(&f, o, &hashed_accounts(10));
    let stop = Arc::new(AtomicBool::new(false));
    let warm = Arc::new(Mutex::new(Tally::default()));
    let loops = login_loops(10, ports.imap, pause, stop.clone(), warm.clone());
    println!(
        "token-outage: 20 s tokens, 10 clients logging in (each pausing {pause:?} between logins), endpoint answering 503 for {outage:?} ({})",
        load()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Swap the tally at each phase change so each phase counts its own answers.
    let during = std::mem::take(&mut *warm.lock().unwrap());
    drop(during);
    let requests = f.token.requests();
    f.token.set_fault(Some(Fault::Status(503)));
    tokio::time::sleep(outage).await;
    let in_outage = f.token.requests() - requests;
    f.token.set_fault(None);
    let during = std::mem::take(&mut *warm.lock().unwrap());
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    for l in loops {
        let _ = l.await;
    }
    let recovered = std::mem::take(&mut *warm.lock().unwrap());
    r.row(
        "token endpoint down for 20 s with 20 s tokens, 10 clients logging in",
        format!(
            "{in_outage} token requests in those 20 s; logins during the outage: {during}; in the 5 s after: {recovered}"
        ),
    );
}

async fn early_hup(o: &Opts, r: &mut Report) {
    let tries = o.pick(19, 6);
    let f = Fakes::default().await;
    let accounts = hashed_accounts(1);
    let (config, ports) = configure(&f, o, &accounts);
    println!("early-hup: SIGHUP 0-80 ms after starting the proxy, {tries} tries ({})", load());
    let mut died = Vec::new();
    let mut sent_at = Vec::new();
    for i in 0..tries {
        let delay = Duration::from_millis(80 * i as u64 / (tries as u64 - 1).max(1));
        let mut proxy = ProxyProcess::spawn(&config, &launch(o));
        std::thread::sleep(delay.saturating_sub(proxy.started.elapsed()));
        proxy.signal("HUP");
        // `kill` runs in a child bash: the signal lands a few ms after `delay`.
        sent_at.push(proxy.started.elapsed().as_millis());
        std::thread::sleep(Duration::from_millis(1500));
        match proxy.exited() {
            Some(status) => died.push(format!("{}ms: {status}", sent_at[i])),
            None => assert!(listening(ports.imap), "alive but not listening after a SIGHUP"),
        }
        proxy.stop();
    }
    r.row(
        "SIGHUP within 80 ms of start",
        format!(
            "the process died in {} of {tries} tries (SIGHUP sent {}-{} ms after spawn){}",
            died.len(),
            sent_at.iter().min().unwrap_or(&0),
            sent_at.iter().max().unwrap_or(&0),
            if died.is_empty() { String::new() } else { format!(": {}", died.join(", ")) }
        ),
    );
}

async fn cancel_auth(o: &Opts, r: &mut Report) {
    let tries = o.pick(5, 2);
    // (a) During the upstream XOAUTH2 exchange: the upstream answers after 1 s.
    let mut slow = UpstreamOptions::new(Proto::Imap);
    slow.auth_delay = SECOND;
    let f = Fakes::start(slow).await;
    let (proxy, ports) = start(&f, o, &hashed_accounts(1));
    println!("cancel-auth: clients that hang up 0.3 s into a login, {tries} tries each way ({})", load());
    // Warm-up: token cached, password verified, so the login reaches the upstream at once.
    drop(imap_login(None, ports.imap, "user0", &password(0), Duration::from_secs(10)).await);
    let (logins, abandoned) = (f.imap.logins().len(), f.imap.abandoned_auths());
    for _ in 0..tries {
        hang_up_during_login(ports.imap).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (completed, cut) = (f.imap.logins().len() - logins, f.imap.abandoned_auths() - abandoned);
    drop(proxy);
    r.row(
        "a client that disconnects in the middle of AUTH (upstream answers XOAUTH2 after 1 s, client gone at 0.3 s)",
        format!("the proxy completed the upstream login for {completed} of {tries} gone clients (hung up on the upstream in {cut})"),
    );

    // (b) During the token request: a fresh proxy (cold token cache) each
    // time, the endpoint answering after 1 s.
    let f = Fakes::default().await;
    f.token.set_fault(Some(Fault::Delay(SECOND)));
    let accounts = hashed_accounts(1);
    let mut completed = 0;
    for _ in 0..tries {
        let (proxy, ports) = start(&f, o, &accounts);
        let before = f.imap.logins().len();
        hang_up_during_login(ports.imap).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        completed += f.imap.logins().len() - before;
        drop(proxy);
    }
    r.row(
        "a client that disconnects while the proxy waits for its token (endpoint answers after 1 s, client gone at 0.3 s)",
        format!("the proxy completed the upstream login for {completed} of {tries} gone clients"),
    );
}

async fn hang_up_during_login(port: u16) {
    let tcp = connect_from(None, local(port)).await.unwrap();
    let mut c = Lines::new(tcp);
    c.line(Duration::from_secs(10)).await.unwrap();
    c.send(format!("a LOGIN user0 {}\r\n", quoted(&password(0)))).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
}

async fn fd_limit(o: &Opts, r: &mut Report) {
    let (sessions, limit, lanes) = (600, 1024, 20);
    let f = Fakes::default().await;
    let (config, ports) = configure(&f, o, &plain_accounts(sessions));
    let mut launch = launch(o);
    launch.nofile = Some(limit);
    let mut proxy = ProxyProcess::spawn(&config, &launch);
    proxy.wait_listening(ports.imap);
    println!(
        "fd-limit: proxy with a soft descriptor limit of {limit}, {sessions} IMAP sessions opened and held ({})",
        load()
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    let held = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..lanes)
        .map(|lane| {
            let (tally, held) = (tally.clone(), held.clone());
            tokio::spawn(async move {
                for i in (lane..sessions).step_by(lanes) {
                    let login = imap_login(
                        Some(source(lane, 20)),
                        ports.imap,
                        &format!("user{i}"),
                        &password(i),
                        Duration::from_secs(10),
                    )
                    .await;
                    tally.lock().unwrap().add(login.label());
                    held.lock().unwrap().push(login);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let fds = fd_count(proxy.pid);
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let served = tally.get("OK");
    r.row(
        "soft descriptor limit 1024 (systemd's default), 600 sessions",
        format!(
            "{served} served, {} refused; answers: {tally}; proxy log: {} `upstream unavailable`, {} `accept failed` lines; proxy holds {fds} descriptors",
            tally.total() - served,
            proxy.log.count("upstream unavailable"),
            proxy.log.count("accept failed")
        ),
    );
    drop(held);
}

const SCENARIOS: &[&str] = &[
    "wrong-burst",
    "valid-burst",
    "cold-burst",
    "hup-storm",
    "slow-byte",
    "slowloris",
    "garbage",
    "guessing",
    "token-outage",
    "early-hup",
    "cancel-auth",
    "fd-limit",
];

fn main() {
    let args = Args::parse();
    for n in &args.names {
        assert!(n == "all" || SCENARIOS.contains(&n.as_str()), "unknown scenario {n}; one of: {}", SCENARIOS.join(" "));
    }
    let o = Opts {
        quick: args.switch("quick"),
        listener_yaml: args.all("listener-yaml"),
        top_yaml: args.all("top-yaml"),
        rss_cap_mib: args.num("rss-cap-mib", 6144),
    };
    banner(&args, "hostile");
    let sample = default_hashes(&[password(0)]).remove(0);
    println!("# argon2 cost: {} (same as `xoauth2-proxy hash-password`)", check_default_cost(&sample));
    // 1,000 attackers and 600 held sessions need descriptors here too.
    let limit = soft_nofile();
    assert!(limit >= 4096, "the descriptor limit is {limit}: raise it (`ulimit -n 20000`) before running this bench");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut r = Report { table: Table::new(&["what was done (issue 8)", "measured"]) };
        let started = Instant::now();
        if args.wants("wrong-burst") {
            wrong_burst(&o, &mut r).await;
        }
        if args.wants("valid-burst") {
            for n in [10, 40] {
                first_logins(&o, &mut r, &format!("{n} simultaneous first logins of valid accounts"), n, n, None).await;
            }
        }
        if args.wants("cold-burst") {
            let after = o.pick(30, 10);
            first_logins(
                &o,
                &mut r,
                "600 clients arriving at once on a cold cache (600 accounts)",
                600,
                600,
                Some(after),
            )
            .await;
        }
        if args.wants("hup-storm") {
            hup_storm(&o, &mut r).await;
        }
        if args.wants("slow-byte") {
            slow_byte(&o, &mut r).await;
        }
        if args.wants("slowloris") {
            slowloris(&o, &mut r).await;
        }
        if args.wants("garbage") {
            garbage(&o, &mut r).await;
        }
        if args.wants("guessing") {
            guessing(&o, &mut r).await;
        }
        if args.wants("token-outage") {
            token_outage(&o, &mut r).await;
        }
        if args.wants("early-hup") {
            early_hup(&o, &mut r).await;
        }
        if args.wants("cancel-auth") {
            cancel_auth(&o, &mut r).await;
        }
        if args.wants("fd-limit") {
            fd_limit(&o, &mut r).await;
        }
        println!();
        println!(
            "{} mode, {:.0} s, {}, {} cores; command: {}",
            if o.quick { "quick" } else { "full" },
            started.elapsed().as_secs_f64(),
            load(),
            num_cpus(),
            args.command("hostile")
        );
        r.table.print();
    });
}
