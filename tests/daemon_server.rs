//! The IPC server on a real Unix socket: hello and requests, the event stream, the uid check,
//! stale sockets, and concurrent clients sending over a thousand random frames (garbage,
//! truncated, oversized, valid) without the server failing or any frame going unanswered.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{broadcast, watch};

use pairstyle::daemon::paths::current_uid;
use pairstyle::daemon::protocol::{
    encode, ClientMessage, ErrorCode, Event, FrameDecoder, ReplyBody, Request, ServerMessage,
    PROTOCOL_VERSION,
};
use pairstyle::daemon::server::{bind, serve, Client, Handler, ServerOptions};

const MAX: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(20);

struct TestHandler;

impl Handler for TestHandler {
    fn handle(&self, request: Request) -> Result<ReplyBody, (ErrorCode, String)> {
        match request {
            Request::Cancel { job: 1 } => Ok(ReplyBody::Ok),
            Request::Cancel { job } => Err((ErrorCode::UnknownJob, format!("no job {job}"))),
            Request::ListJobs => Ok(ReplyBody::Jobs { jobs: vec![] }),
            _ => Ok(ReplyBody::Ok),
        }
    }
}

/// A server running on its own thread until dropped.
struct Running {
    dir: PathBuf,
    socket: PathBuf,
    events: broadcast::Sender<Event>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(name: &str, allowed_uid: u32) -> Self {
        let dir = common::scratch_dir("daemon-server", name);
        let socket = dir.join("d.sock");
        let (events, _) = broadcast::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = socket.clone();
        let ev = events.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = bind(&path).unwrap();
                ready_tx.send(()).unwrap();
                let options = ServerOptions {
                    max_frame: MAX,
                    allowed_uid,
                    max_connections: 32,
                };
                serve(listener, Arc::new(TestHandler), ev, options, stop_rx).await;
            });
        });
        ready_rx.recv_timeout(TIMEOUT).unwrap();
        Self {
            dir,
            socket,
            events,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn raw(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Read `n` messages from a raw connection.
fn read_n(s: &mut UnixStream, dec: &mut FrameDecoder, n: usize) -> Vec<ServerMessage> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while out.len() < n {
        while let Some(m) = dec.next_message::<ServerMessage>() {
            out.push(m.expect("the server sent a malformed line"));
        }
        if out.len() >= n {
            break;
        }
        let k = s.read(&mut buf).expect("no reply in time");
        assert!(
            k > 0,
            "server closed the connection after {} replies",
            out.len()
        );
        dec.push(&buf[..k]);
    }
    out
}

fn line(m: &ClientMessage) -> Vec<u8> {
    encode(m, MAX).unwrap()
}

#[test]
fn hello_requests_and_socket_mode() {
    let srv = Running::start("basic", current_uid());
    let mode = std::fs::metadata(&srv.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut c = Client::connect(&srv.socket, "test", TIMEOUT).unwrap();
    assert_eq!(
        c.request(Request::ListJobs).unwrap(),
        Ok(ReplyBody::Jobs { jobs: vec![] })
    );
    assert_eq!(
        c.request(Request::Cancel { job: 1 }).unwrap(),
        Ok(ReplyBody::Ok)
    );
    let (code, msg) = c.request(Request::Cancel { job: 9 }).unwrap().unwrap_err();
    assert_eq!(code, ErrorCode::UnknownJob);
    assert!(msg.contains('9'));
}

#[test]
fn requests_need_a_hello_of_the_same_version() {
    let srv = Running::start("hello", current_uid());
    let mut s = raw(&srv.socket);
    let mut dec = FrameDecoder::new(MAX);
    s.write_all(&line(&ClientMessage::Request {
        id: 5,
        request: Request::Status,
    }))
    .unwrap();
    s.write_all(&line(&ClientMessage::Hello {
        version: PROTOCOL_VERSION + 1,
        client: "future".into(),
    }))
    .unwrap();
    s.write_all(&line(&ClientMessage::Request {
        id: 6,
        request: Request::Status,
    }))
    .unwrap();
    let got = read_n(&mut s, &mut dec, 3);
    assert!(
        matches!(
            &got[0],
            ServerMessage::Error {
                id: Some(5),
                code: ErrorCode::HelloRequired,
                ..
            }
        ),
        "{got:?}"
    );
    assert!(
        matches!(
            &got[1],
            ServerMessage::Error {
                code: ErrorCode::UnsupportedVersion,
                ..
            }
        ),
        "{got:?}"
    );
    assert!(
        matches!(
            &got[2],
            ServerMessage::Error {
                id: Some(6),
                code: ErrorCode::HelloRequired,
                ..
            }
        ),
        "{got:?}"
    );
}

#[test]
fn subscribers_receive_events() {
    let srv = Running::start("events", current_uid());
    let mut c = Client::connect(&srv.socket, "tui", TIMEOUT).unwrap();
    let mut other = Client::connect(&srv.socket, "status", TIMEOUT).unwrap();
    assert_eq!(
        c.request(Request::Subscribe).unwrap(),
        Ok(ReplyBody::Subscribed)
    );
    let ev = Event::JobFailed {
        job: 3,
        error: "out of memory".into(),
    };
    srv.events.send(ev.clone()).unwrap();
    assert_eq!(
        c.read_message().unwrap(),
        ServerMessage::Event { event: ev }
    );
    // A connection that did not subscribe gets replies only.
    assert_eq!(
        other.request(Request::ListJobs).unwrap(),
        Ok(ReplyBody::Jobs { jobs: vec![] })
    );
    assert!(other.events.is_empty());
}

#[test]
fn another_uid_is_refused() {
    let srv = Running::start("uid", current_uid().wrapping_add(1));
    let e = Client::connect(&srv.socket, "intruder", TIMEOUT)
        .err()
        .expect("connection accepted from a foreign uid")
        .to_string();
    assert!(e.contains("may not use this daemon"), "{e}");
}

#[test]
fn stale_sockets_are_replaced_and_live_ones_kept() {
    let srv = Running::start("stale", current_uid());
    // A second daemon on the same socket is refused.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt.block_on(async { bind(&srv.socket).err().unwrap().to_string() });
    assert!(e.contains("another daemon"), "{e}");
    // A socket file nobody listens on is replaced.
    let stale = srv.dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    rt.block_on(async { bind(&stale).unwrap() });
}

fn random_frame(rng: &mut StdRng, id: u64) -> (Vec<u8>, Option<u64>) {
    let mut v: Vec<u8> = match rng.random_range(0..6) {
        0 => {
            let req = match rng.random_range(0..3) {
                0 => Request::ListJobs,
                1 => Request::Cancel { job: 1 },
                _ => Request::Status,
            };
            return (line(&ClientMessage::Request { id, request: req }), Some(id));
        }
        1 => (0..rng.random_range(1..300))
            .map(|_| rng.random())
            .collect(),
        2 => {
            let mut l = line(&ClientMessage::Request {
                id,
                request: Request::ListStyles,
            });
            l.truncate(rng.random_range(1..l.len() - 1));
            l
        }
        3 => vec![b'x'; rng.random_range(MAX + 1..2 * MAX)],
        4 => br#"{"type":"request","id":1,"request":{"op":"cancel","job":"one"}}"#.to_vec(),
        _ => b"\xff\xfe\xfd".to_vec(),
    };
    for b in v.iter_mut() {
        if *b == b'\n' {
            *b = b'.';
        }
    }
    v[0] = b'#'; // never a blank line
    v.push(b'\n');
    (v, None)
}

#[test]
fn concurrent_clients_sending_random_frames_are_all_answered() {
    let srv = Running::start("fuzz", current_uid());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let path = srv.socket.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + t);
                let mut s = raw(&path);
                let mut dec = FrameDecoder::new(MAX);
                let mut hello = line(&ClientMessage::Hello {
                    version: PROTOCOL_VERSION,
                    client: format!("fuzz {t}"),
                });
                let mut stream = std::mem::take(&mut hello);
                let mut valid_ids = Vec::new();
                let frames = 160;
                for i in 0..frames {
                    let (f, id) = random_frame(&mut rng, 1000 + i as u64);
                    stream.extend_from_slice(&f);
                    valid_ids.extend(id);
                }
                // Send in random chunks.
                let mut pos = 0;
                while pos < stream.len() {
                    let n = rng.random_range(1..=900).min(stream.len() - pos);
                    s.write_all(&stream[pos..pos + n]).unwrap();
                    pos += n;
                }
                let got = read_n(&mut s, &mut dec, 1 + frames);
                assert!(
                    matches!(got[0], ServerMessage::Hello { .. }),
                    "{:?}",
                    got[0]
                );
                let replied: Vec<u64> = got
                    .iter()
                    .filter_map(|m| match m {
                        ServerMessage::Reply { id, .. } => Some(*id),
                        _ => None,
                    })
                    .collect();
                assert_eq!(
                    replied, valid_ids,
                    "thread {t}: every valid request answered, in order"
                );
                frames
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(total >= 1000);
    // Still serving, and a truncated last frame on close does not hurt it.
    {
        let mut s = raw(&srv.socket);
        s.write_all(b"{\"type\":\"hel").unwrap();
    }
    let mut c = Client::connect(&srv.socket, "after", TIMEOUT).unwrap();
    assert_eq!(c.request(Request::Status).unwrap(), Ok(ReplyBody::Ok));
}
