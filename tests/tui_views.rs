//! Snapshot tests of every view of the terminal UI, drawn from a fixed state into ratatui's
//! `TestBackend` at a normal (100×30) and a small (40×12) size. The snapshots are the text of the
//! screen (pictures show as `▀` half blocks; their colours are checked separately).
//!
//! After an intended change, review and accept with `cargo insta review` (or run with
//! `INSTA_UPDATE=always` and read the diff of `tests/snapshots/`).

use std::path::PathBuf;

use pairstyle::daemon::journal::Job;
use pairstyle::daemon::protocol::{QueueCounts, StatusReport};
use pairstyle::library::StyleMeta;
use pairstyle::tui::state::{
    AppState, BlendEntry, Confirm, Connection, DropEntry, DropSnapshot, DropState, Field,
    InputPurpose, JobHistory, Level, Modal, Picture, PictureSlot, StyleAssets, View,
};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn style(name: &str, desc: &str, lambda: f64) -> StyleMeta {
    serde_json::from_value(serde_json::json!({
        "name": name, "subject": "dog", "style_desc": desc,
        "prompt_suffix": format!(" in {desc} style"), "default_lambda": lambda,
        "base_model": "/models/stable-diffusion-v1-5", "rank": 64, "alpha": 64.0,
        "content_rank": 64, "seed": 42, "steps": 750, "training_secs": 1843.0,
        "content_sha256": ["a"], "style_sha256": ["b"], "created_unix": 1_764_400_000u64
    }))
    .expect("style json")
}

fn job(v: serde_json::Value) -> Job {
    let mut base = serde_json::json!({
        "state": "queued", "priority": 0, "paused": false, "progress": null, "interruptions": 0,
        "error": null, "result": null, "created_unix": 1, "updated_unix": 1
    });
    for (k, val) in v.as_object().expect("object") {
        base[k] = val.clone();
    }
    serde_json::from_value(base).expect("job json")
}

fn train(id: u64, name: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "spec": {"kind": "train", "pair_id": "p", "name": name, "staged_dir": "/s"}
    })
}

fn generate(prompt: &str, styles: &[(&str, f64)]) -> serde_json::Value {
    let styles: Vec<serde_json::Value> = styles
        .iter()
        .map(|(n, l)| serde_json::json!({"name": n, "lambda": l}))
        .collect();
    serde_json::json!({"kind": "generate", "prompt": prompt, "negative": null, "styles": styles,
        "seed": 7, "steps": 30, "cfg": 7.5, "width": null, "height": null})
}

/// A gradient picture, so the half blocks have something to show.
fn gradient(w: u32, h: u32) -> Picture {
    let mut rgb = Vec::new();
    for y in 0..h {
        for x in 0..w {
            rgb.extend_from_slice(&[(x * 255 / w) as u8, (y * 255 / h) as u8, 128]);
        }
    }
    Picture {
        width: w,
        height: h,
        rgb,
    }
}

