//! The daemon's IPC server: a Unix socket (mode 0600 in a 0700 folder) speaking
//! [`super::protocol`]. Each connection must come from the allowed uid (checked with the peer's
//! credentials), greet with a hello of the same protocol version, then send requests; a handler
//! answers them. Bad frames get an error reply and the connection stays open; nothing a client
//! sends can stop the server. Connections that subscribed also receive every [`Event`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch, Semaphore};

use super::protocol::{
    answer_hello, decode, encode, request_id_of, ClientMessage, ErrorCode, Event, FrameDecoder,
    ReplyBody, Request, ServerMessage,
};
use super::{DaemonError, DaemonResult};

/// Answers the requests of connected clients (the daemon implements it; so can tests).
pub trait Handler: Send + Sync + 'static {
    /// The reply to one request, or an error code and message.
    fn handle(&self, request: Request) -> Result<ReplyBody, (ErrorCode, String)>;
}

/// Limits and access rules of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Largest frame in bytes.
    pub max_frame: usize,
    /// The only uid allowed to connect (normally the daemon's own).
    pub allowed_uid: u32,
    /// Most connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

impl ServerOptions {
    /// Options for the daemon's own user with the given frame cap.
    pub fn for_current_user(max_frame: usize) -> Self {
        Self {
            max_frame,
            allowed_uid: super::paths::current_uid(),
            max_connections: 64,
        }
    }
}

/// Bind the socket at `path`: a stale socket file left by a dead daemon is replaced, a live
/// daemon's is not. The socket is made mode 0600.
pub fn bind(path: &Path) -> DaemonResult<UnixListener> {
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(DaemonError::Config(format!(
                    "another daemon is listening on {}",
                    path.display()
                )))
            }
            Err(_) => {
                // Nobody answers: a socket file left by a daemon that died.
                std::fs::remove_file(path).map_err(|e| DaemonError::io(path, e))?;
            }
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| DaemonError::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| DaemonError::io(path, e))?;
    Ok(listener)
}

/// Serve connections until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    events: broadcast::Sender<Event>,
    options: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting a connection failed: {e}");
                continue;
            }
        };
        let handler = handler.clone();
        let events = events.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, handler, events, options, shutdown).await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
}

async fn send(
    w: &mut (impl AsyncWriteExt + Unpin),
    msg: &ServerMessage,
    max: usize,
) -> std::io::Result<()> {
    let line = match encode(msg, max) {
        Ok(l) => l,
        Err(e) => encode(
            &ServerMessage::error(None, ErrorCode::Internal, format!("reply not sent: {e}")),
            max,
        )
        .map_err(std::io::Error::other)?,
    };
    w.write_all(&line).await
}

async fn next_event(
    rx: &mut Option<broadcast::Receiver<Event>>,
) -> Result<Event, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Serve one connection.
async fn connection(
    stream: UnixStream,
    handler: Arc<dyn Handler>,
    events: broadcast::Sender<Event>,
    options: ServerOptions,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let max = options.max_frame;
    let (mut rd, mut wr) = stream.into_split();
    let uid = wr.as_ref().peer_cred()?.uid();
    if uid != options.allowed_uid {
        tracing::warn!("refused a connection from uid {uid}");
        let msg = ServerMessage::error(
            None,
            ErrorCode::PermissionDenied,
            format!("uid {uid} may not use this daemon"),
        );
        return send(&mut wr, &msg, max).await;
    }
    let mut decoder = FrameDecoder::new(max);
    let mut buf = vec![0u8; 16 * 1024];
    let mut greeted = false;
    let mut subscription: Option<broadcast::Receiver<Event>> = None;
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    if let Some(e) = decoder.finish() {
                        let _ = send(&mut wr, &ServerMessage::error(None, e.code(), e.to_string()), max).await;
                    }
                    return Ok(());
                }
                decoder.push(&buf[..n]);
                while let Some(line) = decoder.next_line() {
                    let reply = match line {
                        Err(e) => ServerMessage::error(None, e.code(), e.to_string()),
                        Ok(line) => match decode::<ClientMessage>(&line, max) {
                            Err(e) => ServerMessage::error(request_id_of(&line), e.code(), e.to_string()),
                            Ok(ClientMessage::Hello { version, .. }) => {
                                let answer = answer_hello(version);
                                greeted = matches!(answer, ServerMessage::Hello { .. });
                                answer
                            }
                            Ok(ClientMessage::Request { id, .. }) if !greeted => ServerMessage::error(
                                Some(id),
                                ErrorCode::HelloRequired,
                                "send a hello with the protocol version first",
                            ),
                            Ok(ClientMessage::Request { id, request: Request::Subscribe }) => {
                                subscription = Some(events.subscribe());
                                ServerMessage::Reply { id, body: Box::new(ReplyBody::Subscribed) }
                            }
                            Ok(ClientMessage::Request { id, request }) => match handler.handle(request) {
                                Ok(body) => ServerMessage::Reply { id, body: Box::new(body) },
                                Err((code, message)) => ServerMessage::error(Some(id), code, message),
                            },
                        },
                    };
                    send(&mut wr, &reply, max).await?;
                }
            }
            ev = next_event(&mut subscription) => match ev {
                Ok(event) => send(&mut wr, &ServerMessage::Event { event }, max).await?,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let msg = ServerMessage::error(None, ErrorCode::Internal, format!("{n} events dropped: this client reads too slowly"));
                    send(&mut wr, &msg, max).await?;
                }
                Err(broadcast::error::RecvError::Closed) => subscription = None,
            },
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// A blocking client, for `pairstyle status` and tests.
pub struct Client {
    stream: std::os::unix::net::UnixStream,
    decoder: FrameDecoder,
    max: usize,
    next_id: u64,
    /// Events received while waiting for replies, oldest first.
    pub events: std::collections::VecDeque<Event>,
}

