//! Tests of [`update`]: keys and daemon messages in, state changes and commands out.

use std::path::PathBuf;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::action::{update, Action, Command};
use super::state::{
    AppState, Confirm, Connection, DropEntry, DropSnapshot, DropState, Field, Level, Modal,
    PictureSlot, View,
};
use crate::daemon::journal::{Job, JobState};
use crate::daemon::protocol::{Event, QueueCounts, ReplyBody, Request, StatusReport};
use crate::library::StyleMeta;

fn key(code: KeyCode) -> Action {
    Action::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn ch(c: char) -> Action {
    key(KeyCode::Char(c))
}

fn press(state: &mut AppState, keys: &str) -> Vec<Command> {
    keys.chars().flat_map(|c| update(state, ch(c))).collect()
}

fn style(name: &str, desc: &str) -> StyleMeta {
    serde_json::from_value(serde_json::json!({
        "name": name, "subject": "dog", "style_desc": desc,
        "prompt_suffix": format!(" in {desc} style"), "default_lambda": 3.0,
        "base_model": "/models/sd15", "rank": 8, "alpha": 8.0, "content_rank": 8,
        "seed": 1, "steps": 300, "training_secs": 61.0,
        "content_sha256": ["a"], "style_sha256": ["b"], "created_unix": 0
    }))
    .unwrap()
}

fn train_job(id: u64, state: &str, priority: i32) -> Job {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "spec": {"kind": "train", "pair_id": "p", "name": format!("s{id}"), "staged_dir": "/s"},
        "state": state, "priority": priority, "paused": false, "progress": null,
        "interruptions": 0, "error": null, "result": null,
        "created_unix": id, "updated_unix": id
    }))
    .unwrap()
}

fn generate_job(id: u64, state: &str, result: Option<&str>) -> Job {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "spec": {"kind": "generate", "prompt": "a cat", "negative": null, "styles": [],
                 "seed": null, "steps": null, "cfg": null, "width": null, "height": null},
        "state": state, "priority": 0, "paused": false, "progress": null,
        "interruptions": 0, "error": null, "result": result,
        "created_unix": id, "updated_unix": id
    }))
    .unwrap()
}

fn status() -> StatusReport {
    StatusReport {
        version: "0.1.0".into(),
        pid: 1,
        uptime_secs: 5,
        watch: "/state/watch".into(),
        library: "/state/styles".into(),
        state_dir: "/state".into(),
        devices: vec![],
        queue: QueueCounts::default(),
    }
}

fn reply(request: Request, body: ReplyBody) -> Action {
    Action::Reply {
        request,
        result: Ok(body),
    }
}

/// A connected state with a status, three styles and the given jobs.
fn ready(jobs: Vec<Job>) -> AppState {
    let mut s = AppState::new(&crate::config::Config::default(), "/sock".into(), false);
    update(
        &mut s,
        Action::Connected {
            server: "pairstyle 0.1.0".into(),
        },
    );
    update(&mut s, reply(Request::Status, ReplyBody::Status(status())));
    update(
        &mut s,
        reply(
            Request::ListStyles,
            ReplyBody::Styles {
                styles: vec![
                    style("pixel", "pixel art"),
                    style("ink", "ink wash"),
                    style("oil", "oil paint"),
                ],
            },
        ),
    );
    update(&mut s, reply(Request::ListJobs, ReplyBody::Jobs { jobs }));
    s
}

fn sends(cmds: &[Command]) -> Vec<&Request> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send(r) => Some(r),
            _ => None,
        })
        .collect()
}

#[test]
fn connecting_asks_for_everything() {
    let mut s = AppState::new(&crate::config::Config::default(), "/sock".into(), true);
    let cmds = update(
        &mut s,
        Action::Connected {
            server: "pairstyle 0.1.0".into(),
        },
    );
    assert_eq!(
        sends(&cmds),
        [&Request::Status, &Request::ListJobs, &Request::ListStyles]
    );
    assert!(matches!(s.connection, Connection::Connected { .. }));
    // The first status says where the drop folder is: scan it.
    let cmds = update(&mut s, reply(Request::Status, ReplyBody::Status(status())));
    assert!(cmds.contains(&Command::ScanDropFolder {
        watch: PathBuf::from("/state/watch")
    }));
    let cmds = update(
        &mut s,
        Action::Disconnected {
            reason: "gone".into(),
            attempts: 2,
        },
    );
    assert!(cmds.is_empty());
    assert_eq!(
        s.connection,
        Connection::Lost {
            reason: "gone".into(),
            attempts: 2
        }
    );
}

