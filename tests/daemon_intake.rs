//! The daemon's drop folder end to end on real files: scan → tracker → intake into staging, known
//! pairs set aside, every kind of bad input moved to `failed/<name>/` with a reason, and an
//! interrupted intake put back. No model is needed.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pairstyle::daemon::dropfolder::{self, Decision, StabilityRules, Tracker};
use pairstyle::daemon::intake::{
    Intake, IntakeOutcome, IntakeSettings, StagedPair, DUPLICATES_DIR, ERROR_FILE, INTAKE_RECORD,
};
use pairstyle::trainer::TrainConfig;

struct Env {
    root: PathBuf,
    watch: PathBuf,
    failed: PathBuf,
    staging: PathBuf,
}

impl Env {
    fn new(name: &str) -> Self {
        let root = common::scratch_dir("daemon-intake", name);
        let watch = root.join("watch");
        let failed = watch.join("failed");
        let staging = root.join("state/staging");
        std::fs::create_dir_all(&watch).unwrap();
        Self {
            root,
            watch,
            failed,
            staging,
        }
    }

    fn intake(&self, max_side: u32) -> Intake {
        Intake::new(
            self.watch.clone(),
            self.failed.clone(),
            self.staging.clone(),
            IntakeSettings {
                train: TrainConfig::default(),
                base_model: "tiny-sd15".into(),
                max_side,
                default_subject: "object".into(),
            },
        )
    }

    /// Scan once and decide with no waiting (markers or zero stability).
    fn decide(&self, stability: u64) -> Vec<Decision> {
        let mut tr = Tracker::new(StabilityRules {
            stability: Duration::from_secs(stability),
            lone_timeout: Duration::from_secs(60),
        });
        let scan = dropfolder::scan(&self.watch).unwrap();
        let t0 = Instant::now();
        let mut out = tr.observe(&scan, t0);
        out.extend(tr.observe(&scan, t0 + Duration::from_secs(3600)));
        out
    }

