//! The UI's link to the daemon, on a background thread so the UI never waits for it.
//!
//! The thread runs a small tokio runtime. It connects to the socket, exchanges hellos, subscribes
//! to events and then forwards [`Command::Send`] requests and turns every reply and event into an
//! [`Action`] sent back over a channel. When the connection breaks (a daemon restart), it says so
//! and reconnects with a growing pause (up to [`MAX_BACKOFF`]). Reads that are already in flight
//! (status, jobs, styles, a drop-folder scan) are not asked again until answered, so a busy
//! daemon is not flooded. File work (decoding pictures, scanning the drop folder) runs on
//! tokio's blocking pool.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::action::{Action, Command};
use super::{disk, TuiError};
use crate::daemon::protocol::{
    decode, encode, ClientMessage, FrameDecoder, Request, ServerMessage, DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
};

/// Longest pause between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3);
/// How long the daemon has to answer the hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Seconds a dropped pair must stay unchanged (for the drop-folder view's countdown).
    pub stability_secs: u64,
    /// The name sent in the hello.
    pub name: String,
}

/// The handle the UI keeps: send commands; dropping it stops the thread.
pub struct ClientHandle {
    commands: Option<UnboundedSender<Command>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClientHandle {
    /// Queue a command (never blocks).
    pub fn send(&self, command: Command) {
        if let Some(tx) = &self.commands {
            let _ = tx.send(command);
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop.
        self.commands = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start the client thread; actions arrive on `actions`.
pub fn spawn(settings: ClientSettings, actions: Sender<Action>) -> Result<ClientHandle, TuiError> {
    let (tx, rx) = unbounded_channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TuiError::Client(format!("cannot start the client runtime: {e}")))?;
    let thread = std::thread::Builder::new()
        .name("pairstyle-tui-client".into())
        .spawn(move || {
            rt.block_on(run(settings, rx, actions));
            rt.shutdown_timeout(Duration::from_millis(500));
        })
        .map_err(|e| TuiError::Client(format!("cannot start the client thread: {e}")))?;
    Ok(ClientHandle {
        commands: Some(tx),
        thread: Some(thread),
    })
}

/// Why a connection ended.
enum End {
    /// The UI is gone: stop.
    Quit,
    /// The connection broke: reconnect.
    Broken(String),
}

/// Shared state of the work the client does.
struct Ctx {
    settings: ClientSettings,
    actions: Sender<Action>,
    scanning: Arc<AtomicBool>,
}

async fn run(
    settings: ClientSettings,
    mut commands: UnboundedReceiver<Command>,
    actions: Sender<Action>,
) {
    let ctx = Ctx {
        settings,
        actions,
        scanning: Arc::new(AtomicBool::new(false)),
    };
    let mut attempts: u32 = 0;
    loop {
        let reason = match connect(&ctx).await {
            Ok((stream, server)) => {
                attempts = 0;
                let _ = ctx.actions.send(Action::Connected { server });
                match serve(&ctx, stream, &mut commands).await {
                    End::Quit => return,
                    End::Broken(r) => r,
                }
            }
            Err(r) => r,
        };
        attempts = attempts.saturating_add(1);
        if ctx
            .actions
            .send(Action::Disconnected { reason, attempts })
            .is_err()
        {
            return;
        }
        // Wait before retrying, still doing local work and answering requests with an error.
        let pause = backoff(attempts);
        let deadline = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(Command::Send(request)) => {
                        let _ = ctx.actions.send(Action::Reply {
                            request,
                            result: Err("not connected to the daemon".into()),
                        });
                    }
                    Some(local) => run_local(&ctx, local),
                },
            }
        }
    }
}

/// The pause after `attempts` failed attempts: 250 ms doubling up to [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> Duration {
    let ms = 250u64.saturating_mul(1 << attempts.min(6).saturating_sub(1));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}

async fn write(stream: &mut UnixStream, msg: &ClientMessage) -> Result<(), String> {
    let line = encode(msg, DEFAULT_MAX_FRAME).map_err(|e| e.to_string())?;
    stream
        .write_all(&line)
        .await
        .map_err(|e| format!("writing to the daemon: {e}"))
}

/// Connect, exchange hellos and subscribe; returns the stream and the daemon's name.
async fn connect(ctx: &Ctx) -> Result<(UnixStream, String), String> {
    let socket = &ctx.settings.socket;
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("no daemon on {}: {e}", socket.display()))?;
    // A daemon that refuses us writes its reason and closes, maybe before our hello arrives:
    // a failed write is reported only if there is no reason to read.
    let sent = write(
        &mut stream,
        &ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            client: ctx.settings.name.clone(),
        },
    )
    .await;
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = vec![0u8; 8192];
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        loop {
            if let Some(m) = decoder.next_message::<ServerMessage>() {
                return m.map_err(|e| format!("bad hello from the daemon: {e}"));
            }
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading the daemon's hello: {e}"))?;
            if n == 0 {
                return Err("the daemon closed the connection".to_string());
            }
            decoder.push(&buf[..n]);
        }
    })
    .await
    .map_err(|_| "the daemon did not answer the hello".to_string())
    .and_then(|r| r);
    let hello = match (hello, sent) {
        (Ok(m), _) => m,
        (Err(_), Err(send_error)) => return Err(send_error),
        (Err(e), Ok(())) => return Err(e),
    };
    let server = match hello {
        ServerMessage::Hello { server, .. } => server,
        ServerMessage::Error { message, .. } => {
            return Err(format!("the daemon refused the connection: {message}"))
        }
        other => return Err(format!("unexpected first message: {other:?}")),
    };
    write(
        &mut stream,
        &ClientMessage::Request {
            id: 0,
            request: Request::Subscribe,
        },
    )
    .await?;
    Ok((stream, server))
}

