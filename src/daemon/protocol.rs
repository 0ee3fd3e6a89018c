//! The IPC protocol between the daemon and its clients (`pairstyle status`, the terminal UI):
//! newline-delimited JSON over a Unix socket, one message per line.
//!
//! A connection starts with a hello from each side carrying [`PROTOCOL_VERSION`]; a daemon answers
//! a client of another version with an `unsupported_version` error. Then the client sends requests
//! with ids of its choosing and gets one reply (or error) per id. After `subscribe`, the daemon
//! also sends events (job queued, progress, sample ready, style registered, job failed...) on that
//! connection.
//!
//! ```text
//! → {"type":"hello","version":1,"client":"pairstyle-status"}
//! ← {"type":"hello","version":1,"server":"pairstyle 0.1.0"}
//! → {"type":"request","id":1,"request":{"op":"status"}}
//! ← {"type":"reply","id":1,"body":{"kind":"status",...}}
//! ← {"type":"event","event":{"kind":"progress","job":3,"step":40,"total":750,...}}
//! ```
//!
//! Lines are capped at a configured size. [`FrameDecoder`] splits a byte stream into lines and
//! turns an oversized, non-UTF-8, malformed or truncated line into a [`FrameError`] value (the
//! daemon replies with an error and keeps serving); it never panics and never buffers more than
//! the cap.

use std::collections::VecDeque;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::journal::{GenerateJob, Job, JobState};
use crate::library::StyleMeta;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default cap on one frame (line) in bytes.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// A message from a client to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// First message of a connection.
    Hello {
        /// The protocol version the client speaks.
        version: u32,
        /// Who is connecting, for logs.
        client: String,
    },
    /// A request; the daemon answers with a reply or an error carrying the same id.
    Request {
        /// Chosen by the client.
        id: u64,
        /// What is asked.
        request: Request,
    },
}

/// What a client can ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon, its devices and queue counts.
    Status,
    /// Every job.
    ListJobs,
    /// One job.
    Job {
        /// Its id.
        job: u64,
    },
    /// Queue a generation job.
    SubmitGenerate {
        /// What to render.
        job: GenerateJob,
        /// Higher runs first.
        #[serde(default)]
        priority: i32,
    },
    /// Cancel a job.
    Cancel {
        /// Its id.
        job: u64,
    },
    /// Keep a queued job from being picked up.
    Pause {
        /// Its id.
        job: u64,
    },
    /// Undo a pause.
    Resume {
        /// Its id.
        job: u64,
    },
    /// Queue a failed or cancelled job again.
    Retry {
        /// Its id.
        job: u64,
    },
    /// Change a job's priority.
    SetPriority {
        /// Its id.
        job: u64,
        /// The new priority.
        priority: i32,
    },
    /// The styles in the library.
    ListStyles,
    /// Rename a style.
    RenameStyle {
        /// Current name.
        from: String,
        /// New name.
        to: String,
    },
    /// Move a style to the daemon's trash folder (`<state dir>/trash/`); nothing is deleted.
    RemoveStyle {
        /// Its name.
        name: String,
    },
    /// Export a style as a LoRA file other tools load; answered with [`ReplyBody::Exported`].
    ExportStyle {
        /// Its name.
        name: String,
        /// `kohya` (A1111, ComfyUI, Forge) or `peft` (diffusers).
        format: String,
        /// Absolute path of the `.safetensors` file to write; absent: the daemon's
        /// `<state dir>/exports/<name>.<format>.safetensors`.
        #[serde(default)]
        output: Option<String>,
    },
    /// Also send events on this connection from now on.
    Subscribe,
}

/// Counts of jobs per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Waiting.
    pub queued: usize,
    /// Being worked on.
    pub running: usize,
    /// Stopped by a daemon stop, waiting to resume.
    pub interrupted: usize,
    /// Finished.
    pub done: usize,
    /// Failed.
    pub failed: usize,
    /// Cancelled.
    pub cancelled: usize,
}

impl QueueCounts {
    /// Count the jobs of a journal.
    pub fn of<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Self {
        let mut c = Self::default();
        for j in jobs {
            match j.state {
                JobState::Queued => c.queued += 1,
                JobState::Running => c.running += 1,
                JobState::Interrupted => c.interrupted += 1,
                JobState::Done => c.done += 1,
                JobState::Failed => c.failed += 1,
                JobState::Cancelled => c.cancelled += 1,
            }
        }
        c
    }
}