    /// Decide and take every candidate; returns the outcomes.
    fn run(&self, intake: &Intake, known: &dyn Fn(&str) -> bool) -> Vec<IntakeOutcome> {
        self.decide(0)
            .into_iter()
            .map(|d| match d {
                Decision::Ready(c) => intake.take(&c, known).unwrap(),
                Decision::Failed { candidate, reason } => IntakeOutcome::Rejected {
                    dir: intake.reject(&candidate, &reason).unwrap(),
                    reason,
                },
            })
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn png(side: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([x as u8 ^ seed, y as u8, seed.wrapping_mul(3)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write(p: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

/// A pair folder's name, its files (name, bytes), and a phrase its `error.txt` must contain.
type BadCase = (&'static str, Vec<(&'static str, Vec<u8>)>, &'static str);

fn never(_: &str) -> bool {
    false
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_folder_pair_is_staged_with_its_settings() {
    let env = Env::new("folder");
    let (c, s) = (png(32, 1), png(32, 2));
    write(&env.watch.join("fox/Content.PNG"), &c);
    write(&env.watch.join("fox/style.jpg.part"), b"partial");
    write(&env.watch.join("fox/style.png"), &s);
    write(
        &env.watch.join("fox/pair.toml"),
        b"name = \"ink\"\nsubject = \"fox\"\n[train]\niterations = 12\n",
    );
    let out = env.run(&env.intake(8192), &never);
    assert_eq!(out.len(), 1, "{out:?}");
    let IntakeOutcome::Staged { pair, dir } = &out[0] else {
        panic!("not staged: {out:?}")
    };
    assert_eq!(dir, &env.staging.join(&pair.id));
    assert_eq!(pair.name, "ink");
    assert_eq!(pair.subject, "fox");
    assert_eq!(pair.style_desc, "ink");
    assert_eq!(pair.train.iterations, 12);
    assert_eq!(pair.origin, "fox/");
    assert_eq!(
        (pair.content_file.as_str(), pair.style_file.as_str()),
        ("content.png", "style.png")
    );
    // Everything moved, the in-progress .part file too (the folder moves as a whole), names normalised.
    assert_eq!(
        files_in(dir),
        [
            "content.png",
            INTAKE_RECORD,
            "pair.toml",
            "style.jpg.part",
            "style.png"
        ]
    );
    assert_eq!(std::fs::read(dir.join("content.png")).unwrap(), c);
    assert_eq!(std::fs::read(dir.join("style.png")).unwrap(), s);
    assert_eq!(&StagedPair::load(dir).unwrap(), &**pair);
    assert!(!env.watch.join("fox").exists());
    assert_eq!(files_in(&env.watch), Vec::<String>::new());
}

#[test]
fn the_same_pair_dropped_again_is_recognised_whatever_its_names() {
    let env = Env::new("dup");
    let intake = env.intake(8192);
    let (c, s) = (png(24, 5), png(24, 6));
    write(&env.watch.join("watercolor/content.png"), &c);
    write(&env.watch.join("watercolor/style.png"), &s);
    let first = env.run(&intake, &never);
    let IntakeOutcome::Staged { pair, .. } = &first[0] else {
        panic!("{first:?}")
    };
    // Same bytes, flat form, same effective name.
    write(&env.watch.join("watercolor.content.png"), &c);
    write(&env.watch.join("watercolor.style.png"), &s);
    let second = env.run(&intake, &never);
    let IntakeOutcome::Duplicate { id, dir } = &second[0] else {
        panic!("{second:?}")
    };
    assert_eq!(id, &pair.id);
    assert!(dir.starts_with(env.staging.join(DUPLICATES_DIR)));
    assert_eq!(files_in(dir), ["content.png", INTAKE_RECORD, "style.png"]);
    assert_eq!(files_in(&env.watch), Vec::<String>::new());
    // A different training setting makes it a different pair.
    write(&env.watch.join("w2/content.png"), &c);
    write(&env.watch.join("w2/style.png"), &s);
    write(
        &env.watch.join("w2/pair.toml"),
        b"style_desc = \"watercolor\"\n[train]\nseed = 1\n",
    );
    let third = env.run(&intake, &never);
    assert!(
        matches!(&third[0], IntakeOutcome::Staged { pair: p, .. } if p.id != pair.id),
        "{third:?}"
    );
    // An id the journal knows is a duplicate even when staging was cleaned.
    write(&env.watch.join("w3/content.png"), &png(24, 9));
    write(&env.watch.join("w3/style.png"), &s);
    let fourth = env.run(&intake, &|_| true);
    assert!(
        matches!(&fourth[0], IntakeOutcome::Duplicate { .. }),
        "{fourth:?}"
    );
}

/// Each bad input ends in `failed/<name>/` with its files unchanged and a reason in `error.txt`.
#[test]
fn bad_input_goes_to_failed_with_a_reason() {
    let env = Env::new("bad");
    let good = png(32, 3);
    let truncated = &png(32, 4)[..60];
    let cases: Vec<BadCase> = vec![
        (
            "empty",
            vec![("content.png", vec![]), ("style.png", good.clone())],
            "0 bytes",
        ),
        (
            "cut",
            vec![
                ("content.png", good.clone()),
                ("style.png", truncated.to_vec()),
            ],
            "style.png",
        ),
        (
            "text",
            vec![
                ("content.png", b"just some words".to_vec()),
                ("style.png", good.clone()),
            ],
            "not an image",
        ),
        (
            "huge",
            vec![("content.png", png(40, 1)), ("style.png", good.clone())],
            "beyond the limit",
        ),
        (
            "typo",
            vec![
                ("content.png", good.clone()),
                ("style.png", good.clone()),
                ("pair.toml", b"subjet = \"dog\"".to_vec()),
            ],
            "subjet",
        ),
        (
            "badtrain",
            vec![
                ("content.png", good.clone()),
                ("style.png", good.clone()),
                ("pair.toml", b"[train]\nresolution = 0".to_vec()),
            ],
            "[train]",
        ),
        (
            "my dog",
            vec![("content.png", good.clone()), ("style.png", good.clone())],
            "style name",
        ),
        (
            "twice",
            vec![
                ("content.png", good.clone()),
                ("content.webp", good.clone()),
                ("style.png", good.clone()),
            ],
            "more than one content image",
        ),
        (
            "gif",
            vec![("content.png", good.clone()), ("style.gif", good.clone())],
            "unsupported image type",
        ),
    ];
    for (name, files, _) in &cases {
        for (f, bytes) in files {
            write(&env.watch.join(name).join(f), bytes);
        }
    }
    // A lone flat image and a stray file, failed through the tracker's timeout.
    write(&env.watch.join("solo.content.png"), &good);
    write(&env.watch.join("notes.txt"), b"hello");
    let out = env.run(&env.intake(36), &never);
    assert_eq!(out.len(), cases.len() + 2, "{out:?}");
    for (name, files, needle) in &cases {
        let dir = env.failed.join(name);
        let text = std::fs::read_to_string(dir.join(ERROR_FILE))
            .unwrap_or_else(|e| panic!("{name}: no error.txt: {e}"));
        assert!(text.contains(needle), "{name}: {needle:?} not in:\n{text}");
        for (f, bytes) in files {
            assert_eq!(
                &std::fs::read(dir.join(f)).unwrap(),
                bytes,
                "{name}/{f} changed"
            );
        }
    }
    let solo = std::fs::read_to_string(env.failed.join("solo").join(ERROR_FILE)).unwrap();
    assert!(solo.contains("style image never arrived"), "{solo}");
    assert!(env.failed.join("solo/solo.content.png").is_file());
    let stray = std::fs::read_to_string(env.failed.join("notes.txt").join(ERROR_FILE)).unwrap();
    assert!(stray.contains("not part of a pair"), "{stray}");
    // Only failed/ is left in the watch folder, and the next scan ignores it.
    assert_eq!(files_in(&env.watch), ["failed"]);
    assert!(dropfolder::scan(&env.watch).unwrap().candidates.is_empty());
    // Failing the same name again never overwrites the first failure.
    write(&env.watch.join("empty/content.png"), b"");
    write(&env.watch.join("empty/style.png"), &good);
    env.run(&env.intake(36), &never);
    assert!(env.failed.join("empty.2").join(ERROR_FILE).is_file());
    assert!(env.failed.join("empty").join(ERROR_FILE).is_file());
}

#[test]
fn stability_waits_on_real_files() {
    let env = Env::new("stable");
    write(&env.watch.join("p.content.png"), &png(16, 1));
    write(&env.watch.join("p.style.png"), &png(16, 2));
    // Without a marker, the first scan decides nothing.
    let mut tr = Tracker::new(StabilityRules {
        stability: Duration::from_secs(10),
        lone_timeout: Duration::from_secs(60),
    });
    let t0 = Instant::now();
    let scan = dropfolder::scan(&env.watch).unwrap();
    assert!(tr.observe(&scan, t0).is_empty());
    // Appending to the style image resets the wait.
    let mut more = png(16, 2);
    more.extend_from_slice(b"tail");
    write(&env.watch.join("p.style.png"), &more);
    let scan = dropfolder::scan(&env.watch).unwrap();
    assert!(tr.observe(&scan, t0 + Duration::from_secs(9)).is_empty());
    assert!(tr.observe(&scan, t0 + Duration::from_secs(18)).is_empty());
    assert_eq!(tr.observe(&scan, t0 + Duration::from_secs(19)).len(), 1);
    // A marker renamed in makes it ready at once.
    write(&env.watch.join("q.content.png"), &png(16, 3));
    write(&env.watch.join("q.style.png"), &png(16, 4));
    write(&env.watch.join("q.ready"), b"");
    let scan = dropfolder::scan(&env.watch).unwrap();
    let d = tr.observe(&scan, t0 + Duration::from_secs(20));
    assert!(
        matches!(&d[..], [Decision::Ready(c)] if c.name == "q"),
        "{d:?}"
    );
}

#[test]
fn an_interrupted_intake_is_put_back_and_taken_again() {
    let env = Env::new("recover");
    let intake = env.intake(8192);
    // What a crash between "move files" and "rename into place" leaves behind.
    let partial = env.staging.join("abc.partial");
    write(&partial.join("content.png"), &png(16, 1));
    write(&partial.join("style.png"), &png(16, 2));
    let record = StagedPair {
        id: "abc".into(),
        name: "sketch".into(),
        subject: "object".into(),
        style_desc: "sketch".into(),
        train: TrainConfig::default(),
        base_model: "tiny-sd15".into(),
        content_file: "content.png".into(),
        style_file: "style.png".into(),
        origin: "sketch/".into(),
        staged_unix: 0,
    };
    write(
        &partial.join(INTAKE_RECORD),
        serde_json::to_string(&record).unwrap().as_bytes(),
    );
    let back = intake.recover().unwrap();
    assert_eq!(back, [env.watch.join("sketch")]);
    assert!(!partial.exists());
    let out = env.run(&intake, &never);
    assert!(
        matches!(&out[..], [IntakeOutcome::Staged { pair, .. }] if pair.name == "sketch"),
        "{out:?}"
    );
    // Nothing else is moved by recovery.
    assert!(intake.recover().unwrap().is_empty());
}

#[test]
fn a_transient_intake_failure_is_retried_with_backoff() {
    use pairstyle::daemon::service::{DaemonState, ScanState};
    let env = Env::new("retry");
    let state_dir = env.root.join("state");
    let text = format!(
        "[daemon]\nstate_dir = {:?}\nwatch = {:?}\nsocket = {:?}\nstability_secs = 1\n\
         retry_initial_secs = 5\nretry_max_secs = 20\n",
        state_dir.display().to_string(),
        env.watch.display().to_string(),
        env.root.join("d.sock").display().to_string(),
    );
    let config: pairstyle::config::Config = toml::from_str(&text).unwrap();
    let daemon = DaemonState::open(config.clone(), env.root.join("no-model")).unwrap();
    let staging = state_dir.join("staging");
    // Staging is unusable (a file where the folder should be): every intake fails with I/O.
    std::fs::remove_dir_all(&staging).unwrap();
    std::fs::write(&staging, b"in the way").unwrap();
    write(&env.watch.join("fox/content.png"), &png(32, 1));
    write(&env.watch.join("fox/style.png"), &png(32, 2));
    let mut scan = ScanState::new(&config.daemon);
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(daemon.scan_once(&mut scan, t0).unwrap(), 0);
    // Stable after 1 s: taken, fails, retried after 5 s, then 10 s, then 20 s (the cap).
    assert_eq!(daemon.scan_once(&mut scan, at(1)).unwrap(), 1);
    assert_eq!(scan.backoff.failures("dir:fox"), 1);
    assert_eq!(daemon.scan_once(&mut scan, at(5)).unwrap(), 0);
    assert_eq!(daemon.scan_once(&mut scan, at(6)).unwrap(), 1);
    assert_eq!(scan.backoff.failures("dir:fox"), 2);
    assert_eq!(daemon.scan_once(&mut scan, at(15)).unwrap(), 0);
    assert_eq!(daemon.scan_once(&mut scan, at(16)).unwrap(), 1);
    assert_eq!(daemon.scan_once(&mut scan, at(35)).unwrap(), 0);
    assert_eq!(daemon.scan_once(&mut scan, at(36)).unwrap(), 1);
    assert_eq!(daemon.scan_once(&mut scan, at(56)).unwrap(), 1);
    assert_eq!(scan.backoff.failures("dir:fox"), 5);
    // The files never moved.
    assert!(env.watch.join("fox/content.png").is_file());
    // The cause goes away: the next retry takes the pair and queues its training job.
    std::fs::remove_file(&staging).unwrap();
    assert_eq!(daemon.scan_once(&mut scan, at(60)).unwrap(), 0);
    assert_eq!(daemon.scan_once(&mut scan, at(76)).unwrap(), 1);
    assert_eq!(scan.backoff.failures("dir:fox"), 0);
    assert!(!env.watch.join("fox").exists());
    assert_eq!(files_in(&staging).len(), 1);
    let journal = std::fs::read_to_string(state_dir.join("journal.json")).unwrap();
    assert!(journal.contains("\"name\": \"fox\""), "{journal}");
}