#[test]
fn styles_are_sorted_selected_and_their_pictures_found() {
    let mut s = AppState::new(&crate::config::Config::default(), "/sock".into(), false);
    update(&mut s, reply(Request::Status, ReplyBody::Status(status())));
    let cmds = update(
        &mut s,
        reply(
            Request::ListStyles,
            ReplyBody::Styles {
                styles: vec![style("pixel", "pixel art"), style("ink", "ink wash")],
            },
        ),
    );
    assert_eq!(s.styles[0].name, "ink");
    assert_eq!(s.selected_style.as_deref(), Some("ink"));
    assert_eq!(
        cmds,
        [Command::FindStyleAssets {
            name: "ink".into(),
            dir: PathBuf::from("/state/styles/ink")
        }]
    );
    // The assets found are decoded once each.
    let assets = super::state::StyleAssets {
        pictures: vec![
            ("content".into(), PathBuf::from("/p/c.png")),
            ("style".into(), PathBuf::from("/p/s.png")),
        ],
    };
    let cmds = update(
        &mut s,
        Action::StyleAssets {
            name: "ink".into(),
            assets,
        },
    );
    assert_eq!(
        cmds,
        [
            Command::LoadPicture("/p/c.png".into()),
            Command::LoadPicture("/p/s.png".into())
        ]
    );
    assert_eq!(
        s.pictures.get(&PathBuf::from("/p/c.png")),
        Some(&PictureSlot::Loading)
    );
    // Moving down selects pixel and looks for its pictures.
    let cmds = update(&mut s, key(KeyCode::Down));
    assert_eq!(s.selected_style.as_deref(), Some("pixel"));
    assert!(matches!(&cmds[..], [Command::FindStyleAssets { name, .. }] if name == "pixel"));
    // Moving back needs nothing new.
    assert!(update(&mut s, key(KeyCode::Up)).is_empty());
}

#[test]
fn filter_narrows_the_list_and_moves_the_selection() {
    let mut s = ready(vec![]);
    assert_eq!(s.selected_style.as_deref(), Some("ink"));
    press(&mut s, "/oil");
    assert!(s.filtering && s.typing());
    assert_eq!(s.filter, "oil");
    assert_eq!(s.filtered_styles().len(), 1);
    assert_eq!(s.selected_style.as_deref(), Some("oil"));
    // While filtering, q is text, not quit.
    press(&mut s, "q");
    assert!(!s.quit);
    assert_eq!(s.filter, "oilq");
    assert!(s.filtered_styles().is_empty());
    update(&mut s, key(KeyCode::Backspace));
    update(&mut s, key(KeyCode::Enter));
    assert!(!s.filtering);
    assert_eq!(s.filter, "oil");
    // The filter also matches the style's description.
    press(&mut s, "/");
    update(&mut s, key(KeyCode::Esc));
    assert!(s.filter.is_empty() && !s.filtering);
    press(&mut s, "/wash");
    assert_eq!(
        s.filtered_styles()
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["ink"]
    );
}

#[test]
fn rename_checks_the_name_and_sends_the_request() {
    let mut s = ready(vec![]);
    press(&mut s, "r");
    assert!(matches!(&s.modal, Some(Modal::Input { text, .. }) if text == "ink"));
    for _ in 0..3 {
        update(&mut s, key(KeyCode::Backspace));
    }
    press(&mut s, "a/b");
    assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
    assert_eq!(s.visible_notice().map(|n| n.level), Some(Level::Error));
    assert!(s.modal.is_some(), "a bad name keeps the dialog open");
    for _ in 0..3 {
        update(&mut s, key(KeyCode::Backspace));
    }
    press(&mut s, "sumi");
    let cmds = update(&mut s, key(KeyCode::Enter));
    assert_eq!(
        sends(&cmds),
        [&Request::RenameStyle {
            from: "ink".into(),
            to: "sumi".into()
        }]
    );
    assert!(s.modal.is_none());
    // The daemon's OK moves the selection to the new name and lists the styles again.
    let cmds = update(
        &mut s,
        reply(
            Request::RenameStyle {
                from: "ink".into(),
                to: "sumi".into(),
            },
            ReplyBody::Ok,
        ),
    );
    assert_eq!(s.selected_style.as_deref(), Some("sumi"));
    assert_eq!(sends(&cmds), [&Request::ListStyles]);
}

