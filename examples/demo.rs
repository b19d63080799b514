//! A self-contained demonstration: the real proxy between a fake Microsoft
//! token endpoint and fake Exchange-style mail servers, all on loopback.
//!
//!     cargo run --release --example demo              # demo, then serve until Ctrl-C
//!     cargo run --release --example demo -- --self-test   # demo, then exit (CI)
//!
//! The fakes live in the `testkit` crate; none of this is in the product binary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use testkit::{AfterAuth, FakeUpstream, Mailbox, Proto, TestPki, TokenServer, UpstreamOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use xoauth2_proxy::config::Config;
use xoauth2_proxy::server::Proxy;

const PASSWORD: &str = "demo-password";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let self_test = std::env::args().any(|a| a == "--self-test");

    let pki = TestPki::generate();
    let token = TokenServer::start().await;
    let mailbox = Arc::new(Mailbox::new());
    let start = |proto| {
        let mut options = UpstreamOptions::new(proto);
        options.after_auth = AfterAuth::Mailbox(mailbox.clone());
        FakeUpstream::start(options, &pki, token.validator())
    };
    let (imap, pop3, smtp) = (start(Proto::Imap).await, start(Proto::Pop3).await, start(Proto::Smtp).await);

    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("demo.yaml");
    std::fs::write(
        &config_path,
        format!(
            r#"listeners:
  - {{ name: smtp, protocol: smtp, bind: "127.0.0.1:0", upstream: "localhost:{smtp}" }}
  - {{ name: imap, protocol: imap, bind: "127.0.0.1:0", upstream: "localhost:{imap}" }}
  - {{ name: pop3, protocol: pop3, bind: "127.0.0.1:0", upstream: "localhost:{pop3}" }}
upstream_ca_file: {ca}
identities:
  demo:
    authority: {authority}
    tenant: {tenant}
    client_id: {client_id}
    client_secret: {secret}
accounts:
  - {{ username: printer, password: {PASSWORD}, mailbox: scanner@demo.example, identity: demo }}
log: {{ level: info }}
"#,
            smtp = smtp.addr().port(),
            imap = imap.addr().port(),
            pop3 = pop3.addr().port(),
            ca = pki.ca_path().display(),
            authority = token.authority(),
            tenant = testkit::token::TENANT,
            client_id = testkit::token::CLIENT_ID,
            secret = testkit::token::CLIENT_SECRET,
        ),
    )?;
    let config = Config::load(&config_path)?;
    xoauth2_proxy::telemetry::init(&config.log);
    // As `xoauth2-proxy run` does: the plain `password:` above is warned about.
    xoauth2_proxy::cli::run::log_warnings(&config);
    let proxy = Proxy::bind(&config).await?;
    let ports: HashMap<String, u16> = proxy.local_addrs().into_iter().map(|(name, a)| (name, a.port())).collect();
    let (smtp_port, imap_port, pop3_port) = (ports["smtp"], ports["imap"], ports["pop3"]);
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(proxy.run(async move { stopped.cancelled().await }));

    println!();
    println!(
        "xoauth2-proxy demo: fake Entra token endpoint at {}, fake Exchange upstreams (TLS, XOAUTH2 only)",
        token.authority()
    );
    println!("  SMTP 127.0.0.1:{smtp_port}   IMAP 127.0.0.1:{imap_port}   POP3 127.0.0.1:{pop3_port}   user printer / {PASSWORD}");
    println!();
    println!("1. Sending a message with AUTH PLAIN through the SMTP listener:");
    let sent = b"From: scanner@demo.example\r\nTo: office@demo.example\r\nSubject: Scan 0001\r\n\r\nScanned document attached.\r\n";
    smtp_send(smtp_port, sent).await?;
    println!();
    println!("2. Reading it back with IMAP LOGIN through the IMAP listener:");
    let fetched = imap_fetch(imap_port).await?;
    println!();
    let logins = smtp.logins().into_iter().chain(imap.logins()).collect::<Vec<_>>();
    println!(
        "The upstreams accepted {} XOAUTH2 login(s) as {:?}; the token endpoint issued {} token(s) of {} characters.",
        logins.len(),
        logins,
        token.requests(),
        testkit::token::TOKEN_LENGTH
    );
    if fetched != sent {
        return Err("the message read back differs from the one sent".into());
    }
    println!("The message read back is byte-for-byte the one sent.");

    if self_test {
        stop.cancel();
        server.await?;
        return Ok(());
    }
    println!();
    // The message the SMTP command below sends gets the mailbox's next UID.
    let next_uid = mailbox.messages().last().map_or(1, |m| m.uid + 1);
    println!("Try it yourself (Ctrl-C to stop): send a message, then read it back by IMAP and POP3:");
    println!("  printf 'Subject: hello\\r\\n\\r\\nHi from curl\\r\\n' | curl -v smtp://127.0.0.1:{smtp_port} --mail-from scanner@demo.example --mail-rcpt office@demo.example -T - -u printer:{PASSWORD}");
    println!("  curl -v 'imap://127.0.0.1:{imap_port}/INBOX;UID={next_uid}' -u printer:{PASSWORD}");
    println!("  curl -v pop3://127.0.0.1:{pop3_port}/{} -u printer:{PASSWORD}", mailbox.messages().len() + 1);
    println!();
    tokio::signal::ctrl_c().await?;
    stop.cancel();
    server.await?;
    Ok(())
}

