//! Fuzz-style test of the IPC frame decoder: thousands of seeded random frames (valid messages,
//! garbage, truncated and mutated messages, oversized and deeply nested lines, non-UTF-8 bytes)
//! fed in random chunks. Every frame must give exactly one result, in order; valid frames must
//! decode to what was sent; nothing may panic; the decoder's buffer never exceeds the cap.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use pairstyle::daemon::journal::{GenerateJob, StyleWeight};
use pairstyle::daemon::protocol::{
    decode, encode, ClientMessage, Event, FrameDecoder, FrameError, ReplyBody, Request,
    ServerMessage, PROTOCOL_VERSION,
};

const MAX: usize = 4096;
const FRAMES: usize = 3000;

fn valid_messages() -> Vec<ClientMessage> {
    let mut v = vec![
        ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            client: "fuzz ✓ \"quoted\" \n newline".into(),
        },
        ClientMessage::Request {
            id: 0,
            request: Request::Status,
        },
        ClientMessage::Request {
            id: u64::MAX,
            request: Request::ListJobs,
        },
        ClientMessage::Request {
            id: 9,
            request: Request::SetPriority {
                job: 3,
                priority: -7,
            },
        },
        ClientMessage::Request {
            id: 10,
            request: Request::RenameStyle {
                from: "a".into(),
                to: "b".into(),
            },
        },
        ClientMessage::Request {
            id: 11,
            request: Request::Subscribe,
        },
        ClientMessage::Request {
            id: 13,
            request: Request::ExportStyle {
                name: "ink".into(),
                format: "kohya".into(),
                output: Some("/tmp/ink.safetensors".into()),
            },
        },
        ClientMessage::Request {
            id: 14,
            request: Request::RemoveStyle { name: "ink".into() },
        },
    ];
    v.push(ClientMessage::Request {
        id: 12,
        request: Request::SubmitGenerate {
            job: GenerateJob {
                prompt: "a photo of a cat".into(),
                negative: Some("blurry".into()),
                styles: vec![
                    StyleWeight {
                        name: "ink".into(),
                        lambda: Some(3.0),
                    },
                    StyleWeight {
                        name: "oil".into(),
                        lambda: Some(2.5),
                    },
                ],
                seed: Some(42),
                steps: Some(20),
                cfg: Some(5.0),
                width: Some(512),
                height: None,
                scheduler: Some("ddim".into()),
                style_from: Some(4),
                lora_scale: None,
            },
            priority: 2,
        },
    });
    v
}

// A test table entry; its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Expect {
    /// Must decode to this message.
    Valid(ClientMessage),
    /// Must be an error (of this kind, when given).
    Invalid(Option<fn(&FrameError) -> bool>),
    /// Anything but a panic (a mutation may happen to stay valid).
    Either,
}

fn random_frame(rng: &mut StdRng, msgs: &[ClientMessage]) -> (Vec<u8>, Expect) {
    let pick = |rng: &mut StdRng| msgs[rng.random_range(0..msgs.len())].clone();
    let line = |m: &ClientMessage| {
        let mut l = encode(m, MAX).unwrap();
        l.pop();
        l
    };
    let no_newlines = |mut v: Vec<u8>| {
        for b in v.iter_mut() {
            if *b == b'\n' {
                *b = b' ';
            }
        }
        v
    };
    match rng.random_range(0..9) {
        0 | 1 => {
            let m = pick(rng);
            (line(&m), Expect::Valid(m))
        }
        2 => {
            // Random bytes, never blank (blank lines are skipped by design).
            let n = rng.random_range(1..200);
            let mut v: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            v[0] = b'#';
            (no_newlines(v), Expect::Invalid(None))
        }
        3 => {
            // A valid message cut short.
            let l = line(&pick(rng));
            let cut = rng.random_range(1..l.len());
            (l[..cut].to_vec(), Expect::Invalid(None))
        }
        4 => {
            // A valid message with a few bytes flipped.
            let mut l = line(&pick(rng));
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..l.len());
                l[i] = rng.random();
            }
            (no_newlines(l), Expect::Either)
        }
        5 => {
            // Longer than the cap.
            let n = rng.random_range(MAX + 1..3 * MAX);
            let v: Vec<u8> = (0..n).map(|_| rng.random_range(b'a'..=b'z')).collect();
            (
                v,
                Expect::Invalid(Some(|e| matches!(e, FrameError::TooLarge { .. }))),
            )
        }
        6 => {
            // Deeply nested JSON within the cap: must be refused, not overflow the stack.
            let depth = rng.random_range(200..MAX / 2 - 1);
            let mut v = vec![b'['; depth];
            v.extend(std::iter::repeat_n(b']', depth));
            (v, Expect::Invalid(None))
        }
        7 => {
            // Non-UTF-8.
            let mut l = line(&pick(rng));
            let i = rng.random_range(0..l.len());
            l.insert(i, 0xC3);
            l.insert(i + 1, 0x28);
            (
                l,
                Expect::Invalid(Some(|e| matches!(e, FrameError::NotUtf8))),
            )
        }
        _ => {
            // Well-formed JSON that is not a message.
            let choices: [&[u8]; 6] = [
                b"{}",
                b"null",
                b"42",
                br#"{"type":"request","id":"seven","request":{"op":"status"}}"#,
                br#"{"type":"request","id":1,"request":{"op":"cancel"}}"#,
                br#"{"type":"hello","version":1}"#,
            ];
            (
                choices[rng.random_range(0..choices.len())].to_vec(),
                Expect::Invalid(Some(|e| matches!(e, FrameError::Malformed(_)))),
            )
        }
    }
}