#[test]
fn delete_and_cancel_need_a_yes() {
    let mut s = ready(vec![train_job(1, "queued", 0)]);
    press(&mut s, "d");
    assert_eq!(
        s.modal,
        Some(Modal::Confirm(Confirm::DeleteStyle("ink".into())))
    );
    assert!(press(&mut s, "n").is_empty());
    assert!(s.modal.is_none());
    press(&mut s, "d");
    // Other keys leave the question open.
    assert!(press(&mut s, "x").is_empty());
    let cmds = press(&mut s, "y");
    assert_eq!(sends(&cmds), [&Request::RemoveStyle { name: "ink".into() }]);

    press(&mut s, "2");
    assert_eq!(s.view, View::Jobs);
    press(&mut s, "c");
    assert_eq!(s.modal, Some(Modal::Confirm(Confirm::CancelJob(1))));
    let cmds = update(&mut s, key(KeyCode::Enter));
    assert_eq!(sends(&cmds), [&Request::Cancel { job: 1 }]);
}

#[test]
fn a_daemon_error_is_shown_and_kept() {
    let mut s = ready(vec![]);
    update(
        &mut s,
        Action::Reply {
            request: Request::RemoveStyle { name: "ink".into() },
            result: Err("removing a style is not implemented in the daemon yet".into()),
        },
    );
    let n = s.visible_notice().cloned().unwrap();
    assert_eq!(n.level, Level::Error);
    assert!(n.text.contains("deleting ink failed"), "{}", n.text);
    assert_eq!(s.errors.len(), 1);
    // Errors do not fade with time; infos do.
    for _ in 0..200 {
        update(&mut s, Action::Tick);
    }
    assert!(s.visible_notice().is_some());
    s.notify(Level::Info, "hello");
    for _ in 0..200 {
        update(&mut s, Action::Tick);
    }
    assert!(s.visible_notice().is_none());
}

#[test]
fn progress_events_update_the_job_and_its_loss_curve() {
    let mut s = ready(vec![train_job(3, "queued", 0)]);
    for (i, loss) in [0.5f32, 0.4, f32::NAN, 0.3].iter().enumerate() {
        let cmds = update(
            &mut s,
            Action::Event(Event::Progress {
                job: 3,
                step: i + 1,
                total: 10,
                loss: Some(*loss),
                loss_style: None,
                it_per_s: 2.0,
                eta_secs: Some(4.0),
            }),
        );
        assert!(cmds.is_empty());
    }
    let j = s.current_job().unwrap();
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.progress.unwrap().step, 4);
    // Non-finite losses are not plotted.
    assert_eq!(s.history[&3].losses, [0.5, 0.4, 0.3]);
    // A job the UI does not know yet: list the jobs again.
    let cmds = update(
        &mut s,
        Action::Event(Event::Progress {
            job: 9,
            step: 1,
            total: 2,
            loss: None,
            loss_style: None,
            it_per_s: 0.0,
            eta_secs: None,
        }),
    );
    assert_eq!(sends(&cmds), [&Request::ListJobs]);
}

#[test]
fn reorder_moves_a_waiting_job_past_its_neighbour() {
    let mut s = ready(vec![
        train_job(1, "running", 0),
        train_job(2, "queued", 5),
        train_job(3, "queued", 0),
        train_job(4, "done", 0),
    ]);
    press(&mut s, "2");
    // Order: running 1, queued 2 (prio 5), queued 3, done 4.
    let order: Vec<u64> = s.ordered_jobs().iter().map(|j| j.id).collect();
    assert_eq!(order, [1, 2, 3, 4]);
    assert_eq!(s.selected_job, Some(1));
    // The running job cannot move.
    assert!(press(&mut s, "K").is_empty());
    assert_eq!(s.visible_notice().map(|n| n.level), Some(Level::Error));
    press(&mut s, "jj");
    assert_eq!(s.selected_job, Some(3));
    let cmds = press(&mut s, "K");
    assert_eq!(
        sends(&cmds),
        [&Request::SetPriority {
            job: 3,
            priority: 6
        }]
    );
    // Already the last waiting job.
    assert!(press(&mut s, "J").is_empty());
    let cmds = press(&mut s, "k");
    assert!(cmds.is_empty());
    let cmds = press(&mut s, "J");
    assert_eq!(
        sends(&cmds),
        [&Request::SetPriority {
            job: 2,
            priority: -1
        }]
    );
    assert_eq!(sends(&press(&mut s, "p")), [&Request::Pause { job: 2 }]);
    assert_eq!(sends(&press(&mut s, "u")), [&Request::Resume { job: 2 }]);
    assert_eq!(sends(&press(&mut s, "R")), [&Request::Retry { job: 2 }]);
    // A finished job cannot be cancelled.
    press(&mut s, "G");
    assert_eq!(s.selected_job, Some(4));
    assert!(press(&mut s, "c").is_empty());
    assert!(s.modal.is_none());
}

