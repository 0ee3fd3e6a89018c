//! `pairstyle daemon` as a process on the tiny SD1.5 fixture: pairs present at start and pairs
//! written slowly become registered styles, a pair dropped again is not retrained, bad input ends
//! in `failed/`, `pairstyle status` reports it all; a daemon killed with SIGKILL mid-training
//! resumes from its checkpoint after a restart, with no job lost or duplicated.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

const WAIT: Duration = Duration::from_secs(240);

struct Setup {
    root: PathBuf,
    config: PathBuf,
    watch: PathBuf,
    state: PathBuf,
}

impl Setup {
    /// `poll`: rescan by timer only (else file events drive rescans).
    fn new(name: &str, iterations: usize, poll: bool) -> Self {
        let root = common::scratch_dir("daemon-svc", name);
        let watch = root.join("watch");
        let state = root.join("state");
        let config = root.join("pairstyle.toml");
        let text = format!(
            "[model]\npath = {model:?}\n\
             [train]\niterations = {iterations}\nstyle_start = 2\nlr = 1e-3\ncontent_rank = 4\n\
             style_rank = 4\nresolution = 16\ncheckpoint_every = 2\nseed = 11\n\
             [daemon]\nstate_dir = {state:?}\nwatch = {watch:?}\nsocket = {socket:?}\n\
             stability_secs = 1\npoll_interval_secs = 1\nlone_timeout_secs = 3\npoll = {poll}\n\
             sample_prompts = [\"a {{subject}}\", \"a cat\"]\nsample_steps = 2\nsample_size = 16\n",
            model = common::fixture("tiny-sd15").display().to_string(),
            state = state.display().to_string(),
            watch = watch.display().to_string(),
            socket = root.join("d.sock").display().to_string(),
        );
        std::fs::write(&config, text).unwrap();
        std::fs::create_dir_all(&watch).unwrap();
        Self {
            root,
            config,
            watch,
            state,
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_pairstyle"));
        c.env("PAIRSTYLE_CONFIG", &self.config)
            .env("RAYON_NUM_THREADS", "1")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY");
        c
    }

    fn start(&self, log: &str) -> Child {
        let log = std::fs::File::create(self.root.join(log)).unwrap();
        self.cmd()
            .arg("daemon")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap()
    }

    fn journal(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.state.join("journal.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    fn jobs(&self) -> Vec<serde_json::Value> {
        self.journal()["jobs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn styles(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state.join("styles"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.join(name)).unwrap_or_default()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Wait until `cond` holds, or fail with `what` and the daemon's log.
fn wait_for(setup: &Setup, log: &str, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {what}; daemon log:\n{}",
            setup.log(log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pair_images(seed: u8) -> (Vec<u8>, Vec<u8>) {
    let content = RgbImage::from_fn(24, 20, |x, y| {
        Rgb([(x * 10) as u8 ^ seed, (y * 12) as u8, 128])
    });
    let style = RgbImage::from_fn(24, 20, |x, y| {
        Rgb(content.get_pixel(x, y).0.map(|v| (255 - v) / 64 * 64))
    });
    let enc = |img: &RgbImage| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    (enc(&content), enc(&style))
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "daemon exited with {status}");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "daemon did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dropped_pairs_become_styles_once() {
    let s = Setup::new("flow", 4, false);
    let (c1, s1) = pair_images(1);
    // Present before the daemon starts.
    std::fs::create_dir_all(s.watch.join("ink")).unwrap();
    std::fs::write(s.watch.join("ink/content.png"), &c1).unwrap();
    std::fs::write(s.watch.join("ink/style.png"), &s1).unwrap();
    std::fs::write(s.watch.join("ink/pair.toml"), "subject = \"disc\"\n").unwrap();
    let mut daemon = s.start("daemon.log");
    // Written slowly, in pieces, while the daemon watches.
    let (c2, s2) = pair_images(2);
    std::fs::write(s.watch.join("oil.content.png"), &c2).unwrap();
    let mut f = std::fs::File::create(s.watch.join("oil.style.png")).unwrap();
    for chunk in s2.chunks(s2.len() / 3 + 1) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(f);
    // Bad input: a truncated image and a lone image.
    std::fs::create_dir_all(s.watch.join("cut")).unwrap();
    std::fs::write(s.watch.join("cut/content.png"), &c1[..c1.len() / 2]).unwrap();
    std::fs::write(s.watch.join("cut/style.png"), &s1).unwrap();
    std::fs::write(s.watch.join("alone.style.png"), &s1).unwrap();

    wait_for(&s, "daemon.log", "two registered styles", || {
        s.styles().iter().filter(|n| !n.starts_with('.')).count() == 2
    });
    assert!(s.styles().contains(&"ink".to_string()), "{:?}", s.styles());
    assert!(s.styles().contains(&"oil".to_string()), "{:?}", s.styles());
    wait_for(&s, "daemon.log", "both jobs done", || {
        let jobs = s.jobs();
        jobs.len() == 2 && jobs.iter().all(|j| j["state"] == "done")
    });
    wait_for(&s, "daemon.log", "bad input in failed/", || {
        s.watch.join("failed/cut/error.txt").is_file()
            && s.watch.join("failed/alone/error.txt").is_file()
    });
    let err = std::fs::read_to_string(s.watch.join("failed/cut/error.txt")).unwrap();
    assert!(err.contains("content.png"), "{err}");
    // The originals are kept with the style, with a thumbnail and a sample grid.
    let pair_dir = s.state.join("styles/ink/pair");
    assert!(pair_dir.join("content.png").is_file() && pair_dir.join("style.png").is_file());
    let grid = image::open(s.state.join("styles/ink/samples.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (32, 16));
    let thumb = image::open(s.state.join("styles/ink/thumbnail.png")).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (16, 16));
    let toml = std::fs::read_to_string(s.state.join("styles/ink/style.toml")).unwrap();
    assert!(
        toml.contains("thumbnail = \"thumbnail.png\"") && toml.contains("\"a disc\""),
        "{toml}"
    );

    // The same pair again: set aside, not retrained.
    std::fs::create_dir_all(s.watch.join("ink")).unwrap();
    std::fs::write(s.watch.join("ink/content.png"), &c1).unwrap();
    std::fs::write(s.watch.join("ink/style.png"), &s1).unwrap();
    std::fs::write(s.watch.join("ink/pair.toml"), "subject = \"disc\"\n").unwrap();
    wait_for(&s, "daemon.log", "the duplicate set aside", || {
        std::fs::read_dir(s.state.join("staging/duplicates"))
            .map(|d| d.count() == 1)
            .unwrap_or(false)
    });
    assert_eq!(s.jobs().len(), 2, "a known pair was queued again");

    // `pairstyle status` reports the daemon and its jobs.
    let out = s.cmd().args(["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"]["queue"]["done"], 2);
    assert_eq!(v["jobs"].as_array().unwrap().len(), 2);
    let out = s.cmd().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2 done") && text.contains("train     ink"),
        "{text}"
    );

    terminate(&mut daemon);
    assert!(!s.root.join("d.sock").exists());
    let out = s.cmd().arg("status").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no daemon answers"));
}

#[test]
fn a_daemon_killed_during_training_resumes_from_the_checkpoint() {
    let s = Setup::new("kill", 40, true);
    let mut daemon = s.start("first.log");
    let (c, st) = pair_images(3);
    std::fs::create_dir_all(s.watch.join("ink")).unwrap();
    std::fs::write(s.watch.join("ink/content.png"), &c).unwrap();
    std::fs::write(s.watch.join("ink/style.png"), &st).unwrap();
    std::fs::write(s.watch.join("ink/.ready"), "").unwrap();
    let checkpoints = s.state.join("styles/.checkpoints");
    wait_for(&s, "first.log", "a checkpoint", || {
        std::fs::read_dir(&checkpoints)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
            })
            .unwrap_or(false)
    });
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    let jobs = s.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["state"], "running");
    assert!(
        s.styles().iter().all(|n| n.starts_with('.')),
        "{:?}",
        s.styles()
    );

    let mut daemon = s.start("second.log");
    wait_for(&s, "second.log", "the job done after restart", || {
        s.jobs()
            .first()
            .map(|j| j["state"] == "done")
            .unwrap_or(false)
    });
    let jobs = s.jobs();
    assert_eq!(jobs.len(), 1, "job duplicated: {jobs:?}");
    assert_eq!(jobs[0]["interruptions"], 1);
    let log = s.log("second.log");
    assert!(log.contains("resuming from"), "{log}");
    let visible: Vec<String> = s
        .styles()
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(visible, ["ink"]);
    // No half-written style folder is left behind.
    assert!(
        !s.styles().iter().any(|n| n.ends_with(".tmp")),
        "{:?}",
        s.styles()
    );
    terminate(&mut daemon);
}