/// One compute device and what it is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// The device as configured (`cpu`, `cuda:0`...).
    pub device: String,
    /// The job it runs, if any.
    pub job: Option<u64>,
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// pairstyle's version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The watch folder.
    pub watch: String,
    /// The style library.
    pub library: String,
    /// The state folder.
    pub state_dir: String,
    /// Devices and their jobs.
    pub devices: Vec<DeviceStatus>,
    /// Jobs per state.
    pub queue: QueueCounts,
}

/// The body of a successful reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplyBody {
    /// For [`Request::Status`].
    Status(StatusReport),
    /// For [`Request::ListJobs`].
    Jobs {
        /// Every job.
        jobs: Vec<Job>,
    },
    /// For [`Request::Job`].
    Job {
        /// The job.
        job: Job,
    },
    /// For [`Request::SubmitGenerate`].
    Queued {
        /// The new job's id.
        job: u64,
    },
    /// For [`Request::ListStyles`].
    Styles {
        /// The styles.
        styles: Vec<StyleMeta>,
    },
    /// For [`Request::ExportStyle`]: where the file was written.
    Exported {
        /// The LoRA file.
        path: String,
    },
    /// Done, nothing to report.
    Ok,
    /// For [`Request::Subscribe`]: events follow.
    Subscribed,
}

/// Why a request or frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not a valid message.
    BadFrame,
    /// The line exceeds the size cap.
    FrameTooLarge,
    /// The client speaks another protocol version.
    UnsupportedVersion,
    /// A request came before the hello.
    HelloRequired,
    /// No such job.
    UnknownJob,
    /// The request is well-formed but cannot be done (e.g. cancel a finished job).
    InvalidRequest,
    /// The daemon failed to do it.
    Internal,
    /// The connecting user may not use this daemon.
    PermissionDenied,
}

/// Something that happened, sent to subscribed connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A job was queued.
    JobQueued {
        /// Its id.
        job: u64,
        /// `train` or `generate`.
        what: String,
        /// The style name of a training job.
        name: Option<String>,
    },
    /// A running job advanced.
    Progress {
        /// Its id.
        job: u64,
        /// Steps done.
        step: usize,
        /// Steps in all.
        total: usize,
        /// Latest loss (training: content loss).
        loss: Option<f32>,
        /// Latest style loss.
        loss_style: Option<f32>,
        /// Steps per second.
        it_per_s: f64,
        /// Estimated seconds left.
        eta_secs: Option<f64>,
    },
    /// An image (a generated PNG or a style's sample grid) was written.
    SampleReady {
        /// The job that wrote it.
        job: u64,
        /// Its path.
        path: String,
    },
    /// Training finished and the style is in the library.
    StyleRegistered {
        /// The training job.
        job: u64,
        /// The style's name.
        name: String,
        /// Its folder.
        path: String,
    },
    /// A job finished.
    JobDone {
        /// Its id.
        job: u64,
        /// What it produced.
        result: Option<String>,
    },
    /// A job failed.
    JobFailed {
        /// Its id.
        job: u64,
        /// Why.
        error: String,
    },
    /// A job was cancelled.
    JobCancelled {
        /// Its id.
        job: u64,
    },
    /// A dropped pair was moved to `failed/`.
    PairRejected {
        /// The pair's name.
        name: String,
        /// Why.
        reason: String,
        /// Its folder under `failed/`.
        path: String,
    },
}

impl Event {
    /// A progress event; non-finite numbers (a diverged loss) are sent as absent or 0, since JSON
    /// has no NaN.
    pub fn progress(job: u64, p: &super::journal::JobProgress) -> Self {
        let p = p.sanitized();
        Event::Progress {
            job,
            step: p.step,
            total: p.total,
            loss: p.loss,
            loss_style: p.loss_style,
            it_per_s: p.it_per_s,
            eta_secs: p.eta_secs,
        }
    }
}

/// A message from the daemon to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The daemon's answer to the client's hello.
    Hello {
        /// The protocol version the daemon speaks.
        version: u32,
        /// The daemon's name and version.
        server: String,
    },
    /// A successful reply.
    Reply {
        /// The request's id.
        id: u64,
        /// The answer.
        body: Box<ReplyBody>,
    },
    /// A refused request or frame.
    Error {
        /// The request's id, when the frame was readable enough to have one.
        id: Option<u64>,
        /// What kind of problem.
        code: ErrorCode,
        /// In words.
        message: String,
    },
    /// An event (subscribed connections only).
    Event {
        /// What happened.
        event: Event,
    },
}

