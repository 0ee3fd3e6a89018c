//! `pairstyle daemon` killed with SIGKILL at the moments where a crash could lose or duplicate
//! work: while writing the journal (after queueing a job, after finishing one) and while saving
//! the style into the library. After each restart nothing is lost or duplicated and the library
//! holds no half-written style. The kills land exactly there through the test-only pause points
//! of `pairstyle::daemon::testhook` (`PAIRSTYLE_TEST_PAUSE`).

mod daemon_common;

use std::path::Path;
use std::time::Duration;

use daemon_common::{kill, pair_images, random_style, terminate, Daemon, Setup};
use pairstyle::daemon::journal::GenerateJob;
use pairstyle::daemon::protocol::{ReplyBody, Request};
use pairstyle::daemon::server::Client;

fn start_paused(s: &Setup, log: &str, point: &str) -> Daemon {
    let dir = s.root.display().to_string();
    s.start(
        log,
        &[
            ("PAIRSTYLE_TEST_PAUSE", point),
            ("PAIRSTYLE_TEST_PAUSE_DIR", &dir),
        ],
    )
}

fn marker(s: &Setup, point: &str) -> std::path::PathBuf {
    s.root.join(format!("{point}.paused"))
}

/// The journal must always parse: a kill mid-write leaves the previous version.
fn journal_parses(s: &Setup) -> serde_json::Value {
    let text = std::fs::read_to_string(s.state.join("journal.json")).unwrap();
    serde_json::from_str(&text).expect("journal.json is not valid JSON after a kill")
}

fn visible(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|n| !n.starts_with('.'))
        .cloned()
        .collect()
}

fn temp_files(dir: &Path) -> Vec<String> {
    daemon_common::entries(dir)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn kills_while_queueing_saving_the_style_and_finishing_lose_and_duplicate_nothing() {
    let s = Setup::new("daemon-crash", "train", 4, "");
    let (c, st) = pair_images(5);
    std::fs::create_dir_all(s.watch.join("ink")).unwrap();
    std::fs::write(s.watch.join("ink/content.png"), &c).unwrap();
    std::fs::write(s.watch.join("ink/style.png"), &st).unwrap();
    std::fs::write(s.watch.join("ink/.ready"), "").unwrap();

    // 1. Killed while the journal is written after queueing the training job: the pair is
    //    staged, the job not on disk.
    let mut d = start_paused(&s, "1.log", "journal-enqueue");
    s.wait_for("1.log", "the pause after queueing", || {
        marker(&s, "journal-enqueue").exists()
    });
    kill(&mut d);
    let j = journal_parses(&s);
    assert_eq!(j["jobs"].as_array().map(Vec::len), Some(0), "{j}");
    assert!(!temp_files(&s.state).is_empty(), "no half-written journal");
    let staged = daemon_common::entries(&s.state.join("staging"));
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert!(!s.watch.join("ink").exists());

    // 2. Restarted: the staged pair is queued again and trained; killed while the finished style
    //    sits complete in its temporary folder.
    let mut d = start_paused(&s, "2.log", "style-save");
    s.wait_for("2.log", "the pause before the style is renamed", || {
        marker(&s, "style-save").exists()
    });
    kill(&mut d);
    let log = s.log("2.log");
    assert!(log.contains("queueing staged pair ink"), "{log}");
    assert!(
        temp_files(&s.state).is_empty(),
        "stale journal temp kept: {log}"
    );
    let jobs = s.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["state"], "running");
    assert!(
        visible(&s.library_entries()).is_empty(),
        "{:?}",
        s.library_entries()
    );
    assert!(
        s.library_entries().iter().any(|n| n.ends_with(".tmp")),
        "{:?}",
        s.library_entries()
    );

    // 3. Restarted: the half-saved style is cleared away, training resumes from its checkpoint,
    //    the style is registered; killed while the journal records the job as done.
    let mut d = start_paused(&s, "3.log", "journal-finish");
    s.wait_for("3.log", "the pause after finishing", || {
        marker(&s, "journal-finish").exists()
    });
    kill(&mut d);
    let log = s.log("3.log");
    assert!(log.contains("resuming from iteration"), "{log}");
    assert!(log.contains("interrupted registration"), "{log}");
    assert_eq!(visible(&s.library_entries()), ["ink"]);
    assert!(!s.library_entries().iter().any(|n| n.ends_with(".tmp")));
    let jobs = s.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["state"], "running", "{jobs:?}");

    // 4. Restarted without pauses: the job is recognised as registered, not trained again.
    let mut d = s.start("4.log", &[]);
    s.wait_for("4.log", "the job done", || {
        s.jobs()
            .first()
            .map(|j| j["state"] == "done")
            .unwrap_or(false)
    });
    terminate(&mut d);
    let log = s.log("4.log");
    assert!(log.contains("already registered"), "{log}");
    assert!(!log.contains("iteration"), "trained again: {log}");
    let jobs = s.jobs();
    assert_eq!(jobs.len(), 1, "job duplicated: {jobs:?}");
    assert_eq!(jobs[0]["interruptions"], 2);
    assert!(jobs[0]["result"].as_str().unwrap().ends_with("ink"));
    assert_eq!(s.library_entries(), [".checkpoints", "ink"]);
    assert!(temp_files(&s.state).is_empty());
    // The style is whole: it lists, loads, and carries its previews.
    let lib = pairstyle::library::Library::new(s.library());
    let meta = lib.meta("ink").unwrap();
    assert_eq!(meta.thumbnail.as_deref(), Some("thumbnail.png"));
    let grid = meta.samples.expect("no sample grid");
    assert_eq!(grid.prompts[0], "a photo of a object");
    let dir = s.library().join("ink");
    let img = image::open(dir.join(&grid.file)).unwrap();
    // 3 cells of 16 px in a 2 × 2 grid.
    assert_eq!((img.width(), img.height()), (32, 32));
    assert!(dir.join("thumbnail.png").is_file() && dir.join("pair/content.png").is_file());
}

