//! `pairstyle daemon` as a process on the tiny SD1.5 fixture: pairs present at start and pairs
//! written slowly become registered styles, a pair dropped again is not retrained, bad input ends
//! in `failed/`, `pairstyle status` reports it all; a daemon killed with SIGKILL mid-training
//! resumes from its checkpoint after a restart, with no job lost or duplicated.

mod daemon_common;

use std::io::Write;
use std::time::Duration;

use daemon_common::{pair_images, terminate, Setup};

#[test]
fn dropped_pairs_become_styles_once() {
    let s = Setup::with_file_events("svc", "flow", 4);
    let (c1, s1) = pair_images(1);
    // Present before the daemon starts.
    std::fs::create_dir_all(s.watch.join("ink")).unwrap();
    std::fs::write(s.watch.join("ink/content.png"), &c1).unwrap();
    std::fs::write(s.watch.join("ink/style.png"), &s1).unwrap();
    std::fs::write(s.watch.join("ink/pair.toml"), "subject = \"disc\"\n").unwrap();
    let mut daemon = s.start("daemon.log", &[]);
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

    s.wait_for("daemon.log", "two registered styles", || {
        s.library_entries()
            .iter()
            .filter(|n| !n.starts_with('.'))
            .count()
            == 2
    });
    assert!(
        s.library_entries().contains(&"ink".to_string()),
        "{:?}",
        s.library_entries()
    );
    assert!(
        s.library_entries().contains(&"oil".to_string()),
        "{:?}",
        s.library_entries()
    );
    s.wait_for("daemon.log", "both jobs done", || {
        let jobs = s.jobs();
        jobs.len() == 2 && jobs.iter().all(|j| j["state"] == "done")
    });
    s.wait_for("daemon.log", "bad input in failed/", || {
        s.watch.join("failed/cut/error.txt").is_file()
            && s.watch.join("failed/alone/error.txt").is_file()
    });
    let err = std::fs::read_to_string(s.watch.join("failed/cut/error.txt")).unwrap();
    assert!(err.contains("content.png"), "{err}");
    // The originals are kept with the style, with a thumbnail and a sample grid.
    let pair_dir = s.state.join("styles/ink/pair");
    assert!(pair_dir.join("content.png").is_file() && pair_dir.join("style.png").is_file());
    let grid = image::open(s.state.join("styles/ink/samples.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (32, 32)); // three 16 px samples on a 2 × 2 grid
    let thumb = image::open(s.state.join("styles/ink/thumbnail.png")).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (16, 16));
    let toml = std::fs::read_to_string(s.state.join("styles/ink/style.toml")).unwrap();
    assert!(
        toml.contains("thumbnail = \"thumbnail.png\"") && toml.contains("\"a photo of a disc\""),
        "{toml}"
    );

    // The same pair again: set aside, not retrained.
    std::fs::create_dir_all(s.watch.join("ink")).unwrap();
    std::fs::write(s.watch.join("ink/content.png"), &c1).unwrap();
    std::fs::write(s.watch.join("ink/style.png"), &s1).unwrap();
    std::fs::write(s.watch.join("ink/pair.toml"), "subject = \"disc\"\n").unwrap();
    s.wait_for("daemon.log", "the duplicate set aside", || {
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
    let s = Setup::new("svc", "kill", 40, "");
    let mut daemon = s.start("first.log", &[]);
    let (c, st) = pair_images(3);
    std::fs::create_dir_all(s.watch.join("ink")).unwrap();
    std::fs::write(s.watch.join("ink/content.png"), &c).unwrap();
    std::fs::write(s.watch.join("ink/style.png"), &st).unwrap();
    std::fs::write(s.watch.join("ink/.ready"), "").unwrap();
    let checkpoints = s.state.join("styles/.checkpoints");
    s.wait_for("first.log", "a checkpoint", || {
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
        s.library_entries().iter().all(|n| n.starts_with('.')),
        "{:?}",
        s.library_entries()
    );

    let mut daemon = s.start("second.log", &[]);
    s.wait_for("second.log", "the job done after restart", || {
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
        .library_entries()
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(visible, ["ink"]);
    // No half-written style folder is left behind.
    assert!(
        !s.library_entries().iter().any(|n| n.ends_with(".tmp")),
        "{:?}",
        s.library_entries()
    );
    terminate(&mut daemon);
}
