//! Runs the shipped nginx config (`deploy/nginx/stemedb.conf`) for real:
//! the upstream ports are pointed at the test's servers, and nginx runs in
//! the foreground with its own prefix directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The nginx binary (Debian puts it in /usr/sbin, often off a user's PATH).
pub fn binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.exists() { sbin } else { PathBuf::from("nginx") }
}

/// Writes a complete nginx.conf under `dir` that includes the shipped
/// config with `ports` (writer, follower 1, follower 2) and `listen`
/// substituted; returns its path.
pub fn config(dir: &Path, listen: u16, writer: u16, followers: [u16; 2]) -> PathBuf {
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/stemedb.conf")).expect("read config");
    let site = shipped
        .replace("listen 8080;", &format!("listen 127.0.0.1:{listen};"))
        .replace("127.0.0.1:18181", &format!("127.0.0.1:{}", followers[0]))
        .replace("127.0.0.1:18182", &format!("127.0.0.1:{}", followers[1]))
        .replace("127.0.0.1:18180", &format!("127.0.0.1:{writer}"));
    std::fs::create_dir_all(dir.join("logs")).expect("mkdir");
    std::fs::write(dir.join("stemedb.conf"), site).expect("write site");
    let main = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  \
         uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  include {d}/stemedb.conf;\n}}\n",
        d = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, main).expect("write nginx.conf");
    path
}

/// `nginx -t` on `conf`: (passed, output).
pub fn check(conf: &Path) -> (bool, String) {
    let out = Command::new(binary())
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .arg("-p")
        .arg(conf.parent().expect("dir"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run nginx ({e}); `bash tests/run` installs it"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A running nginx; killed on drop.
pub struct Nginx(Child);

impl Nginx {
    /// Starts nginx on `conf` and waits until `listen` accepts connections.
    pub fn start(conf: &Path, listen: u16) -> Nginx {
        let child = Command::new(binary())
            .arg("-c")
            .arg(conf)
            .arg("-p")
            .arg(conf.parent().expect("dir"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nginx ({e}); `bash tests/run` installs it"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {listen}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx(child)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
