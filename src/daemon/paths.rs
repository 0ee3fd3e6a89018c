//! Where the daemon keeps things.
//!
//! - State (library, journal, outputs, staging, and by default the watch folder): `[daemon]
//!   state_dir`, else `$STATE_DIRECTORY` (systemd's `StateDirectory=`; the first entry when it
//!   lists several), else the user data dir (`~/.local/share/pairstyle` on Linux).
//! - Socket: `[daemon] socket`, else `$RUNTIME_DIRECTORY/pairstyle.sock` (systemd's
//!   `RuntimeDirectory=`), else `$XDG_RUNTIME_DIR/pairstyle/pairstyle.sock`, else a private
//!   folder `pairstyle-<uid>` in the temporary directory.
//!
//! The `directories` crate does not read systemd's variables, hence this module. The environment
//! is passed in as a function so that tests need not change the process's environment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{DaemonConfig, DaemonError, DaemonResult};
use crate::config::LibraryConfig;

/// File name of the job journal in the state folder.
pub const JOURNAL_FILE: &str = "journal.json";
/// File name of the socket in the runtime folder.
pub const SOCKET_FILE: &str = "pairstyle.sock";
/// Name of the folder inside the watch folder that receives bad input.
pub const FAILED_DIR: &str = "failed";
/// Longest socket path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Every path the daemon uses, resolved once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonPaths {
    /// The state folder everything persistent lives under.
    pub state_dir: PathBuf,
    /// The folder holding the socket (created private, mode 0700).
    pub runtime_dir: PathBuf,
    /// The style library.
    pub library: PathBuf,
    /// The job journal file.
    pub journal: PathBuf,
    /// Generated images.
    pub outputs: PathBuf,
    /// Pairs taken from the watch folder, one folder per pair id.
    pub staging: PathBuf,
    /// The drop folder.
    pub watch: PathBuf,
    /// Bad input, one folder per rejected pair, inside the watch folder.
    pub failed: PathBuf,
    /// The Unix socket.
    pub socket: PathBuf,
}

/// The first entry of a systemd directory variable (`A:B` lists several), if set and non-empty.
fn first_entry(value: Option<OsString>) -> Option<PathBuf> {
    let value = value?;
    let s = value.to_string_lossy();
    s.split(':').find(|p| !p.is_empty()).map(PathBuf::from)
}

/// The real user id of this process.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

impl DaemonPaths {
    /// Resolve from the configuration and the process environment.
    pub fn resolve(daemon: &DaemonConfig, library: &LibraryConfig) -> DaemonResult<Self> {
        Self::resolve_with(daemon, library, &|k| std::env::var_os(k))
    }

    /// Resolve from the configuration and an environment lookup (`env("STATE_DIRECTORY")`...).
    pub fn resolve_with(
        daemon: &DaemonConfig,
        library: &LibraryConfig,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> DaemonResult<Self> {
        let state_dir = if !daemon.state_dir.is_empty() {
            PathBuf::from(&daemon.state_dir)
        } else if let Some(p) = first_entry(env("STATE_DIRECTORY")) {
            p
        } else {
            directories::ProjectDirs::from("", "", "pairstyle")
                .map(|d| d.data_dir().to_path_buf())
                .ok_or_else(|| {
                    DaemonError::Config(
                        "no home folder to keep state in: set [daemon] state_dir or \
                         $STATE_DIRECTORY"
                            .into(),
                    )
                })?
        };
        let socket = if !daemon.socket.is_empty() {
            PathBuf::from(&daemon.socket)
        } else if let Some(p) = first_entry(env("RUNTIME_DIRECTORY")) {
            p.join(SOCKET_FILE)
        } else if let Some(p) = first_entry(env("XDG_RUNTIME_DIR")) {
            p.join("pairstyle").join(SOCKET_FILE)
        } else {
            std::env::temp_dir()
                .join(format!("pairstyle-{}", current_uid()))
                .join(SOCKET_FILE)
        };
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(DaemonError::Config(format!(
                "socket path {} is {} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket \
                 allows: set [daemon] socket to a shorter path",
                socket.display(),
                socket.as_os_str().len()
            )));
        }
        let runtime_dir = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let library = if library.path.is_empty() {
            state_dir.join("styles")
        } else {
            PathBuf::from(&library.path)
        };
        let watch = if daemon.watch.is_empty() {
            state_dir.join("watch")
        } else {
            PathBuf::from(&daemon.watch)
        };
        Ok(Self {
            journal: state_dir.join(JOURNAL_FILE),
            outputs: state_dir.join("outputs"),
            staging: state_dir.join("staging"),
            failed: watch.join(FAILED_DIR),
            watch,
            library,
            runtime_dir,
            socket,
            state_dir,
        })
    }

    /// Create every folder that does not exist yet. The runtime folder is made private (0700);
    /// an existing one owned by another user is refused, so nobody can pre-create it in `/tmp`.
    pub fn create_dirs(&self) -> DaemonResult<()> {
        for d in [
            &self.state_dir,
            &self.library,
            &self.outputs,
            &self.staging,
            &self.watch,
            &self.failed,
        ] {
            std::fs::create_dir_all(d).map_err(|e| DaemonError::io(d, e))?;
        }
        ensure_private_dir(&self.runtime_dir)
    }
}