/// A state with a connected embedded daemon, three styles, jobs in every state, a drop folder.
fn state() -> AppState {
    let mut s = AppState::new(
        &pairstyle::config::Config::default(),
        "/run/user/1000/pairstyle/pairstyle.sock".into(),
        true,
    );
    s.connection = Connection::Connected {
        server: "pairstyle 0.1.0".into(),
    };
    s.status = Some(StatusReport {
        version: "0.1.0".into(),
        pid: 4242,
        uptime_secs: 3600,
        watch: "/home/ada/.local/share/pairstyle/watch".into(),
        library: "/home/ada/.local/share/pairstyle/styles".into(),
        state_dir: "/home/ada/.local/share/pairstyle".into(),
        devices: vec![],
        queue: QueueCounts {
            queued: 2,
            running: 1,
            interrupted: 0,
            done: 3,
            failed: 1,
            cancelled: 0,
        },
    });
    s.styles = vec![
        style("ink", "ink wash", 3.0),
        style("oil", "oil paint", 2.5),
        style("watercolor", "watercolor", 3.0),
    ];
    s.selected_style = Some("ink".into());
    let lib = PathBuf::from("/home/ada/.local/share/pairstyle/styles/ink");
    let pics = vec![
        ("content".to_string(), lib.join("pair/content.png")),
        ("style".to_string(), lib.join("pair/style.png")),
        ("samples".to_string(), lib.join("samples.png")),
    ];
    for (i, (_, p)) in pics.iter().enumerate() {
        let slot = match i {
            0 => PictureSlot::Ready(gradient(32, 32)),
            1 => PictureSlot::Ready(gradient(48, 32)),
            _ => PictureSlot::Loading,
        };
        s.pictures.insert(p.clone(), slot);
    }
    s.style_assets
        .insert("ink".into(), StyleAssets { pictures: pics });

    let mut running = job(train(4, "watercolor"));
    running.state = pairstyle::daemon::journal::JobState::Running;
    running.progress = Some(pairstyle::daemon::journal::JobProgress {
        step: 320,
        total: 750,
        loss: Some(0.0812),
        loss_style: Some(0.1034),
        it_per_s: 1.52,
        eta_secs: Some(283.0),
    });
    let mut history = JobHistory::default();
    for i in 0..120 {
        let x = i as f32;
        history.push(Some(0.3 / (1.0 + x / 10.0) + 0.01 * (x * 0.7).sin()), None);
    }
    s.history.insert(4, history);
    let mut queued = job(
        serde_json::json!({"id": 5, "spec": generate("a fox in the snow", &[("ink", 3.0), ("oil", 2.0)])}),
    );
    queued.priority = 1;
    let mut paused = job(train(6, "charcoal"));
    paused.paused = true;
    let mut done = job(
        serde_json::json!({"id": 3, "spec": generate("a lighthouse at dusk", &[("ink", 3.0)])}),
    );
    done.state = pairstyle::daemon::journal::JobState::Done;
    done.result = Some("/home/ada/.local/share/pairstyle/outputs/job-3.png".into());
    done.updated_unix = 30;
    let mut failed = job(train(2, "broken"));
    failed.state = pairstyle::daemon::journal::JobState::Failed;
    failed.error = Some("style.png: truncated PNG".into());
    failed.updated_unix = 20;
    s.jobs = vec![running, queued, paused, done, failed];
    s.selected_job = Some(4);
    s.pictures.insert(
        PathBuf::from("/home/ada/.local/share/pairstyle/outputs/job-3.png"),
        PictureSlot::Ready(gradient(64, 64)),
    );

    s.form.prompt = "a fox in the snow".into();
    s.form.seed = Some(1234);
    s.form.blend = vec![
        BlendEntry {
            name: "ink".into(),
            lambda: 3.0,
        },
        BlendEntry {
            name: "oil".into(),
            lambda: 2.0,
        },
    ];

    s.drop = Some(DropSnapshot {
        watch: "/home/ada/.local/share/pairstyle/watch".into(),
        entries: vec![
            DropEntry {
                name: "charcoal".into(),
                state: DropState::WaitingForStability { secs_left: 3 },
                path: "/home/ada/.local/share/pairstyle/watch/charcoal".into(),
                files: vec!["content.png".into(), "style.png".into()],
            },
            DropEntry {
                name: "pastel".into(),
                state: DropState::Incomplete {
                    reason: "the style image never arrived".into(),
                },
                path: "/home/ada/.local/share/pairstyle/watch".into(),
                files: vec!["pastel.content.png".into()],
            },
            DropEntry {
                name: "cut".into(),
                state: DropState::Failed {
                    reason: "content.png: truncated PNG".into(),
                },
                path: "/home/ada/.local/share/pairstyle/watch/failed/cut".into(),
                files: vec!["content.png".into(), "style.png".into()],
            },
        ],
        error: None,
    });
    s.drop_cursor = 2;
    s
}

fn render(state: &AppState, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    t.draw(|f| pairstyle::tui::view::draw(f, state))
        .expect("draw");
    t
}

fn screen(state: &AppState, w: u16, h: u16) -> String {
    render(state, w, h).backend().to_string()
}

fn in_view(view: View) -> AppState {
    let mut s = state();
    s.view = view;
    s
}

#[test]
fn styles_view() {
    let s = in_view(View::Styles);
    insta::assert_snapshot!("styles_100x30", screen(&s, 100, 30));
    insta::assert_snapshot!("styles_40x12", screen(&s, 40, 12));
}

