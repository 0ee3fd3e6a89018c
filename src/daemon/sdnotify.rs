//! systemd's notification protocol (`Type=notify`): `READY=1` once serving, `STATUS=...` lines,
//! `WATCHDOG=1` keep-alives and `STOPPING=1`, sent as datagrams to `$NOTIFY_SOCKET` (a path, or
//! an abstract socket written `@name`). Without `$NOTIFY_SOCKET` (not under systemd) every call
//! does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Send one notification (`"READY=1"`, `"STATUS=..."`); returns whether it was sent.
pub fn notify(message: &str) -> bool {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(target) => send_to(&target.to_string_lossy(), message).is_ok(),
        None => false,
    }
}

/// Send `message` to the notification socket `target` (a path or `@abstract-name`).
pub fn send_to(target: &str, message: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(message.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::other("abstract sockets need Linux"));
        }
    }
    sock.send_to(message.as_bytes(), target)?;
    Ok(())
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` when systemd set a watchdog for this
/// process (`$WATCHDOG_PID` absent or ours), else `None`.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("ps-sdnotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        send_to(path.to_str().unwrap(), "READY=1").unwrap();
        send_to(path.to_str().unwrap(), "STATUS=watching /w").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=watching /w");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("pairstyle-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(&format!("@{name}"), "WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
