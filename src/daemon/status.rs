//! `pairstyle status` as text: the daemon, its devices, the queue counts, and the jobs that are
//! not finished plus the latest finished ones.

use super::journal::{Job, JobSpec, JobState};
use super::protocol::StatusReport;

/// How many finished jobs the text status lists.
pub const RECENT_FINISHED: usize = 5;

/// `3725` → `1h 2m 5s`; `65` → `1m 5s`; `9` → `9s`.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

/// One line about a job.
pub fn format_job(j: &Job) -> String {
    let what = match &j.spec {
        JobSpec::Train(t) => format!("train     {}", t.name),
        JobSpec::Generate(g) => format!("generate  {:?}", g.prompt),
    };
    let mut line = format!("  #{:<4} {:<11} {what}", j.id, j.state.as_str());
    if j.paused {
        line.push_str("  (paused)");
    }
    if let Some(p) = j.progress.filter(|_| !j.state.is_finished()) {
        line.push_str(&format!("  step {}/{}", p.step, p.total));
        if let Some(l) = p.loss {
            line.push_str(&format!("  loss {l:.4}"));
        }
        if p.it_per_s > 0.0 {
            line.push_str(&format!("  {:.2} it/s", p.it_per_s));
        }
        if let Some(eta) = p.eta_secs {
            line.push_str(&format!("  ETA {}", format_duration(eta)));
        }
    }
    if let Some(e) = &j.error {
        line.push_str(&format!("  error: {e}"));
    } else if let (JobState::Done, Some(r)) = (j.state, &j.result) {
        line.push_str(&format!("  → {r}"));
    }
    line
}

/// The whole text status.
pub fn format_status(report: &StatusReport, jobs: &[Job]) -> String {
    let q = &report.queue;
    let mut s = format!(
        "pairstyle daemon {} (pid {}), up {}\n\
         watch:   {}\n\
         library: {}\n",
        report.version,
        report.pid,
        format_duration(report.uptime_secs as f64),
        report.watch,
        report.library
    );
    for d in &report.devices {
        match d.job {
            Some(j) => s.push_str(&format!("device {}: job #{j}\n", d.device)),
            None => s.push_str(&format!("device {}: idle\n", d.device)),
        }
    }
    s.push_str(&format!(
        "queue: {} queued, {} running, {} interrupted, {} done, {} failed, {} cancelled\n",
        q.queued, q.running, q.interrupted, q.done, q.failed, q.cancelled
    ));
    let active: Vec<&Job> = jobs.iter().filter(|j| !j.state.is_finished()).collect();
    let mut finished: Vec<&Job> = jobs.iter().filter(|j| j.state.is_finished()).collect();
    finished.sort_by_key(|j| std::cmp::Reverse(j.updated_unix));
    for j in active.iter().chain(finished.iter().take(RECENT_FINISHED)) {
        s.push_str(&format_job(j));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::journal::{JobProgress, TrainJob};
    use crate::daemon::protocol::{DeviceStatus, QueueCounts};

    fn job(id: u64, state: JobState, updated: u64) -> Job {
        Job {
            id,
            spec: JobSpec::Train(TrainJob {
                pair_id: "x".into(),
                name: format!("style{id}"),
                staged_dir: "/s".into(),
            }),
            state,
            priority: 0,
            paused: false,
            progress: None,
            interruptions: 0,
            error: None,
            result: None,
            created_unix: 0,
            updated_unix: updated,
        }
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(9.4), "9s");
        assert_eq!(format_duration(65.0), "1m 5s");
        assert_eq!(format_duration(3725.0), "1h 2m 5s");
        assert_eq!(format_duration(f64::NAN), "?");
    }

    #[test]
    fn status_lists_active_jobs_and_recent_finished_ones() {
        let mut running = job(3, JobState::Running, 50);
        running.progress = Some(JobProgress {
            step: 40,
            total: 750,
            loss: Some(0.1234),
            loss_style: None,
            it_per_s: 1.5,
            eta_secs: Some(473.0),
        });
        let mut failed = job(2, JobState::Failed, 40);
        failed.error = Some("out of memory".into());
        let mut jobs = vec![running, failed];
        for i in 10..20 {
            jobs.push(job(i, JobState::Done, i));
        }
        let report = StatusReport {
            version: "0.1.0".into(),
            pid: 7,
            uptime_secs: 65,
            watch: "/w".into(),
            library: "/l".into(),
            state_dir: "/s".into(),
            devices: vec![DeviceStatus {
                device: "cpu".into(),
                job: Some(3),
            }],
            queue: QueueCounts::of(&jobs),
        };
        let text = format_status(&report, &jobs);
        assert!(text.contains("up 1m 5s"), "{text}");
        assert!(text.contains("device cpu: job #3"), "{text}");
        assert!(
            text.contains("0 queued, 1 running, 0 interrupted, 10 done, 1 failed"),
            "{text}"
        );
        assert!(
            text.contains("step 40/750  loss 0.1234  1.50 it/s  ETA 7m 53s"),
            "{text}"
        );
        assert!(text.contains("error: out of memory"), "{text}");
        // The 5 most recently updated finished jobs: the failed one (40) and done 19..16.
        assert!(
            text.contains("#19") && text.contains("#16") && !text.contains("#15"),
            "{text}"
        );
    }
}
