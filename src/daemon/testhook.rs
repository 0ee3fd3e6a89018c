//! Test-only pause points, for the crash tests (`tests/daemon_crash.rs`). Never set in normal use.
//!
//! With `PAIRSTYLE_TEST_PAUSE=<point>` in the daemon's environment, the daemon stops when it
//! reaches that point, writes an empty marker file `<point>.paused` into
//! `$PAIRSTYLE_TEST_PAUSE_DIR` (default: the state folder) and waits there until it is killed.
//! A test waits for the marker, then sends SIGKILL, so the kill lands at exactly that moment.
//!
//! Points:
//! - `journal-enqueue`: while saving the journal after adding a job, with half of the new journal
//!   written to its temporary file (the rename that publishes it has not happened).
//! - `journal-finish`: the same while saving a job as done (its style is already registered, its
//!   PNG already written).
//! - `style-save`: while registering a style, with the style complete in its temporary folder,
//!   not yet renamed into place.

use std::path::{Path, PathBuf};

/// Environment variable naming the pause point.
pub const PAUSE_VAR: &str = "PAIRSTYLE_TEST_PAUSE";
/// Environment variable naming the folder for the marker file.
pub const PAUSE_DIR_VAR: &str = "PAIRSTYLE_TEST_PAUSE_DIR";

/// Pause while saving the journal after adding a job.
pub const JOURNAL_ENQUEUE: &str = "journal-enqueue";
/// Pause while saving the journal after a job finished.
pub const JOURNAL_FINISH: &str = "journal-finish";
/// Pause before a complete style is renamed into the library.
pub const STYLE_SAVE: &str = "style-save";

/// A requested pause point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausePoint {
    point: String,
    dir: PathBuf,
}

impl PausePoint {
    /// The pause point set by the environment, if any (`default_dir` receives the marker unless
    /// `PAIRSTYLE_TEST_PAUSE_DIR` says otherwise).
    pub fn from_env(default_dir: &Path) -> Option<Self> {
        Self::from_lookup(default_dir, &|k| std::env::var_os(k))
    }

    /// As [`PausePoint::from_env`], with the environment as a function (for tests).
    pub fn from_lookup(
        default_dir: &Path,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Option<Self> {
        let point = env(PAUSE_VAR)?.to_string_lossy().trim().to_string();
        if point.is_empty() {
            return None;
        }
        let dir = env(PAUSE_DIR_VAR)
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| default_dir.to_path_buf());
        tracing::warn!("test pause point {point:?} is set ({PAUSE_VAR}): for crash tests only");
        Some(Self { point, dir })
    }

    /// Whether this is the point `name`.
    pub fn is(&self, name: &str) -> bool {
        self.point == name
    }

    /// The marker file written when the pause is reached.
    pub fn marker(&self) -> PathBuf {
        self.dir.join(format!("{}.paused", self.point))
    }

    /// If this is the point `name`: write the marker and wait until the process is killed.
    pub fn hold_if(&self, name: &str) {
        if !self.is(name) {
            return;
        }
        let marker = self.marker();
        if let Err(e) = std::fs::write(&marker, b"") {
            tracing::error!("cannot write the pause marker {}: {e}", marker.display());
        }
        tracing::warn!("paused at test point {name:?}: waiting to be killed");
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_point_comes_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(*v))
            }
        };
        assert!(PausePoint::from_lookup(Path::new("/s"), &env(&[])).is_none());
        assert!(PausePoint::from_lookup(Path::new("/s"), &env(&[(PAUSE_VAR, " ")])).is_none());
        let p = PausePoint::from_lookup(Path::new("/s"), &env(&[(PAUSE_VAR, STYLE_SAVE)])).unwrap();
        assert!(p.is(STYLE_SAVE) && !p.is(JOURNAL_FINISH));
        assert_eq!(p.marker(), Path::new("/s/style-save.paused"));
        let p = PausePoint::from_lookup(
            Path::new("/s"),
            &env(&[(PAUSE_VAR, JOURNAL_ENQUEUE), (PAUSE_DIR_VAR, "/t")]),
        )
        .unwrap();
        assert_eq!(p.marker(), Path::new("/t/journal-enqueue.paused"));
        // Another point does not pause.
        p.hold_if(JOURNAL_FINISH);
    }
}