/// Create `dir` with mode 0700 if missing; refuse it if it exists but belongs to another user.
pub fn ensure_private_dir(dir: &Path) -> DaemonResult<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| DaemonError::io(dir, e))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| DaemonError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(DaemonError::Config(format!(
            "{} should be a folder for the socket but is a file",
            dir.display()
        )));
    }
    let uid = current_uid();
    if meta.uid() != uid {
        return Err(DaemonError::Config(format!(
            "socket folder {} belongs to uid {}, not to this user (uid {uid}): refusing to use it",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn systemd_directories_win_over_defaults() {
        let env = env_of(&[
            ("STATE_DIRECTORY", "/var/lib/pairstyle:/var/lib/other"),
            ("RUNTIME_DIRECTORY", "/run/pairstyle"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        let p =
            DaemonPaths::resolve_with(&DaemonConfig::default(), &LibraryConfig::default(), &env)
                .unwrap();
        assert_eq!(p.state_dir, Path::new("/var/lib/pairstyle"));
        assert_eq!(p.library, Path::new("/var/lib/pairstyle/styles"));
        assert_eq!(p.journal, Path::new("/var/lib/pairstyle/journal.json"));
        assert_eq!(p.outputs, Path::new("/var/lib/pairstyle/outputs"));
        assert_eq!(p.staging, Path::new("/var/lib/pairstyle/staging"));
        assert_eq!(p.watch, Path::new("/var/lib/pairstyle/watch"));
        assert_eq!(p.failed, Path::new("/var/lib/pairstyle/watch/failed"));
        assert_eq!(p.socket, Path::new("/run/pairstyle/pairstyle.sock"));
        assert_eq!(p.runtime_dir, Path::new("/run/pairstyle"));
    }

    #[test]
    fn xdg_runtime_dir_then_tmp_fallback() {
        let env = env_of(&[("XDG_RUNTIME_DIR", "/run/user/1000")]);
        let p =
            DaemonPaths::resolve_with(&DaemonConfig::default(), &LibraryConfig::default(), &env)
                .unwrap();
        assert_eq!(
            p.socket,
            Path::new("/run/user/1000/pairstyle/pairstyle.sock")
        );
        let none = env_of(&[]);
        let p =
            DaemonPaths::resolve_with(&DaemonConfig::default(), &LibraryConfig::default(), &none)
                .unwrap();
        let expected = std::env::temp_dir().join(format!("pairstyle-{}", current_uid()));
        assert_eq!(p.runtime_dir, expected);
        // Without STATE_DIRECTORY the state lives in the user data dir.
        assert!(
            p.state_dir.ends_with("pairstyle"),
            "{}",
            p.state_dir.display()
        );
    }

    #[test]
    fn config_keys_override_environment() {
        let env = env_of(&[
            ("STATE_DIRECTORY", "/var/lib/pairstyle"),
            ("RUNTIME_DIRECTORY", "/run/pairstyle"),
        ]);
        let cfg = DaemonConfig {
            state_dir: "/srv/ps".into(),
            watch: "/mnt/share/drop".into(),
            socket: "/tmp/ps-test/d.sock".into(),
            ..Default::default()
        };
        let lib = LibraryConfig {
            path: "/data/styles".into(),
        };
        let p = DaemonPaths::resolve_with(&cfg, &lib, &env).unwrap();
        assert_eq!(p.state_dir, Path::new("/srv/ps"));
        assert_eq!(p.watch, Path::new("/mnt/share/drop"));
        assert_eq!(p.failed, Path::new("/mnt/share/drop/failed"));
        assert_eq!(p.library, Path::new("/data/styles"));
        assert_eq!(p.socket, Path::new("/tmp/ps-test/d.sock"));
        assert_eq!(p.runtime_dir, Path::new("/tmp/ps-test"));
    }

    #[test]
    fn empty_variables_are_ignored_and_long_socket_paths_refused() {
        let env = env_of(&[("STATE_DIRECTORY", ""), ("RUNTIME_DIRECTORY", ":")]);
        let cfg = DaemonConfig {
            socket: format!("/tmp/{}/s.sock", "x".repeat(120)),
            ..Default::default()
        };
        let e = DaemonPaths::resolve_with(&cfg, &LibraryConfig::default(), &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than"), "{e}");
        let p =
            DaemonPaths::resolve_with(&DaemonConfig::default(), &LibraryConfig::default(), &env)
                .unwrap();
        assert!(!p.state_dir.as_os_str().is_empty());
        assert!(!p.runtime_dir.starts_with(":"));
    }

    #[test]
    fn create_dirs_makes_a_private_runtime_folder() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("ps-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cfg = DaemonConfig {
            state_dir: root.join("state").display().to_string(),
            socket: root.join("run/d.sock").display().to_string(),
            ..Default::default()
        };
        let p = DaemonPaths::resolve_with(&cfg, &LibraryConfig::default(), &|_| None).unwrap();
        p.create_dirs().unwrap();
        for d in [&p.library, &p.outputs, &p.staging, &p.watch, &p.failed] {
            assert!(d.is_dir(), "{}", d.display());
        }
        let mode = std::fs::metadata(&p.runtime_dir)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Twice is fine.
        p.create_dirs().unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