#[test]
fn generate_form_builds_a_blended_job() {
    let mut s = ready(vec![]);
    press(&mut s, "3");
    assert_eq!(s.view, View::Generate);
    // Submitting without a prompt explains what is missing.
    assert!(press(&mut s, "s").is_empty());
    assert_eq!(s.visible_notice().map(|n| n.level), Some(Level::Error));
    // Prompt: Enter, type (digits and q are text here), Enter.
    update(&mut s, key(KeyCode::Enter));
    press(&mut s, "a cat 3q");
    assert!(!s.quit && s.view == View::Generate);
    update(&mut s, key(KeyCode::Enter));
    assert_eq!(s.form.prompt, "a cat 3q");
    // Steps: down three fields, type a number directly.
    update(&mut s, key(KeyCode::Down));
    update(&mut s, key(KeyCode::Down));
    update(&mut s, key(KeyCode::Down));
    assert_eq!(s.form.field, Field::Steps);
    press(&mut s, "0");
    update(&mut s, key(KeyCode::Enter));
    assert_eq!(s.visible_notice().map(|n| n.level), Some(Level::Error));
    assert!(s.form.editing.is_some(), "a bad value stays in the editor");
    update(&mut s, key(KeyCode::Backspace));
    press(&mut s, "12");
    update(&mut s, key(KeyCode::Tab));
    assert_eq!(s.form.steps, 12);
    assert_eq!(s.form.field, Field::Cfg);
    update(&mut s, key(KeyCode::Right));
    assert_eq!(s.form.cfg, Some(8.0), "auto steps from the fallback 7.5");
    // Seed: randomise twice gives two different seeds, reproducibly.
    update(&mut s, key(KeyCode::Up));
    update(&mut s, key(KeyCode::Up));
    assert_eq!(s.form.field, Field::Seed);
    press(&mut s, "r");
    let a = s.form.seed.unwrap();
    press(&mut s, "r");
    let b = s.form.seed.unwrap();
    assert_ne!(a, b);
    update(&mut s, key(KeyCode::Backspace));
    assert_eq!(s.form.seed, None);
    // Styles: pick ink and oil, raise oil's λ.
    while s.form.field != Field::Styles {
        update(&mut s, key(KeyCode::Down));
    }
    update(&mut s, ch(' ')); // ink
    update(&mut s, key(KeyCode::Down));
    update(&mut s, key(KeyCode::Right)); // oil is not picked yet
    assert_eq!(s.visible_notice().map(|n| n.level), Some(Level::Error));
    update(&mut s, key(KeyCode::Enter)); // oil
    update(&mut s, key(KeyCode::Right));
    update(&mut s, key(KeyCode::Right));
    assert_eq!(s.form.lambda_of("ink"), Some(3.0));
    assert_eq!(s.form.lambda_of("oil"), Some(4.0));
    let cmds = press(&mut s, "s");
    let [Request::SubmitGenerate { job, priority: 0 }] = &sends(&cmds)[..] else {
        panic!("{cmds:?}")
    };
    assert_eq!(job.prompt, "a cat 3q");
    assert_eq!(job.steps, Some(12));
    assert_eq!(job.cfg, Some(8.0));
    assert_eq!(job.seed, None);
    let blend: Vec<(&str, Option<f64>)> = job
        .styles
        .iter()
        .map(|w| (w.name.as_str(), w.lambda))
        .collect();
    assert_eq!(blend, [("ink", Some(3.0)), ("oil", Some(4.0))]);
    // Space again takes a style out.
    update(&mut s, ch(' '));
    assert_eq!(s.form.lambda_of("oil"), None);
}

