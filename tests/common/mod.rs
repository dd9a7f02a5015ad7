//! Test harness: runs the real `stemedb` binary on a loopback port with its
//! own temporary data directory, the way a user would.
#![allow(dead_code)]

pub mod corpus;
pub mod nginx;
pub mod s3;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of the binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stemedb"))
}

/// A free loopback port (bound, then released).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// A running server process.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    env: Vec<(String, String)>,
}

impl Server {
    /// Starts a server on `data_dir` with extra environment variables and
    /// waits until `/v1/health` answers.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s =
            Server { child: None, addr: free_addr(), data_dir: data_dir.to_path_buf(), log_path: data_dir.with_extension("log"), env };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).expect("open server log");
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .env("STEMEDB_DATA_DIR", &self.data_dir)
            .env("STEMEDB_BIND_ADDR", self.addr.to_string())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn stemedb serve"));
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("server exited early with {status}; log:\n{}", self.log());
            }
            if http_get_ok(self.addr, "/v1/health") {
                return;
            }
            if Instant::now() > deadline {
                panic!("server did not become healthy in 60 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("server is running");
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("server did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data directory and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server before restarting it");
        self.spawn();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Minimal blocking GET used only for readiness polling.
fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.1 200")
}

/// Runs `stemedb <args>` with `STEMEDB_DATA_DIR=data_dir`; returns (exit code, stdout, stderr).
pub fn run_cli(data_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).env("STEMEDB_DATA_DIR", data_dir).env("NO_COLOR", "1").output().expect("run stemedb");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// [`run_cli`] with extra environment variables.
pub fn run_cli_env(data_dir: &Path, args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env("STEMEDB_DATA_DIR", data_dir).env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run stemedb");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every event of a stopped server's log, via `stemedb wal dump`.
pub fn wal_dump(data_dir: &Path) -> Vec<Value> {
    let (code, out, err) = run_cli(data_dir, &["wal", "dump"]);
    assert_eq!(code, 0, "wal dump failed: {err}");
    out.lines().map(|l| serde_json::from_str(l).expect("dump line is JSON")).collect()
}

/// An async HTTP client for tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

/// POSTs JSON and returns (status, content-type, body as JSON or Null).
pub async fn post_json(c: &reqwest::Client, url: &str, body: &Value) -> (u16, String, Value) {
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).expect("encode"))
        .send()
        .await
        .expect("request");
    split(r).await
}

/// GETs and returns (status, content-type, body as JSON or Null).
pub async fn get_json(c: &reqwest::Client, url: &str) -> (u16, String, Value) {
    let r = c.get(url).send().await.expect("request");
    split(r).await
}

async fn split(r: reqwest::Response) -> (u16, String, Value) {
    let status = r.status().as_u16();
    let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes = r.bytes().await.expect("body");
    (status, ct, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A minimal valid assertion body.
pub fn assertion(subject: &str, predicate: &str, value: Value, agent: &str) -> Value {
    serde_json::json!({"subject": subject, "predicate": predicate, "object": {"type": "text", "value": value}, "agent": agent})
}