impl ServerMessage {
    /// An error message.
    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            id,
            code,
            message: message.into(),
        }
    }

    /// The daemon's hello.
    pub fn hello() -> Self {
        ServerMessage::Hello {
            version: PROTOCOL_VERSION,
            server: format!("pairstyle {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// The daemon's answer to a client hello: its own hello, or an error if the versions differ.
pub fn answer_hello(client_version: u32) -> ServerMessage {
    if client_version == PROTOCOL_VERSION {
        ServerMessage::hello()
    } else {
        ServerMessage::error(
            None,
            ErrorCode::UnsupportedVersion,
            format!(
                "the client speaks protocol version {client_version}, this daemon speaks \
                 {PROTOCOL_VERSION}: use the pairstyle that matches the daemon"
            ),
        )
    }
}

/// A line that could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The line is longer than the cap (it is skipped up to its newline).
    #[error("frame of at least {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Bytes seen (at least).
        size: usize,
        /// The cap.
        max: usize,
    },
    /// The line is not UTF-8.
    #[error("frame is not valid UTF-8")]
    NotUtf8,
    /// The line is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a line.
    #[error("connection closed in the middle of a frame ({0} bytes without a newline)")]
    Truncated(usize),
}

impl FrameError {
    /// The protocol error code for this problem.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// One message as a line (JSON and a newline); refused if longer than `max`.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut v = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if v.len() > max {
        return Err(FrameError::TooLarge { size: v.len(), max });
    }
    v.push(b'\n');
    Ok(v)
}

/// Parse one line (without its newline) as a message.
pub fn decode<T: DeserializeOwned>(line: &[u8], max: usize) -> Result<T, FrameError> {
    if line.len() > max {
        return Err(FrameError::TooLarge {
            size: line.len(),
            max,
        });
    }
    let text = std::str::from_utf8(line).map_err(|_| FrameError::NotUtf8)?;
    serde_json::from_str(text).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// The `id` of a line that is a JSON object with a numeric `id` (or `request.id`), so a request
/// that fails to decode can still be answered by id.
pub fn request_id_of(line: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("id").and_then(serde_json::Value::as_u64)
}

/// Splits a byte stream into lines of at most `max` bytes, whatever the chunking.
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    buf: Vec<u8>,
    /// Bytes of an oversized line skipped so far; `Some` while skipping to its newline.
    skipping: Option<usize>,
    ready: VecDeque<Result<Vec<u8>, FrameError>>,
}