#[test]
fn the_submitted_result_is_shown_when_done() {
    let mut s = ready(vec![]);
    let cmds = update(
        &mut s,
        reply(
            Request::SubmitGenerate {
                job: Default::default(),
                priority: 0,
            },
            ReplyBody::Queued { job: 7 },
        ),
    );
    assert_eq!(s.form.submitted, Some(7));
    assert_eq!(sends(&cmds), [&Request::ListJobs]);
    update(
        &mut s,
        reply(
            Request::ListJobs,
            ReplyBody::Jobs {
                jobs: vec![generate_job(7, "running", None)],
            },
        ),
    );
    let cmds = update(
        &mut s,
        Action::Event(Event::JobDone {
            job: 7,
            result: Some("/out/7.png".into()),
        }),
    );
    assert!(cmds.contains(&Command::LoadPicture("/out/7.png".into())));
    assert_eq!(s.outputs().len(), 1);
}

#[test]
fn submitting_while_disconnected_is_refused() {
    let mut s = ready(vec![]);
    s.form.prompt = "x".into();
    update(
        &mut s,
        Action::Disconnected {
            reason: "daemon restarted".into(),
            attempts: 1,
        },
    );
    press(&mut s, "3");
    assert!(press(&mut s, "s").is_empty());
    assert!(s
        .visible_notice()
        .is_some_and(|n| n.text.contains("not connected")));
}

#[test]
fn ticks_poll_only_while_connected() {
    let mut s = ready(vec![]);
    let mut polled = Vec::new();
    for _ in 0..100 {
        polled.extend(update(&mut s, Action::Tick));
    }
    assert_eq!(
        sends(&polled)
            .iter()
            .filter(|r| ***r == Request::Status)
            .count(),
        5
    );
    assert_eq!(
        sends(&polled)
            .iter()
            .filter(|r| ***r == Request::ListJobs)
            .count(),
        1
    );
    update(
        &mut s,
        Action::Disconnected {
            reason: "x".into(),
            attempts: 1,
        },
    );
    for _ in 0..100 {
        assert!(update(&mut s, Action::Tick).is_empty());
    }
}

#[test]
fn drop_folder_retry_only_for_failed_pairs() {
    let mut s = ready(vec![]);
    press(&mut s, "4");
    assert_eq!(s.view, View::DropFolder);
    update(
        &mut s,
        Action::DropFolder(DropSnapshot {
            watch: "/w".into(),
            entries: vec![
                DropEntry {
                    name: "fresh".into(),
                    state: DropState::WaitingForStability { secs_left: 3 },
                    path: "/w/fresh".into(),
                    files: vec![],
                },
                DropEntry {
                    name: "cut".into(),
                    state: DropState::Failed {
                        reason: "truncated".into(),
                    },
                    path: "/w/failed/cut".into(),
                    files: vec![],
                },
            ],
            error: None,
        }),
    );
    assert!(press(&mut s, "r").is_empty());
    assert_eq!(s.visible_notice().map(|n| n.level), Some(Level::Error));
    press(&mut s, "j");
    let cmds = press(&mut s, "r");
    assert_eq!(
        cmds,
        [Command::RetryDropped {
            name: "cut".into(),
            path: "/w/failed/cut".into(),
            watch: "/w".into()
        }]
    );
    let cmds = update(
        &mut s,
        Action::DropRetried {
            name: "cut".into(),
            result: Ok("/w/cut".into()),
        },
    );
    assert_eq!(
        cmds,
        [Command::ScanDropFolder {
            watch: "/state/watch".into()
        }]
    );
}