#[test]
fn a_generation_killed_while_finishing_is_rendered_once() {
    let s = Setup::new("daemon-crash", "gen", 4, "");
    random_style(&s.library(), "ink", "ink wash", 1);
    let mut d = start_paused(&s, "1.log", "journal-finish");
    let mut client = None;
    for _ in 0..600 {
        if let Ok(c) = Client::connect(&s.socket, "test", Duration::from_secs(60)) {
            client = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = client.expect("no daemon on the socket");
    let job = GenerateJob {
        prompt: "a blue square".into(),
        styles: vec![pairstyle::daemon::journal::StyleWeight {
            name: "ink".into(),
            lambda: Some(2.0),
        }],
        seed: Some(3),
        ..Default::default()
    };
    let reply = c
        .request(Request::SubmitGenerate { job, priority: 0 })
        .unwrap();
    assert!(
        matches!(reply, Ok(ReplyBody::Queued { job: 1 })),
        "{reply:?}"
    );
    s.wait_for("1.log", "the pause after rendering", || {
        marker(&s, "journal-finish").exists()
    });
    kill(&mut d);
    let outputs = daemon_common::entries(&s.state.join("outputs"));
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    let first = std::fs::read(s.state.join("outputs").join(&outputs[0])).unwrap();
    assert_eq!(s.jobs()[0]["state"], "running");

    let mut d = s.start("2.log", &[]);
    s.wait_for("2.log", "the job done", || {
        s.jobs()
            .first()
            .map(|j| j["state"] == "done")
            .unwrap_or(false)
    });
    terminate(&mut d);
    // Rendered again under the same name with the same seed: one file, the same image.
    let after = daemon_common::entries(&s.state.join("outputs"));
    assert_eq!(after, outputs);
    let second = std::fs::read(s.state.join("outputs").join(&after[0])).unwrap();
    assert_eq!(first, second);
    let jobs = s.jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["interruptions"], 1);
}