#[test]
fn styles_view_filtering() {
    let mut s = in_view(View::Styles);
    s.filtering = true;
    s.filter = "o".into();
    s.selected_style = Some("oil".into());
    insta::assert_snapshot!("styles_filter_100x30", screen(&s, 100, 30));
}

#[test]
fn styles_view_empty_library() {
    let mut s = in_view(View::Styles);
    s.styles.clear();
    s.selected_style = None;
    insta::assert_snapshot!("styles_empty_60x16", screen(&s, 60, 16));
}

#[test]
fn jobs_view() {
    let s = in_view(View::Jobs);
    insta::assert_snapshot!("jobs_100x30", screen(&s, 100, 30));
    insta::assert_snapshot!("jobs_40x12", screen(&s, 40, 12));
    let mut failed = in_view(View::Jobs);
    failed.selected_job = Some(2);
    insta::assert_snapshot!("jobs_failed_100x30", screen(&failed, 100, 30));
}

#[test]
fn generate_view() {
    let mut s = in_view(View::Generate);
    s.form.field = Field::Styles;
    s.form.style_cursor = 1;
    insta::assert_snapshot!("generate_100x30", screen(&s, 100, 30));
    insta::assert_snapshot!("generate_40x12", screen(&s, 40, 12));
    // Editing the prompt, and the result of a submitted job.
    let mut e = in_view(View::Generate);
    e.form.field = Field::Prompt;
    e.form.editing = Some("a fox in the sn".into());
    e.form.submitted = Some(3);
    insta::assert_snapshot!("generate_editing_100x30", screen(&e, 100, 30));
}

#[test]
fn drop_folder_view() {
    let s = in_view(View::DropFolder);
    insta::assert_snapshot!("dropfolder_100x30", screen(&s, 100, 30));
    insta::assert_snapshot!("dropfolder_40x12", screen(&s, 40, 12));
}

#[test]
fn help_overlay_and_dialogs() {
    let mut s = in_view(View::Jobs);
    s.modal = Some(Modal::Help);
    insta::assert_snapshot!("help_100x30", screen(&s, 100, 30));
    insta::assert_snapshot!("help_40x12", screen(&s, 40, 12));
    let mut c = in_view(View::Styles);
    c.modal = Some(Modal::Confirm(Confirm::DeleteStyle("ink".into())));
    insta::assert_snapshot!("confirm_delete_100x30", screen(&c, 100, 30));
    let mut i = in_view(View::Styles);
    i.modal = Some(Modal::Input {
        purpose: InputPurpose::ExportStyle {
            name: "ink".into(),
            format: "kohya".into(),
        },
        text: "/home/ada/ink.safetensors".into(),
    });
    insta::assert_snapshot!("export_dialog_100x30", screen(&i, 100, 30));
}

#[test]
fn status_bar_states() {
    let mut s = in_view(View::Styles);
    s.connection = Connection::Lost {
        reason: "the daemon closed the connection".into(),
        attempts: 3,
    };
    s.notify(Level::Error, "job #2 failed: style.png: truncated PNG");
    insta::assert_snapshot!("disconnected_100x30", screen(&s, 100, 30));
    let mut c = in_view(View::Styles);
    c.connection = Connection::Connecting;
    c.embedded = false;
    c.status = None;
    insta::assert_snapshot!("connecting_40x12", screen(&c, 40, 12));
}

#[test]
fn tiny_terminal_says_so() {
    let s = state();
    insta::assert_snapshot!("tiny_15x4", screen(&s, 15, 4));
    // Every view draws at the smallest supported size without panicking.
    for v in View::ALL {
        let mut s = in_view(v);
        for (w, h) in [(20, 5), (21, 6), (25, 7), (200, 60)] {
            let _ = screen(&s, w, h);
            s.modal = Some(Modal::Help);
            let _ = screen(&s, w, h);
            s.modal = None;
        }
    }
}

#[test]
fn pictures_are_drawn_in_colour() {
    let s = in_view(View::Styles);
    let t = render(&s, 100, 30);
    let buf = t.backend().buffer();
    let coloured = buf
        .content()
        .iter()
        .filter(|c| c.symbol() == "▀" && matches!(c.fg, ratatui::style::Color::Rgb(..)))
        .count();
    assert!(coloured > 100, "only {coloured} coloured half blocks");
}