#[test]
fn global_keys_and_help() {
    let mut s = ready(vec![]);
    update(&mut s, key(KeyCode::Tab));
    assert_eq!(s.view, View::Jobs);
    update(&mut s, key(KeyCode::BackTab));
    update(&mut s, key(KeyCode::BackTab));
    assert_eq!(s.view, View::DropFolder);
    press(&mut s, "?");
    assert_eq!(s.modal, Some(Modal::Help));
    // Keys do nothing else while the help is open.
    press(&mut s, "1");
    assert_eq!(s.view, View::DropFolder);
    update(&mut s, key(KeyCode::Esc));
    assert!(s.modal.is_none());
    let cmds = update(&mut s, key(KeyCode::F(5)));
    assert!(sends(&cmds).contains(&&Request::ListStyles));
    // Ctrl-C quits from anywhere, even a dialog.
    press(&mut s, "?");
    update(
        &mut s,
        Action::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
    );
    assert!(s.quit);
    let mut s = ready(vec![]);
    press(&mut s, "q");
    assert!(s.quit);
}

#[test]
fn export_asks_the_daemon_for_an_absolute_path_or_its_default() {
    let mut s = ready(vec![]);
    press(&mut s, "e");
    assert!(matches!(
        &s.modal,
        Some(Modal::Input { purpose: super::state::InputPurpose::ExportStyle { format, .. }, text })
            if format == "kohya" && text.is_empty()
    ));
    update(&mut s, key(KeyCode::Tab));
    press(&mut s, "ink.safetensors");
    assert!(update(&mut s, key(KeyCode::Enter)).is_empty());
    assert!(s.modal.is_some(), "a relative path keeps the dialog open");
    for _ in 0.."ink.safetensors".len() {
        update(&mut s, key(KeyCode::Backspace));
    }
    press(&mut s, "/tmp/ink.safetensors");
    let cmds = update(&mut s, key(KeyCode::Enter));
    assert_eq!(
        sends(&cmds),
        [&Request::ExportStyle {
            name: "ink".into(),
            format: "peft".into(),
            output: Some("/tmp/ink.safetensors".into())
        }]
    );
    // Empty: the daemon's exports folder.
    press(&mut s, "e");
    let cmds = update(&mut s, key(KeyCode::Enter));
    assert_eq!(
        sends(&cmds),
        [&Request::ExportStyle {
            name: "ink".into(),
            format: "kohya".into(),
            output: None
        }]
    );
    update(
        &mut s,
        reply(
            Request::ExportStyle {
                name: "ink".into(),
                format: "kohya".into(),
                output: None,
            },
            ReplyBody::Exported {
                path: "/state/exports/ink.kohya.safetensors".into(),
            },
        ),
    );
    assert!(s
        .visible_notice()
        .is_some_and(|n| n.level == Level::Info && n.text.contains("ink.kohya")));
}

#[test]
fn schedule_and_sampler_reach_the_job() {
    let mut s = ready(vec![]);
    press(&mut s, "3");
    while s.form.field != Field::Sampler {
        update(&mut s, key(KeyCode::Down));
    }
    // The sampler steps through the list and wraps; Backspace gives the choice back to the daemon.
    assert_eq!(s.form.sampler, None);
    update(&mut s, key(KeyCode::Right));
    assert_eq!(s.form.sampler.as_deref(), Some("default"));
    update(&mut s, key(KeyCode::Enter));
    update(&mut s, key(KeyCode::Right));
    assert_eq!(s.form.sampler.as_deref(), Some("ddim"));
    for _ in 0..4 {
        update(&mut s, key(KeyCode::Left));
    }
    assert_eq!(s.form.sampler.as_deref(), Some("pndm"));
    update(&mut s, key(KeyCode::Backspace));
    assert_eq!(s.form.sampler, None);
    update(&mut s, key(KeyCode::Left));
    assert_eq!(s.form.sampler.as_deref(), Some("pndm"));

    // The schedule is typed or stepped, and checked.
    update(&mut s, key(KeyCode::Down));
    assert_eq!(s.form.field, Field::StyleFrom);
    press(&mut s, "5");
    update(&mut s, key(KeyCode::Enter));
    assert_eq!(s.form.style_from, 5);
    update(&mut s, key(KeyCode::Right));
    assert_eq!(s.form.style_from, 6);
    update(&mut s, key(KeyCode::Enter));
    press(&mut s, "x");
    update(&mut s, key(KeyCode::Enter));
    assert_eq!(s.form.style_from, 6);
    assert_eq!(s.visible_notice().map(|n| n.level), Some(Level::Error));

    let job = s.form.to_job();
    assert_eq!(job.scheduler.as_deref(), Some("pndm"));
    assert_eq!(job.style_from, Some(6));
    assert_eq!(job.lora_scale, None);
}
