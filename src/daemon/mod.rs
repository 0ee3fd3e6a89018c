//! The daemon: image pairs dropped into a watch folder become trained styles, generation requests
//! queue up, and nothing is ever lost.
//!
//! The flow, one module per step:
//! - [`paths`]: where the daemon keeps its state (library, journal, outputs, staging) and its
//!   socket, following systemd's `$STATE_DIRECTORY` / `$RUNTIME_DIRECTORY` when set.
//! - [`dropfolder`]: scanning the watch folder and deciding when a dropped pair is complete and
//!   stable (pure logic with an injected clock).
//! - [`intake`]: validating a ready pair, giving it a content-derived id and moving it atomically
//!   into staging, or into `watch/failed/<name>/` with an `error.txt`.
//! - [`journal`]: the persistent, crash-safe queue of training and generation jobs.
//! - [`protocol`]: the newline-delimited JSON messages spoken over the daemon's Unix socket.
//! - [`sdnotify`]: systemd readiness, status and watchdog notifications.
//! - [`server`]: the socket server (peer uid check, hello, requests, event stream) and a client.
//! - [`service`]: the running daemon: scanner, training worker and server around shared state.
//! - [`embedded`]: the same daemon on threads of another process (the terminal UI starts one).
//! - [`status`]: `pairstyle status` as text.
//! - [`testhook`]: test-only pause points for the crash tests.
//!
//! The daemon uses the engine, trainer and library; none of them knows about it.

pub mod config;
pub mod dropfolder;
pub mod embedded;
pub mod intake;
pub mod journal;
pub mod paths;
pub mod protocol;
pub mod sdnotify;
pub mod server;
pub mod service;
pub mod status;
pub mod testhook;

use std::path::PathBuf;

pub use self::config::DaemonConfig;

/// Result alias of the daemon modules.
pub type DaemonResult<T> = std::result::Result<T, DaemonError>;

/// What can go wrong in the daemon, with the path or job concerned.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Reading, writing, renaming or listing a file or folder failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or folder concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An error from the rest of the library (image decoding, training, the style library).
    #[error(transparent)]
    Lib(#[from] crate::Error),

    /// A generation job failed (a bad setting, a style that cannot be loaded, the engine).
    #[error(transparent)]
    Generate(Box<crate::generate::GenerateError>),

    /// The journal file was written by a newer pairstyle; it is left untouched.
    #[error(
        "journal {} has format version {found}, this pairstyle reads version {supported}: \
         run the newer pairstyle, or move the file away to start an empty queue",
        path.display()
    )]
    JournalVersion {
        /// The journal file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build writes and reads.
        supported: u32,
    },

    /// No job has this id.
    #[error("no job with id {0}")]
    UnknownJob(u64),

    /// A job cannot move from its current state to the requested one (e.g. cancel a finished job).
    #[error("job {job} is {from}; it cannot become {to}")]
    InvalidTransition {
        /// The job's id.
        job: u64,
        /// Its current state.
        from: String,
        /// The requested state.
        to: String,
    },

    /// A setting of the daemon is unusable.
    #[error("daemon configuration: {0}")]
    Config(String),
}

impl From<crate::generate::GenerateError> for DaemonError {
    fn from(e: crate::generate::GenerateError) -> Self {
        DaemonError::Generate(Box::new(e))
    }
}

impl DaemonError {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DaemonError::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether retrying later may succeed (I/O trouble), as opposed to a permanent problem.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DaemonError::Io { .. } | DaemonError::Lib(crate::Error::Io { .. })
        ) || matches!(
            self,
            DaemonError::Generate(g)
                if matches!(**g, crate::generate::GenerateError::Lib(crate::Error::Io { .. }))
        )
    }
}

/// Seconds since the Unix epoch now (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC`, for files people read (`error.txt`).
pub fn format_utc(unix: u64) -> String {
    let secs = i64::try_from(unix).unwrap_or(i64::MAX);
    format!(
        "{} UTC",
        crate::lora::export::iso8601_utc(secs).replacen('T', " ", 1)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting_matches_known_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_709_210_096), "2024-02-29 12:34:56 UTC");
        assert_eq!(format_utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }

    #[test]
    fn only_io_errors_are_transient() {
        let io = DaemonError::io("/x", std::io::Error::other("busy"));
        assert!(io.is_transient());
        assert!(!DaemonError::UnknownJob(3).is_transient());
        assert!(!DaemonError::Lib(crate::Error::InvalidArgument("x".into())).is_transient());
    }
}
