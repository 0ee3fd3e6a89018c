//! The daemon inside another process: the terminal UI starts one when no daemon answers on the
//! socket, so `pairstyle` alone works. It is the same daemon as `pairstyle daemon` (the same
//! [`DaemonState`], scanner, worker and socket server, on the same library and journal), minus
//! what only a service needs (signals, systemd notifications). Other clients, such as
//! `pairstyle status`, can connect to it while it runs.
//!
//! [`EmbeddedDaemon::shutdown`] (or dropping it) stops it like a daemon stop: a running training
//! job is interrupted and resumes from its checkpoint at the next start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::watch;

use super::server::{self, Handler, ServerOptions};
use super::service::DaemonState;
use super::{DaemonError, DaemonResult};
use crate::config::Config;

/// A daemon running on threads of this process.
pub struct EmbeddedDaemon {
    state: Arc<DaemonState>,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    socket: PathBuf,
}

impl EmbeddedDaemon {
    /// Open the daemon's state, bind its socket and start its scanner, worker and server threads.
    /// `model` is the base model folder for training. Fails if another daemon listens on the
    /// socket.
    // The error type is the daemon's own, whatever its size.
    #[allow(clippy::result_large_err)]
    pub fn start(config: Config, model: PathBuf) -> DaemonResult<Self> {
        let max_frame = config.daemon.max_frame_bytes;
        let state = DaemonState::open(config, model)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DaemonError::io("<tokio runtime>", e))?;
        let socket = state.paths.socket.clone();
        let listener = {
            let _guard = rt.enter();
            server::bind(&socket)?
        };
        let (stop, stop_rx) = watch::channel(false);
        let handler: Arc<dyn Handler> = state.clone();
        let events = state.events();
        let options = ServerOptions::for_current_user(max_frame);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| DaemonError::io("<thread>", e))
        };
        let mut threads = Vec::new();
        threads.push(spawn(
            "pairstyle-server",
            Box::new(move || {
                rt.block_on(server::serve(listener, handler, events, options, stop_rx));
            }),
        )?);
        let s = state.clone();
        threads.push(spawn(
            "pairstyle-scanner",
            Box::new(move || s.scanner_loop()),
        )?);
        let s = state.clone();
        threads.push(spawn(
            "pairstyle-worker",
            Box::new(move || s.worker_loop()),
        )?);
        tracing::info!(
            "embedded daemon: watching {}, socket {}, library {}",
            state.paths.watch.display(),
            socket.display(),
            state.paths.library.display()
        );
        Ok(Self {
            state,
            stop,
            threads,
            socket,
        })
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's shared state (paths, journal, library).
    pub fn state(&self) -> &Arc<DaemonState> {
        &self.state
    }

    /// Stop it and wait for its threads (a running job is interrupted, to resume later).
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        tracing::info!("stopping the embedded daemon");
        self.state.request_shutdown();
        let _ = self.stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for EmbeddedDaemon {
    fn drop(&mut self) {
        self.stop_threads();
    }
}
