//! The terminal UI (`pairstyle`, `pairstyle tui`): browse the style library, follow training,
//! queue blended generations, watch the drop folder, over SSH in any terminal.
//!
//! It speaks only the daemon's IPC protocol ([`crate::daemon::protocol`]) and reads the files the
//! daemon names (pictures, the drop folder). The parts:
//! - [`state`]: everything shown, as one plain value.
//! - [`action`]: what can happen (keys, ticks, daemon replies and events) and the pure
//!   [`action::update`] that applies it and says what to ask for ([`action::Command`]).
//! - [`view`]: rendering as a pure function of the state, one file per view.
//! - [`client`]: the background connection to the daemon's socket (reconnects, never blocks the
//!   UI) and the background file reads ([`disk`]).
//! - [`app`]: the terminal event loop.

pub mod action;
pub mod app;
pub mod client;
pub mod disk;
pub mod graphics;
pub mod state;
pub mod view;

use std::path::{Path, PathBuf};

/// What can go wrong in the terminal UI.
#[derive(Debug, thiserror::Error)]
pub enum TuiError {
    /// The terminal could not be set up, read or drawn to.
    #[error("terminal: {0}")]
    Terminal(#[source] std::io::Error),

    /// A file or folder could not be read, written or renamed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A picture could not be decoded.
    #[error("cannot show {}: {message}", path.display())]
    Picture {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },

    /// The background client could not start.
    #[error("daemon client: {0}")]
    Client(String),
}

/// How the UI is started.
#[derive(Debug, Clone)]
pub struct TuiOptions {
    /// The configuration (generation defaults, drop-folder stability time).
    pub config: crate::config::Config,
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The daemon runs inside this process (it was started because none answered).
    pub embedded: bool,
}

/// Whether a daemon answers on `socket` right now (a connection is accepted).
pub fn daemon_answers(socket: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

pub use app::run;
#[cfg(test)]
mod tests;
