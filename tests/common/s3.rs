//! A real S3-compatible server on a loopback port for the archive tests:
//! moto's server (`pip install "moto[server]"`, which `tests/run` does),
//! started fresh per test so tests never share a bucket.
//!
//! Objects are corrupted or deleted through moto's own S3 API (plain HTTP
//! requests), exactly as a broken disk or an operator's mistake would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server.
pub struct S3Server {
    child: Child,
    /// Its address.
    pub addr: SocketAddr,
}

/// The bucket every test uses (each has its own server).
pub const BUCKET: &str = "stemedb-test";

impl S3Server {
    /// Starts moto and creates [`BUCKET`]. Panics with how to install moto
    /// if it is missing: the test must fail, not skip.
    pub fn start() -> S3Server {
        let addr = super::free_addr();
        let python = std::env::var("STEMEDB_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} -m moto.server ({e}); run `bash tests/run`, which installs moto[server]"));
        let mut s = S3Server { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("moto exited with {st}: is moto[server] installed? `bash tests/run` installs it");
            }
            if s.request("PUT", &format!("/{BUCKET}"), &[]).0 == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "moto did not start within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    /// `http://addr`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `s3://BUCKET/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment a `stemedb` process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("STEMEDB_S3_ENDPOINT", self.endpoint()),
            ("STEMEDB_S3_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            // Fail fast while the server is paused.
            ("STEMEDB_S3_REQUEST_TIMEOUT", "2s".into()),
        ]
    }

    /// Freezes the server (SIGSTOP): connections hang, like a dead store.
    pub fn pause(&self) {
        let _ = Command::new("kill").args(["-STOP", &self.child.id().to_string()]).status();
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).status();
    }

    /// Replaces an object's bytes (no checksum metadata), as corruption would.
    pub fn put_object(&self, key: &str, body: &[u8]) {
        let (st, _) = self.request("PUT", &format!("/{BUCKET}/{key}"), body);
        assert_eq!(st, 200, "PUT {key}");
    }

    /// Reads an object.
    pub fn get_object(&self, key: &str) -> Vec<u8> {
        let (st, body) = self.request("GET", &format!("/{BUCKET}/{key}"), &[]);
        assert_eq!(st, 200, "GET {key}");
        body
    }

    /// Deletes an object.
    pub fn delete_object(&self, key: &str) {
        let (st, _) = self.request("DELETE", &format!("/{BUCKET}/{key}"), &[]);
        assert!(st == 204 || st == 200, "DELETE {key}: {st}");
    }

    /// The keys under `prefix`, from a ListObjectsV2 call.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let (st, body) = self.request("GET", &format!("/{BUCKET}?list-type=2&prefix={prefix}"), &[]);
        assert_eq!(st, 200);
        let text = String::from_utf8_lossy(&body);
        text.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_string).collect()
    }

    /// A minimal HTTP/1.1 request; returns (status, body). 0 on failure.
    fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500)) else { return (0, vec![]) };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        // moto does not check signatures, but it needs one to know the
        // caller is the bucket's owner rather than anonymous.
        let auth = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {auth}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        if s.write_all(head.as_bytes()).and_then(|_| s.write_all(body)).is_err() {
            return (0, vec![]);
        }
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let Some(split) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return (0, vec![]) };
        let head = String::from_utf8_lossy(&buf[..split]).to_string();
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut rest = buf[split + 4..].to_vec();
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            rest = dechunk(&rest);
        }
        (status, rest)
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..i]).trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[i + 2..(i + 2 + n).min(b.len())]);
        b = &b[(i + 4 + n).min(b.len())..];
    }
    out
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
