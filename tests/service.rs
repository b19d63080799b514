//! The proxy as a systemd service: what it tells the service manager
//! (READY, RELOADING, STOPPING, STATUS, WATCHDOG over a notify socket, as
//! systemd reads them), `reload` (validate, then SIGHUP; a broken config is
//! never signalled), the pid file, and the open-file limit.
// A test fails by panicking: unwrap and expect are its assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

const PROXY: &str = env!("CARGO_BIN_EXE_xoauth2-proxy");

/// Two loopback listeners (free ports), an app-only identity and `accounts`
/// accounts. No upstream is contacted until a client logs in, and none does.
fn write_config(path: &Path, accounts: usize) {
    let mut text = String::from(
        "listeners:
  - { name: smtp, protocol: smtp, bind: \"127.0.0.1:0\", upstream: \"localhost:1\" }
  - { name: imap, protocol: imap, bind: \"127.0.0.1:0\", upstream: \"localhost:1\" }
identities:
  contoso: { tenant: t, client_id: c, client_secret: s }
accounts:
",
    );
    for i in 0..accounts {
        text.push_str(&format!(
            "  - {{ username: user{i}, password: pw{i}, mailbox: m{i}@contoso.com, identity: contoso }}\n"
        ));
    }
    text.push_str("shutdown_timeout: 1s\n");
    std::fs::write(path, text).unwrap();
}

struct Service {
    child: Child,
    socket: UnixDatagram,
    log: Receiver<String>,
    config: PathBuf,
    pid_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts `run` as systemd would: NOTIFY_SOCKET, and WATCHDOG_USEC when given.
    fn start(watchdog: Option<Duration>) -> Service {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let config = dir.path().join("config.yaml");
        write_config(&config, 1);
        let pid_file = dir.path().join("run/xoauth2-proxy.pid");
        std::fs::create_dir(pid_file.parent().unwrap()).unwrap();
        let mut cmd = Command::new(PROXY);
        cmd.args(["run", "-c"])
            .arg(&config)
            .arg("--pid-file")
            .arg(&pid_file)
            .env("NOTIFY_SOCKET", &socket_path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("XOAUTH2_PROXY_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(period) = watchdog {
            cmd.env("WATCHDOG_USEC", period.as_micros().to_string());
        }
        let mut child = cmd.spawn().unwrap();
        let log = lines(child.stderr.take().unwrap());
        Service { child, socket, log, config, pid_file, _dir: dir }
    }

    /// The next datagram, as `KEY=value` lines.
    fn message(&self) -> Vec<String> {
        let mut buf = vec![0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("no notification within 10 s");
        String::from_utf8(buf[..n].to_vec()).unwrap().lines().map(str::to_string).collect()
    }

    /// The next datagram that changes the service's state (READY, RELOADING,
    /// STOPPING), skipping watchdog pings and status refreshes.
    fn state_change(&self) -> Vec<String> {
        loop {
            let message = self.message();
            if message.iter().any(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(&l.as_str())) {
                return message;
            }
        }
    }

    fn reload(&self, config: &Path) -> Output {
        Command::new(PROXY)
            .args(["reload", "-c"])
            .arg(config)
            .arg("--pid-file")
            .arg(&self.pid_file)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn stop(mut self) -> (std::process::ExitStatus, Vec<String>, Self) {
        signal(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        let log = self.log.try_iter().collect();
        (status, log, self)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("bash").args(["-c", &format!("kill -{name} {pid}")]).status().unwrap();
    assert!(status.success());
}

fn has(message: &[String], line: &str) -> bool {
    message.iter().any(|l| l == line)
}

#[test]
fn ready_reload_and_stop_are_told_to_the_service_manager() {
    let service = Service::start(None);
    let ready = service.state_change();
    assert!(has(&ready, "READY=1"), "{ready:?}");
    assert!(has(&ready, "STATUS=2 listeners, 1 account, 0 warm tokens"), "{ready:?}");
    // READY=1 comes after the pid file (and so after every bind).
    let pid: u32 = std::fs::read_to_string(&service.pid_file).unwrap().trim().parse().unwrap();
    assert_eq!(pid, service.child.id());

    // A broken configuration is reported as `check` reports it, and the
    // proxy is not signalled: the next state change is the good reload's.
    let broken = service.config.with_file_name("broken.yaml");
    std::fs::write(&broken, "listeners:\n  - { name: x, protocol: imap, bind: nowhere, upstream: \"h:1\" }\n").unwrap();
    let out = service.reload(&broken);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.yaml: listeners[0].bind: \"nowhere\" is not an IP address"), "{stderr}");

    write_config(&service.config, 3);
    let out = service.reload(&service.config);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("sent SIGHUP to xoauth2-proxy (pid {pid})")));
    let reloading = service.state_change();
    assert!(has(&reloading, "RELOADING=1"), "{reloading:?}");
    assert!(reloading.iter().any(|l| l.starts_with("MONOTONIC_USEC=")), "systemd 253+ needs it: {reloading:?}");
    let ready = service.state_change();
    assert!(has(&ready, "READY=1"), "{ready:?}");
    assert!(has(&ready, "STATUS=2 listeners, 3 accounts, 0 warm tokens"), "{ready:?}");

    let (status, log, service) = service.stop();
    let stopping = service.state_change();
    assert!(has(&stopping, "STOPPING=1"), "{stopping:?}");
    assert!(status.success(), "{status:?} {log:?}");
    assert!(!service.pid_file.exists(), "the pid file is removed at exit");
    assert_eq!(log.iter().filter(|l| l.contains("SIGHUP: reloaded")).count(), 1, "{log:?}");
}

#[test]
fn the_watchdog_is_pinged_when_systemd_asks_for_it() {
    let service = Service::start(Some(Duration::from_millis(200)));
    assert!(has(&service.state_change(), "READY=1"));
    // Pings come at half the period; three in a row show they keep coming.
    for _ in 0..3 {
        let ping = service.message();
        assert!(has(&ping, "WATCHDOG=1"), "{ping:?}");
    }
}

#[test]
fn reload_refuses_a_process_that_is_not_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    write_config(&config, 1);
    // A stale pid file naming a process that is not xoauth2-proxy.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid_file = dir.path().join("pid");
    std::fs::write(&pid_file, format!("{}\n", sleeper.id())).unwrap();
    let out =
        Command::new(PROXY).args(["reload", "-c"]).arg(&config).arg("--pid-file").arg(&pid_file).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is \"sleep\", not xoauth2-proxy"), "{out:?}");
    assert!(sleeper.try_wait().unwrap().is_none(), "the sleeper was not signalled");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    // Without a process to name, clap refuses before anything is read.
    let out = Command::new(PROXY).args(["reload", "-c"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pid <PID>|--pid-file <FILE>"), "{out:?}");
}

/// Starts `run` under `ulimit -n` settings and returns its log up to "listening".
fn log_under_ulimit(ulimit: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    write_config(&config, 1);
    let mut child = Command::new("bash")
        .args(["-c", &format!("ulimit {ulimit} && exec \"$0\" run -c \"$1\""), PROXY])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("XOAUTH2_PROXY_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(child.stderr.take().unwrap());
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains("listening") && l.contains("listener=imap")) {
        log.push(rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("no start: {log:?}")));
    }
    signal(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
    log
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap();
    assert!(hard >= 4200, "this test needs a hard limit above what 2 x 1000 sessions need ({hard})");
    let log = log_under_ulimit("-Sn 256");
    let starting = log.iter().find(|l| l.contains("xoauth2-proxy starting")).unwrap();
    assert!(starting.contains(&format!("open_file_limit={hard}")), "{starting}");
    assert!(!log.iter().any(|l| l.contains("open-file limit")), "{log:?}");
}

#[test]
fn a_limit_too_low_for_max_connections_is_one_warning() {
    // Two listeners at the default 1000 sessions need over 4000 descriptors.
    let log = log_under_ulimit("-n 1024");
    let warnings: Vec<&String> = log.iter().filter(|l| l.contains("open-file limit")).collect();
    assert_eq!(warnings.len(), 1, "{log:?}");
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(warnings[0].contains("the open-file limit is 1024: room for about 492 sessions"), "{}", warnings[0]);
    assert!(warnings[0].contains("LimitNOFILE="), "{}", warnings[0]);
}

/// The Debian package's /etc/xoauth2-proxy/config.yaml (also the container
/// image's) starts as shipped: no variable, no file, loopback only.
#[test]
fn the_shipped_config_is_safe_to_start() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/debian/config.yaml");
    let no_env: std::collections::HashMap<String, String> = Default::default();
    let config = xoauth2_proxy::config::Config::load_with_env(&path, &no_env).unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.listeners.is_empty());
    for l in &config.listeners {
        assert!(l.bind.ip().is_loopback(), "{} binds {}", l.name, l.bind);
    }
    assert!(config.accounts.is_empty() && config.identities.is_empty(), "no account works until the admin adds one");
    assert_eq!(config.token_store.as_ref().map(|s| s.path.as_path()), Some(Path::new("/var/lib/xoauth2-proxy")));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}
