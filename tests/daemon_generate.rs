//! Generation jobs and style management through a running `pairstyle daemon` on the tiny SD1.5
//! fixture: a job with two styles and their λ submitted over IPC becomes a PNG with its settings
//! (pixel-equal to `pairstyle generate` with the same settings), with progress events; bad
//! requests are refused at once; styles are renamed, moved to the trash and exported over IPC
//! and with `pairstyle styles`.

mod daemon_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon_common::{random_style, terminate, Setup};
use pairstyle::daemon::journal::{GenerateJob, StyleWeight};
use pairstyle::daemon::protocol::{ErrorCode, Event, ReplyBody, Request};
use pairstyle::daemon::server::Client;
use pairstyle::engine::image_io::read_png_text;

fn connect(s: &Setup) -> Client {
    let mut last = None;
    for _ in 0..600 {
        match Client::connect(&s.socket, "test", Duration::from_secs(60)) {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no daemon on the socket: {last:?}\n{}", s.log("daemon.log"));
}

fn ok(c: &mut Client, r: Request) -> ReplyBody {
    match c.request(r.clone()).unwrap() {
        Ok(body) => body,
        Err(e) => panic!("{r:?} refused: {e:?}"),
    }
}

fn refused(c: &mut Client, r: Request) -> (ErrorCode, String) {
    match c.request(r.clone()).unwrap() {
        Ok(body) => panic!("{r:?} accepted: {body:?}"),
        Err(e) => e,
    }
}

/// The next event (replies to other requests are skipped).
fn next_event(c: &mut Client) -> Event {
    loop {
        if let Some(e) = c.events.pop_front() {
            return e;
        }
        if let pairstyle::daemon::protocol::ServerMessage::Event { event } =
            c.read_message().unwrap()
        {
            return event;
        }
    }
}

/// Read events until every job in `jobs` is done; returns each job's events in order.
fn events_until_all_done(c: &mut Client, jobs: &[u64]) -> BTreeMap<u64, Vec<Event>> {
    let mut seen: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
    let mut done = 0;
    while done < jobs.len() {
        let ev = next_event(c);
        let job = match &ev {
            Event::JobQueued { job, .. }
            | Event::Progress { job, .. }
            | Event::SampleReady { job, .. }
            | Event::JobDone { job, .. }
            | Event::JobCancelled { job }
            | Event::StyleRegistered { job, .. } => *job,
            Event::JobFailed { job, error } => {
                assert!(!jobs.contains(job), "job {job} failed: {error}");
                continue;
            }
            _ => continue,
        };
        if jobs.contains(&job) {
            done += usize::from(matches!(ev, Event::JobDone { .. }));
            seen.entry(job).or_default().push(ev);
        }
    }
    seen
}

/// Read events until `job` is done; returns its events in order.
fn events_until_done(c: &mut Client, job: u64) -> Vec<Event> {
    events_until_all_done(c, &[job])
        .remove(&job)
        .unwrap_or_default()
}

fn two_styles() -> Vec<StyleWeight> {
    vec![
        StyleWeight {
            name: "ink".into(),
            lambda: Some(2.5),
        },
        StyleWeight {
            name: "oil".into(),
            lambda: Some(1.0),
        },
    ]
}

#[test]
fn a_two_style_generation_over_ipc_writes_the_png_the_cli_writes() {
    let s = Setup::new("daemon-gen", "flow", 4, "");
    random_style(&s.library(), "ink", "ink wash", 1);
    random_style(&s.library(), "oil", "oil paint", 2);
    let mut daemon = s.start("daemon.log", &[]);
    let mut c = connect(&s);
    assert_eq!(ok(&mut c, Request::Subscribe), ReplyBody::Subscribed);

    // Refused at once: an unknown style, zero steps, an absurd width.
    let base = GenerateJob {
        prompt: "a red star".into(),
        styles: two_styles(),
        seed: Some(5),
        steps: Some(3),
        cfg: Some(4.0),
        width: Some(16),
        height: Some(16),
        ..Default::default()
    };
    let mut unknown = base.clone();
    unknown.styles[1].name = "nope".into();
    let mut zero = base.clone();
    zero.steps = Some(0);
    let mut wide = base.clone();
    wide.width = Some(100_000);
    let mut late = base.clone();
    late.style_from = Some(3);
    let mut two_scaled = base.clone();
    two_scaled.lora_scale = Some(0.5);
    let mut sampler = base.clone();
    sampler.scheduler = Some("dpm++".into());
    for (job, needle) in [
        (unknown, "nope"),
        (zero, "steps"),
        (wide, "width"),
        (late, "style-from"),
        (two_scaled, "lora-scale"),
        (sampler, "dpm++"),
    ] {
        let (code, msg) = refused(&mut c, Request::SubmitGenerate { job, priority: 0 });
        assert_eq!(code, ErrorCode::InvalidRequest, "{msg}");
        assert!(msg.contains(needle), "{msg}");
    }
    // Nothing refused reached the journal.
    assert!(s.jobs().is_empty());

    let ReplyBody::Queued { job } = ok(
        &mut c,
        Request::SubmitGenerate {
            job: base.clone(),
            priority: 0,
        },
    ) else {
        panic!("not queued")
    };
    let events = events_until_done(&mut c, job);
    // One progress event per model step (PNDM, the fixture's scheduler, adds a warm-up step).
    let progress: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress { step, total, .. } => Some((*step, *total)),
            _ => None,
        })
        .collect();
    let total = progress.first().map(|p| p.1).unwrap_or(0);
    assert!(total >= 3, "{events:?}");
    assert_eq!(
        progress,
        (1..=total).map(|i| (i, total)).collect::<Vec<_>>(),
        "{events:?}"
    );
    let Some(Event::JobDone {
        result: Some(path), ..
    }) = events.last()
    else {
        panic!("{events:?}")
    };
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::SampleReady { path: p, .. } if p == path)),
        "{events:?}"
    );
    let png = PathBuf::from(path);
    assert!(png.starts_with(s.state.join("outputs")), "{path}");
    assert!(png
        .file_name()
        .unwrap()
        .to_string_lossy()
        .ends_with("-a-red-star.png"));
    let text = read_png_text(&png).unwrap();
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("prompt"), "a red star");
    assert_eq!(get("seed"), "5");
    let params: serde_json::Value = serde_json::from_str(&get("parameters")).unwrap();
    let styles = &params["guidance"]["styles"];
    assert_eq!(params["guidance"]["mode"], "style");
    assert_eq!(styles[0]["name"], "ink");
    assert_eq!(styles[0]["lambda"], 2.5);
    assert_eq!(styles[0]["suffix"], " in ink wash style");
    assert_eq!(styles[1]["name"], "oil");
    assert_eq!(styles[1]["lambda"], 1.0);
    let job_rec = match ok(&mut c, Request::Job { job }) {
        ReplyBody::Job { job } => job,
        other => panic!("{other:?}"),
    };
    assert_eq!(job_rec.result.as_deref(), Some(path.as_str()));
    assert_eq!(job_rec.progress.map(|p| p.step), Some(total));

    // The command line, same settings and library: the same pixels and settings.
    let cli_png = s.root.join("cli.png");
    let o = s
        .cmd()
        .args([
            "generate",
            "--prompt",
            "a red star",
            "--seed",
            "5",
            "--steps",
            "3",
        ])
        .args(["--cfg", "4", "--width", "16", "--height", "16"])
        .args(["--style", "ink=2.5", "--style", "oil=1", "-o"])
        .arg(&cli_png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = image::open(&png).unwrap().to_rgb8();
    let b = image::open(&cli_png).unwrap().to_rgb8();
    assert_eq!(a.as_raw(), b.as_raw(), "daemon and CLI images differ");
    assert_eq!(read_png_text(&cli_png).unwrap(), text);

    // A job without a seed gets one fixed at submission (a re-run renders the same image).
    let mut unseeded = base.clone();
    unseeded.seed = None;
    unseeded.styles.clear();
    let ReplyBody::Queued { job: j2 } = ok(
        &mut c,
        Request::SubmitGenerate {
            job: unseeded,
            priority: 0,
        },
    ) else {
        panic!()
    };
    match ok(&mut c, Request::Job { job: j2 }) {
        ReplyBody::Job { job } => match job.spec {
            pairstyle::daemon::journal::JobSpec::Generate(g) => assert!(g.seed.is_some()),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    events_until_done(&mut c, j2);

    // The sampler, the schedule and the LoRA-scale baseline travel with the job into the PNG.
    let mut ddim = base.clone();
    ddim.scheduler = Some("ddim".into());
    ddim.style_from = Some(1);
    let mut scaled = base.clone();
    scaled.styles.truncate(1);
    scaled.lora_scale = Some(0.5);
    let params_of = |c: &mut Client, job: GenerateJob| {
        let ReplyBody::Queued { job: id } = ok(c, Request::SubmitGenerate { job, priority: 0 })
        else {
            panic!("not queued")
        };
        let Some(Event::JobDone {
            result: Some(path), ..
        }) = events_until_done(c, id).last().cloned()
        else {
            panic!("job {id} made no image")
        };
        let text = read_png_text(Path::new(&path)).unwrap();
        let params = text
            .iter()
            .find(|(k, _)| k == "parameters")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&params).unwrap()
    };
    let p = params_of(&mut c, ddim);
    assert_eq!(p["scheduler"], "ddim", "{p}");
    assert_eq!(p["guidance"]["mode"], "style", "{p}");
    assert_eq!(p["guidance"]["from_step"], 1, "{p}");
    let p = params_of(&mut c, scaled);
    assert_eq!(p["guidance"]["mode"], "lora-scale", "{p}");
    assert_eq!(p["guidance"]["style"], "ink", "{p}");
    assert_eq!(p["guidance"]["alpha"], 0.5, "{p}");
    terminate(&mut daemon);
}

#[test]
fn styles_are_renamed_trashed_and_exported_over_ipc_and_the_cli() {
    let s = Setup::new("daemon-gen", "manage", 4, "");
    random_style(&s.library(), "ink", "ink wash", 1);
    random_style(&s.library(), "oil", "oil paint", 2);
    random_style(&s.library(), "tar", "tar", 3);
    let mut daemon = s.start("daemon.log", &[]);
    let mut c = connect(&s);

    ok(
        &mut c,
        Request::RenameStyle {
            from: "ink".into(),
            to: "sumi".into(),
        },
    );
    let names = |c: &mut Client| match ok(c, Request::ListStyles) {
        ReplyBody::Styles { styles } => styles.into_iter().map(|m| m.name).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(names(&mut c), ["oil", "sumi", "tar"]);
    let (code, msg) = refused(
        &mut c,
        Request::RenameStyle {
            from: "oil".into(),
            to: "sumi".into(),
        },
    );
    assert_eq!(code, ErrorCode::InvalidRequest);
    assert!(msg.contains("already exists"), "{msg}");
    let (code, _) = refused(
        &mut c,
        Request::RenameStyle {
            from: "oil".into(),
            to: "../x".into(),
        },
    );
    assert_eq!(code, ErrorCode::InvalidRequest);

    ok(&mut c, Request::RemoveStyle { name: "oil".into() });
    assert_eq!(names(&mut c), ["sumi", "tar"]);
    let trash = daemon_common::entries(&s.state.join("trash"));
    assert_eq!(trash.len(), 1, "{trash:?}");
    assert!(trash[0].starts_with("oil-"));
    assert!(s
        .state
        .join("trash")
        .join(&trash[0])
        .join("style.safetensors")
        .is_file());
    refused(&mut c, Request::RemoveStyle { name: "oil".into() });

    let ReplyBody::Exported { path } = ok(
        &mut c,
        Request::ExportStyle {
            name: "sumi".into(),
            format: "kohya".into(),
            output: None,
        },
    ) else {
        panic!()
    };
    assert_eq!(
        PathBuf::from(&path),
        s.state.join("exports/sumi.kohya.safetensors")
    );
    let t = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    assert!(t
        .keys()
        .any(|k| k.starts_with("lora_unet_") && k.ends_with(".alpha")));
    let peft = s.root.join("sumi.peft.safetensors");
    ok(
        &mut c,
        Request::ExportStyle {
            name: "sumi".into(),
            format: "peft".into(),
            output: Some(peft.display().to_string()),
        },
    );
    assert!(peft.is_file());
    for (format, output) in [
        ("onnx", None),
        ("peft", Some("relative.safetensors".to_string())),
    ] {
        let (code, _) = refused(
            &mut c,
            Request::ExportStyle {
                name: "sumi".into(),
                format: format.into(),
                output,
            },
        );
        assert_eq!(code, ErrorCode::InvalidRequest);
    }
    terminate(&mut daemon);

    // The same with `pairstyle styles`, on the daemon's library (found through [daemon] state_dir).
    let run = |args: &[&str]| {
        let o = s.cmd().arg("styles").args(args).output().unwrap();
        assert!(
            o.status.success(),
            "styles {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let list: serde_json::Value = serde_json::from_str(&run(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["name"], "sumi");
    let show: serde_json::Value = serde_json::from_str(&run(&["show", "sumi", "--json"])).unwrap();
    assert_eq!(show["style_desc"], "ink wash");
    assert!(show["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "style.safetensors"));
    assert!(run(&["show", "tar"]).contains("prompt suffix \" in tar style\""));
    run(&["rename", "tar", "pitch"]);
    let out = run(&["remove", "pitch"]);
    assert!(out.contains("trash"), "{out}");
    let kohya = s.root.join("cli.kohya.safetensors");
    run(&[
        "export",
        "sumi",
        "--format",
        "kohya",
        "-o",
        &kohya.display().to_string(),
    ]);
    assert!(kohya.is_file());
    let list: serde_json::Value = serde_json::from_str(&run(&["list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(daemon_common::entries(&s.state.join("trash")).len(), 2);
    let o = s
        .cmd()
        .args(["styles", "remove", "pitch"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("pitch"));
}

#[test]
fn one_worker_per_configured_device_runs_the_queue() {
    let s = Setup::new("daemon-gen", "devices", 4, "devices = [\"cpu\", \"cpu\"]");
    let mut daemon = s.start("daemon.log", &[]);
    let mut c = connect(&s);
    match ok(&mut c, Request::Status) {
        ReplyBody::Status(r) => {
            let devices: Vec<&str> = r.devices.iter().map(|d| d.device.as_str()).collect();
            assert_eq!(devices, ["cpu", "cpu"]);
        }
        other => panic!("{other:?}"),
    }
    ok(&mut c, Request::Subscribe);
    let ids: Vec<u64> = ["a red star", "a blue square", "a green disc"]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let job = GenerateJob {
                prompt: p.to_string(),
                seed: Some(i as u64),
                ..Default::default()
            };
            match ok(&mut c, Request::SubmitGenerate { job, priority: 0 }) {
                ReplyBody::Queued { job } => job,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    let events = events_until_all_done(&mut c, &ids);
    assert_eq!(events.len(), 3);
    // Every job ran exactly once.
    let jobs = match ok(&mut c, Request::ListJobs) {
        ReplyBody::Jobs { jobs } => jobs,
        other => panic!("{other:?}"),
    };
    assert_eq!(jobs.len(), 3);
    let outputs = daemon_common::entries(&s.state.join("outputs"));
    assert_eq!(outputs.len(), 3, "{outputs:?}");
    let log = s.log("daemon.log");
    assert_eq!(log.matches("(generate) started on cpu").count(), 3, "{log}");
    terminate(&mut daemon);
}

#[test]
fn a_generation_cancelled_while_rendering_stops_at_once_and_writes_nothing() {
    let s = Setup::new("daemon-gen", "cancel", 4, "");
    random_style(&s.library(), "ink", "ink wash", 1);
    let mut daemon = s.start("daemon.log", &[]);
    let mut c = connect(&s);
    ok(&mut c, Request::Subscribe);
    // Far more steps than can run while the cancel is in flight.
    let job = GenerateJob {
        prompt: "a red star".into(),
        styles: two_styles()[..1].to_vec(),
        seed: Some(1),
        steps: Some(500),
        width: Some(16),
        height: Some(16),
        ..Default::default()
    };
    let ReplyBody::Queued { job: id } = ok(&mut c, Request::SubmitGenerate { job, priority: 0 })
    else {
        panic!("not queued")
    };
    // Wait for the first step, then cancel.
    let total = loop {
        let ev = next_event(&mut c);
        match ev {
            Event::Progress { job, total, .. } if job == id => break total,
            Event::JobFailed { job, error } if job == id => panic!("{error}"),
            _ => {}
        }
    };
    assert!(total >= 500, "{total}");
    ok(&mut c, Request::Cancel { job: id });
    let mut last_step = 0;
    loop {
        let ev = next_event(&mut c);
        match ev {
            Event::Progress { job, step, .. } if job == id => last_step = step,
            Event::JobCancelled { job } if job == id => break,
            Event::JobDone { job, .. } if job == id => panic!("job {id} finished after cancel"),
            Event::SampleReady { job, .. } if job == id => panic!("job {id} wrote an image"),
            _ => {}
        }
    }
    assert!(last_step < total, "stopped at {last_step} of {total}");
    match ok(&mut c, Request::Job { job: id }) {
        ReplyBody::Job { job } => {
            assert_eq!(job.state, pairstyle::daemon::journal::JobState::Cancelled);
            assert!(job.result.is_none(), "{job:?}");
        }
        other => panic!("{other:?}"),
    }
    let outputs = s.state.join("outputs");
    let pngs = std::fs::read_dir(&outputs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(pngs, 0, "{}", outputs.display());
    // The worker is free again: a short job runs.
    let short = GenerateJob {
        prompt: "a blue square".into(),
        seed: Some(2),
        steps: Some(2),
        width: Some(16),
        height: Some(16),
        ..Default::default()
    };
    let ReplyBody::Queued { job: next } = ok(
        &mut c,
        Request::SubmitGenerate {
            job: short,
            priority: 0,
        },
    ) else {
        panic!("not queued")
    };
    events_until_done(&mut c, next);
    terminate(&mut daemon);
}
