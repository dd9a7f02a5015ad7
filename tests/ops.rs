//! Operations files are checked with the real tools an operator would use:
//! `systemd-analyze verify` for the unit, `promtool` for the alert rules
//! and their unit tests, `nginx -t` for the proxy config. `tests/run`
//! installs all three.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (tests/run installs it)"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn systemd_unit_verifies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/systemd/stemedb.service")).expect("read unit");
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = unit.replace("/usr/local/bin/stemedb", env!("CARGO_BIN_EXE_stemedb"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stemedb.service");
    std::fs::write(&path, unit).expect("write unit");
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(ok, "systemd-analyze verify failed:\n{out}");
    assert!(!out.contains("Unknown"), "systemd-analyze warned:\n{out}");

    // The check has teeth: a misspelt key is refused.
    let bad = std::fs::read_to_string(&path).expect("read").replace("ExecStart=", "ExecStrt=");
    std::fs::write(&path, bad).expect("write");
    let (ok, _) = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(!ok, "a unit without ExecStart must not verify");
}

#[test]
fn alert_rules_check_and_pass_their_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring");
    let (ok, out) = run(Command::new("promtool").args(["check", "rules", "alerts.yml"]).current_dir(&dir));
    assert!(ok, "promtool check rules failed:\n{out}");
    let (ok, out) = run(Command::new("promtool").args(["test", "rules", "alerts_test.yml"]).current_dir(&dir));
    assert!(ok, "promtool test rules failed:\n{out}");
}

#[test]
fn alert_rules_use_metrics_the_server_exports() {
    // Every stemedb_* metric an alert names must be one the code records.
    let rules = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring/alerts.yml")).expect("read rules");
    let src: String = walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(base) = word.strip_prefix("stemedb_") {
            let base = base.trim_end_matches("_bucket");
            assert!(src.contains(&format!("\"stemedb_{base}\"")), "alerts.yml uses stemedb_{base}, which the server does not export");
        }
    }
}

fn walk(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.push_str(&walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

// Only the config check is used here; tests/archive.rs runs nginx.
#[allow(dead_code)]
#[path = "common/nginx.rs"]
mod nginx;

#[test]
fn nginx_config_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = nginx::config(dir.path(), 18080, 18180, [18181, 18182]);
    let (ok, out) = nginx::check(&conf);
    assert!(ok, "nginx -t failed on deploy/nginx/stemedb.conf:\n{out}");

    // The check has teeth: a broken directive is refused.
    let site = dir.path().join("stemedb.conf");
    let bad = std::fs::read_to_string(&site).expect("read").replace("proxy_next_upstream_tries 3;", "proxy_next_upstream_tries;");
    std::fs::write(&site, bad).expect("write");
    let (ok, _) = nginx::check(&conf);
    assert!(!ok, "a directive without its argument must not pass nginx -t");
}