/// Reads that are worth sending only once at a time.
fn coalesced(r: &Request) -> bool {
    matches!(r, Request::Status | Request::ListJobs | Request::ListStyles)
}

/// Serve one connection until it breaks or the UI goes away.
async fn serve(ctx: &Ctx, stream: UnixStream, commands: &mut UnboundedReceiver<Command>) -> End {
    let (mut rd, mut wr) = stream.into_split();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: HashMap<u64, Request> = HashMap::new();
    let mut next_id: u64 = 1;
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = match n {
                    Ok(0) => return End::Broken("the daemon closed the connection".into()),
                    Ok(n) => n,
                    Err(e) => return End::Broken(format!("reading from the daemon: {e}")),
                };
                decoder.push(&buf[..n]);
                while let Some(line) = decoder.next_line() {
                    let msg = line.and_then(|l| decode::<ServerMessage>(&l, DEFAULT_MAX_FRAME));
                    let action = match msg {
                        Err(e) => Some(Action::DaemonError {
                            message: format!("unreadable message from the daemon: {e}"),
                        }),
                        Ok(m) => to_action(m, &mut pending),
                    };
                    if let Some(a) = action {
                        if ctx.actions.send(a).is_err() {
                            return End::Quit;
                        }
                    }
                }
            }
            cmd = commands.recv() => match cmd {
                None => return End::Quit,
                Some(Command::Send(request)) => {
                    if coalesced(&request) && pending.values().any(|r| r == &request) {
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    let msg = ClientMessage::Request { id, request: request.clone() };
                    let line = match encode(&msg, DEFAULT_MAX_FRAME) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ctx.actions.send(Action::Reply { request, result: Err(e.to_string()) });
                            continue;
                        }
                    };
                    pending.insert(id, request);
                    if let Err(e) = wr.write_all(&line).await {
                        return End::Broken(format!("writing to the daemon: {e}"));
                    }
                }
                Some(local) => run_local(ctx, local),
            },
        }
    }
}

/// A message from the daemon as an action (`None` for what the UI does not need).
fn to_action(msg: ServerMessage, pending: &mut HashMap<u64, Request>) -> Option<Action> {
    match msg {
        ServerMessage::Reply { id, body } => {
            let request = pending.remove(&id)?;
            Some(Action::Reply {
                request,
                result: Ok(*body),
            })
        }
        ServerMessage::Error { id, message, .. } => {
            match id.and_then(|id| pending.remove(&id)) {
                Some(request) => Some(Action::Reply {
                    request,
                    result: Err(message),
                }),
                // Not about a request (e.g. events dropped for a slow reader).
                None => Some(Action::DaemonError { message }),
            }
        }
        ServerMessage::Event { event } => Some(Action::Event(event)),
        ServerMessage::Hello { .. } => None,
    }
}

/// Do file work on the blocking pool; its result comes back as an action.
fn run_local(ctx: &Ctx, command: Command) {
    let tx = ctx.actions.clone();
    match command {
        Command::Send(_) => {}
        Command::LoadPicture(path) => {
            tokio::task::spawn_blocking(move || {
                let result = disk::load_picture(&path).map_err(|e| e.to_string());
                let _ = tx.send(Action::PictureLoaded { path, result });
            });
        }
        Command::FindStyleAssets { name, dir } => {
            tokio::task::spawn_blocking(move || {
                let assets = disk::find_style_assets(&dir);
                let _ = tx.send(Action::StyleAssets { name, assets });
            });
        }
        Command::ScanDropFolder { watch } => {
            if ctx.scanning.swap(true, Ordering::SeqCst) {
                return;
            }
            let busy = ctx.scanning.clone();
            let stability = ctx.settings.stability_secs;
            tokio::task::spawn_blocking(move || {
                let snap = disk::scan_drop_folder(&watch, stability, SystemTime::now());
                busy.store(false, Ordering::SeqCst);
                let _ = tx.send(Action::DropFolder(snap));
            });
        }
        Command::RetryDropped { name, path, watch } => {
            tokio::task::spawn_blocking(move || {
                let result = disk::retry_failed_pair(&path, &watch).map_err(|e| e.to_string());
                let _ = tx.send(Action::DropRetried { name, result });
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::protocol::{Event, ReplyBody};

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(1));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn replies_are_matched_to_their_requests() {
        let mut pending = HashMap::new();
        pending.insert(4, Request::ListStyles);
        let a = to_action(
            ServerMessage::Reply {
                id: 4,
                body: Box::new(ReplyBody::Styles { styles: vec![] }),
            },
            &mut pending,
        );
        assert_eq!(
            a,
            Some(Action::Reply {
                request: Request::ListStyles,
                result: Ok(ReplyBody::Styles { styles: vec![] })
            })
        );
        assert!(pending.is_empty());
        // A reply nobody asked for (the subscription's) is dropped.
        let none = to_action(
            ServerMessage::Reply {
                id: 0,
                body: Box::new(ReplyBody::Subscribed),
            },
            &mut pending,
        );
        assert_eq!(none, None);
        let ev = to_action(
            ServerMessage::Event {
                event: Event::JobCancelled { job: 2 },
            },
            &mut pending,
        );
        assert_eq!(ev, Some(Action::Event(Event::JobCancelled { job: 2 })));
    }
}