impl Client {
    /// Connect to the socket and exchange hellos. `timeout` bounds every read.
    pub fn connect(path: &Path, name: &str, timeout: std::time::Duration) -> DaemonResult<Self> {
        let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
            DaemonError::io(
                path,
                std::io::Error::new(e.kind(), format!("cannot reach the daemon: {e}")),
            )
        })?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| DaemonError::io(path, e))?;
        let mut c = Self {
            stream,
            decoder: FrameDecoder::new(super::protocol::DEFAULT_MAX_FRAME),
            max: super::protocol::DEFAULT_MAX_FRAME,
            next_id: 1,
            events: Default::default(),
        };
        let sent = c.send_message(&ClientMessage::Hello {
            version: super::protocol::PROTOCOL_VERSION,
            client: name.to_string(),
        });
        // A daemon that refuses us writes its reason and closes at once, possibly before our
        // hello arrives (the write then fails with a broken pipe): read the reason anyway.
        let first = match (sent, c.read_message()) {
            (_, Ok(msg)) => msg,
            (Err(send_error), Err(_)) => return Err(send_error),
            (Ok(()), Err(e)) => return Err(e),
        };
        match first {
            ServerMessage::Hello { .. } => Ok(c),
            ServerMessage::Error { message, .. } => Err(DaemonError::Config(format!(
                "the daemon refused the connection: {message}"
            ))),
            other => Err(DaemonError::Config(format!(
                "unexpected first message from the daemon: {other:?}"
            ))),
        }
    }

    /// Send raw bytes (tests use it to send garbage).
    pub fn send_raw(&mut self, bytes: &[u8]) -> DaemonResult<()> {
        use std::io::Write;
        self.stream
            .write_all(bytes)
            .map_err(|e| DaemonError::io("<socket>", e))
    }

    fn send_message(&mut self, msg: &ClientMessage) -> DaemonResult<()> {
        let line = encode(msg, self.max)
            .map_err(|e| DaemonError::Config(format!("request not sent: {e}")))?;
        self.send_raw(&line)
    }

    /// Read the next message from the daemon.
    pub fn read_message(&mut self) -> DaemonResult<ServerMessage> {
        use std::io::Read;
        let mut buf = [0u8; 8192];
        loop {
            if let Some(m) = self.decoder.next_message::<ServerMessage>() {
                return m
                    .map_err(|e| DaemonError::Config(format!("bad message from the daemon: {e}")));
            }
            let n = self
                .stream
                .read(&mut buf)
                .map_err(|e| DaemonError::io("<socket>", e))?;
            if n == 0 {
                return Err(DaemonError::io(
                    "<socket>",
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the daemon closed the connection",
                    ),
                ));
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// Send a request and wait for its reply (events arriving meanwhile are kept in `events`).
    pub fn request(
        &mut self,
        request: Request,
    ) -> DaemonResult<Result<ReplyBody, (ErrorCode, String)>> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_message(&ClientMessage::Request { id, request })?;
        loop {
            match self.read_message()? {
                ServerMessage::Reply { id: rid, body } if rid == id => return Ok(Ok(*body)),
                ServerMessage::Error {
                    id: Some(rid),
                    code,
                    message,
                } if rid == id => return Ok(Err((code, message))),
                ServerMessage::Event { event } => self.events.push_back(event),
                _ => {}
            }
        }
    }
}