struct Line {
    reader: BufReader<tokio::io::ReadHalf<TcpStream>>,
    writer: tokio::io::WriteHalf<TcpStream>,
}

impl Line {
    async fn connect(port: u16) -> std::io::Result<Self> {
        let (r, w) = tokio::io::split(TcpStream::connect(("127.0.0.1", port)).await?);
        Ok(Line { reader: BufReader::new(r), writer: w })
    }

    async fn recv(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line)).await??;
        let line = line.trim_end().to_string();
        println!("   S: {}", if line.len() > 100 { format!("{}...", &line[..100]) } else { line.clone() });
        Ok(line)
    }

    async fn send(&mut self, shown: &str, raw: &[u8]) -> std::io::Result<()> {
        println!("   C: {shown}");
        self.writer.write_all(raw).await
    }
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

async fn smtp_send(port: u16, message: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
    let mut c = Line::connect(port).await?;
    c.recv().await?;
    c.send("EHLO scanner.local", b"EHLO scanner.local\r\n").await?;
    while c.recv().await?.starts_with("250-") {}
    let auth = format!("AUTH PLAIN {}", b64(format!("\0printer\0{PASSWORD}").as_bytes()));
    c.send(&format!("{auth}   (printer / {PASSWORD})"), format!("{auth}\r\n").as_bytes()).await?;
    if !c.recv().await?.starts_with("235") {
        return Err("SMTP authentication failed".into());
    }
    c.send("MAIL FROM:<scanner@demo.example>", b"MAIL FROM:<scanner@demo.example>\r\n").await?;
    c.recv().await?;
    c.send("RCPT TO:<office@demo.example>", b"RCPT TO:<office@demo.example>\r\n").await?;
    c.recv().await?;
    c.send("DATA", b"DATA\r\n").await?;
    c.recv().await?;
    let mut data = message.to_vec();
    data.extend_from_slice(b".\r\n");
    c.send("(message) .", &data).await?;
    c.recv().await?;
    c.send("QUIT", b"QUIT\r\n").await?;
    c.recv().await?;
    Ok(())
}

async fn imap_fetch(port: u16) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut c = Line::connect(port).await?;
    c.recv().await?;
    c.send(&format!("a1 LOGIN printer {PASSWORD}"), format!("a1 LOGIN printer {PASSWORD}\r\n").as_bytes()).await?;
    if !c.recv().await?.starts_with("a1 OK") {
        return Err("IMAP login failed".into());
    }
    c.send("a2 SELECT INBOX", b"a2 SELECT INBOX\r\n").await?;
    while !c.recv().await?.starts_with("a2 ") {}
    c.send("a3 FETCH 1 BODY[]", b"a3 FETCH 1 BODY[]\r\n").await?;
    let header = c.recv().await?;
    let size: usize =
        header.rsplit('{').next().and_then(|s| s.trim_end_matches('}').parse().ok()).ok_or("no literal")?;
    let mut body = vec![0u8; size];
    tokio::io::AsyncReadExt::read_exact(&mut c.reader, &mut body).await?;
    println!("   S: ({size} bytes of message)");
    while !c.recv().await?.starts_with("a3 ") {}
    c.send("a4 LOGOUT", b"a4 LOGOUT\r\n").await?;
    c.recv().await?;
    Ok(body)
}
