//! The systemd side of the daemon: the unit files in `systemd/` parse and carry what the daemon
//! relies on (and pass `systemd-analyze verify` where it is installed), and a daemon started with
//! `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` sends READY=1, STATUS=, WATCHDOG=1 and STOPPING=1.

mod daemon_common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daemon_common::{terminate, Setup};

/// `section → key → values` of a unit file (keys may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// A small parser of systemd's unit syntax: `[Section]` headers, `Key=Value` lines, `#`/`;`
/// comments, blank lines. Anything else is an error naming the line.
fn parse_unit(text: &str) -> Result<Unit, String> {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            unit.entry(name.to_string()).or_default();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: not a Key=Value: {raw:?}", i + 1));
        };
        let Some(s) = &section else {
            return Err(format!("line {}: {key} outside any section", i + 1));
        };
        if key.trim().is_empty() || key.trim().contains(char::is_whitespace) {
            return Err(format!("line {}: bad key {key:?}", i + 1));
        }
        unit.entry(s.clone())
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    Ok(unit)
}

fn units_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

fn load(rel: &str) -> (String, Unit) {
    let text = std::fs::read_to_string(units_dir().join(rel)).unwrap();
    let unit = parse_unit(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
    (text, unit)
}

fn one<'a>(u: &'a Unit, section: &str, key: &str) -> &'a str {
    let v = u
        .get(section)
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("[{section}] {key} missing"));
    assert_eq!(v.len(), 1, "[{section}] {key} given {} times", v.len());
    &v[0]
}

fn all<'a>(u: &'a Unit, section: &str, key: &str) -> &'a [String] {
    u.get(section)
        .and_then(|s| s.get(key))
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

#[test]
fn the_parser_refuses_what_systemd_refuses() {
    assert!(parse_unit("Type=notify\n").is_err());
    assert!(parse_unit("[Service]\nnonsense line\n").is_err());
    assert!(parse_unit("[Service]\nBad Key=1\n").is_err());
    let u = parse_unit("# c\n[Service]\n; c\nDeviceAllow=a rw\nDeviceAllow=b rw\n").unwrap();
    assert_eq!(all(&u, "Service", "DeviceAllow"), ["a rw", "b rw"]);
}

#[test]
fn both_units_are_notify_services_with_watchdog_restart_and_runtime_dir() {
    for rel in ["system/pairstyle.service", "user/pairstyle.service"] {
        let (_, u) = load(rel);
        for section in ["Unit", "Service", "Install"] {
            assert!(u.contains_key(section), "{rel}: no [{section}]");
        }
        assert_eq!(one(&u, "Service", "Type"), "notify", "{rel}");
        assert_eq!(one(&u, "Service", "Restart"), "on-failure", "{rel}");
        assert_eq!(one(&u, "Service", "RuntimeDirectory"), "pairstyle", "{rel}");
        let wd = one(&u, "Service", "WatchdogSec");
        let secs: u64 = wd.trim_end_matches('s').parse().unwrap();
        assert!(
            secs >= 10,
            "{rel}: WatchdogSec={wd} is too short for model loads"
        );
        let exec = one(&u, "Service", "ExecStart");
        assert!(
            exec.ends_with(" daemon") && exec.contains("pairstyle"),
            "{rel}: {exec}"
        );
        assert_eq!(one(&u, "Service", "NoNewPrivileges"), "yes");
        // The GPU must stay reachable.
        assert!(all(&u, "Service", "PrivateDevices")
            .iter()
            .all(|v| v == "no"));
    }
}

#[test]
fn the_system_unit_keeps_state_in_its_state_directory_and_allows_gpu_devices() {
    let (_, u) = load("system/pairstyle.service");
    assert_eq!(one(&u, "Service", "StateDirectory"), "pairstyle");
    assert_eq!(one(&u, "Service", "User"), "pairstyle");
    assert_eq!(one(&u, "Service", "DevicePolicy"), "closed");
    let allowed = all(&u, "Service", "DeviceAllow").join(" ");
    for dev in [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "char-nvidia-frontend",
        "char-drm",
    ] {
        assert!(allowed.contains(dev), "{dev} not allowed: {allowed}");
    }
    assert_eq!(one(&u, "Service", "ProtectSystem"), "strict");
    // CUDA needs writable and executable memory for its JIT.
    assert!(all(&u, "Service", "MemoryDenyWriteExecute").is_empty());
    assert_eq!(one(&u, "Install", "WantedBy"), "multi-user.target");
    let sysusers = std::fs::read_to_string(units_dir().join("pairstyle.sysusers.conf")).unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("u pairstyle ")));
}

/// `systemd-analyze verify` on copies whose ExecStart names the binary just built (the installed
/// path does not exist here). Skipped where systemd-analyze is missing.
#[test]
fn systemd_analyze_verify_passes_where_available() {
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze is not installed: verification skipped");
        return;
    };
    assert!(version.status.success());
    let bin = env!("CARGO_BIN_EXE_pairstyle");
    let tmp = std::env::temp_dir().join(format!("pairstyle-units-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("run")).unwrap();
    std::fs::create_dir_all(tmp.join("user")).unwrap();
    let copy = |rel: &str, from: &str, to: &Path| {
        let text = std::fs::read_to_string(units_dir().join(rel)).unwrap();
        assert!(text.contains(from), "{rel} does not run {from}");
        std::fs::write(to, text.replace(from, bin)).unwrap();
    };
    let system = tmp.join("pairstyle.service");
    copy(
        "system/pairstyle.service",
        "/usr/local/bin/pairstyle",
        &system,
    );
    let user = tmp.join("user/pairstyle.service");
    copy("user/pairstyle.service", "%h/.cargo/bin/pairstyle", &user);
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&system)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.trim().is_empty(),
        "system unit: {err}"
    );
    let o = std::process::Command::new("systemd-analyze")
        .args(["--user", "verify"])
        .arg(&user)
        .env("XDG_RUNTIME_DIR", tmp.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("Failed to initialize manager") {
        eprintln!("no user manager can start here: user unit verification skipped ({err})");
    } else {
        assert!(
            o.status.success() && err.trim().is_empty(),
            "user unit: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn the_daemon_notifies_ready_status_watchdog_and_stopping() {
    let s = Setup::new("daemon-systemd", "notify", 4, "");
    let sock_path = s.root.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = sock_path.display().to_string();
    // A 0.4 s watchdog: the daemon must ping every 0.2 s.
    let mut d = s.start(
        "daemon.log",
        &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
    );
    let mut got: Vec<String> = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 512];
    while got.iter().filter(|m| *m == "WATCHDOG=1").count() < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "got {got:?}; log:\n{}",
            s.log("daemon.log")
        );
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    assert_eq!(got[0], "READY=1", "{got:?}");
    assert!(
        got.iter().any(|m| m.starts_with("STATUS=idle; watching")),
        "{got:?}"
    );
    terminate(&mut d);
    let mut rest = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
}
