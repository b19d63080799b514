//! Shared test scaffolding: the proxy in-process on 127.0.0.1:0 between a
//! fake token endpoint and fake upstreams, and a line-oriented test client.
#![allow(dead_code)]

pub mod redis;

use argon2::password_hash::PasswordHasher;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use testkit::{FakeUpstream, Proto, TestPki, TokenServer, UpstreamOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use xoauth2_proxy::config::Config;
use xoauth2_proxy::server::Proxy;

pub const PRINTER_PASSWORD: &str = "s3cret pass";
pub const APP_PASSWORD: &str = "app-pass";
pub const MAILBOX: &str = "scanner@contoso.example";
pub const SMTP_USER: &str = "sender@contoso.example";
pub const SHARED_MAILBOX: &str = "shared@contoso.example";

/// An argon2id hash with the smallest cost, so tests spend no time hashing.
pub fn cheap_hash(password: &str) -> String {
    let params = argon2::Params::new(8, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    argon.hash_password(password.as_bytes()).unwrap().to_string()
}

pub struct Options {
    pub imap: UpstreamOptions,
    pub pop3: UpstreamOptions,
    pub smtp: UpstreamOptions,
    /// Extra YAML keys for every listener, e.g. `idle_timeout: 1s`.
    pub listener_extra: Vec<String>,
    /// How the identity authenticates (YAML under the identity), replacing
    /// the client secret; `{dir}` stands for the harness's temporary directory.
    pub identity_auth: Vec<String>,
    /// Extra YAML keys for the identity, e.g. `token_timeout: 1s`.
    pub identity_extra: Vec<String>,
    /// Extra top-level YAML lines, e.g. `token_store: ...`; `{dir}` as above.
    pub top_extra: Vec<String>,
    /// Replace a protocol's upstream address (e.g. a closed port).
    pub upstream_override: HashMap<&'static str, String>,
    /// Point `upstream_ca_file` at a CA that did not sign the upstreams.
    pub untrusted_upstream: bool,
    /// The identity's tenant and authority instead of the fake endpoint's.
    pub tenant: Option<String>,
    pub authority: Option<String>,
    pub shutdown_timeout: &'static str,
    /// Changes to the loaded config before the proxy starts (for what a
    /// config file cannot express in a test, such as a non-loopback bind).
    pub tweak: Option<fn(&mut Config)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            imap: UpstreamOptions::new(Proto::Imap),
            pop3: UpstreamOptions::new(Proto::Pop3),
            smtp: UpstreamOptions::new(Proto::Smtp),
            listener_extra: Vec::new(),
            identity_auth: vec!["client_secret: ${TEST_CLIENT_SECRET}".into()],
            identity_extra: vec!["token_timeout: 2s".into()],
            top_extra: Vec::new(),
            upstream_override: HashMap::new(),
            untrusted_upstream: false,
            tenant: None,
            authority: None,
            shutdown_timeout: "5s",
            tweak: None,
        }
    }
}

/// Upstreams that behave like mailboxes after login (instead of echoing), so
/// what `check --online` sends after authenticating gets a real answer.
pub fn mailbox_upstreams(options: Options) -> Options {
    let mailbox = Arc::new(testkit::Mailbox::new());
    let with = |proto| UpstreamOptions {
        after_auth: testkit::AfterAuth::Mailbox(mailbox.clone()),
        ..UpstreamOptions::new(proto)
    };
    Options { imap: with(Proto::Imap), pop3: with(Proto::Pop3), smtp: with(Proto::Smtp), ..options }
}

