//! A private `redis-server` for the shared-state tests: its own config,
//! directory and free loopback port, no persistence, stopped by pid.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    binary: PathBuf,
}

/// The `redis-server` binary, if installed (`.ci/run` installs it).
fn binary() -> Option<PathBuf> {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].into_iter().map(PathBuf::from).find(|p| p.exists())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RedisServer {
    /// Starts one, or returns `None` (after saying why) without redis-server.
    pub fn start() -> Option<RedisServer> {
        let Some(binary) = binary() else {
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server; .ci/run does)");
            return None;
        };
        let mut server = RedisServer { port: free_port(), dir: tempfile::tempdir().unwrap(), child: None, binary };
        server.spawn();
        Some(server)
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("redis.conf");
        std::fs::write(
            &conf,
            format!(
                "bind 127.0.0.1\nport {}\ndir {}\nsave \"\"\nappendonly no\ndaemonize no\nprotected-mode yes\nlogfile {}\n",
                self.port,
                self.dir.path().display(),
                self.dir.path().join("redis.log").display()
            ),
        )
        .unwrap();
        let child = Command::new(&self.binary)
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stops it (SIGKILL: nothing is saved, as after a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs one command with redis-cli-like simplicity over RESP.
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 65536];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