impl FrameDecoder {
    /// A decoder with a cap of `max` bytes per line.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            buf: Vec::new(),
            skipping: None,
            ready: VecDeque::new(),
        }
    }

    /// Bytes held for an unfinished line (never more than the cap).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feed bytes as they arrive.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let (part, rest) = match newline {
                Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
                None => (bytes, None),
            };
            if let Some(skipped) = self.skipping.as_mut() {
                *skipped += part.len();
            } else if self.buf.len() + part.len() > self.max {
                self.skipping = Some(self.buf.len() + part.len());
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(part);
            }
            match rest {
                None => break,
                Some(rest) => {
                    self.end_line();
                    bytes = rest;
                }
            }
        }
    }

    fn end_line(&mut self) {
        if let Some(size) = self.skipping.take() {
            self.ready.push_back(Err(FrameError::TooLarge {
                size,
                max: self.max,
            }));
            return;
        }
        let mut line = std::mem::take(&mut self.buf);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return; // blank lines are keep-alives
        }
        self.ready.push_back(Ok(line));
    }

    /// The next complete line, or the problem with it.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, FrameError>> {
        self.ready.pop_front()
    }

    /// The next complete line parsed as a message.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Option<Result<T, FrameError>> {
        let max = self.max;
        self.next_line()
            .map(|line| line.and_then(|l| decode(&l, max)))
    }

    /// At the end of the stream: the unfinished line, if any, as [`FrameError::Truncated`].
    pub fn finish(&mut self) -> Option<FrameError> {
        let pending = match self.skipping.take() {
            Some(n) => n,
            None => std::mem::take(&mut self.buf)
                .iter()
                .filter(|b| !b.is_ascii_whitespace())
                .count(),
        };
        self.buf.clear();
        (pending > 0).then_some(FrameError::Truncated(pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::journal::StyleWeight;

    #[test]
    fn messages_look_as_documented() {
        let hello = ClientMessage::Hello {
            version: 1,
            client: "t".into(),
        };
        assert_eq!(
            String::from_utf8(encode(&hello, 1024).unwrap()).unwrap(),
            "{\"type\":\"hello\",\"version\":1,\"client\":\"t\"}\n"
        );
        let req: ClientMessage = decode(
            br#"{"type":"request","id":1,"request":{"op":"status"}}"#,
            1024,
        )
        .unwrap();
        assert_eq!(
            req,
            ClientMessage::Request {
                id: 1,
                request: Request::Status
            }
        );
        let gen: ClientMessage = decode(
            br#"{"type":"request","id":2,"request":{"op":"submit_generate","job":{"prompt":"a cat","styles":[{"name":"ink","lambda":3.0},{"name":"oil","lambda":null}]}}}"#,
            4096,
        )
        .unwrap();
        let ClientMessage::Request {
            request: Request::SubmitGenerate { job, priority },
            ..
        } = gen
        else {
            panic!("{gen:?}")
        };
        assert_eq!(priority, 0);
        assert_eq!(
            job.styles,
            [
                StyleWeight {
                    name: "ink".into(),
                    lambda: Some(3.0)
                },
                StyleWeight {
                    name: "oil".into(),
                    lambda: None
                }
            ]
        );
        let ev = ServerMessage::Event {
            event: Event::JobFailed {
                job: 3,
                error: "boom".into(),
            },
        };
        assert_eq!(
            String::from_utf8(encode(&ev, 1024).unwrap()).unwrap(),
            "{\"type\":\"event\",\"event\":{\"kind\":\"job_failed\",\"job\":3,\"error\":\"boom\"}}\n"
        );
    }

    #[test]
    fn hello_checks_the_version() {
        assert!(matches!(
            answer_hello(PROTOCOL_VERSION),
            ServerMessage::Hello {
                version: PROTOCOL_VERSION,
                ..
            }
        ));
        assert!(matches!(
            answer_hello(PROTOCOL_VERSION + 1),
            ServerMessage::Error {
                code: ErrorCode::UnsupportedVersion,
                ..
            }
        ));
    }

    #[test]
    fn unknown_fields_and_ops_are_malformed() {
        for line in [
            &br#"{"type":"request","id":1,"request":{"op":"explode"}}"#[..],
            br#"{"type":"request","id":1,"request":{"op":"cancel","job":1,"x":1}}"#,
            br#"{"type":"hullo","version":1,"client":"x"}"#,
            br#"{"type":"request","id":-1,"request":{"op":"status"}}"#,
            br#"[1,2,3]"#,
            br#""hello""#,
        ] {
            let r: Result<ClientMessage, _> = decode(line, 1024);
            assert!(matches!(r, Err(FrameError::Malformed(_))), "{r:?}");
        }
        assert_eq!(
            request_id_of(br#"{"type":"request","id":7,"request":{"op":"explode"}}"#),
            Some(7)
        );
        assert_eq!(request_id_of(b"garbage"), None);
    }

    #[test]
    fn decoder_splits_caps_and_resyncs() {
        let mut d = FrameDecoder::new(16);
        d.push(b"{\"a\":1}\r\n\n  \n{\"b\"");
        d.push(b":2}\n");
        d.push(&[b'x'; 40]);
        assert!(d.buffered() <= 16);
        d.push(b"yy\n\xff\xfe\n{}\n[1");
        assert_eq!(d.next_line(), Some(Ok(b"{\"a\":1}".to_vec())));
        assert_eq!(d.next_line(), Some(Ok(b"{\"b\":2}".to_vec())));
        assert_eq!(
            d.next_line(),
            Some(Err(FrameError::TooLarge { size: 42, max: 16 }))
        );
        let not_utf8: Option<Result<serde_json::Value, _>> = d.next_message();
        assert_eq!(not_utf8, Some(Err(FrameError::NotUtf8)));
        assert_eq!(d.next_line(), Some(Ok(b"{}".to_vec())));
        assert_eq!(d.next_line(), None);
        assert_eq!(d.finish(), Some(FrameError::Truncated(2)));
        assert_eq!(d.finish(), None);
    }

    #[test]
    fn non_finite_progress_is_sent_as_valid_json() {
        let p = crate::daemon::journal::JobProgress {
            step: 1,
            total: 2,
            loss: Some(f32::NAN),
            loss_style: Some(f32::INFINITY),
            it_per_s: f64::NAN,
            eta_secs: Some(f64::INFINITY),
        };
        let msg = ServerMessage::Event {
            event: Event::progress(4, &p),
        };
        let line = encode(&msg, 1024).unwrap();
        let back: ServerMessage = decode(&line[..line.len() - 1], 1024).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn encode_refuses_oversized_messages() {
        let big = ClientMessage::Hello {
            version: 1,
            client: "x".repeat(2000),
        };
        assert!(matches!(
            encode(&big, 1024),
            Err(FrameError::TooLarge { max: 1024, .. })
        ));
    }
}