pub struct Harness {
    pub pki: TestPki,
    pub other_pki: TestPki,
    /// The certificate local clients see (`{local_cert}`, `{local_key}`).
    pub local_pki: TestPki,
    pub token: TokenServer,
    pub imap: FakeUpstream,
    pub pop3: FakeUpstream,
    pub smtp: FakeUpstream,
    pub config_text: String,
    pub config_path: std::path::PathBuf,
    addrs: HashMap<String, SocketAddr>,
    /// The admin listener, when the config has `admin:` (e.g. in `top_extra`).
    pub admin: Option<SocketAddr>,
    /// Applies a changed config to the running proxy, as SIGHUP does.
    pub reloader: xoauth2_proxy::server::Reloader,
    /// The environment `${VAR}`s in the config expand from.
    pub env: HashMap<String, String>,
    shutdown: CancellationToken,
    proxy: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(Options::default()).await
    }

    pub async fn with(options: Options) -> Self {
        let pki = TestPki::generate();
        let other_pki = TestPki::generate();
        let local_pki = TestPki::generate();
        let token = TokenServer::start().await;
        let imap = FakeUpstream::start(options.imap.clone(), &pki, token.validator()).await;
        let pop3 = FakeUpstream::start(options.pop3.clone(), &pki, token.validator()).await;
        let smtp = FakeUpstream::start(options.smtp.clone(), &pki, token.validator()).await;
        let upstream = |name: &'static str, fake: &FakeUpstream| {
            options.upstream_override.get(name).cloned().unwrap_or_else(|| format!("localhost:{}", fake.addr().port()))
        };
        let tls_mode = |o: &UpstreamOptions| match o.tls {
            testkit::UpstreamTls::Implicit => "implicit",
            testkit::UpstreamTls::Starttls => "starttls",
        };
        let dir = tempfile::tempdir().unwrap();
        let fill = |line: &String| {
            line.replace("{dir}", &dir.path().display().to_string())
                .replace("{local_cert}", &local_pki.cert_path().display().to_string())
                .replace("{local_key}", &local_pki.key_path().display().to_string())
        };
        let extra: String = options.listener_extra.iter().map(|l| format!("    {}\n", fill(l))).collect();
        let identity_extra: String =
            options.identity_auth.iter().chain(&options.identity_extra).map(|l| format!("    {}\n", fill(l))).collect();
        let top_extra: String = options.top_extra.iter().map(|l| format!("{}\n", fill(l))).collect();
        let ca = if options.untrusted_upstream { other_pki.ca_path() } else { pki.ca_path() };
        let config_text = format!(
            r#"
listeners:
  - name: imap
    protocol: imap
    bind: 127.0.0.1:0
    upstream: {imap_up}
    upstream_tls: {imap_tls}
{extra}  - name: pop3
    protocol: pop3
    bind: 127.0.0.1:0
    upstream: {pop3_up}
    upstream_tls: {pop3_tls}
{extra}  - name: smtp
    protocol: smtp
    bind: 127.0.0.1:0
    upstream: {smtp_up}
    upstream_tls: {smtp_tls}
{extra}upstream_ca_file: {ca}
identities:
  contoso:
    authority: {authority}
    tenant: {tenant}
    client_id: {client_id}
{identity_extra}accounts:
  - username: printer
    password_hash: "{printer_hash}"
    mailbox: {MAILBOX}
    smtp_user: {SMTP_USER}
    identity: contoso
  - username: app
    password: {APP_PASSWORD}
    mailbox: {SHARED_MAILBOX}
    identity: contoso
shutdown_timeout: {shutdown}
log: {{ level: debug }}
{top_extra}"#,
            imap_up = upstream("imap", &imap),
            pop3_up = upstream("pop3", &pop3),
            smtp_up = upstream("smtp", &smtp),
            imap_tls = tls_mode(&options.imap),
            pop3_tls = tls_mode(&options.pop3),
            smtp_tls = tls_mode(&options.smtp),
            ca = ca.display(),
            authority = options.authority.clone().unwrap_or_else(|| token.authority()),
            tenant = options.tenant.as_deref().unwrap_or(testkit::token::TENANT),
            client_id = testkit::token::CLIENT_ID,
            printer_hash = cheap_hash(PRINTER_PASSWORD),
            shutdown = options.shutdown_timeout,
        );
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, &config_text).unwrap();
        let env: HashMap<String, String> =
            [("TEST_CLIENT_SECRET".to_string(), testkit::token::CLIENT_SECRET.to_string())].into_iter().collect();
        let mut config = Config::load_with_env(&path, &env).unwrap_or_else(|e| panic!("{e}\n{config_text}"));
        if let Some(tweak) = options.tweak {
            tweak(&mut config);
        }
        let proxy = Proxy::bind(&config).await.unwrap();
        let addrs = proxy.local_addrs().into_iter().collect();
        let admin = proxy.admin_addr();
        let reloader = proxy.reloader();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move { proxy.run(stop.cancelled_owned()).await });
        Harness {
            pki,
            other_pki,
            local_pki,
            token,
            imap,
            pop3,
            smtp,
            config_text,
            config_path: path,
            addrs,
            admin,
            reloader,
            env,
            shutdown,
            proxy: Some(task),
            _dir: dir,
        }
    }

    /// The harness's temporary directory (config, token store).
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Runs the real binary with this harness's config and environment.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_xoauth2-proxy"));
        cmd.args(args)
            .arg("-c")
            .arg(&self.config_path)
            .env("TEST_CLIENT_SECRET", testkit::token::CLIENT_SECRET)
            .env_remove("XOAUTH2_PROXY_LOG")
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// Runs the binary to completion without blocking the test's runtime,
    /// which also serves the fakes the binary talks to.
    pub async fn output(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::from(self.command(args)).output().await.unwrap()
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    /// Writes `text` as the config and applies it as SIGHUP would (the same
    /// validation, preflight and reload); afterwards `addr` answers with the
    /// listeners' addresses now. The error is the one line the log would hold.
    pub async fn reload(&mut self, text: &str) -> Result<String, String> {
        std::fs::write(&self.config_path, text).unwrap();
        let config = Config::load_with_env(&self.config_path, &self.env)
            .and_then(|c| xoauth2_proxy::preflight::check(&c).map(|()| c))
            .map_err(|e| e.to_string().replace('\n', "; "))?;
        let done = self.reloader.reload(config).await.map_err(|e| e.to_string())?;
        self.addrs = self.reloader.local_addrs().into_iter().collect();
        self.admin = self.reloader.admin_addr();
        Ok(done)
    }

    pub async fn connect(&self, listener: &str) -> TestClient<TcpStream> {
        TestClient::new(TcpStream::connect(self.addr(listener)).await.unwrap())
    }

    /// One login on a new connection to `listener` (SMTP AUTH PLAIN after
    /// EHLO, IMAP LOGIN with a quoted password, POP3 USER/PASS, by the
    /// listener name's start); returns the answer to the login.
    pub async fn login_answer(&self, listener: &str, user: &str, pass: &str) -> String {
        let mut c = self.connect(listener).await;
        c.line().await;
        // By the name's start: a listener a test adds (smtp2) speaks its protocol.
        match listener {
            l if l.starts_with("smtp") => {
                c.send(format!("EHLO x\r\nAUTH PLAIN {}\r\n", plain(user, pass))).await;
                c.until("250 ").await;
            }
            l if l.starts_with("imap") => {
                let quoted = pass.replace('\\', "\\\\").replace('"', "\\\"");
                c.send(format!("a LOGIN {user} \"{quoted}\"\r\n")).await;
            }
            _ => {
                c.send(format!("USER {user}\r\nPASS {pass}\r\n")).await;
                c.expect("+OK").await;
            }
        }
        c.line().await
    }

    /// A TLS connection (implicit TLS) trusting the local certificate.
    pub async fn connect_tls(&self, listener: &str) -> TestClient<TlsStream> {
        let tcp = TcpStream::connect(self.addr(listener)).await.unwrap();
        TestClient::new(tls_handshake(&self.local_pki, tcp).await.expect("TLS handshake"))
    }

    /// Starts the graceful shutdown and returns the proxy task.
    pub fn shutdown(&mut self) -> JoinHandle<()> {
        self.shutdown.cancel();
        self.proxy.take().unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.proxy.take() {
            task.abort();
        }
    }
}