#[test]
fn thousands_of_random_frames_in_random_chunks() {
    for seed in [1u64, 2, 3] {
        let mut rng = StdRng::seed_from_u64(seed);
        let msgs = valid_messages();
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..FRAMES {
            let (frame, expect) = random_frame(&mut rng, &msgs);
            assert!(!frame.contains(&b'\n'));
            stream.extend_from_slice(&frame);
            stream.push(b'\n');
            if rng.random_bool(0.05) {
                stream.extend_from_slice(b"\n  \r\n"); // blank keep-alive lines
            }
            expected.push(expect);
        }
        let mut dec = FrameDecoder::new(MAX);
        let mut results = Vec::new();
        let mut pos = 0;
        while pos < stream.len() {
            let n = rng.random_range(1..=700).min(stream.len() - pos);
            dec.push(&stream[pos..pos + n]);
            pos += n;
            assert!(dec.buffered() <= MAX, "decoder buffered {}", dec.buffered());
            while let Some(r) = dec.next_message::<ClientMessage>() {
                results.push(r);
            }
        }
        assert_eq!(dec.finish(), None, "seed {seed}: stream ended cleanly");
        assert_eq!(
            results.len(),
            expected.len(),
            "seed {seed}: one result per frame"
        );
        let (mut valid, mut invalid) = (0, 0);
        for (i, (got, want)) in results.iter().zip(&expected).enumerate() {
            match want {
                Expect::Valid(m) => {
                    assert_eq!(got.as_ref(), Ok(m), "seed {seed} frame {i}");
                    valid += 1;
                }
                Expect::Invalid(kind) => {
                    let e = got
                        .as_ref()
                        .expect_err(&format!("seed {seed} frame {i} decoded"));
                    if let Some(k) = kind {
                        assert!(k(e), "seed {seed} frame {i}: unexpected error {e:?}");
                    }
                    invalid += 1;
                }
                Expect::Either => {}
            }
        }
        assert!(
            valid > 300 && invalid > 1000,
            "{valid} valid, {invalid} invalid"
        );
    }
}

#[test]
fn a_stream_cut_mid_frame_reports_truncation() {
    let msgs = valid_messages();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..200 {
        let m = &msgs[rng.random_range(0..msgs.len())];
        let line = encode(m, MAX).unwrap();
        let cut = rng.random_range(1..line.len() - 1);
        let mut dec = FrameDecoder::new(MAX);
        dec.push(&line[..cut]);
        assert!(dec.next_line().is_none());
        assert!(matches!(dec.finish(), Some(FrameError::Truncated(_))));
        // The whole line decodes.
        let mut dec = FrameDecoder::new(MAX);
        dec.push(&line);
        assert_eq!(dec.next_message::<ClientMessage>(), Some(Ok(m.clone())));
    }
}

#[test]
fn every_server_message_round_trips() {
    let msgs = vec![
        ServerMessage::hello(),
        ServerMessage::Event {
            event: Event::StyleRegistered {
                job: 1,
                name: "ink".into(),
                path: "/s/ink".into(),
            },
        },
        ServerMessage::Event {
            event: Event::Progress {
                job: 1,
                step: 5,
                total: 750,
                loss: Some(0.125),
                loss_style: None,
                it_per_s: 1.5,
                eta_secs: Some(496.0),
            },
        },
        ServerMessage::Event {
            event: Event::SampleReady {
                job: 2,
                path: "/o/a.png".into(),
            },
        },
        ServerMessage::Event {
            event: Event::JobQueued {
                job: 3,
                what: "train".into(),
                name: Some("ink".into()),
            },
        },
        ServerMessage::Reply {
            id: 4,
            body: Box::new(ReplyBody::Exported {
                path: "/s/exports/ink.kohya.safetensors".into(),
            }),
        },
    ];
    for m in msgs {
        let line = encode(&m, MAX).unwrap();
        let back: ServerMessage = decode(&line[..line.len() - 1], MAX).unwrap();
        assert_eq!(back, m);
    }
}