/// Reads and writes a protocol transcript, failing the test on a stall.
pub struct TestClient<S> {
    pub stream: S,
    buf: Vec<u8>,
    /// How long one read may take before the test fails.
    step: Duration,
}

pub const STEP: Duration = Duration::from_secs(10);

impl<S: AsyncRead + AsyncWrite + Unpin> TestClient<S> {
    pub fn new(stream: S) -> Self {
        TestClient { stream, buf: Vec::new(), step: STEP }
    }

    /// Waits up to `step` per read (for tests that expect long silences).
    pub fn patience(mut self, step: Duration) -> Self {
        self.step = step;
        self
    }

    pub async fn send(&mut self, data: impl AsRef<[u8]>) {
        tokio::time::timeout(self.step, self.stream.write_all(data.as_ref())).await.expect("write timed out").unwrap();
    }

    /// The next line without its CRLF; panics on EOF or a stall.
    pub async fn line(&mut self) -> String {
        self.try_line().await.expect("connection closed while a line was expected")
    }

    /// The next line, or None at EOF.
    pub async fn try_line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                let line = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string();
                return Some(line);
            }
            self.buf.reserve(65536);
            let n = tokio::time::timeout(self.step, self.stream.read_buf(&mut self.buf))
                .await
                .expect("read timed out")
                .ok()?;
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads one line and checks its beginning.
    pub async fn expect(&mut self, prefix: &str) -> String {
        let line = self.line().await;
        assert!(line.starts_with(prefix), "expected a line starting with {prefix:?}, got {line:?}");
        line
    }

    /// Reads lines until one starts with `prefix`; returns all of them.
    pub async fn until(&mut self, prefix: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = line.starts_with(prefix);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let take = self.buf.len().min(n);
        out.extend(self.buf.drain(..take));
        let mut rest = vec![0u8; n - out.len()];
        tokio::time::timeout(self.step * 6, self.stream.read_exact(&mut rest)).await.expect("read timed out").unwrap();
        out.extend_from_slice(&rest);
        out
    }

    /// True once the peer has closed the connection (EOF or reset).
    pub async fn closed(&mut self) -> bool {
        loop {
            self.buf.reserve(4096);
            match tokio::time::timeout(self.step, self.stream.read_buf(&mut self.buf))
                .await
                .expect("peer did not close")
            {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    }
}

pub type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn tls_handshake(trusted: &TestPki, tcp: TcpStream) -> std::io::Result<TlsStream> {
    let connector = tokio_rustls::TlsConnector::from(trusted.client_config());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(STEP, connector.connect(name, tcp)).await.expect("TLS handshake timed out")
}

impl TestClient<TcpStream> {
    /// After the server's go-ahead for STARTTLS: nothing may be buffered
    /// (the server sent nothing more), then the handshake.
    pub async fn starttls(self, trusted: &TestPki) -> TestClient<TlsStream> {
        assert!(self.buf.is_empty(), "bytes after the STARTTLS go-ahead: {:?}", String::from_utf8_lossy(&self.buf));
        TestClient::new(tls_handshake(trusted, self.stream).await.expect("TLS handshake"))
    }
}

/// Sends `signal` (TERM, INT, HUP) to a process with bash's builtin `kill`, so
/// tests need nothing beyond the shell CI already runs.
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("bash").args(["-c", &format!("kill -{signal} {pid}")]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// An `AUTH PLAIN` / `AUTHENTICATE PLAIN` initial response.
pub fn plain(user: &str, pass: &str) -> String {
    b64(format!("\0{user}\0{pass}").as_bytes())
}

/// A closed port on loopback: bound, then released.
pub async fn closed_port() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr.to_string()
}

pub type Shared<T> = Arc<T>;

/// The next line of a `run` child's log (stderr) containing `needle`.
pub async fn wait_for_line(log: &mut tokio::io::BufReader<tokio::process::ChildStderr>, needle: &str) -> String {
    use tokio::io::AsyncBufReadExt;
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, log.read_line(&mut line)).await.expect("log line timed out").unwrap();
        assert!(n > 0, "the proxy exited before logging {needle:?}");
        if line.contains(needle) {
            return line;
        }
    }
}

/// The port a `run` child logged for `listener` (its `listening` line, so
/// port 0 in the config can be used).
pub async fn listening_port(log: &mut tokio::io::BufReader<tokio::process::ChildStderr>, listener: &str) -> u16 {
    loop {
        let line = wait_for_line(log, "listening").await;
        if line.contains(&format!("listener={listener} ")) {
            return bound_port(&line);
        }
    }
}

/// The port of a `listening` log line's `bind=ADDR:PORT`.
pub fn bound_port(line: &str) -> u16 {
    let bind = line.split_whitespace().find_map(|w| w.strip_prefix("bind=")).unwrap();
    bind.rsplit(':').next().unwrap().parse().unwrap()
}
